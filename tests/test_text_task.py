"""tasks.text: MDLM's wrap preprocessing (exact blocks on hand-made corpora), the held-out split, the
cache, batches drawn from the step's generator, unconditional evaluation batches, decoding, the offline
Wikipedia corpus (a subset) and gin/owt/tiny.gin end to end. Every cache goes to a temporary directory."""
import json
import os

import numpy as np
import pytest
import torch

from conftest import SHARED_DATA, run_py
from tasks.text import MASK_TEXT, TextTask
from tasks.text_corpus import fill_blocks, load_wikiextractor, wrap_documents

WIKI = os.path.join(SHARED_DATA, "text", "wikipedia_en_wikiextractor")
GPT2 = os.path.join(SHARED_DATA, "tokenizers", "gpt2")
pytestmark = pytest.mark.skipif(not (os.path.isdir(WIKI) and os.path.isdir(GPT2)),
                                reason="needs ../shared/data/text and ../shared/data/tokenizers/gpt2")
E = 50256  # GPT-2's <|endoftext|>: MDLM's BOS and EOS
N_DOCS = 60  # the offline corpus subset used here
CUT = "\ufffd"  # a block boundary may cut a multi-byte character: its halves decode to U+FFFD


# ----------------------------------------------------------------------------- wrap
def test_wrap_of_a_three_document_corpus():
    docs, B, X = [[1, 2, 3], [4, 5], [6, 7, 8, 9]], 100, 101  # X: EOS, distinct from BOS here
    # stream: 1 2 3 X 4 5 X 6 7 8 9 X (12 tokens); chunks of L - 2, each [B] + chunk + [X]
    assert wrap_documents(docs, 5, B, X).tolist() == [
        [B, 1, 2, 3, X], [B, X, 4, 5, X], [B, X, 6, 7, X], [B, 8, 9, X, X]]
    assert wrap_documents(docs, 6, B, X).tolist() == [
        [B, 1, 2, 3, X, X], [B, 4, 5, X, 6, X], [B, 7, 8, 9, X, X]]
    # the remainder that fills no chunk (9 X) is dropped
    assert wrap_documents(docs, 7, B, X).tolist() == [[B, 1, 2, 3, X, 4, X], [B, 5, X, 6, 7, 8, X]]
    assert wrap_documents(docs, 20, B, X).shape == (0, 20)
    # how the stream arrives in pieces does not matter
    out = np.empty((4, 5), np.int64)
    fill_blocks([np.array([1, 2]), np.array([3, X, 4, 5, X, 6, 7, 8]), np.array([9, X])], out, B, X)
    assert out.tolist() == wrap_documents(docs, 5, B, X).tolist()
    with pytest.raises(ValueError, match="seq_len >= 3"):
        wrap_documents(docs, 2, B, X)


@pytest.fixture
def toy(tmp_path):
    """A 4-document jsonl corpus: 3 training documents, the last one held out."""
    path = tmp_path / "toy.jsonl"
    rows = ["Hello world", " The cat sat.", "A dog.", "Numbers 12345 and 67890 are held out here, all of them."]
    path.write_text("".join(json.dumps({"body": r, "id": i}) + "\n" for i, r in enumerate(rows)))
    return TextTask(source=str(path), text_field="body", seq_len=6, eval_documents=1,
                    cache_dir=str(tmp_path / "cache"), n_eval=5)


def test_task_wraps_a_toy_corpus_with_gpt2(toy):
    assert (toy.vocab_size, toy.mask_id, toy.bos_id, toy.eos_id) == (50258, 50257, E, E)
    # Hello world | The cat sat. | A dog. -> [15496, 995] [383, 3797, 3332, 13] [32, 3290, 13], each + EOS
    assert toy.train_blocks.tolist() == [[E, 15496, 995, E, 383, E], [E, 3797, 3332, 13, E, E],
                                         [E, 32, 3290, 13, E, E]]
    assert toy.train_blocks.dtype == np.uint16
    held_out = toy.tokenizer("Numbers 12345 and 67890 are held out here, all of them.",
                             add_special_tokens=False)["input_ids"]
    assert toy.eval_blocks.tolist() == wrap_documents([held_out], 6, E, E).tolist()
    assert toy.data["meta"]["documents"] == {"train": 3, "eval": 1}
    with pytest.raises(ValueError, match="fill no block"):
        TextTask(source=toy.source, text_field="body", seq_len=64, eval_documents=1,
                 cache_dir=toy.cache_root).prepare()
    with pytest.raises(ValueError, match="no field 'text'"):
        TextTask(source=toy.source, seq_len=6, eval_documents=1, cache_dir=toy.cache_root).prepare()


def test_batches_are_drawn_by_the_generator(toy):
    a = toy.train_batch(16, torch.Generator().manual_seed(3))
    b = toy.train_batch(16, torch.Generator().manual_seed(3))
    c = toy.train_batch(16, torch.Generator().manual_seed(4))
    assert torch.equal(a["input_ids"], b["input_ids"]) and not torch.equal(a["input_ids"], c["input_ids"])
    assert a["input_ids"].dtype == torch.long and a["input_ids"].shape == (16, 6)
    assert not a["fixed"].any() and "attention_mask" not in a
    rows = {tuple(r) for r in toy.train_blocks.tolist()}
    assert all(tuple(r) in rows for r in a["input_ids"].tolist())
    # exactly the blocks torch.randint picks with that generator
    idx = torch.randint(len(toy), (16,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a["input_ids"], torch.from_numpy(toy.train_blocks[idx.numpy()].astype(np.int64)))


def test_eval_batches_are_all_mask_and_in_order(toy):
    batches = list(toy.eval_batches(2))
    assert [len(b["input_ids"]) for b in batches] == [2, 2, 1]
    assert torch.cat([b["index"] for b in batches]).tolist() == list(range(5))
    for b in batches:
        toy.check_batch(b)
        assert (b["input_ids"] == toy.mask_id).all() and not b["fixed"].any()
        assert b["input_ids"].shape[1] == toy.seq_len
    samples = torch.tensor([[E, 15496, E, E, 995, 13], [1, 2, 3, 4, 5, 6]])
    assert toy.sample_metrics(samples, batches[0])["eos"].tolist() == [3.0, 0.0]


def test_cache_is_reused(toy, monkeypatch):
    blocks = toy.train_blocks.tolist()
    meta = os.path.join(toy.cache_path, "meta.json")
    stamp = os.stat(meta).st_mtime_ns
    assert sorted(os.listdir(toy.cache_path)) == ["eval.npy", "meta.json", "train.npy"]

    def no_build(self, path):
        raise AssertionError("the cache was built again")

    monkeypatch.setattr(TextTask, "_build", no_build)
    again = TextTask(source=toy.source, text_field="body", seq_len=6, eval_documents=1, cache_dir=toy.cache_root)
    assert again.cache_path == toy.cache_path and again.train_blocks.tolist() == blocks
    assert os.stat(meta).st_mtime_ns == stamp
    assert isinstance(again.train_blocks, np.memmap)
    # another seq_len or split is another cache
    other = TextTask(source=toy.source, text_field="body", seq_len=5, eval_documents=1, cache_dir=toy.cache_root)
    assert other.cache_key() != toy.cache_key()
    assert TextTask(source=toy.source, text_field="body", seq_len=6, eval_documents=0.5,
                    cache_dir=toy.cache_root).cache_key() != toy.cache_key()


# ----------------------------------------------------------------------------- the offline corpus
@pytest.fixture(scope="module")
def wiki(tmp_path_factory):
    task = TextTask(max_documents=N_DOCS, seq_len=64, cache_dir=str(tmp_path_factory.mktemp("text_cache")),
                    n_eval=3)
    task.prepare()
    return task


def test_offline_default_builds(wiki):
    assert wiki.source == "wikipedia-offline" and wiki.eval_documents == 0.05
    meta = wiki.data["meta"]
    assert meta["documents"] == {"train": 57, "eval": 3}
    assert wiki.train_blocks.shape == (meta["blocks"]["train"], 64) and len(wiki) > 100
    assert wiki.eval_blocks.shape[0] == meta["blocks"]["eval"] > 0
    assert (wiki.train_blocks[:, 0] == E).all() and (wiki.train_blocks[:, -1] == E).all()
    assert int(wiki.train_blocks.max()) < 50257  # no mask token in the data
    assert wiki.cache_path.startswith(os.path.join(wiki.cache_root, "text"))


def test_the_offline_corpus_has_its_17200_articles():
    docs = load_wikiextractor(WIKI)  # bodies of 200+ characters, as its README counts them
    assert len(docs) == 17_200 and docs[0].startswith("Jarred Shaw (born September 28, 1990)")


def test_held_out_documents_never_reach_training(wiki):
    docs = load_wikiextractor(WIKI, max_documents=N_DOCS)
    assert len(docs) == N_DOCS and all(len(d) >= 200 for d in docs)
    train_text, eval_text = "<|endoftext|>".join(docs[:57]), "<|endoftext|>".join(docs[57:])
    tok = wiki.tokenizer
    n_train = len(tok(train_text)["input_ids"]) + 1  # + the last document's EOS
    assert len(wiki) == n_train // 62
    train_rows = {tuple(r) for r in wiki.train_blocks.tolist()}
    assert not any(tuple(r) in train_rows for r in wiki.eval_blocks.tolist())
    # a held-out block's text comes from the held-out documents and from no training document
    for block in (wiki.eval_blocks[0], wiki.eval_blocks[-1]):
        pieces = tok.decode(block[1:-1].tolist()).strip(CUT).split("<|endoftext|>")
        body = max(pieces, key=len)[:80].strip(CUT)
        assert len(body) > 20 and body in eval_text and body not in train_text


def test_decode_round_trip_on_a_real_block(wiki):
    docs = load_wikiextractor(WIKI, max_documents=57)
    corpus = "<|endoftext|>".join(docs) + "<|endoftext|>"
    for i in (0, len(wiki) // 2, len(wiki) - 1):
        block = torch.from_numpy(wiki.train_blocks[i].astype(np.int64))
        text = wiki.decode(block)
        assert text.startswith("<|endoftext|>") and text.endswith("<|endoftext|>")
        inner = text[len("<|endoftext|>"): -len("<|endoftext|>")].strip(CUT)
        assert inner in corpus  # the block's tokens read back as the text they came from
        assert wiki.tokenizer(inner)["input_ids"][:3] == block[1:4].tolist() or i > 0
    masked = torch.tensor([15496, wiki.mask_id, wiki.mask_id, 995])
    assert wiki.decode(masked) == f"Hello{MASK_TEXT}{MASK_TEXT} world"


def test_reference_texts_are_held_out_blocks(wiki):
    refs = wiki.reference_texts(3)
    assert refs == wiki.reference_texts(3) and len(set(refs)) == 3
    held_out = {wiki.decode(torch.from_numpy(b.astype(np.int64))) for b in wiki.eval_blocks}
    assert set(refs) <= held_out
    with pytest.raises(ValueError, match="reference texts"):
        wiki.reference_texts(len(wiki.eval_blocks) + 1)


# ----------------------------------------------------------------------------- gin/owt/tiny.gin
def test_tiny_owt_recipe_trains_and_samples(tmp_path):
    out = str(tmp_path / "run")
    binds = [f"tasks.text.cache_dir = '{tmp_path / 'cache'}'", f"tasks.text.max_documents = {N_DOCS}",
             "tasks.text.seq_len = 32", "DIT_PRESET = 'test'", "STEPS = 4", "train.steps = 2",
             "train.batch_size = 2", "evaluate.limit = 2", "evaluate.batch_size = 2", "run.eval_after_train = False"]
    args = [a for b in binds for a in ("--bind", b)]
    run_py(["train", "gin/owt/tiny.gin", "--output-dir", out, *args])
    with open(os.path.join(out, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    proc = run_py(["sample", "gin/owt/tiny.gin", "--output-dir", out, *args])
    assert "loaded weights" in proc.stdout
    with open(os.path.join(out, "samples.jsonl")) as f:
        samples = [json.loads(line) for line in f]
    assert [s["index"] for s in samples] == [0, 1]
    for s in samples:
        assert len(s["tokens"]) == 32 and 50257 not in s["tokens"]
        assert isinstance(s["text"], str) and MASK_TEXT not in s["text"]
