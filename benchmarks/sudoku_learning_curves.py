"""Learning curves of Sudoku MDM training choices, each a real ``run.py train`` of the long recipe
(gin/sudoku/mdm.gin) with a few bindings changed, for the same number of steps and sequences.

    python benchmarks/sudoku_learning_curves.py --steps 300 [--only NAME ...] [--out DIR]
    python benchmarks/sudoku_learning_curves.py --validate DIR [DIR ...]   # score kept runs alike

Prints the mean masked cross-entropy (uniform over 9 digits: ln 9 = 2.197) and token accuracy of
each variant's training batches at every logging step, and its throughput. Variants that change
the training distribution (unconditional, cosine) are compared fairly only by ``--validate``,
which scores every run on the same held-out batches. Runs one variant after another with
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
    "recipe_seed1": ["experiment.seed = 1"],  # the same recipe, another seed: how large is seed noise?
    "full_attention": ["backbones.dit.group_attention = False"],
    "no_grid_embeddings": ["backbones.dit.group_attention = False", "backbones.dit.position_groups = None"],
    "unconditional": ["tasks.sudoku.conditional = False"],
    "lr_3e-4": ["train.lr = 3e-4"],
    "no_augmentation": ["tasks.sudoku.augment = False"],
    "4_blocks": ["backbones.dit.n_blocks = 4"],
    "cosine_noise": ["losses.mdlm.noise = @noise.cosine()"],
}


def validate(run_dir: str, n_grids: int = 512) -> dict:
    """The run's final weights, scored on the same held-out batches for every variant: 512 of the
    paper's validation grids with seeded clue sets (17-50), the log-linear MDLM loss, fixed masks."""
    sys.path.insert(0, REPO)
    import gin
    import torch

    from prism import cli
    from prism.training.checkpoints import load_latest
    from prism.experiment import build_experiment
    from prism.losses.mdm import MDLMLoss
    from prism.training.loop import step_generator
    from registry import load_builtin_components

    load_builtin_components()
    gin.clear_config()
    cli.parse_gin([os.path.join(run_dir, "train_config.gin")], ["tasks.sudoku.n_train_grids = 10"])
    exp = build_experiment()
    if load_latest(exp.model, run_dir) is None:
        raise SystemExit(f"{run_dir} has no complete checkpoint")
    exp.model.eval()
    loss, totals = MDLMLoss(), {}
    with torch.no_grad():
        for i, batch in enumerate(exp.task.valid_batches(128, limit=n_grids)):
            out = loss(exp.model, batch, step_generator(0, i, domain=2))
            for k, v in {"nelbo": out.loss, **out.logs}.items():
                totals[k] = totals.get(k, 0.0) + float(v) / (n_grids // 128)
    return totals


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--only", nargs="*", default=None)
    p.add_argument("--out", default=None, help="where to keep the runs (default: a temporary directory)")
    p.add_argument("--validate", nargs="*", default=None,
                   help="only score the runs kept in these directories on the held-out batches")
    args = p.parse_args()
    if args.validate is not None:
        print("held-out validation (512 grids, clue sets 17-50, log-linear masking, same masks for all)")
        print("| variant | steps | NELBO | masked CE | masked acc |\n|---|---|---|---|---|")
        for root in args.validate:
            for name in sorted(os.listdir(root)):
                if os.path.exists(os.path.join(root, name, "train_config.gin")):
                    v = validate(os.path.join(root, name))
                    steps = json.loads(open(os.path.join(root, name, "metrics.jsonl")).readlines()[-1])["step"]
                    print(f"| {name} | {steps} | {v['nelbo']:.3f} | {v['masked_ce']:.3f} | {v['masked_acc']:.3f} |", flush=True)
        return
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
