"""The remasking sampler family: closed-form transition probabilities, Monte Carlo counts, NFE,
fixed positions, semi-autoregressive block order."""
import math
from types import SimpleNamespace

import pytest
import torch

from prism.samplers import Sampler
from prism.samplers.critic import token_critic_sampler
from prism.samplers.dfm import DFMSchedule, dfm_rates, dfm_sampler
from prism.samplers.draw import GumbelDraw
from prism.samplers.prism import prism_owt_sampler, prism_sampler
from prism.samplers.remask import LowConfidenceRemask, P2SelfRemask, PRISMRemask, RandomRemask
from prism.samplers.remdm import ReMDMSchedule, remdm_sampler
from prism.samplers.rules import ConfidenceUnmask, RandomUnmask
from prism.samplers.semi_ar import SemiARSchedule, semi_ar_sampler, split_evenly, spread_centered


class FakeModel:
    """A uniform posterior over tokens 1..V-1, a quality logit that is a fixed function of the
    position (lower to the right) and a critic that prefers even tokens; counts passes."""

    mask_id = 0
    time_conditioned = False

    def __init__(self, vocab=5):
        self.vocab, self.calls, self.critic_calls = vocab, 0, 0

    def __call__(self, z, attention_mask=None, t=None):
        self.calls += 1
        lp = torch.full((*z.shape, self.vocab), -math.log(self.vocab - 1))
        lp[..., 0] = float("-inf")
        quality = -torch.arange(z.shape[1], dtype=torch.float32).expand(z.shape).clone()
        return SimpleNamespace(log_probs=lp, quality_logits=quality, token_log_probs=torch.zeros(z.shape))

    def critic_logits(self, tokens, attention_mask=None):
        self.critic_calls += 1
        return (tokens % 2 == 0).float() * 2 - 1


def batch(B=8, L=30, fixed_frac=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 5, (B, L), generator=g)
    fixed = torch.rand(B, L, generator=g) < fixed_frac
    return {"input_ids": torch.where(fixed, ids, torch.zeros_like(ids)), "fixed": fixed}


# ---- closed forms ---------------------------------------------------------------------------

def plan_at(schedule, i, z=None, confidence=None):
    z = torch.zeros(1, 4, dtype=torch.long) if z is None else z
    state = SimpleNamespace(z=z, clean=z != 0, confidence=confidence, n_masked=(z == 0).sum(1),
                            n_clean=(z != 0).sum(1), n_free=torch.full((z.shape[0],), z.shape[1]), generator=None)
    for j, plan in enumerate(schedule.plans(state)):
        if j == i:
            return plan


def test_remdm_closed_forms_hand_computed():
    # grid 1, .75, .5, .25, 0 (eps = 0); step 1: α_t = .25, α_s = .5; step 2: α_t = .5, α_s = .75
    cap = plan_at(ReMDMSchedule(4, "cap", eta=0.1, eps=0.0), 1)
    assert cap.p_remask.item() == pytest.approx(0.1)  # min(.1, (1 − .5)/.25 = 2)
    assert cap.p_unmask.item() == pytest.approx((0.5 - 0.9 * 0.25) / 0.75)
    cap2 = plan_at(ReMDMSchedule(4, "cap", eta=0.4, eps=0.0), 2)
    assert cap2.p_remask.item() == pytest.approx(0.4)  # min(.4, .25/.5)
    assert cap2.p_unmask.item() == pytest.approx((0.75 - 0.6 * 0.5) / 0.5)
    cap3 = plan_at(ReMDMSchedule(4, "cap", eta=0.9, eps=0.0), 2)
    assert cap3.p_remask.item() == pytest.approx(0.5)  # the cap (1 − α_s)/α_t binds
    rescale = plan_at(ReMDMSchedule(4, "rescale", eta=0.5, eps=0.0), 2)
    assert rescale.p_remask.item() == pytest.approx(0.5 * 0.5)  # η · min(1, .25/.5)
    fb = plan_at(ReMDMSchedule(4, "forward_backward", eps=0.0), 1)
    assert fb.p_remask.item() == pytest.approx((0.5 - 0.25) / 0.25)
    assert fb.p_unmask.item() == pytest.approx(2 * (0.5 - 0.25) / 0.75)
    # loop: t_on .55, t_off .05, α_on .9: step 1 (t = .75) is an MDLM step under α(t) = .9(1 − t)/.45
    # (the 'piecewise' reading, selected explicitly; the default 'phase_of_t': tests/test_owt_samplers.py)
    loop = ReMDMSchedule(4, "loop", eta=0.02, eps=0.0, loop_alpha="piecewise")
    p1 = plan_at(loop, 1)
    a_t, a_s = 0.9 * 0.25 / 0.45, 0.9
    assert p1.p_remask.item() == 0.0 and p1.p_unmask.item() == pytest.approx((a_s - a_t) / (1 - a_t))
    p2 = plan_at(loop, 2)  # t = .5 is inside the loop: α_t = α_s = .9, σ = η
    assert p2.p_remask.item() == pytest.approx(0.02) and p2.p_unmask.item() == pytest.approx(0.9 * 0.02 / 0.1)
    # conf: σ_i = σ_max · softmax over clean positions of −confidence
    z = torch.tensor([[3, 2, 0, 0]])
    conf = plan_at(ReMDMSchedule(4, "conf", eps=0.0), 2, z, torch.tensor([[0.9, 0.5, math.nan, math.nan]], dtype=torch.float64))
    w = torch.softmax(torch.tensor([-0.9, -0.5], dtype=torch.float64), 0) * 0.5
    assert torch.allclose(conf.p_remask[0, :2], w) and (conf.p_remask[0, 2:] == 0).all()
    assert conf.p_unmask.item() == pytest.approx((0.75 - 0.5) / 0.5)  # masked positions follow MDLM


def test_dfm_closed_forms():
    s = DFMSchedule(10, eps=1e-5)
    plans = list(s.plans(SimpleNamespace(z=torch.zeros(1, 3))))
    assert plans[0].t == 1.0 and plans[0].p_unmask.item() == pytest.approx(0.1) and plans[0].p_remask.item() == 0
    p = plans[3]
    a, b = dfm_rates(p.t)
    dt = min(0.1, 1 / (a / p.t + b / (1 - p.t)))
    assert p.t - p.s == pytest.approx(dt)
    assert p.p_unmask.item() == pytest.approx(a * dt / p.t) and p.p_remask.item() == pytest.approx(b * dt / (1 - p.t))
    assert all(q.p_unmask.item() <= 1 and q.p_remask.item() <= 1 for q in plans)
    assert len(plans) > 10  # the adaptive step takes more steps than N


# ---- Monte Carlo counts ---------------------------------------------------------------------

def step_rates(out):
    """Per step: (unmasked / masked before, remasked / clean before), pooled over the batch."""
    rates = []
    for st in out.trace:
        masked = (st["z"] == 0).sum().item()
        clean = (st["z"] != 0).sum().item()
        rates.append((st["unmasked"].sum().item() / max(masked, 1), st["remasked"].sum().item() / max(clean, 1), masked, clean))
    return rates


@pytest.mark.parametrize("strategy,eta", [("cap", 0.05), ("rescale", 0.5), ("forward_backward", 0.0)])
def test_remdm_monte_carlo_rates(strategy, eta):
    sampler = remdm_sampler(steps=10, strategy=strategy, eta=eta, eps=0.0)
    b = {"input_ids": torch.zeros(4000, 20, dtype=torch.long), "fixed": torch.zeros(4000, 20, dtype=torch.bool)}
    out = sampler(FakeModel(), b, torch.Generator().manual_seed(0), trace=True)
    sched = sampler.schedule
    for i, (u, r, masked, clean) in enumerate(step_rates(out)):
        t, s = sched.time(i)
        sigma = min(1.0, sched.sigma(t, s))
        if masked > 2000:
            assert abs(u - sched.unmask_probability(t, s, sigma)) < 4 * math.sqrt(0.25 / masked), (i, u)
        if clean > 2000:
            assert abs(r - sigma) < 4 * math.sqrt(0.25 / clean) + 1e-9, (i, r, sigma)


def test_prism_algorithm_3_exact_counts_and_nfe():
    """Sudoku-like: 51 blanks, N = 51, K = 4: every step unmasks 5 and remasks 4 while
    4 < #masked < 47 (never at the last step); NFE = N; no masks at the end."""
    L, N, K = 51, 51, 4
    model = FakeModel()
    b = {"input_ids": torch.zeros(6, L, dtype=torch.long), "fixed": torch.zeros(6, L, dtype=torch.bool)}
    out = prism_sampler(steps=N, num_remask=K)(model, b, torch.Generator().manual_seed(0), trace=True)
    assert out.nfe == N == model.calls and (out.tokens != 0).all()
    for i, st in enumerate(out.trace):
        masked = (st["z"] == 0).sum(1)
        expect_remask = ((masked > K) & (masked < L - K)).long() * K if i < N - 1 else torch.zeros_like(masked)
        assert torch.equal(st["remasked"].sum(1), expect_remask), i
        # after the step exactly ⌈L (i + 1)/N⌉ = i + 1 tokens are clean
        after = (st["z"] != 0).sum(1) + st["unmasked"].sum(1) - st["remasked"].sum(1)
        assert (after == i + 1).all(), i
    # the lowest-quality (rightmost, by FakeModel) clean tokens are the ones remasked
    st = out.trace[30]
    for row in range(6):
        clean = (st["z"][row] != 0).nonzero().flatten()
        assert st["remasked"][row].nonzero().flatten().tolist() == clean[-K:].tolist()


def test_prism_algorithm_2_binomial_remasks():
    eta, N, L = 0.1, 20, 40
    b = {"input_ids": torch.zeros(3000, L, dtype=torch.long), "fixed": torch.zeros(3000, L, dtype=torch.bool)}
    out = prism_sampler(steps=N, eta=eta, step_on=5)(FakeModel(), b, torch.Generator().manual_seed(0), trace=True)
    assert (out.tokens != 0).all()
    for i, st in enumerate(out.trace):
        clean = (st["z"] != 0).sum(1).double()
        rem = st["remasked"].sum(1).double()
        if i < 5 or i == N - 1:
            assert rem.sum() == 0
        elif i > 6 and (st["z"] == 0).sum(1).min() >= 12:
            # |T| ~ Binomial(#clean, η) (checked where the guard |T| < #masked practically never binds)
            assert abs(rem.mean() - eta * clean.mean()) < 4 * math.sqrt(eta * clean.mean() / 3000) + 0.02, i


def test_prism_owt_schedule_and_loop():
    s = prism_owt_sampler(steps=64).schedule
    assert s.eta == pytest.approx(2.56 / 64) and s.step_on == 32
    N, Nl, M = 10, 5, 3
    model = FakeModel()
    b = batch(B=5, L=30)
    out = prism_sampler(steps=N, num_remask=2, loop_steps=Nl, loop_remask=M)(model, b, torch.Generator().manual_seed(0), trace=True)
    assert out.nfe == N + Nl and (out.tokens != 0).all() and (out.tokens[b["fixed"]] == b["input_ids"][b["fixed"]]).all()
    loop = out.trace[N - 1:]
    assert all((st["remasked"].sum(1) == M).all() for st in loop[:-1]) and loop[-1]["remasked"].sum() == 0
    assert all((st["unmasked"].sum(1) == (st["z"] == 0).sum(1)).all() for st in out.trace[N:])  # loop steps refill all


def test_token_critic_sampler_keeps_the_best_and_counts_both_passes():
    N, L = 6, 24
    model = FakeModel()
    b = {"input_ids": torch.zeros(4, L, dtype=torch.long), "fixed": torch.zeros(4, L, dtype=torch.bool)}
    out = token_critic_sampler(steps=N)(model, b, torch.Generator().manual_seed(0), trace=True)
    assert (out.tokens != 0).all()
    assert out.nfe == model.calls + model.critic_calls == N + (N - 1)  # no critic pass when nothing is remasked
    for i, st in enumerate(out.trace):
        after = torch.where(st["remasked"], torch.zeros_like(st["z"]), torch.where(st["unmasked"], 1, st["z"]))
        assert ((after != 0).sum(1) == math.ceil(L * (i + 1) / N)).all()


def test_semi_ar_blocks_in_order_and_counts():
    assert [int(x) for x in split_evenly(torch.tensor(10), 4)] == [3, 3, 2, 2]
    # K = 5 over S = 6 steps: the 4 inner steps get 1 each; the remainder 1 has two middle steps to
    # go to (inner indices 1 and 2) and the code puts it at mid = (inner − rem) // 2 = (4 − 1) // 2 = 1,
    # the LEFT one (floor), so [0, 1, 2, 1, 1, 0] is the answer and [0, 1, 1, 2, 1, 0] is not
    assert spread_centered(5, 6) == [0, 1, 2, 1, 1, 0]
    assert spread_centered(2, 7) == [0, 0, 1, 1, 0, 0, 0]  # rem 2 on 5 inner steps: left of centre too
    # cases with one centred answer (remainder and inner count of equal parity), and the edges
    assert spread_centered(6, 6) == [0, 1, 2, 2, 1, 0] and spread_centered(4, 5) == [0, 1, 2, 1, 0]
    assert spread_centered(8, 6) == [0, 2, 2, 2, 2, 0] and spread_centered(3, 2) == [0, 0] and spread_centered(0, 4) == [0] * 4
    assert sum(spread_centered(7, 5)) == 7 and spread_centered(7, 5)[0] == spread_centered(7, 5)[-1] == 0
    L, prompt = 40, 8
    fixed = torch.zeros(3, L, dtype=torch.bool)
    fixed[:, :prompt] = True
    ids = torch.where(fixed, torch.full((3, L), 2), torch.zeros(3, L, dtype=torch.long))
    sched = SemiARSchedule(steps=16, block_length=8, remask_per_block=3)
    out = Sampler(sched, RandomUnmask(), GumbelDraw(), remask_rule=PRISMRemask())(
        FakeModel(), {"input_ids": ids, "fixed": fixed}, torch.Generator().manual_seed(0), trace=True)
    assert (out.tokens != 0).all() and (out.tokens[:, :prompt] == 2).all()
    block = lambda p: (p - prompt) // 8  # noqa: E731
    total_remasks = 0
    for st in out.trace:
        touched = (st["unmasked"] | st["remasked"]).nonzero()
        for row, pos in touched.tolist():
            b = block(pos)
            assert (st["z"][row, prompt:prompt + 8 * b] != 0).all()  # every earlier block is complete
            assert not (st["z"][row, prompt + 8 * (b + 1):] != 0).any()  # no later block touched yet
        total_remasks += int(st["remasked"].sum())
    assert total_remasks == 3 * 4 * 3  # K_block per block, 4 blocks, 3 rows


def test_every_sampler_ends_clean_and_keeps_fixed_positions():
    samplers = [remdm_sampler(12, s) for s in ("cap", "rescale", "conf", "loop", "forward_backward")]
    samplers += [dfm_sampler(12), dfm_sampler(12, top_p=0.9), prism_sampler(12, num_remask=2),
                 prism_sampler(12, eta=0.1), prism_owt_sampler(12), token_critic_sampler(12), semi_ar_sampler(12, 8, 2),
                 prism_sampler(12, num_remask=2, remask_rule=LowConfidenceRemask()),
                 prism_sampler(12, num_remask=2, remask_rule=P2SelfRemask()),
                 prism_sampler(12, num_remask=2, remask_rule=RandomRemask()),
                 # most-confident unmasking, with and without remasking (README, "Fixing the gap")
                 prism_sampler(12, num_remask=0, unmask_rule=ConfidenceUnmask()),
                 prism_sampler(12, num_remask=2, unmask_rule=ConfidenceUnmask())]
    b = batch()
    for sampler in samplers:
        model = FakeModel()
        out = sampler(model, b, torch.Generator().manual_seed(0))
        assert (out.tokens != 0).all(), sampler.schedule
        assert (out.tokens[b["fixed"]] == b["input_ids"][b["fixed"]]).all(), sampler.schedule
        assert out.nfe == model.calls + model.critic_calls


def test_decisions_are_per_sequence():
    b = {"input_ids": torch.zeros(16, 30, dtype=torch.long), "fixed": torch.zeros(16, 30, dtype=torch.bool)}
    out = remdm_sampler(10, "cap", eta=0.1)(FakeModel(), b, torch.Generator().manual_seed(0), trace=True)
    st = out.trace[5]
    rows = {tuple(r.tolist()) for r in (st["unmasked"] | st["remasked"])}
    assert len(rows) > 1  # identical rows, different decisions


def test_the_token_critic_pass_sees_the_batch_padding():
    """The critic's own pass gets the batch's attention mask (padding keys out of its attention)."""
    seen = []

    class Critic:
        mask_id, time_conditioned = 0, False

        def __call__(self, z, attention_mask=None, t=None):
            lp = torch.full((*z.shape, 4), -math.log(3.0))
            lp[..., 0] = float("-inf")
            return SimpleNamespace(log_probs=lp, quality_logits=None)

        def critic_logits(self, x, attention_mask=None):
            seen.append(attention_mask)
            return torch.zeros(x.shape)

    keep = torch.tensor([[True, True, True, False]])
    batch = {"input_ids": torch.tensor([[2, 0, 0, 1]]), "fixed": torch.tensor([[True, False, False, True]]),
             "attention_mask": keep}
    out = token_critic_sampler(steps=2)(Critic(), batch, torch.Generator().manual_seed(0))
    assert seen and all(m is keep for m in seen)
    assert out.tokens[0, 3] == 1 and (out.tokens != 0).all()
