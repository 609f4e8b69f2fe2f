"""The LLaDA SFT recipe from gin alone: gin/sft/tiny.gin trains a tiny LLaDA with LoRA + MLP head under
the PRISM loss on MBPP's train split, checkpoints only the adapter and head, resumes exactly, and
samples with semi-AR PRISM remasking; gin/sft/llada_lora_prism.gin composes the 8B model on the
meta device."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from conftest import REPO, SHARED_DATA, run_py

pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(SHARED_DATA, "mbpp", "mbpp.jsonl")),
                                reason="needs ../shared/data/mbpp")


def rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r for r in map(json.loads, f)}


def test_tiny_sft_trains_checkpoints_the_adapter_resumes_and_samples(tmp_path):
    cache = ["--bind", f"tasks.sft.cache_dir = '{tmp_path / 'cache'}'", "--bind", "evaluate.limit = 2",
             "--bind", "samplers.semi_ar.steps = 8", "--bind", "samplers.semi_ar.block_length = 32"]
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    no_eval = ["--bind", "run.eval_after_train = False"]
    run_py(["train", "gin/sft/tiny.gin", "--output-dir", full, "--bind", "train.steps = 3", *no_eval, *cache])
    # stopped after its first step (max_minutes = 0), then resumed to the end, then sampled
    proc = run_py(["train", "gin/sft/tiny.gin", "--output-dir", part, "--bind", "train.steps = 3",
                   "--bind", "train.max_minutes = 0", *no_eval, *cache])
    assert "parameters: trainable" in proc.stdout
    proc = run_py(["train", "gin/sft/tiny.gin", "--output-dir", part, "--bind", "train.steps = 3", "--resume", *cache])
    assert "at step 1" in proc.stdout + proc.stderr
    # the adapter run's checkpoint holds the LoRA weights and the head only, not the frozen base
    weights = load_file(os.path.join(part, "checkpoints", "step_00000003", "weights.safetensors"))
    assert weights and all(".lora_" in k or k.startswith("head.") for k in weights)
    assert any(k.startswith("head.") for k in weights) and any("q_proj.lora_A" in k for k in weights)
    # resumed onto the same base: the losses are those of the uninterrupted run
    a, b = rows(full), rows(part)
    assert sorted(b) == [1, 2, 3]
    for step in (1, 2, 3):
        assert a[step]["loss"] == pytest.approx(b[step]["loss"], rel=1e-5)
    assert a[1]["bce"] == pytest.approx(0.6931, abs=1e-3)  # a fresh head says g = 0.5
    # samples: the prompt kept, the generated block free of masks, decoded to text
    with open(os.path.join(part, "samples.jsonl")) as f:
        samples = [json.loads(line) for line in f]
    assert [s["index"] for s in samples] == [0, 1]
    for s in samples:
        assert 50257 not in s["tokens"]  # no mask token left
        assert isinstance(s["text"], str)
    result = json.load(open(os.path.join(part, "train_result.json")))
    assert result["table"][0]["n"] == 2 and result["table"][0]["nfe"] > 0


def test_the_8b_recipe_composes_on_the_meta_device():
    """gin/sft/llada_lora_prism.gin builds LLaDA-8B + MLP head + LoRA r = 256 on q, k, v (the weights
    on the meta device: nothing is read or allocated). LLaDA-8B: 2·126464·4096 (embedding, output) +
    32·(4·4096² + 3·4096·12288 + 2·4096) + 4096 = 8,015,581,184; LoRA: 32 blocks × 3 × 256·(4096 + 4096)
    = 201,326,592; the head: 2·4096 (LayerNorm) + 4096² + 4096 + 4096 + 1 = 16,793,601."""
    import gin

    from prism import cli
    from prism.adapters import parameter_counts

    gin.clear_config()
    try:
        cli.parse_gin(["gin/sft/llada_lora_prism.gin"], [
            "backbones.llada.model_name_or_path = None", "backbones.llada.preset = '8b'",
            "backbones.llada.device = 'meta'"])
        model = gin.get_configurable("models.mdm")()
        backbone = sum(p.numel() for p in model.backbone.parameters())
        head = sum(p.numel() for p in model.head.parameters())
        gin.get_configurable("adapters.lora")().apply(model)
        trainable, total = parameter_counts(model)
    finally:
        gin.clear_config()
    print(f"LLaDA-8B backbone {backbone / 1e9:.2f}B, head {head:,}, trainable {trainable:,} of {total:,}")
    assert backbone == 8_015_581_184 and round(backbone / 1e9, 2) == 8.02
    assert head == 16_793_601
    assert trainable == 201_326_592 + head and total == backbone + head + 201_326_592
    assert all(p.is_meta for n, p in model.backbone.named_parameters() if ".lora_" not in n)
