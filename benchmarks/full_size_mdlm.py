"""``benchmarks/full_size.py``'s MDLM-OWT phases: weights, convert, train, sweep."""
from __future__ import annotations

import json
import math
import os
import shutil
import sys

from full_size_phases import (OWT_MDM_GIN, OWT_PRISM_GIN, REPO, disk_bytes, last_step, runtime_rss,
                              seeded_normal)


def write_mdlm(profile, out):
    """MDLM-OWT's Hugging Face layout: config.json + model.safetensors (float32, as released)."""
    import torch

    from prism.backbones.dit import PRESETS
    from prism.mdlm_weights import ROTARY_KEY, mdlm_layout
    from prism.safetensors_stream import write_streamed

    path = os.path.join(out, "model.safetensors")
    if os.path.exists(path):
        return dict(notes="already written")
    os.makedirs(out, exist_ok=True)
    sizes = PRESETS[profile["dit"]]
    D, heads = sizes["hidden_size"], sizes["n_heads"]
    layout = mdlm_layout(sizes["n_blocks"], 50258, D, sizes["cond_dim"])
    specs = [(n, s, torch.float32) for n, s in layout.items()] + [(ROTARY_KEY, (D // heads // 2,), torch.float32)]

    def make(name, shape, dtype):
        if name == ROTARY_KEY:
            hd = D // heads
            return 1.0 / (10000 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd))
        if name.endswith(".bias"):
            return torch.zeros(shape, dtype=dtype)
        return seeded_normal(name, shape, dtype)

    write_streamed(path, specs, make)
    config = dict(architectures=["MDLM"], model_type="mdlm", hidden_dim=D, cond_dim=sizes["cond_dim"],
                  n_blocks=sizes["n_blocks"], n_heads=heads, model_length=1024, dropout=0.1,
                  time_conditioning=False, vocab_size=50258, return_dict=False)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    n = sum(math.prod(s) for _, s, _ in specs)
    return dict(parameters=n, disk_bytes=disk_bytes(out), notes=f"{n:,} parameters, float32")


def owt_binds(profile, work):
    t = profile["train"]
    binds = ["tasks.text.source = 'wikipedia-offline'", "tasks.text.tokenizer = None", "tasks.text.num_proc = 1",
             f"tasks.text.max_documents = {profile.get('documents', 3000)}", "tasks.text.eval_documents = 0.05",
             f"tasks.text.seq_len = {t['seq_len']}", f"tasks.text.cache_dir = '{os.path.join(work, 'data')}'"]
    if profile["dit"] != "small":
        binds.append(f"DIT_PRESET = '{profile['dit']}'")
    return binds


def phase_convert(profile, work):
    from prism.mdlm_weights import main as convert

    out = os.path.join(work, "mdlm_prism.safetensors")
    info = convert(["convert", os.path.join(work, "weights"), out])
    return dict(disk_bytes=os.path.getsize(out), parameters=info["parameters"],
                notes=f"python -m prism.mdlm_weights convert: {info['tensors']} tensors from {info['source']}")


def phase_owt_train(profile, work):
    from prism import cli

    runtime = runtime_rss()
    t = profile["train"]
    out = os.path.join(work, "train")
    shutil.rmtree(out, ignore_errors=True)
    binds = owt_binds(profile, work) + [
        f"experiment.init_checkpoint = '{os.path.join(work, 'mdlm_prism.safetensors')}'",
        f"train.steps = {t['steps']}", f"train.batch_size = {t['batch']}", "train.save_every = 1",
        "train.log_every = 1", "run.eval_after_train = False"]
    cli.main(["train", OWT_PRISM_GIN, "--output-dir", out] + [x for b in binds for x in ("--bind", b)])
    rows, last, step_s = last_step(out)
    ckpt = os.path.join(out, "checkpoints", f"step_{last:08d}")
    return dict(loss={k: r["loss"] for k, r in rows.items()}, step_s=round(step_s, 2), runtime_rss_bytes=runtime,
                tokens_per_s=t["batch"] * t["seq_len"] / step_s, disk_bytes=disk_bytes(ckpt),
                notes=f"batch {t['batch']} × L {t['seq_len']}, k 8, n_y 4, backbone + attention head trained")


def phase_sweep(profile, work):
    sys.path.insert(0, os.path.join(REPO, "benchmarks"))
    import owt_sweep

    sw, t = profile["sweep"], profile["train"]
    head = os.path.join(work, "train", "checkpoints", f"step_{t['steps']:08d}", "weights.safetensors")
    out = os.path.join(work, "sweep")
    argv = ["--mdm", os.path.join(work, "mdlm_prism.safetensors"), "--head", head, "--mdm-gin", OWT_MDM_GIN,
            "--prism-gin", OWT_PRISM_GIN, "--nfe", str(sw["nfe"]), "--samplers", "mdlm", "prism",
            "--n", str(sw["n"]), "--batch-size", str(sw["n"]), "--metrics", *sw["metrics"], "--out", out,
            "--samples-at", str(sw["nfe"]), "--resume"]  # a cell already scored is kept
    argv += [x for b in owt_binds(profile, work) for x in ("--bind", b)]
    owt_sweep.main(argv)
    with open(os.path.join(out, "owt_sweep.json")) as f:
        res = json.load(f)
    cells = {k: dict(metrics=c["metrics"], seconds=round(c["seconds"], 1), nfe=c["nfe"],
                     tokens_per_s=sw["n"] * t["seq_len"] / c["seconds"]) for k, c in res["configs"].items()}
    main_cell = cells[f"prism@{sw['nfe']}"]
    return dict(cells=cells, tokens_per_s=main_cell["tokens_per_s"],
                notes="; ".join(f"{k}: {c['seconds']:.0f} s, MAUVE / Gen PPL / entropy " + " / ".join(
                    "–" if c["metrics"].get(m) is None else f"{c['metrics'][m]:.3g}" for m in ("mauve", "gen_ppl", "entropy"))
                    for k, c in cells.items()))


