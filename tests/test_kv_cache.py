"""The approximate KV cache (Fast-dLLM prefix / dual cache) on the DiT and LLaDA backbones and the heads:
a refresh equals a plain pass, a partial pass right after it equals the full pass's slice, new keys are
written in place, ``keep`` restricts the output layer, and misuse is a clear error."""
import pytest
import torch

from prism.backbones.base import Backbone, BackboneOutput
from prism.backbones.kv_cache import KVCache
from prism.backbones.dit import DiT
from prism.backbones.hf import HFBackbone
from prism.backbones.llada import LLaDABackbone
from prism.heads.quality import AttentionHead, LinearHead, MLPHead
from prism.model import MDM
from tasks.sudoku import sudoku_position_groups

B = 2
ATOL_EXACT, ATOL = 1e-6, 1e-5


def _randomise(m, seed=0):
    # adaLN modulations and output layers start at zero: randomise everything so the tests can fail
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.1)
    return m.eval()


def _setup(kind, head):
    """(model, input_ids, attention_mask, t) for one backbone kind and head builder."""
    torch.manual_seed(1)
    if kind == "dit":
        bb = DiT(vocab_size=50, mask_id=49, hidden_size=32, n_blocks=2, n_heads=4, cond_dim=16)
        L, mask, t = 24, None, None
    elif kind == "sudoku":
        bb = DiT(vocab_size=11, mask_id=10, hidden_size=32, n_blocks=2, n_heads=4, cond_dim=16,
                 position_groups=sudoku_position_groups(), group_attention=True)
        L, mask, t = bb.position_groups.shape[1], None, None  # 81 cells + separators
    elif kind == "dit_time":
        bb = DiT(vocab_size=50, mask_id=49, hidden_size=32, n_blocks=2, n_heads=4, cond_dim=16, time_conditioning=True)
        L, mask, t = 24, None, torch.tensor([0.3, 0.8])
    else:  # LLaDA, the second row left-padded
        bb, L, t = LLaDABackbone(preset="tiny"), 20, None
        mask = torch.ones(B, L, dtype=torch.bool)
        mask[1, :5] = False
    model = _randomise(MDM(bb, head=head))
    ids = torch.randint(0, bb.mask_id, (B, L))
    ids[torch.rand(B, L) < 0.5] = bb.mask_id
    return model, ids, mask, t


KINDS = ["dit", "sudoku", "dit_time", "llada"]
HEADS = [None, LinearHead, AttentionHead]
CASES = [pytest.param(k, h, id=f"{k}-{getattr(h, '__name__', 'nohead')}") for k in KINDS for h in HEADS]


def _close(a, b, atol):
    if a is None or b is None:
        assert a is None and b is None
    else:
        torch.testing.assert_close(a, b, atol=atol, rtol=0)


def _ranges(L):
    return [(0, 4), (5, 13), (L - 6, L), (0, L)]


@pytest.mark.parametrize("kind,head", CASES)
@torch.no_grad()
def test_refresh_equals_plain_pass_and_fills_the_cache(kind, head):
    model, ids, mask, t = _setup(kind, head)
    plain = model(ids, mask, t)
    cache = KVCache()
    ref = model(ids, mask, t, cache=cache)
    for name in ("log_probs", "token_log_probs", "quality_logits", "hidden_states"):
        _close(getattr(ref, name), getattr(plain, name), ATOL_EXACT)
    n_layers = len(model.backbone.blocks if kind != "llada" else model.backbone.model.transformer.blocks)
    names = {f"blocks.{i}" for i in range(n_layers)} | ({"head"} if head is AttentionHead else set())
    assert set(cache.layers) == names
    L = ids.shape[1]
    for name, (k, v) in cache.layers.items():
        H = model.head.n_heads if name == "head" else (4 if kind != "llada" else model.backbone.config["n_heads"])
        D = model.backbone.hidden_size
        assert k.shape == v.shape == (B, H, L, D // H) and k.dtype == torch.float32


@pytest.mark.parametrize("kind,head", CASES)
@torch.no_grad()
def test_partial_pass_after_refresh_matches_the_full_pass(kind, head):
    model, ids, mask, t = _setup(kind, head)
    full = model(ids, mask, t)
    L = ids.shape[1]
    for lo, hi in _ranges(L):
        for compute, keep in (((lo, hi), None), ((lo, L), (lo, hi))):  # dual cache, prefix cache
            cache = KVCache()
            model(ids, mask, t, cache=cache)
            out = model(ids, mask, t, cache=cache, compute=compute, keep=keep)
            assert out.log_probs.shape == (B, hi - lo, model.vocab_size)
            c0, c1 = compute
            assert out.hidden_states.shape == (B, c1 - c0, model.backbone.hidden_size)
            _close(out.hidden_states, full.hidden_states[:, c0:c1], ATOL)
            _close(out.log_probs, full.log_probs[:, lo:hi], ATOL)
            _close(out.token_log_probs, full.token_log_probs[:, lo:hi], ATOL)
            _close(out.quality_logits, None if full.quality_logits is None else full.quality_logits[:, lo:hi], ATOL)


@pytest.mark.parametrize("kind,head", CASES)
@torch.no_grad()
def test_partial_pass_writes_new_keys_in_place(kind, head):
    model, ids, mask, t = _setup(kind, head)
    L = ids.shape[1]
    lo, hi = 6, 14
    cache = KVCache()
    model(ids, mask, t, cache=cache)
    before = {n: (k.clone(), v.clone()) for n, (k, v) in cache.layers.items()}
    ptrs = {n: (k.data_ptr(), v.data_ptr()) for n, (k, v) in cache.layers.items()}
    changed = ids.clone()
    changed[:, lo:hi] = torch.randint(0, model.mask_id, (B, hi - lo))
    model(changed, mask, t, cache=cache, compute=(lo, hi))
    assert {n: (k.data_ptr(), v.data_ptr()) for n, (k, v) in cache.layers.items()} == ptrs  # no new tensors
    fresh = KVCache()
    model(changed, mask, t, cache=fresh)
    outside = torch.ones(L, dtype=torch.bool)
    outside[lo:hi] = False
    for n, (k, v) in cache.layers.items():
        assert torch.equal(k[:, :, outside], before[n][0][:, :, outside])
        assert torch.equal(v[:, :, outside], before[n][1][:, :, outside])
        assert not torch.allclose(k[:, :, lo:hi], before[n][0][:, :, lo:hi])
    # layer 0's keys and values depend only on the tokens (and t): the partial pass wrote the exact ones
    for i in (0, 1):
        _close(cache.layers["blocks.0"][i][:, :, lo:hi], fresh.layers["blocks.0"][i][:, :, lo:hi], ATOL)


def _output_layer(bb):
    return bb.output_layer if isinstance(bb, DiT) else bb.model.transformer.ff_out


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_backbone_shapes_and_keep_restricts_the_output_layer(kind):
    model, ids, mask, t = _setup(kind, None)
    bb, L, V = model.backbone, ids.shape[1], model.vocab_size
    rows = []
    hook = _output_layer(bb).register_forward_hook(lambda mod, inp, out: rows.append(inp[0].shape[1]))
    try:
        full = bb(ids, mask, t)
        cache = KVCache()
        ref = bb(ids, mask, t, cache=cache, keep=(3, 9))  # a refresh that keeps one block's logits
        assert ref.logits.shape == (B, 6, V) and ref.hidden_states.shape == (B, L, bb.hidden_size)
        _close(ref.logits, full.logits[:, 3:9], ATOL_EXACT)
        out = bb(ids, mask, t, cache=cache, compute=(2, 12), keep=(4, 7))
        assert out.hidden_states.shape == (B, 10, bb.hidden_size) and out.logits.shape == (B, 3, V)
        _close(out.logits, full.logits[:, 4:7], ATOL)
        out = bb(ids, mask, t, cache=cache, compute=(2, 12))
        assert out.logits.shape == (B, 10, V)
        assert rows == [L, 6, 3, 10]  # the output layer only ever saw the kept rows
        assert bb(ids, mask, t, logits=False, cache=cache, compute=(2, 12)).logits is None
        assert rows == [L, 6, 3, 10]
    finally:
        hook.remove()
    # the MDM: quality-only partial pass
    q = MDM(bb, head=MLPHead).eval()(ids, mask, t, log_probs=False, cache=cache, compute=(2, 12), keep=(4, 7))
    assert q.log_probs is None and q.quality_logits.shape == (B, 3)


class _NoCache(Backbone):
    vocab_size, mask_id, hidden_size = 5, 4, 8

    def forward(self, input_ids, attention_mask=None, t=None):
        return BackboneOutput(torch.zeros(*input_ids.shape, 8), torch.zeros(*input_ids.shape, 5))


@torch.no_grad()
def test_errors():
    model, ids, mask, t = _setup("dit", AttentionHead)
    L = ids.shape[1]
    with pytest.raises(ValueError, match="needs a KV cache"):
        model(ids, compute=(0, 4))
    with pytest.raises(ValueError, match="refresh"):
        model(ids, cache=KVCache(), compute=(0, 4))
    with pytest.raises(ValueError, match="refresh"):
        model.backbone(ids, cache=KVCache(), compute=(0, 4))
    cache = KVCache()
    model(ids, cache=cache)
    with pytest.raises(ValueError, match="keep"):
        model(ids, cache=cache, compute=(4, 8), keep=(2, 6))
    with pytest.raises(ValueError, match="keep"):
        model(ids, cache=cache, keep=(0, L + 1))
    with pytest.raises(ValueError, match="compute"):
        model(ids, cache=cache, compute=(5, 5))
    with pytest.raises(ValueError, match="length"):
        model(ids[:, :-2], cache=cache, compute=(0, 4))
    assert model.supports_kv_cache and not HFBackbone.supports_kv_cache
    assert LinearHead.supports_kv_cache and MLPHead.supports_kv_cache and AttentionHead.supports_kv_cache
    other = MDM(_NoCache())
    assert not other.supports_kv_cache
    with pytest.raises(ValueError, match=r"_NoCache.*samplers\.semi_ar\.cache = 'none'"):
        other(torch.zeros(1, 3, dtype=torch.long), cache=KVCache())
    assert other(torch.zeros(1, 3, dtype=torch.long)).log_probs.shape == (1, 3, 5)  # no cache: as before


@torch.no_grad()
def test_sub_batch_refresh_and_own_columns_touch_only_their_rows_and_columns():
    """``KVCache.select``: a refresh of some rows rewrites only theirs; a partial pass writes, per row,
    only its ``own`` columns and attends, elsewhere, over that row's cached keys (batch invariance)."""
    model, ids, mask, t = _setup("llada", AttentionHead)
    L = ids.shape[1]
    cache = KVCache(batch_size=B)
    model(ids, mask, t, cache=cache)
    before = {n: (k.clone(), v.clone()) for n, (k, v) in cache.layers.items()}
    changed = ids.clone()
    changed[:, 6:10] = 3
    rows = torch.tensor([1])
    with cache.select(rows):
        alone = model(changed[rows], mask[rows], cache=cache)
    for n, (k, _) in cache.layers.items():
        assert torch.equal(k[0], before[n][0][0]) and not torch.equal(k[1], before[n][0][1])
    ref = model(changed[rows], mask[rows])
    _close(alone.log_probs, ref.log_probs, ATOL_EXACT)
    # a partial pass over 4..12 in which row 0 owns only 6..10: its other columns keep the refresh's keys
    own = torch.zeros(B, L, dtype=torch.bool)
    own[0, 6:10] = True
    own[1, 4:12] = True
    snap = {n: k.clone() for n, (k, _) in cache.layers.items()}
    with cache.select(None, own):
        out = model(changed, mask, cache=cache, compute=(4, 12))
    for n, (k, _) in cache.layers.items():
        assert torch.equal(k[0, :, :6], snap[n][0, :, :6]) and torch.equal(k[0, :, 10:], snap[n][0, :, 10:])
        assert not torch.equal(k[0, :, 6:10], snap[n][0, :, 6:10])
    alone0 = KVCache()  # row 0 alone, from its refresh: a partial pass over its own columns only
    alone0.layers = {n: (k[:1].clone(), v[:1].clone()) for n, (k, v) in before.items()}
    ref0 = model(changed[:1], mask[:1], cache=alone0, compute=(6, 10))
    _close(out.log_probs[0, 2:6], ref0.log_probs[0], ATOL)
    unsized = KVCache()
    with pytest.raises(ValueError, match="batch_size"):
        with unsized.select(rows):
            model(ids[rows], mask[rows], cache=unsized)
