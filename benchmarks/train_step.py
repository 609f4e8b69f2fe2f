"""Cost of a PRISM training step against an MDM-loss step, on the same model and batch.

    python benchmarks/train_step.py [--steps 20] [--batch-size 64] [--threads 2]

Model: the Sudoku recipe (gin/sudoku/prism.gin: the cpu-preset DiT + linear head), random weights.
A step is forward + backward + AdamW. Prints the mean wall time per step after warm-up, the number
of backbone passes per step (counted with a forward hook, not assumed) and the ratio to the MDM step.
Run it on an otherwise idle machine: the numbers are wall-clock.
"""
import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from prism import cli  # noqa: E402
from prism.experiment import build_experiment  # noqa: E402
from prism.losses.mdm import MDLMLoss  # noqa: E402
from prism.losses.prism import PRISMLoss  # noqa: E402
from prism.training.loop import step_generator  # noqa: E402
from registry import load_builtin_components  # noqa: E402


def time_loss(model, loss, batches, warmup):
    passes = []
    hook = model.backbone.register_forward_hook(lambda *a: passes.append(1))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    times = []
    for i, batch in enumerate(batches):
        n_before = len(passes)
        t0 = time.perf_counter()
        out = loss(model, batch, step_generator(0, i, 1))
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
        n_passes = len(passes) - n_before
    hook.remove()
    return sum(times) / len(times), n_passes


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load_builtin_components()
    cli.parse_gin(["sudoku/prism.gin"], ["experiment.init_checkpoint = None", "tasks.sudoku.n_train_grids = 2000"])
    exp = build_experiment()
    model = exp.model.train()
    batches = [exp.task.train_batch(args.batch_size, step_generator(0, i)) for i in range(args.steps + args.warmup)]
    n = sum(p.numel() for p in model.parameters())
    print(f"torch {torch.__version__}, {args.threads} threads; Sudoku DiT + linear head ({n:,} parameters), "
          f"batch {args.batch_size}, {args.steps} timed steps after {args.warmup} warm-up")
    rows = [("MDM loss (losses.mdlm)", MDLMLoss())]
    for n_y in (1, 4):
        rows.append((f"PRISM, k = 4, n_y = {n_y}", PRISMLoss(k=4, n_y=n_y, mdm_weight=5.0)))
    rows.append(("PRISM, k = 4, n_y = 1, head only", PRISMLoss(k=4, n_y=1, mdm_weight=5.0)))
    base = None
    print("| step | ms / step | backbone passes | × MDM step |\n|---|---|---|---|")
    for name, loss in rows:
        for prm in model.parameters():
            prm.requires_grad_(not name.endswith("head only") or prm in set(model.head.parameters()))
        loss.attach(model)
        sec, passes = time_loss(model, loss, batches, args.warmup)
        base = base or sec
        print(f"| {name} | {1000 * sec:.1f} | {passes} | {sec / base:.2f} |")


if __name__ == "__main__":
    main()
