"""``train``: one Accelerate training loop for one process, DDP, FSDP (1 and 2) and DeepSpeed ZeRO-1/2/3.

AdamW, transformers schedulers (constant / cosine, with warmup), gradient accumulation through
``accelerator.accumulate`` (so DeepSpeed steps its engine once per optimizer step), clipping, an
optional EMA, mixed precision where the device supports it, per-(seed, rank, step) randomness (so a
resumed run reproduces the same losses and each rank sees its own data), atomic checkpoints with
``accelerator.save_state`` plus gathered weights (``accelerator.get_state_dict``, collective), metrics
to ``metrics.jsonl`` (and to trackers when asked). A non-finite loss or gradient never reaches the
weights: the run stops (or skips the step, ``on_nonfinite = 'skip'``) and no checkpoint is written
from non-finite weights, so the last good one is never rotated out for a bad one.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from typing import Dict, List, Optional

import gin
import numpy as np
from accelerate.utils import broadcast_object_list
import torch
from safetensors import safe_open
from torch import nn

from prism.adapters import has_adapter, parameter_report
from prism.checkpoint import (ADAPTER_KEY, WEIGHTS, checkpoint_dirs, commit_checkpoint, file_metadata, list_checkpoints,
                              load_ema, write_checkpoint_weights)
from prism.distributed import EMA, all_finite, as_scalar, canonical_name, layout, ranks_in_sync
from prism.experiment import Experiment
from prism.runlog import append_row, keep_rows_up_to, read_rows


def step_generator(seed: int, step: int, index: int = 0, domain: int = 0) -> torch.Generator:
    """A CPU generator whose state is a pure function of (seed, step, index, domain); domain 0 is
    training, 1 is sampling / evaluation (step = batch index there).

    Training uses index = micro_step * num_processes + rank, so every rank and micro-step gets its
    own data and noise, a resumed run replays the same stream, and N processes × 1 micro-step see
    exactly the batches of 1 process × N accumulation micro-steps."""
    state = np.random.SeedSequence([seed, step, index, domain]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class TrainModule(nn.Module):
    """Model and loss in ONE module, so DDP sees every backbone pass of a step in one forward."""

    def __init__(self, model: nn.Module, loss: nn.Module):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, batch, generator):
        out = self.loss(self.model, batch, generator)
        return out.loss, out.logs


class NonFiniteError(RuntimeError):
    """A loss, gradient or weight turned NaN or inf; raised on every rank at the same step."""


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


def save_checkpoint(accelerator, output_dir: str, step: int, module: nn.Module, model: nn.Module,
                    ema: Optional[EMA], keep: int, extra: dict, only=None) -> str:
    """``accelerator.save_state`` (each rank its part) and the gathered ``weights.safetensors`` (EMA
    values when the run keeps an EMA; ``prism.checkpoint.write_checkpoint_weights``) into a temporary
    directory, then an atomic rename: a crash while saving leaves the previous checkpoint intact and
    never a half-written one that looks complete. Refuses weights that are not finite, before touching
    any checkpoint. Every rank must call it (gathering sharded weights is collective). ``only``: the
    names of the weights to write (``weights_to_save``; None: all)."""
    if not all_finite(accelerator, model):
        raise NonFiniteError(f"step {step}: the weights hold NaN or inf; no checkpoint was written and the "
                             f"earlier ones in {output_dir}/checkpoints are untouched")
    tmp, final = checkpoint_dirs(output_dir, step)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    write_checkpoint_weights(accelerator, module, model, ema, tmp, only=only)
    if accelerator.is_main_process:
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump({"step": step, **extra}, f)
        commit_checkpoint(tmp, final, output_dir, keep)
    accelerator.wait_for_everyone()
    return final


def stop_if_not_finite(accelerator, loss: torch.Tensor, step: int, output_dir: str) -> None:
    """Under DeepSpeed (whose engine steps inside backward): stop on every rank before the backward
    of a non-finite loss."""
    bad = (~torch.isfinite(loss.float())).float().reshape(1)
    if float(accelerator.reduce(bad, "sum").item()) > 0:
        kept = list_checkpoints(output_dir)
        raise NonFiniteError(f"step {step + 1}: the loss is not finite ({float(loss):.4g} on rank {accelerator.process_index}); "
                             f"training stopped before the update. The last checkpoint ({kept[-1] if kept else 'none yet'}) is intact.")


class LogWindow:
    """Sums of the logged values since the last log row. Saved in every checkpoint (reduced over
    ranks), so a run resumed from a checkpoint in the middle of a window logs what the
    uninterrupted run logs, whatever ``save_every`` and ``log_every`` are."""

    def __init__(self, device, state: Optional[dict] = None):
        state = state or {}
        self.device = device
        self.sums = {k: torch.tensor(v, dtype=torch.float32, device=device) for k, v in state.get("sums", {}).items()}
        self.n, self.seqs = state.get("n", 0), 0  # sequences/s is measured from the resume on

    def add(self, values: Dict[str, torch.Tensor]) -> None:
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v.detach().float().to(self.device)

    def reduced_means(self, accelerator) -> Dict[str, float]:
        keys = sorted(self.sums)
        if not keys:
            return {}
        values = accelerator.reduce(torch.stack([self.sums[k] for k in keys]).to(self.device), "mean") / max(self.n, 1)
        return {k: float(v) for k, v in zip(keys, values.tolist())}

    def state(self, accelerator) -> dict:
        keys = sorted(self.sums)
        sums = accelerator.reduce(torch.stack([self.sums[k] for k in keys]).to(self.device), "mean").tolist() if keys else []
        return {"sums": dict(zip(keys, sums)), "n": self.n}


@gin.configurable("train")
def train(
    exp: Experiment,
    accelerator,
    output_dir: str,
    resume: bool = False,
    steps: int = 1000,
    batch_size: int = 64,
    grad_accum: int = 1,
    lr: float = 3e-4,
    weight_decay: float = 0.0,
    betas=(0.9, 0.999),
    lr_schedule: str = "constant",
    warmup_steps: int = 0,
    max_grad_norm: Optional[float] = 1.0,
    ema_decay: float = 0.0,
    log_every: int = 50,
    save_every: int = 500,
    keep_checkpoints: int = 2,
    num_threads: Optional[int] = None,
    compile: bool = False,
    max_minutes: Optional[float] = None,
    on_nonfinite: str = "stop",
    max_skipped_in_a_row: int = 10,
    save_weights: str = "auto",
) -> Dict[str, float]:
    """Train ``exp.model`` with ``exp.loss`` on ``exp.task`` batches.

    ``batch_size`` is per process and micro-step: one optimizer step sees
    batch_size × grad_accum × num_processes sequences. ``max_minutes`` stops early (with a
    checkpoint) so a long recipe can run in slices and resume. ``on_nonfinite``: 'stop' (raise
    ``NonFiniteError`` before the bad update) or 'skip' (drop the update, count it in ``skipped``;
    stop after ``max_skipped_in_a_row``). ``save_weights``: what a checkpoint holds, 'all' weights,
    'trainable' only the parameters that train (a LoRA run: the LoRA weights and the head; resume
    loads them onto the base weights the experiment builds), or 'auto' (trainable when the model holds
    an adapter, else all). ``max_grad_norm = None`` still measures the norm (to log and
    check it) without clipping. Returns the last logged metrics."""
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    if exp.loss is None:
        raise ValueError("train needs experiment.loss (e.g. experiment.loss = @losses.mdlm())")
    if on_nonfinite not in ("stop", "skip"):
        raise ValueError(f"train.on_nonfinite = {on_nonfinite!r}: use 'stop' or 'skip'")
    kind = layout(accelerator)
    if on_nonfinite == "skip" and (kind.startswith("zero") or accelerator.mixed_precision == "fp16"):
        raise ValueError(f"train.on_nonfinite = 'skip' is not available under {'DeepSpeed' if kind.startswith('zero') else 'fp16'} "
                         "(DeepSpeed steps inside backward; fp16's loss scaler skips overflowing steps itself): use 'stop'")
    if ema_decay > 0 and not EMA.supported(accelerator):
        raise ValueError(f"train.ema_decay = {ema_decay} is not supported under {kind} (its parameters are "
                         "flat shards the EMA cannot follow): set train.ema_decay = 0.0, or use FSDP2 "
                         "(fsdp_version: 2 in the accelerate config), DDP or ZeRO-1/2")
    if num_threads:
        torch.set_num_threads(num_threads)
    model = exp.model
    only = weights_to_save(model, save_weights)
    accelerator.print(f"parameters: {parameter_report(model)}")
    module = TrainModule(model, exp.loss)
    accelerator.gradient_accumulation_steps = grad_accum
    optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=lr,
                                  weight_decay=weight_decay, betas=tuple(betas))
    scheduler = get_scheduler(lr_schedule, optimizer, num_warmup_steps=warmup_steps, num_training_steps=steps)
    if compile:
        module = torch.compile(module)
    if kind.startswith("fsdp"):  # FSDP2 would otherwise hold unsharded gradients between micro-steps
        accelerator.gradient_state.plugin_kwargs.update(sync_each_batch=True)
    if kind.startswith("zero"):  # gin is the one source of these: what DeepSpeed's engine is built with
        accelerator.state.deepspeed_plugin.deepspeed_config.update(
            train_micro_batch_size_per_gpu=batch_size, gradient_accumulation_steps=grad_accum,
            gradient_clipping=max_grad_norm or 0.0)
    module, optimizer, scheduler = accelerator.prepare(module, optimizer, scheduler)
    # the state save_state writes holds only the trained weights too (the frozen base is not copied per checkpoint)
    hook = accelerator.register_save_state_pre_hook(keep_trainable_hook) if only is not None else None
    ema = EMA(model, ema_decay) if ema_decay > 0 else None  # after prepare: beside each (sharded) parameter

    device = accelerator.device
    metrics_path = os.path.join(output_dir, "metrics.jsonl")
    start, elapsed_before, window_state = 0, 0.0, None  # elapsed_s in the logs counts all slices
    # the main process picks the checkpoint (a lagging file system must not give ranks different steps)
    ckpts = broadcast_object_list([list_checkpoints(output_dir)[-1:] if resume else []])[0]
    if ckpts:
        accelerator.load_state(ckpts[-1], **resume_load_kwargs(module, ckpts[-1]))
        if ema is not None:
            load_ema(ema, ckpts[-1], accelerator)
        with open(os.path.join(ckpts[-1], "trainer_state.json")) as f:
            state = json.load(f)
        start, elapsed_before, window_state = state["step"], state.get("elapsed_s", 0.0), state.get("log_window")
        accelerator.print(f"resumed from {ckpts[-1]} at step {start}")
    elif resume:
        accelerator.print(f"--resume: no checkpoint in {output_dir}/checkpoints, starting at step 0")
    accelerator.step = 0  # Accelerate's micro-step counter: checkpoints sit on optimizer-step boundaries
    read_rows(metrics_path)  # on every rank: a broken file fails them all, not the main process alone
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:  # rows logged after the checkpoint (or by a run killed before its first one)
        keep_rows_up_to(metrics_path, start)
    accelerator.wait_for_everyone()

    rank, world = accelerator.process_index, accelerator.num_processes
    window = LogWindow(device, window_state)
    last: Dict[str, float] = {}
    t_start = t_log = time.time()
    bar = tqdm(total=steps, initial=start, disable=not accelerator.is_local_main_process, desc="train", dynamic_ncols=True)
    module.train()
    step, skipped_in_row, stopped_early, saving_s = start, 0, False, 0.0
    no_clip = float("inf")
    while step < steps:
        values: Dict[str, torch.Tensor] = {}
        for micro in range(grad_accum):
            g = step_generator(exp.seed, step, micro * world + rank)
            batch = {k: v.to(device) for k, v in exp.task.train_batch(batch_size, g).items()}
            with accelerator.accumulate(module):  # no_sync until the last micro-step; loss / grad_accum
                with accelerator.autocast():
                    loss, logs = module(batch, g)
                if kind.startswith("zero"):  # DeepSpeed steps its engine inside backward: check first
                    stop_if_not_finite(accelerator, loss.detach(), step, output_dir)
                accelerator.backward(loss)
            for k, v in {"loss": loss.detach(), **logs}.items():
                values[k] = values.get(k, 0.0) + v.detach().float().to(device) / grad_accum
        if not accelerator.sync_gradients:
            raise RuntimeError("gradient accumulation fell out of step with Accelerate's micro-step counter")
        norm = as_scalar(accelerator.clip_grad_norm_(module.parameters(), max_grad_norm or no_clip), device)
        if norm is not None:
            values["grad_norm"] = norm
        # under fp16 an overflowing gradient is the loss scaler's to skip; the loss itself must be finite
        grad_checked = values.get("grad_norm") if accelerator.mixed_precision != "fp16" else None
        check = torch.stack([values["loss"], grad_checked if grad_checked is not None else torch.zeros((), device=device)])
        finite = bool(torch.isfinite(accelerator.reduce(check, "sum")).all())  # every rank decides alike
        if finite:
            optimizer.step()
            skipped_in_row = 0
        else:
            skipped_in_row += 1
            what = f"loss {float(values['loss']):.4g}, gradient norm {float(values.get('grad_norm', float('nan'))):.4g} on rank {rank}"
            kept = list_checkpoints(output_dir)
            if on_nonfinite == "stop" or skipped_in_row > max_skipped_in_a_row:
                raise NonFiniteError(
                    f"step {step + 1}: not finite ({what}); training stopped before the update. The last checkpoint "
                    f"({kept[-1] if kept else 'none yet'}) is intact. Lower train.lr or check the data; "
                    f"train.on_nonfinite = 'skip' skips such steps (at most train.max_skipped_in_a_row = {max_skipped_in_a_row} in a row).")
            accelerator.print(f"step {step + 1}: not finite ({what}); update skipped")
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None and finite:
            ema.update(model)
        step += 1
        if finite:
            window.add(values)
            window.n += 1
        else:
            window.add({"skipped": torch.ones((), device=device)})
        window.seqs += batch_size * grad_accum * world
        bar.update(1)

        if step % log_every == 0 or step == steps:
            now = time.time()
            last = window.reduced_means(accelerator)
            if "skipped" in last:
                last["skipped"] *= max(window.n, 1)  # a count, not a mean
            last.update(step=step, lr=scheduler.get_last_lr()[0], seqs_per_s=window.seqs / max(now - t_log, 1e-9),
                        elapsed_s=elapsed_before + now - t_start, checkpoint_s=saving_s)
            saving_s = 0.0
            if accelerator.is_main_process:
                append_row(metrics_path, last)
                bar.set_postfix({k: f"{last[k]:.4g}" for k in ("loss", "masked_ce") if k in last})
            accelerator.log(last, step=step)
            window, t_log = LogWindow(device), now
        out_of_time = False
        if max_minutes is not None and step % log_every == 0:
            # Checked at log boundaries only; the main process's clock decides, so all ranks stop together.
            late = accelerator.is_main_process and (time.time() - t_start) > 60 * max_minutes
            out_of_time = bool(accelerator.reduce(torch.tensor([float(late)], device=device), "sum").item())
        if step % save_every == 0 or step == steps or out_of_time:
            t_save = time.time()
            save_checkpoint(accelerator, output_dir, step, module, model, ema, keep_checkpoints,
                            {"world_size": world, "layout": kind, "elapsed_s": elapsed_before + time.time() - t_start,
                             "metrics": last, "log_window": window.state(accelerator)}, only=only)
            saving_s += time.time() - t_save  # logged with the next row: Δ elapsed_s − checkpoint_s = steps alone
        if out_of_time:
            accelerator.print(f"max_minutes={max_minutes} reached at step {step}; resume with --resume")
            stopped_early = True
            break
    bar.close()
    if hook is not None:
        hook.remove()
    in_sync = ranks_in_sync(accelerator, model)
    last["ranks_in_sync"] = None if in_sync is None else float(in_sync)
    last["stopped_early"] = float(stopped_early)
    if ema is not None:  # evaluate / sample with the averaged weights, as the checkpoint ships them
        ema.copy_to(model)
    return last
