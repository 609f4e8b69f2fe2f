"""``samplers.loop``: the one step loop every sampler is built from.

Each step: forward once (or reuse the last prediction when nothing changed) → the schedule says how
many positions each row unmasks (and, once remasking samplers exist, remasks) → the draw part draws
tokens (float64 Gumbel-max) → the unmasking rule picks which masked positions take them.
Fixed positions (givens, prompts, padding) never change.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch

from prism.samplers.draw import GumbelDraw
from prism.samplers.rules import RandomUnmask, UnmaskRule, select_top
from prism.samplers.schedules import MDLMSchedule, Schedule
from registry import SAMPLERS


@dataclass
class SampleOutput:
    """``tokens``: (B, L) final sequences; ``nfe``: model forward passes actually run;
    ``trace``: per step, the state before the step and the positions unmasked (if asked)."""

    tokens: torch.Tensor
    nfe: int
    trace: List[Dict[str, torch.Tensor]] = field(default_factory=list)


@SAMPLERS.register("loop")
class Sampler:
    """A sampler = schedule + unmasking rule + draw, run by one loop.

    ``noise_removal``: after the last step, positions still masked (MDLM's grid ends at t = eps > 0)
    take the argmax of the model's prediction, as MDLM's final denoising step does.
    ``cache``: reuse the last prediction while the state is unchanged (MDLM's caching); it is
    switched off for time-conditioned models, whose prediction also depends on t.
    """

    def __init__(
        self,
        schedule: Schedule,
        unmask_rule: Optional[UnmaskRule] = None,
        draw: Optional[GumbelDraw] = None,
        noise_removal: bool = True,
        cache: bool = True,
    ):
        self.schedule = schedule
        self.unmask_rule = unmask_rule or RandomUnmask()
        self.draw = draw or GumbelDraw()
        self.noise_removal, self.cache = noise_removal, cache

    @torch.no_grad()
    def __call__(self, model, batch, generator: Optional[torch.Generator] = None, trace: bool = False) -> SampleOutput:
        mask_id = model.mask_id
        fixed = batch["fixed"].bool()
        attention_mask = batch.get("attention_mask")
        z = torch.where(fixed, batch["input_ids"], torch.full_like(batch["input_ids"], mask_id))
        B = z.shape[0]
        cache = self.cache and not getattr(model, "time_conditioned", False)
        nfe, log_probs, steps = 0, None, []

        def predict(t: float) -> torch.Tensor:
            nonlocal nfe
            nfe += 1
            return model(z, attention_mask=attention_mask, t=torch.full((B,), t, device=z.device)).log_probs

        for i in range(self.schedule.n_steps):
            t, _ = self.schedule.time(i)
            masked = (z == mask_id) & ~fixed
            if not masked.any():
                break
            if log_probs is None or not cache:  # first step, or the state changed since the last prediction
                log_probs = predict(t)
            n_unmask, n_remask = self.schedule.counts(i, masked.sum(1), (~masked & ~fixed).sum(1), generator)
            if bool((n_remask > 0).any()):
                raise NotImplementedError("this loop does not remask yet; use a schedule with zero remask counts")
            tokens = self.draw(log_probs, generator)
            chosen = select_top(self.unmask_rule.scores(log_probs, tokens, z, generator), masked, n_unmask)
            if trace:
                steps.append({"step": i, "t": t, "z": z.cpu().clone(), "unmasked": chosen.cpu().clone()})
            if chosen.any():
                z = torch.where(chosen, tokens, z)
                log_probs = None
        masked = (z == mask_id) & ~fixed
        if self.noise_removal and masked.any():
            if log_probs is None or not cache:
                log_probs = predict(float(self.schedule.time(self.schedule.n_steps - 1)[1]))
            z = torch.where(masked, log_probs.argmax(-1), z)
        return SampleOutput(tokens=z, nfe=nfe, trace=steps)


@SAMPLERS.register("mdlm")
def mdlm_sampler(
    steps: int = 128, eps: float = 1e-5, temperature: float = 1.0, top_p: float = 1.0, noise_removal: bool = True,
    noise=None,
) -> Sampler:
    """MDLM's ancestral sampler: ``schedules.mdlm`` (Binomial((α_s − α_t)/(1 − α_t)) unmasking) with
    uniformly random positions, float64 Gumbel-max draws, caching of unchanged steps."""
    return Sampler(MDLMSchedule(steps, eps, noise), RandomUnmask(), GumbelDraw(temperature, top_p), noise_removal)
