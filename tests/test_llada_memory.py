"""benchmarks/llada_memory.py: the memory formula's parts on small cases, and its CPU check on the tiny config."""
import importlib.util
import os

import pytest
import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
spec = importlib.util.spec_from_file_location("llada_memory", os.path.join(REPO, "benchmarks", "llada_memory.py"))
mem = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mem)

from prism.backbones.llada import LLaDABackbone, parameter_count  # noqa: E402
from prism.heads.quality import MLPHead  # noqa: E402

GQA = dict(d_model=48, n_layers=3, n_heads=6, n_kv_heads=2, mlp_hidden_size=80, vocab_size=50)


@pytest.mark.parametrize("preset,config", [("tiny", None), ("8b", None), (None, GQA)])
def test_base_count_is_parameter_count(preset, config):
    cfg = mem.resolve(preset or config)
    assert mem.base_parameter_count(cfg) == parameter_count(preset, config)


def _peft_model(config, rank, targets, dropout=0.0):
    peft = pytest.importorskip("peft")
    bb = LLaDABackbone(config=config)
    peft.inject_adapter_in_model(peft.LoraConfig(r=rank, lora_alpha=rank, lora_dropout=dropout,
                                                 target_modules=list(targets)), bb)
    for n, p in bb.named_parameters():
        p.requires_grad_("lora_" in n)
    return bb


@pytest.mark.parametrize("targets", [("q_proj", "k_proj", "v_proj"), ("q_proj", "attn_out", "ff_proj", "ff_out")])
def test_lora_count_is_peft_trainable_count(targets):
    bb = _peft_model(GQA, 4, targets)
    trainable = sum(p.numel() for p in bb.parameters() if p.requires_grad)
    assert mem.lora_parameter_count(mem.resolve(GQA), 4, targets) == trainable
    # r·(d_in + d_out) by hand for q/k/v: 3 layers × 4 × ((48+48) + 2·(48+16))
    if targets == ("q_proj", "k_proj", "v_proj"):
        assert trainable == 3 * 4 * (96 + 2 * 64)


def test_head_count():
    assert mem.head_parameter_count(48, 48) == sum(p.numel() for p in MLPHead(48).parameters())


def test_sharding_divides_states_not_activations():
    kw = dict(batch=2, seq_len=64, lora_rank=8, n_y=1)
    none = mem.estimate("tiny", gpus=1, sharding="none", **kw)
    for sharding in ("fsdp", "zero3"):
        sh = mem.estimate("tiny", gpus=8, sharding=sharding, **kw)
        for part in ("base_weights", "trainable_params", "optimizer_state", "gradients"):
            assert sh[part] == pytest.approx(none[part] / 8)
        assert sh["activations"] == none["activations"]
        assert sh["gathered_weights"] > 0 and none["gathered_weights"] == 0
    cfg = mem.resolve("tiny")
    n_train = mem.lora_parameter_count(cfg, 8, ("q_proj", "k_proj", "v_proj")) + mem.head_parameter_count(64, 64)
    assert none["optimizer_state"] == n_train * 2 * 4  # AdamW: two float32 moments
    assert none["trainable_params"] == n_train * (4 + 2)  # fp32 master + bf16 compute copy
    assert none["base_weights"] == parameter_count("tiny") * 2
    # a larger batch grows only the activations, linearly in the per-token terms
    big = mem.estimate("tiny", gpus=1, sharding="none", **dict(kw, batch=4))
    assert big["activations"] > none["activations"] and big["static"] == none["static"]


def test_one_block_is_what_autograd_saves():
    """The per-token 'one block' term equals the bytes autograd saves in one LoRA block (float32 CPU,
    dropout noise 4 bytes), parameters and rotary tables excluded."""
    torch.manual_seed(0)
    cfg = dict(GQA, n_layers=1)
    bb = _peft_model(cfg, 4, ("q_proj", "k_proj", "v_proj"), dropout=0.1)
    bb.train()
    B, L = 2, 32
    x = torch.randn(B, L, 48, requires_grad=True)
    cos, sin = bb.rotary(torch.arange(L))
    skip = {t.untyped_storage().data_ptr() for t in [x, cos, sin, *bb.parameters()]}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        bb.model.transformer.blocks[0](x, cos, sin)
    est = mem.estimate(cfg, batch=B, seq_len=L, lora_rank=4, weight_bytes=4, act_bytes=4, dropout_mask_bytes=4,
                       sharding="none")
    assert sum(seen.values()) == est["per_token"]["one_block"] * B * L


def test_check_tiny_within_20_percent():
    """The CPU check of the module (child process, VmHWM): total and peak of the tiny config within 20%."""
    m = mem.run_child("tiny", threads=2, n_y=1)
    e = mem.estimate_measured("tiny")
    assert 0.8 <= e["dynamic"] / m["peak"] <= 1.2
    assert 0.8 <= e["total"] / (m["static"] + m["peak"]) <= 1.2
