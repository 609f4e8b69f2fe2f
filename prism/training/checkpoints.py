"""A run's directory and its checkpoints: ``RunDir`` alone knows the layout, and the checkpoint writes
and reads of a training run (collective where weights are sharded) go through here.

    <run>/checkpoints/step_XXXXXXXX/       a complete checkpoint (trainer_state.json marks it complete):
                                           accelerate's state + weights.safetensors (+ each rank's EMA)
    <run>/checkpoints/.tmp-step_XXXXXXXX/  one being written (renamed into place when complete)
    <run>/metrics.jsonl                    the training log (``prism.training.runlog``)
    <run>/<command>_config.gin             the gin config a command parsed (train, sample, eval);
    <run>/<command>_operative_config.gin   the part it used; <run>/<command>_run_info.json versions, processes
    <run>/<command>_result.json            what the command returned; <run>/<command>_results.md its table
    <run>/metrics.json, samples*.jsonl     what eval wrote (samples*.jsonl: prism.evaluation.evaluate)
"""
from __future__ import annotations

import json
import os
import shutil
from typing import List, Optional

import torch

from safetensors import safe_open
from torch import nn

from prism.adapters import has_adapter
from prism.checkpoint import (ADAPTER_KEY, WEIGHTS, Patterns, file_metadata, load_weights, parameter_aliases,
                              resolve_weights_path, save_weights)
from prism.training.distributed import EMA, all_finite, canonical_name, weights_sharded

CKPT_PREFIX = "step_"
STATE = "trainer_state.json"


class RunDir:
    """The layout of a run's output directory (see the module docstring)."""

    def __init__(self, path: str):
        self.path = path

    @property
    def checkpoints_root(self) -> str:
        return os.path.join(self.path, "checkpoints")

    @property
    def metrics(self) -> str:
        return os.path.join(self.path, "metrics.jsonl")

    def config(self, command: str, operative: bool = False) -> str:
        return os.path.join(self.path, f"{command}_{'operative_' if operative else ''}config.gin")

    def run_info(self, command: str) -> str:
        return os.path.join(self.path, f"{command}_run_info.json")

    def result(self, command: str) -> str:
        """What the command returned (the training summary, the metrics, the table) as JSON."""
        return os.path.join(self.path, f"{command}_result.json")

    def results_table(self, command: str) -> str:
        return os.path.join(self.path, f"{command}_results.md")

    @property
    def eval_metrics(self) -> str:
        return os.path.join(self.path, "metrics.json")

    def checkpoints(self) -> List[str]:
        """Complete checkpoints (directories with trainer_state.json), oldest first."""
        root = self.checkpoints_root
        if not os.path.isdir(root):
            return []
        found = []
        for name in os.listdir(root):
            path = os.path.join(root, name)
            if name.startswith(CKPT_PREFIX) and os.path.exists(os.path.join(path, STATE)):
                found.append((int(name[len(CKPT_PREFIX):]), path))
        return [p for _, p in sorted(found)]

    def checkpoint(self, step: int) -> str:
        return os.path.join(self.checkpoints_root, f"{CKPT_PREFIX}{step:08d}")

    def staging(self, step: int) -> str:
        return os.path.join(self.checkpoints_root, f".tmp-{CKPT_PREFIX}{step:08d}")

    def state(self, ckpt: str) -> dict:
        with open(os.path.join(ckpt, STATE)) as f:
            return json.load(f)

    def write_state(self, directory: str, state: dict) -> None:
        with open(os.path.join(directory, STATE), "w") as f:
            json.dump(state, f)

    def commit(self, step: int, keep: int) -> str:
        """Rename the finished checkpoint at ``step`` into place, then drop all but the newest ``keep``
        (main process)."""
        final = self.checkpoint(step)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(self.staging(step), final)
        for old in self.checkpoints()[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def clear_training(self) -> None:
        """Remove the checkpoints and the training log (``run.py train --overwrite``)."""
        shutil.rmtree(self.checkpoints_root, ignore_errors=True)
        if os.path.exists(self.metrics):
            os.remove(self.metrics)


class NonFiniteWeights(RuntimeError):
    """The weights turned NaN or inf: no checkpoint is written (``prism.training.loop.NonFiniteError``
    derives from it)."""


def list_checkpoints(output_dir: str) -> List[str]:
    """``RunDir(output_dir).checkpoints()``: complete checkpoints, oldest first."""
    return RunDir(output_dir).checkpoints()


def write_checkpoint_weights(accelerator, module: torch.nn.Module, model: torch.nn.Module, ema, directory: str, *,
                             dtype=None, only: Optional[Patterns] = None) -> None:
    """``weights.safetensors`` (the EMA values when the run keeps an EMA) and each rank's EMA file into
    ``directory``. Every rank must call it: gathering sharded weights and averages is collective.
    ``module`` is the prepared training module (its ``model.`` entries are the weights)."""
    # the whole model on the main process: collective where weights are sharded, else the main process's own
    state = accelerator.get_state_dict(module) if weights_sharded(accelerator) or accelerator.is_main_process else None
    shadow = ema.full_shadow(accelerator) if ema is not None else None  # collective under FSDP2
    if ema is not None:
        ema.save(directory, accelerator)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        weights = {}
        for k, v in state.items():
            k = canonical_name(k)  # without torch.compile's or activation checkpointing's wrapper names
            if k.startswith("model."):
                weights[k[len("model."):]] = v
        if ema is not None:
            weights = ema.weights(weights, parameter_aliases(model), shadow)
        save_weights(weights, model, os.path.join(directory, WEIGHTS), dtype=dtype, only=only)


def load_ema(ema: EMA, ckpt: str, accelerator) -> None:
    """Restore the EMA of a checkpoint (each rank its file)."""
    ema.load(ckpt, accelerator)


def load_latest(model: torch.nn.Module, output_dir: str) -> Optional[str]:
    """Load the weights of a run's latest checkpoint (an adapter-only one onto the model's current
    weights); returns its directory, or None when the run has none."""
    ckpts = list_checkpoints(output_dir)
    if not ckpts:
        return None
    adapter = ADAPTER_KEY in file_metadata(resolve_weights_path(ckpts[-1]))
    load_weights(model, ckpts[-1], adapter=adapter)
    return ckpts[-1]


def weights_to_save(model: torch.nn.Module, mode: str) -> Optional[List[str]]:
    """``train.save_weights``: 'all' → None (every weight); 'trainable' → the names of the parameters
    that train (an adapter-only checkpoint: a LoRA run's LoRA weights and head); 'auto' → 'trainable'
    when the model holds an adapter (``prism.adapters``), else 'all'."""
    if mode not in ("all", "trainable", "auto"):
        raise ValueError(f"train.save_weights = {mode!r}: use 'all', 'trainable' or 'auto'")
    if mode == "all" or (mode == "auto" and not has_adapter(model)):
        return None
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise ValueError("train.save_weights = 'trainable', but no parameter of the model trains")
    return names


def keep_trainable_hook(models, weights, output_dir) -> None:
    """An ``accelerator.register_save_state_pre_hook``: the model state ``save_state`` writes keeps only
    the parameters that train (frozen base weights come from ``experiment.init_checkpoint`` again on
    resume). Under FSDP / DeepSpeed, which write their own model files, ``weights`` is empty."""
    for module, state in zip(models, weights):
        keep = {n for n, p in module.named_parameters(remove_duplicate=False) if p.requires_grad}
        for key in [k for k in state if k not in keep]:
            del state[key]


def resume_load_kwargs(module: torch.nn.Module, ckpt: str) -> dict:
    """Keyword arguments for ``accelerator.load_state(ckpt)``: ``strict=False`` for a checkpoint written
    with only the trainable weights (its ``weights.safetensors`` is marked adapter-only), after checking
    that every key in its model file names a weight of ``module`` and that every parameter that trains
    is there; {} (a strict load) otherwise."""
    model_file = os.path.join(ckpt, "model.safetensors")  # accelerate's own model file (none under FSDP / DeepSpeed)
    weights_file = os.path.join(ckpt, WEIGHTS)
    if not (os.path.exists(model_file) and os.path.exists(weights_file) and ADAPTER_KEY in file_metadata(weights_file)):
        return {}
    def plain(name: str) -> str:  # DDP's 'module.' and compile's wrapper names: the file and the module disagree
        name = canonical_name(name)
        return name[len("module."):] if name.startswith("module.") else name

    with safe_open(model_file, framework="pt") as f:
        keys = {plain(k) for k in f.keys()}
    unexpected = sorted(keys - {plain(n) for n in module.state_dict()})
    absent = sorted(plain(n) for n, p in module.named_parameters() if p.requires_grad and plain(n) not in keys)
    if unexpected or absent:
        raise ValueError(f"checkpoint {ckpt} (trainable weights only) does not fit the model: keys that name no weight: "
                         f"{unexpected[:8]}; trained parameters it lacks: {absent[:8]}. Resume with the adapter, "
                         "trainable patterns and model sizes the run was started with.")
    return {"strict": False}


def save_checkpoint(accelerator, run: RunDir, step: int, module: nn.Module, model: nn.Module,
                    ema: Optional[EMA], keep: int, extra: dict, only=None) -> str:
    """``accelerator.save_state`` (each rank its part) and the gathered ``weights.safetensors`` (EMA
    values when the run keeps an EMA; ``write_checkpoint_weights``) into a temporary
    directory, then an atomic rename: a crash while saving leaves the previous checkpoint intact and
    never a half-written one that looks complete. Refuses weights that are not finite, before touching
    any checkpoint. Every rank must call it (gathering sharded weights is collective). ``only``: the
    names of the weights to write (``weights_to_save``; None: all)."""
    if not all_finite(accelerator, model):
        raise NonFiniteWeights(f"step {step}: the weights hold NaN or inf; no checkpoint was written and the "
                               f"earlier ones in {run.checkpoints_root} are untouched")
    tmp, final = run.staging(step), run.checkpoint(step)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    write_checkpoint_weights(accelerator, module, model, ema, tmp, only=only)
    if accelerator.is_main_process:
        run.write_state(tmp, {"step": step, **extra})
        run.commit(step, keep)
    accelerator.wait_for_everyone()
    return final
