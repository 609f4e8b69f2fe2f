"""Export the latest (or a given) checkpoint of a training run as a standalone weights file.

    python -m prism.export runs/sudoku_mdm weights/sudoku/mdm.safetensors [--step N] [--only 'head.*' ...] [--dtype bfloat16]
    python -m prism.export runs/llada_lora out.safetensors --merge

Writes OUT (the checkpoint's ``weights.safetensors``: EMA weights when the run used EMA) and
OUT with ``.json`` in place of ``.safetensors``: the step, the run's last logged metrics, the run
information (versions, git commit, processes) and the operative gin config it was trained with.
Both files are written to temporary names and renamed into place. ``--only`` keeps the weights whose
names match the patterns (an adapter-only file, for ``experiment.init_adapter``); ``--dtype`` casts
floating-point weights. ``--merge`` rebuilds the run's model from the gin config it was trained with
(its base weights from ``experiment.init_checkpoint``, its adapter), loads the checkpoint (a LoRA run's
holds only the LoRA weights and the head) and writes full weights with every LoRA layer folded in
(W + (alpha / rank)·B·A, ``prism.adapters.lora.merge_lora``): plain names that load into the same model
built without ``experiment.adapter``. ``--hub`` writes OUT as a folder in the Hugging Face Hub's shape
(``prism.hub_adapter``): ``peft.PeftModel.from_pretrained`` loads it onto the released base model, the
quality head and a model card beside; ``experiment.init_adapter = OUT`` (or its Hub id) loads it back.

    python -m prism.export runs/sft/llada_lora_prism adapters/llada-prism --hub
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from prism.checkpoint import copy_weights
from prism.training.checkpoints import RunDir
from prism.paths import write_text_atomic


def merge_checkpoint(run_dir: str, ckpt: str, out: str, config: str, dtype: str | None = None, user_dirs=()) -> int:
    """Build the run's experiment from ``config`` (gin text), load ``ckpt`` onto it, merge its LoRA
    layers and write the full weights to ``out``; returns how many layers were merged. Replaces the
    process's gin config."""
    import gin

    from prism.adapters.lora import merge_lora
    from prism.checkpoint import ADAPTER_KEY, file_metadata, load_weights, resolve_weights_path, save_weights
    from prism.experiment import build_experiment
    from registry import import_user_dir, load_builtin_components

    load_builtin_components()
    for d in user_dirs:
        import_user_dir(d)
    gin.clear_config()
    gin.parse_config(config)
    model = build_experiment().model
    load_weights(model, ckpt, adapter=ADAPTER_KEY in file_metadata(resolve_weights_path(ckpt)))
    merged = merge_lora(model)
    save_weights(model.state_dict(), model, out, dtype=dtype)
    return merged


def export(run_dir: str, out: str, step: int | None = None, only: list | None = None, dtype: str | None = None,
           merge: bool = False, hub: bool = False) -> dict:
    run = RunDir(run_dir)
    ckpts = run.checkpoints()
    if step is not None:
        ckpts = [c for c in ckpts if c.endswith(f"{step:08d}")]
    if not ckpts:
        raise SystemExit(f"no {'checkpoint at step ' + str(step) if step else 'checkpoint'} in {run_dir}/checkpoints")
    ckpt = ckpts[-1]
    state = run.state(ckpt)
    if (merge or hub) and only or (merge and hub):
        raise SystemExit("--merge (full weights) and --hub (a peft adapter folder) go with neither each other nor --only")
    meta = {"source": os.path.relpath(ckpt), **state,
            **{k: v for k, v in (("only", only), ("dtype", dtype), ("merged", merge)) if v}}
    if os.path.exists(run.run_info("train")):
        with open(run.run_info("train")) as f:
            meta["run_info"] = json.load(f)
    # the operative config is written when a training command ends; a run stopped from outside
    # (or still going) has only the full parsed config written at its start
    for key, path in (("operative_config", run.config("train", operative=True)), ("config", run.config("train"))):
        if os.path.exists(path):
            with open(path) as f:
                meta[key] = f.read()
    if hub:
        if "config" not in meta:
            raise SystemExit(f"--hub needs the run's gin config ({run_dir}/train_config.gin) for the LoRA settings")
        from prism.hub_adapter import settings_from_config, write_hub_folder

        s = settings_from_config(meta["config"])
        write_hub_folder(os.path.join(ckpt, "weights.safetensors"), out, s["lora"], s["backbone"], s["base_model"],
                         meta.get("operative_config", meta["config"]), meta)
        return meta
    if merge:
        if "config" not in meta:
            raise SystemExit(f"--merge needs the run's gin config ({run_dir}/train_config.gin) to rebuild its model")
        meta["merged_layers"] = merge_checkpoint(run_dir, ckpt, out, meta["config"], dtype,
                                                 meta.get("run_info", {}).get("user_dirs", []))
    else:
        copy_weights(ckpt, out, only=only, dtype=dtype)
    write_text_atomic(os.path.splitext(out)[0] + ".json", json.dumps(meta, indent=2))
    return meta


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir")
    p.add_argument("out")
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--only", action="append", default=None, help="a pattern of weight names to keep (repeatable)")
    p.add_argument("--dtype", default=None, help="cast floating-point weights, e.g. bfloat16")
    p.add_argument("--merge", action="store_true", help="fold a LoRA run's adapter into full weights (rebuilds its model)")
    p.add_argument("--hub", action="store_true", help="OUT is a folder peft loads (adapter_config.json + "
                   "adapter_model.safetensors), the quality head and a model card beside")
    args = p.parse_args(argv)
    meta = export(args.run_dir, args.out, args.step, only=args.only, dtype=args.dtype, merge=args.merge, hub=args.hub)
    print(f"exported step {meta['step']} of {args.run_dir} to {args.out}")


if __name__ == "__main__":
    sys.exit(main())
