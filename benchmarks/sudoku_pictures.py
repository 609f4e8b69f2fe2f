"""Pictures of PRISM sampling on Sudoku, from the sampler's trace:

- OUT_board.png: the final board of one dev puzzle, each generated cell coloured by the PRISM head's
  quality g_i (one forward pass on the finished board); givens in grey, wrong cells (against the
  puzzle's rules) outlined in red;
- OUT_denoising.gif: the denoising of the same puzzle, one frame per step: masked cells blank, cells
  unmasked at the step in blue (with the digit written), cells remasked at the step in red (with the
  digit removed), cell colour = the quality the step saw (white: no quality yet).

    python benchmarks/sudoku_pictures.py --weights gin/sudoku/prism.safetensors [--puzzle 0] \
        [--steps 51] [--num-remask 4] [--out benchmarks/results/sudoku_prism]
"""
import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

import run  # noqa: E402
from prism.experiment import build_experiment  # noqa: E402
from prism.samplers.prism import prism_sampler  # noqa: E402
from prism.train import step_generator  # noqa: E402
from registry import load_builtin_components  # noqa: E402
from tasks.sudoku import CELL_POSITIONS  # noqa: E402


def cell_errors(digits):
    """(9, 9) bool: cells whose digit repeats in their row, column or box."""
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


def draw_board(ax, digits, given, quality=None, unmasked=None, remasked=None, errors=None, title=""):
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


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default="gin/sudoku/prism.safetensors")
    p.add_argument("--puzzle", type=int, default=0, help="index into the dev puzzles")
    p.add_argument("--steps", type=int, default=51)
    p.add_argument("--num-remask", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/sudoku_prism")
    args = p.parse_args()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.animation import FuncAnimation, PillowWriter

    load_builtin_components()
    run.parse_gin(["sudoku/prism.gin"], [f"experiment.init_checkpoint = '{args.weights}'", "experiment.init_new = []",
                                         "tasks.sudoku.n_train_grids = 10", "tasks.sudoku.cache_dir = None"])
    exp = build_experiment()
    model = exp.model.eval()
    puzzles = exp.task.eval_puzzles()
    ids = puzzles[args.puzzle:args.puzzle + 1]
    batch = {"input_ids": ids, "fixed": ids != 0}
    sampler = prism_sampler(args.steps, num_remask=args.num_remask)
    out = sampler(model, batch, step_generator(args.seed, args.puzzle, domain=1), trace=True)
    with torch.no_grad():
        final_q = torch.sigmoid(model(out.tokens).quality_logits.float())[0]

    def grid(v):
        return v[0, CELL_POSITIONS].reshape(9, 9) if v.dim() == 2 else v[CELL_POSITIONS].reshape(9, 9)

    given = grid(batch["fixed"])
    digits = grid(out.tokens)
    errors = cell_errors(digits)
    solved = not errors.any()
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    fig, ax = plt.subplots(figsize=(5, 5.4))
    q = grid(final_q).clone()
    q[given] = float("nan")
    draw_board(ax, digits, given, q, errors=errors,
               title=f"dev puzzle {args.puzzle}: {'solved' if solved else f'{int(errors.sum())} cells in conflict'}; "
                     f"colour = PRISM quality g_i")
    sm = plt.cm.ScalarMappable(cmap="RdYlGn", norm=plt.Normalize(0, 1))
    fig.colorbar(sm, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(args.out + "_board.png", dpi=110)
    plt.close(fig)

    frames = out.trace
    fig, ax = plt.subplots(figsize=(5, 5.4))

    def frame(k):
        ax.clear()
        st = frames[k]
        qk = grid(st["quality"][0]).clone() if st["quality"] is not None else None
        z = grid(st["z"][0]).clone()
        if qk is not None:
            qk[(z == 0) | given] = float("nan")
        after = frames[k + 1]["z"] if k + 1 < len(frames) else out.tokens  # the digits this step wrote
        z = torch.where(grid(st["unmasked"][0]), grid(after[0]), z)
        n_rem = int(st["remasked"].sum())
        draw_board(ax, z, given, qk, grid(st["unmasked"][0]), grid(st["remasked"][0]),
                   title=f"step {k + 1}/{len(frames)}: {int(st['unmasked'].sum())} unmasked (blue), {n_rem} remasked (red)")

    anim = FuncAnimation(fig, frame, frames=len(frames))
    anim.save(args.out + "_denoising.gif", writer=PillowWriter(fps=4))
    plt.close(fig)
    remasks = sum(int(st["remasked"].sum()) for st in frames)
    print(f"puzzle {args.puzzle}: {'solved' if solved else 'not solved'}, {len(frames)} steps, {out.nfe} forward passes, "
          f"{remasks} remasks; wrote {args.out}_board.png and {args.out}_denoising.gif")


if __name__ == "__main__":
    main()
