"""Fast semi-AR decoding (Fast-dLLM, Wu et al. 2025) in ``samplers.semi_ar``: the KV cache
(``cache = 'prefix' | 'dual'``) and parallel decoding (``threshold``), with and without PRISM
remasking. Exactness: a cache refreshed at every step reproduces the uncached samples; a threshold no
drawn token reaches reproduces the planned sampler; a threshold every token passes finishes each
block in one step. Refusals come before any pass."""
from types import SimpleNamespace

import pytest
import torch

from prism.backbones.llada import LLaDABackbone
from prism.heads.quality import LinearHead
from prism.model import MDM
from prism.samplers.remask import LowConfidenceRemask, PRISMRemask, RandomRemask
from prism.samplers.semi_ar import semi_ar_sampler


def tiny_llada(seed=0, head=True):
    torch.manual_seed(seed)
    backbone = LLaDABackbone(preset="tiny")
    model = MDM(backbone, head=LinearHead if head else None).eval()
    with torch.no_grad():  # a non-trivial head (its output layer starts at zero)
        for p in model.head.parameters() if head else ():
            p.normal_(0.0, 0.3)
    return model


def batch(model, lengths=(6, 3, 9), gen_length=24, seed=1):
    """Left-padded prompts of the given lengths, then gen_length masks (the LLaDA layout)."""
    g = torch.Generator().manual_seed(seed)
    P, B = max(lengths), len(lengths)
    ids = torch.full((B, P + gen_length), model.mask_id, dtype=torch.long)
    seen = torch.ones(B, P + gen_length, dtype=torch.bool)
    for r, n in enumerate(lengths):
        ids[r, :P - n] = 0
        seen[r, :P - n] = False
        ids[r, P - n:P] = torch.randint(1, model.mask_id, (n,), generator=g)
    fixed = torch.zeros_like(ids, dtype=torch.bool)
    fixed[:, :P] = True
    return {"input_ids": ids, "fixed": fixed, "attention_mask": seen}


def run(model, b, seed=0, **kw):
    sampler = semi_ar_sampler(**kw)
    return sampler(model, b, torch.Generator().manual_seed(seed))


# Random remasking is left out of the exactness check by design: with a cache, the rule draws its
# uniforms over the computed columns only, so the stream (not the law) differs from the uncached one.
REMASKS = {"off": dict(), "prism": dict(remask_per_block=3),
           "low_conf": dict(remask_per_block=2, remask_rule=LowConfidenceRemask())}


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("remask", list(REMASKS))
@pytest.mark.parametrize("temperature,threshold", [(0.0, None), (1.0, None), (0.0, 0.02)])
def test_cache_refreshed_every_step_reproduces_the_uncached_sampler(cache, remask, temperature, threshold):
    model = tiny_llada()
    b = batch(model)
    kw = dict(steps=12, block_length=8, temperature=temperature, threshold=threshold, **REMASKS[remask])
    ref = run(model, b, **kw)
    got = run(model, b, cache=cache, refresh="step", **kw)
    assert torch.equal(got.tokens, ref.tokens)
    assert got.nfe == ref.nfe
    assert not (got.tokens == model.mask_id).any()


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_block_refresh_only_touches_the_current_block_and_keeps_the_prompt(cache):
    model = tiny_llada()
    b = batch(model)
    out = run(model, b, steps=12, block_length=8, remask_per_block=3, cache=cache)
    fixed = b["fixed"]
    assert torch.equal(out.tokens[fixed], b["input_ids"][fixed])
    assert not (out.tokens[~fixed] == model.mask_id).any()
    # the first step of each block is a full pass, so it decides exactly as the uncached sampler
    sampler = semi_ar_sampler(steps=12, block_length=8, remask_per_block=3, cache=cache)
    traced = sampler(model, b, torch.Generator().manual_seed(0), trace=True)
    plain = semi_ar_sampler(steps=12, block_length=8, remask_per_block=3)(model, b, torch.Generator().manual_seed(0),
                                                                        trace=True)
    assert torch.equal(traced.trace[0]["unmasked"], plain.trace[0]["unmasked"])
    for step in traced.trace:  # nothing outside the step's block ever changes
        window = step["unmasked"] | step["remasked"]
        assert not (window & fixed).any()


def test_a_threshold_nothing_reaches_reproduces_the_planned_sampler():
    model = tiny_llada()  # random weights over 128 tokens: no drawn token comes near p = 1
    b = batch(model)
    for remask in ("off", "prism"):
        kw = dict(steps=12, block_length=8, **REMASKS[remask])
        ref = run(model, b, **kw)
        got = run(model, b, threshold=1.0, **kw)
        assert torch.equal(got.tokens, ref.tokens) and got.nfe == ref.nfe


class Peaked:
    """A fake MDM: at every position the token (position mod 7) + 1 with probability ``p``, the rest
    spread evenly (no mask token); counts its passes."""

    time_conditioned, supports_kv_cache = False, False

    def __init__(self, p, vocab=16, mask_id=15):
        self.p, self.vocab, self.mask_id, self.calls = p, vocab, mask_id, 0

    def __call__(self, z, attention_mask=None, t=None):
        self.calls += 1
        B, L = z.shape
        probs = torch.full((B, L, self.vocab), (1 - self.p) / (self.vocab - 2), dtype=torch.float64)
        probs[..., self.mask_id] = 0.0
        probs.scatter_(-1, (torch.arange(L) % 7 + 1).expand(B, L)[..., None], self.p)
        return SimpleNamespace(log_probs=probs.log(), quality_logits=None, token_log_probs=None)


def test_a_threshold_every_token_passes_finishes_each_block_in_one_step():
    model = Peaked(0.95)
    b = batch(model, lengths=(4, 4), gen_length=32)
    out = run(model, b, steps=32, block_length=8, threshold=0.9)
    assert out.nfe == 4  # 4 blocks, one pass each
    gen = out.tokens[:, 4:]
    assert torch.equal(gen, (torch.arange(4, 36) % 7 + 1).expand(2, 32))
    slow = run(model, b, steps=32, block_length=8, threshold=0.97)  # nobody passes: one token a step
    assert slow.nfe == 32 and torch.equal(slow.tokens, out.tokens)


@pytest.mark.parametrize("rule", [PRISMRemask(), RandomRemask()])
def test_threshold_with_remasking_and_a_cache_completes_every_block(rule):
    model = tiny_llada()
    b = batch(model)
    out = run(model, b, steps=12, block_length=8, remask_per_block=3, remask_rule=rule, threshold=0.02,
              cache="dual")
    assert not (out.tokens == model.mask_id).any()
    assert torch.equal(out.tokens[b["fixed"]], b["input_ids"][b["fixed"]])
    assert out.nfe <= 12


def test_refusals_come_before_any_pass():
    model = Peaked(0.5)
    b = batch(model)
    with pytest.raises(ValueError, match="cache = 'none'"):
        run(model, b, steps=12, block_length=8, cache="dual")
    assert model.calls == 0
    with pytest.raises(ValueError, match="kv_cache must be one of"):
        semi_ar_sampler(cache="both")
    with pytest.raises(ValueError, match="threshold must be in"):
        semi_ar_sampler(threshold=1.5)
    critic = SimpleNamespace(extra_passes=1)
    sampler = semi_ar_sampler(steps=12, block_length=8, remask_per_block=2, remask_rule=critic, cache="prefix")
    llada = tiny_llada()
    with pytest.raises(ValueError, match="network of its own"):
        sampler(llada, batch(llada), torch.Generator().manual_seed(0))


def ragged_batch(model, gen_lengths=(24, 8, 16), prompt=4, seed=2):
    """Right-padded rows whose generated spans differ (3, 1 and 2 blocks of 8): rows in different
    blocks at the same step."""
    g = torch.Generator().manual_seed(seed)
    L = prompt + max(gen_lengths)
    ids = torch.zeros(len(gen_lengths), L, dtype=torch.long)
    fixed = torch.ones_like(ids, dtype=torch.bool)
    seen = torch.zeros_like(fixed)
    for r, n in enumerate(gen_lengths):
        ids[r, :prompt] = torch.randint(1, model.mask_id, (prompt,), generator=g)
        ids[r, prompt:prompt + n] = model.mask_id
        fixed[r, prompt:prompt + n] = False
        seen[r, :prompt + n] = True
    return {"input_ids": ids, "fixed": fixed, "attention_mask": seen}


@pytest.mark.parametrize("remask", ["off", "prism"])
def test_threshold_rows_keep_their_own_blocks_and_never_exceed_the_steps(remask):
    model = tiny_llada()
    b = ragged_batch(model)
    kw = dict(steps=12, block_length=8, **REMASKS[remask])
    ref = run(model, b, **kw)
    got = run(model, b, threshold=1.0, **kw)  # nothing reaches p = 1: the planned decisions
    assert torch.equal(got.tokens, ref.tokens)
    assert got.nfe <= ref.nfe <= 12
    for cache in ("prefix", "dual"):
        exact = run(model, b, threshold=1.0, cache=cache, refresh="step", **kw)
        assert torch.equal(exact.tokens, ref.tokens) and exact.nfe == got.nfe


class Spy:
    """Wraps a model and records, per pass, whether it was a refresh (full) or a partial pass."""

    def __init__(self, model):
        self.model, self.passes = model, []

    def __getattr__(self, name):
        return getattr(self.model, name)

    def __call__(self, z, **kw):
        self.passes.append(("full" if kw.get("compute") is None else "partial", kw.get("compute"), kw.get("keep")))
        return self.model(z, **kw)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_block_refresh_runs_one_full_pass_per_block_then_partial_passes_over_the_block(cache):
    model = tiny_llada()
    b = batch(model)  # prompts padded to 9, then 3 blocks of 8
    spy = Spy(model)
    out = semi_ar_sampler(steps=12, block_length=8, remask_per_block=3, cache=cache)(
        spy, b, torch.Generator().manual_seed(0))
    kinds = [p[0] for p in spy.passes]
    assert kinds == ["full", "partial", "partial", "partial"] * 3 and out.nfe == 12
    L = b["input_ids"].shape[1]
    for blk in range(3):
        lo, hi = 9 + 8 * blk, 17 + 8 * blk
        assert spy.passes[4 * blk][2] == (lo, hi)  # the refresh keeps the block's outputs only
        for _, compute, keep in spy.passes[4 * blk + 1:4 * blk + 4]:
            assert keep == (lo, hi) and compute == ((lo, hi) if cache == "dual" else (lo, L))
