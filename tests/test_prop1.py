"""Propositions 1 and 2 of PRISM on a toy distribution whose posteriors can be enumerated exactly.

Data: a uniform distribution over 24 distinct random sequences of length 5 over the tokens {1, 2, 3}
(0 is the mask). A small MDM is trained with the MDLM loss, then the PRISM loss trains the head.

- Proposition 1 (k = 1): the minimiser of the BCE term is g_i(y) = p(x_i = y_i | y ⊕ m_i), the data
  posterior of the filled token given the rest of y (y with position i masked is exactly z).
- k > 1: y_i's k − 1 companions in y are model draws, not data, and the head cannot tell them from
  clean tokens, so the minimiser is the posterior under the whole sampling process,
  g_i(y) = P(x_i = y_i | y, i ∈ F), summed over the hidden fill set F ∋ i (the exact minimiser of
  Eq. 3's BCE term, enumerated below). The test shows that the k = 2 head learns it, and that it
  differs measurably from the naive target p(x_i = y_i | y ⊕ m_i) on the same pairs.
- Shuffling the labels across positions breaks the link between g_i and y_i: that head must fail the
  same test (the test can fail).

The backbone is a small MLP over the one-hot sequence (any ``Backbone`` takes a head): it learns the
toy's posteriors in seconds where a transformer needs minutes on CPU.
"""
import itertools
import math

import pytest
import torch
from torch import nn

from prism.backbones.base import Backbone, BackboneOutput
from prism.heads.quality import LinearHead
from prism.losses.mdm import MDLMLoss
from prism.losses.prism import PRISMLoss
from prism.masking import mask_tokens, sample_t
from prism.model import MDM

MASK, V, L, N = 0, 4, 5, 24


def toy_data():
    g = torch.Generator().manual_seed(0)
    data = torch.unique(torch.randint(1, V, (200, L), generator=g), dim=0)
    return data[torch.randperm(len(data), generator=g)[:N]]


class MLPBackbone(Backbone):
    """One-hot sequence → MLP → per-position hidden states → unmasking logits."""

    def __init__(self, hidden_size=32, width=256):
        super().__init__()
        self.vocab_size, self.mask_id, self.hidden_size = V, MASK, hidden_size
        self.net = nn.Sequential(nn.Linear(L * V, width), nn.GELU(), nn.Linear(width, width), nn.GELU(),
                                 nn.Linear(width, L * hidden_size), nn.GELU())
        self.out = nn.Linear(hidden_size, V)

    def forward(self, input_ids, attention_mask=None, t=None):
        h = self.net(nn.functional.one_hot(input_ids, V).float().flatten(1)).view(len(input_ids), L, self.hidden_size)
        return BackboneOutput(h, self.out(h))


class ShuffledPRISMLoss(PRISMLoss):
    """PRISM with its labels permuted across the filled positions of the batch."""

    def draw_y(self, log_probs, x, z, masked, generator):
        y, filled, label = super().draw_y(log_probs, x, z, masked, generator)
        values = label[filled]
        label = label.clone()
        label[filled] = values[torch.randperm(len(values), generator=generator)]
        return y, filled, label


def fit(model, loss, data, steps, lr=3e-3, batch=256, seed=0):
    """Adam with a linear decay to zero (the BCE labels are Bernoulli: the decay averages them)."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - s / steps)
    for s in range(steps):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + s)
        x = data[torch.randint(len(data), (batch,), generator=gen)]
        out = loss(model, {"input_ids": x, "fixed": torch.zeros_like(x, dtype=torch.bool)}, gen)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        sched.step()


def consistent(data, z):
    """(B, N) bool: which data sequences agree with the clean positions of each z."""
    return ((data[None] == z[:, None]) | (z[:, None] == MASK)).all(-1)


def naive_target(data, y, i):
    """p(x_i = y_i | y ⊕ m_i) under the data distribution (Proposition 1's target)."""
    z = y.clone()
    z[torch.arange(len(y)), i] = MASK
    c = consistent(data, z)
    return (c & (data[:, i].T == y[torch.arange(len(y)), i][:, None])).sum(1) / c.sum(1)


def mask_pattern_prob(m):
    """P(a given set of m of the L positions is exactly the masked set) for t ~ U[0, 1]:
    ∫ t^m (1 − t)^(L − m) dt = m! (L − m)! / (L + 1)!."""
    return math.factorial(m) * math.factorial(L - m) / math.factorial(L + 1)


@torch.no_grad()
def exact_target(model, data, y, i, k):
    """P(x_i = y_i | y, i ∈ F) under the process of Algorithm 1 (x uniform over the data, t ~ U,
    z, F = k uniform masked positions (all if fewer), y_F drawn independently from the model's
    p_θ(· | z)): a sum over every fill set F ∋ i among y's clean positions."""
    out = torch.empty(len(y), dtype=torch.float64)
    for row in range(len(y)):
        yr, ir = y[row], int(i[row])
        still_masked = (yr == MASK).nonzero().flatten().tolist()
        clean = [j for j in range(L) if yr[j] != MASK and j != ir]
        hypotheses = []
        for size in range(1, k + 1):
            if size < k and still_masked:  # fewer than k filled only when nothing else was masked
                continue
            for others in itertools.combinations(clean, size - 1):
                hypotheses.append((ir, *others))
        zs = yr.repeat(len(hypotheses), 1)
        for h, F in enumerate(hypotheses):
            zs[h, list(F)] = MASK
        probs = model(zs).log_probs.exp().double()
        num = den = 0.0
        for h, F in enumerate(hypotheses):
            n_masked = len(F) + len(still_masked)
            prior = mask_pattern_prob(n_masked) / math.comb(n_masked, len(F))
            draw = math.prod(float(probs[h, j, yr[j]]) for j in F)
            c = consistent(data, zs[h : h + 1])[0]
            num += prior * draw * float((c & (data[:, ir] == yr[ir])).sum())
            den += prior * draw * float(c.sum())
        out[row] = num / den
    return out


@torch.no_grad()
def head_pairs(model, loss, data, n=3000, seed=123):
    """(y, i, g_i(y)) for filled positions of fresh draws, as in training."""
    gen = torch.Generator().manual_seed(seed)
    x = data[torch.randint(len(data), (n,), generator=gen)]
    z, masked = mask_tokens(x, sample_t(n, 1e-3, True, gen), MASK, None, gen)
    keep = masked.any(1)
    x, z, masked = x[keep], z[keep], masked[keep]
    y, filled, _ = loss.draw_y(model(z).log_probs, x, z, masked, gen)
    q = torch.sigmoid(model(y).quality_logits)
    b, i = filled.nonzero(as_tuple=True)
    return y[b], i, q[b, i].double()


def train_toy(loss_cls, k, seed=0):
    torch.manual_seed(seed)
    data = toy_data()
    model = MDM(MLPBackbone(), LinearHead)
    fit(model, MDLMLoss(), data, steps=800)
    loss = loss_cls(k=k, n_y=1, mdm_weight=1.0)
    loss.attach(model)
    fit(model, loss, data, steps=1200, seed=1)
    return model, loss, data


@pytest.fixture(scope="module")
def k1():
    torch.set_num_threads(1)
    return train_toy(PRISMLoss, k=1)


def test_proposition_1_head_learns_the_posterior(k1):
    model, loss, data = k1
    y, i, g = head_pairs(model, loss, data)
    target = naive_target(data, y, i).double()
    mae = (g - target).abs().mean().item()
    baseline = (target - target.median()).abs().mean().item()  # the best constant guess
    print(f"Proposition 1: MAE {mae:.4f} over {len(y)} pairs (best constant: {baseline:.3f})")
    assert mae < 0.04, mae
    assert baseline > 0.2  # the target is far from trivial
    # for k = 1 the exact minimiser of the loss and Proposition 1's target coincide
    sub = torch.arange(0, len(y), 25)
    assert torch.allclose(exact_target(model, data, y[sub], i[sub], 1), target[sub], atol=1e-9)


def test_shuffled_labels_fail_the_same_test():
    model, loss, data = train_toy(ShuffledPRISMLoss, k=1)
    y, i, g = head_pairs(model, loss, data)
    mae = (g - naive_target(data, y, i).double()).abs().mean().item()
    print(f"shuffled labels: MAE {mae:.4f}")
    assert mae > 0.2, mae


def test_k2_head_learns_the_exact_minimiser_not_the_naive_target():
    model, loss, data = train_toy(PRISMLoss, k=2)
    y, i, g = head_pairs(model, loss, data, n=1500)
    exact = exact_target(model, data, y, i, 2)
    naive = naive_target(data, y, i).double()
    mae_exact = (g - exact).abs().mean().item()
    # the naive target is undefined (0/0) where a companion fill contradicts every data sequence
    ok = ~torch.isnan(naive)
    mae_naive = (g - naive)[ok].abs().mean().item()
    mae_exact_ok = (g - exact)[ok].abs().mean().item()
    print(f"k = 2: MAE {mae_exact:.4f} to the exact minimiser over {len(y)} pairs; on the {int(ok.sum())} pairs "
          f"where the naive target is defined: {mae_exact_ok:.4f} to the exact minimiser, {mae_naive:.4f} to the naive target")
    assert mae_exact < 0.04, mae_exact
    assert mae_naive > mae_exact_ok + 0.02, (mae_naive, mae_exact_ok)
