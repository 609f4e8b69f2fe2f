"""Training throughput of the Sudoku recipe on one device, in bf16 autocast: sequences/s of full steps
(forward + backward + AdamW, batches on the device), the fraction of the card's dense bf16 matrix
throughput this reaches, and the peak device memory.

    python benchmarks/gpu_throughput.py [--device cuda] [--steps 20] [--presets cpu tiny] [--batch-sizes 256 1024]

FLOPs per step are counted by ``torch.utils.flop_counter.FlopCounterMode`` on one real step (matrix
multiplies and attention, forward and backward), not estimated from a formula. The peak is looked up
from the device name (dense bf16, no sparsity) or given with --peak-tflops; unknown cards print no
fraction. Runs on a CPU too (--device cpu, no peak), which is how it is tested.
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

# dense bf16 tensor-core peaks from the vendors' data sheets, TFLOP/s (the first match wins)
PEAK_BF16_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.0), ("H200", 989.0), ("GH200", 989.0),
                    ("B200", 2250.0), ("A100", 312.0), ("A10G", 70.0), ("L40S", 362.0), ("L4", 121.0),
                    ("RTX 4090", 165.0), ("RTX 3090", 71.0)]


def peak_tflops(device: torch.device):
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((tf for key, tf in PEAK_BF16_TFLOPS if key in name), None)


def measure(preset: str, batch_size: int, steps: int, warmup: int, device: torch.device):
    from torch.utils.flop_counter import FlopCounterMode

    gin.clear_config()
    cli.parse_gin(["sudoku/mdm.gin"], [f"DIT_PRESET = '{preset}'", "tasks.sudoku.n_train_grids = 2000"])
    exp = build_experiment()
    module = TrainModule(exp.model, exp.loss).to(device)
    opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
    batches = [{k: v.to(device) for k, v in exp.task.train_batch(batch_size, step_generator(0, i)).items()}
               for i in range(steps + warmup)]

    def step(i):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss, _ = module(batches[i], step_generator(0, i, 1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    with FlopCounterMode(display=False) as counter:
        step(0)
    flops = counter.get_total_flops()
    for i in range(1, warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for i in range(warmup, warmup + steps):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = (time.perf_counter() - t0) / steps
    peak_mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    params = sum(p.numel() for p in module.parameters())
    return dict(params=params, seqs_per_s=batch_size / seconds, tflops=flops / seconds / 1e12, peak_gib=peak_mem)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--presets", nargs="+", default=["cpu", "tiny"])
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[256, 1024])
    p.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak, if not in the table")
    args = p.parse_args(argv)
    load_builtin_components()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({os.cpu_count()} cores)"
    peak = args.peak_tflops or peak_tflops(device)
    print(f"{name}; torch {torch.__version__}; bf16 autocast; {args.steps} timed steps after {args.warmup} warm-up"
          + (f"; dense bf16 peak {peak:.0f} TFLOP/s" if peak else "; no known peak"))
    print("| preset | parameters | batch | sequences/s | TFLOP/s (counted) | fraction of bf16 peak | peak memory GiB |")
    print("|---|---|---|---|---|---|---|")
    for preset in args.presets:
        for bs in args.batch_sizes:
            r = measure(preset, bs, args.steps, args.warmup, device)
            frac = f"{r['tflops'] / peak:.1%}" if peak else "n/a"
            mem = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "n/a"
            print(f"| {preset} | {r['params']:,} | {bs} | {r['seqs_per_s']:.0f} | {r['tflops']:.2f} | {frac} | {mem} |", flush=True)


if __name__ == "__main__":
    main()
