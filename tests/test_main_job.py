"""The main job's parts: ``compare.rows`` (one experiment per gin scope: its own weights, head and
sampler, its own samples file, one table row each), the shipped quickstart.gin's four rows, and the
PRISM quality heat-map of a Sudoku board (``tasks.sudoku_quality_board``)."""
import json
import os

import gin
import pytest
import torch
from safetensors.torch import load_file

from prism import cli
from conftest import CPU_PROCESSES_ENV, TINY_GIN, TORCHRUN, run_py
from prism.evaluation.compare import _row_sample, compare_rows, describe_sampler
from prism.checkpoint import save_weights
from prism.experiment import build_experiment
from tasks.sudoku import CELL_POSITIONS, generate_solved_grids, grids_to_tokens
from tasks.sudoku_plots import cell_errors, save_quality_board

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# Three rows on the tiny config: the unscoped experiment (random init, no head, MDLM sampler), a
# PRISM row with its own weights, head and sampler, and a nested row that inherits the PRISM row and
# changes the unmasking rule.
ROWS = """
include 'samplers/prism.gin'
experiment.sampler = @samplers.mdlm()
NUM_REMASK = 2
compare.rows = ['plain', 'prism', 'prism/confident']
prism/experiment.init_checkpoint = '{ckpt}'
prism/models.mdm.head = @heads.linear
prism/experiment.sampler = @samplers.prism()
prism/confident/samplers.prism.unmask_rule = @unmask_rules.confidence()
compare.picture = @tasks.sudoku_quality_board
compare.picture_row = 'prism'
compare.picture_index = 1
"""


class StubAccelerator:
    is_main_process = is_local_main_process = True

    def print(self, *args, **kwargs):
        pass


def write_head_checkpoint(tmp_path, tiny_gin) -> str:
    """Weights of the tiny model with a linear head, drawn from seed 123 (not the run's seed 0) and
    with a non-zero head (a fresh head is zero-initialised), so that a row that loads them is told apart."""
    try:
        cli.parse_gin([tiny_gin], ["models.mdm.head = @heads.linear"])
        torch.manual_seed(123)
        model = build_experiment().model
    finally:
        gin.clear_config()
    with torch.no_grad():
        for p in model.head.parameters():
            p.normal_(0, 0.5, generator=torch.Generator().manual_seed(7))
    path = str(tmp_path / "head.safetensors")
    save_weights(model.state_dict(), model, path)
    return path


@pytest.fixture
def rows_gin(tmp_path, tiny_gin):
    ckpt = write_head_checkpoint(tmp_path, tiny_gin)
    path = tmp_path / "rows.gin"
    path.write_text(TINY_GIN + ROWS.format(ckpt=ckpt))
    return str(path), ckpt


def test_each_row_builds_its_own_experiment_in_its_scope(rows_gin, monkeypatch):
    """In-process, evaluation stubbed out: each scope gets its own model (weights, head) and sampler."""
    gin_path, ckpt = rows_gin
    seen = {}

    def fake_generate_and_score(exp, accelerator, output_dir, score=True, tag=""):
        seen[tag] = exp
        return {"success": 0.0}

    monkeypatch.setattr("prism.evaluation.compare.generate_and_score", fake_generate_and_score)
    try:
        cli.parse_gin([gin_path], [])
        table = compare_rows(StubAccelerator(), None, picture=None)
        operative = gin.operative_config_str()
    finally:
        gin.clear_config()
    assert [r["row"] for r in table] == ["plain", "prism", "prism/confident"]
    assert sorted(seen) == ["_plain", "_prism", "_prism_confident"]
    plain, prism, confident = seen["_plain"], seen["_prism"], seen["_prism_confident"]
    # weights and head: the plain row has none; both PRISM rows hold the checkpoint exactly
    assert plain.model.head is None and plain.init_checkpoint is None
    state = load_file(ckpt)
    for exp in (prism, confident):
        assert exp.init_checkpoint == ckpt
        own = exp.model.state_dict()
        assert all(torch.equal(own[k], v) for k, v in state.items())
    qkv = "backbone.blocks.0.attn_qkv.weight"  # the plain row keeps its own (seed 0) initialisation
    assert not torch.equal(plain.model.state_dict()[qkv], state[qkv])
    # samplers: MDLM, Algorithm 3 with random unmasking, Algorithm 3 with confidence unmasking
    assert [describe_sampler(e.sampler) for e in (plain, prism, confident)] == [
        "mdlm T=6, unmask random", "prism K=2 T=6, unmask random, remask prism",
        "prism K=2 T=6, unmask confidence, remask prism"]
    assert [r["head"] for r in table] == ["-", "linear", "linear"]
    assert "prism/confident/samplers.prism.unmask_rule = @unmask_rules.confidence()" in operative


def test_rows_from_run_py_eval_one_table_samples_and_picture(rows_gin, tmp_path):
    gin_path, ckpt = rows_gin
    out = str(tmp_path / "out")
    proc = run_py(["eval", gin_path, "--output-dir", out], env={"OMP_NUM_THREADS": "1"})  # as each torchrun process below
    result = json.load(open(os.path.join(out, "eval_result.json")))
    table = result["table"]
    assert [(r["row"], r["weights"], r["head"]) for r in table] == [
        ("plain", "random init", "-"), ("prism", ckpt, "linear"), ("prism/confident", ckpt, "linear")]
    assert all(r["n"] == 12 and 0 <= r["success"] <= 1 for r in table)
    assert set(json.load(open(os.path.join(out, "metrics.json")))) == {"plain", "prism", "prism/confident"}
    md = open(os.path.join(out, "eval_results.md")).read().splitlines()
    assert len(md) == 2 + 3 and md[2].startswith("| plain |") and md[4].startswith("| prism/confident |")
    # one samples file per row; different models and samplers give different samples
    samples = {}
    for row in ("plain", "prism", "prism_confident"):
        with open(os.path.join(out, f"samples_{row}.jsonl")) as f:
            samples[row] = [json.loads(line)["tokens"] for line in f]
        assert len(samples[row]) == 12
    assert samples["plain"] != samples["prism"] != samples["prism_confident"]
    with open(os.path.join(out, "quality_prism.png"), "rb") as f:
        png = f.read()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 1000
    # the table is printed, and every row's sampling showed a progress bar
    assert "| row | weights | head | sampler |" in proc.stdout
    assert all(f"sampling {row}" in proc.stderr for row in ("plain", "prism", "prism_confident"))

    # the same rows on 2 processes (batches 0, 2 on one, batch 1 on the other): the same samples per
    # row and the same metrics (except the wall-clock), and the picture of the same board
    out2 = str(tmp_path / "out2")
    run_py(["eval", gin_path, "--output-dir", out2], env=CPU_PROCESSES_ENV, launcher=TORCHRUN)
    for row in ("plain", "prism", "prism_confident"):
        with open(os.path.join(out2, f"samples_{row}.jsonl")) as f:
            assert [json.loads(line)["tokens"] for line in f] == samples[row], row
    metrics = [json.load(open(os.path.join(d, "metrics.json"))) for d in (out, out2)]
    for m in metrics:
        for row in m.values():
            row.pop("seconds")
    assert metrics[1] == metrics[0]
    with open(os.path.join(out2, "quality_prism.png"), "rb") as f:
        assert f.read().startswith(PNG_SIGNATURE)


def test_shipped_quickstart_rows_are_the_readme_experiments(monkeypatch):
    """gin/sudoku/quickstart.gin's four rows build the four experiments of the README's main job
    from the shipped weights (evaluation stubbed out)."""
    seen = {}

    def fake_generate_and_score(exp, accelerator, output_dir, score=True, tag=""):
        seen[tag] = exp
        return {}

    monkeypatch.setattr("prism.evaluation.compare.generate_and_score", fake_generate_and_score)
    try:
        cli.parse_gin(["sudoku/quickstart.gin"], [])
        table = compare_rows(StubAccelerator(), None, picture=None)
        limit = gin.query_parameter("evaluate.limit")
    finally:
        gin.clear_config()
    assert limit == 250
    assert [(r["row"], r["weights"], r["head"], r["sampler"]) for r in table] == [
        ("vanilla", "weights/sudoku/mdm.safetensors", "-", "mdlm T=51, unmask random"),
        ("remdm_conf", "weights/sudoku/mdm.safetensors", "-", "remdm conf T=51, unmask random"),
        ("prism", "weights/sudoku/prism_kuniform.safetensors", "linear", "prism K=4 T=51, unmask random, remask prism"),
        ("prism/confident", "weights/sudoku/prism_kuniform.safetensors", "linear",
         "prism K=4 T=51, unmask confidence, remask prism")]
    shipped = load_file(os.path.join(cli.REPO_ROOT, "weights/sudoku/prism_kuniform.safetensors"))
    head = {k: v for k, v in seen["_prism"].model.state_dict().items() if k.startswith("head.")}
    assert head and all(torch.equal(v, shipped[k]) for k, v in head.items())


def test_picture_sample_by_index_or_first_failure(tmp_path):
    with open(tmp_path / "samples_a_b.jsonl", "w") as f:
        for i, ok in enumerate([1.0, 1.0, 0.0, 0.0]):
            f.write(json.dumps({"index": i, "tokens": [i] * 3, "success": ok}) + "\n")
    assert _row_sample(str(tmp_path), "a/b", 1)[0] == 1
    index, tokens = _row_sample(str(tmp_path), "a/b", "first_failure")
    assert index == 2 and tokens.tolist() == [2, 2, 2]
    with pytest.raises(ValueError, match="no sample with that index"):
        _row_sample(str(tmp_path), "a/b", 7)


def test_cell_errors_finds_exactly_the_repeated_digits():
    digits = generate_solved_grids(1, seed=0)[0]
    assert not cell_errors(digits).any()
    wrong = digits.clone()
    wrong[0, 0] = digits[0, 1]  # now repeats in row 0 (with (0, 1)) and in its column and box
    bad = cell_errors(wrong)
    col = int((digits[:, 0] == digits[0, 1]).nonzero()[0])  # where that digit already was in column 0
    assert bad[0, 0] and bad[0, 1] and bad[col, 0] and int(bad.sum()) == 3


def test_quality_board_png(tmp_path, tiny_gin):
    try:
        cli.parse_gin([tiny_gin], ["models.mdm.head = @heads.linear"])
        model = build_experiment().model.eval()
    finally:
        gin.clear_config()
    board = grids_to_tokens(generate_solved_grids(1, seed=1))[0]
    fixed = torch.zeros(89, dtype=torch.bool)
    fixed[CELL_POSITIONS[:30]] = True
    path = str(tmp_path / "board.png")
    info = save_quality_board(model, board, {"fixed": fixed}, path, title="test")
    with open(path, "rb") as f:
        png = f.read()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 1000
    assert info["solved"] and info["conflicts"] == 0 and info["mean_quality"] == pytest.approx(0.5)  # zero-initialised head
    wrong = board.clone()
    wrong[CELL_POSITIONS[80]] = board[CELL_POSITIONS[79]]  # the last cell repeats its left neighbour
    info = save_quality_board(model, wrong, {"fixed": fixed}, str(tmp_path / "wrong.png"))
    assert not info["solved"] and info["conflicts"] >= 2
    model.head = None
    with pytest.raises(ValueError, match="quality head"):
        save_quality_board(model, board, {"fixed": fixed}, str(tmp_path / "none.png"))
