import math
from types import SimpleNamespace

import pytest
import torch

import prism.ops as ops
from prism.samplers import Sampler, mdlm_sampler
from prism.ops import gumbel_max, nucleus_filter, select_top
from prism.samplers.draw import GumbelDraw
from prism.samplers.rules import ConfidenceUnmask
from prism.samplers.schedules import FixedCountSchedule, MDLMSchedule


class UniformModel:
    """Predicts a fixed distribution over tokens 1..V-1 everywhere; counts its forward passes."""

    mask_id = 0

    def __init__(self, vocab=5):
        self.vocab, self.calls = vocab, 0

    def __call__(self, z, attention_mask=None, t=None):
        self.calls += 1
        lp = torch.full((*z.shape, self.vocab), -math.log(self.vocab - 1))
        lp[..., 0] = float("-inf")
        return SimpleNamespace(log_probs=lp)


def test_mdlm_unmask_probability_closed_form():
    s = MDLMSchedule(steps=4, eps=1e-5)
    # grid t_i = 1 − i·(1 − eps)/4: the first step unmasks w.p. (1 − t_1)/1 = (1 − eps)/4
    assert math.isclose(s.unmask_probability(0), (1 - 1e-5) / 4, rel_tol=1e-12)
    t, u = s.time(1)
    assert math.isclose(s.unmask_probability(1), (t - u) / t, rel_tol=1e-12)


def test_unmasked_counts_follow_the_schedule_monte_carlo():
    B, L, T = 2000, 50, 10
    sampler = mdlm_sampler(steps=T)
    batch = {"input_ids": torch.zeros(B, L, dtype=torch.long), "fixed": torch.zeros(B, L, dtype=torch.bool)}
    out = sampler(UniformModel(), batch, torch.Generator().manual_seed(0), trace=True)
    grid = sampler.schedule.grid
    for i, step in enumerate(out.trace):
        still_masked = (step["z"] == 0).float().mean().item()
        # a token is still masked before step i with probability t_i / t_0 = t_i
        assert abs(still_masked - float(grid[i])) < 0.01, (i, still_masked, float(grid[i]))
    assert (out.tokens != 0).all()  # ends with no masks


def test_fixed_positions_never_change_and_no_masks_remain():
    torch.manual_seed(0)
    ids = torch.randint(1, 5, (16, 20))
    fixed = torch.rand(16, 20) < 0.4
    ids = torch.where(fixed, ids, torch.zeros_like(ids))
    for sampler in (mdlm_sampler(steps=7), Sampler(FixedCountSchedule(5), ConfidenceUnmask(), GumbelDraw())):
        out = sampler(UniformModel(), {"input_ids": ids, "fixed": fixed}, torch.Generator().manual_seed(1))
        assert (out.tokens[fixed] == ids[fixed]).all()
        assert (out.tokens != 0).all()


def test_nfe_counts_real_forward_passes_and_skips_unchanged_steps():
    model = UniformModel()
    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "fixed": torch.zeros(2, 4, dtype=torch.bool)}
    out = mdlm_sampler(steps=200)(model, batch, torch.Generator().manual_seed(0), trace=True)
    assert out.nfe == model.calls
    # a forward is needed at the first step and after each step that changed the state
    needed = sum(1 for i, s in enumerate(out.trace) if i == 0 or out.trace[i - 1]["unmasked"].any())
    last_changed = out.trace[-1]["unmasked"].any()
    final_masks = (out.trace[-1]["z"] == 0).sum() - out.trace[-1]["unmasked"].sum()
    extra = 1 if (final_masks > 0 and last_changed) else 0  # MDLM's final noise-removal pass
    assert out.nfe == needed + extra
    assert out.nfe < 200  # 8 tokens cannot change the state at more than 8 of 200 steps


def test_fixed_count_schedule_exact_counts():
    s = FixedCountSchedule(steps=4)
    n = torch.tensor([10])
    counts = []
    for i in range(4):
        k, _ = s.counts(i, n, None, None)
        counts.append(int(k)); n = n - k
    assert counts == [3, 3, 2, 2] and int(n) == 0


def test_select_top_picks_per_row():
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.3, 0.2, 0.8, 0.1]])
    cand = torch.tensor([[True, False, True, True], [True, True, True, True]])
    chosen = select_top(scores, cand, torch.tensor([2, 1]))
    assert chosen.tolist() == [[False, False, True, True], [False, False, True, False]]


def test_gumbel_max_frequencies_and_float32_noise(monkeypatch):
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    lp = probs.log().expand(200_000, 4)
    calls = []
    real_rand = torch.rand

    def spy(*args, **kwargs):
        calls.append((kwargs.get("dtype"), kwargs.get("generator").device))
        return real_rand(*args, **kwargs)

    monkeypatch.setattr(ops.torch, "rand", spy)
    x = gumbel_max(lp, torch.Generator().manual_seed(0))
    # float32 noise from a generator on the logits' device (derived from the caller's), never float64
    assert calls == [(torch.float32, torch.device("cpu"))]
    freq = torch.bincount(x, minlength=4).double() / len(x)
    assert torch.allclose(freq, probs, atol=0.005)  # std ≤ 0.0012 at n = 200k


def test_nucleus_and_temperature():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    kept = nucleus_filter(probs.log(), 0.8)
    assert torch.isfinite(kept).tolist() == [True, True, False, False]
    x = gumbel_max(probs.log().expand(100_000, 4), torch.Generator().manual_seed(0), top_p=0.8)
    freq = torch.bincount(x, minlength=4).double() / len(x)
    assert torch.allclose(freq, torch.tensor([0.625, 0.375, 0, 0], dtype=torch.float64), atol=0.006)
    assert (gumbel_max(probs.log().expand(10, 4), temperature=0.0) == 0).all()


def test_draws_are_per_sequence():
    lp = torch.full((64, 30, 5), -math.log(5.0))
    x = gumbel_max(lp, torch.Generator().manual_seed(0))
    assert len({tuple(r.tolist()) for r in x}) == 64


def test_time_conditioned_models_are_not_cached():
    model = UniformModel()
    model.time_conditioned = True
    batch = {"input_ids": torch.zeros(2, 4, dtype=torch.long), "fixed": torch.zeros(2, 4, dtype=torch.bool)}
    out = mdlm_sampler(steps=50)(model, batch, torch.Generator().manual_seed(0), trace=True)
    # one forward at every executed step (plus the final noise removal if masks remain)
    assert out.nfe == len(out.trace) + int((out.trace[-1]["z"] == 0).sum() > out.trace[-1]["unmasked"].sum())


def test_remask_counts_need_a_remask_rule():
    class Remasking(FixedCountSchedule):
        def counts(self, i, n_masked, n_clean, generator):
            n, _ = super().counts(i, n_masked, n_clean, generator)
            return n, torch.ones_like(n)

    batch = {"input_ids": torch.zeros(1, 4, dtype=torch.long), "fixed": torch.zeros(1, 4, dtype=torch.bool)}
    with pytest.raises(ValueError, match="remask_rule"):
        Sampler(Remasking(4))(UniformModel(), batch)
