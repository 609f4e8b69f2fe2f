"""Semi-autoregressive block sampling (LLaDA's ``generate``; PRISM's LLaDA experiment, Appendix D.6).

Blocks. Each row's generated span runs from its first to its last non-fixed position; fixed positions
before it (the prompt, left padding) and after it (right padding, fixed suffixes) belong to no block.
The span is cut into blocks of ``block_length`` positions (the last may be shorter), decoded left to
right; fixed positions inside the span stay in their block and are never touched.

Steps. Every row spends all ``steps`` steps on its own blocks: with n blocks, each block gets
``steps // n`` steps and the last ``steps mod n`` blocks one more (nothing is dropped; when n divides
``steps`` this is LLaDA's plan). Each row is planned alone and, with a KV cache, keeps a cache of its
own (refreshed when it starts a block, ``StepPlan.starts``), so a row's tokens do not depend on its
batch-mates (their lengths, padding or blocks); a row with more blocks than ``steps`` is refused.

Within a block of m masked positions and S steps, step j unmasks LLaDA's share (m // S, the first
m mod S steps one more; ``split_evenly``), taken by the unmasking rule (LLaDA: the most confident,
``unmask_rules.confidence``). ``remask_per_block`` = K_block remasks are spread over the block's steps
(``remask_spread``: 'inner', the intermediate steps 1 … S−2 with the remainder on the middle ones;
'central', PRISM's LLaDA budget: K_block // S on every step, the remainder on the steps nearest the
centre), each chosen by the remasking rule among the tokens clean before the step (from the same
forward pass), and that step unmasks as many more; a step remasks no more than the block's later
steps will unmask (none at the last step). Every block ends fully unmasked; nothing outside the
current block (and no fixed position) is ever touched.

PRISM's released ``llada_inference`` remasks first but takes its unmasking candidates from before the
remask, so its decisions are these with the 'central' budget (``gin/samplers/semi_ar_prism_authors.gin``).
Refilling a just-remasked position in the same step is not offered: under SUBS the pass that chose it
saw the token clean, so its posterior there is the token itself and the refill would change nothing.

Fast-dLLM (Wu et al. 2025): ``cache`` = 'prefix' | 'dual' reuses keys and values from a full pass at
each block start (``prism.backbones.kv_cache``; the loop then computes only the block, plus the tail
for 'prefix'); ``threshold`` = τ decodes in parallel: every masked position of the block whose drawn
token has probability ≥ τ unmasks too, and each row moves to its next block as soon as the current
one is complete. ``threshold_rule`` says what else a step unmasks: 'planned' (the default,
``SemiARSchedule._threshold_plans``) the planned share, so a block never takes more than its steps;
'fast_dllm' (``_fast_dllm_plans``, Fast-dLLM's ``get_transfer_index``) only the most confident
position, the block looping until it is complete (``steps`` ignored, the pass count data-dependent).
Remasking composes with the cache and the planned rule: it only ever touches the current block, which
is always recomputed.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

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


def spread_central(k: int, steps: int) -> List[int]:
    """PRISM's LLaDA budget (its ``get_num_tokens_centered``): k // S on every step, then one more
    on each of the k mod S steps nearest the centre (S−1)/2, the left one first on a tie."""
    base, rem = divmod(k, steps)
    centre = (steps - 1) / 2
    extra = set(sorted(range(steps), key=lambda j: (abs(j - centre), j))[:rem])
    return [base + (j in extra) for j in range(steps)]


SPREADS = {"inner": spread_centered, "central": spread_central}


def steps_per_block(steps: int, n_blocks: int) -> List[int]:
    """``steps`` over ``n_blocks`` blocks: steps // n each, the last steps mod n blocks one more."""
    base, rem = divmod(steps, n_blocks)
    return [base + (b >= n_blocks - rem) for b in range(n_blocks)]


@SCHEDULES.register("semi_ar")
class SemiARSchedule(Schedule):
    """Blocks of ``block_length``, ``steps`` in all, ``remask_per_block`` remasks per block spread by
    ``remask_spread`` ('inner' | 'central')."""

    def __init__(self, steps: int = 128, block_length: int = 32, remask_per_block: int = 0,
                 remask_spread: str = "inner", threshold: Optional[float] = None, threshold_rule: str = "planned"):
        if block_length < 1 or steps < 1:
            raise ValueError(f"need block_length >= 1 and steps >= 1, got {block_length}, {steps}")
        if remask_per_block < 0:
            raise ValueError(f"remask_per_block must be >= 0, got {remask_per_block}")
        if remask_spread not in SPREADS:
            raise ValueError(f"remask_spread must be one of {tuple(SPREADS)}, got {remask_spread!r}")
        self.n_steps, self.block_length, self.remask_per_block = steps, block_length, remask_per_block
        if threshold is not None and not 0.0 < threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1] (a probability; None: off), got {threshold}")
        if threshold_rule not in THRESHOLD_RULES:
            raise ValueError(f"threshold_rule must be one of {THRESHOLD_RULES}, got {threshold_rule!r}")
        if threshold_rule == "fast_dllm" and threshold is None:
            raise ValueError("threshold_rule = 'fast_dllm' needs a threshold (e.g. 0.9)")
        if threshold_rule == "fast_dllm" and remask_per_block:
            raise ValueError("threshold_rule = 'fast_dllm' has no step plan to spread remasks over: use "
                             "remask_per_block = 0, or threshold_rule = 'planned' with remasking")
        self.remask_spread, self.threshold, self.threshold_rule = remask_spread, threshold, threshold_rule
        self.remasks = remask_per_block > 0
        self._layouts = {}

    def time(self, i):
        return 1.0 - i / self.n_steps, 1.0 - (i + 1) / self.n_steps

    def blocks(self, fixed: torch.Tensor) -> torch.Tensor:
        """(B, L) block index of every position: (pos − first free) // block_length inside each row's
        span from its first to its last non-fixed position, −1 outside it."""
        B, L = fixed.shape
        pos = torch.arange(L, device=fixed.device).expand(B, L)
        free = ~fixed
        start = torch.where(free, pos, torch.full_like(pos, L)).min(1).values
        end = torch.where(free, pos, torch.full_like(pos, -1)).max(1).values  # last free (−1: none)
        inside = (pos >= start[:, None]) & (pos <= end[:, None])
        return torch.where(inside, (pos - start[:, None]) // self.block_length, torch.full_like(pos, -1))

    def _layout(self, n_blocks: int) -> Tuple[List[int], List[int], List[int], List[int]]:
        """Per step, for a row of ``n_blocks`` blocks: (block, step within it, its steps, remasks)."""
        if n_blocks not in self._layouts:
            self._layouts[n_blocks] = self._plan_row(n_blocks)
        return self._layouts[n_blocks]

    def _plan_row(self, n_blocks: int) -> Tuple[List[int], List[int], List[int], List[int]]:
        if n_blocks == 0:
            zeros = [0] * self.n_steps
            return [-2] * self.n_steps, zeros, [1] * self.n_steps, zeros
        if n_blocks > self.n_steps:
            raise ValueError(f"steps = {self.n_steps} cannot cover {n_blocks} blocks of block_length = "
                             f"{self.block_length}: need steps >= blocks (raise steps or block_length)")
        block, within, length, remask = [], [], [], []
        for b, S in enumerate(steps_per_block(self.n_steps, n_blocks)):
            block += [b] * S
            within += list(range(S))
            length += [S] * S
            remask += SPREADS[self.remask_spread](self.remask_per_block, S)
        return block, within, length, remask

    def plans(self, state):
        if self.threshold is not None:
            rule = self._fast_dllm_plans if self.threshold_rule == "fast_dllm" else self._threshold_plans
            yield from rule(state)
            return
        fixed = state.fixed
        block_of = self.blocks(fixed)
        n_blocks = (block_of.max(1).values + 1).tolist()
        layout = [self._layout(n) for n in n_blocks]  # refuses rows with more blocks than steps first
        cols = [torch.tensor([row[f] for row in layout], dtype=torch.long, device=fixed.device) for f in range(4)]
        block_at, within_at, length_at, remask_at = cols  # each (B, steps)
        m = torch.zeros(fixed.shape[0], dtype=torch.long, device=fixed.device)
        for i in range(self.n_steps):
            t, s = self.time(i)
            j, S = within_at[:, i], length_at[:, i]
            window = (block_of == block_at[:, i, None]) & ~fixed  # idle rows: block −2, an empty window
            m = torch.where(j == 0, (state.masked & window).sum(1), m)  # masked at the block's start
            base, rem = m // S, m % S
            share = base + (j < rem).long()
            k = torch.minimum(remask_at[:, i], (state.clean & window).sum(1))
            k = torch.minimum(k, m - (j + 1) * base - torch.minimum(j + 1, rem))  # refillable later in the block
            starts = (j == 0) & (block_at[:, i] >= 0)
            yield StepPlan(t, s, n_unmask=share + k, n_remask=k, window=window, block_start=bool(starts.any()),
                           starts=starts)

    def _threshold_plans(self, state):
        """Parallel decoding (Fast-dLLM). Each row goes through its own blocks with its own plan (S
        steps per block, as without a threshold); at step j of S in a block with m masked positions it
        unmasks at least ⌈m / (S − j)⌉ (so the block is done within its S steps) plus, in the loop,
        every one whose drawn token has p ≥ τ, and remasks as ``remask_spread`` plans (never at its last
        step, no more than later steps unmask). A row moves to its next block as soon as its current
        one has nothing masked (unused remasks dropped), so it never takes more than ``steps`` steps."""
        fixed = state.fixed
        B, device = fixed.shape[0], fixed.device
        block_of = self.blocks(fixed)
        n_blocks = (block_of.max(1).values + 1).tolist()
        for n in n_blocks:
            self._layout(n)  # refuses rows with more blocks than steps before any pass
        per_block = [steps_per_block(self.n_steps, n) if n else [] for n in n_blocks]
        # each row's remasks per step of each of its blocks, planned once
        spreads = [[SPREADS[self.remask_spread](self.remask_per_block, S) for S in row] for row in per_block]
        block, within = [0] * B, [0] * B
        zeros = torch.zeros(B, dtype=torch.long, device=device)
        for i in range(self.n_steps):
            masked_in = state.masked
            for r in range(B):  # skip finished (or all-fixed) blocks
                while block[r] < n_blocks[r] and not bool((masked_in[r] & (block_of[r] == block[r])).any()):
                    block[r], within[r] = block[r] + 1, 0
            live = [block[r] < n_blocks[r] for r in range(B)]
            if not any(live):
                return
            current = torch.tensor([block[r] if live[r] else -2 for r in range(B)], dtype=torch.long, device=device)
            window = (block_of == current[:, None]) & ~fixed
            S = torch.tensor([per_block[r][block[r]] if live[r] else 1 for r in range(B)], dtype=torch.long,
                             device=device)
            j = torch.tensor(within, dtype=torch.long, device=device)
            m = (masked_in & window).sum(1)
            left = (S - j).clamp(min=1)
            share = (m + left - 1) // left
            k = torch.tensor([spreads[r][block[r]][within[r]] if live[r] and within[r] < per_block[r][block[r]]
                              else 0 for r in range(B)], dtype=torch.long, device=device)
            k = torch.where(left > 1, torch.minimum(k, (state.clean & window).sum(1)), zeros)
            k = torch.minimum(k, m - share)  # as the planned path: no more than later steps will unmask
            starts = torch.tensor([live[r] and within[r] == 0 for r in range(B)], dtype=torch.bool, device=device)
            t, s = self.time(i)
            yield StepPlan(t, s, n_unmask=share + k, n_remask=k, window=window, block_start=bool(starts.any()),
                           starts=starts, threshold=self.threshold)
            within = [w + 1 if live[r] else w for r, w in enumerate(within)]

    def _fast_dllm_plans(self, state):
        """Fast-dLLM's own rule (its ``get_transfer_index`` with a threshold): each row loops over its
        current block until nothing there is masked; every pass unmasks the most confident masked
        position of the block (count 1, ``unmask_rules.confidence``) and, in the loop, every other one
        whose drawn token has p ≥ τ. ``steps`` is ignored: the number of passes depends on the data (a
        block of m masks takes 1 … m). Times follow the planned grid, held at its last step beyond it."""
        fixed = state.fixed
        B, device = fixed.shape[0], fixed.device
        block_of = self.blocks(fixed)
        n_blocks = (block_of.max(1).values + 1).tolist()
        block, fresh = [0] * B, [True] * B
        i = 0
        while True:
            masked_in = state.masked
            for r in range(B):  # next block once the current one is complete
                while block[r] < n_blocks[r] and not bool((masked_in[r] & (block_of[r] == block[r])).any()):
                    block[r], fresh[r] = block[r] + 1, True
            live = [block[r] < n_blocks[r] for r in range(B)]
            if not any(live):
                return
            current = torch.tensor([block[r] if live[r] else -2 for r in range(B)], dtype=torch.long, device=device)
            starts = torch.tensor([live[r] and fresh[r] for r in range(B)], dtype=torch.bool, device=device)
            t, s = self.time(min(i, self.n_steps - 1))
            yield StepPlan(t, s, n_unmask=torch.tensor(live, dtype=torch.long, device=device),
                           window=(block_of == current[:, None]) & ~fixed, block_start=bool(starts.any()),
                           starts=starts, threshold=self.threshold)
            fresh = [f and not live[r] for r, f in enumerate(fresh)]
            i += 1


THRESHOLD_RULES = ("planned", "fast_dllm")


@SAMPLERS.register("semi_ar")
def semi_ar_sampler(steps: int = 128, block_length: int = 32, remask_per_block: int = 0,
                    remask_rule: Optional[RemaskRule] = None, unmask_rule: Optional[UnmaskRule] = None,
                    temperature: float = 0.0, top_p: float = 1.0, remask_spread: str = "inner",
                    cache: str = "none", threshold: Optional[float] = None, refresh: str = "block",
                    threshold_rule: str = "planned", forbid_tokens: Sequence[int] = (),
                    low_confidence_tokens: Sequence[int] = ()) -> Sampler:
    """LLaDA's semi-autoregressive sampler (most confident first, greedy by default) with
    ``remask_per_block`` remasks per block by ``remask_rule`` (default: the PRISM head), spread by
    ``remask_spread``. Fast-dLLM's speed-ups: ``cache`` = 'none' | 'prefix' | 'dual' (KV cache
    refreshed at each block start; see ``Sampler``) and ``threshold`` = τ (parallel decoding) by
    ``threshold_rule``: 'planned' (the default: the planned share plus every token ≥ τ, never more than
    ``steps`` passes) or 'fast_dllm' (Fast-dLLM's: the most confident plus every token ≥ τ, until the
    block is complete; the pass count depends on the data). LLaDA's EOS options: ``forbid_tokens``
    (``logits_eos_inf``: [EOS]) are never drawn (``Sampler``); ``low_confidence_tokens``
    (``confidence_eos_eot_inf``: [EOS, end of turn]) unmask last (``ConfidenceUnmask.exclude``)."""
    schedule = SemiARSchedule(steps, block_length, remask_per_block, remask_spread, threshold, threshold_rule)
    if low_confidence_tokens and unmask_rule is not None:
        raise ValueError("samplers.semi_ar.low_confidence_tokens sets the confidence rule's exclude list; with "
                         "an unmask_rule of your own, give it unmask_rules.confidence.exclude instead")
    unmask_rule = unmask_rule or ConfidenceUnmask(exclude=low_confidence_tokens)
    return Sampler(schedule, unmask_rule, CategoricalDraw(temperature, top_p), noise_removal=True, reuse_prediction=True,
                   kv_cache=cache, refresh=refresh, forbid_tokens=forbid_tokens,
                   remask_rule=(remask_rule or PRISMRemask()) if remask_per_block else remask_rule)
