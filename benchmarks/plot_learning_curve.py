"""Plot a training run's learning curve (metrics.jsonl) and, optionally, dev-puzzle success rates.

    python benchmarks/plot_learning_curve.py runs/sudoku_mdm --processes 2 \
        --success 1000:0.12 2000:0.35 --out benchmarks/results/sudoku_learning_curve.png

The x axis is CPU-hours = wall-clock hours x processes (one thread each), as measured by the run.
"""
import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("--processes", type=int, default=1)
    p.add_argument("--success", nargs="*", default=[], help="step:success pairs measured on dev puzzles")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    rows = [json.loads(line) for line in open(os.path.join(args.run_dir, "metrics.jsonl"))]
    steps = [r["step"] for r in rows]
    hours = {r["step"]: r["elapsed_s"] * args.processes / 3600 for r in rows}
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot(steps, [r["masked_ce"] for r in rows], label="masked cross-entropy")
    ax[0].axhline(2.1972, ls=":", c="gray", label="uniform over 9 digits")
    ax[0].set_xlabel("optimizer step (128 grids each)")
    ax[0].set_ylabel("nats")
    ax[0].legend()
    ax[1].plot(steps, [r["masked_acc"] for r in rows], label="masked token accuracy")
    if args.success:
        pts = [tuple(map(float, s.split(":"))) for s in args.success]
        ax[1].plot([s for s, _ in pts], [v for _, v in pts], "o-", label="dev success (MDLM, T=51)")
    ax[1].set_xlabel("optimizer step")
    ax[1].set_ylim(0, 1)
    ax[1].legend(loc="center right")
    last = rows[-1]
    fig.suptitle(f"Sudoku MDM: {last['step']} steps, {hours[last['step']]:.2f} CPU-hours")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
