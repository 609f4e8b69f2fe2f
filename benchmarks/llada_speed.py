"""Training-step and sampling throughput of LLaDA-architecture models with PRISM, on the CPU or a GPU.

    python benchmarks/llada_speed.py [--device cpu|cuda] [--configs tiny,mid] [--repeats 3] [--threads 2]

Training step: ``losses.prism`` (k = 8, n_y = 1, λ = 0.5, greedy fills at the leftmost-confident positions
of a 512 window, 'sequence' normalisation) forward (two backbone passes) + backward + AdamW, with LoRA
(r, alpha = r, dropout 0.1) on q/k/v and the ``heads.mlp`` head trainable, the rest frozen, gradient
checkpointing on; tokens/s = batch·L / seconds per step (the data tokens; each step runs 2 backbone passes,
each with a recompute). Sampling: ``samplers.semi_ar`` (greedy, most confident first, no remasking) on
B prompts of P random tokens + G masked positions; tokens/s = B·G / seconds per call.

Timing: one warm-up call, then the median wall clock of ``--repeats`` calls (CUDA synchronised). On
CUDA the calls run under bf16 autocast (weights float32); on the CPU in float32.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

_spec = importlib.util.spec_from_file_location("llada_memory", os.path.join(REPO, "benchmarks", "llada_memory.py"))
llada_memory = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(llada_memory)

# name: (preset, overrides, train batch, train L, lora r, sample batch, prompt P, generate G, steps, block)
CONFIGS = {
    "tiny": ("tiny", dict(vocab_size=128), 4, 1024, 8, 4, 64, 256, 64, 32),
    "mid": (None, dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=8, mlp_hidden_size=1408, vocab_size=32000),
            2, 256, 16, 1, 64, 64, 16, 32),
}
# bigger settings for a GPU (same architectures), used with --device cuda unless --cpu-sizes
GPU_SIZES = {"tiny": (16, 1024, 8, 16, 64, 256, 64, 32), "mid": (8, 1024, 16, 8, 128, 256, 64, 32)}


def timed(fn, repeats, device):
    import torch

    def once():
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    once()  # warm-up
    return statistics.median(once() for _ in range(repeats))


def run(name, device, repeats, gpu_sizes):
    import torch

    from prism.samplers.semi_ar import semi_ar_sampler

    preset, overrides, *sizes = CONFIGS[name]
    if device == "cuda" and gpu_sizes:
        sizes = list(GPU_SIZES[name])
    batch, L, rank, sb, P, G, steps, block = sizes
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda"
                else torch.autocast("cpu", enabled=False))
    model, step = llada_memory.build_step(preset, overrides, batch, L, rank, n_y=1, device=device)
    with autocast:
        train_s = timed(step, repeats, device)
    model.eval()
    V = model.backbone.config["vocab_size"]
    ids = torch.randint(0, V - 1, (sb, P + G), generator=torch.Generator().manual_seed(3))
    ids = torch.where(ids == model.mask_id, torch.zeros_like(ids), ids)
    fixed = torch.zeros_like(ids, dtype=torch.bool)
    fixed[:, :P] = True
    sample_batch = {"input_ids": ids.to(device), "fixed": fixed.to(device)}
    sampler = semi_ar_sampler(steps=steps, block_length=block)
    with torch.no_grad(), autocast:
        sample_s = timed(lambda: sampler(model, sample_batch, torch.Generator().manual_seed(4)), repeats, device)
    n_params = sum(p.numel() for p in model.parameters())
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    cfg = model.backbone.config
    arch = (f"D {cfg['d_model']}, {cfg['n_layers']} layers, {cfg['n_heads']} heads, MLP {cfg['mlp_hidden_size']}, "
            f"V {cfg['vocab_size']:,}; {n_params / 1e6:.2f}M params, {n_train / 1e6:.3f}M trainable")
    return dict(name=name, arch=arch, train=f"B {batch} × L {L}, r {rank}", train_s=train_s,
                train_tps=batch * L / train_s,
                sample=f"B {sb}, P {P} + G {G}, {steps} steps, block {block}", sample_s=sample_s,
                sample_tps=sb * G / sample_s)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--configs", default="tiny,mid")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--cpu-sizes", action="store_true", help="on CUDA, use the CPU batch/length settings")
    args = p.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    rows = [run(n, args.device, args.repeats, not args.cpu_sizes) for n in args.configs.split(",")]
    where = (torch.cuda.get_device_name() + ", bf16 autocast" if args.device == "cuda"
             else f"CPU, float32, {args.threads} threads")
    print(f"{where}; torch {torch.__version__}; median of {args.repeats} calls after 1 warm-up\n")
    print("| config | architecture | train setting | train s/step | train tokens/s | sampling setting "
          "| sample s/call | sampled tokens/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['arch']} | {r['train']} | {r['train_s']:.2f} | {r['train_tps']:,.0f} | "
              f"{r['sample']} | {r['sample_s']:.2f} | {r['sample_tps']:,.1f} |")


if __name__ == "__main__":
    main()
