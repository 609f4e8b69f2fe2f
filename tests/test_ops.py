"""prism.ops and the lean SUBS / draws: draws only where a token may change, reproducible device
generators, top-p on gathered rows, the PRISM loss's n_y draws without the (n_y·B, L, V) repeat, the
SUBS log-probs against the formula they replace. Statistical checks use fixed seeds; tolerances are
stated next to them."""
import math
import subprocess
import sys

import pytest
import torch

import prism.ops as ops
from prism.losses.prism import PRISMLoss, choose_fill_positions
from prism.model import MDM, subs_log_probs
from prism.ops import categorical_draw, device_generator, gumbel_max, nucleus_filter
from prism.samplers.draw import CategoricalDraw
from prism.samplers.rules import MarginUnmask
from prism.samplers.semi_ar import semi_ar_sampler


# ---- the code these replace, kept here as the reference -------------------------------------

def old_nucleus_filter(log_probs, top_p):
    if top_p >= 1.0:
        return log_probs
    sorted_lp, order = torch.sort(log_probs, dim=-1, descending=True)
    cum = sorted_lp.exp().cumsum(-1)
    drop_sorted = (cum - sorted_lp.exp()) >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return log_probs.masked_fill(drop, float("-inf"))


def old_gumbel_max(log_probs, generator=None, temperature=1.0, top_p=1.0):
    lp = log_probs.double()
    if temperature == 0:
        return old_nucleus_filter(lp, top_p).argmax(-1)
    lp = torch.log_softmax(lp / temperature, dim=-1) if temperature != 1.0 else lp
    lp = old_nucleus_filter(lp, top_p)
    u = torch.rand(lp.shape, generator=generator, dtype=torch.float64)
    return (lp - torch.log(-torch.log(u.clamp_min(1e-300)))).argmax(-1)


def old_subs(logits, input_ids, mask_id):
    never_mask = torch.zeros(logits.shape[-1], dtype=torch.bool)
    never_mask[mask_id] = True
    log_probs = torch.log_softmax(logits.float().masked_fill(never_mask, float("-inf")), dim=-1)
    carry = torch.full_like(log_probs, float("-inf")).scatter(-1, input_ids[..., None], 0.0)
    subs = torch.where((input_ids != mask_id)[..., None], carry, log_probs)
    return subs, log_probs.gather(-1, input_ids[..., None]).squeeze(-1)


def old_draw_y(loss, log_probs, x, z, masked, generator):
    """losses.prism.draw_y as it was: the (B, L, V) log-probs repeated n_y times, drawn everywhere."""
    rep = lambda a: a.repeat(loss.n_y, *([1] * (a.dim() - 1)))  # noqa: E731
    log_probs, x, z, masked = rep(log_probs), rep(x), rep(z), rep(masked)
    tokens = old_gumbel_max(log_probs, generator, loss.temperature, loss.top_p)
    token_lp = log_probs.gather(-1, tokens[..., None]).squeeze(-1)
    filled = choose_fill_positions(loss.positions, loss.k, masked, token_lp, generator, loss.window)
    return torch.where(filled, tokens, z), filled, (tokens == x) & filled


class NoiseSpy:
    """Records the number of elements of every torch.rand call made by prism.ops."""

    def __init__(self, monkeypatch):
        self.numel, real = [], torch.rand

        def spy(*args, **kwargs):
            out = real(*args, **kwargs)
            self.numel.append(out.numel())
            return out

        monkeypatch.setattr(ops.torch, "rand", spy)


# ---- draws only where asked -----------------------------------------------------------------

# random numbers per drawn row: two uniforms (inverse CDF), or one per token (Gumbel-max)
DRAWS = [(categorical_draw, lambda V: 2), (gumbel_max, lambda V: V)]


@pytest.mark.parametrize("draw,per_row", DRAWS)
def test_draws_only_at_positions_and_no_noise_elsewhere(monkeypatch, draw, per_row):
    g = torch.Generator().manual_seed(0)
    lp = torch.randn(3, 20, 7, generator=g).log_softmax(-1)
    positions = torch.rand(3, 20, generator=g) < 0.3
    fill = torch.randint(0, 7, (3, 20), generator=g)
    before = lp.clone()
    spy = NoiseSpy(monkeypatch)
    x = draw(lp, torch.Generator().manual_seed(1), positions=positions, fill=fill)
    assert torch.equal(x[~positions], fill[~positions])  # untouched
    assert sum(spy.numel) == int(positions.sum()) * per_row(7)  # random numbers for the drawn rows only
    assert ((x >= 0) & (x < 7)).all() and torch.equal(lp, before)


@pytest.mark.parametrize("draw,per_row", DRAWS)
def test_draw_chunks_give_the_right_law(monkeypatch, draw, per_row):
    # rows drawn a chunk at a time (here 3 rows per chunk); V = 600 spans blocks of 256 and a remainder
    monkeypatch.setattr(ops, "CPU_CHUNK_ELEMENTS", 3 * 600)
    g = torch.Generator().manual_seed(0)
    lp = torch.randn(600, generator=g).mul(2)
    lp[torch.rand(600, generator=g) < 0.3] = float("-inf")  # tokens of probability 0, never drawn
    lp[[0, 255, 256, 599]] = torch.tensor([2.0, 3.0, 1.0, 3.5])  # block edges carry mass
    probs = lp.softmax(-1).double()
    n = 60_000
    spy = NoiseSpy(monkeypatch)
    x = draw(lp.expand(n, 600).contiguous(), torch.Generator().manual_seed(1))
    assert max(spy.numel) == 3 * per_row(600) and sum(spy.numel) == n * per_row(600)
    counts = torch.bincount(x, minlength=600).double()
    assert counts[probs == 0].sum() == 0
    # χ² over the tokens expected ≥ 10 times (the rest pooled): df ≈ 56; mean df, s.d. (2 df)^½ ≈ 10.6;
    # bound at df + 5 s.d.
    expected = probs * n
    big = expected >= 10
    c, e = torch.cat([counts[big], counts[~big].sum()[None]]), torch.cat([expected[big], expected[~big].sum()[None]])
    chi2, df = float(((c - e) ** 2 / e).sum()), len(c) - 1
    assert chi2 < df + 5 * (2 * df) ** 0.5, (chi2, df)


def test_sampler_draws_only_masked_positions_inside_the_window(monkeypatch):
    class RecordingDraw(CategoricalDraw):
        def __init__(self):
            super().__init__(temperature=1.0)
            self.seen = []

        def __call__(self, log_probs, generator=None, positions=None, fill=None):
            self.seen.append((positions.clone(), fill.clone()))
            return super().__call__(log_probs, generator, positions, fill)

    class Uniform:
        mask_id, time_conditioned = 0, False

        def __call__(self, z, attention_mask=None, t=None):
            lp = torch.full((*z.shape, 5), -math.log(4))
            lp[..., 0] = float("-inf")
            return type("Out", (), {"log_probs": lp, "quality_logits": -torch.arange(z.shape[1]).float().expand(z.shape),
                                    "token_log_probs": torch.zeros(z.shape)})()

    B, L, block = 4, 12, 4
    fixed = torch.zeros(B, L, dtype=torch.bool)
    fixed[:, :2] = True  # a 2-token prompt: blocks start at position 2
    batch = {"input_ids": torch.where(fixed, torch.full((B, L), 3), torch.zeros(B, L, dtype=torch.long)), "fixed": fixed}
    sampler = semi_ar_sampler(steps=10, block_length=block, remask_per_block=1)
    sampler.draw = RecordingDraw()
    spy = NoiseSpy(monkeypatch)
    out = sampler(Uniform(), batch, torch.Generator().manual_seed(0), trace=True)
    assert len(sampler.draw.seen) == len(out.trace) > 0
    per_block = 10 // 3
    for step, (positions, fill) in zip(out.trace, sampler.draw.seen):
        masked = (step["z"] == 0) & ~fixed
        b = step["step"] // per_block
        window = torch.zeros(L, dtype=torch.bool)
        window[2 + b * block: 2 + (b + 1) * block] = True
        assert torch.equal(positions, masked & window), step["step"]
        assert torch.equal(fill, step["z"])
    assert sum(spy.numel) == sum(int(p.sum()) for p, _ in sampler.draw.seen) * 2  # two uniforms a row


# ---- the device generator --------------------------------------------------------------------

@pytest.mark.parametrize("draw", [categorical_draw, gumbel_max])
def test_device_generator_is_reproducible_and_advances_the_callers_by_one_draw(draw):
    lp = torch.randn(2, 50, 30, generator=torch.Generator().manual_seed(0)).log_softmax(-1)
    positions = torch.ones(2, 50, dtype=torch.bool)
    positions[:, ::3] = False
    a = draw(lp, torch.Generator().manual_seed(7), positions=positions)
    b = draw(lp, torch.Generator().manual_seed(7), positions=positions)
    c = draw(lp, torch.Generator().manual_seed(8), positions=positions)
    assert torch.equal(a, b) and not torch.equal(a, c)
    g, ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    draw(lp, g, top_p=0.9, positions=positions)
    torch.randint(0, 2**63 - 1, (), generator=ref)
    assert torch.equal(g.get_state(), ref.get_state())  # one number, whatever the amount of noise
    draw(lp, g, temperature=0.0)  # greedy: no noise, the generator is not touched
    assert torch.equal(g.get_state(), ref.get_state())
    assert device_generator(None, torch.device("cpu")) is None


def test_a_seeded_sampler_run_replays():
    from prism.backbones.dit import DiT
    from prism.samplers import mdlm_sampler

    torch.manual_seed(0)
    model = MDM(DiT(11, 0, preset="test")).eval()
    with torch.no_grad():
        model.backbone.output_layer.linear.weight.normal_(0, 0.05)  # a spread posterior: draws differ
    batch = {"input_ids": torch.zeros(3, 12, dtype=torch.long), "fixed": torch.zeros(3, 12, dtype=torch.bool)}
    runs = [mdlm_sampler(steps=6, top_p=0.9)(model, batch, torch.Generator().manual_seed(s)).tokens for s in (4, 4, 5)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_generator_on_cuda_makes_noise_there():
    lp = torch.randn(2, 64, 1000, device="cuda").log_softmax(-1)
    a = categorical_draw(lp, torch.Generator().manual_seed(5))
    b = categorical_draw(lp, torch.Generator().manual_seed(5))
    assert a.device.type == "cuda" and torch.equal(a, b)
    gen = device_generator(torch.Generator().manual_seed(5), lp.device)
    assert gen.device.type == "cuda"


# ---- top-p on gathered rows ------------------------------------------------------------------

def test_top_p_on_gathered_rows_equals_the_full_tensor_result():
    """The 'reach' reading (the old filter's, selected explicitly; 'within' is tested in test_owt_samplers)."""
    probs = torch.tensor([
        [[0.5, 0.28, 0.17, 0.05], [0.05, 0.15, 0.3, 0.5], [0.25, 0.25, 0.4, 0.1]],
        [[0.9, 0.04, 0.03, 0.03], [0.1, 0.2, 0.3, 0.4], [0.6, 0.25, 0.1, 0.05]],
    ], dtype=torch.float64)
    positions = torch.tensor([[True, False, True], [False, True, True]])
    # no row has its mass before a token within rounding of p = 0.8 (there float32 and float64 may differ)
    full = old_nucleus_filter(probs.log(), 0.8)  # the old way: the whole (B, L, V) tensor in float64
    gathered = nucleus_filter(probs.log().float()[positions], 0.8, nucleus="reach")  # the new: (N, V) float32 rows
    assert torch.equal(torch.isfinite(gathered), torch.isfinite(full[positions]))
    assert torch.isfinite(gathered).tolist() == [[True, True, True, False], [True, True, True, False],
                                                 [False, True, True, True], [True, True, False, False]]
    for draw in (categorical_draw, gumbel_max):  # draws stay inside the nucleus
        x = draw(probs.log().expand(500, 2, 3, 4), torch.Generator().manual_seed(0), top_p=0.8, nucleus="reach",
                 positions=positions.expand(500, 2, 3), fill=torch.full((500, 2, 3), -1))
        assert torch.isfinite(full.expand(500, 2, 3, 4)[positions.expand(500, 2, 3)].gather(
            -1, x[positions.expand(500, 2, 3)][:, None])).all()
        assert (x[~positions.expand(500, 2, 3)] == -1).all()


def test_top_p_past_the_top_k_shortcut_equals_a_full_sort():
    """At V above ops.NUCLEUS_TOP_K: peaked rows are filtered from their top k alone, flat rows (whose
    nucleus is larger than k) fall back to the full sort; both give the full sort's result. The
    'reach' reading, selected explicitly ('within' past the shortcut: tests/test_owt_samplers.py)."""
    V = 3 * ops.NUCLEUS_TOP_K
    gen = torch.Generator().manual_seed(3)
    peaked = (torch.randn(3, V, generator=gen, dtype=torch.float64) * 4).log_softmax(-1)
    flat = (torch.randn(3, V, generator=gen, dtype=torch.float64) * 0.1).log_softmax(-1)
    rows = torch.cat([peaked, flat]).float()
    kept = torch.isfinite(nucleus_filter(rows, 0.9, nucleus="reach"))
    assert torch.equal(kept, torch.isfinite(old_nucleus_filter(rows.double(), 0.9)))
    sizes = kept.sum(-1).tolist()
    assert all(n < ops.NUCLEUS_TOP_K for n in sizes[:3]) and all(n > ops.NUCLEUS_TOP_K for n in sizes[3:])
    assert torch.equal(nucleus_filter(rows, 0.9, nucleus="reach")[kept], rows[kept])  # kept values untouched
    for lp in (rows[:2], rows[:2].double(), rows[:2, :8].double()):  # float32 and float64, short rows too
        copy = lp.clone()
        out = nucleus_filter(lp, 0.9)
        assert torch.equal(lp, copy)  # the input is not written
        assert torch.equal(out[torch.isfinite(out)], lp[torch.isfinite(out)])  # log-probs kept as they were


# ---- the PRISM loss's n_y draws --------------------------------------------------------------

def posterior(B, L, V, seed):
    lp = torch.randn(L, V, generator=torch.Generator().manual_seed(seed)).log_softmax(-1)
    lp[:, 0] = float("-inf")
    return torch.log_softmax(lp, -1).expand(B, L, V).contiguous()


def test_prism_n_y_draws_equal_the_repeat_based_ones_when_greedy():
    B, L, V = 6, 10, 7
    log_probs = posterior(B, L, V, 0)
    x = torch.randint(1, V, (B, L), generator=torch.Generator().manual_seed(1))
    masked = torch.rand(B, L, generator=torch.Generator().manual_seed(2)) < 0.6
    z = torch.where(masked, torch.zeros_like(x), x)
    for positions in ("random", "confident"):
        loss = PRISMLoss(k=2, n_y=3, temperature=0.0, positions=positions)
        new = loss.draw_y(log_probs, x, z, masked, torch.Generator().manual_seed(4))
        old = old_draw_y(loss, log_probs, x, z, masked, torch.Generator().manual_seed(4))
        for a, b in zip(new, old):
            assert torch.equal(a, b), positions


def test_prism_n_y_draws_follow_the_repeat_based_law():
    # 20,000 sequences × n_y = 3, k = 1: ~15,000 filled draws per position; each token's frequency
    # has a binomial s.d. ≤ 0.0041, the tolerance is 0.02 (≈ 5 s.d.) for both the old and the new way
    B, L, V = 20_000, 4, 5
    log_probs = posterior(B, L, V, 3)
    x = torch.ones(B, L, dtype=torch.long)
    masked = torch.ones(B, L, dtype=torch.bool)
    z = torch.zeros(B, L, dtype=torch.long)
    loss = PRISMLoss(k=1, n_y=3)
    probs = log_probs[0].exp().double()
    for draw_y in (loss.draw_y, lambda *a: old_draw_y(loss, *a)):
        y, filled, label = draw_y(log_probs, x, z, masked, torch.Generator().manual_seed(0))
        assert y.shape == (3 * B, L) and (filled.sum(1) == 1).all()
        for i in range(L):
            tokens = y[filled[:, i], i]
            freq = torch.bincount(tokens, minlength=V).double() / len(tokens)
            assert (freq - probs[i]).abs().max() < 0.02, (i, freq, probs[i])
        assert (label == ((y == 1) & filled)).all()
    # the three copies are independent draws, not one draw repeated
    y, filled, _ = loss.draw_y(log_probs[:50], x[:50], z[:50], masked[:50], torch.Generator().manual_seed(1))
    assert not torch.equal(y[:50][filled[:50]], y[50:100][filled[50:100]])


def test_losses_do_not_import_the_samplers():
    code = ("import sys, prism.losses.prism, prism.losses.token_critic, prism.losses.mdm; "
            "print([m for m in sys.modules if m.startswith('prism.samplers')])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ---- SUBS --------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_subs_equals_the_formula_it_replaces(dtype):
    torch.manual_seed(0)
    logits = torch.randn(2, 40, 300).to(dtype).requires_grad_()
    ids = torch.randint(0, 300, (2, 40))
    ids[:, ::2] = 4  # mask id 4
    new, new_tok = subs_log_probs(logits, ids, 4, return_token_log_probs=True)
    old, old_tok = old_subs(logits, ids, 4)
    assert new.dtype == torch.float32 and torch.equal(new, old) and torch.equal(new_tok, old_tok)
    w = torch.randn(2, 40, 300)
    target = ids.clamp(max=3)[..., None]  # a real token at every position
    g_new, = torch.autograd.grad((new.exp() * w).sum() + new.gather(-1, target).sum(), logits)
    g_old, = torch.autograd.grad((old.exp() * w).sum() + old.gather(-1, target).sum(), logits)
    assert g_new.dtype == dtype
    assert torch.allclose(g_new.float(), g_old.float(), atol=1e-6)  # float32 rounding of the same formula
    with torch.no_grad():  # no graph: the same values, and in place when asked to
        buf = logits.detach().float().clone()
        again = subs_log_probs(buf, ids, 4, inplace=True)
        assert torch.equal(again, old) and again.data_ptr() == buf.data_ptr()
        kept = logits.detach().float().clone()
        assert torch.equal(subs_log_probs(kept, ids, 4), old) and torch.equal(kept, logits.detach().float())


def test_subs_gradient_is_exact_in_float64():
    logits = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    ids = torch.tensor([[2, 1, 2, 5, 2], [0, 2, 2, 3, 2]])  # mask id 2
    assert torch.autograd.gradcheck(lambda a: subs_log_probs(a, ids, 2).exp(), (logits,))


def test_mdm_can_skip_the_log_probs_and_margin_rule_is_unchanged():
    from prism.backbones.dit import DiT
    from prism.heads.quality import LinearHead

    torch.manual_seed(0)
    model = MDM(DiT(11, 0, preset="test"), LinearHead)
    z = torch.randint(0, 11, (2, 9))
    full, lean = model(z), model(z, log_probs=False)
    assert lean.log_probs is None and torch.equal(full.quality_logits, lean.quality_logits)
    lp = torch.randn(3, 8, 11).log_softmax(-1)
    top2 = lp.exp().topk(2, dim=-1).values  # the old (B, L, V) exp
    assert torch.equal(MarginUnmask().scores(lp, None, None, None), top2[..., 0] - top2[..., 1])
