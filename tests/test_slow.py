"""Slower end-to-end checks (``pytest -m slow``): the recipe learns, the shipped model solves."""
import json
import os

import pytest

from conftest import REPO, run_py

SHIPPED = os.path.join(REPO, "weights", "sudoku", "mdm.safetensors")


@pytest.mark.slow
def test_sudoku_recipe_leaves_the_entropy_plateau(tmp_path):
    """150 steps of the long recipe from scratch: the masked cross-entropy starts at the uniform
    level (ln 9 = 2.197) and falls well below it (measured here: about 0.75 at step 150)."""
    out = str(tmp_path / "learn")
    run_py(["train", "gin/sudoku/mdm.gin", "--output-dir", out, "--bind", "train.steps = 150",
            "--bind", "train.log_every = 50", "--bind", "train.save_every = 150", "--bind", "train.num_threads = 2"],
           timeout=1800)  # about 3 minutes on an idle 2-core machine (100,000 grids generated first)
    rows = [json.loads(l) for l in open(os.path.join(out, "metrics.jsonl"))]
    assert rows[0]["masked_ce"] > 2.0
    assert rows[-1]["step"] == 150 and rows[-1]["masked_ce"] < 1.2


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(SHIPPED), reason="no shipped checkpoint")
def test_shipped_checkpoint_solves_dev_puzzles(tmp_path):
    out = str(tmp_path / "shipped")
    run_py(["eval", "gin/sudoku/mdm.gin", "--output-dir", out,
            "--bind", "experiment.init_checkpoint = 'weights/sudoku/mdm.safetensors'",
            "--bind", "evaluate.limit = 100", "--bind", "evaluate.batch_size = 100"])
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert m["n"] == 100 and m["givens_kept"] == 1.0
    # measured here with this seed: success 0.09, units_valid 0.728 (0.127 / 0.751 on all 1000);
    # random weights score 0 and about 0.002. The bounds leave room for other platforms' kernels.
    assert m["success"] >= 0.04 and m["units_valid"] >= 0.65, m
