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

import time
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import gin
import numpy as np
import torch
from accelerate.utils import broadcast_object_list
from torch import nn

from prism.adapters import parameter_report
from prism.experiment import Experiment
from prism.training.checkpoints import (NonFiniteWeights, RunDir, keep_trainable_hook, load_ema, resume_load_kwargs,
                                        save_checkpoint, weights_to_save)
from prism.training.distributed import EMA, as_scalar, layout, ranks_in_sync
from prism.training.runlog import append_row, keep_rows_up_to, read_rows


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


class NonFiniteError(NonFiniteWeights):
    """A loss, gradient or weight turned NaN or inf; raised on every rank at the same step."""


def stop_if_not_finite(accelerator, loss: torch.Tensor, step: int, run: RunDir) -> None:
    """Under DeepSpeed (whose engine steps inside backward): stop on every rank before the backward
    of a non-finite loss."""
    bad = (~torch.isfinite(loss.float())).float().reshape(1)
    if float(accelerator.reduce(bad, "sum").item()) > 0:
        kept = run.checkpoints()
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


@dataclass
class TrainOptions:
    """``train``'s gin options (see ``train``)."""

    steps: int
    batch_size: int
    grad_accum: int
    lr: float
    weight_decay: float
    betas: Tuple[float, float]
    lr_schedule: str
    warmup_steps: int
    max_grad_norm: Optional[float]
    ema_decay: float
    log_every: int
    save_every: int
    keep_checkpoints: int
    num_threads: Optional[int]
    compile: bool
    max_minutes: Optional[float]
    on_nonfinite: str
    max_skipped_in_a_row: int
    save_weights: str


class Trainer:
    """One training run: ``setup`` (checks, optimizer, scheduler, ``accelerator.prepare``, EMA),
    ``resume`` (the latest checkpoint, the log trimmed to it), ``optimizer_step`` (micro-steps, the
    finite check, the update), ``log`` (a metrics row), ``checkpoint``; ``run`` drives them."""

    def __init__(self, exp: Experiment, accelerator, run: RunDir, opts: TrainOptions):
        self.exp, self.accelerator, self.run_dir, self.o = exp, accelerator, run, opts
        self.kind = layout(accelerator)
        self.check_options()  # before anything else is asked of the accelerator
        self.device = accelerator.device
        self.rank, self.world = accelerator.process_index, accelerator.num_processes

    def check_options(self) -> None:
        o, kind = self.o, self.kind
        if self.exp.loss is None:
            raise ValueError("train needs experiment.loss (e.g. experiment.loss = @losses.mdlm())")
        if o.on_nonfinite not in ("stop", "skip"):
            raise ValueError(f"train.on_nonfinite = {o.on_nonfinite!r}: use 'stop' or 'skip'")
        if o.on_nonfinite == "skip" and (kind.startswith("zero") or self.accelerator.mixed_precision == "fp16"):
            raise ValueError(f"train.on_nonfinite = 'skip' is not available under {'DeepSpeed' if kind.startswith('zero') else 'fp16'} "
                             "(DeepSpeed steps inside backward; fp16's loss scaler skips overflowing steps itself): use 'stop'")
        if o.ema_decay > 0 and not EMA.supported(self.accelerator):
            raise ValueError(f"train.ema_decay = {o.ema_decay} is not supported under {kind} (its parameters are "
                             "flat shards the EMA cannot follow): set train.ema_decay = 0.0, or use FSDP2 "
                             "(fsdp_version: 2 in the accelerate config), DDP or ZeRO-1/2")

    def setup(self) -> None:
        from transformers import get_scheduler

        o, acc, model = self.o, self.accelerator, self.exp.model
        if o.num_threads:
            torch.set_num_threads(o.num_threads)
        self.only = weights_to_save(model, o.save_weights)
        acc.print(f"parameters: {parameter_report(model)}")
        module = TrainModule(model, self.exp.loss)
        acc.gradient_accumulation_steps = o.grad_accum
        optimizer = torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=o.lr,
                                      weight_decay=o.weight_decay, betas=tuple(o.betas))
        scheduler = get_scheduler(o.lr_schedule, optimizer, num_warmup_steps=o.warmup_steps, num_training_steps=o.steps)
        if o.compile:
            module = torch.compile(module)
        if self.kind.startswith("fsdp"):  # FSDP2 would otherwise hold unsharded gradients between micro-steps
            acc.gradient_state.plugin_kwargs.update(sync_each_batch=True)
        if self.kind.startswith("zero"):  # gin is the one source of these: what DeepSpeed's engine is built with
            acc.state.deepspeed_plugin.deepspeed_config.update(
                train_micro_batch_size_per_gpu=o.batch_size, gradient_accumulation_steps=o.grad_accum,
                gradient_clipping=o.max_grad_norm or 0.0)
        self.module, self.optimizer, self.scheduler = acc.prepare(module, optimizer, scheduler)
        # the state save_state writes holds only the trained weights too (the frozen base is not copied per checkpoint)
        self.hook = acc.register_save_state_pre_hook(keep_trainable_hook) if self.only is not None else None
        self.ema = EMA(model, o.ema_decay) if o.ema_decay > 0 else None  # after prepare: beside each (sharded) parameter

    def resume(self, resume: bool) -> Tuple[int, float, Optional[dict]]:
        """(start step, elapsed seconds before, the log window) from the latest checkpoint when ``resume``;
        the log rows after that checkpoint are dropped."""
        acc, run = self.accelerator, self.run_dir
        start, elapsed_before, window_state = 0, 0.0, None  # elapsed_s in the logs counts all slices
        # the main process picks the checkpoint (a lagging file system must not give ranks different steps)
        ckpts = broadcast_object_list([run.checkpoints()[-1:] if resume else []])[0]
        if ckpts:
            acc.load_state(ckpts[-1], **resume_load_kwargs(self.module, ckpts[-1]))
            if self.ema is not None:
                load_ema(self.ema, ckpts[-1], acc)
            state = run.state(ckpts[-1])
            start, elapsed_before, window_state = state["step"], state.get("elapsed_s", 0.0), state.get("log_window")
            acc.print(f"resumed from {ckpts[-1]} at step {start}")
        elif resume:
            acc.print(f"--resume: no checkpoint in {run.checkpoints_root}, starting at step 0")
        acc.step = 0  # Accelerate's micro-step counter: checkpoints sit on optimizer-step boundaries
        read_rows(run.metrics)  # on every rank: a broken file fails them all, not the main process alone
        acc.wait_for_everyone()
        if acc.is_main_process:  # rows logged after the checkpoint (or by a run killed before its first one)
            keep_rows_up_to(run.metrics, start)
        acc.wait_for_everyone()
        return start, elapsed_before, window_state

    def optimizer_step(self, step: int) -> Tuple[Dict[str, torch.Tensor], bool]:
        """The micro-steps of one optimizer step, then the update if every rank's loss and gradient
        norm are finite; returns the step's mean values and whether it was applied."""
        o, acc, device, exp = self.o, self.accelerator, self.device, self.exp
        values: Dict[str, torch.Tensor] = {}
        for micro in range(o.grad_accum):
            g = step_generator(exp.seed, step, micro * self.world + self.rank)
            batch = {k: v.to(device) for k, v in exp.task.train_batch(o.batch_size, g).items()}
            with acc.accumulate(self.module):  # no_sync until the last micro-step; loss / grad_accum
                with acc.autocast():
                    loss, logs = self.module(batch, g)
                if self.kind.startswith("zero"):  # DeepSpeed steps its engine inside backward: check first
                    stop_if_not_finite(acc, loss.detach(), step, self.run_dir)
                acc.backward(loss)
            for k, v in {"loss": loss.detach(), **logs}.items():
                values[k] = values.get(k, 0.0) + v.detach().float().to(device) / o.grad_accum
        if not acc.sync_gradients:
            raise RuntimeError("gradient accumulation fell out of step with Accelerate's micro-step counter")
        norm = as_scalar(acc.clip_grad_norm_(self.module.parameters(), o.max_grad_norm or float("inf")), device)
        if norm is not None:
            values["grad_norm"] = norm
        # under fp16 an overflowing gradient is the loss scaler's to skip; the loss itself must be finite
        grad_checked = values.get("grad_norm") if acc.mixed_precision != "fp16" else None
        check = torch.stack([values["loss"], grad_checked if grad_checked is not None else torch.zeros((), device=device)])
        finite = bool(torch.isfinite(acc.reduce(check, "sum")).all())  # every rank decides alike
        if finite:
            self.optimizer.step()
            self.skipped_in_row = 0
        else:
            self.not_finite(step, values)
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None and finite:
            self.ema.update(exp.model)
        return values, finite

    def not_finite(self, step: int, values: Dict[str, torch.Tensor]) -> None:
        o = self.o
        self.skipped_in_row += 1
        what = (f"loss {float(values['loss']):.4g}, gradient norm {float(values.get('grad_norm', float('nan'))):.4g} "
                f"on rank {self.rank}")
        kept = self.run_dir.checkpoints()
        if o.on_nonfinite == "stop" or self.skipped_in_row > o.max_skipped_in_a_row:
            raise NonFiniteError(
                f"step {step + 1}: not finite ({what}); training stopped before the update. The last checkpoint "
                f"({kept[-1] if kept else 'none yet'}) is intact. Lower train.lr or check the data; "
                f"train.on_nonfinite = 'skip' skips such steps (at most train.max_skipped_in_a_row = "
                f"{o.max_skipped_in_a_row} in a row).")
        self.accelerator.print(f"step {step + 1}: not finite ({what}); update skipped")

    def log(self, window: LogWindow, step: int, elapsed: float, t_log: float, saving_s: float, bar) -> Dict[str, float]:
        """A metrics row from the window's means (main process writes it)."""
        now = time.time()
        last = window.reduced_means(self.accelerator)
        if "skipped" in last:
            last["skipped"] *= max(window.n, 1)  # a count, not a mean
        last.update(step=step, lr=self.scheduler.get_last_lr()[0], seqs_per_s=window.seqs / max(now - t_log, 1e-9),
                    elapsed_s=elapsed, checkpoint_s=saving_s)
        if self.accelerator.is_main_process:
            append_row(self.run_dir.metrics, last)
            bar.set_postfix({k: f"{last[k]:.4g}" for k in ("loss", "masked_ce") if k in last})
        self.accelerator.log(last, step=step)
        return last

    def out_of_time(self, step: int, t_start: float) -> bool:
        """Checked at log boundaries only; the main process's clock decides, so all ranks stop together."""
        if self.o.max_minutes is None or step % self.o.log_every:
            return False
        late = self.accelerator.is_main_process and (time.time() - t_start) > 60 * self.o.max_minutes
        return bool(self.accelerator.reduce(torch.tensor([float(late)], device=self.device), "sum").item())

    def checkpoint(self, step: int, elapsed: float, last: Dict[str, float], window: LogWindow) -> None:
        save_checkpoint(self.accelerator, self.run_dir, step, self.module, self.exp.model, self.ema,
                        self.o.keep_checkpoints, {"world_size": self.world, "layout": self.kind, "elapsed_s": elapsed,
                                                  "metrics": last, "log_window": window.state(self.accelerator)},
                        only=self.only)

    def run(self, resume: bool) -> Dict[str, float]:
        from tqdm.auto import tqdm

        o, acc = self.o, self.accelerator
        self.setup()
        start, elapsed_before, window_state = self.resume(resume)
        window, last = LogWindow(self.device, window_state), {}
        t_start = t_log = time.time()
        bar = tqdm(total=o.steps, initial=start, disable=not acc.is_local_main_process, desc="train", dynamic_ncols=True)
        self.module.train()
        step, self.skipped_in_row, stopped_early, saving_s = start, 0, False, 0.0
        while step < o.steps:
            values, finite = self.optimizer_step(step)
            step += 1
            if finite:
                window.add(values)
                window.n += 1
            else:
                window.add({"skipped": torch.ones((), device=self.device)})
            window.seqs += o.batch_size * o.grad_accum * self.world
            bar.update(1)
            if step % o.log_every == 0 or step == o.steps:
                last = self.log(window, step, elapsed_before + time.time() - t_start, t_log, saving_s, bar)
                saving_s, window, t_log = 0.0, LogWindow(self.device), time.time()
            out_of_time = self.out_of_time(step, t_start)
            if step % o.save_every == 0 or step == o.steps or out_of_time:
                t_save = time.time()
                self.checkpoint(step, elapsed_before + time.time() - t_start, last, window)
                saving_s += time.time() - t_save  # logged with the next row: Δ elapsed_s − checkpoint_s = steps alone
            if out_of_time:
                acc.print(f"max_minutes={o.max_minutes} reached at step {step}; resume with --resume")
                stopped_early = True
                break
        bar.close()
        return self.finish(last, stopped_early)

    def finish(self, last: Dict[str, float], stopped_early: bool) -> Dict[str, float]:
        if self.hook is not None:
            self.hook.remove()
        in_sync = ranks_in_sync(self.accelerator, self.exp.model)
        last["ranks_in_sync"] = None if in_sync is None else float(in_sync)
        last["stopped_early"] = float(stopped_early)
        if self.ema is not None:  # evaluate / sample with the averaged weights, as the checkpoint ships them
            self.ema.copy_to(self.exp.model)
        return last


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
    """Train ``exp.model`` with ``exp.loss`` on ``exp.task`` batches (``Trainer``).

    ``batch_size`` is per process and micro-step: one optimizer step sees
    batch_size × grad_accum × num_processes sequences. ``max_minutes`` stops early (with a
    checkpoint) so a long recipe can run in slices and resume. ``on_nonfinite``: 'stop' (raise
    ``NonFiniteError`` before the bad update) or 'skip' (drop the update, count it in ``skipped``;
    stop after ``max_skipped_in_a_row``). ``save_weights``: what a checkpoint holds, 'all' weights,
    'trainable' only the parameters that train (a LoRA run: the LoRA weights and the head; resume
    loads them onto the base weights the experiment builds), or 'auto' (trainable when the model holds
    an adapter, else all). ``max_grad_norm = None`` still measures the norm (to log and
    check it) without clipping. Returns the last logged metrics."""
    opts = TrainOptions(steps, batch_size, grad_accum, lr, weight_decay, tuple(betas), lr_schedule, warmup_steps,
                        max_grad_norm, ema_decay, log_every, save_every, keep_checkpoints, num_threads, compile,
                        max_minutes, on_nonfinite, max_skipped_in_a_row, save_weights)
    return Trainer(exp, accelerator, RunDir(output_dir), opts).run(resume)
