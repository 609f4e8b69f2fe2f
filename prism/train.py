"""``train``: the Accelerate training loop.

AdamW, transformers schedulers (constant / cosine, with warmup), gradient accumulation, clipping,
optional EMA, mixed precision where the device supports it, per-(seed, rank, step) randomness (so a
resumed run reproduces the same losses and each rank sees its own data), atomic checkpoints with
``accelerator.save_state``, metrics to ``metrics.jsonl`` (and to trackers when asked).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from typing import Dict, Optional

import gin
import numpy as np
import torch
from torch import nn

from prism.experiment import Experiment
from prism.paths import write_text_atomic

CKPT_PREFIX = "step_"


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


class EMA:
    """Exponential moving average of the parameters, θ_ema ← d_n·θ_ema + (1 − d_n)·θ, with the usual
    warm-up d_n = min(decay, (1 + n) / (10 + n)) after n updates, so that early checkpoints are not
    dominated by the random initialisation (with d = 0.999 a plain EMA still holds 78% of it after
    250 steps)."""

    def __init__(self, model: nn.Module, decay: float):
        from prism.experiment import parameter_aliases

        self.decay, self.updates = decay, 0
        # float32 copies on each parameter's own device (build after accelerator.prepare on GPUs)
        self.shadow = {k: p.detach().clone().float() for k, p in model.named_parameters() if p.requires_grad}
        self.aliases = parameter_aliases(model)

    def current_decay(self) -> float:
        return min(self.decay, (1 + self.updates) / (10 + self.updates))

    @torch.no_grad()
    def update(self, model: nn.Module):
        d = self.current_decay()
        for k, p in model.named_parameters():
            if k in self.shadow:
                self.shadow[k].lerp_(p.detach().float(), 1.0 - d)
        self.updates += 1

    def state_dict(self):
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state):
        self.decay, self.updates = state["decay"], state.get("updates", 10**9)
        self.shadow = {k: v.to(self.shadow[k].device if k in self.shadow else v.device).clone()
                       for k, v in state["shadow"].items()}

    def weights(self, model: nn.Module) -> Dict[str, torch.Tensor]:
        """The model's state dict with EMA values in place of the trained parameters."""
        state = model.state_dict()
        out = {}
        for k, v in state.items():
            src = self.aliases.get(k, k)  # a tied weight takes the average of the tensor it shares
            out[k] = self.shadow[src].to(v.dtype) if src in self.shadow else v
        return out


def list_checkpoints(output_dir: str):
    """Complete checkpoints (directories with trainer_state.json), oldest first."""
    root = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    found = []
    for name in os.listdir(root):
        path = os.path.join(root, name)
        if name.startswith(CKPT_PREFIX) and os.path.exists(os.path.join(path, "trainer_state.json")):
            found.append((int(name[len(CKPT_PREFIX):]), path))
    return [p for _, p in sorted(found)]


def save_checkpoint(accelerator, output_dir: str, step: int, model: nn.Module, ema: Optional[EMA], keep: int, extra: dict):
    """``accelerator.save_state`` into a temporary directory, then an atomic rename: a crash while
    saving leaves the previous checkpoint intact and never a half-written one that looks complete."""
    from prism.experiment import save_weights

    root = os.path.join(output_dir, "checkpoints")
    final = os.path.join(root, f"{CKPT_PREFIX}{step:08d}")
    tmp = os.path.join(root, f".tmp-{CKPT_PREFIX}{step:08d}")
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        weights = ema.weights(model) if ema is not None else model.state_dict()
        save_weights(weights, model, os.path.join(tmp, "weights.safetensors"))
        with open(os.path.join(tmp, "trainer_state.json"), "w") as f:
            json.dump({"step": step, **extra}, f)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in list_checkpoints(output_dir)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


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
) -> Dict[str, float]:
    """Train ``exp.model`` with ``exp.loss`` on ``exp.task`` batches.

    ``batch_size`` is per process and micro-step: one optimizer step sees
    batch_size × grad_accum × num_processes sequences. ``max_minutes`` stops early (with a
    checkpoint) so a long recipe can run in slices and resume. Returns the last logged metrics.
    """
    from tqdm.auto import tqdm
    from transformers import get_scheduler

    if exp.loss is None:
        raise ValueError("train needs experiment.loss (e.g. experiment.loss = @losses.mdlm())")
    if num_threads:
        torch.set_num_threads(num_threads)
    model = exp.model
    module = TrainModule(model, exp.loss)
    params = [p for p in module.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=tuple(betas))
    scheduler = get_scheduler(lr_schedule, optimizer, num_warmup_steps=warmup_steps, num_training_steps=steps)
    if compile:
        module = torch.compile(module)
    module, optimizer, scheduler = accelerator.prepare(module, optimizer, scheduler)
    ema = EMA(model, ema_decay) if ema_decay > 0 else None  # after prepare: on the model's device
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    start, elapsed_before = 0, 0.0  # elapsed_s in the logs counts all slices of a resumed run
    if resume:
        ckpts = list_checkpoints(output_dir)
        if ckpts:
            accelerator.load_state(ckpts[-1])
            with open(os.path.join(ckpts[-1], "trainer_state.json")) as f:
                state = json.load(f)
            start, elapsed_before = state["step"], state.get("elapsed_s", 0.0)
            accelerator.print(f"resumed from {ckpts[-1]} at step {start}")
            if accelerator.is_main_process:
                drop_logged_after(os.path.join(output_dir, "metrics.jsonl"), start)
        else:
            accelerator.print(f"--resume: no checkpoint in {output_dir}/checkpoints, starting at step 0")

    rank, world = accelerator.process_index, accelerator.num_processes
    metrics_path = os.path.join(output_dir, "metrics.jsonl")
    last: Dict[str, float] = {}
    sums: Dict[str, torch.Tensor] = {}
    n_logged, t_start, t_log = 0, time.time(), time.time()
    seen_since_log = 0
    bar = tqdm(total=steps, initial=start, disable=not accelerator.is_local_main_process, desc="train", dynamic_ncols=True)
    module.train()
    step = start
    stopped_early = False
    while step < steps:
        for micro in range(grad_accum):
            g = step_generator(exp.seed, step, micro * world + rank)
            batch = {k: v.to(accelerator.device) for k, v in exp.task.train_batch(batch_size, g).items()}
            # no_sync on all but the last micro-step: gradients are all-reduced once per optimizer step.
            ctx = accelerator.no_sync(module) if micro < grad_accum - 1 else contextlib.nullcontext()
            with ctx, accelerator.autocast():
                loss, logs = module(batch, g)
                accelerator.backward(loss / grad_accum)
            for k, v in {"loss": loss.detach(), **logs}.items():
                sums[k] = sums.get(k, 0.0) + v.float() / grad_accum
        if max_grad_norm:
            sums["grad_norm"] = sums.get("grad_norm", 0.0) + accelerator.clip_grad_norm_(params, max_grad_norm).float()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update(model)
        step += 1
        n_logged += 1
        seen_since_log += batch_size * grad_accum * world
        bar.update(1)

        if step % log_every == 0 or step == steps:
            keys = sorted(sums)
            values = accelerator.reduce(torch.stack([sums[k] for k in keys]).to(accelerator.device), "mean") / n_logged
            now = time.time()
            last = {k: float(v) for k, v in zip(keys, values)}
            last.update(step=step, lr=scheduler.get_last_lr()[0], seqs_per_s=seen_since_log / (now - t_log),
                        elapsed_s=elapsed_before + now - t_start)
            if accelerator.is_main_process:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(last) + "\n")
                bar.set_postfix({k: f"{last[k]:.4g}" for k in ("loss", "masked_ce") if k in last})
            accelerator.log(last, step=step)
            sums, n_logged, t_log, seen_since_log = {}, 0, now, 0
        out_of_time = False
        if max_minutes is not None and step % log_every == 0:
            # Checked at log boundaries only (a resumed run's logged averages then match an
            # uninterrupted run's); the main process's clock decides, so all ranks stop together.
            late = accelerator.is_main_process and (time.time() - t_start) > 60 * max_minutes
            out_of_time = bool(accelerator.reduce(torch.tensor([float(late)], device=accelerator.device), "sum").item())
        if step % save_every == 0 or step == steps or out_of_time:
            save_checkpoint(accelerator, output_dir, step, model, ema, keep_checkpoints,
                            {"world_size": world, "elapsed_s": elapsed_before + time.time() - t_start, "metrics": last})
        if out_of_time:
            accelerator.print(f"max_minutes={max_minutes} reached at step {step}; resume with --resume")
            stopped_early = True
            break
    bar.close()
    last["ranks_in_sync"] = float(ranks_in_sync(accelerator, model))
    last["stopped_early"] = float(stopped_early)
    if ema is not None:  # evaluate / sample with the averaged weights, as the checkpoint ships them
        model.load_state_dict(ema.weights(model))
    return last


def drop_logged_after(path: str, step: int) -> None:
    """Remove metrics rows logged after ``step`` (written after the checkpoint a run resumes from),
    so that the resumed run's rows are not duplicated."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line)["step"] <= step]
    write_text_atomic(path, "".join(rows))


def ranks_in_sync(accelerator, model: nn.Module) -> bool:
    """True when every process holds the same parameters (DDP really synchronised gradients)."""
    with torch.no_grad():
        flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
        probe = torch.stack([flat.sum(), (flat * torch.arange(1, flat.numel() + 1, dtype=flat.dtype).remainder(97)).sum()])
        gathered = accelerator.gather(probe[None].to(accelerator.device))
    return bool(torch.allclose(gathered, gathered[:1].expand_as(gathered), rtol=0, atol=0))
