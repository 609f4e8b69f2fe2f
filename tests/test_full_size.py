"""benchmarks/full_size.py end to end on its small profiles (the 8B and 170M runs take hours and ~20 GB):
every phase runs in its own child, the JSON names each figure by its phase and says which are
predicted, a recorded phase is skipped on the next call, and the LLaDA targets are derived."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, SHARED_DATA

SCRIPT = os.path.join(REPO, "benchmarks", "full_size.py")
pytestmark = pytest.mark.skipif(not os.path.exists(os.path.join(SHARED_DATA, "mbpp", "mbpp.jsonl")),
                                reason="needs ../shared/data")


def run_script(*args, env=None):
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1", **(env or {})), timeout=900)


def test_llada_small_runs_every_phase_and_resumes(tmp_path):
    cache, out = str(tmp_path / "cache"), str(tmp_path / "results")
    proc = run_script("llada_small", "--cache", cache, "--out", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.load(open(os.path.join(out, "full_size_llada_small.json")))
    assert list(res["phases"]) == ["weights", "load", "train", "resume", "mdm_step", "sample", "sample_full"]
    flat = res["flat"]
    for phase in res["phases"]:
        assert flat[f"{phase}.wall_s"] > 0 and flat[f"{phase}.peak_rss_bytes"] > 0
    # the released layout on disk: config.json + shards + index, as backbones.llada reads it
    weights = os.path.join(cache, "llada_small", "weights")
    index = json.load(open(os.path.join(weights, "model.safetensors.index.json")))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 2 and all(os.path.exists(os.path.join(weights, s)) for s in shards)
    assert flat["weights.parameters"] == 6_515_776
    # predictions sit beside measurements, and are named as such
    assert flat["train.predicted_peak_bytes"] > 0 and flat["load.predicted_peak_bytes"] > 0
    # resuming from the step-1 checkpoint gives the uninterrupted run's step-2 loss
    assert res["phases"]["resume"]["loss_equal"] is True
    # every sampler variant generated and was scored by the executor
    variants = res["phases"]["sample"]["variants"]
    assert set(variants) == {"uncached_prism", "uncached_plain", "dual_threshold_prism", "dual_threshold_plain"}
    for v in variants.values():
        assert v["pass_at_1"] == 0.0 and len(v["statuses"]) == 2 and v["tokens_per_s"] > 0
    assert variants["uncached_prism"]["remask_per_block"] == 12 and variants["uncached_plain"]["remask_per_block"] == 0
    assert list(res["phases"]["sample_full"]["variants"]) == ["dual_threshold_prism"]
    assert "PRISM step / MDM step (target <= 2.2)" in res["derived"]
    md = open(os.path.join(out, "full_size_llada_small.md")).read()
    assert "| train |" in md and "gpt2-chat" in md
    # a second call skips what is recorded; --redo runs a phase again
    again = run_script("llada_small", "--cache", cache, "--out", out, "--redo", "load")
    assert again.returncode == 0, again.stderr[-2000:]
    assert "train: recorded, skipped" in again.stdout and "load: running" in again.stdout


@pytest.mark.slow
def test_mdlm_small_converts_trains_and_sweeps(tmp_path):
    cache, out = str(tmp_path / "cache"), str(tmp_path / "results")
    proc = run_script("mdlm_small", "--cache", cache, "--out", out)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.load(open(os.path.join(out, "full_size_mdlm_small.json")))
    assert list(res["phases"]) == ["weights", "convert", "train", "sweep"]
    assert os.path.exists(os.path.join(cache, "mdlm_small", "weights", "config.json"))
    cells = res["phases"]["sweep"]["cells"]
    assert set(cells) == {"mdlm@4", "prism@4"}
    assert all(0 < c["metrics"]["entropy"] < 12 for c in cells.values())


def test_unknown_phase_is_refused_before_anything_runs(tmp_path):
    proc = run_script("llada_small", "--cache", str(tmp_path), "--phases", "sampel")
    assert proc.returncode != 0 and "unknown phases ['sampel']" in proc.stderr
    assert not os.path.exists(os.path.join(str(tmp_path), "llada_small", "weights"))
