"""Pictures of Sudoku boards (matplotlib, imported only when a picture is drawn).

``draw_board`` draws one board on a matplotlib axis: givens grey, generated cells coloured by a
quality in [0, 1] (red → green), optional blue / red frames for cells unmasked / remasked at a step
and dashed red frames for cells in conflict. ``sudoku_quality_board`` (gin: ``tasks.sudoku_quality_board``)
is the PRISM heat-map of a finished board: one forward pass of the model on the board, each generated
cell coloured by the quality head's g_i, written as a PNG. ``benchmarks/sudoku_pictures.py`` draws its
board and its denoising GIF with these.
"""
from __future__ import annotations

from typing import Dict, Optional

import gin
import torch

from tasks.sudoku import CELL_POSITIONS


def cell_errors(digits: torch.Tensor) -> torch.Tensor:
    """(9, 9) digits (0 = blank) -> (9, 9) bool: cells whose digit repeats in their row, column or box."""
    bad = torch.zeros(9, 9, dtype=torch.bool)
    for r in range(9):
        for c in range(9):
            d = digits[r, c]
            if d == 0:
                continue
            br, bc = 3 * (r // 3), 3 * (c // 3)
            box = digits[br:br + 3, bc:bc + 3]
            bad[r, c] = (digits[r] == d).sum() > 1 or (digits[:, c] == d).sum() > 1 or (box == d).sum() > 1
    return bad


def grid(v: torch.Tensor) -> torch.Tensor:
    """(89,) or (1, 89) per-token values -> (9, 9) per-cell values."""
    return v[0, CELL_POSITIONS].reshape(9, 9) if v.dim() == 2 else v[CELL_POSITIONS].reshape(9, 9)


def draw_board(ax, digits, given, quality=None, unmasked=None, remasked=None, errors=None, title=""):
    """Draw a (9, 9) board on ``ax``. ``quality``: (9, 9) in [0, 1] (NaN: no colour)."""
    import matplotlib.pyplot as plt

    cmap = plt.get_cmap("RdYlGn")
    ax.set_xlim(0, 9)
    ax.set_ylim(9, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    for r in range(9):
        for c in range(9):
            if given[r, c]:
                face = "#d9d9d9"
            elif quality is not None and digits[r, c] != 0 and not torch.isnan(quality[r, c]):
                face = cmap(float(quality[r, c]))
            else:
                face = "white"
            ax.add_patch(plt.Rectangle((c, r), 1, 1, facecolor=face, edgecolor="#999999", lw=0.5))
            if remasked is not None and remasked[r, c]:
                ax.add_patch(plt.Rectangle((c + 0.05, r + 0.05), 0.9, 0.9, fill=False, edgecolor="red", lw=2.5))
            if unmasked is not None and unmasked[r, c]:
                ax.add_patch(plt.Rectangle((c + 0.05, r + 0.05), 0.9, 0.9, fill=False, edgecolor="blue", lw=2.5))
            if errors is not None and errors[r, c]:
                ax.add_patch(plt.Rectangle((c + 0.08, r + 0.08), 0.84, 0.84, fill=False, edgecolor="red", lw=1, ls="--"))
            if digits[r, c]:
                ax.text(c + 0.5, r + 0.55, str(int(digits[r, c])), ha="center", va="center", fontsize=13,
                        fontweight="bold" if given[r, c] else "normal")
    for k in range(0, 10, 3):
        ax.axhline(k, color="black", lw=2)
        ax.axvline(k, color="black", lw=2)
    ax.set_title(title, fontsize=10)


def board_quality(model, tokens: torch.Tensor) -> torch.Tensor:
    """(89,) finished board -> (89,) the quality head's g_i from one forward pass."""
    if getattr(model, "head", None) is None:
        raise ValueError("a quality picture needs a model with a quality head (models.mdm.head)")
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(tokens[None].to(device)).quality_logits
    return torch.sigmoid(logits.float())[0].cpu()


@gin.configurable("sudoku_quality_board", module="tasks")
def save_quality_board(model, tokens: torch.Tensor, batch: Dict[str, torch.Tensor], path: str,
                       title: Optional[str] = None, dpi: int = 110) -> Dict[str, object]:
    """The PRISM heat-map of one finished board: ``tokens`` (89,) as sampled, ``batch`` its
    conditioning (``fixed`` (89,): the givens); each generated cell coloured by the head's quality on
    the finished board, cells in conflict outlined. Writes ``path`` (PNG); returns whether the board
    is solved, how many cells are in conflict and the mean quality of generated cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tokens = tokens.cpu()
    given = grid(batch["fixed"].cpu())
    digits = grid(tokens)
    errors = cell_errors(digits)
    solved = bool((digits != 0).all() and not errors.any())
    q = grid(board_quality(model, tokens)).clone()
    q[given] = float("nan")
    status = "solved" if solved else f"{int(errors.sum())} cells in conflict"
    fig, ax = plt.subplots(figsize=(5, 5.4))
    draw_board(ax, digits, given, q, errors=errors,
               title=f"{title + ': ' if title else ''}{status}; colour = PRISM quality g_i")
    sm = plt.cm.ScalarMappable(cmap="RdYlGn", norm=plt.Normalize(0, 1))
    fig.colorbar(sm, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    generated = ~given
    return {"solved": solved, "conflicts": int(errors.sum()), "mean_quality": float(q[generated].mean())}
