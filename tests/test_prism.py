"""Quality heads, the PRISM and Token-Critic losses, calibration metrics: exact values on hand-built
cases."""
import math

import pytest
import torch
from torch import nn

from prism.backbones.dit import DiT
from prism.metrics.calibration import auroc, expected_calibration_error, reliability
from prism.checkpoint import load_weights, save_weights
from prism.experiment import set_trainable
from prism.heads.quality import AttentionHead, LinearHead, MLPHead
from prism.losses.prism import PRISMLoss, choose_fill_positions, fill_counts
from prism.losses.token_critic import TokenCriticLoss
from prism.masking import NoiseSchedule
from prism.model import MDM, MDMOutput, TokenCritic, subs_log_probs


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def test_head_sizes_match_the_paper():
    # Table 3: the Sudoku linear head on the 512-wide DiT (cond 128) is ~133K parameters:
    # LayerNorm 512 + adaLN Linear(128, 1024) + Linear(512, 1)
    model = MDM(DiT(11, 0, preset="tiny"), LinearHead)
    assert n_params(model.head) == 512 + 128 * 1024 + 1024 + 512 + 1 == 133_121
    # the OWT attention head on the 768-wide DiT: one DiT block + the linear head, ~7.9M
    assert n_params(AttentionHead(768, 128, n_heads=12)) == 7_877_377
    # the LLaDA head: LayerNorm(d) → Linear(d, d) → GELU → Linear(d, 1)
    assert n_params(MLPHead(32)) == 2 * 32 + (32 * 32 + 32) + (32 + 1)


@pytest.mark.parametrize("head", [LinearHead, AttentionHead, MLPHead])
def test_one_backbone_pass_gives_posterior_and_quality(head):
    torch.manual_seed(0)
    kwargs = {"n_heads": 2} if head is AttentionHead else {}
    model = MDM(DiT(11, 0, preset="test"), lambda **kw: head(**kw, **kwargs))
    calls = []
    model.backbone.register_forward_hook(lambda *a: calls.append(1))
    x = torch.randint(0, 11, (3, 9))
    out = model(x)
    assert len(calls) == 1
    assert out.log_probs.shape == (3, 9, 11) and out.quality_logits.shape == (3, 9)
    assert torch.all(out.quality_logits == 0)  # zero-initialised output: g = 0.5 until trained
    # after a perturbation the quality depends on the token sequence
    for p in model.head.parameters():
        nn.init.normal_(p, std=0.5)
    a, b = model(x).quality_logits, model(x.flip(1)).quality_logits
    assert not torch.allclose(a, b)


def test_auroc_hand_cases():
    assert auroc(torch.tensor([0.1, 0.4, 0.35, 0.8]), torch.tensor([0, 0, 1, 1])) == pytest.approx(0.75)
    assert auroc(torch.tensor([0.5, 0.5]), torch.tensor([1, 0])) == pytest.approx(0.5)  # a tie counts one half
    # 3 positives × 2 negatives; pairs won: (0.9 > all) 2, (0.6 > 0.2, tie with 0.6) 1.5, (0.1) 0
    assert auroc(torch.tensor([0.9, 0.6, 0.1, 0.6, 0.2]), torch.tensor([1, 1, 1, 0, 0])) == pytest.approx(3.5 / 6)
    assert math.isnan(auroc(torch.tensor([0.3, 0.4]), torch.tensor([1, 1])))


def test_ece_and_reliability_hand_case():
    p, y = torch.tensor([0.1, 0.2, 0.92, 0.96]), torch.tensor([0, 1, 1, 1])
    # bins [0.1, 0.2) → |0.1 − 0|, [0.2, 0.3) → |0.2 − 1|, [0.9, 1] → |0.94 − 1| (two samples)
    assert expected_calibration_error(p, y) == pytest.approx(0.1 / 4 + 0.8 / 4 + 0.06 * 2 / 4)
    r = reliability(p, y)
    assert r["count"].tolist() == [0, 1, 1, 0, 0, 0, 0, 0, 0, 2]
    assert r["confidence"][9].item() == pytest.approx(0.94)
    assert expected_calibration_error(torch.tensor([0.7] * 10), torch.tensor([1] * 7 + [0] * 3)) == pytest.approx(0.0, abs=1e-7)


def test_fill_positions():
    g = torch.Generator().manual_seed(0)
    masked = torch.tensor([[1, 1, 0, 1, 1, 1], [0, 1, 0, 0, 0, 0]], dtype=torch.bool)
    lp = torch.log(torch.tensor([[0.9, 0.1, 0.99, 0.8, 0.7, 0.95], [0.5] * 6]))
    chosen = choose_fill_positions("random", 3, masked, lp, g)
    assert chosen.sum(1).tolist() == [3, 1] and not (chosen & ~masked).any()
    conf = choose_fill_positions("confident", 2, masked, lp, g)
    assert conf[0].nonzero().flatten().tolist() == [0, 5]  # 0.99 at position 2 is not masked
    left = choose_fill_positions("leftmost_confident", 2, masked, lp, g, window=3)
    assert left[0].nonzero().flatten().tolist() == [0, 3]  # window = masked positions 0, 1, 3
    with pytest.raises(ValueError, match="window"):
        choose_fill_positions("leftmost_confident", 2, masked, lp, g)
    # uniform: for every k = 1..5, each of the 5 masked positions is chosen with probability k/5 and
    # the unmasked one never (2 calls × 2000 rows per k; the atol is ~3.8 binomial s.d. at k/5 = 1/2)
    rows = masked[:1].expand(2000, -1)
    for k in range(1, 6):
        draws = torch.stack([choose_fill_positions("random", k, rows, None, g) for _ in range(2)])
        assert (draws.sum(2) == k).all() and not (draws & ~rows).any(), k
        if k < 5:  # the generator advances: a second call draws other positions
            assert not torch.equal(draws[0], draws[1]), k
        freq = draws.float().mean((0, 1))
        assert torch.allclose(freq[masked[0]], torch.full((5,), k / 5), atol=0.03), (k, freq)
        assert (freq[~masked[0]] == 0).all(), k


class AllMasked(NoiseSchedule):
    """α_t = 0: every non-fixed position is masked; NELBO weight 1 (for hand computation)."""

    def alpha(self, t):
        return torch.zeros_like(t)

    def weight(self, t):
        return torch.ones_like(t)


class FixedModel(nn.Module):
    """An 'MDM' with a known posterior (0.75 on token 1, 0.25 on token 2) and a constant quality
    logit c; records the shape of every forward pass."""

    mask_id = 0

    def __init__(self, c=0.3):
        super().__init__()
        self.backbone = nn.Linear(1, 1)
        self.head = nn.Linear(1, 1)
        self.c = nn.Parameter(torch.tensor(c))
        self.calls = []

    def forward(self, input_ids, attention_mask=None, t=None):
        self.calls.append(tuple(input_ids.shape))
        B, L = input_ids.shape
        logits = torch.log(torch.tensor([1e-30, 0.75, 0.25])).expand(B, L, 3) + 0 * self.backbone.weight.sum()
        return MDMOutput(subs_log_probs(logits, input_ids, 0), torch.zeros(B, L, 1), self.c.expand(B, L))


def test_prism_loss_hand_computed():
    """Eq. 3 on a hand case: x = [1, 2, 1 | 2 fixed]; everything free is masked; temperature 0 fills
    the k = 3 masked positions with token 1 → labels [1, 0, 1];
    L = mean BCE + λ · NELBO = (2·softplus(−c) + softplus(c)) / 3 + λ · (2·(−log .75) − log .25) / 3."""
    model, c, lam = FixedModel(0.3), 0.3, 5.0
    loss = PRISMLoss(k=3, n_y=4, mdm_weight=lam, temperature=0.0, noise=AllMasked())
    loss.attach(model)
    batch = {"input_ids": torch.tensor([[1, 2, 1, 2]]), "fixed": torch.tensor([[False, False, False, True]])}
    out = loss(model, batch, torch.Generator().manual_seed(0))
    sp = nn.functional.softplus
    bce = (2 * sp(torch.tensor(-c)) + sp(torch.tensor(c))) / 3
    nelbo = (2 * -math.log(0.75) - math.log(0.25)) / 3
    assert out.logs["bce"].item() == pytest.approx(bce.item(), rel=1e-6)
    assert out.logs["nelbo"].item() == pytest.approx(nelbo, rel=1e-6)
    assert out.loss.item() == pytest.approx(bce.item() + lam * nelbo, rel=1e-6)
    assert out.logs["fill_acc"].item() == pytest.approx(2 / 3)
    # two backbone passes: z (batch 1) and the n_y = 4 sequences y in one batched pass
    assert model.calls == [(1, 4), (4, 4)]
    out.loss.backward()
    assert model.c.grad is not None


def test_prism_loss_k_and_n_y_shapes():
    torch.manual_seed(0)
    model = MDM(DiT(11, 0, preset="test"), LinearHead)
    loss = PRISMLoss(k=2, n_y=3)
    loss.attach(model)
    x = torch.randint(1, 11, (5, 12))
    g = torch.Generator().manual_seed(1)
    z = x.clone()
    z[:, ::2] = 0
    masked = z == 0
    y, filled, label = loss.draw_y(model(z).log_probs.detach(), x, z, masked, g)
    assert y.shape == (15, 12) and filled.sum(1).tolist() == [2] * 15
    assert ((y != 0) == (~masked.repeat(3, 1) | filled)).all()  # everything else stays masked
    assert (label == ((y == x.repeat(3, 1)) & filled)).all()
    # the n_y index sets differ (random positions per copy)
    assert not (filled[:5] == filled[5:10]).all()


def test_uniform_k_is_uniform_on_one_to_the_number_masked():
    # rows with 6, 1 and 0 masked positions, 6000 draws each
    masked = torch.zeros(3, 9, dtype=torch.bool)
    masked[0, :6] = masked[1, 4] = True
    g = torch.Generator().manual_seed(0)
    counts = torch.stack([fill_counts("uniform", masked, g) for _ in range(6000)])
    assert counts[:, 1].eq(1).all() and counts[:, 2].eq(0).all()
    freq = torch.bincount(counts[:, 0], minlength=7).double() / 6000
    assert freq[0] == 0 and (freq[1:] - 1 / 6).abs().max() < 0.02  # ~4 binomial s.d. (0.0048 each)
    # through the loss: a row is filled at exactly that many of its masked positions, nowhere else
    torch.manual_seed(0)
    model = MDM(DiT(11, 0, preset="test"), LinearHead)
    loss = PRISMLoss(k="uniform", n_y=2)
    x = torch.randint(1, 11, (3, 9))
    z = torch.where(masked, torch.zeros_like(x), x)
    y, filled, _ = loss.draw_y(model(z).log_probs.detach(), x, z, masked, torch.Generator().manual_seed(3))
    assert (filled <= masked.repeat(2, 1)).all()
    assert filled[[1, 4]].sum(1).tolist() == [1, 1] and filled[[2, 5]].sum() == 0
    assert 1 <= filled[0].sum() <= 6 and 1 <= filled[3].sum() <= 6
    with pytest.raises(ValueError, match="'uniform'"):
        PRISMLoss(k="all")
    with pytest.raises(ValueError, match="'uniform'"):
        fill_counts("all", masked, g)


def test_prism_needs_a_head_and_frozen_source_is_a_copy():
    with pytest.raises(ValueError, match="quality head"):
        PRISMLoss().attach(MDM(DiT(11, 0, preset="test")))
    model = MDM(DiT(11, 0, preset="test"), LinearHead)
    loss = PRISMLoss(source="frozen")
    loss.attach(model)
    frozen = loss._frozen[0]
    with torch.no_grad():
        model.backbone.vocab_embed.add_(1.0)
    assert not torch.equal(frozen.backbone.vocab_embed, model.backbone.vocab_embed)
    assert not any(p.requires_grad for p in frozen.parameters())
    assert "_frozen" not in dict(loss.named_modules())  # not a sub-module: never checkpointed or trained


def test_token_critic_loss_labels_and_frozen_mdm():
    torch.manual_seed(0)
    model = MDM(DiT(11, 0, preset="test"), critic=TokenCritic(DiT(11, 0, preset="test"), LinearHead))
    loss = TokenCriticLoss(noise=AllMasked())
    with pytest.raises(ValueError, match="trainable"):
        loss.attach(model)
    set_trainable(model, ["critic.*"])
    loss.attach(model)
    x = torch.randint(1, 11, (4, 10))
    batch = {"input_ids": x, "fixed": torch.zeros_like(x, dtype=torch.bool)}
    out = loss(model, batch, torch.Generator().manual_seed(0))
    # fresh critic: logit 0 → BCE = log 2 whatever the labels
    assert out.loss.item() == pytest.approx(math.log(2), rel=1e-6)
    out.loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("critic."))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.critic.parameters())


def test_init_new_and_trainable(tmp_path):
    torch.manual_seed(0)
    mdm = MDM(DiT(11, 0, preset="test"))
    path = str(tmp_path / "mdm.safetensors")
    save_weights(mdm.state_dict(), mdm, path)
    with_head = MDM(DiT(11, 0, preset="test"), LinearHead)
    with pytest.raises(ValueError, match=r"experiment.init_new = \['head'\]"):
        load_weights(with_head, path)
    load_weights(with_head, path, new_modules=["head"])
    assert torch.equal(with_head.backbone.vocab_embed, mdm.backbone.vocab_embed)
    assert set_trainable(with_head, ["head.*"]) == len(list(with_head.head.parameters()))
    assert not any(p.requires_grad for p in with_head.backbone.parameters())
    with pytest.raises(ValueError, match="matches no parameter.*head"):
        set_trainable(with_head, ["haed.*"])


def test_score_fills_scores_the_same_fills_with_every_signal():
    from prism.evaluation.quality import collect, summarise

    torch.manual_seed(0)
    model = MDM(DiT(11, 0, preset="test"), LinearHead, critic=TokenCritic(DiT(11, 0, preset="test"), LinearHead))
    for p in model.head.parameters():
        nn.init.normal_(p, std=0.3)
    x = torch.randint(1, 11, (6, 12))
    batches = [{"input_ids": x, "fixed": torch.zeros_like(x, dtype=torch.bool)}] * 3
    a = collect(batches, model, seed=5, k=3, prism_model=model, critic_model=model)
    b = collect(batches, model, seed=5, k=3)  # without the extra signals: the same fills and labels
    assert torch.equal(a["label"], b["label"]) and torch.equal(a["confidence"], b["confidence"])
    n = len(a["label"])
    assert all(len(v) == n for v in a.values()) and n <= 3 * 6 * 3
    assert ((a["prism"] > 0) & (a["prism"] < 1)).all() and torch.allclose(a["token_critic"], torch.full((n,), 0.5))
    table = summarise(a)
    assert set(table) == {"confidence", "prism", "token_critic"}
    assert table["token_critic"]["auroc"] == pytest.approx(0.5)  # a constant signal ranks nothing
    assert table["prism"]["accuracy"] == pytest.approx(a["label"].double().mean().item())
