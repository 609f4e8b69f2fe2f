"""``tasks.sudoku``: PRISM's Sudoku task (89 tokens: 81 cells + 8 end-of-line tokens).

Vocabulary: 0 = blank = MASK, 1-9 = digits, 10 = end of line (after each of the first 8 grid rows,
0-based positions 9, 19, ..., 79). Training grids are generated (seeded randomized backtracking,
cached) because the paper's training split is not available offline; each batch is augmented by
Sudoku's validity-preserving symmetries. Evaluation is conditional generation from puzzle files of
the same CSV format: givens and EOLs fixed, blanks generated; success = every row, column and box
holds 1-9 exactly once and the givens are unchanged.
"""
from __future__ import annotations

import os
import random
import tempfile
from typing import Dict, Iterator, List, Optional, Sequence

import gin
import numpy as np
import torch
from tqdm.auto import tqdm

from prism.metrics.corpus import BinomialInterval, CorpusMetric
from prism.paths import CACHE_ROOT, DATA_ROOT
from registry import TASKS
from tasks.base import Task

MASK, EOL, SEQ_LEN, VOCAB = 0, 10, 89, 11
EOL_POSITIONS = [r * 10 + 9 for r in range(8)]
CELL_POSITIONS = [r * 10 + c for r in range(9) for c in range(9)]  # row-major cell -> token index
CELL_CHARS = {MASK: ".", **{d: str(d) for d in range(1, 10)}}  # how decode writes a cell's token


# ----------------------------------------------------------------------------- layout
@gin.configurable(module="tasks")
def sudoku_position_groups() -> torch.Tensor:
    """(3, 89) row / column / 3x3-box ids per token (EOLs get id 9 for column and box), for
    ``backbones.dit.position_groups``."""
    groups = torch.full((3, SEQ_LEN), 9, dtype=torch.long)
    for p in range(SEQ_LEN):
        r, c = divmod(p, 10)
        groups[0, p] = r
        if c < 9:
            groups[1, p] = c
            groups[2, p] = (r // 3) * 3 + c // 3
    return groups


def grids_to_tokens(grids: torch.Tensor) -> torch.Tensor:
    """(B, 9, 9) digits -> (B, 89) tokens with EOLs."""
    B = grids.shape[0]
    tokens = torch.full((B, SEQ_LEN), EOL, dtype=torch.long, device=grids.device)
    tokens[:, CELL_POSITIONS] = grids.reshape(B, 81).long()
    return tokens


def tokens_to_grids(tokens: torch.Tensor) -> torch.Tensor:
    """(B, 89) tokens -> (B, 9, 9) cell values."""
    return tokens[:, CELL_POSITIONS].reshape(-1, 9, 9)


# ----------------------------------------------------------------------------- checking
def is_valid_solution(tokens: torch.Tensor) -> torch.Tensor:
    """(B, 89) -> (B,) bool: every row, column and 3x3 box holds 1-9 exactly once, and the EOLs are
    in place."""
    return units_valid(tokens).all(dim=1) & (tokens[:, EOL_POSITIONS] == EOL).all(dim=1)


def units_valid(tokens: torch.Tensor) -> torch.Tensor:
    """(B, 89) -> (B, 27) bool, one per row, column and box: does the unit hold 1-9 exactly once."""
    g = tokens_to_grids(tokens)
    boxes = g.reshape(-1, 3, 3, 3, 3).permute(0, 1, 3, 2, 4).reshape(-1, 9, 9)
    units = torch.cat([g, g.transpose(1, 2), boxes], dim=1)  # (B, 27, 9)
    digits = torch.arange(1, 10, device=tokens.device)
    present = (units[..., None] == digits).any(dim=2)  # (B, 27, 9)
    return present.all(dim=2)


# ----------------------------------------------------------------------------- files
def load_sudoku_csv(path: str, require_solved: bool = False) -> torch.Tensor:
    """Read a PRISM Sudoku CSV into a (N, 89) long tensor; a malformed row raises an error naming the
    file and line."""
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"Sudoku file {path} not found (set tasks.sudoku.data_dir or the PRISM_DATA variable)"
        )
    rows: List[List[int]] = []
    with open(path, newline="") as f:
        for lineno, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            where = f"{path}:{lineno}"
            try:
                row = [int(v) for v in line.split(",")]
            except ValueError:
                raise ValueError(f"{where}: expected comma-separated integers, got {line[:60]!r}") from None
            if len(row) != SEQ_LEN:
                raise ValueError(f"{where}: expected {SEQ_LEN} tokens (81 cells + 8 EOLs), got {len(row)}")
            bad_eol = [p for p in EOL_POSITIONS if row[p] != EOL]
            if bad_eol:
                raise ValueError(f"{where}: expected end-of-line token {EOL} at positions {bad_eol}")
            cells = [row[p] for p in CELL_POSITIONS]
            bad = [v for v in cells if not 0 <= v <= 9]
            if bad:
                raise ValueError(f"{where}: cell values must be 0 (blank) or 1-9, got {bad[:5]}")
            if require_solved and 0 in cells:
                raise ValueError(f"{where}: a solved grid may not contain blanks (0)")
            rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return torch.tensor(rows, dtype=torch.long)


# ----------------------------------------------------------------------------- generation
def random_solved_grid(rng: random.Random) -> List[int]:
    """One uniformly-shuffled solved grid by randomized backtracking (81 values, row-major)."""
    grid = [0] * 81
    rows, cols, boxes = [0] * 9, [0] * 9, [0] * 9
    digits = list(range(1, 10))

    def fill(i: int) -> bool:
        if i == 81:
            return True
        r, c = divmod(i, 9)
        b = (r // 3) * 3 + c // 3
        used = rows[r] | cols[c] | boxes[b]
        order = digits[:]
        rng.shuffle(order)
        for d in order:
            bit = 1 << d
            if not used & bit:
                grid[i] = d
                rows[r] |= bit
                cols[c] |= bit
                boxes[b] |= bit
                if fill(i + 1):
                    return True
                rows[r] ^= bit
                cols[c] ^= bit
                boxes[b] ^= bit
        grid[i] = 0
        return False

    fill(0)
    return grid


def generate_solved_grids(n: int, seed: int, cache_dir: Optional[str] = None) -> torch.Tensor:
    """``n`` solved grids (n, 9, 9) from ``seed``; cached as .npy under ``cache_dir`` (written
    atomically), so the same (n, seed) is generated once per machine."""
    path = None
    if cache_dir:
        path = os.path.join(os.path.expanduser(cache_dir), f"solved_grids_n{n}_seed{seed}.npy")
        if os.path.exists(path):
            return torch.from_numpy(np.load(path)).long()
    rng = random.Random(seed)
    # tens of seconds for the training sets: a progress bar, on the first process of each machine only
    # (the others wait for the cache; without a cache each process generates its own silently)
    bar = tqdm(range(n), desc=f"generating {n} Sudoku grids (seed {seed})", unit="grid", dynamic_ncols=True,
               mininterval=1.0, disable=n < 1000 or int(os.environ.get("LOCAL_RANK", "0")) != 0)
    grids = np.array([random_solved_grid(rng) for _ in bar], dtype=np.int8).reshape(n, 9, 9)
    if path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".npy.tmp")
        with os.fdopen(fd, "wb") as f:
            np.save(f, grids)
        os.replace(tmp, path)
    return torch.from_numpy(grids).long()


def _band_permutation(B: int, g: torch.Generator) -> torch.Tensor:
    """(B, 9) permutations of 0..8 that shuffle the three bands and the three lines inside each."""
    bands = torch.argsort(torch.rand(B, 3, generator=g), dim=1)
    within = torch.argsort(torch.rand(B, 3, 3, generator=g), dim=2)
    return (bands[:, :, None] * 3 + within.gather(1, bands[:, :, None].expand(B, 3, 3))).reshape(B, 9)


def augment_grids(grids: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Apply random Sudoku symmetries per grid: relabel digits, permute rows within bands and the
    bands, columns within stacks and the stacks, and transpose with probability 1/2. Every one
    maps a valid solution to a valid solution."""
    B = grids.shape[0]
    relabel = torch.cat([torch.zeros(B, 1, dtype=torch.long), 1 + torch.argsort(torch.rand(B, 9, generator=g), 1)], 1)
    grids = relabel.gather(1, grids.reshape(B, 81)).reshape(B, 9, 9)
    rows = _band_permutation(B, g)
    grids = grids.gather(1, rows[:, :, None].expand(B, 9, 9))
    cols = _band_permutation(B, g)
    grids = grids.gather(2, cols[:, None, :].expand(B, 9, 9))
    flip = torch.rand(B, generator=g) < 0.5
    return torch.where(flip[:, None, None], grids.transpose(1, 2), grids)


# ----------------------------------------------------------------------------- the task
@TASKS.register("sudoku")
class Sudoku(Task):
    """Sudoku as in PRISM §5.1.

    Training (``conditional=True``, the default): each generated grid gets a random clue set of
    ``clues_min``-``clues_max`` cells kept fixed (never masked), as at test time; with
    ``conditional=False`` only the EOLs are fixed (the paper's unconditional training).
    Evaluation: ``eval_file`` under ``data_dir`` (default ``hard_sudokus_dev.csv``), the first
    ``eval_limit`` rows; held-out solved grids for losses: ``valid_file``.

    No tokenizer (``decode`` draws the board); ``seq_len`` is 89 and may only be set to 89 (gin:
    ``tasks.sudoku.seq_len = %SEQ_LEN``); no padding. Per-sample metrics: ``success``,
    ``units_valid``, ``givens_kept``; corpus metrics: ``corpus_scorers`` (default: the 95% Wilson
    interval of the success rate, ``success_ci_low`` / ``success_ci_high``).
    """

    vocab_size, mask_id = VOCAB, MASK
    tokenizer = None

    def __init__(
        self,
        data_dir: Optional[str] = None,
        eval_file: str = "hard_sudokus_dev.csv",
        valid_file: str = "easy_sudokus_answer_valid.csv",
        eval_limit: Optional[int] = None,
        n_train_grids: int = 50_000,
        grid_seed: int = 0,
        cache_dir: Optional[str] = os.path.join(CACHE_ROOT, "sudoku"),
        augment: bool = True,
        conditional: bool = True,
        clues_min: int = 17,
        clues_max: int = 50,
        seq_len: int = SEQ_LEN,
        corpus_scorers: Optional[Sequence[CorpusMetric]] = None,
    ):
        if seq_len != SEQ_LEN:
            raise ValueError(f"tasks.sudoku.seq_len = {seq_len}: a Sudoku sequence is {SEQ_LEN} tokens "
                             "(81 cells + 8 end-of-line tokens)")
        self.seq_len = seq_len
        self.corpus_scorers = list(corpus_scorers) if corpus_scorers is not None else [BinomialInterval("success")]
        self.data_dir = data_dir or os.path.join(DATA_ROOT, "sudoku")
        self.eval_file, self.eval_limit, self.valid_file = eval_file, eval_limit, valid_file
        self.n_train_grids, self.grid_seed, self.cache_dir = n_train_grids, grid_seed, cache_dir
        self.augment, self.conditional = augment, conditional
        if not 0 <= clues_min <= clues_max <= 81:
            raise ValueError(f"need 0 <= clues_min <= clues_max <= 81, got {clues_min}, {clues_max}")
        self.clues_min, self.clues_max = clues_min, clues_max
        self._grids: Optional[torch.Tensor] = None

    @property
    def train_grids(self) -> torch.Tensor:
        if self._grids is None:
            self._grids = generate_solved_grids(self.n_train_grids, self.grid_seed, self.cache_dir)
        return self._grids

    def prepare(self) -> None:
        self.train_grids  # noqa: B018 - generate or load the cached grids

    def data_files(self) -> List[str]:
        return [os.path.join(self.data_dir, self.eval_file)]  # training draws generated grids

    def train_batch(self, batch_size: int, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        grids = self.train_grids
        idx = torch.randint(len(grids), (batch_size,), generator=generator)
        batch_grids = grids[idx]
        if self.augment:
            batch_grids = augment_grids(batch_grids, generator)
        return self.check_batch(self.with_clues(grids_to_tokens(batch_grids), generator, self.conditional))

    def with_clues(self, tokens: torch.Tensor, generator: torch.Generator, conditional: bool = True) -> Dict[str, torch.Tensor]:
        """A batch of solved grids with EOLs fixed and, if ``conditional``, a random clue set of
        ``clues_min``-``clues_max`` cells per grid fixed too."""
        B = tokens.shape[0]
        fixed = tokens == EOL
        if conditional:
            n_clues = torch.randint(self.clues_min, self.clues_max + 1, (B, 1), generator=generator)
            rank = torch.argsort(torch.rand(B, 81, generator=generator), dim=1)
            fixed[:, CELL_POSITIONS] = rank < n_clues
        return {"input_ids": tokens, "fixed": fixed}

    def valid_batches(self, batch_size: int, limit: Optional[int] = None, seed: int = 0) -> Iterator[Dict[str, torch.Tensor]]:
        """Held-out solved grids (``valid_file``, the paper's validation split) with clue sets drawn
        from a fixed seed: the same batches for every model, for comparing losses."""
        grids = load_sudoku_csv(os.path.join(self.data_dir, self.valid_file), require_solved=True)[:limit]
        g = torch.Generator().manual_seed(seed)
        for start in range(0, len(grids), batch_size):
            yield self.with_clues(grids[start : start + batch_size], g, conditional=True)

    def eval_puzzles(self) -> torch.Tensor:
        puzzles = load_sudoku_csv(os.path.join(self.data_dir, self.eval_file))
        return puzzles[: self.eval_limit] if self.eval_limit else puzzles

    def eval_batches(self, batch_size: int) -> Iterator[Dict[str, torch.Tensor]]:
        puzzles = self.eval_puzzles()
        for start in range(0, len(puzzles), batch_size):
            ids = puzzles[start : start + batch_size]
            yield self.check_batch({"input_ids": ids, "fixed": ids != MASK})

    def sample_metrics(self, samples: torch.Tensor, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        fixed = batch["fixed"]
        kept = ((samples == batch["input_ids"]) | ~fixed).all(dim=1)
        units = units_valid(samples)
        return {
            "success": (is_valid_solution(samples) & kept).float(),
            "units_valid": units.float().mean(dim=1),
            "givens_kept": kept.float(),
        }

    def decode(self, tokens: torch.Tensor) -> str:
        """The 9×9 board as 9 lines of 9 characters: digits, '.' for a blank (mask) and '?' for any
        other token in a cell (e.g. an end-of-line token generated there)."""
        g = tokens_to_grids(tokens[None])[0]
        return "\n".join("".join(CELL_CHARS.get(int(v), "?") for v in row) for row in g)
