"""The phases of ``benchmarks/full_size.py``: each runs in a child process and returns its figures."""
from __future__ import annotations

import json
import os
import sys
import zlib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

PHASES = {"llada": ["weights", "load", "train", "resume", "mdm_step", "sample", "sample_full"],
          "mdlm": ["weights", "convert", "train", "sweep"]}
SMALL_LLADA = dict(d_model=64, n_layers=2, n_heads=4, mlp_hidden_size=128, vocab_size=50262, mask_token_id=50257)
PROFILES = {
    # seq_len / batch: what fits 24 GB and a session's time here (the recipe: 1024 / 4 × 3 accumulation)
    "llada8b": dict(family="llada", preset="8b", config={}, shard_bytes=3_000_000_000, rank=256,
                    train=dict(seq_len=256, gen_length=128, batch=1, steps=2),
                    sample=dict(prompts=2, gen_length=128, block_length=64, steps=16),
                    # the recipe's full setting (1024 tokens in all: 512 generated, blocks of 64, 256 steps)
                    sample_full=dict(prompts=1, gen_length=512, block_length=64, steps=256,
                                     variants=["dual_threshold_prism"])),
    "llada_small": dict(family="llada", preset=None, config=SMALL_LLADA, shard_bytes=4_000_000, rank=8,
                        train=dict(seq_len=160, gen_length=64, batch=1, steps=2),
                        sample=dict(prompts=2, gen_length=32, block_length=16, steps=4),
                        sample_full=dict(prompts=1, gen_length=64, block_length=16, steps=16,
                                         variants=["dual_threshold_prism"])),
    "mdlm_owt": dict(family="mdlm", dit="small", train=dict(seq_len=1024, batch=2, steps=2),
                     sweep=dict(nfe=128, n=2, metrics=["entropy", "gen_ppl", "mauve"])),
    "mdlm_small": dict(family="mdlm", dit="test", documents=400, train=dict(seq_len=128, batch=2, steps=2),
                       sweep=dict(nfe=4, n=2, metrics=["entropy"])),
}
# sampler variants at the shortened setting: (cache, threshold, remask) — remask None: the recipe's K_block
VARIANTS = {"uncached_prism": ("none", None, None), "uncached_plain": ("none", None, 0),
            "dual_threshold_prism": ("dual", 0.9, None), "dual_threshold_plain": ("dual", 0.9, 0)}
SFT_GIN, MBPP_GIN = "gin/sft/llada_lora_prism.gin", "gin/mbpp/llada_lora_prism_semiar.gin"
OWT_MDM_GIN, OWT_PRISM_GIN = "gin/owt/mdlm_owt.gin", "gin/owt/prism_mdlm_owt.gin"


# ------------------------------------------------------------------------------------ measuring
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
from llada_memory import proc_status as status  # noqa: E402  (the /proc/self/status reader both use)


def reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # VmHWM := VmRSS


def disk_bytes(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def machine() -> str:
    model, flags = "?", []
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        model = next(ln.split(":", 1)[1].strip() for ln in text.splitlines() if ln.startswith("model name"))
        flags = next(ln.split(":", 1)[1].split() for ln in text.splitlines() if ln.startswith("flags"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    units = [f for f in ("amx_bf16", "avx512_bf16") if f in flags] or ["no bf16 units (AVX-512 only)"]
    return f"{model}, {os.cpu_count()} cores, {mem:.0f} GiB, {', '.join(units)}"


# --------------------------------------------------------------------------------------- weights
def seeded_normal(name, shape, dtype, std=0.02):
    import torch

    if len(shape) == 1:  # norms: ones; biases of the DiT: zeros below
        return torch.ones(shape, dtype=dtype)
    g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.empty(shape, dtype=dtype).normal_(0.0, std, generator=g)


def metrics_rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def last_step(run_dir):
    """({step: metrics row}, the last step, its seconds alone): the clock since the previous row (a
    resumed run: since the checkpoint it started from), less the checkpoint written in between."""
    rows = {int(r["step"]): r for r in metrics_rows(run_dir)}
    last = max(rows)
    state = os.path.join(run_dir, "checkpoints", f"step_{last - 1:08d}", "trainer_state.json")
    if last - 1 in rows:
        before = rows[last - 1]["elapsed_s"]
    elif os.path.exists(state):
        with open(state) as f:
            before = json.load(f)["elapsed_s"]
    else:
        before = 0.0
    return rows, last, rows[last]["elapsed_s"] - before - rows[last].get("checkpoint_s", 0.0)



def runtime_rss():
    """The resident set of the imported code (torch, transformers, peft, accelerate, the project) before
    any model or data: the part of a peak no formula of the model predicts."""
    import accelerate  # noqa: F401
    import peft  # noqa: F401
    import transformers  # noqa: F401

    from prism import cli  # noqa: F401
    from registry import load_builtin_components

    load_builtin_components()
    return status("VmRSS")


def derive(profile_name, phases):
    """The issue's targets from the recorded figures (only those whose phases ran)."""
    out = {}
    ph = phases
    if PROFILES[profile_name]["family"] != "llada":
        return out
    if "load" in ph:
        model = ph["load"]["model_bytes"]
        out["load peak - bf16 model (target <= 1 GB)"] = f"{(ph['load']['peak_rss_bytes'] - model) / 1e9:.2f} GB"
    if "train" in ph:
        out["train peak (target <= 22 GB)"] = f"{ph['train']['peak_rss_bytes'] / 1e9:.2f} GB"
    if "train" in ph and "mdm_step" in ph:
        out["PRISM step / MDM step (target <= 2.2)"] = f"{ph['train']['step_s'] / ph['mdm_step']['step_s']:.2f}"
    if "resume" in ph:
        out["resumed loss == uninterrupted loss"] = str(ph["resume"]["loss_equal"])
    v = ph.get("sample", {}).get("variants", {})
    if "uncached_prism" in v and "uncached_plain" in v:
        over = v["uncached_prism"]["seconds"] / v["uncached_plain"]["seconds"] - 1
        out["PRISM remasking overhead, uncached (target <= 3%)"] = f"{100 * over:+.1f}%"
    if "dual_threshold_prism" in v and "dual_threshold_plain" in v:
        over = v["dual_threshold_prism"]["seconds"] / v["dual_threshold_plain"]["seconds"] - 1
        out["PRISM remasking overhead, dual + threshold"] = f"{100 * over:+.1f}%"
    if "dual_threshold_prism" in v and "uncached_prism" in v:
        speed = v["dual_threshold_prism"]["tokens_per_s"] / v["uncached_prism"]["tokens_per_s"]
        out["dual cache + threshold speed-up, PRISM on (target >= 3x)"] = f"{speed:.2f}x"
    full = ph.get("sample_full", {}).get("variants", {}).get("dual_threshold_prism")
    if full:
        out["full setting, dual + threshold + PRISM: seconds per sample"] = f"{full['seconds']:.0f}"
    return out


def describe(profile_name, res):
    p = PROFILES[profile_name]
    if p["family"] == "llada":
        t, s = p["train"], p["sample"]
        return (f"LLaDA ({p['preset'] or 'small'} config) with random bf16 weights in the released layout; "
                f"{SFT_GIN} with LoRA r = {p['rank']} on q/k/v + heads.mlp, PRISM loss, gradient checkpointing, "
                f"bf16 autocast; batch {t['batch']} × L {t['seq_len']} (answers ≤ {t['gen_length']}), grad_accum 1; "
                f"sampling {MBPP_GIN} on {s['prompts']} MBPP test prompts, {s['gen_length']} generated tokens, "
                f"{s['steps']} steps. Offline stand-ins: the 'gpt2-chat' tokenizer (mask id 50257 bound as the "
                "model's), MBPP's train split as SFT data. Random weights: no accuracy is measured.")
    t = p["train"]
    return (f"MDLM-OWT's DiT ({p['dit']} preset) with random float32 weights in the HF layout; {OWT_PRISM_GIN}, "
            f"batch {t['batch']} × L {t['seq_len']}; one sweep cell (MDLM and PRISM samplers, N = "
            f"{p['sweep']['nfe']}, {p['sweep']['n']} samples, nucleus 0.9). Offline stand-ins: Wikipedia text for "
            "OpenWebText, SmolLM2-135M (Gen PPL) and MiniLM (MAUVE) as judges. Random weights: no quality is measured.")
