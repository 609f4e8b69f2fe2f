import os

import pytest
import torch

from conftest import SHARED_DATA
from tasks.sudoku import (
    EOL, Sudoku, augment_grids, generate_solved_grids, grids_to_tokens, is_valid_solution,
    load_sudoku_csv, sudoku_position_groups, tokens_to_grids, units_valid,
)

SOLVED = [
    [5, 3, 4, 6, 7, 8, 9, 1, 2],
    [6, 7, 2, 1, 9, 5, 3, 4, 8],
    [1, 9, 8, 3, 4, 2, 5, 6, 7],
    [8, 5, 9, 7, 6, 1, 4, 2, 3],
    [4, 2, 6, 8, 5, 3, 7, 9, 1],
    [7, 1, 3, 9, 2, 4, 8, 5, 6],
    [9, 6, 1, 5, 3, 7, 2, 8, 4],
    [2, 8, 7, 4, 1, 9, 6, 3, 5],
    [3, 4, 5, 2, 8, 6, 1, 7, 9],
]


def board(rows):
    return grids_to_tokens(torch.tensor([rows]))


def test_checker_accepts_a_hand_made_solution():
    tokens = board(SOLVED)
    assert tokens.shape == (1, 89) and tokens[0, 9] == EOL and tokens[0, 10] == 6
    assert is_valid_solution(tokens).item()
    assert units_valid(tokens).all()


def test_checker_rejects_hand_made_invalid_boards():
    swapped = [r[:] for r in SOLVED]
    swapped[0][0], swapped[0][1] = swapped[0][1], swapped[0][0]  # rows still fine, columns/boxes not
    t = board(swapped)
    assert not is_valid_solution(t).item()
    u = units_valid(t)[0]
    assert u[:9].all() and not u[9] and not u[10] and u[18]  # row 0 ok; columns 0,1 broken; box 0 still ok
    dup = [r[:] for r in SOLVED]; dup[4][4] = 1  # a duplicate 1 in row 4
    assert not is_valid_solution(board(dup)).item()
    blank = [r[:] for r in SOLVED]; blank[8][8] = 0
    assert not is_valid_solution(board(blank)).item()
    no_eol = board(SOLVED); no_eol[0, 19] = 1
    assert not is_valid_solution(no_eol).item()


def test_success_requires_unchanged_givens():
    task = Sudoku(n_train_grids=10, cache_dir=None)
    solution = board(SOLVED)
    puzzle = solution.clone(); puzzle[0, [0, 1, 2]] = 0
    batch = {"input_ids": puzzle, "fixed": puzzle != 0}
    assert task.sample_metrics(solution, batch)["success"].item() == 1.0
    other = board([r[::-1] for r in SOLVED])  # also a valid grid, but it changes the givens
    m = task.sample_metrics(other, batch)
    assert m["success"].item() == 0.0 and m["givens_kept"].item() == 0.0


def test_shared_files_parse_and_validation_grids_are_valid():
    valid = load_sudoku_csv(os.path.join(SHARED_DATA, "sudoku", "easy_sudokus_answer_valid.csv"), require_solved=True)
    assert valid.shape == (2000, 89) and is_valid_solution(valid).all()
    dev = load_sudoku_csv(os.path.join(SHARED_DATA, "sudoku", "hard_sudokus_dev.csv"))
    assert dev.shape == (1000, 89)
    assert ((tokens_to_grids(dev) != 0).sum(dim=(1, 2)) == 30).all()


@pytest.mark.parametrize("line, message", [
    ("1,2,3", "expected 89 tokens"),
    (",".join(["1"] * 89), "expected end-of-line token 10"),
    (",".join("x" * 89), "expected comma-separated integers"),
])
def test_malformed_rows_name_file_and_line(tmp_path, line, message):
    good = ",".join(str(v) for v in board(SOLVED)[0].tolist())
    path = tmp_path / "bad.csv"
    path.write_text(good + "\r\n" + line + "\r\n")
    with pytest.raises(ValueError, match=f"bad.csv:2: {message}"):
        load_sudoku_csv(str(path))


def test_generator_is_seeded_valid_and_cached(tmp_path):
    a = generate_solved_grids(50, seed=3, cache_dir=str(tmp_path))
    assert is_valid_solution(grids_to_tokens(a)).all()
    assert len({tuple(g.flatten().tolist()) for g in a}) == 50
    assert list(tmp_path.iterdir())  # cached
    assert torch.equal(a, generate_solved_grids(50, seed=3, cache_dir=None))
    assert not torch.equal(a, generate_solved_grids(50, seed=4, cache_dir=None))


def test_augmentation_preserves_validity_and_changes_grids():
    grids = generate_solved_grids(200, seed=0)
    aug = augment_grids(grids, torch.Generator().manual_seed(0))
    assert is_valid_solution(grids_to_tokens(aug)).all()
    assert (aug != grids).any(dim=(1, 2)).float().mean() > 0.99


def test_train_batches_conditional_and_deterministic():
    task = Sudoku(n_train_grids=64, cache_dir=None, clues_min=20, clues_max=30)
    b1 = task.train_batch(32, torch.Generator().manual_seed(5))
    b2 = task.train_batch(32, torch.Generator().manual_seed(5))
    assert torch.equal(b1["input_ids"], b2["input_ids"]) and torch.equal(b1["fixed"], b2["fixed"])
    clues = b1["fixed"].sum(1) - 8  # 8 EOLs are always fixed
    assert clues.min() >= 20 and clues.max() <= 30
    assert is_valid_solution(b1["input_ids"]).all()
    unc = Sudoku(n_train_grids=64, cache_dir=None, conditional=False).train_batch(4, torch.Generator())
    assert (unc["fixed"].sum(1) == 8).all()


def test_position_groups():
    g = sudoku_position_groups()
    assert g.shape == (3, 89)
    assert g[:, 0].tolist() == [0, 0, 0] and g[:, 9].tolist() == [0, 9, 9] and g[:, 88].tolist() == [8, 8, 8]
    assert g[:, 44].tolist() == [4, 4, 4]


def test_valid_batches_are_fixed_across_calls():
    task = Sudoku(n_train_grids=10, cache_dir=None)
    a = list(task.valid_batches(64, limit=128))
    b = list(task.valid_batches(64, limit=128))
    assert len(a) == 2 and all(torch.equal(x["fixed"], y["fixed"]) for x, y in zip(a, b))
    assert is_valid_solution(a[0]["input_ids"]).all()
    clues = a[0]["fixed"].sum(1) - 8
    assert clues.min() >= 17 and clues.max() <= 50
