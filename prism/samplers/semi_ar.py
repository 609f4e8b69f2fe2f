"""Semi-autoregressive block sampling (LLaDA's ``generate``; PRISM's LLaDA experiment, Appendix D.6).

The generated part of each sequence (from its first non-fixed position: the prompt is fixed) is cut
into blocks of ``block_length`` decoded left to right, ``steps // n_blocks`` steps per block. Within
a block the m masked positions are shared out over its S steps as LLaDA does (m // S each, the first
m mod S steps one more), taken by the unmasking rule (LLaDA: the most confident, ``confidence``);
``remask_per_block`` = K_block remasks are spread over the block's intermediate steps (not its first
or last; the middle steps get the remainder), each chosen by the remasking rule among the block's
clean tokens, and that step unmasks as many more. A block is complete when its steps end, and no
position outside the current block is ever touched.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from prism.samplers.draw import CategoricalDraw
from prism.samplers.loop import Sampler
from prism.samplers.remask import PRISMRemask, RemaskRule
from prism.samplers.rules import ConfidenceUnmask, UnmaskRule
from prism.samplers.schedules import Schedule, StepPlan
from registry import SAMPLERS, SCHEDULES


def split_evenly(m: torch.Tensor, steps: int) -> List[torch.Tensor]:
    """LLaDA's ``get_num_transfer_tokens``: m // S per step, the first m mod S steps one more."""
    base, rem = m // steps, m % steps
    return [base + (j < rem).long() for j in range(steps)]


def spread_centered(k: int, steps: int) -> List[int]:
    """K remasks over the intermediate steps 1 … S−2, evenly, the remainder to the middle ones."""
    inner = max(steps - 2, 0)
    if inner == 0 or k == 0:
        return [0] * steps
    base, rem = divmod(k, inner)
    counts = [base] * inner
    mid = (inner - rem) // 2
    for j in range(mid, mid + rem):
        counts[j] += 1
    return [0] + counts + [0]


@SCHEDULES.register("semi_ar")
class SemiARSchedule(Schedule):
    """Blocks of ``block_length``, ``steps`` in all, ``remask_per_block`` remasks per block."""

    def __init__(self, steps: int = 128, block_length: int = 32, remask_per_block: int = 0):
        if block_length < 1 or steps < 1:
            raise ValueError(f"need block_length >= 1 and steps >= 1, got {block_length}, {steps}")
        self.n_steps, self.block_length, self.remask_per_block = steps, block_length, remask_per_block
        self.remasks = remask_per_block > 0

    def time(self, i):
        return 1.0 - i / self.n_steps, 1.0 - (i + 1) / self.n_steps

    def blocks(self, fixed: torch.Tensor) -> torch.Tensor:
        """(B, L) block index of every position (−1 before each row's first non-fixed position)."""
        B, L = fixed.shape
        pos = torch.arange(L, device=fixed.device).expand(B, L)
        free = ~fixed
        start = torch.where(free.any(1), free.float().argmax(1), torch.full((B,), L, device=fixed.device))
        return torch.where(pos >= start[:, None], (pos - start[:, None]) // self.block_length, torch.full_like(pos, -1))

    def plans(self, state):
        block_of = self.blocks(state.fixed)
        n_blocks = int(block_of.max().item()) + 1 if bool((block_of >= 0).any()) else 0
        if n_blocks == 0:
            return
        per_block = self.n_steps // n_blocks
        if per_block < 1:
            raise ValueError(f"{self.n_steps} steps cannot cover {n_blocks} blocks of {self.block_length}")
        i = 0
        for b in range(n_blocks):
            window = (block_of == b) & ~state.fixed
            m = (state.masked & window).sum(1)
            shares = split_evenly(m, per_block)
            remasks = spread_centered(self.remask_per_block, per_block)
            for j in range(per_block):
                t, s = self.time(i)
                later = sum(shares[j + 1:], torch.zeros_like(m))  # a remask must be refillable in this block
                clean_in_block = (state.clean & window).sum(1)
                k = torch.minimum(torch.minimum(torch.full_like(m, remasks[j]), later), clean_in_block)
                yield StepPlan(t, s, n_unmask=shares[j] + k, n_remask=k, window=window)
                i += 1


@SAMPLERS.register("semi_ar")
def semi_ar_sampler(steps: int = 128, block_length: int = 32, remask_per_block: int = 0,
                    remask_rule: Optional[RemaskRule] = None, unmask_rule: Optional[UnmaskRule] = None,
                    temperature: float = 0.0, top_p: float = 1.0) -> Sampler:
    """LLaDA's semi-autoregressive sampler (most confident first, greedy by default) with
    ``remask_per_block`` remasks per block by ``remask_rule`` (default: the PRISM head)."""
    return Sampler(SemiARSchedule(steps, block_length, remask_per_block), unmask_rule or ConfidenceUnmask(),
                   CategoricalDraw(temperature, top_p), noise_removal=True, cache=True,
                   remask_rule=(remask_rule or PRISMRemask()) if remask_per_block else remask_rule)
