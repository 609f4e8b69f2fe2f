"""prism/adapters/lora.py: LoRA on the backbone (peft's inject_adapter_in_model), checked targets, what
trains, trainable-only checkpoints, merging into plain weights, gin composition, and a LoRA run."""
import json
import os
from types import SimpleNamespace

import gin
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from prism.adapters import has_adapter, parameter_counts, parameter_report
from prism.adapters.lora import LoRA, lora_parameter_names, merge_lora, merged_state_dict
from prism.backbones.dit import DiT
from prism.checkpoint import ADAPTER_KEY, load_adapter, load_weights, save_adapter, save_weights
from prism.training.checkpoints import load_latest, resume_load_kwargs, weights_to_save
from prism.experiment import build_experiment
from prism.heads.quality import LinearHead
from prism.model import MDM

IDS = torch.tensor([[0, 3, 5, 0, 7, 1, 0, 2, 9, 4], [4, 0, 0, 8, 6, 0, 1, 0, 3, 0]])
TASK = SimpleNamespace(vocab_size=11, mask_id=0)  # build_experiment reads only these of a task
QKV = ["attn_qkv"]


def base(seed: int = 0, dtype=torch.float32) -> MDM:
    """A test-sized DiT MDM with a head, every weight drawn from ``seed`` (adaLN-zero would hide differences)."""
    torch.manual_seed(seed)
    model = MDM(DiT(vocab_size=11, mask_id=0, preset="test"), LinearHead)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.to(dtype).eval()


def outputs(model: MDM):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=model.head.out.linear.weight.dtype == torch.bfloat16):
        out = model(IDS)  # a bfloat16 DiT runs under autocast (its timestep embedding is float32)
    return out.log_probs.float(), out.quality_logits.float()


def assert_same(a, b, atol=0.0):
    for x, y in zip(a, b):
        finite = torch.isfinite(x)
        assert torch.equal(finite, torch.isfinite(y))
        torch.testing.assert_close(x[finite], y[finite], atol=atol, rtol=0)


def randomize_lora(model, seed=1):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name in lora_parameter_names(model):
            model.get_parameter(name).normal_(0, 0.3)


def test_injected_model_equals_the_base_at_init():
    model, reference = base(), base()
    adapted = LoRA(rank=4, alpha=8, dropout=0.1, target_modules=QKV).apply(model)
    assert adapted == ["blocks.0.attn_qkv", "blocks.1.attn_qkv"] and has_adapter(model) and not has_adapter(reference)
    names = lora_parameter_names(model)
    assert len(names) == 4 and all(".lora_" in n and n.startswith("backbone.blocks.") for n in names)
    assert all(not torch.count_nonzero(model.get_parameter(n)) for n in names if ".lora_B." in n)  # B starts at zero
    assert_same(outputs(model), outputs(reference))
    assert model.backbone.blocks[0].attn_qkv.scaling["default"] == 2.0


def test_unknown_or_non_linear_target_is_an_error_listing_the_linear_layers():
    model = base()
    with pytest.raises(ValueError, match="'q_proj' matches no module") as err:
        LoRA(target_modules=["attn_qkv", "q_proj"]).apply(model)
    for name in ("'attn_qkv'", "'attn_out'", "'mlp.0'", "'mlp.2'", "'adaLN_modulation'"):
        assert name in str(err.value)
    assert "blocks.0" not in str(err.value).split("linear layers:")[1].split(";")[0]  # deduplicated suffixes
    with pytest.raises(ValueError, match="not linear layers"):
        LoRA(target_modules=["mlp"]).apply(model)
    with pytest.raises(ValueError, match="target_modules is empty"):
        LoRA().apply(model)
    with pytest.raises(ValueError, match="exclude: 'attn_out' matches none"):
        LoRA(target_modules=QKV, exclude=["attn_out"]).apply(model)
    assert not has_adapter(model)  # nothing was injected by a failed apply


def test_output_layer_is_adapted_only_when_named_in_full():
    model = base()
    with pytest.raises(ValueError, match=r"would adapt the output layer \['output_layer.linear'\].*name it in full"):
        LoRA(target_modules=["linear"]).apply(model)
    assert LoRA(target_modules=["output_layer.linear"]).apply(model) == ["output_layer.linear"]
    # exclude takes names out of what the targets match
    assert LoRA(target_modules=["attn_qkv"], exclude=["blocks.1.attn_qkv"]).apply(base()) == ["blocks.0.attn_qkv"]


def test_build_experiment_trains_only_lora_and_head_and_a_step_changes_only_those():
    exp = build_experiment(model=base(), task=TASK, adapter=LoRA(rank=4, target_modules=QKV))
    model = exp.model
    train = {n for n, p in model.named_parameters() if p.requires_grad}
    assert train == set(lora_parameter_names(model)) | {n for n, _ in model.named_parameters() if n.startswith("head.")}
    trainable, total = parameter_counts(model)
    assert trainable == sum(model.get_parameter(n).numel() for n in train) and total == sum(p.numel() for p in model.parameters())
    assert parameter_report(model).startswith(f"trainable {trainable:,} / {total:,} (")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(2):  # two steps: A gets a gradient once B is no longer zero
        out = model(IDS)
        masked = IDS == 0
        loss = -out.log_probs[masked].logsumexp(-1).mean() - out.log_probs[masked][:, 5].mean() + out.quality_logits.pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == train
    # experiment.trainable still decides when given
    exp = build_experiment(model=base(), task=TASK, adapter=LoRA(target_modules=QKV), trainable=["head"])
    assert {n for n, p in exp.model.named_parameters() if p.requires_grad} == {n for n, _ in exp.model.named_parameters()
                                                                                 if n.startswith("head.")}


def test_trainable_only_checkpoint_holds_lora_and_head_and_loads_onto_a_fresh_base(tmp_path):
    exp = build_experiment(model=base(), task=TASK, adapter=LoRA(rank=4, target_modules=QKV))
    randomize_lora(exp.model)
    with torch.no_grad():
        exp.model.head.out.linear.bias.fill_(0.7)
    only = weights_to_save(exp.model, "auto")
    assert weights_to_save(base(), "auto") is None and weights_to_save(exp.model, "all") is None
    path = str(tmp_path / "adapter.safetensors")
    save_adapter(exp.model, path, only)
    keys = set(load_file(path))
    assert keys == set(only) and all(".lora_" in k or k.startswith("head.") for k in keys)
    fresh = build_experiment(model=base(), task=TASK, adapter=LoRA(rank=4, target_modules=QKV)).model
    assert not torch.allclose(outputs(fresh)[1], outputs(exp.model)[1])
    load_adapter(fresh, path)
    assert_same(outputs(fresh), outputs(exp.model))
    # a key that names no parameter is an error, and the model is untouched
    state = load_file(path)
    state["backbone.blocks.0.attn_out.lora_A.default.weight"] = torch.zeros(4, 32)
    save_file(state, str(tmp_path / "bad.safetensors"), metadata={ADAPTER_KEY: "[]"})
    with pytest.raises(ValueError, match="match no parameter.*attn_out.lora_A"):
        load_adapter(fresh, str(tmp_path / "bad.safetensors"))


def test_resume_of_a_trainable_only_checkpoint_is_checked(tmp_path):
    model = build_experiment(model=base(), task=TASK, adapter=LoRA(rank=4, target_modules=QKV)).model
    ckpt = tmp_path / "step_00000002"
    ckpt.mkdir()
    assert resume_load_kwargs(model, str(ckpt)) == {}  # not a trainable-only checkpoint: accelerate loads strictly
    only = weights_to_save(model, "trainable")
    save_weights(model.state_dict(), model, str(ckpt / "weights.safetensors"), only=only)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k in only}
    save_file(state, str(ckpt / "model.safetensors"))
    assert resume_load_kwargs(model, str(ckpt)) == {"strict": False}
    ddp_like = torch.nn.Module()  # DDP's names carry 'module.', accelerate's file does not
    ddp_like.module = model
    assert resume_load_kwargs(ddp_like, str(ckpt)) == {"strict": False}
    save_file({**state, "backbone.nope.weight": torch.zeros(1)}, str(ckpt / "model.safetensors"))
    with pytest.raises(ValueError, match=r"keys that name no weight: \['backbone.nope.weight'\]"):
        resume_load_kwargs(model, str(ckpt))
    save_file({k: v for k, v in state.items() if not k.startswith("head.")}, str(ckpt / "model.safetensors"))
    with pytest.raises(ValueError, match="trained parameters it lacks: \\['head."):
        resume_load_kwargs(model, str(ckpt))


def test_merged_weights_load_into_a_model_without_adapter_with_the_same_outputs(tmp_path):
    model = base()
    LoRA(rank=4, alpha=16, target_modules=["attn_qkv", "attn_out", "mlp.0"]).apply(model)
    randomize_lora(model)
    adapted = outputs(model)
    assert not torch.allclose(adapted[0][torch.isfinite(adapted[0])], outputs(base())[0][torch.isfinite(adapted[0])])
    state = merged_state_dict(model)
    plain = base(seed=5)
    assert set(state) == set(plain.state_dict())  # plain names: no base_layer, no lora keys
    path = str(tmp_path / "merged.safetensors")
    save_weights(state, plain, path)
    load_weights(plain, path)  # strict: every key of the model without an adapter
    assert_same(outputs(plain), adapted, atol=1e-5)
    assert merge_lora(model) == 7 and not has_adapter(model)  # 2 blocks x 3 + sigma_map.mlp.0 (a suffix match)
    assert set(model.state_dict()) == set(plain.state_dict())
    assert_same(outputs(model), adapted, atol=1e-5)


def test_bf16_base_with_float32_lora_and_dropout_only_in_training():
    model, reference = base(dtype=torch.bfloat16), base(dtype=torch.bfloat16)
    LoRA(rank=4, dropout=0.5, target_modules=QKV).apply(model)
    assert {model.get_parameter(n).dtype for n in lora_parameter_names(model)} == {torch.float32}
    assert model.backbone.blocks[0].attn_qkv.base_layer.weight.dtype == torch.bfloat16
    assert_same(outputs(model), outputs(reference))
    randomize_lora(model)
    assert_same(outputs(model), outputs(model))  # eval mode: no dropout
    model.train()
    torch.manual_seed(0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = model(IDS).quality_logits
        b = model(IDS).quality_logits
    assert not torch.equal(a, b)
    a.float().sum().backward()
    assert all(model.get_parameter(n).grad is not None for n in lora_parameter_names(model))
    model.eval()
    state = merged_state_dict(model)
    assert state["backbone.blocks.0.attn_qkv.weight"].dtype == torch.bfloat16


def test_tiny_llama_lora_on_q_k_v_and_merge():
    from prism.backbones.hf import HFBackbone

    config = dict(model_type="llama", vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)

    def llama(seed):
        torch.manual_seed(seed)
        return MDM(HFBackbone(config=config, attn_implementation="eager"), LinearHead).eval()

    model = llama(0)
    with pytest.raises(ValueError, match="'attn_qkv' matches no module.*'k_proj'.*'o_proj'.*'q_proj'.*'v_proj'") as err:
        LoRA(target_modules=QKV).apply(model)
    assert "lm_head" in str(err.value).split("output layer")[1]
    with pytest.raises(ValueError, match="would adapt the output layer"):
        LoRA(target_modules=["lm_head"]).apply(model)
    ids = torch.tensor([[39, 3, 5, 39, 7, 1]])
    before = model(ids).log_probs
    assert len(LoRA(rank=4, target_modules=["q_proj", "k_proj", "v_proj"]).apply(model)) == 6
    assert torch.equal(model(ids).log_probs, before)
    randomize_lora(model)
    after = model(ids).log_probs
    plain = llama(1)
    plain.load_state_dict(merged_state_dict(model))
    finite = torch.isfinite(after)
    torch.testing.assert_close(plain(ids).log_probs[finite], after[finite], atol=1e-5, rtol=0)


LORA_GIN = """
experiment.adapter = @adapters.lora()
adapters.lora.rank = 4
adapters.lora.alpha = 8
adapters.lora.dropout = 0.1
adapters.lora.target_modules = ['attn_qkv']
models.mdm.head = @heads.linear
"""


def test_gin_composition_builds_a_lora_experiment(tiny_gin):
    from prism import cli

    try:
        cli.parse_gin([tiny_gin], [line for line in LORA_GIN.strip().splitlines()])
        exp = build_experiment()
        assert has_adapter(exp.model)
        train = {n for n, p in exp.model.named_parameters() if p.requires_grad}
        assert train and all(".lora_" in n or n.startswith("head.") for n in train)
        assert exp.model.backbone.blocks[0].attn_qkv.r["default"] == 4
    finally:
        gin.clear_config()


def test_lora_run_checkpoints_only_lora_and_head_resumes_and_exports_merged(tiny_gin, tmp_path):
    """Train 2 steps with LoRA (and an EMA), resume to 4: the checkpoints hold only LoRA and head
    weights, the resumed losses equal an uninterrupted run's, the merged export gives the LoRA model's outputs."""
    from conftest import run_py

    from prism.export import export

    out, full = str(tmp_path / "run"), str(tmp_path / "full")
    binds = [a for line in LORA_GIN.strip().splitlines() for a in ("--bind", line)]
    binds += ["--bind", "train.save_every = 2", "--bind", "train.log_every = 1", "--bind", "train.ema_decay = 0.9"]
    run_py(["train", tiny_gin, "--output-dir", full, *binds, "--bind", "train.steps = 4"])
    proc = run_py(["train", tiny_gin, "--output-dir", out, *binds, "--bind", "train.steps = 2"])
    assert "parameters: trainable " in proc.stdout + proc.stderr
    ckpt = os.path.join(out, "checkpoints", "step_00000002")
    for name in ("weights.safetensors", "model.safetensors"):
        with safe_open(os.path.join(ckpt, name), framework="pt") as f:
            keys = list(f.keys())
        assert keys and all(".lora_" in k or k.startswith(("head.", "model.head.")) for k in keys), keys
    proc = run_py(["train", tiny_gin, "--output-dir", out, *binds, "--bind", "train.steps = 4", "--resume"])
    assert "step_00000002 at step 2" in proc.stdout + proc.stderr
    with open(os.path.join(full, "metrics.jsonl")) as f, open(os.path.join(out, "metrics.jsonl")) as g:
        a, b = ({r["step"]: r["loss"] for r in map(json.loads, h)} for h in (f, g))
    assert sorted(b) == [1, 2, 3, 4] and all(a[s] == pytest.approx(b[s], rel=1e-6, abs=1e-7) for s in (3, 4))
    merged = str(tmp_path / "merged.safetensors")
    try:
        meta = export(out, merged, merge=True)  # leaves the run's gin config parsed
        assert meta["merged"] and meta["merged_layers"] == 2 and meta["step"] == 4  # the 'test' DiT: 2 blocks
        lora = build_experiment().model.eval()
        assert load_latest(lora, out).endswith("step_00000004")
        gin.bind_parameter("experiment.adapter", None)
        plain = build_experiment().model.eval()
    finally:
        gin.clear_config()
    assert not has_adapter(plain)
    load_weights(plain, merged)  # strict: full weights with plain names
    ids = torch.randint(0, 11, (2, 89), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b = lora(ids), plain(ids)
    finite = torch.isfinite(a.log_probs)
    torch.testing.assert_close(b.log_probs[finite], a.log_probs[finite], atol=1e-5, rtol=0)
    torch.testing.assert_close(b.quality_logits, a.quality_logits, atol=1e-5, rtol=0)
