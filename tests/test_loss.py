import math

import pytest
import torch

from prism.losses.mdm import MDLMLoss
from prism.masking import limit_to_window, mask_tokens, sample_t
from prism.model import MDM, subs_log_probs
from prism.backbones.dit import DiT


def hand_case():
    """V = 3 with mask id 2; log-probs chosen by hand at the masked positions: (log_probs, x, masked,
    fixed, t)."""
    x = torch.tensor([[0, 1, 0], [1, 1, 0]])
    masked = torch.tensor([[True, False, True], [False, True, False]])
    fixed = torch.tensor([[False, False, False], [False, False, True]])
    t = torch.tensor([0.5, 0.25])
    probs = torch.full((2, 3, 3), 1 / 3)
    probs[0, 0] = torch.tensor([0.7, 0.3, 0.0])
    probs[0, 2] = torch.tensor([0.2, 0.8, 0.0])
    probs[1, 1] = torch.tensor([0.4, 0.6, 0.0])
    return probs.log(), x, masked, fixed, t


def test_nelbo_hand_computed():
    log_probs, x, masked, fixed, t = hand_case()
    out = MDLMLoss.nelbo(log_probs, x, masked, fixed, 1 / t)
    # Σ_masked (1/t) · −log p(x_i), over the 5 non-fixed positions
    expected = ((-math.log(0.7) - math.log(0.2)) / 0.5 + (-math.log(0.6)) / 0.25) / 5
    assert math.isclose(out.loss.item(), expected, rel_tol=1e-6)
    assert math.isclose(out.logs["masked_ce"].item(), (-math.log(0.7) - math.log(0.2) - math.log(0.6)) / 3, rel_tol=1e-6)
    assert math.isclose(out.logs["masked_acc"].item(), 2 / 3, rel_tol=1e-6)  # argmax right at (0,0) and (1,1)


def test_nelbo_per_sequence_as_llada_sft():
    """normalize='sequence': each row's Σ (1/t)·CE over its own count of maskable positions (the
    answer with its EOS padding), then the mean over rows (LLaDA GUIDELINES.md)."""
    log_probs, x, masked, fixed, t = hand_case()
    out = MDLMLoss.nelbo(log_probs, x, masked, fixed, 1 / t, normalize="sequence")
    row0 = (-math.log(0.7) - math.log(0.2)) / 0.5 / 3  # 3 maskable positions
    row1 = (-math.log(0.6)) / 0.25 / 2  # 2 maskable positions (the last is fixed)
    assert math.isclose(out.loss.item(), (row0 + row1) / 2, rel_tol=1e-6)
    with pytest.raises(ValueError, match="normalize"):
        MDLMLoss(normalize="batch")


def test_mask_window_keeps_masks_among_the_first_answer_positions():
    fixed = torch.tensor([[True, True, False, False, False, False], [True, False, False, False, False, False]])
    limited = limit_to_window(fixed, 3)
    assert limited.tolist() == [[True, True, False, False, False, True], [True, False, False, False, True, True]]
    assert torch.equal(limit_to_window(fixed, None), fixed)
    x = torch.zeros(2, 6, dtype=torch.long)
    z, masked = mask_tokens(x, torch.ones(2), mask_id=9, fixed=limited, generator=torch.Generator().manual_seed(0))
    assert masked.sum(1).tolist() == [3, 3] and not (masked & limited).any()  # t = 1: the whole window


def test_subs_parameterisation():
    logits = torch.randn(1, 3, 4)
    ids = torch.tensor([[3, 1, 3]])  # mask id 3
    lp = subs_log_probs(logits, ids, mask_id=3)
    assert torch.isneginf(lp[..., 3]).all()  # zero masking probability
    assert torch.allclose(lp[0, 0].exp().sum(), torch.tensor(1.0))
    assert lp[0, 1, 1] == 0 and torch.isneginf(lp[0, 1, [0, 2, 3]]).all()  # carry-over


def test_antithetic_t_covers_each_stratum_once():
    g = torch.Generator().manual_seed(0)
    t = sample_t(8, eps=1e-3, antithetic=True, generator=g)
    u = (t - 1e-3) / (1 - 1e-3)
    assert sorted((u * 8).floor().long().tolist()) == list(range(8))
    assert t.min() >= 1e-3 and t.max() <= 1


def test_masking_rate_is_t_and_fixed_never_masked():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 5, (4000, 50))
    fixed = torch.zeros_like(x, dtype=torch.bool); fixed[:, :10] = True
    t = torch.full((4000,), 0.3)
    z, masked = mask_tokens(x, t, mask_id=0, fixed=fixed, generator=g)
    assert not masked[:, :10].any() and (z[:, :10] == x[:, :10]).all()
    rate = masked[:, 10:].float().mean().item()
    assert abs(rate - 0.3) < 0.005  # std ≈ 0.0011 for 160k Bernoulli(0.3)
    assert (z[masked] == 0).all() and (z[~masked] == x[~masked]).all()


def test_loss_end_to_end_matches_formula_on_a_real_model():
    torch.manual_seed(0)
    model = MDM(DiT(vocab_size=11, mask_id=0, preset="test"))
    x = torch.randint(1, 10, (4, 89)); fixed = torch.zeros_like(x, dtype=torch.bool); fixed[:, :5] = True
    batch = {"input_ids": x, "fixed": fixed}
    out = MDLMLoss()(model, batch, torch.Generator().manual_seed(3))
    # replay the same randomness by hand
    g = torch.Generator().manual_seed(3)
    t = sample_t(4, 1e-3, True, g)
    z, masked = mask_tokens(x, t, 0, fixed, g)
    lp = model(z).log_probs
    nll = -lp.gather(-1, x[..., None]).squeeze(-1)
    expected = (nll * masked / t[:, None]).sum() / (~fixed).sum()
    assert torch.allclose(out.loss, expected)
    out.loss.backward()  # differentiable


def test_cosine_noise_schedule_hand_computed():
    from prism.masking import Cosine, LogLinear
    from prism.samplers.schedules import MDLMSchedule

    t = torch.tensor([0.5])
    c = Cosine()
    assert math.isclose(c.alpha(t).item(), math.cos(math.pi / 4), rel_tol=1e-6)
    # −α'/(1 − α) at t = 1/2: (π/2)·sin(π/4) / (1 − cos(π/4))
    assert math.isclose(c.weight(t).item(), (math.pi / 2) * math.sin(math.pi / 4) / (1 - math.cos(math.pi / 4)), rel_tol=1e-6)
    assert math.isclose(LogLinear().weight(t).item(), 2.0)
    s = MDLMSchedule(steps=2, eps=0.0, noise=c)  # grid 1, 0.5, 0
    assert math.isclose(s.unmask_probability(0), math.cos(math.pi / 4), rel_tol=1e-9)  # (α_.5 − 0)/(1 − 0)
    assert math.isclose(s.unmask_probability(1), 1.0, rel_tol=1e-9)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(1, 5, (2000, 50))
    _, masked = mask_tokens(x, torch.full((2000,), 0.5), 0, None, g, noise=c)
    assert abs(masked.float().mean().item() - (1 - math.cos(math.pi / 4))) < 0.005
