"""``benchmarks/full_size.py``'s LLaDA-8B phases: weights, load, train, resume, mdm_step, sample."""
from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time

from full_size_phases import (MBPP_GIN, REPO, SFT_GIN, VARIANTS, disk_bytes, last_step, metrics_rows, reset_peak, runtime_rss,
                              seeded_normal, status)


def write_llada(profile, out):
    """config.json + shards + index, the released layout, each tensor made just before it is written."""
    import torch

    from prism.backbones.llada import LLaDABackbone
    from prism.backbones.llada_files import released_config
    from prism.checkpoint import HF_INDEX
    from prism.safetensors_stream import write_streamed

    index = os.path.join(out, HF_INDEX)
    if os.path.exists(index):
        return dict(notes="already written")
    os.makedirs(out, exist_ok=True)
    meta = LLaDABackbone(preset=profile["preset"], config=profile["config"], device="meta")
    specs = [(n, tuple(t.shape), torch.bfloat16) for n, t in meta.state_dict().items()]
    groups, size = [[]], 0
    for spec in specs:
        nbytes = math.prod(spec[1]) * 2
        if groups[-1] and size + nbytes > profile["shard_bytes"]:
            groups.append([])
            size = 0
        groups[-1].append(spec)
        size += nbytes
    names = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
    weight_map, total = {}, 0
    for file, group in zip(names, groups):
        print(f"writing {file} ({len(group)} tensors)", flush=True)
        total += write_streamed(os.path.join(out, file), group, seeded_normal)
        weight_map.update({n: file for n, _, _ in group})
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(released_config(meta.config), f, indent=2)
    with open(index + ".tmp", "w") as f:  # the index last: its presence marks a complete directory
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    os.replace(index + ".tmp", index)
    n = sum(math.prod(s) for _, s, _ in specs)
    return dict(parameters=n, shards=len(names), disk_bytes=disk_bytes(out), notes=f"{n:,} parameters, bf16")


def llada_binds(profile, work, steps=None):
    t = profile["train"]
    window = t["gen_length"]
    return [f"backbones.llada.model_name_or_path = '{os.path.join(work, 'weights')}'",
            "backbones.llada.mask_id = 50257",  # the offline gpt2-chat tokenizer's <|mdm_mask|>
            "tasks.sft.source = 'mbpp-train'", "tasks.sft.tokenizer = 'gpt2-chat'",
            f"tasks.sft.cache_dir = '{os.path.join(work, 'data')}'",
            f"tasks.sft.seq_len = {t['seq_len']}", f"tasks.sft.gen_length = {t['gen_length']}",
            f"losses.prism.window = {window}", f"losses.prism.mask_window = {window}",
            f"adapters.lora.rank = {profile['rank']}", f"adapters.lora.alpha = {profile['rank']}",
            f"train.steps = {steps or t['steps']}", f"train.batch_size = {t['batch']}", "train.grad_accum = 1",
            "train.save_every = 1", "train.log_every = 1", "train.keep_checkpoints = 3",
            "run.eval_after_train = False"]


def gpu_peak():
    """{'gpu_peak_bytes': ...} on CUDA (the RSS figures are host memory there), then reset; {} on a CPU."""
    import torch

    if not torch.cuda.is_available():
        return {}
    peak = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    return {"gpu_peak_bytes": peak}


def train_figures(profile, run_dir, runtime):
    rows, last, step_s = last_step(run_dir)
    t = profile["train"]
    ckpt = os.path.join(run_dir, "checkpoints", f"step_{last:08d}")
    return dict(loss={s: r["loss"] for s, r in rows.items()}, step_s=round(step_s, 2),
                tokens_per_s=t["batch"] * t["seq_len"] / step_s, runtime_rss_bytes=runtime,
                disk_bytes=disk_bytes(ckpt), adapter_bytes=os.path.getsize(os.path.join(ckpt, "weights.safetensors")),
                notes=f"batch {t['batch']} × L {t['seq_len']}, {last} steps; step {last} alone (no checkpoint)")


def predicted_train(profile, runtime):
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    from llada_memory import estimate

    from prism.backbones.llada import resolve_config

    cfg = resolve_config(profile["preset"], None, profile["config"])
    t = profile["train"]
    e = estimate(cfg, batch=t["batch"], seq_len=t["seq_len"], lora_rank=profile["rank"], n_y=1, gpus=1,
                 sharding="none", weight_bytes=2, master_bytes=4, act_bytes=2, head_bytes=2, dropout_mask_bytes=2)
    return int(e["total"] + runtime), e["peak_phase"]


def run_train(work, name, binds, resume_from=None):
    from prism import cli

    out = os.path.join(work, name)
    if resume_from is None:
        shutil.rmtree(out, ignore_errors=True)
    argv = ["train", SFT_GIN, "--output-dir", out] + [x for b in binds for x in ("--bind", b)]
    if resume_from is not None:
        shutil.rmtree(out, ignore_errors=True)
        os.makedirs(os.path.join(out, "checkpoints"))
        shutil.copytree(resume_from, os.path.join(out, "checkpoints", os.path.basename(resume_from)))
        argv.append("--resume")
    cli.main(argv)
    return out


def phase_train(profile, work, loss=None):
    runtime = runtime_rss()
    binds = llada_binds(profile, work) + ([f"experiment.loss = {loss}", "losses.mdlm.normalize = 'sequence'",
                                           f"losses.mdlm.mask_window = {profile['train']['gen_length']}"] if loss else [])
    out = run_train(work, "train" if loss is None else "mdm_step", binds)
    fig = train_figures(profile, out, runtime) | gpu_peak()
    if loss is None:
        fig["predicted_peak_bytes"], fig["predicted_phase"] = predicted_train(profile, runtime)
    return fig


def phase_resume(profile, work):
    runtime = runtime_rss()
    first = os.path.join(work, "train", "checkpoints", f"step_{1:08d}")
    if not os.path.isdir(first):
        raise SystemExit("resume needs the train phase's step-1 checkpoint: run the train phase first")
    out = run_train(work, "resume", llada_binds(profile, work), resume_from=first)
    fig = train_figures(profile, out, runtime) | gpu_peak()
    fig["predicted_peak_bytes"], fig["predicted_phase"] = predicted_train(profile, runtime)
    straight = {int(r["step"]): r["loss"] for r in metrics_rows(os.path.join(work, "train"))}
    last = max(fig["loss"])
    fig.update(uninterrupted_loss=straight[last], resumed_loss=fig["loss"][last],
               loss_equal=straight[last] == fig["loss"][last],
               notes=f"step {last} from the step-1 checkpoint: loss {fig['loss'][last]:.6g} vs {straight[last]:.6g} "
                     "uninterrupted")
    return fig


def gemm_check():
    """Why ``backbones.llada.matmul = 'auto'`` upcasts on this CPU: one (256 × 4096) · (4096 × 12288) bf16
    product, the native kernel vs the float32-accumulating path (GFLOP/s)."""
    import torch

    from prism.backbones.upcast_linear import UpcastLinear

    lin = UpcastLinear(4096, 12288, bias=False, dtype=torch.bfloat16, device="meta")
    lin.weight = torch.nn.Parameter(torch.randn(12288, 4096).to(torch.bfloat16), requires_grad=False)
    x = torch.randn(256, 4096).to(torch.bfloat16)
    speed = {}
    for mode in ("native", "upcast"):
        lin.matmul = mode
        lin(x)
        t1 = time.time()
        for _ in range(3):
            lin(x)
        speed[mode] = round(3 * 2 * 256 * 4096 * 12288 / (time.time() - t1) / 1e9, 1)
    return speed


def phase_load(profile, work):
    from prism.backbones.llada import LLaDABackbone
    from prism.backbones.upcast_linear import cpu_has_half_matmul

    speed = gemm_check()
    LLaDABackbone(preset="tiny", device="meta")
    runtime = status("VmRSS")
    reset_peak()
    t0 = time.time()
    bb = LLaDABackbone(os.path.join(work, "weights"))
    seconds = time.time() - t0
    peak = status("VmHWM")
    nbytes = sum(p.numel() * p.element_size() for p in bb.parameters())
    return dict(model_bytes=nbytes, predicted_peak_bytes=nbytes + runtime, runtime_rss_bytes=runtime,
                peak_rss_bytes=peak, load_s=round(seconds, 1), tokens_per_s=None,
                bf16_gflops_native=speed["native"], bf16_gflops_upcast=speed["upcast"],
                cpu_bf16_units=cpu_has_half_matmul(),
                notes=f"peak while loading; bf16 GEMM {speed['native']} GFLOP/s native, {speed['upcast']} upcast")


def phase_sample(profile, work, key="sample"):
    """The recipe's sampler on the first MBPP test prompts, each of ``VARIANTS`` (``sample``) or only the
    fast one at the recipe's full length (``sample_full``), every output scored by the sandboxed executor."""
    import torch
    from accelerate import Accelerator

    from prism import cli
    from prism.evaluation.evaluate import generate_and_score
    from prism.experiment import build_experiment
    from prism.samplers.semi_ar import semi_ar_sampler

    os.environ["PRISM_ALLOW_CODE_EXECUTION"] = "1"
    s, t = profile[key], profile["train"]
    variants = {k: v for k, v in VARIANTS.items() if k in s.get("variants", VARIANTS)}
    adapter = os.path.join(work, "train", "checkpoints", f"step_{t['steps']:08d}", "weights.safetensors")
    if not os.path.exists(adapter):
        raise SystemExit(f"sample needs the train phase's adapter {adapter}: run the train phase first")
    binds = llada_binds(profile, work) + [
        f"experiment.init_adapter = '{adapter}'", "tasks.mbpp.tokenizer = 'gpt2-chat'",
        f"tasks.mbpp.cache_dir = '{os.path.join(work, 'data')}'", f"tasks.mbpp.gen_length = {s['gen_length']}",
        f"STEPS = {s['steps']}", f"BLOCK_LENGTH = {s['block_length']}", f"evaluate.batch_size = {s['prompts']}"]
    runtime = runtime_rss()
    cli.parse_gin([MBPP_GIN], binds)
    exp = build_experiment()
    sched = exp.sampler.schedule  # the recipe's sampler as the gin files build it
    recipe = dict(steps=sched.n_steps, block_length=sched.block_length, remask_per_block=sched.remask_per_block,
                  remask_spread=sched.remask_spread)
    rule = exp.sampler.remask_rule
    acc = Accelerator(cpu=not torch.cuda.is_available())  # a GPU where there is one, as run.py
    out = dict(runtime_rss_bytes=runtime, recipe=recipe, variants={})
    weights = sum(p.numel() * p.element_size() for p in exp.model.parameters())
    for name, (cache, threshold, remask) in variants.items():
        k = recipe["remask_per_block"] if remask is None else remask
        exp.sampler = semi_ar_sampler(recipe["steps"], recipe["block_length"], k, remask_rule=rule,
                                      remask_spread=recipe["remask_spread"], cache=cache, threshold=threshold)
        os.makedirs(os.path.join(work, key, name), exist_ok=True)
        reset_peak()
        with torch.no_grad():
            res = generate_and_score(exp, acc, os.path.join(work, key, name), batch_size=s["prompts"],
                                     limit=s["prompts"])
        generated = s["prompts"] * s["gen_length"]  # generated tokens only: no prompt, no padding
        with open(os.path.join(work, key, name, "samples.jsonl")) as f:
            statuses = [json.loads(line).get("status") for line in f]
        out["variants"][name] = dict(seconds=round(res["seconds"], 1), nfe=res.get("nfe"), remask_per_block=k,
                                     tokens_per_s=generated / res["seconds"], peak_rss_bytes=status("VmHWM"),
                                     pass_at_1=res.get("pass@1"), statuses=statuses)
        out["variants"][name].update(gpu_peak())
        print(f"{name}: {res['seconds']:.0f} s, {generated / res['seconds']:.3g} generated tokens/s, "
              f"pass@1 {res.get('pass@1')}, {statuses}", flush=True)
    main_variant = out["variants"]["dual_threshold_prism"]
    # clear_refs resets the high-water mark the kernel reports at exit too: the phase's peak is the variants'
    out.update(peak_rss_bytes=max(v["peak_rss_bytes"] for v in out["variants"].values()))
    out.update(tokens_per_s=main_variant["tokens_per_s"], predicted_peak_bytes=runtime + weights,
               model_bytes=weights,
               notes=f"{s['prompts']} prompts, {s['gen_length']} generated tokens, blocks of {recipe['block_length']}, "
                     f"{recipe['steps']} steps, K_block {recipe['remask_per_block']}; tokens/s: dual + τ 0.9 + PRISM")
    return out


