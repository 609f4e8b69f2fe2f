"""Wall time and NFE of vanilla MDLM, ReMDM and PRISM sampling at equal steps, on the same model and
puzzles (the Sudoku DiT of gin/sudoku/prism.gin: cpu preset + linear head; weights do not matter
for speed, random ones are used unless --weights is given).

    python benchmarks/sampling.py [--steps 51] [--batch-size 100] [--batches 1] [--threads 2]

"MDLM, no head" runs the same backbone without the head: the difference to "MDLM, with head" is
what the quality head costs per pass. Run it on an otherwise idle machine.
"""
import argparse
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import torch  # noqa: E402

from prism import cli  # noqa: E402
from prism.experiment import build_experiment  # noqa: E402
from prism.samplers import mdlm_sampler  # noqa: E402
from prism.samplers.prism import prism_sampler  # noqa: E402
from prism.samplers.remdm import remdm_sampler  # noqa: E402
from prism.training.loop import step_generator  # noqa: E402
from registry import load_builtin_components  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=51)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--batches", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--weights", default=None)
    p.add_argument("--repeats", type=int, default=3, help="interleaved repeats; the median is reported")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    load_builtin_components()
    binds = ["tasks.sudoku.n_train_grids = 10", "tasks.sudoku.cache_dir = None", "experiment.init_new = []",
             f"experiment.init_checkpoint = {repr(args.weights) if args.weights else None}"]
    cli.parse_gin(["sudoku/prism.gin"], binds)
    exp = build_experiment()
    model = exp.model.eval()
    head = model.head
    batches = list(exp.task.eval_batches(args.batch_size))[: args.batches]
    T = args.steps
    rows = [("MDLM, no head", mdlm_sampler(T), False), ("MDLM, with head", mdlm_sampler(T), True),
            ("ReMDM-cap η = 0.02", remdm_sampler(T, "cap", 0.02), True), ("ReMDM-conf", remdm_sampler(T, "conf"), True),
            ("PRISM K = 4 (Algorithm 3)", prism_sampler(T, num_remask=4), True)]
    print(f"torch {torch.__version__}, {args.threads} threads; {args.batches} batches of {args.batch_size} dev puzzles, T = {T}")
    # The head's own cost: forward passes with and without it, interleaved, median of 20.
    x = batches[0]["input_ids"]
    per = {True: [], False: []}
    with torch.no_grad():
        for _ in range(20):
            for with_head in (False, True):
                model.head = head if with_head else None
                t0 = time.perf_counter()
                model(x)
                per[with_head].append(time.perf_counter() - t0)
    med = {k: statistics.median_high(v) for k, v in per.items()}
    print(f"one forward pass on {len(x)} puzzles (median of 20, interleaved): {1000 * med[False]:.1f} ms without the head, "
          f"{1000 * med[True]:.1f} ms with it (× {med[True] / med[False]:.3f})")
    print("| sampler | seconds (median) | NFE per batch | ms per pass | × MDLM without head |\n|---|---|---|---|---|")
    times = {name: [] for name, _, _ in rows}
    nfes = {}
    for name, sampler, with_head in rows:  # warm-up
        model.head = head if with_head else None
        sampler(model, {k: v[:8] for k, v in batches[0].items()}, step_generator(0, 0, domain=1))
    for _ in range(args.repeats):  # interleaved, so slow phases of the machine hit every sampler
        for name, sampler, with_head in rows:
            model.head = head if with_head else None
            t0, nfe = time.perf_counter(), 0
            for i, b in enumerate(batches):
                nfe += sampler(model, b, step_generator(0, i, domain=1)).nfe
            times[name].append(time.perf_counter() - t0)
            nfes[name] = nfe
    base = None
    for name, _, _ in rows:
        sec = statistics.median_high(times[name])
        base = base or sec
        print(f"| {name} | {sec:.2f} | {nfes[name] / len(batches):.1f} | {1000 * sec / nfes[name]:.1f} | {sec / base:.3f} |")
    model.head = head


if __name__ == "__main__":
    main()
