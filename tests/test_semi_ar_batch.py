"""``samplers.semi_ar`` on ragged batches: a row's sample never depends on its batch-mates (every cache
mode, threshold rule and remasking setting gives each row of a padded batch exactly the tokens it gets
alone); Fast-dLLM's threshold rule against a minimal re-implementation of its loop (no cache and dual
cache); the uncached sampler's window-only output layer gives the tokens of the full-logits path."""
import pytest
import torch

from prism.backbones.kv_cache import KVCache
from prism.backbones.dit import DiT
from prism.backbones.llada import LLaDABackbone
from prism.heads.quality import LinearHead
from prism.model import MDM
from prism.samplers.semi_ar import SemiARSchedule, semi_ar_sampler


def tiny(kind, seed=0):
    """A small random float32 model with a random linear quality head."""
    torch.manual_seed(seed)
    if kind == "llada":
        backbone = LLaDABackbone(preset="tiny")
    else:
        backbone = DiT(vocab_size=50, mask_id=49, hidden_size=32, n_blocks=2, n_heads=4, cond_dim=16)
    model = MDM(backbone, head=LinearHead).eval()
    with torch.no_grad():  # the DiT's adaLN modulations and output layer and the head start at zero
        for p in model.backbone.parameters() if kind == "dit" else ():
            p.normal_(0.0, 0.3)
        for p in model.head.parameters():
            p.normal_(0.0, 0.3)
    return model


# (left padding, prompt length, generated length) per row: rows in different blocks at the same step.
# The DiT's rotary angles are absolute positions, so its rows are padded on the right only.
ROWS = {"llada": [(3, 4, 24), (0, 7, 8), (5, 2, 16)], "dit": [(0, 4, 24), (0, 7, 8), (0, 2, 16)]}


def ragged(model, rows, seed=1):
    """Each row: left padding, a random prompt, masks, right padding to the longest; and each row
    alone (prompt + masks, no padding)."""
    g = torch.Generator().manual_seed(seed)
    L = max(sum(r) for r in rows)
    ids, fixed, seen, alone = [], [], [], []
    for lead, n, m in rows:
        prompt = torch.randint(0, model.mask_id, (n,), generator=g)
        tail = L - lead - n - m
        ids.append(torch.cat([torch.zeros(lead, dtype=torch.long), prompt, torch.full((m,), model.mask_id),
                              torch.zeros(tail, dtype=torch.long)]))
        fixed.append(torch.cat([torch.ones(lead + n, dtype=torch.bool), torch.zeros(m, dtype=torch.bool),
                                torch.ones(tail, dtype=torch.bool)]))
        seen.append(torch.cat([torch.zeros(lead, dtype=torch.bool), torch.ones(n + m, dtype=torch.bool),
                               torch.zeros(tail, dtype=torch.bool)]))
        alone.append({"input_ids": ids[-1][None, lead:lead + n + m], "fixed": fixed[-1][None, lead:lead + n + m],
                      "attention_mask": seen[-1][None, lead:lead + n + m]})
    batch = {"input_ids": torch.stack(ids), "fixed": torch.stack(fixed), "attention_mask": torch.stack(seen)}
    return batch, alone


def sample(model, b, **kw):
    return semi_ar_sampler(**kw)(model, b, torch.Generator().manual_seed(0)).tokens


# a threshold some drawn tokens reach and others do not (the random LLaDA is far less confident)
LOW = {"llada": 0.011, "dit": 0.95}


def settings(kind):
    return [dict(threshold=None), dict(threshold=0.9), dict(threshold=LOW[kind]),
            dict(threshold=LOW[kind], threshold_rule="fast_dllm")]


@pytest.mark.parametrize("kind", ["llada", "dit"])
@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
@pytest.mark.parametrize("remask", [0, 3])
def test_each_row_of_a_ragged_batch_samples_as_alone(kind, cache, remask):
    model = tiny(kind)
    b, alone = ragged(model, ROWS[kind])
    for setting in settings(kind):
        if remask and setting.get("threshold_rule") == "fast_dllm":
            continue  # Fast-dLLM's rule has no step plan to spread remasks over (refused)
        kw = dict(steps=12, block_length=8, remask_per_block=remask, cache=cache, **setting)
        batched = sample(model, b, **kw)
        assert not (batched == model.mask_id).any()
        for r, (lead, n, m) in enumerate(ROWS[kind]):
            own = sample(model, alone[r], **kw)[0]
            assert torch.equal(batched[r, lead:lead + n + m], own), (r, setting)


def fast_dllm(model, row, block_length, threshold, dual):
    """Fast-dLLM's greedy loop with a threshold, from its description, for one row without padding:
    blocks of ``block_length`` after the prompt; per block, until no mask is left: one pass, every
    masked position of the block guesses its argmax with confidence = the float64 softmax probability
    there, the most confident always transfers and every other with confidence >= threshold too.
    ``dual``: the pass at a block's start is a full one that stores keys/values, the others compute the
    block's columns alone against them. Returns the final ids and the number of passes."""
    x = row["input_ids"].clone()
    start, L = int((~row["fixed"][0]).nonzero()[0]), x.shape[1]
    passes = 0
    for lo in range(start, L, block_length):
        hi = min(lo + block_length, L)
        cache = KVCache() if dual else None
        first = True
        while (x[0, lo:hi] == model.mask_id).any():
            if not dual:
                logits = model(x).log_probs[:, lo:hi]
            elif first:
                logits = model(x, cache=cache).log_probs[:, lo:hi]
            else:
                logits = model(x, cache=cache, compute=(lo, hi)).log_probs
            first, passes = False, passes + 1
            probs = torch.softmax(logits.double(), -1)
            conf, guess = probs.max(-1)
            masked = x[:, lo:hi] == model.mask_id
            conf = torch.where(masked, conf, torch.full_like(conf, float("-inf")))
            take = conf >= threshold
            take[0, conf[0].argmax()] = True
            x[:, lo:hi] = torch.where(take & masked, guess, x[:, lo:hi])
    return x, passes


@pytest.mark.parametrize("cache", ["none", "dual"])
@pytest.mark.parametrize("threshold", [0.9, LOW["llada"]])
def test_fast_dllm_rule_matches_its_loop(cache, threshold):
    model = tiny("llada")
    b, alone = ragged(model, ROWS["llada"])
    out = semi_ar_sampler(steps=4, block_length=8, threshold=threshold, threshold_rule="fast_dllm", cache=cache)(
        model, b, torch.Generator().manual_seed(0))
    most = 0
    for r, (lead, n, m) in enumerate(ROWS["llada"]):
        ref, passes = fast_dllm(model, alone[r], 8, threshold, dual=cache == "dual")
        assert torch.equal(out.tokens[r, lead:lead + n + m], ref[0]), r
        most = max(most, passes)
    assert out.nfe == most  # the batch runs until its slowest row is done; the step plan (4) is ignored
    assert most > 4


def test_threshold_rule_is_validated():
    with pytest.raises(ValueError, match="threshold_rule must be one of"):
        semi_ar_sampler(threshold=0.9, threshold_rule="fast")
    with pytest.raises(ValueError, match="needs a threshold"):
        SemiARSchedule(threshold_rule="fast_dllm")
    with pytest.raises(ValueError, match="remask"):
        semi_ar_sampler(threshold=0.9, threshold_rule="fast_dllm", remask_per_block=2)


@pytest.mark.parametrize("kind", ["llada", "dit"])
@pytest.mark.parametrize("remask", [0, 3])
@pytest.mark.parametrize("threshold", [None, "low"])
def test_window_logits_give_the_tokens_of_the_full_logits_path(kind, remask, threshold):
    model = tiny(kind)
    b, _ = ragged(model, ROWS[kind])
    kw = dict(steps=12, block_length=8, remask_per_block=remask, threshold=threshold and LOW[kind])
    seen = []
    hook = model.backbone.model.transformer.ff_out if kind == "llada" else model.backbone.output_layer
    handle = hook.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].shape[1]))
    try:
        narrow = semi_ar_sampler(**kw)(model, b, torch.Generator().manual_seed(0))
        n_narrow = list(seen)
        seen.clear()
        sampler = semi_ar_sampler(**kw)
        sampler.window_logits = False
        full = sampler(model, b, torch.Generator().manual_seed(0))
    finally:
        handle.remove()
    assert torch.equal(narrow.tokens, full.tokens) and narrow.nfe == full.nfe
    L = b["input_ids"].shape[1]
    assert set(seen) == {L} and max(n_narrow) < L  # the span of the rows' blocks, never the whole sequence
