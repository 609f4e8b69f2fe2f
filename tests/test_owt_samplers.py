"""The OWT samplers as the authors' code runs them (ReMDM: kuleshov-group/remdm; PRISM's OWT code),
each reading against hand-computed cases: the nucleus ('within' | 'reach'), ReMDM-conf's stored
confidence (after the nucleus), ReMDM-loop's α at the phase boundaries, PRISM-OWT's capped rate and
exact per-step clean counts."""
import math
from types import SimpleNamespace

import pytest
import torch

from prism import ops
from prism.ops import categorical_draw, gumbel_max, nucleus_filter
from prism.samplers.draw import CategoricalDraw
from prism.samplers.prism import PRISMSchedule, prism_owt_sampler
from prism.samplers.remdm import ReMDMSchedule, remdm_sampler


def kept(probs, p, nucleus):
    lp = torch.tensor(probs, dtype=torch.float64).log()
    return torch.isfinite(nucleus_filter(lp[None], p, nucleus))[0].nonzero().flatten().tolist()


# ---- nucleus: 'within' (the authors' cumsum <= p, top token always) vs 'reach' ----------------

def test_nucleus_kept_sets_by_hand():
    # sorted sums .5, .8, .95: 'within' stops at .8 <= .9; 'reach' also keeps the token that crosses .9
    assert kept([0.5, 0.3, 0.15, 0.05], 0.9, "within") == [0, 1]
    assert kept([0.5, 0.3, 0.15, 0.05], 0.9, "reach") == [0, 1, 2]
    # a sum that hits p exactly (dyadic): both readings keep the same set
    assert kept([0.5, 0.25, 0.125, 0.125], 0.75, "within") == kept([0.5, 0.25, 0.125, 0.125], 0.75, "reach") == [0, 1]
    # the top token alone: above p, 'within' keeps it anyway (the authors' mask[..., 0] = True)
    assert kept([0.03, 0.95, 0.02], 0.9, "within") == [1] and kept([0.03, 0.95, 0.02], 0.9, "reach") == [1]
    assert kept([0.6, 0.3, 0.1], 0.8, "within") == [0] and kept([0.6, 0.3, 0.1], 0.8, "reach") == [0, 1]


def test_nucleus_ties_by_token_index():
    # sixteenths 3, 1, 3, 6, 3: sorted 6 (token 3), then the three 3s (tokens 0, 2, 4) by index
    probs = [3 / 16, 1 / 16, 3 / 16, 6 / 16, 3 / 16]
    assert kept(probs, 0.6, "within") == [0, 3]  # 6/16, 9/16 <= .6 < 12/16: one of the tied, the lowest index
    assert kept(probs, 0.6, "reach") == [0, 2, 3]  # mass before: 0, 6/16, 9/16 < .6
    assert kept(probs, 0.8, "within") == [0, 2, 3]  # 12/16 <= .8 < 15/16
    assert kept(probs, 0.8, "reach") == [0, 2, 3, 4]


def test_nucleus_past_the_top_k_shortcut_both_readings():
    V = 3 * ops.NUCLEUS_TOP_K
    # a peaked row decided by the top k, with a tie across the boundary: .4 (token 2000), .25 (5 and 3000)
    peaked = torch.full((V,), 0.1 / (V - 3), dtype=torch.float64)
    peaked[2000], peaked[5], peaked[3000] = 0.4, 0.25, 0.25
    lp = peaked.log()[None]
    assert torch.isfinite(nucleus_filter(lp, 0.7, "within"))[0].nonzero().flatten().tolist() == [5, 2000]
    assert torch.isfinite(nucleus_filter(lp, 0.7, "reach"))[0].nonzero().flatten().tolist() == [5, 2000, 3000]
    # a uniform row: the top k hold 1/3 < p, so the full sort decides; all tied, the lowest indices kept
    flat = torch.full((1, V), -math.log(V), dtype=torch.float64)
    p = (V // 2 + 0.5) / V
    assert torch.isfinite(nucleus_filter(flat, p, "within"))[0].nonzero().flatten().tolist() == list(range(V // 2))
    assert torch.isfinite(nucleus_filter(flat, p, "reach"))[0].nonzero().flatten().tolist() == list(range(V // 2 + 1))
    # random rows against a full stable sort, float32 and both readings
    gen = torch.Generator().manual_seed(0)
    rows = torch.cat([(torch.randn(3, V, generator=gen, dtype=torch.float64) * 4).log_softmax(-1),
                      (torch.randn(3, V, generator=gen, dtype=torch.float64) * 0.1).log_softmax(-1)]).float()
    for nucleus in ("within", "reach"):
        values, order = torch.sort(rows.double(), dim=-1, descending=True, stable=True)
        through = values.exp().cumsum(-1)
        keep = through <= 0.9 if nucleus == "within" else (through - values.exp()) < 0.9
        keep[:, 0] = True
        ref = torch.zeros_like(keep).scatter(-1, order, keep)
        assert torch.equal(torch.isfinite(nucleus_filter(rows, 0.9, nucleus)), ref), nucleus
    with pytest.raises(ValueError):
        nucleus_filter(rows, 0.9, "top")


@pytest.mark.parametrize("draw", [categorical_draw, gumbel_max])
def test_draw_probabilities_after_the_nucleus(draw):
    # .5, .3, .2 with p = .85: 'within' keeps tokens 0 and 1, renormalised .625 and .375
    lp = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64).log().expand(400, 3)
    x, pr = draw(lp, torch.Generator().manual_seed(0), top_p=0.85, return_probs=True)
    assert set(x.tolist()) == {0, 1}
    assert torch.allclose(pr, torch.where(x == 0, 0.625, 0.375).double())
    x, pr = draw(lp, torch.Generator().manual_seed(0), top_p=0.85, nucleus="reach", return_probs=True)
    assert set(x.tolist()) == {0, 1, 2} and torch.allclose(pr, lp.exp().gather(1, x[:, None]).squeeze(1))
    pos = torch.tensor([True, False] * 200)
    x, pr = draw(lp, torch.Generator().manual_seed(0), temperature=0.0, top_p=0.85, positions=pos,
                 fill=torch.full((400,), 7), return_probs=True)
    assert (x[pos] == 0).all() and (x[~pos] == 7).all()
    assert torch.allclose(pr[pos], torch.tensor(0.625, dtype=torch.float64)) and pr[~pos].isnan().all()


# ---- ReMDM-conf: the stored confidence is after the nucleus -----------------------------------

def test_remdm_conf_stores_the_probability_after_the_nucleus():
    """ReMDM-conf remasks by the probability each token had under the law it was drawn from (after the
    nucleus filter): one step of the real loop, then the next plan's σ weights by hand."""
    from prism.samplers.loop import SamplerState
    from prism.samplers.schedules import StepPlan

    lp = torch.tensor([float("-inf"), math.log(0.5), math.log(0.3), math.log(0.2)], dtype=torch.float64)
    log_probs = lp.expand(1, 4, 4)  # mask id 0; tokens 1, 2, 3 with .5, .3, .2
    for after in (True, False):
        sampler = remdm_sampler(steps=4, strategy="conf", eps=0.0, top_p=0.85, conf_after_nucleus=after)
        state = SamplerState(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 4, dtype=torch.bool), 0, None)
        state.draw_probs_kept = bool(sampler.draw.keep_probs)
        plans = sampler.schedule.plans(state)
        next(plans)  # step 0 from the all-masked state
        two = StepPlan(1.0, 0.75, n_unmask=torch.tensor([2]))  # the loop's step: unmask two positions
        new_z, unmask, _, _ = sampler.step(None, state, SimpleNamespace(log_probs=log_probs), two, 0, 4,
                                           torch.Generator().manual_seed(1))
        state.z = new_z
        plan = next(plans)  # step 1: t = .75 → s = .5, σ_max = min(1, .5/.25) = 1
        kept = state.z[0][unmask[0]]
        assert set(kept.tolist()) <= {1, 2}  # token 3 is outside the nucleus
        p_model = lp.exp()[kept]
        conf = p_model / 0.8 if after else p_model  # renormalised over the kept {.5, .3}, or before
        w = torch.softmax(-conf, 0) * 1.0
        assert torch.allclose(plan.p_remask[0][unmask[0]], w) and (plan.p_remask[0][~unmask[0]] == 0).all(), after


def test_remdm_conf_runs_end_to_end():
    class Three:
        mask_id, time_conditioned = 0, False

        def __call__(self, z, attention_mask=None, t=None):
            lp = torch.tensor([float("-inf"), math.log(0.5), math.log(0.3), math.log(0.2)])
            return SimpleNamespace(log_probs=lp.expand(*z.shape, 4).clone())

    b = {"input_ids": torch.zeros(4, 16, dtype=torch.long), "fixed": torch.zeros(4, 16, dtype=torch.bool)}
    out = remdm_sampler(steps=8, strategy="conf", top_p=0.85)(Three(), b, torch.Generator().manual_seed(0))
    assert ((out.tokens == 1) | (out.tokens == 2)).all()  # token 3 is outside the 'within' nucleus


# ---- ReMDM-loop: α at the phase boundaries -----------------------------------------------------

def test_remdm_loop_alpha_at_the_phase_boundaries():
    # N = 10, grid 1, .9, ..., 0; t_on = .55, t_off = .15, α_on = .9, η = .02
    def plan(reading, i):
        s = ReMDMSchedule(10, "loop", eta=0.02, t_on=0.55, t_off=0.15, alpha_on=0.9, eps=0.0, loop_alpha=reading)
        state = SimpleNamespace(z=torch.zeros(1, 4, dtype=torch.long))
        p = list(s.plans(state))[i]
        return p.p_unmask.item(), p.p_remask.item()

    # step 4, t = .6 → s = .5 (crosses t_on): the phase of t is MDLM's first piece, α_t = .9·.4/.45 = .8
    # and α_s = .9·.5/.45 = 1 (extrapolated): every mask unmasks; piecewise: α_s = .9, (.9 − .8)/.2 = .5
    assert plan("phase_of_t", 4) == (pytest.approx(1.0), 0.0)
    assert plan("piecewise", 4) == (pytest.approx(0.5), 0.0)
    # step 8, t = .2 → s = .1 (crosses t_off): the phase of t is the loop, α = .9 at both, σ = η:
    # .9·.02/.1 = .18; piecewise: α_s = 1 − .1·.1/.15, (α_s − .98·.9)/.1
    assert plan("phase_of_t", 8) == (pytest.approx(0.18), pytest.approx(0.02))
    a_s = 1 - 0.1 * 0.1 / 0.15
    assert plan("piecewise", 8) == (pytest.approx((a_s - 0.98 * 0.9) / 0.1), pytest.approx(0.02))
    # away from the boundaries the readings agree: step 2 (MDLM), step 6 (loop), step 9 (last piece)
    for i in (2, 6, 9):
        assert plan("phase_of_t", i) == pytest.approx(plan("piecewise", i)), i
    assert plan("phase_of_t", 9)[0] == pytest.approx(1.0)  # 1 − α_t = .1·.1/.15, α_s = 1
    with pytest.raises(ValueError):
        ReMDMSchedule(10, "loop", loop_alpha="s")


# ---- PRISM-OWT: the capped rate and exact per-step counts --------------------------------------

def test_prism_owt_rate_hand_cases():
    s = PRISMSchedule(8, eta=0.32, step_on=4, cap=True)
    L = torch.tensor([64, 64, 64])
    # #clean 48: α_t = .75, α_s = .875, (1 − α_s)/α_t = 1/6 < .32; #clean 32: .375/.5 = .75 > .32; 0: η
    rate = s.remask_rate(torch.tensor([48, 32, 0]), L)
    assert torch.allclose(rate, torch.tensor([1 / 6, 0.32, 0.32], dtype=torch.float64))
    # #clean 60 of 64: α_s = min(60/64 + 1/8, 1) = 1: nothing remasked
    assert s.remask_rate(torch.tensor([60]), torch.tensor([64])).item() == 0.0
    assert torch.equal(PRISMSchedule(8, eta=0.32, cap=False).remask_rate(torch.tensor([48]), L[:1]),
                       torch.tensor([0.32], dtype=torch.float64))
    o = prism_owt_sampler(steps=64)
    assert o.schedule.cap and o.draw.nucleus == "within" and o.draw.top_p == 0.9


class Quality:
    """Uniform over tokens 1..4; quality lower to the right (the PRISM rule remasks the rightmost)."""

    mask_id, time_conditioned = 0, False

    def __call__(self, z, attention_mask=None, t=None):
        lp = torch.full((*z.shape, 5), -math.log(4))
        lp[..., 0] = float("-inf")
        quality = -torch.arange(z.shape[1], dtype=torch.float32).expand(z.shape).clone()
        return SimpleNamespace(log_probs=lp, quality_logits=quality, token_log_probs=torch.zeros(z.shape))


@pytest.mark.parametrize("cap", [True, False])
def test_prism_owt_steps_end_at_their_target(cap):
    N, L, B = 8, 64, 200  # η = 2.56/8 = .32, from step 4 on
    b = {"input_ids": torch.zeros(B, L, dtype=torch.long), "fixed": torch.zeros(B, L, dtype=torch.bool)}
    out = prism_owt_sampler(steps=N, cap=cap)(Quality(), b, torch.Generator().manual_seed(0), trace=True)
    short = 0
    for i, st in enumerate(out.trace):
        target = math.ceil(L * (i + 1) / N)
        after = (st["z"] != 0).sum(1) + st["unmasked"].sum(1) - st["remasked"].sum(1)
        if cap:
            assert (after == target).all(), i
            assert (st["remasked"].sum(1) <= L - target).all()
            for row in range(3):  # the remasked are the worst (rightmost) clean tokens
                clean = (st["z"][row] != 0).nonzero().flatten()
                n = int(st["remasked"][row].sum())
                assert st["remasked"][row].nonzero().flatten().tolist() == (clean[len(clean) - n:].tolist() if n else [])
        else:
            assert (after <= target).all()
            short += int((after < target).sum())
    assert (out.tokens != 0).all()
    assert cap or short > 0  # uncapped, some steps end below their target
