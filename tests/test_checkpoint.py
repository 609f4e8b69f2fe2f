"""prism/checkpoint.py: key maps, dtype, strictness, sharded safetensors, adapter-only files, the one
matching rule of experiment.init_new / experiment.trainable, atomic writes."""
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from prism import checkpoint
from prism.backbones.dit import DiT
from prism.training.checkpoints import list_checkpoints, load_latest
from prism.checkpoint import (copy_weights, load_adapter, load_weights, matches,
                              save_adapter, save_weights, select)
from prism.experiment import set_trainable
from prism.heads.quality import LinearHead
from prism.model import MDM

MDLM_KEY_MAP = [(r"^backbone\.vocab_embed\.embedding$", "backbone.vocab_embed")]


def tiny(seed: int, head: bool = False) -> MDM:
    """A test-sized DiT MDM whose every weight is drawn from ``seed`` (adaLN-zero and a fresh head
    start at zero, which would make every model's output alike)."""
    torch.manual_seed(seed)
    model = MDM(DiT(vocab_size=11, mask_id=0, preset="test"), LinearHead if head else None)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


def logits(model: MDM) -> torch.Tensor:
    ids = torch.tensor([[0, 3, 5, 0, 7, 1, 0, 2, 9, 4]])
    with torch.no_grad():
        return model(ids).log_probs


def test_mdlm_layout_loads_through_a_key_map_and_gives_the_same_logits(tmp_path):
    source = tiny(0)
    path = str(tmp_path / "mdlm.safetensors")
    save_file({("backbone.vocab_embed.embedding" if k == "backbone.vocab_embed" else k): v.contiguous()
               for k, v in source.state_dict().items()}, path)
    target = tiny(1)
    assert not torch.equal(logits(target), logits(source))
    # without the key map: the misnamed key is reported by name, both ways, with the hint
    with pytest.raises(ValueError, match=r"missing: \['backbone.vocab_embed'\]; unexpected: \['backbone.vocab_embed.embedding'\].*experiment.key_map"):
        load_weights(target, path)
    load_weights(target, path, key_map=MDLM_KEY_MAP)
    assert torch.equal(logits(target), logits(source))


def test_a_prefixed_layout_with_extra_keys_loads_through_a_key_map(tmp_path):
    """Keys under 'model.' (as a Lightning module saves them) and extra keys dropped by a None rule."""
    source = tiny(0)
    state = {"model." + k: v.contiguous() for k, v in source.state_dict().items()}
    state["noise.sigma_max"] = torch.ones(1)
    path = str(tmp_path / "prefixed.safetensors")
    save_file(state, path)
    target = tiny(1)
    with pytest.raises(ValueError, match=r"unexpected: \[.*'noise.sigma_max'"):
        load_weights(target, path, key_map=[(r"^model\.", "")])
    load_weights(target, path, key_map=[(r"^noise\.", None), (r"^model\.", "")])
    assert torch.equal(logits(target), logits(source))
    # the names shown are the mapped ones, with the key they came from
    with pytest.raises(ValueError, match=r"unexpected: \['backbone.blocks.0.qkv.weight \(key model.backbone.blocks.0.attn_qkv.weight\)'"):
        load_weights(tiny(1), path, key_map=[(r"^noise\.", None), (r"^model\.", ""), (r"attn_qkv", "qkv")])
    with pytest.raises(ValueError, match="both become"):
        load_weights(tiny(1), path, key_map=[(r"^noise\.", None), (r"^model\.", ""), (r"\.bias$", ".weight")])
    with pytest.raises(ValueError, match="not a valid regex"):
        load_weights(tiny(1), path, key_map=[("(", "")])


def test_a_missing_key_is_named_and_the_model_is_untouched(tmp_path):
    source = tiny(0)
    state = {k: v.contiguous() for k, v in source.state_dict().items() if k != "backbone.blocks.1.norm2.weight"}
    path = str(tmp_path / "partial.safetensors")
    save_file(state, path)
    target = tiny(1)
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=r"missing: \['backbone.blocks.1.norm2.weight'\]; unexpected: \[\].*experiment.init_new"):
        load_weights(target, path)
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    # non-strict: a pattern allows it, and the weight keeps its own value
    load_weights(target, path, new_modules=["backbone.blocks.1.norm2"])
    assert torch.equal(target.backbone.blocks[1].norm2.weight, before["backbone.blocks.1.norm2.weight"])
    assert torch.equal(target.backbone.vocab_embed, source.backbone.vocab_embed)


def test_dtype_casts_on_load_and_on_save(tmp_path):
    source = tiny(0)
    path = str(tmp_path / "w.safetensors")
    save_weights(source.state_dict(), source, path)
    target = tiny(1)
    load_weights(target, path, dtype="bfloat16")
    assert {p.dtype for p in target.parameters()} == {torch.bfloat16}
    assert torch.equal(target.backbone.vocab_embed, source.backbone.vocab_embed.to(torch.bfloat16))
    # default: the model's dtype stays, the checkpoint is cast into it
    half = str(tmp_path / "bf16.safetensors")
    save_weights(source.state_dict(), source, half, dtype="bf16")
    assert {v.dtype for v in load_file(half).values()} == {torch.bfloat16}
    other = tiny(2)
    load_weights(other, half)
    assert {p.dtype for p in other.parameters()} == {torch.float32}
    assert torch.equal(other.backbone.vocab_embed, source.backbone.vocab_embed.to(torch.bfloat16).float())
    with pytest.raises(ValueError, match="floating-point dtype"):
        load_weights(other, half, dtype="int8")


def test_a_sharded_directory_with_an_index_loads(tmp_path):
    source = tiny(0)
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(tmp_path / file))
    index = {"metadata": {"total_size": 0}, "weight_map": {k: f for f, keys in shards.items() for k in keys}}
    (tmp_path / checkpoint.HF_INDEX).write_text(json.dumps(index))
    target = tiny(1)
    assert load_weights(target, str(tmp_path)).endswith(checkpoint.HF_INDEX)
    assert torch.equal(logits(target), logits(source))
    # the shards as one file, only some keys
    out = str(tmp_path / "one.safetensors")
    copy_weights(str(tmp_path), out, only=["backbone.output_layer"])
    assert sorted(load_file(out)) == sorted(k for k in state if k.startswith("backbone.output_layer."))
    os.remove(tmp_path / "model-00002-of-00002.safetensors")
    with pytest.raises(FileNotFoundError, match="shards that are not there"):
        load_weights(target, str(tmp_path))


def test_adapter_only_files_save_the_matching_keys_and_load_onto_other_base_weights(tmp_path):
    tuned = tiny(0, head=True)
    path = str(tmp_path / "adapter.safetensors")
    written = save_adapter(tuned, path, ["head"])
    assert written and sorted(load_file(path)) == sorted(written) and all(k.startswith("head.") for k in written)
    with safe_open(path, framework="pt") as f:
        assert json.loads(f.metadata()[checkpoint.ADAPTER_KEY]) == ["head"]
    base = tiny(5, head=True)
    backbone_before = base.backbone.vocab_embed.clone()
    load_adapter(base, path)
    assert all(torch.equal(a, b) for a, b in zip(base.head.parameters(), tuned.head.parameters()))
    assert torch.equal(base.backbone.vocab_embed, backbone_before)  # base weights untouched
    # an adapter key that matches no parameter is an error naming it
    with pytest.raises(ValueError, match=r"keys that match no parameter: \['head\."):
        load_adapter(tiny(5), path)
    with pytest.raises(ValueError, match="adapter pattern 'lora_' matches no parameter"):
        save_adapter(tuned, path, ["lora_"])
    # used as a full checkpoint it is refused with a pointer to init_adapter
    with pytest.raises(ValueError, match="adapter-only.*experiment.init_adapter"):
        load_weights(tiny(5, head=True), path)
    # a run whose latest checkpoint is adapter-only: sample / eval load it onto the current weights
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000003"
    os.makedirs(ckpt)
    (ckpt / "trainer_state.json").write_text("{}")
    save_adapter(tuned, str(ckpt / "weights.safetensors"), ["head.*"])
    other = tiny(6, head=True)
    assert load_latest(other, str(tmp_path / "run")) == list_checkpoints(str(tmp_path / "run"))[-1]
    assert all(torch.equal(a, b) for a, b in zip(other.head.parameters(), tuned.head.parameters()))


def test_init_new_and_trainable_match_alike():
    model = tiny(0, head=True)
    params = [n for n, _ in model.named_parameters()]
    state = list(model.state_dict())
    for patterns in (["head"], ["head.*"], ["backbone.blocks.0"], ["*adaLN*"], ["backbone.output_layer.linear.bias"]):
        chosen = select(state, patterns, "experiment.init_new")
        n = set_trainable(model, patterns)
        assert chosen and n == len(chosen)
        assert [k for k, p in model.named_parameters() if p.requires_grad] == [k for k in params if k in chosen]
    assert matches("head.norm.weight", "head") and matches("head", "head") and not matches("headx.w", "head")
    with pytest.raises(ValueError, match=r"experiment.trainable pattern 'haed' matches no parameter; top-level names: \['backbone', 'head'\]"):
        set_trainable(model, ["haed"])


def test_init_new_pattern_that_matches_nothing_is_an_error(tmp_path):
    path = str(tmp_path / "w.safetensors")
    base = tiny(0)
    save_weights(base.state_dict(), base, path)
    with pytest.raises(ValueError, match=r"experiment.init_new pattern 'haed' matches no parameter; top-level names: \['backbone', 'head'\]"):
        load_weights(tiny(1, head=True), path, new_modules=["haed"])
    load_weights(tiny(1, head=True), path, new_modules=["head"])  # a bare module name, as before


@pytest.mark.parametrize("existing", [False, True])
def test_a_failed_write_leaves_no_partial_file(tmp_path, monkeypatch, existing):
    model = tiny(0)
    path = str(tmp_path / "w.safetensors")
    if existing:
        save_weights(model.state_dict(), model, path)
    before = open(path, "rb").read() if existing else None

    def broken_save_file(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_weights(tiny(1).state_dict(), model, path)
    assert os.listdir(tmp_path) == (["w.safetensors"] if existing else [])
    if existing:
        assert open(path, "rb").read() == before


def test_gin_binds_key_map_and_dtype(tmp_path, tiny_gin):
    import gin

    from prism import cli
    from prism.experiment import build_experiment

    def build(*binds):
        try:
            cli.parse_gin([tiny_gin], ["tasks.sudoku.n_train_grids = 8", *binds])
            return build_experiment().model
        finally:
            gin.clear_config()

    source = build()
    path = str(tmp_path / "mdlm.safetensors")
    save_file({("backbone.vocab_embed.embedding" if k == "backbone.vocab_embed" else k): v.contiguous()
               for k, v in source.state_dict().items()}, path)
    model = build(f"experiment.init_checkpoint = '{path}'", "experiment.dtype = 'bfloat16'",
                  r"experiment.key_map = [(r'^backbone\.vocab_embed\.embedding$', 'backbone.vocab_embed')]")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.equal(model.backbone.vocab_embed, source.backbone.vocab_embed.to(torch.bfloat16))


def test_export_only_writes_an_adapter_file(tmp_path):
    from prism.export import main

    tuned = tiny(0, head=True)
    ckpt = tmp_path / "run" / "checkpoints" / "step_00000002"
    os.makedirs(ckpt)
    (ckpt / "trainer_state.json").write_text(json.dumps({"step": 2}))
    save_weights(tuned.state_dict(), tuned, str(ckpt / "weights.safetensors"))
    out = str(tmp_path / "head.safetensors")
    main([str(tmp_path / "run"), out, "--only", "head", "--dtype", "bfloat16"])
    state = load_file(out)
    assert sorted(state) == sorted(n for n, _ in tuned.head.named_parameters(prefix="head"))
    assert {v.dtype for v in state.values()} == {torch.bfloat16}
    assert json.load(open(tmp_path / "head.json"))["only"] == ["head"]
    base = tiny(3, head=True)
    load_adapter(base, out)
    assert all(torch.equal(a, b.to(torch.bfloat16).float()) for a, b in zip(base.head.parameters(), tuned.head.parameters()))
