"""Faults that must not lose work, each reproduced: a loss that turns NaN, a kill before the first
checkpoint, a truncated metrics line, a resume inside a log window, bad bindings, missing data, and
more processes than GPUs."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import DEVICE_ENV, REPO, run_py


def rows(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]  # strict JSON: a bare NaN would fail here


def ckpt_names(out):
    root = os.path.join(out, "checkpoints")
    return sorted(os.listdir(root)) if os.path.isdir(root) else []


def test_a_nan_run_stops_with_a_clear_message_and_the_last_good_checkpoint_survives(tiny_gin, tmp_path):
    """lr 1e12: after one update the weights are huge but finite (saved at steps 1 and 2, keeping one),
    the loss of step 3 is inf. The run exits non-zero before that update, names the checkpoint it
    kept, writes no checkpoint from non-finite weights, and metrics.jsonl stays strict JSON."""
    from safetensors.torch import load_file

    out = str(tmp_path / "run")
    proc = run_py(["train", tiny_gin, "--output-dir", out, "--bind", "train.lr = 1e12", "--bind", "train.log_every = 1",
                   "--bind", "train.save_every = 1", "--bind", "train.keep_checkpoints = 1"], check=False)
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    kept = ckpt_names(out)
    assert len(kept) == 1 and int(kept[0][len("step_"):]) < 8
    assert f"training stopped: step {int(kept[0][5:]) + 1}: not finite" in proc.stderr and f"{kept[0]}) is intact" in proc.stderr
    weights = load_file(os.path.join(out, "checkpoints", kept[0], "weights.safetensors"))
    assert all(torch.isfinite(v).all() for v in weights.values())
    logged = rows(out)
    assert [r["step"] for r in logged] == list(range(1, int(kept[0][5:]) + 1))
    assert all(r["loss"] is not None and abs(r["loss"]) < float("inf") for r in logged)


PLUGIN = '''
import torch
from prism.losses.mdm import MDLMLoss
from registry import LOSSES


@LOSSES.register("nan_at")
class NaNAt(MDLMLoss):
    """The MDLM loss, NaN at the listed training calls (1-based)."""

    def __init__(self, calls=(), **kwargs):
        super().__init__(**kwargs)
        self.calls, self.n = set(calls), 0

    def forward(self, model, batch, generator):
        out = super().forward(model, batch, generator)
        self.n += 1
        if self.n in self.calls:
            out.loss = out.loss * float("nan")
        return out
'''


def test_skip_mode_drops_only_the_bad_update_and_counts_it(tiny_gin, tmp_path):
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    (plugin / "__init__.py").write_text(PLUGIN)
    out, ref = str(tmp_path / "skip"), str(tmp_path / "ref")
    common = ["--bind", "train.steps = 4", "--bind", "train.log_every = 2", "--bind", "train.save_every = 1",
              "--bind", "train.keep_checkpoints = 10"]
    run_py(["train", tiny_gin, "--user-dir", str(plugin), "--output-dir", out, *common, "--bind", "experiment.loss = @losses.nan_at()",
            "--bind", "losses.nan_at.calls = [3]", "--bind", "train.on_nonfinite = 'skip'"])
    logged = {r["step"]: r for r in rows(out)}
    assert logged[4]["skipped"] == 1 and "skipped" not in logged[2]
    assert logged[4]["loss"] is not None and abs(logged[4]["loss"]) < float("inf")  # the mean of step 4 alone
    from safetensors.torch import load_file

    w = {s: load_file(os.path.join(out, "checkpoints", f"step_{s:08d}", "weights.safetensors")) for s in (2, 3, 4)}
    assert all(torch.equal(w[2][k], w[3][k]) for k in w[2])  # step 3's update was dropped
    assert any(not torch.equal(w[3][k], w[4][k]) for k in w[3])  # step 4's was not
    stopped = run_py(["train", tiny_gin, "--user-dir", str(plugin), "--output-dir", ref, *common, "--bind",
                      "experiment.loss = @losses.nan_at()", "--bind", "losses.nan_at.calls = [3]"], check=False)
    assert stopped.returncode != 0 and "step 3: not finite" in stopped.stderr
    assert ckpt_names(ref) == ["step_00000001", "step_00000002"]  # what came before the bad step, nothing after


def test_resume_after_a_kill_before_the_first_checkpoint_logs_every_step_once(tiny_gin, tmp_path):
    out, ref = str(tmp_path / "killed"), str(tmp_path / "ref")
    binds = ["--bind", "train.steps = 400", "--bind", "train.log_every = 1", "--bind", "train.save_every = 1000"]
    env = dict(os.environ, PYTHONHASHSEED="0", **DEVICE_ENV)
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "run.py"), "train", tiny_gin, "--output-dir", out, *binds],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline and not (os.path.exists(metrics) and len(open(metrics).readlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert len(open(metrics).readlines()) >= 3 and ckpt_names(out) == []
    short = ["--bind", "train.steps = 4", "--bind", "train.log_every = 1"]
    run_py(["train", tiny_gin, "--output-dir", out, *short, "--resume"])
    run_py(["train", tiny_gin, "--output-dir", ref, *short])
    assert [r["step"] for r in rows(out)] == [1, 2, 3, 4]
    assert [r["loss"] for r in rows(out)] == pytest.approx([r["loss"] for r in rows(ref)], rel=1e-6)


def test_a_truncated_last_metrics_line_is_dropped_on_resume(tiny_gin, tmp_path):
    out = str(tmp_path / "run")
    run_py(["train", tiny_gin, "--output-dir", out, "--bind", "train.steps = 4"])
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"step": 6, "loss": 2.3')  # what a kill in the middle of a write leaves
    proc = run_py(["train", tiny_gin, "--output-dir", out, "--resume"])
    assert "truncated last line" in proc.stderr
    assert [r["step"] for r in rows(out)] == [2, 4, 6, 8]


def test_resuming_inside_a_log_window_logs_what_the_uninterrupted_run_logs(tiny_gin, tmp_path):
    """save_every = 2, log_every = 4: the checkpoint at step 2 is in the middle of a window. The
    resumed run's rows equal the uninterrupted run's (the window's sums travel in the checkpoint)."""
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    binds = ["--bind", "train.log_every = 4", "--bind", "train.save_every = 2", "--bind", "train.keep_checkpoints = 10"]
    run_py(["train", tiny_gin, "--output-dir", full, *binds])
    shutil.copytree(full, part)
    for name in ("step_00000004", "step_00000006", "step_00000008"):  # as if killed right after step 2's checkpoint
        shutil.rmtree(os.path.join(part, "checkpoints", name))
    run_py(["train", tiny_gin, "--output-dir", part, *binds, "--resume"])
    a, b = rows(full), rows(part)
    assert [r["step"] for r in b] == [4, 8]
    for ra, rb in zip(a, b):
        for k in ("loss", "masked_ce", "grad_norm"):
            assert rb[k] == pytest.approx(ra[k], rel=1e-6), (ra["step"], k)


@pytest.mark.parametrize("binding", ["train.steps = = 3", "train.steps = (3", "train.steps 3"])
def test_a_binding_with_a_syntax_error_is_named(tiny_gin, tmp_path, binding):
    proc = run_py(["train", tiny_gin, "--output-dir", str(tmp_path / "x"), "--bind", binding], check=False)
    assert proc.returncode != 0 and f"--bind {binding!r} is not a valid gin binding" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_missing_evaluation_data_is_found_before_training(tiny_gin, tmp_path):
    out = str(tmp_path / "run")
    proc = run_py(["train", tiny_gin, "--output-dir", out, "--bind", "run.eval_after_train = True",
                   "--bind", f"tasks.sudoku.data_dir = '{tmp_path / 'nowhere'}'"], check=False)
    assert proc.returncode != 0 and "nowhere" in proc.stderr
    assert not os.path.exists(os.path.join(out, "metrics.jsonl")) and ckpt_names(out) == []


def test_more_processes_than_gpus_is_refused(monkeypatch, tmp_path):
    from prism import cli

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    with pytest.raises(SystemExit, match=r"2 processes per machine were asked for, but this machine has 1 visible GPU"):
        cli.make_accelerator({"mixed_precision": "no", "log_with": None}, str(tmp_path))
