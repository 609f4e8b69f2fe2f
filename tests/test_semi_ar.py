"""``samplers.semi_ar`` against an independent re-implementation of LLaDA's ``generate`` (greedy,
low-confidence), padding on either side, the step plan, and the two remasking orders on cases
computed by hand."""
import os
from types import SimpleNamespace

import gin
import pytest
import torch

from prism.samplers.remask import PRISMRemask
from prism.samplers.semi_ar import SemiARSchedule, semi_ar_sampler, spread_central, steps_per_block

MASK, PAD = 0, 8
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ToyLM:
    """A tiny deterministic 'transformer': the logits at p sum a table of the token at p and, for
    every offset d in ±1 … ±reach (beyond any test length, so no two positions tie), a table of the
    token at p + d (nothing from positions outside the sequence or with attention_mask False). Its
    predictions therefore depend on the whole current state, and only on relative positions: a
    shifted row predicts the same. Float64."""

    mask_id, time_conditioned = MASK, False

    def __init__(self, vocab=9, reach=40, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.vocab, self.reach = vocab, reach
        self.own = torch.randn(vocab, vocab, generator=g, dtype=torch.float64) * 2
        self.near = torch.randn(2 * reach + 1, vocab, vocab, generator=g, dtype=torch.float64)
        self.calls = 0

    def __call__(self, z, attention_mask=None, t=None):
        self.calls += 1
        B, L = z.shape
        seen = torch.ones(B, L, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
        onehot = torch.nn.functional.one_hot(z, self.vocab).double() * seen[..., None]
        logits = onehot @ self.own
        for d in range(-self.reach, self.reach + 1):
            if d == 0 or abs(d) >= L:
                continue
            shifted = torch.zeros_like(onehot)  # shifted[:, p] = onehot[:, p + d]
            if d > 0:
                shifted[:, :L - d] = onehot[:, d:]
            else:
                shifted[:, -d:] = onehot[:, :L + d]
            logits = logits + shifted @ self.near[d + self.reach]
        logits[..., MASK] = float("-inf")
        logits[..., PAD] = float("-inf")  # never predicts the padding token
        log_probs = logits.log_softmax(-1)
        quality = log_probs.gather(-1, z[..., None]).squeeze(-1).nan_to_num(0.0, neginf=-50.0)
        return SimpleNamespace(log_probs=log_probs, quality_logits=quality)


EOS, EOT = 1, 2


def llada_generate(model, prompt, attention_mask, steps, gen_length, block_length, logits_eos_inf=False,
                   confidence_eos_eot_inf=False):
    """LLaDA's ``generate`` as its description goes (greedy, ``remasking='low_confidence'``, no CFG):
    the answer is appended after the (left-padded) prompt, cut into gen_length / block_length blocks
    with steps / blocks steps each; a block's masks are spread evenly over its steps (the first ones
    take the remainder); each step every still-masked position guesses its argmax, confidence is the
    softmax probability of that guess, positions after the current block get −inf, and each row
    transfers its top-k. Returns the final x and, per step, the (B, L) positions transferred.

    LLaDA's two EOS options at temperature 0, as its code reads: the EOS logit at −inf before the
    argmax (``logits_eos_inf``); after the argmax, the EOS and EOT logits at −inf before the softmax
    that gives the confidence (``confidence_eos_eot_inf``: at τ = 0 the noisy logits are the logits, so
    both are set). A guess of EOS/EOT then has confidence 0; ties among such zeros are broken here by
    the guess's own probability, as the sampler documents."""
    B, P = prompt.shape
    x = torch.cat([prompt, torch.full((B, gen_length), MASK, dtype=torch.long)], 1)
    seen = torch.cat([attention_mask, torch.ones(B, gen_length, dtype=torch.bool)], 1)
    assert gen_length % block_length == 0
    n_blocks = gen_length // block_length
    assert steps % n_blocks == 0
    per_block = steps // n_blocks
    transfers = []
    for b in range(n_blocks):
        end = P + (b + 1) * block_length
        n = (x[:, P + b * block_length:end] == MASK).sum(1)
        quota = [n // per_block + (j < n % per_block) for j in range(per_block)]
        for j in range(per_block):
            masked = x == MASK
            logits = model(x, attention_mask=seen).log_probs.double().clone()
            if logits_eos_inf:
                logits[..., EOS] = float("-inf")
            guess = logits.argmax(-1)
            own = torch.softmax(logits, -1).gather(-1, guess[..., None]).squeeze(-1)
            if confidence_eos_eot_inf:
                logits[..., EOS] = logits[..., EOT] = float("-inf")
            conf = torch.softmax(logits, -1).gather(-1, guess[..., None]).squeeze(-1)
            conf = torch.where(conf > 0, conf, own * 1e-12)  # the zeros, ordered by their own probability
            conf[:, end:] = float("-inf")
            conf = torch.where(masked, conf, torch.full_like(conf, float("-inf")))
            take = torch.zeros_like(masked)
            for r in range(B):
                take[r, torch.topk(conf[r], int(quota[j][r])).indices] = True
            x = torch.where(take, guess, x)
            transfers.append(take)
    return x, transfers


def semi_ar_batch(prompt, attention_mask, gen_length):
    B, P = prompt.shape
    ids = torch.cat([prompt, torch.full((B, gen_length), MASK, dtype=torch.long)], 1)
    fixed = torch.zeros_like(ids, dtype=torch.bool)
    fixed[:, :P] = True
    seen = torch.cat([attention_mask, torch.ones(B, gen_length, dtype=torch.bool)], 1)
    return {"input_ids": ids, "fixed": fixed, "attention_mask": seen}


def prompts(lengths, pad_left=True, seed=1):
    """Prompts of the given lengths padded with PAD to the longest (attention_mask False there)."""
    g = torch.Generator().manual_seed(seed)
    P = max(lengths)
    ids = torch.full((len(lengths), P), PAD, dtype=torch.long)
    seen = torch.zeros(len(lengths), P, dtype=torch.bool)
    for r, n in enumerate(lengths):
        sl = slice(P - n, P) if pad_left else slice(0, n)
        ids[r, sl] = torch.randint(1, PAD, (n,), generator=g)
        seen[r, sl] = True
    return ids, seen


# ---- 1. LLaDA's generate, step by step ---------------------------------------------------------

@pytest.mark.parametrize("lengths", [[5, 5, 5], [2, 7, 4, 6]])
@pytest.mark.parametrize("steps,gen_length,block_length",
                         [(12, 24, 8), (24, 24, 8), (8, 24, 24), (6, 24, 4), (10, 20, 10)])
def test_greedy_semi_ar_unmasks_what_llada_generate_unmasks(lengths, steps, gen_length, block_length):
    prompt, seen = prompts(lengths)
    model = ToyLM()
    ref_x, ref_steps = llada_generate(model, prompt, seen, steps, gen_length, block_length)
    out = semi_ar_sampler(steps=steps, block_length=block_length)(
        model, semi_ar_batch(prompt, seen, gen_length), torch.Generator().manual_seed(0), trace=True)
    assert len(out.trace) == len(ref_steps) == steps
    for i, (st, take) in enumerate(zip(out.trace, ref_steps)):
        assert torch.equal(st["unmasked"], take), f"step {i}"
        assert not st["remasked"].any()
    assert torch.equal(out.tokens, ref_x)
    assert (out.tokens[:, :prompt.shape[1]] == prompt).all() and (out.tokens != MASK).all()


# ---- 2. padding and the step plan ----------------------------------------------------------------

def padded(lengths, gen_lengths, side, rows=None):
    """Prompt (of ``lengths``, drawn once) + answer slots per row, padded with fixed PAD on ``side``
    ('left' | 'right') to a common length; returns the batch and each row's answer slice."""
    g = torch.Generator().manual_seed(3)
    all_rows = [torch.randint(1, PAD, (n,), generator=g) for n in lengths]
    rows = range(len(lengths)) if rows is None else rows
    L = max(lengths[r] + gen_lengths[r] for r in rows)
    ids, fixed, seen, answer = [], [], [], []
    for r in rows:
        p, m = all_rows[r], gen_lengths[r]
        n, pad = len(p), L - len(p) - m
        lead = pad if side == "left" else 0
        ids.append(torch.cat([torch.full((lead,), PAD), p, torch.full((m,), MASK), torch.full((pad - lead,), PAD)]))
        fixed.append(torch.cat([torch.ones(lead + n, dtype=torch.bool), torch.zeros(m, dtype=torch.bool),
                                torch.ones(pad - lead, dtype=torch.bool)]))
        seen.append(torch.cat([torch.zeros(lead, dtype=torch.bool), torch.ones(n + m, dtype=torch.bool),
                               torch.zeros(pad - lead, dtype=torch.bool)]))
        answer.append(slice(lead + n, lead + n + m))
    return {"input_ids": torch.stack(ids), "fixed": torch.stack(fixed), "attention_mask": torch.stack(seen)}, answer


def answers(sampler, lengths, gen_lengths, side, rows=None):
    b, ans = padded(lengths, gen_lengths, side, rows)
    out = sampler(ToyLM(), b, torch.Generator().manual_seed(0), trace=True)
    assert (out.tokens[b["fixed"]] == b["input_ids"][b["fixed"]]).all() and (out.tokens != MASK).all()
    return [out.tokens[r, a] for r, a in enumerate(ans)], out, b


def test_right_padding_forms_no_blocks():
    b, _ = padded([3, 6, 4], [16, 16, 16], "right")
    blocks = SemiARSchedule(steps=8, block_length=8).blocks(b["fixed"])
    assert (blocks.max(1).values == 1).all()  # 2 blocks each, not 3 with the padding
    assert (blocks[b["fixed"] & (torch.arange(b["fixed"].shape[1]) > 10)] == -1).all()
    plan = list(SemiARSchedule(steps=11, block_length=8).plans(SimpleNamespace(
        fixed=b["fixed"], masked=~b["fixed"], clean=torch.zeros_like(b["fixed"]))))
    assert len(plan) == 11  # steps // blocks = 5 would have dropped one; the last block takes 6
    assert steps_per_block(11, 2) == [5, 6] and steps_per_block(12, 5) == [2, 2, 2, 3, 3]


@pytest.mark.parametrize("steps", [10, 11, 16])
@pytest.mark.parametrize("gen_lengths", [[16, 16, 16], [16, 8, 13]])
def test_right_padded_rows_sample_as_left_padded_and_alone(steps, gen_lengths):
    lengths = [3, 6, 4]
    sampler = semi_ar_sampler(steps=steps, block_length=8)
    right, out, b = answers(sampler, lengths, gen_lengths, "right")
    left, _, _ = answers(sampler, lengths, gen_lengths, "left")
    alone = [answers(sampler, lengths, gen_lengths, "right", rows=[r])[0][0] for r in range(3)]  # no padding
    for r in range(3):
        assert torch.equal(right[r], left[r]) and torch.equal(right[r], alone[r]), r
    assert len(out.trace) == steps
    per_row = torch.stack([st["unmasked"].sum(1) for st in out.trace])  # (steps, B)
    assert torch.equal(per_row.sum(0), torch.tensor(gen_lengths))
    for r, m in enumerate(gen_lengths):  # each block has at least as many masks as steps: all steps work
        if m == 16:
            assert (per_row[:, r] > 0).all()


def test_too_few_steps_are_refused_by_name():
    b, _ = padded([3], [24], "right")
    with pytest.raises(ValueError, match=r"steps = 2 cannot cover 3 blocks of block_length = 8"):
        semi_ar_sampler(steps=2, block_length=8)(ToyLM(), b)
    with pytest.raises(ValueError, match="remask_spread"):
        SemiARSchedule(remask_spread="middle")


# ---- 3/4. remasking on hand-computed cases ------------------------------------------------

class TableModel:
    """One prompt position then a block of 4. Every masked position p predicts token 1 with
    probability CONF[p] (the rest on 2 and 3); a clean position predicts with probability
    ``clean_conf`` (token 2 when that is below 1/3). Quality logits are a fixed table: position 1
    lowest, then 3, 4, 2."""

    mask_id, time_conditioned = MASK, False
    CONF = torch.tensor([0.5, 0.9, 0.6, 0.8, 0.7], dtype=torch.float64)
    QUALITY = torch.tensor([9.0, -1.0, 2.0, 0.0, 1.0])

    def __init__(self, clean_conf=None):
        self.clean_conf = clean_conf

    def __call__(self, z, attention_mask=None, t=None):
        c = self.CONF.expand(z.shape)
        if self.clean_conf is not None:
            c = torch.where(z == MASK, c, torch.full_like(c, self.clean_conf))
        rest = (1 - c) / 2
        top2 = torch.where(c < 1 / 3, 1 - c - 0.05, rest)
        p = torch.stack([torch.zeros_like(c), c, top2, 1 - c - top2], -1)
        return SimpleNamespace(log_probs=p.log(), quality_logits=self.QUALITY.expand(z.shape).clone())


def run_table(k_block, spread, clean_conf=None, steps=4):
    ids = torch.tensor([[3, 0, 0, 0, 0]])
    fixed = torch.tensor([[True, False, False, False, False]])
    sampler = semi_ar_sampler(steps=steps, block_length=4, remask_per_block=k_block, remask_rule=PRISMRemask(),
                              remask_spread=spread)
    out = sampler(TableModel(clean_conf), {"input_ids": ids, "fixed": fixed}, None, trace=True)
    assert out.tokens[0, 0] == 3 and (out.tokens != MASK).all()  # the block ends fully unmasked
    where = lambda m: sorted(m[0].nonzero().flatten().tolist())  # noqa: E731
    return [(where(st["unmasked"]), where(st["remasked"])) for st in out.trace], out


# (unmasked, remasked) per step; confidence order 1 > 3 > 4 > 2, quality order 1 < 3 < 4 < 2
HAND = {
    # K = 2 on the inner steps [0, 1, 1, 0], one share a step: step 1 unmasks 2 among {2, 3, 4}
    # (3, 4) and remasks the only token clean before it (1); step 2 refills 1 and 2, remasks 3 (the
    # lower quality of 3, 4); step 3 unmasks 3.
    (2, "inner", None): [([1], []), ([3, 4], [1]), ([1, 2], [3]), ([3], [])],
    # the central budget K = 4 over S = 4 is one a step: none at step 0 (nothing clean) and none at
    # step 3 (no later step to refill it).
    (4, "central", None): [([1], []), ([3, 4], [1]), ([1, 2], [3]), ([3], [])],
    # K = 1 centrally: the single remask on step 1 (the left of the two central steps)
    (1, "central", None): [([1], []), ([3, 4], [1]), ([1], []), ([2], [])],
}


@pytest.mark.parametrize("case", list(HAND))
def test_remasking_by_hand(case):
    k_block, spread, clean_conf = case
    steps, out = run_table(k_block, spread, clean_conf)
    assert steps == HAND[case]
    assert out.nfe == 4  # one forward pass a step, none for the final denoising


def test_a_remasked_position_is_refilled_from_the_masked_prediction():
    # clean positions predict token 2 at 0.95 (clean_conf 0): position 1, remasked at step 1, is
    # refilled a step later from the prediction at a MASKED position (token 1), never from the pass
    # that saw it clean
    steps, out = run_table(2, "inner", clean_conf=0.0)
    assert steps == [([1], []), ([3, 4], [1]), ([1, 2], [3]), ([3], [])]
    assert out.tokens[0].tolist() == [3, 1, 1, 1, 1]


def test_spreads_and_counts_per_step():
    assert spread_central(12, 16) == [0, 0] + [1] * 12 + [0, 0]  # the paper's 12 per block over 16 steps
    assert spread_central(3, 8) == [0, 0, 1, 1, 1, 0, 0, 0] and spread_central(9, 4) == [2, 3, 2, 2]
    assert spread_central(1, 8) == [0, 0, 0, 1, 0, 0, 0, 0]  # tie at 3.5: the left step
    for order in ("after_unmask",):
        for spread in ("inner", "central"):
            b, _ = padded([3, 5], [24, 19], "right")
            sampler = semi_ar_sampler(steps=12, block_length=8, remask_per_block=3,
                                      remask_spread=spread, remask_rule=PRISMRemask())
            out = sampler(ToyLM(), b, torch.Generator().manual_seed(0), trace=True)
            assert (out.tokens != MASK).all() and (out.tokens[b["fixed"]] == b["input_ids"][b["fixed"]]).all()
            for st in out.trace:
                z, un, re = st["z"], st["unmasked"], st["remasked"]
                assert not (re & (z == MASK)).any() and not (re & b["fixed"]).any()  # only clean tokens
                assert not (un & (z != MASK)).any()  # unmasks masked positions only
                assert not (un & re).any()
                for r in range(2):  # all touched positions lie in one block; earlier ones are done
                    touched = (un[r] | re[r]).nonzero().flatten()
                    if len(touched):
                        start = int((~b["fixed"][r]).nonzero()[0])
                        blk = {(int(p) - start) // 8 for p in touched}
                        assert len(blk) == 1
                        assert (z[r, start:start + 8 * blk.pop()] != MASK).all()
            total = sum(int(st["remasked"].sum()) for st in out.trace)
            assert total > 0, (order, spread)


def test_gin_baselines_compose():
    path = os.path.join(REPO, "gin", "samplers", "semi_ar_prism_authors.gin")
    for binds, rule, k in [([], "PRISMRemask", 12), (["K_BLOCK = 0"], "PRISMRemask", 0),
                           (["samplers.semi_ar.remask_rule = @remask_rules.random()"], "RandomRemask", 12)]:
        gin.clear_config()
        try:
            gin.parse_config_files_and_bindings([path], ["STEPS = 256"] + binds)
            sampler = semi_ar_sampler()
        finally:
            gin.clear_config()
        s = sampler.schedule
        assert (s.n_steps, s.block_length, s.remask_per_block, s.remask_spread) == (256, 64, k, "central")
        assert type(sampler.remask_rule).__name__ == rule and s.remasks == (k > 0)


def prism_llada_inference(model, x, prompt_len, steps, block_length, n_blocks, k_block):
    """The decisions of PRISM's released ``llada_inference`` (PRISM_llada/sampling.py) as described:
    blocks from the prompt's end, steps / blocks steps each; every step one forward, then the
    k_block budget of that step (K // S each, the remainder to the central steps) remasks the lowest
    quality clean tokens of the block, then the share plus that budget is unmasked, most confident
    first, among the positions that were masked BEFORE the remask (the candidate mask is taken
    first). Returns x and, per step, (unmasked, remasked)."""
    per_block, B, L = steps // n_blocks, x.shape[0], x.shape[1]
    budget = spread_central(k_block, per_block)
    pos, log = torch.arange(L), []
    for b in range(n_blocks):
        block = (pos >= prompt_len + b * block_length) & (pos < prompt_len + (b + 1) * block_length)
        n = ((x == MASK) & block).sum(1)
        for i in range(per_block):
            out = model(x)
            clean, masked = (x != MASK) & block, (x == MASK) & block
            gone, taken = torch.zeros_like(clean), torch.zeros_like(clean)
            for r in range(B):
                k = min(budget[i], int(clean[r].sum()))
                score = torch.where(clean[r], -out.quality_logits[r].double(), torch.tensor(float("-inf")))
                gone[r, torch.topk(score, k).indices[:k] if k else []] = True
            guess = out.log_probs.argmax(-1)
            conf = out.log_probs.exp().gather(-1, guess[..., None]).squeeze(-1)
            for r in range(B):
                k = min(int(n[r] // per_block + (i < n[r] % per_block)) + budget[i], int(masked[r].sum()))
                score = torch.where(masked[r], conf[r], torch.tensor(float("-inf")))
                taken[r, torch.topk(score, k).indices if k else []] = True
            x = torch.where(taken, guess, torch.where(gone, torch.full_like(x, MASK), x))
            log.append((taken, gone))
    return x, log


def test_released_prism_llada_order_is_after_unmask_with_the_central_budget():
    prompt, seen = prompts([4, 4, 4])
    model = ToyLM(seed=2)
    x0 = torch.cat([prompt, torch.full((3, 16), MASK, dtype=torch.long)], 1)
    ref_x, ref_log = prism_llada_inference(model, x0, 4, steps=16, block_length=8, n_blocks=2, k_block=3)
    sampler = semi_ar_sampler(steps=16, block_length=8, remask_per_block=3, remask_rule=PRISMRemask(),
                              remask_spread="central")
    out = sampler(model, semi_ar_batch(prompt, seen, 16), None, trace=True)
    assert sum(int(g.sum()) for _, g in ref_log) == 3 * 2 * 3  # the budget was spent
    for i, (st, (taken, gone)) in enumerate(zip(out.trace, ref_log)):
        assert torch.equal(st["unmasked"], taken) and torch.equal(st["remasked"], gone), i
    assert torch.equal(out.tokens, ref_x)


# ---- 5. LLaDA's EOS options: logits_eos_inf and confidence_eos_eot_inf --------------------------

class EOSLoverLM(ToyLM):
    """ToyLM whose logits favour EOS and EOT (+2.5) so that they are often the argmax."""

    def __call__(self, z, attention_mask=None, t=None):
        out = super().__call__(z, attention_mask, t)
        logits = out.log_probs.clone()
        logits[..., EOS] += 2.5
        logits[..., EOT] += 2.5
        return SimpleNamespace(log_probs=logits.log_softmax(-1), quality_logits=out.quality_logits)


@pytest.mark.parametrize("flags", [dict(logits_eos_inf=True), dict(confidence_eos_eot_inf=True),
                                   dict(logits_eos_inf=True, confidence_eos_eot_inf=True)])
def test_llada_eos_options_match_generate(flags):
    prompt, seen = prompts([4, 6, 5])
    model = EOSLoverLM()
    plain = llada_generate(model, prompt, seen, 12, 24, 8)[0]
    ref = llada_generate(model, prompt, seen, 12, 24, 8, **flags)[0]
    kw = {}
    if flags.get("logits_eos_inf"):
        kw["forbid_tokens"] = [EOS]
    if flags.get("confidence_eos_eot_inf"):
        kw["low_confidence_tokens"] = [EOS, EOT]
    out = semi_ar_sampler(steps=12, block_length=8, **kw)(model, semi_ar_batch(prompt, seen, 24),
                                                             torch.Generator().manual_seed(0))
    assert torch.equal(out.tokens, ref)
    assert not torch.equal(ref, plain)                       # the option changes the samples here
    gen = out.tokens[:, prompt.shape[1]:]
    if flags.get("logits_eos_inf"):
        assert not (gen == EOS).any() and (plain[:, prompt.shape[1]:] == EOS).any()


def test_confidence_exclude_by_hand():
    """p = (0.1, 0.2, 0.3, 0.4) over tokens 0..3, EOS = 1, EOT = 2 excluded: a drawn 3 has confidence
    0.4 / (1 - 0.5) = 0.8; a drawn 0 has 0.2; a drawn 1 or 2 comes after both."""
    from prism.samplers.rules import ConfidenceUnmask

    lp = torch.tensor([0.1, 0.2, 0.3, 0.4]).log().expand(1, 4, 4)
    tokens = torch.tensor([[3, 0, 1, 2]])
    s = ConfidenceUnmask(exclude=[EOS, EOT]).scores(lp, tokens, tokens, None)
    assert torch.allclose(s[0, :2].exp(), torch.tensor([0.8, 0.2], dtype=torch.float64))
    assert (s[0, 2:] < -1e5).all() and s[0, 3] > s[0, 2]   # the excluded last, ordered by their own p
    with pytest.raises(ValueError, match="unmask_rules.confidence.exclude"):
        semi_ar_sampler(low_confidence_tokens=[1], unmask_rule=ConfidenceUnmask())
