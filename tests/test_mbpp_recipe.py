"""The MBPP composition from gin alone: gin/mbpp/tiny.gin trains the tiny LLaDA + LoRA + PRISM head on
MBPP's train split, then `run.py eval` generates for MBPP test problems with semi-AR PRISM remasking,
executes the extracted programs in the sandbox and reports pass@1 with per-problem results; without
the opt-in nothing is sampled; the headline gin/mbpp/llada_lora_prism_semiar.gin composes on the
meta device."""
import json
import os

import pytest

from conftest import SHARED_DATA, compose_on_meta, run_py

pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(SHARED_DATA, "mbpp", "mbpp.jsonl")),
                                reason="needs ../shared/data/mbpp")
ALLOW = {"PRISM_ALLOW_CODE_EXECUTION": "1"}


def test_tiny_mbpp_trains_then_eval_executes_and_scores(tmp_path):
    out = str(tmp_path / "run")
    common = ["--output-dir", out, "--bind", f"tasks.sft.cache_dir = '{tmp_path / 'cache'}'",
              "--bind", f"tasks.mbpp.cache_dir = '{tmp_path / 'cache'}'", "--bind", "evaluate.limit = 3",
              "--bind", "samplers.semi_ar.steps = 8", "--bind", "samplers.semi_ar.block_length = 32"]
    run_py(["train", "gin/mbpp/tiny.gin", "--bind", "train.steps = 2", "--bind", "run.eval_after_train = False",
            *common], env=ALLOW)
    # without the opt-in: refused before any sampling, with the way to opt in
    proc = run_py(["eval", "gin/mbpp/tiny.gin", *common], env={"PRISM_ALLOW_CODE_EXECUTION": ""}, check=False)
    assert proc.returncode != 0 and "PRISM_ALLOW_CODE_EXECUTION=1" in proc.stderr
    assert not os.path.exists(os.path.join(out, "samples.jsonl"))
    proc = run_py(["eval", "gin/mbpp/tiny.gin", *common], env=ALLOW)
    assert "pass@1" in proc.stdout
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["n_problems"] == 3 and 0.0 <= metrics["pass@1"] <= 1.0
    with open(os.path.join(out, "samples.jsonl")) as f:
        records = [json.loads(line) for line in f]
    assert [r["task_id"] for r in records] == [11, 12, 13]  # the test split, in order
    for r in records:
        assert r["status"] in ("passed", "failed", "error", "limit", "timeout") and "exec_message" in r
    assert metrics["pass@1"] == sum(r["passed"] for r in records) / 3
    assert {"empty_output", "hit_gen_length", "exec_harness"} <= set(metrics)
    # the fast sampler (dual KV cache + parallel decoding, PRISM remasking kept) composes from gin alone
    fast = common + ["--bind", "samplers.semi_ar.cache = 'dual'", "--bind", "samplers.semi_ar.threshold = 0.9"]
    run_py(["eval", "gin/mbpp/tiny.gin", *fast], env=ALLOW)  # the same run's adapter checkpoint
    fast_metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert fast_metrics["n_problems"] == 3 and 0.0 <= fast_metrics["pass@1"] <= 1.0


def test_the_headline_composition_builds_on_the_meta_device():
    """LLaDA-8B + LoRA + PRISM head + semi-AR PRISM sampler (blocks of 64, 12 remasks per block by
    the head, the authors' budget) + MBPP's test split: the model on the meta device, the sampler
    and the task's options as the paper's Table 1 runs them."""
    (model, sampler), (split, task) = compose_on_meta(
        "gin/mbpp/llada_lora_prism_semiar.gin", "models.mdm", "samplers.semi_ar",
        queries=["tasks.mbpp.split", "experiment.eval_task"])
    assert split == "test" and task.selector == "tasks.mbpp"
    assert round(sum(p.numel() for p in model.backbone.parameters()) / 1e9, 2) == 8.02
    assert type(model.head).__name__ == "MLPHead"
    schedule = sampler.schedule
    assert (schedule.n_steps, schedule.block_length, schedule.remask_per_block) == (256, 64, 12)
    assert type(sampler.remask_rule).__name__ == "PRISMRemask"
