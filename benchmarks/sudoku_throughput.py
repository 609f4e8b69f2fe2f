"""Training throughput of the Sudoku recipe (gin/sudoku/mdm.gin) under different settings: threads,
torch.compile, constraint-graph attention, batch size. Prints sequences/s of full training steps
(forward + backward + AdamW) after warm-up.

    python benchmarks/sudoku_throughput.py [--steps 20]

Run it on an otherwise idle machine: the numbers are wall-clock.
"""
import argparse
import os
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import gin  # noqa: E402
import torch  # noqa: E402

from prism import cli  # noqa: E402
from prism.experiment import build_experiment  # noqa: E402
from prism.training.loop import TrainModule, step_generator  # noqa: E402
from registry import load_builtin_components  # noqa: E402

VARIANTS = [
    ("recipe, 1 thread", 1, False, [], 64),
    ("recipe, 2 threads", 2, False, [], 64),
    ("recipe, 2 threads, batch 128", 2, False, [], 128),
    ("recipe, 2 threads, torch.compile", 2, True, [], 64),
    ("full attention, 2 threads", 2, False, ["backbones.dit.group_attention = False"], 64),
    ("4 blocks, 2 threads", 2, False, ["backbones.dit.n_blocks = 4"], 64),
]


def measure(threads, compile_, binds, batch_size, steps, warmup):
    gin.clear_config()
    cli.parse_gin(["sudoku/mdm.gin"], binds + ["tasks.sudoku.n_train_grids = 2000"])
    torch.set_num_threads(threads)
    exp = build_experiment()
    module = TrainModule(exp.model, exp.loss)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
    step_fn = torch.compile(module) if compile_ else module
    batches = [exp.task.train_batch(batch_size, step_generator(0, i)) for i in range(steps + warmup)]
    for i, batch in enumerate(batches):
        if i == warmup:
            t0 = time.perf_counter()
        loss, _ = step_fn(batch, step_generator(0, i, 1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return steps * batch_size / (time.perf_counter() - t0)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    args = p.parse_args()
    load_builtin_components()
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs; {args.steps} timed steps after {args.warmup} warm-up steps")
    print("| setting | sequences/s |\n|---|---|")
    for name, threads, compile_, binds, bs in VARIANTS:
        try:
            rate = f"{measure(threads, compile_, binds, bs, args.steps, args.warmup):.1f}"
        except Exception as err:  # e.g. torch.compile without a working C++ toolchain
            rate = f"failed: {type(err).__name__}: {str(err).splitlines()[0][:80]}"
        print(f"| {name} | {rate} |", flush=True)


if __name__ == "__main__":
    main()
