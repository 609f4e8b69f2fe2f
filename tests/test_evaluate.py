"""The task contract (tasks/base.py) and evaluate's two levels of metrics, in process; generation
sharded over 2 CPU processes against 1 process, through run.py."""
import json
import math
import os
from types import SimpleNamespace

import gin
import pytest
import torch
from torch import nn

from prism import cli
from conftest import CPU_PROCESSES_ENV, TORCHRUN, run_py
from prism.evaluation.evaluate import generate_and_score
from prism.metrics.corpus import BinomialInterval, CorpusMetric, wilson_interval
from prism.samplers import mdlm_sampler
from registry import TASKS
from tasks.base import Task
from tasks.sudoku import Sudoku, generate_solved_grids, grids_to_tokens

MASK, PAD, V = 0, 5, 6  # the toy text task: tokens 1-4, padding 5


class Counting(CorpusMetric):
    """Stands for a metric with an evaluator model: counts its loads and its calls."""

    def __init__(self):
        self.loads, self.seen = 0, []

    def load(self):
        self.loads += 1
        return {"scale": 10.0}

    def __call__(self, records):
        self.seen.append([r["index"] for r in records])
        r = records[0]
        r["annotated"] = "yes"  # a corpus metric may annotate records: they are written after it
        return {"total_length": self.model["scale"] * sum(len(r["tokens"]) for r in records)}


class ToyText(Task):
    """Prompts of 1-3 fixed tokens, 3 generated positions, then padding (fixed, attention False), in
    sequences of 6 tokens; batches of varying length (the longest prompt decides), seq_len 6."""

    vocab_size, mask_id, seq_len = V, MASK, 6

    def __init__(self, n=7, seq_len=6):
        self.n, self.seq_len = n, seq_len
        self.corpus_scorers = [Counting()]

    def eval_batches(self, batch_size):
        for start in range(0, self.n, batch_size):
            rows = []
            for k in range(start, min(start + batch_size, self.n)):
                prompt = [1 + (k + j) % 4 for j in range(1 + k % 3)]
                rows.append(prompt + [MASK] * 3)
            L = max(len(r) for r in rows)
            ids = torch.tensor([r + [PAD] * (L - len(r)) for r in rows])
            keep = ids != PAD
            yield {"input_ids": ids, "fixed": ids != MASK, "attention_mask": keep}

    def sample_metrics(self, samples, batch):
        generated = ~batch["fixed"]
        return {"ones": ((samples == 1) & generated).sum(1).float() / generated.sum(1)}

    def decode(self, tokens):
        return " ".join(str(int(t)) for t in tokens if t != PAD)


class RecordingModel(nn.Module):
    """Uniform over tokens 1-4; records the attention mask of every pass."""

    mask_id = MASK

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))
        self.masks = []

    def forward(self, z, attention_mask=None, t=None):
        self.masks.append(attention_mask)
        lp = torch.full((*z.shape, V), float("-inf"))
        lp[..., 1:5] = -math.log(4)
        return SimpleNamespace(log_probs=lp)


class OneProcess:
    device = torch.device("cpu")
    process_index, num_processes = 0, 1
    is_main_process, is_local_main_process = True, False


def toy_experiment(task):
    return SimpleNamespace(task=task, model=RecordingModel(), sampler=mdlm_sampler(steps=4), seed=0)


# ----------------------------------------------------------------------------- the contract
def test_check_batch_refuses_what_breaks_the_contract():
    task = ToyText()
    good = next(task.eval_batches(2))  # prompts of 1 and 2 tokens + 3 generated: length 5
    assert good["input_ids"].shape == (2, 5) and not good["attention_mask"].all()
    assert task.check_batch(good) is good
    too_long = ToyText(seq_len=4)
    with pytest.raises(ValueError, match="length 5 is longer than the task's seq_len = 4"):
        too_long.check_batch(good)
    unfixed_pad = dict(good, fixed=good["input_ids"] == 1)
    with pytest.raises(ValueError, match="padding .* must also be fixed"):
        task.check_batch(unfixed_pad)
    with pytest.raises(ValueError, match="fixed must be a \\(2, 5\\) bool tensor"):
        task.check_batch(dict(good, fixed=good["fixed"].long()))
    with pytest.raises(ValueError, match="'ids' has 3 entries for 2 sequences"):
        task.check_batch(dict(good, ids=[1, 2, 3]))
    with pytest.raises(ValueError, match="no 'fixed'"):
        task.check_batch({"input_ids": good["input_ids"]})


def test_sudoku_seq_len_is_gin_config_and_checked(tiny_gin):
    try:
        cli.parse_gin([tiny_gin], [])
        assert TASKS.build("sudoku").seq_len == 89
        gin.clear_config()
        cli.parse_gin([tiny_gin], ["SEQ_LEN = 90"])  # base.gin binds tasks.sudoku.seq_len = %SEQ_LEN
        with pytest.raises(ValueError, match="tasks.sudoku.seq_len = 90: a Sudoku sequence is 89 tokens"):
            TASKS.build("sudoku")
    finally:
        gin.clear_config()
    task = Sudoku(n_train_grids=16, cache_dir=None)
    assert task.tokenizer is None
    batch = task.train_batch(2, torch.Generator().manual_seed(0))
    batch["input_ids"] = torch.cat([batch["input_ids"], batch["input_ids"][:, :1]], 1)  # 90 tokens
    batch["fixed"] = torch.cat([batch["fixed"], batch["fixed"][:, :1]], 1)
    with pytest.raises(ValueError, match="length 90 is longer than the task's seq_len = 89"):
        task.check_batch(batch)


def test_sudoku_decode_draws_the_board():
    digits = generate_solved_grids(1, seed=0)[0]
    tokens = grids_to_tokens(digits[None])[0]
    tokens[0] = 0  # a blank in the first cell
    tokens[12] = 10  # an end-of-line token generated in cell (1, 2)
    lines = Sudoku(n_train_grids=1, cache_dir=None).decode(tokens).split("\n")
    assert len(lines) == 9 and all(len(line) == 9 for line in lines)
    assert lines[0] == "." + "".join(str(int(d)) for d in digits[0, 1:])
    assert lines[1][2] == "?" and lines[1][:2] == "".join(str(int(d)) for d in digits[1, :2])
    assert lines[8] == "".join(str(int(d)) for d in digits[8])


def test_base_decode_uses_the_tokenizer():
    task = ToyText()
    assert Task.decode(task, torch.tensor([3, 1, 4])) == "3 1 4"
    task.tokenizer = SimpleNamespace(decode=lambda ids: "".join("abcdef"[i] for i in ids))
    assert Task.decode(task, torch.tensor([3, 1, 4])) == "dbe"


def test_sample_metrics_must_be_defined():
    batch = next(ToyText().eval_batches(2))
    assert ToyText().sample_metrics(batch["input_ids"], batch)["ones"].shape == (2,)
    with pytest.raises(NotImplementedError):
        Task().sample_metrics(batch["input_ids"], batch)


# ----------------------------------------------------------------------------- corpus metrics
def test_wilson_interval_hand_computed():
    # 5 of 10: the textbook interval (0.2366, 0.7634); 0 of 10: (0, z²/(n + z²)) with z = 1.95996
    assert wilson_interval(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    z2 = 1.959964 ** 2
    assert wilson_interval(0, 10) == pytest.approx((0.0, z2 / (10 + z2)), abs=1e-6)
    assert wilson_interval(10, 10) == pytest.approx((1 - z2 / (10 + z2), 1.0), abs=1e-6)
    low, high = wilson_interval(50, 100, confidence=0.99)
    assert high - low > wilson_interval(50, 100)[1] - wilson_interval(50, 100)[0]  # wider at 99%
    with pytest.raises(ValueError):
        wilson_interval(11, 10)


def test_sudoku_corpus_metric_is_the_interval_of_the_success_rate():
    task = Sudoku(n_train_grids=1, cache_dir=None)
    records = [{"index": i, "success": float(i < 5)} for i in range(10)]
    assert task.corpus_metrics(records) == pytest.approx({"success_ci_low": 0.23659, "success_ci_high": 0.76341}, abs=1e-5)
    with pytest.raises(ValueError, match="must be 0 or 1"):
        BinomialInterval("units_valid")([{"units_valid": 0.5}])
    with pytest.raises(ValueError, match="1 of 2 samples have no per-sample metric 'success'"):
        task.corpus_metrics([{"success": 1.0}, {}])


def test_corpus_metric_loads_its_model_once_on_first_use():
    metric = Counting()
    assert metric.loads == 0  # not at construction
    records = [{"index": 0, "tokens": [1, 2]}, {"index": 1, "tokens": [3]}]
    assert metric(records) == {"total_length": 30.0} and metric(records) == {"total_length": 30.0}
    assert metric.loads == 1


# ----------------------------------------------------------------------------- evaluate, in process
def test_evaluate_passes_padding_through_and_scores_at_both_levels(tmp_path):
    task = ToyText(n=7)
    exp = toy_experiment(task)
    metrics = generate_and_score(exp, OneProcess(), str(tmp_path), batch_size=3, tag="_toy")
    records = [json.loads(line) for line in open(tmp_path / "samples_toy.jsonl")]
    batches = list(task.eval_batches(3))
    conditioning = [row for b in batches for row in b["input_ids"].tolist()]
    assert [r["index"] for r in records] == list(range(7))
    for r, cond in zip(records, conditioning):
        assert len(r["tokens"]) == len(cond)  # raw tokens, padding included
        for tok, c in zip(r["tokens"], cond):
            assert tok == c if c != MASK else 1 <= tok <= 4  # prompt and padding kept, masks filled
        assert r["text"] == " ".join(str(t) for t in r["tokens"] if t != PAD)
    # every forward pass saw its batch's attention mask (padding False)
    want = {tuple(map(tuple, b["attention_mask"].tolist())) for b in batches}
    seen = {tuple(map(tuple, m.tolist())) for m in exp.model.masks}
    assert seen == want and any(not all(row) for mask in want for row in mask)
    # means of the per-sample values, the corpus metric once over all 7 records in order
    assert metrics["n"] == 7 and metrics["ones"] == pytest.approx(sum(r["ones"] for r in records) / 7)
    scorer = task.corpus_scorers[0]
    assert scorer.seen == [list(range(7))] and scorer.loads == 1
    assert metrics["total_length"] == 10.0 * sum(len(r["tokens"]) for r in records)
    assert records[0]["annotated"] == "yes" and "annotated" not in records[1]
    assert set(metrics) == {"ones", "n", "nfe", "total_length", "seconds"}


def test_evaluate_sample_only_computes_no_metrics_and_loads_nothing(tmp_path):
    task = ToyText(n=4)
    metrics = generate_and_score(toy_experiment(task), OneProcess(), str(tmp_path), batch_size=3, score=False)
    assert set(metrics) == {"n", "nfe", "seconds"} and metrics["n"] == 4
    assert task.corpus_scorers[0].loads == 0 and task.corpus_scorers[0].seen == []
    assert "ones" not in json.loads(open(tmp_path / "samples.jsonl").readline())


@pytest.mark.parametrize("bad, message", [
    ({"ones": torch.ones(2)}, r"sample_metrics\['ones'\] must be a \(3,\) tensor"),
    ({"text": torch.ones(3)}, "'text' is a field of every sample record"),
])
def test_evaluate_refuses_malformed_sample_metrics(tmp_path, bad, message):
    task = ToyText(n=3)
    task.sample_metrics = lambda samples, batch: bad
    with pytest.raises(ValueError, match=message):
        generate_and_score(toy_experiment(task), OneProcess(), str(tmp_path), batch_size=3)


def test_evaluate_refuses_a_corpus_metric_named_like_a_mean(tmp_path):
    task = ToyText(n=3)
    task.corpus_scorers = [lambda records: {"ones": 1.0}]
    with pytest.raises(ValueError, match=r"corpus_metrics returns \['ones'\]"):
        generate_and_score(toy_experiment(task), OneProcess(), str(tmp_path), batch_size=3)


# ----------------------------------------------------------------------------- 2 processes
# A plugin that shows where the work ran: a sampler that logs, per process, the size of each batch
# it samples (then samples as samplers.mdlm), and a corpus metric that logs where its model loads.
PROBE = '''
import json, os
import gin
from prism.metrics.corpus import CorpusMetric
from prism.samplers import mdlm_sampler
from registry import SAMPLERS


def _log(name, value):
    with open(os.path.join(os.environ["PROBE_DIR"], name + "_rank" + os.environ.get("RANK", "0")), "a") as f:
        f.write(json.dumps(value) + "\\n")


@SAMPLERS.register("logged_mdlm")
def logged_mdlm(steps=6):
    inner = mdlm_sampler(steps=steps)

    def sample(model, batch, generator=None, trace=False):
        _log("sampled", len(batch["input_ids"]))
        return inner(model, batch, generator)
    return sample


@gin.configurable("load_probe", module="probe")
class LoadProbe(CorpusMetric):
    def load(self):
        _log("loaded", 1)
        return 1.0

    def __call__(self, records):
        in_order = [r["index"] for r in records] == list(range(len(records)))
        return {"probe_in_order": self.model * float(in_order)}
'''
PROBE_BINDS = ["--bind", "experiment.sampler = @samplers.logged_mdlm()", "--bind", "samplers.logged_mdlm.steps = %STEPS",
               "--bind", "tasks.sudoku.corpus_scorers = [@metrics.binomial_interval(), @probe.load_probe()]"]


def read_logs(probe_dir):
    return {name: [json.loads(line) for line in open(os.path.join(probe_dir, name))] for name in sorted(os.listdir(probe_dir))}


def test_eval_on_two_processes_equals_one_process(tiny_gin, tmp_path):
    """evaluate.limit = 12, batch_size = 5: batches of 5, 5 and 2, so process 0 samples batches 0 and 2
    and process 1 batch 1. Samples (order, tokens, text, per-sample metrics) and metrics.json equal
    one process's, except the wall-clock; the corpus metric's model loads once, on the main process."""
    plugin = tmp_path / "plugin"
    plugin.mkdir()
    (plugin / "probe.py").write_text(PROBE)
    outs, logs = {}, {}
    for procs in (1, 2):
        out, probe_dir = tmp_path / f"out{procs}", tmp_path / f"probe{procs}"
        probe_dir.mkdir()
        env = dict(CPU_PROCESSES_ENV if procs == 2 else {}, PROBE_DIR=str(probe_dir), OMP_NUM_THREADS="1")
        run_py(["eval", tiny_gin, "--output-dir", str(out), "--user-dir", str(plugin), *PROBE_BINDS],
               env=env, launcher=TORCHRUN if procs == 2 else None)
        outs[procs], logs[procs] = out, read_logs(probe_dir)
    assert logs[1] == {"loaded_rank0": [1], "sampled_rank0": [5, 5, 2]}
    assert logs[2] == {"loaded_rank0": [1], "sampled_rank0": [5, 2], "sampled_rank1": [5]}
    samples = {p: [json.loads(line) for line in open(outs[p] / "samples.jsonl")] for p in (1, 2)}
    assert [r["index"] for r in samples[2]] == list(range(12))
    assert samples[2] == samples[1]
    assert len({tuple(r["tokens"]) for r in samples[1]}) == 12  # twelve different samples, not one repeated
    metrics = {p: json.load(open(outs[p] / "metrics.json")) for p in (1, 2)}
    for m in metrics.values():
        m.pop("seconds")
    assert metrics[2] == metrics[1]
    assert set(metrics[1]) == {"givens_kept", "success", "units_valid", "n", "nfe", "success_ci_low",
                               "success_ci_high", "probe_in_order"}
    assert metrics[1]["n"] == 12 and metrics[1]["probe_in_order"] == 1.0
    assert metrics[1]["units_valid"] == pytest.approx(sum(r["units_valid"] for r in samples[1]) / 12, abs=1e-12)
    k = int(sum(r["success"] for r in samples[1]))
    assert (metrics[1]["success_ci_low"], metrics[1]["success_ci_high"]) == pytest.approx(wilson_interval(k, 12))
