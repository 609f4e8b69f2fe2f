"""Pictures of PRISM sampling on Sudoku, from the sampler's trace:

- OUT_board.png: the final board of one dev puzzle, each generated cell coloured by the PRISM head's
  quality g_i (one forward pass on the finished board); givens in grey, wrong cells (against the
  puzzle's rules) outlined in red;
- OUT_denoising.gif: the denoising of the same puzzle, one frame per step: masked cells blank, cells
  unmasked at the step in blue (with the digit written), cells remasked at the step in red (with the
  digit removed), cell colour = the quality the step saw (white: no quality yet).

    python benchmarks/sudoku_pictures.py --weights weights/sudoku/prism.safetensors [--puzzle 0] \
        [--steps 51] [--num-remask 4] [--out benchmarks/results/sudoku_prism]
"""
import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from prism import cli  # noqa: E402
from prism.experiment import build_experiment  # noqa: E402
from prism.samplers.prism import prism_sampler  # noqa: E402
from prism.training.loop import step_generator  # noqa: E402
from registry import load_builtin_components  # noqa: E402
from tasks.sudoku_plots import draw_board, grid, save_quality_board  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--weights", default="weights/sudoku/prism.safetensors")
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
    cli.parse_gin(["sudoku/prism.gin"], [f"experiment.init_checkpoint = '{args.weights}'", "experiment.init_new = []",
                                         "tasks.sudoku.n_train_grids = 10", "tasks.sudoku.cache_dir = None"])
    exp = build_experiment()
    model = exp.model.eval()
    puzzles = exp.task.eval_puzzles()
    ids = puzzles[args.puzzle:args.puzzle + 1]
    batch = {"input_ids": ids, "fixed": ids != 0}
    sampler = prism_sampler(args.steps, num_remask=args.num_remask)
    out = sampler(model, batch, step_generator(args.seed, args.puzzle, domain=1), trace=True)
    given = grid(batch["fixed"])
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    board = save_quality_board(model, out.tokens[0], {"fixed": batch["fixed"][0]}, args.out + "_board.png",
                               title=f"dev puzzle {args.puzzle}")
    solved = board["solved"]

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
