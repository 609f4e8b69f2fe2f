"""Learning curves of Sudoku MDM training choices, each a real ``run.py train`` of the long recipe
(gin/sudoku/mdm.gin) with a few bindings changed, for the same number of steps and sequences.

    python benchmarks/sudoku_learning_curves.py --steps 300 [--only NAME ...]

Prints the mean masked cross-entropy (uniform over 9 digits: ln 9 = 2.197) and token accuracy of
each variant at every logging step, and its throughput. Runs one variant after another with
1 thread each; wall-clock numbers are only comparable between runs made on an idle machine.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

VARIANTS = {
    # the shipped recipe: conditional training, row/col/box embeddings, constraint-graph attention
    "recipe": [],
    "full_attention": ["backbones.dit.group_attention = False"],
    "no_grid_embeddings": ["backbones.dit.group_attention = False", "backbones.dit.position_groups = None"],
    "unconditional": ["tasks.sudoku.conditional = False"],
    "lr_3e-4": ["train.lr = 3e-4"],
    "no_augmentation": ["tasks.sudoku.augment = False"],
    "4_blocks": ["backbones.dit.n_blocks = 4"],
    "cosine_noise": ["losses.mdlm.noise = @noise.cosine()"],
}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--only", nargs="*", default=None)
    p.add_argument("--out", default=None, help="where to keep the runs (default: a temporary directory)")
    args = p.parse_args()
    root = args.out or tempfile.mkdtemp(prefix="prism_curves_")
    names = args.only or list(VARIANTS)
    curves = {}
    for name in names:
        out = os.path.join(root, name)
        binds = VARIANTS[name] + [f"train.steps = {args.steps}", f"train.log_every = {args.log_every}",
                                  f"train.save_every = {args.steps}", "train.warmup_steps = 50",
                                  "train.num_threads = 1", "train.ema_decay = 0.0"]
        cmd = [sys.executable, os.path.join(REPO, "run.py"), "train", "gin/sudoku/mdm.gin", "--output-dir", out]
        for b in binds:
            cmd += ["--bind", b]
        print(f"== {name}: {' | '.join(VARIANTS[name]) or '(recipe as is)'}", flush=True)
        subprocess.run(cmd, check=True, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        with open(os.path.join(out, "metrics.jsonl")) as f:
            curves[name] = [json.loads(line) for line in f]
        last = curves[name][-1]
        print(f"   masked_ce {last['masked_ce']:.3f}  masked_acc {last['masked_acc']:.3f}  "
              f"seqs/s {sum(r['seqs_per_s'] for r in curves[name]) / len(curves[name]):.0f}", flush=True)
    steps = [r["step"] for r in curves[names[0]]]
    print("\nmasked cross-entropy (accuracy) at step; sequences seen = step x 64")
    print("| variant | " + " | ".join(str(s) for s in steps) + " |")
    print("|---|" + "---|" * len(steps))
    for name in names:
        cells = [f"{r['masked_ce']:.3f} ({r['masked_acc']:.2f})" for r in curves[name]]
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"\nruns kept in {root}")


if __name__ == "__main__":
    main()
