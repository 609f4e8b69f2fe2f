"""Token-Critic sampling (Lezama et al. 2023; the PRISM paper's Sudoku baseline).

Each step: one MDM pass fills every masked position (x̂), one critic pass scores x̂, and of the
generated positions only the ⌈L·(i + 1)/N⌉ with the highest critic scores are kept; the others are
masked again. Every generated position is re-decided at every step, including tokens kept before.
NFE counts both passes (2 per step).
"""
from __future__ import annotations

import torch

from prism.samplers.draw import CategoricalDraw
from prism.samplers.loop import Sampler
from prism.samplers.remask import TokenCriticRemask
from prism.samplers.rules import RandomUnmask
from prism.samplers.schedules import Schedule, StepPlan
from registry import SAMPLERS, SCHEDULES


@SCHEDULES.register("token_critic")
class TokenCriticSchedule(Schedule):
    """Unmask everything, then remask all but the ⌈L·(i + 1)/N⌉ best generated positions."""

    remasks = True

    def __init__(self, steps: int = 51):
        self.n_steps = steps

    def time(self, i):
        return 1.0 - i / self.n_steps, 1.0 - (i + 1) / self.n_steps

    def plans(self, state):
        L = state.n_free
        for i in range(self.n_steps):
            t, s = self.time(i)
            keep = torch.ceil(L.double() * (i + 1) / self.n_steps).long()
            yield StepPlan(t, s, n_unmask=state.n_masked, n_remask=(L - keep).clamp(min=0), remask_fresh=True)


@SAMPLERS.register("token_critic")
def token_critic_sampler(steps: int = 51, temperature: float = 1.0, top_p: float = 1.0) -> Sampler:
    """Token-Critic sampling with ``models.mdm.critic``."""
    return Sampler(TokenCriticSchedule(steps), RandomUnmask(), CategoricalDraw(temperature, top_p), noise_removal=True,
                   reuse_prediction=True, remask_rule=TokenCriticRemask())
