"""``samplers.loop``: the one step loop every sampler is built from.

Each step: the schedule plans the step (how many positions each row unmasks and remasks, or with
which probabilities, and optionally the window of positions it may touch) → one forward pass (or
the last one again when the state has not changed) gives the unmasking posterior and, with a head,
the per-token quality → the draw part draws tokens (``prism.samplers.draw``) at the masked positions
inside the window only, nothing for the others → the unmasking rule picks
which masked positions take them → the remasking rule picks which clean positions are masked again.
Every decision is per sequence. Fixed positions (givens, prompts, padding) never change.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Dict, List, Optional, Sequence

import torch

from prism.backbones.kv_cache import KVCache
from prism.model import MDMOutput
from prism.samplers.draw import CategoricalDraw
from prism.ops import select_top
from prism.samplers.rules import RandomUnmask, UnmaskRule
from prism.samplers.schedules import MDLMSchedule, Schedule
from registry import SAMPLERS


@dataclass
class SampleOutput:
    """``tokens``: (B, L) final sequences; ``nfe``: network passes actually run (MDM passes plus
    any Token-Critic passes); ``trace``: per step, the state before the step, the quality the step
    saw and the positions it unmasked and remasked (if asked)."""

    tokens: torch.Tensor
    nfe: int
    trace: List[Dict[str, torch.Tensor]] = field(default_factory=list)


class SamplerState:
    """What the schedule and the rules may look at: the current state ``z``, ``fixed``, the model's
    last output (``log_probs``, ``quality``, ``token_log_probs``), ``confidence`` (B, L): the
    probability each clean token had when it was unmasked (NaN for masked and fixed positions),
    ``draw_confidence`` (B, L): its probability under the law the draw part drew it from (after the
    nucleus filter; kept when the draw part keeps them, ``keep_probs``, else NaN), the step index and
    the generator."""

    def __init__(self, z, fixed, mask_id, generator):
        self.z, self.fixed, self.mask_id, self.generator = z, fixed, mask_id, generator
        self.confidence = torch.full(z.shape, float("nan"), dtype=torch.float64, device=z.device)
        self.draw_confidence = torch.full_like(self.confidence, float("nan"))
        self.draw_probs_kept = False  # set by the loop: does its draw part keep the drawn tokens' probabilities?
        self.log_probs = self.quality = self.token_log_probs = None
        self.attention_mask = None  # the batch's (B, L) padding mask, when it has one
        self.step = 0

    @property
    def masked(self) -> torch.Tensor:
        return (self.z == self.mask_id) & ~self.fixed

    @property
    def clean(self) -> torch.Tensor:
        """Generated (non-fixed) positions that hold a token."""
        return (self.z != self.mask_id) & ~self.fixed

    @property
    def n_masked(self) -> torch.Tensor:
        return self.masked.sum(1)

    @property
    def n_clean(self) -> torch.Tensor:
        return self.clean.sum(1)

    @property
    def n_free(self) -> torch.Tensor:
        return (~self.fixed).sum(1)


def forbid(out, ids: Sequence[int]):
    """``out`` with ``log_probs`` renormalised without the tokens ``ids`` (their logits at −inf):
    log p'(v) = log p(v) − log(1 − Σ_{e ∈ ids} p(e)), −inf at ids. The other fields are kept."""
    lp = out.log_probs
    idx = torch.tensor(ids, device=lp.device)
    mass = lp.index_select(-1, idx).double().exp().sum(-1, keepdim=True).clamp(max=1 - 1e-12)
    new = (lp - torch.log1p(-mass).to(lp.dtype)).index_fill(-1, idx, float("-inf"))
    if dataclasses.is_dataclass(out):
        return dataclasses.replace(out, log_probs=new)
    return SimpleNamespace(**{**vars(out), "log_probs": new})


def choose(count: Optional[torch.Tensor], prob: Optional[torch.Tensor], candidates: torch.Tensor,
           scores_fn, generator) -> torch.Tensor:
    """(B, L) bool: by count, the top-``count`` candidates of ``scores_fn()`` per row; by probability,
    each candidate independently with ``prob`` ((B,) or (B, L))."""
    if count is not None:
        if not bool((count > 0).any()):
            return torch.zeros_like(candidates)
        return select_top(scores_fn(), candidates, count.to(candidates.device))
    if prob is not None:
        p = prob.to(torch.float64)
        p = p[:, None] if p.dim() == 1 else p
        u = torch.rand(candidates.shape, generator=generator, dtype=torch.float64).to(candidates.device)
        return (u < p.to(candidates.device)) & candidates
    return torch.zeros_like(candidates)


KV_CACHES = ("none", "prefix", "dual")
REFRESHES = ("block", "step")


def check_kv_cache(kv_cache: str, refresh: str) -> None:
    if kv_cache not in KV_CACHES:
        raise ValueError(f"kv_cache must be one of {KV_CACHES}, got {kv_cache!r}")
    if refresh not in REFRESHES:
        raise ValueError(f"the KV cache refresh must be one of {REFRESHES} ('step' only checks exactness), "
                         f"got {refresh!r}")


def column_span(window: Optional[torch.Tensor], L: int):
    """(lo, hi): the columns from the first to the last position any row's window holds ((0, L)
    without a window); a KV-cached pass computes only these (and, in 'prefix' mode, the tail)."""
    if window is None:
        return 0, L
    cols = window.any(0).nonzero()
    if cols.numel() == 0:
        return 0, 0
    return int(cols[0]), int(cols[-1]) + 1


def span_view(state: SamplerState, lo: int, hi: int) -> SamplerState:
    """The state restricted to columns lo … hi−1 (views, no copies), for the rules to read."""
    view = SamplerState.__new__(SamplerState)
    view.z, view.fixed, view.mask_id, view.generator = state.z[:, lo:hi], state.fixed[:, lo:hi], state.mask_id, state.generator
    view.confidence = state.confidence[:, lo:hi]
    view.draw_confidence = state.draw_confidence[:, lo:hi]
    view.attention_mask = None if state.attention_mask is None else state.attention_mask[:, lo:hi]
    view.log_probs = view.quality = view.token_log_probs = None
    view.step = state.step
    return view


def _rows(select: torch.Tensor) -> Optional[torch.Tensor]:
    """The sub-batch of a (B,) bool: None for all rows (no gathering), else their indices."""
    return None if bool(select.all()) else select.nonzero().squeeze(1)


def cached_pass(model, z, attention_mask, t, kv: KVCache, filled, plan, span, dual: bool, every_step: bool):
    """One KV-cached step with per-row caches (so a row's output never depends on its batch-mates):
    the rows starting a window (or never refreshed; all active rows with ``every_step``) run a full
    pass that refreshes their cache rows only; the other active rows run a partial pass over the
    union span (dual) or from it to the end (prefix) that writes, per row, only its own columns.
    Both keep the outputs of ``span``; rows with an empty window run nothing (zeros in the output).
    Without a window every row's columns are all L (a refresh at the first pass, partial passes after)."""
    B, L = z.shape
    window = plan.window if plan.window is not None else torch.ones(B, L, dtype=torch.bool, device=z.device)
    active = window.any(1)
    starts = plan.starts.to(z.device) if plan.starts is not None else torch.full_like(active, plan.block_start)
    refresh = active & (starts | ~filled | every_step)
    partial = active & ~refresh
    take = lambda x, rows: x if x is None or rows is None else x[rows]  # noqa: E731
    parts = []
    if refresh.any():
        rows = _rows(refresh)
        with kv.select(rows):
            parts.append((rows, model(take(z, rows), attention_mask=take(attention_mask, rows), t=take(t, rows),
                                      cache=kv, keep=span)))
        filled |= refresh
    if partial.any():
        rows = _rows(partial)
        pos = torch.arange(L, device=z.device)
        first = torch.where(window, pos, L).min(1).values[:, None]
        last = torch.where(window, pos, -1).max(1).values[:, None]
        own = (pos >= first) & ((pos <= last) if dual else True)  # each row's columns when alone
        compute = span if dual else (span[0], L)
        own = take(own, rows)
        own = None if bool(own[:, compute[0]:compute[1]].all()) else own
        with kv.select(rows, own):
            parts.append((rows, model(take(z, rows), attention_mask=take(attention_mask, rows), t=take(t, rows),
                                      cache=kv, compute=compute, keep=span)))
    if len(parts) == 1 and parts[0][0] is None:
        return parts[0][1]

    def merged(name):
        got = [(rows, getattr(out, name, None)) for rows, out in parts]
        if any(v is None for _, v in got):
            return None
        whole = got[0][1].new_zeros((B,) + tuple(got[0][1].shape[1:]))
        for rows, v in got:
            whole[slice(None) if rows is None else rows] = v
        return whole

    return MDMOutput(merged("log_probs"), None, merged("quality_logits"), merged("token_log_probs"))


@SAMPLERS.register("loop")
class Sampler:
    """A sampler = schedule + unmasking rule + draw (+ remasking rule), run by one loop.

    ``noise_removal``: after the last step, positions still masked (MDLM's grid ends at t = eps > 0;
    a remasking step may leave masks) take the argmax of the model's prediction, as MDLM's final
    denoising step does. ``reuse_prediction``: reuse the last prediction while the state is unchanged (MDLM's
    caching); off for time-conditioned models, whose prediction also depends on t.

    ``kv_cache`` (Fast-dLLM's approximate KV cache, Wu et al. 2025; for schedules with a window, i.e.
    semi-AR blocks): 'none'; 'prefix': a full pass at each block start (``StepPlan.block_start``)
    stores every layer's keys/values, later steps recompute only the window's columns and everything
    after them; 'dual': only the window's columns. Each step then works on those columns alone
    (remasking never touches a cached position: it stays inside the window). ``refresh = 'step'``
    makes every pass a full one, which reproduces the uncached samples exactly for count plans with
    rules that draw no random numbers (random rules draw theirs over the computed columns only: the
    same law, another stream). Batch invariance: each row's cache is its own (``cached_pass``): only
    the rows that start a block (``StepPlan.starts``) are refreshed, in a pass of their own; the
    others run a partial pass over the union of the rows' columns that writes, per row, only that
    row's own columns (its window's span; 'prefix': from its window to the end), so every row attends
    to its own fresh columns and, elsewhere, to its own last refresh, exactly as alone. ``nfe`` counts
    the steps that ran the network (a step's sub-batch passes are one evaluation of each row).
    A plan's ``threshold`` τ (parallel decoding) also unmasks every candidate whose drawn token has
    probability ≥ τ, beyond the planned count. ``forbid_tokens`` (LLaDA's ``logits_eos_inf`` with
    EOS): those tokens get probability 0 and the rest are renormalised before the draw and the rules
    (``forbid``), so they are never generated (the final noise removal excepted).

    ``window_logits``: without a KV cache, a pass still computes every position (full attention) but
    the output layer and the SUBS softmax only on the columns the step may change (the span of the
    rows' windows), for models that take ``keep=`` (``MDM.supports_keep``) and remasking rules that
    run no network of their own. The same decisions, except that random rules draw over those
    columns (the same law, another stream).
    """

    def __init__(
        self,
        schedule: Schedule,
        unmask_rule: Optional[UnmaskRule] = None,
        draw: Optional[CategoricalDraw] = None,
        noise_removal: bool = True,
        reuse_prediction: bool = True,
        remask_rule=None,
        kv_cache: str = "none",
        refresh: str = "block",
        window_logits: bool = True,
        forbid_tokens: Sequence[int] = (),
    ):
        check_kv_cache(kv_cache, refresh)
        self.forbid_tokens = tuple(int(t) for t in forbid_tokens)
        self.window_logits = window_logits
        self.schedule = schedule
        self.unmask_rule = unmask_rule or RandomUnmask()
        self.draw = draw or CategoricalDraw()
        self.noise_removal, self.reuse_prediction = noise_removal, reuse_prediction
        self.remask_rule = remask_rule
        self.kv_cache, self.refresh = kv_cache, refresh

    def check_model(self, model) -> None:
        """Refuse, before any pass, a KV cache the model or the remasking rule cannot work with."""
        if self.kv_cache == "none":
            return
        if not getattr(model, "supports_kv_cache", False):
            backbone = getattr(model, "backbone", model)
            raise ValueError(f"kv_cache = {self.kv_cache!r} needs a backbone (and head) with a KV cache; "
                             f"{type(backbone).__name__} has none: use cache = 'none'")
        if getattr(self.remask_rule, "extra_passes", 0):
            raise ValueError(f"kv_cache = {self.kv_cache!r} cannot serve {type(self.remask_rule).__name__}, "
                             "which runs a network of its own on the whole sequence: use cache = 'none'")

    @torch.no_grad()
    def __call__(self, model, batch, generator: Optional[torch.Generator] = None, trace: bool = False) -> SampleOutput:
        self.check_model(model)
        mask_id = model.mask_id
        fixed = batch["fixed"].bool()
        attention_mask = batch.get("attention_mask")
        z = torch.where(fixed, batch["input_ids"], torch.full_like(batch["input_ids"], mask_id))
        state = SamplerState(z, fixed, mask_id, generator)
        state.attention_mask = attention_mask  # rules that run a network of their own pass it on
        state.draw_probs_kept = bool(getattr(self.draw, "keep_probs", False))
        B, L = z.shape
        reuse = self.reuse_prediction and not getattr(model, "time_conditioned", False)
        kv = None if self.kv_cache == "none" else KVCache(batch_size=B)
        filled = torch.zeros(B, dtype=torch.bool, device=z.device)  # rows whose cache a refresh has filled
        narrow = kv is None and self.window_logits and getattr(model, "supports_keep", False) \
            and not getattr(self.remask_rule, "extra_passes", 0)
        nfe, out, out_span, steps = 0, None, None, []

        def predict(t: float, plan=None, span=None):
            nonlocal nfe
            nfe += 1
            tt = torch.full((B,), t, device=z.device)
            if span is None or span == (0, L) and kv is None:
                return model(state.z, attention_mask=attention_mask, t=tt)
            if kv is None:  # the whole sequence computed, its outputs only on the window's columns
                return model(state.z, attention_mask=attention_mask, t=tt, keep=span)
            return cached_pass(model, state.z, attention_mask, tt, kv, filled, plan, span,
                               dual=self.kv_cache == "dual", every_step=self.refresh == "step")

        for i, plan in enumerate(self.schedule.plans(state)):
            state.step = i
            if not state.masked.any() and not plan.may_remask:
                if self.schedule.remasks:
                    continue
                break
            span = column_span(plan.window, L) if kv is not None or narrow else (0, L)
            if span[0] == span[1]:
                continue
            # (with window-only logits a moved window needs a pass even when the state is unchanged)
            if out is None or not reuse or span != out_span or (kv is not None and plan.block_start):
                out, out_span = predict(plan.t, plan, span), span
            lo, hi = span
            view = span_view(state, lo, hi) if span != (0, L) else state
            new_z, unmask, remask, extra = self.step(model, view, out, plan, lo, hi, generator)
            nfe += extra
            if trace:
                steps.append(self._trace(i, plan, state, view, unmask, remask, lo, hi))
            if view is not state:
                state.confidence[:, lo:hi] = view.confidence
                state.draw_confidence[:, lo:hi] = view.draw_confidence
                new_z = torch.cat([state.z[:, :lo], new_z, state.z[:, hi:]], 1)
            else:
                state.confidence, state.draw_confidence = view.confidence, view.draw_confidence
            if not torch.equal(new_z, state.z):
                state.z = new_z
                out = None
        masked = state.masked
        if self.noise_removal and masked.any():
            if out is None or not reuse or out_span != (0, L):
                out = predict(self.schedule.final_t)
            state.z = torch.where(masked, out.log_probs.argmax(-1), state.z)
        return SampleOutput(tokens=state.z, nfe=nfe, trace=steps)

    def step(self, model, view: SamplerState, out, plan, lo: int, hi: int, generator):
        """One step on ``view`` (the state, or its columns lo … hi−1 with ``out`` covering the same):
        draw at the masked positions in the window, unmask by the rule (plus every candidate at or
        above the plan's threshold), remask by the remasking rule. Returns (z after the step, unmasked,
        remasked, extra network passes); updates ``view.confidence``."""
        mask_id, fixed = view.mask_id, view.fixed
        masked, clean = view.masked, view.clean
        if self.forbid_tokens:
            out = forbid(out, self.forbid_tokens)
        view.log_probs, view.token_log_probs = out.log_probs, getattr(out, "token_log_probs", None)
        view.quality = getattr(out, "quality_logits", None)
        window = plan.window[:, lo:hi] if plan.window is not None else torch.ones_like(masked)
        cols = lambda p: p[:, lo:hi] if p is not None and p.dim() == 2 else p  # noqa: E731  per-position plans
        # tokens only where one may change (masked, in the window); elsewhere the state as it is
        tokens = self.draw(out.log_probs, generator, positions=masked & window, fill=view.z)
        token_p = out.log_probs.gather(-1, tokens[..., None]).squeeze(-1).double().exp()
        candidates = masked & window
        unmask = choose(plan.n_unmask, cols(plan.p_unmask), candidates,
                        lambda: self.unmask_rule.scores(out.log_probs, tokens, view.z, generator), generator)
        if plan.threshold is not None:  # parallel decoding: every confident enough candidate as well
            unmask = unmask | (candidates & (token_p >= plan.threshold))
        x_hat = torch.where(unmask, tokens, view.z)
        remask = torch.zeros_like(unmask)
        extra = 0
        if plan.may_remask:
            if self.remask_rule is None and plan.n_remask is not None:
                raise ValueError("this schedule remasks by count: give the sampler a remask_rule")
            remask_candidates = ((x_hat != mask_id) & ~fixed if plan.remask_fresh else clean) & window

            def remask_scores():
                nonlocal extra
                extra += getattr(self.remask_rule, "extra_passes", 0)
                return self.remask_rule.scores(model, view, x_hat, generator)

            remask = choose(plan.n_remask, cols(plan.p_remask), remask_candidates, remask_scores, generator)
        view.confidence = torch.where(unmask, token_p, view.confidence).masked_fill(remask, float("nan"))
        drawn = getattr(self.draw, "token_probs", None) if getattr(self.draw, "keep_probs", False) else None
        if drawn is not None:
            view.draw_confidence = torch.where(unmask, drawn.to(view.draw_confidence), view.draw_confidence)
            view.draw_confidence = view.draw_confidence.masked_fill(remask, float("nan"))
        return torch.where(remask, torch.full_like(x_hat, mask_id), x_hat), unmask, remask, extra

    @staticmethod
    def _trace(i, plan, state, view, unmask, remask, lo, hi):
        """The step's record in whole-sequence coordinates (quality NaN outside the computed columns)."""
        def full(a, fill):
            if a.shape[1] == state.z.shape[1]:
                return a.cpu().clone()
            whole = torch.full(state.z.shape, fill, dtype=a.dtype)
            whole[:, lo:hi] = a.cpu()
            return whole
        quality = None if view.quality is None else full(torch.sigmoid(view.quality.float()), float("nan"))
        return {"step": i, "t": plan.t, "z": state.z.cpu().clone(), "unmasked": full(unmask, False),
                "remasked": full(remask, False), "quality": quality}

@SAMPLERS.register("mdlm")
def mdlm_sampler(
    steps: int = 128, eps: float = 1e-5, temperature: float = 1.0, top_p: float = 1.0, noise_removal: bool = True,
    noise=None,
) -> Sampler:
    """MDLM's ancestral sampler: ``schedules.mdlm`` (Binomial((α_s − α_t)/(1 − α_t)) unmasking) with
    uniformly random positions, categorical draws at the masked positions (``draws.categorical``),
    caching of unchanged steps."""
    return Sampler(MDLMSchedule(steps, eps, noise), RandomUnmask(), CategoricalDraw(temperature, top_p), noise_removal)
