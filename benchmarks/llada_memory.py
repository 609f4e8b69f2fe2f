"""Per-GPU memory of PRISM fine-tuning of LLaDA with LoRA: a small formula, and a CPU check of it.

    python benchmarks/llada_memory.py                 # the 8B table at the paper's setting
    python benchmarks/llada_memory.py --measure       # + estimate vs measured peak on the CPU (float32)

The step modelled is ``losses.prism`` (pass 1 on z: MDM term, graph kept; pass 2 on the n_y sequences y:
quality head, graph kept through the LoRA backbone) + backward + AdamW, LoRA on ``lora_targets``, the
``heads.mlp`` head, gradient checkpointing of every block (``torch.utils.checkpoint``, non-reentrant).
Sizes: T1 = batch·L tokens (pass 1), T2 = n_y·T1 (pass 2); c = ``act_bytes`` (compute dtype).

Static parts (resident the whole step):
  base_weights       frozen backbone, ``weight_bytes`` per parameter, divided by ``gpus`` when sharded
  gathered_weights   FSDP: the root unit (wte + ln_f + ff_out, not resharded) + one block being used;
                     ZeRO-3: the largest module (ff_out) + one prefetched block; none: 0
  trainable_params   LoRA r·(d_in + d_out) per adapted Linear + the head (2D + D·H + 2H + 1), in
                     ``master_bytes`` (+ a ``weight_bytes`` compute copy when they differ); sharded
  optimizer_state    AdamW: 2 moments × ``master_bytes`` per trainable parameter; sharded
  gradients          ``master_bytes`` per trainable parameter (made during backward); sharded
Activations at the step's peak, the largest of these phases:
  fwd1      pass 1 at SUBS: saved(T1) + logits (T1·V·c) + SUBS float32 buffer (T1·V·4) + one
            log-softmax chunk (``prism.model.LOG_SOFTMAX_CHUNK`` elements)
  fwd2      end of pass 2: saved(T1) + head(T1) + SUBS buffer + saved(T2) + head(T2) (no logits of y:
            the pass asks for the quality only and LLaDA skips its output layer)
  bwd2      first block of pass 2's backward (the engine runs pass 2's nodes first: they are newer):
            saved(T1) + SUBS buffer + block inputs(T2) + one block's saved tensors(T2) + backward work(T2)
  subs_bwd  SUBS backward of pass 1: saved(T1) + buffer y + incoming grad + dx (3·T1·V·4) (+ dx cast to c)
  bwd1      a block of pass 1's backward: block inputs(T1) + one block(T1) + work(T1) (never above bwd2)
where, per token,
  saved     = n_layers·D·c (each block's input, kept by the checkpoint) + ln_f (its input D·c, rsqrt 4,
              and its float32 copy D·4 when c ≠ 4)
  one block = what autograd saves in a recomputed block (frozen Linears keep no input, so ``a = norm(x)``,
              ``attn_out``'s and ``ff_out``'s inputs are not saved): 2 rsqrt (4 each) [+ 2·D·4 float32
              copies of the norm inputs when c ≠ 4]; per LoRA target: dropout mask (d_in·``dropout_mask_bytes``:
              a bool on CUDA, a float noise tensor on CPU) + dropout output (d_in·c) + lora_A output (r·c);
              q and k after rotary + v as SDPA gets them (3·D·c: with fewer kv heads k and v are
              repeated to n_heads first, and the repeats are what is saved); the SDPA output D·c and logsumexp n_heads·4;
              the residual after attention D·c; SwiGLU: ff_proj out, silu out, up_proj out (3·hidden·c)
  work      = (3·hidden + 2·D)·c: at the SwiGLU's backward, the grads of its product, both factors and
              the residual stream
  head      = 2·D·hb (its input, LayerNorm output) + 8 (mean, rstd) + 2·H·hb (Linear out, GELU out)
Everything is per GPU: activations are never sharded (data parallel). total = static + gradients + peak.

On one CPU (``benchmarks/full_size.py llada8b``): ``estimate('8b', batch=1, seq_len=256, lora_rank=256,
sharding='none', weight_bytes=2, master_bytes=4, act_bytes=2, head_bytes=2, dropout_mask_bytes=2)`` plus the
resident set of the imported libraries (measured in the same process before the model is built)
predicted 20.89 GB for a measured peak of 21.91 GB (0.95). Not in the formula: the allocator's
fragmentation and caches, the tokenizer and data, and transient buffers of the ops themselves.

The check (``--measure``): the same step on the CPU in float32 (c = 4, dropout noise 4 bytes) for the tiny
preset and a mid-sized random config, each in its own child process run with
MALLOC_MMAP_THRESHOLD_=1048576 (every allocation ≥ 1 MiB mapped on its own and unmapped when freed, so
the resident set follows the live tensors). Static: VmRSS after building the model and optimizer and one
full-size warm-up step (AdamW moments exist, grads set to None) minus VmRSS before building anything (after one step of a throwaway tiny model, which pages in the code and
one-time buffers: without it the first step adds ~35 MB that are not the model's).
Peak: the high-water mark VmHWM during the next full step (reset through /proc/self/clear_refs) minus
VmRSS just before it. The estimate's static part is compared with the first, gradients + activations
with the second.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Any, Dict, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

PAPER = dict(batch=4, seq_len=1024, lora_rank=256, lora_targets=("q_proj", "k_proj", "v_proj"), head_hidden=4096,
             n_y=1)
# measured configs: (label, preset, overrides, batch, seq_len, lora_rank)
MEASURED = {
    "tiny": ("tiny", dict(vocab_size=128), 4, 1024, 8),
    "mid": (None, dict(d_model=512, n_layers=8, n_heads=8, n_kv_heads=8, mlp_hidden_size=1408, vocab_size=32000),
            2, 256, 16),
}
GB = 1e9


def resolve(config) -> Dict[str, Any]:
    """A preset name ('8b', 'tiny') or a config dict → the resolved LLaDA config."""
    from prism.backbones.llada import resolve_config

    return resolve_config(config, None, None) if isinstance(config, str) else resolve_config(None, None, config)


def target_shapes(cfg) -> Dict[str, tuple]:
    """(d_in, d_out) of every Linear of a block."""
    d, hidden = cfg["d_model"], cfg["mlp_hidden_size"]
    kvd = cfg["n_kv_heads"] * d // cfg["n_heads"]
    return dict(q_proj=(d, d), k_proj=(d, kvd), v_proj=(d, kvd), attn_out=(d, d), ff_proj=(d, hidden),
                up_proj=(d, hidden), ff_out=(hidden, d))


def base_parameter_count(cfg) -> int:
    d, emb = cfg["d_model"], cfg["embedding_size"]
    block = 2 * d + sum(i * o for i, o in target_shapes(cfg).values())
    return 2 * emb * d + d + cfg["n_layers"] * block


def lora_parameter_count(cfg, rank: int, targets: Sequence[str]) -> int:
    """r·(d_in + d_out) per adapted Linear. peft matches module names by suffix, so a target 'ff_out' also
    adapts the output layer ``model.transformer.ff_out`` (D → V): counted too."""
    shapes = target_shapes(cfg)
    lm_head = rank * (cfg["d_model"] + cfg["embedding_size"]) if "ff_out" in targets else 0
    return cfg["n_layers"] * sum(rank * sum(shapes[t]) for t in targets) + lm_head


def head_parameter_count(d: int, hidden: int) -> int:
    """``heads.mlp``: LayerNorm(D) (2D) + Linear(D, H) (D·H + H) + Linear(H, 1) (H + 1)."""
    return 2 * d + d * hidden + 2 * hidden + 1


def estimate(config, *, batch: int, seq_len: int, lora_rank: int, lora_targets=("q_proj", "k_proj", "v_proj"),
             head_hidden=None, n_y: int = 1, gpus: int = 1, sharding: str = "fsdp", weight_bytes: int = 2,
             master_bytes: int = 4, act_bytes=None, head_bytes=None, dropout_mask_bytes: int = 1,
             lora_dropout: bool = True, optimizer: str = "adamw", checkpointing: bool = True) -> Dict[str, Any]:
    """Named parts in bytes (see the module docstring), ``peak_phase`` and ``total``."""
    if sharding not in ("fsdp", "zero3", "none"):
        raise ValueError(f"sharding must be 'fsdp', 'zero3' or 'none', got {sharding!r}")
    if optimizer != "adamw":
        raise ValueError("only optimizer='adamw' is modelled")
    cfg = resolve(config)
    c = act_bytes or weight_bytes
    hb = head_bytes or c
    d, nl, V = cfg["d_model"], cfg["n_layers"], cfg["embedding_size"]
    hidden, H = cfg["mlp_hidden_size"], head_hidden or d
    shard = gpus if sharding != "none" else 1
    shapes = target_shapes(cfg)

    n_base = base_parameter_count(cfg)
    n_train = lora_parameter_count(cfg, lora_rank, lora_targets) + head_parameter_count(d, H)
    block_params = 2 * d + sum(i * o for i, o in shapes.values())
    if sharding == "fsdp":
        gathered = (2 * V * d + d + block_params) * weight_bytes
    elif sharding == "zero3":
        gathered = (V * d + block_params) * weight_bytes
    else:
        gathered = 0
    per_param = master_bytes + (weight_bytes if weight_bytes != master_bytes else 0)
    parts: Dict[str, Any] = dict(
        base_weights=n_base * weight_bytes / shard,
        gathered_weights=gathered,
        trainable_params=n_train * per_param / shard,
        optimizer_state=n_train * 2 * master_bytes / shard,
        gradients=n_train * master_bytes / shard,
    )

    # per-token activation sizes (bytes)
    f32_copy = d * 4 if c != 4 else 0
    lora = 0
    if lora_dropout:
        lora = sum(shapes[t][0] * (dropout_mask_bytes + c) + lora_rank * c for t in lora_targets)
    elif lora_targets:
        lora = len({shapes[t][0] for t in lora_targets}) * d * c + len(lora_targets) * lora_rank * c
    block = (2 * 4 + 2 * f32_copy + lora + 3 * d * c + d * c + cfg["n_heads"] * 4 + d * c
             + 3 * hidden * c)
    work = (3 * hidden + 2 * d) * c
    per_layer = d * c if checkpointing else block
    lnf = d * c + 4 + f32_copy
    head = 2 * d * hb + 8 + 2 * H * hb
    T1, T2 = batch * seq_len, n_y * batch * seq_len
    saved1, saved2 = T1 * (nl * per_layer + lnf), T2 * (nl * per_layer + lnf)
    buf = T1 * V * 4
    from prism.model import LOG_SOFTMAX_CHUNK

    recompute = (lambda T: T * (block + work)) if checkpointing else (lambda T: T * work)
    phases = dict(
        fwd1=saved1 + T1 * head + T1 * V * c + buf + min(LOG_SOFTMAX_CHUNK, T1 * V) * 4,
        fwd2=saved1 + T1 * head + buf + saved2 + T2 * head,
        bwd2=saved1 + buf + T2 * nl * per_layer + recompute(T2),
        subs_bwd=saved1 + T1 * V * (3 * 4 + (c if c != 4 else 0)),
        bwd1=T1 * nl * per_layer + recompute(T1),
    )
    phase = max(phases, key=phases.get)
    parts["activations"] = phases[phase]
    parts["peak_phase"] = phase
    parts["phases"] = phases
    parts["per_token"] = dict(block_input=per_layer, one_block=block, work=work, head=head, vocab=V * 4)
    parts["static"] = sum(parts[k] for k in ("base_weights", "gathered_weights", "trainable_params",
                                             "optimizer_state"))
    parts["dynamic"] = parts["gradients"] + parts["activations"]
    parts["total"] = parts["static"] + parts["dynamic"]
    parts["counts"] = dict(base=n_base, trainable=n_train)
    return parts


NAMES = ["base_weights", "gathered_weights", "trainable_params", "optimizer_state", "gradients", "activations",
         "total"]


def paper_table(gpus: int = 8) -> str:
    setups = [(f"{gpus} GPUs, FSDP", dict(gpus=gpus, sharding="fsdp")),
              (f"{gpus} GPUs, ZeRO-3", dict(gpus=gpus, sharding="zero3")),
              ("1 GPU, no sharding", dict(gpus=1, sharding="none"))]
    rows = {name: estimate("8b", **PAPER, **kw) for name, kw in setups}
    first = next(iter(rows.values()))
    lines = [f"LLaDA-8B ({first['counts']['base']:,} base parameters), PRISM step: batch {PAPER['batch']}/GPU, "
             f"L = {PAPER['seq_len']}, n_y = {PAPER['n_y']}, LoRA r = {PAPER['lora_rank']} on q/k/v "
             f"+ MLP head {PAPER['head_hidden']} ({first['counts']['trainable']:,} trainable), bf16 weights and "
             "activations, fp32 masters/grads/AdamW, gradient checkpointing; GB = 1e9 bytes", "",
             "| part | " + " | ".join(rows) + " |", "|---|" + "---|" * len(rows)]
    for n in NAMES:
        lines.append(f"| {n} | " + " | ".join(f"{r[n] / GB:.2f}" for r in rows.values()) + " |")
    lines.append("| peak phase | " + " | ".join(r["peak_phase"] for r in rows.values()) + " |")
    lines.append("| fits 80 GB | " + " | ".join("yes" if r["total"] < 80e9 else "NO" for r in rows.values()) + " |")
    return "\n".join(lines)


# ---- the CPU check ----------------------------------------------------------------------------

def proc_status(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def build_step(preset, overrides, batch, seq_len, rank, n_y, dropout=0.1, device="cpu", dtype="float32",
               checkpointing=True, seed=0):
    """Model (LLaDA + LoRA on q/k/v + MLP head; the rest frozen), loss, AdamW and a ``step()`` closure."""
    import peft
    import torch

    from prism.backbones.llada import LLaDABackbone
    from prism.heads.quality import MLPHead
    from prism.losses.prism import PRISMLoss
    from prism.model import MDM

    torch.manual_seed(seed)
    bb = LLaDABackbone(preset=preset, config=overrides, dtype=dtype, gradient_checkpointing=checkpointing,
                       device=device)
    peft.inject_adapter_in_model(peft.LoraConfig(r=rank, lora_alpha=rank, lora_dropout=dropout,
                                                 target_modules=["q_proj", "k_proj", "v_proj"]), bb)
    model = MDM(bb, MLPHead).to(device)
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("head.") or "lora_" in n)
    model.train()
    window = min(512, seq_len)
    loss = PRISMLoss(k=8, n_y=n_y, mdm_weight=0.5, temperature=0.0, positions="leftmost_confident", window=window,
                     normalize="sequence", mask_window=window)
    loss.attach(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-4, weight_decay=0.1)
    V = bb.config["vocab_size"]
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randint(0, V - 1, (batch, seq_len), generator=g).to(device)
    while bool((x == bb.mask_id).any()):
        x = torch.where(x == bb.mask_id, torch.zeros_like(x), x)
    fixed = torch.zeros_like(x, dtype=torch.bool)
    fixed[:, : seq_len // 8] = True  # a prompt
    batch_ = {"input_ids": x, "fixed": fixed}

    def step():
        out = loss(model, batch_, torch.Generator().manual_seed(seed + 2))
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    return model, step


def child(name: str, threads: int, n_y: int) -> None:
    import gc

    import torch

    torch.set_num_threads(threads)
    import peft  # noqa: F401  (imported before the baseline: its import is not the model)

    import prism.losses.prism  # noqa: F401

    preset, overrides, batch, seq_len, rank = MEASURED[name]
    # page in the code and one-time buffers (kernels, thread pools) with a throwaway small model first:
    # the first step of any model grows the resident set by tens of MB that are not the model's
    _, warm = build_step("tiny", dict(vocab_size=128), 1, 64, rank, n_y)
    warm()
    del warm, _
    gc.collect()
    base = proc_status("VmRSS")
    t0 = time.perf_counter()
    model, step = build_step(preset, overrides, batch, seq_len, rank, n_y)
    step()  # warm-up at full size: AdamW moments now exist, grads are None
    warm_s = time.perf_counter() - t0
    gc.collect()
    static = proc_status("VmRSS") - base
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = proc_status("VmRSS")
    t0 = time.perf_counter()
    step()
    step_s = time.perf_counter() - t0
    peak = proc_status("VmHWM") - before
    print("RESULT " + json.dumps(dict(static=static, peak=peak, step_s=step_s, warm_s=warm_s)))


def estimate_measured(name: str, n_y: int = 1):
    preset, overrides, batch, seq_len, rank = MEASURED[name]
    cfg = dict(preset and resolve(preset) or {}, **overrides)
    return estimate(cfg, batch=batch, seq_len=seq_len, lora_rank=rank, n_y=n_y, gpus=1, sharding="none",
                    weight_bytes=4, master_bytes=4, act_bytes=4, dropout_mask_bytes=4)


def run_child(name: str, threads: int, n_y: int) -> Dict[str, float]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="1048576", PYTHONPATH=REPO)
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--threads", str(threads), "--n-y", str(n_y)]
    out = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
    return json.loads([ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")][-1][7:])


def measure_table(names, threads: int = 2, n_y: int = 1) -> str:
    lines = ["CPU, float32, MB = 1e6 bytes; static = model + LoRA + head + AdamW moments resident after a warm-up "
             "step; peak = high-water mark of the next step above what was resident before it", "",
             "| config | B × L | r | static est. | static meas. | ratio | peak est. (phase) | peak meas. | ratio "
             "| total est. | total meas. | ratio | step s |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in names:
        m = run_child(name, threads, n_y)
        e = estimate_measured(name, n_y)
        _, _, batch, seq_len, rank = MEASURED[name]
        tot_m = m["static"] + m["peak"]
        lines.append(f"| {name} | {batch} × {seq_len} | {rank} | {e['static'] / 1e6:.1f} | {m['static'] / 1e6:.1f} | "
                     f"{e['static'] / m['static']:.2f} | {e['dynamic'] / 1e6:.1f} ({e['peak_phase']}) | "
                     f"{m['peak'] / 1e6:.1f} | {e['dynamic'] / m['peak']:.2f} | {e['total'] / 1e6:.1f} | "
                     f"{tot_m / 1e6:.1f} | {e['total'] / tot_m:.2f} | {m['step_s']:.1f} |")
        print(lines[-1], flush=True)
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--measure", action="store_true", help="also run the CPU check (tiny and mid configs)")
    p.add_argument("--configs", default="tiny,mid")
    p.add_argument("--gpus", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n-y", type=int, default=1)
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args.child, args.threads, args.n_y)
    print(paper_table(args.gpus))
    if args.measure:
        print()
        print(measure_table(args.configs.split(","), args.threads, args.n_y))


if __name__ == "__main__":
    main()
