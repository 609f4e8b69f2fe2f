"""The training loop under sharded weights (FSDP2 over gloo on 2 CPU processes) and the parts of the
loop that differ per layout (DDP, FSDP 1/2, ZeRO-1/2/3), tested on stand-ins where no CPU can run them."""
import json
import os
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import CPU_PROCESSES_ENV, TORCHRUN, run_py
from prism.training.distributed import EMA, as_scalar, canonical_name, layout, parameter_probe, weights_sharded

EMA_BINDS = ["--bind", "train.batch_size = 4", "--bind", "train.steps = 4", "--bind", "train.log_every = 1",
             "--bind", "train.save_every = 2", "--bind", "train.ema_decay = 0.9", "--bind", "train.lr_schedule = 'cosine'",
             "--bind", "train.warmup_steps = 1"]
FSDP_ENV = dict(CPU_PROCESSES_ENV, PRISM_CPU_FSDP="1")


def rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def weights(out, step):
    return load_file(os.path.join(out, "checkpoints", f"step_{step:08d}", "weights.safetensors"))


def test_fsdp2_on_two_cpu_processes_trains_like_one_process_and_resumes(tiny_gin, tmp_path):
    """FSDP2 (weights sharded over 2 gloo processes, batch 4 each) lands on the weights of 1 process
    with 2 accumulation micro-steps of batch 4 (the same 8 sequences per step), EMA included; the
    checkpoint holds each rank's EMA shard and the gathered full weights; a run stopped at step 1 and
    resumed under FSDP2 reproduces the uninterrupted run's losses and weights."""
    fsdp, single, part = str(tmp_path / "fsdp"), str(tmp_path / "single"), str(tmp_path / "part")
    run_py(["train", tiny_gin, "--output-dir", fsdp, *EMA_BINDS], env=FSDP_ENV, launcher=TORCHRUN)
    run_py(["train", tiny_gin, "--output-dir", single, *EMA_BINDS, "--bind", "train.grad_accum = 2"])
    state = json.load(open(os.path.join(fsdp, "checkpoints", "step_00000004", "trainer_state.json")))
    assert state["layout"] == "fsdp2" and state["world_size"] == 2
    ckpt = os.path.join(fsdp, "checkpoints", "step_00000004")
    assert {"ema_rank00000.pt", "ema_rank00001.pt"} <= set(os.listdir(ckpt))
    shard0 = torch.load(os.path.join(ckpt, "ema_rank00000.pt"), weights_only=True)["shadow"]
    wf, ws = weights(fsdp, 4), weights(single, 4)
    name = "backbone.vocab_embed"
    assert shard0[name].shape[0] < wf[name].shape[0]  # each rank keeps a part; the file holds the whole
    assert set(wf) == set(ws)
    for k in wf:
        assert torch.allclose(wf[k], ws[k], atol=2e-5), k
    a, b = rows(fsdp), rows(single)
    assert sorted(a) == [1, 2, 3, 4]
    for s in a:
        assert a[s]["loss"] == pytest.approx(b[s]["loss"], rel=1e-5)
    result = json.load(open(os.path.join(fsdp, "train_result.json")))["train"]
    assert result["ranks_in_sync"] is None  # ranks hold different shards by design: nothing to compare

    stop = run_py(["train", tiny_gin, "--output-dir", part, *EMA_BINDS, "--bind", "train.max_minutes = 0"], env=FSDP_ENV, launcher=TORCHRUN)
    assert "max_minutes=0 reached at step 1" in stop.stdout + stop.stderr
    proc = run_py(["train", tiny_gin, "--output-dir", part, *EMA_BINDS, "--resume"], env=FSDP_ENV, launcher=TORCHRUN)
    assert "resumed from" in proc.stdout + proc.stderr
    c = rows(part)
    assert sorted(c) == [1, 2, 3, 4]
    for s in (2, 3, 4):
        assert c[s]["loss"] == pytest.approx(a[s]["loss"], rel=1e-5)
    wp = weights(part, 4)
    for k in wf:
        assert torch.allclose(wp[k], wf[k], atol=1e-6), k


def fake_accelerator(kind, processes=2, fsdp2=False, stage=None):
    plugin = SimpleNamespace(deepspeed_config={"zero_optimization": {"stage": stage}}) if stage is not None else None
    return SimpleNamespace(distributed_type=f"DistributedType.{kind}", is_fsdp2=fsdp2, num_processes=processes,
                           state=SimpleNamespace(deepspeed_plugin=plugin))


@pytest.mark.parametrize("acc,name,sharded,ema", [
    (fake_accelerator("NO", 1), "single", False, True),
    (fake_accelerator("MULTI_GPU"), "ddp", False, True),
    (fake_accelerator("FSDP", fsdp2=True), "fsdp2", True, True),
    (fake_accelerator("FSDP"), "fsdp1", True, False),
    (fake_accelerator("DEEPSPEED", stage=2), "zero2", False, True),
    (fake_accelerator("DEEPSPEED", stage=3), "zero3", True, False),
])
def test_layouts_and_where_the_ema_can_follow(acc, name, sharded, ema):
    assert layout(acc) == name and weights_sharded(acc) == sharded and EMA.supported(acc) == ema


def test_ema_is_refused_with_a_clear_message_where_it_cannot_follow_the_weights(tiny_gin):
    from prism.training.loop import train

    exp = SimpleNamespace(loss=object(), model=None)
    with pytest.raises(ValueError, match=r"ema_decay = 0.9 is not supported under zero3.*set train.ema_decay = 0.0"):
        train(exp, fake_accelerator("DEEPSPEED", stage=3), "unused", ema_decay=0.9)


def test_gradient_norms_as_each_layout_returns_them():
    dev = torch.device("cpu")
    assert as_scalar(None, dev) is None  # DeepSpeed before its first step
    assert as_scalar(2.5, dev).item() == 2.5 and as_scalar(2.5, dev).dtype == torch.float32
    t = as_scalar(torch.tensor([3.0], dtype=torch.bfloat16), dev)
    assert t.shape == () and t.dtype == torch.float32 and t.item() == 3.0


def test_parameter_probe_sees_a_changed_element_and_nan_without_copying_to_float32():
    p = torch.arange(12, dtype=torch.bfloat16).reshape(3, 4)
    base = parameter_probe([p], torch.device("cpu"))
    assert base.tolist() == [66.0, 0.0 + 3 + 6 + 9]  # every element; every third element
    q = p.clone()
    q[0, 1] += 1  # not one of the every-third elements: only the first sum moves
    assert not torch.equal(parameter_probe([q], torch.device("cpu")), base)
    q[0, 1] = float("nan")
    assert not torch.isfinite(parameter_probe([q], torch.device("cpu"))).all()


def test_parameter_probe_in_slices_and_only_what_trains(monkeypatch):
    """The probe sums slices (a sum with dtype= widens its whole input: 2 GB for LLaDA-8B's bf16 output
    layer), with the same totals; the checks at checkpoints look only at what trains."""
    import prism.training.distributed as dist

    p = torch.arange(40, dtype=torch.bfloat16)
    whole = parameter_probe([p], torch.device("cpu"))
    monkeypatch.setattr(dist, "PROBE_SLICE", 6)  # 7 slices, each a multiple of 3 long
    assert torch.equal(parameter_probe([p], torch.device("cpu")), whole)
    assert whole.tolist() == [780.0, float(sum(range(0, 40, 3)))]
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    model[0].requires_grad_(False)
    assert [id(t) for t in dist.trained(model)] == [id(model[1].weight), id(model[1].bias)]
    model[1].requires_grad_(False)  # nothing trains: everything is checked
    assert len(dist.trained(model)) == 4


@pytest.mark.parametrize("name,kind", [("fsdp2", "FSDP"), ("zero3", "DEEPSPEED"), ("zero2", "DEEPSPEED"), ("ddp", "MULTI_GPU"),
                                       ("fsdp2_llada", "FSDP"), ("zero3_llada", "DEEPSPEED")])
def test_shipped_accelerate_configs_parse(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    import prism.backbones.dit as dit
    import prism.backbones.llada as llada
    from conftest import REPO

    cfg = load_config_from_file(os.path.join(REPO, "accelerate_configs", f"{name}.yaml"))
    assert str(cfg.distributed_type).endswith(kind) and cfg.mixed_precision == "bf16"
    if name.startswith("fsdp2"):
        assert cfg.fsdp_config["fsdp_version"] == 2
        module = llada if name.endswith("llada") else dit
        assert hasattr(module, cfg.fsdp_config["fsdp_transformer_layer_cls_to_wrap"])  # the class to wrap exists
    if name.startswith("zero"):
        assert cfg.deepspeed_config["zero_stage"] == int(name.split("_")[0][-1])


def test_the_probe_reads_zero3_partitions_behind_their_empty_placeholders():
    """ZeRO-3 leaves an empty tensor in the parameter and keeps this rank's part in ``ds_tensor``."""
    p = torch.nn.Parameter(torch.empty(0))
    p.ds_tensor = torch.tensor([1.0, float("nan")])
    probe = parameter_probe([p], torch.device("cpu"))
    assert probe.numel() == 2 and not torch.isfinite(probe).all()


def test_ema_names_ignore_wrapper_segments_and_an_unused_average_is_an_error():
    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    ema = EMA(model, decay=0.5)
    wrapped = {"0._checkpoint_wrapped_module.weight": torch.zeros(2, 2), "0.bias": torch.zeros(2)}
    out = ema.weights({canonical_name(k): v for k, v in wrapped.items()})
    assert torch.equal(out["0.weight"], model[0].weight.detach())
    with pytest.raises(KeyError, match="without a weight"):
        ema.weights({"0.bias": torch.zeros(2)})
