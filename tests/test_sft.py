"""tasks.tokenizers (the offline gpt2-chat tokenizer, special ids) and tasks.sft (LLaDA-style SFT
batches, the tokenised cache, left-padded evaluation batches). Every cache goes to a temporary
directory passed as ``cache_dir``."""
import json
import logging
import os
import subprocess
import sys

import datasets
import gin
import pytest
import torch

from conftest import SHARED_DATA
from registry import TASKS
from tasks.sft import SFT
from tasks.sft_data import load_mbpp
from tasks.tokenizers import (
    CHAT_TEMPLATE, build_chat_tokenizer, chat_tokenizer_dir, resolve_tokenizer, special_ids,
)

SEQ, GEN = 512, 128


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """A cache root holding the gpt2-chat tokenizer, built once for the module."""
    root = str(tmp_path_factory.mktemp("prism_cache"))
    chat_tokenizer_dir(root)
    return root


@pytest.fixture(scope="module")
def tok(cache):
    return resolve_tokenizer("gpt2-chat", cache_dir=cache)


@pytest.fixture(scope="module")
def mbpp_task(cache):
    task = SFT(seq_len=SEQ, gen_length=GEN, cache_dir=cache)
    task.prepare()
    return task


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    return str(path)


# ----------------------------------------------------------------------------- tokenizer
def test_chat_tokenizer_directory_loads_offline(cache, tmp_path):
    out = str(tmp_path / "tok")
    build_chat_tokenizer(out)
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(out))
    code = ("import sys; from transformers import AutoTokenizer; t = AutoTokenizer.from_pretrained(sys.argv[1]); "
            "print(len(t), t.mask_token, t.convert_tokens_to_ids('<|eot_id|>'), t.eos_token_id)")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    proc = subprocess.run([sys.executable, "-c", code, out], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["50262", "<|mdm_mask|>", "50261", "50256"]
    # the cached copy is built once: a second resolve reuses the directory
    d = chat_tokenizer_dir(cache)
    stamp = os.stat(os.path.join(d, "tokenizer.json")).st_mtime_ns
    resolve_tokenizer("gpt2-chat", cache_dir=cache)
    assert os.stat(os.path.join(d, "tokenizer.json")).st_mtime_ns == stamp
    assert not [n for n in os.listdir(os.path.dirname(d)) if n.startswith(".")]  # no temporary build left


def test_chat_template_renders_llada_shape(tok):
    assert tok.chat_template == CHAT_TEMPLATE
    text = tok.apply_chat_template([{"role": "user", "content": "Add 2 and 3."}], add_generation_prompt=True,
                                   tokenize=False)
    assert text == ("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\nAdd 2 and 3.<|eot_id|>"
                    "<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids[:2] == [50258, 50259] and ids[-2:] == [50260, 628]  # ... <|end_header_id|> "\n\n"
    full = tok.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
                                   tokenize=False)
    assert full.endswith("<|start_header_id|>assistant<|end_header_id|>\n\nHello<|eot_id|>")


def test_special_ids_distinct_and_in_range(tok):
    ids = special_ids(tok, require=("mask", "eos", "bos", "eot"))
    assert ids == {"mask": 50257, "eos": 50256, "bos": 50258, "eot": 50261}
    assert len(set(ids.values())) == 4 and all(0 <= v < len(tok) for v in ids.values())
    assert tok.pad_token_id == tok.eos_token_id == 50256
    # round trip of text with tabs, CRLF and unicode through the byte-level BPE
    s = "def f(x):\r\n\treturn x  # é ✓\n"
    assert tok.decode(tok(s, add_special_tokens=False)["input_ids"], clean_up_tokenization_spaces=False) == s


def test_special_ids_missing_is_a_clear_error():
    plain = resolve_tokenizer(os.path.join(SHARED_DATA, "tokenizers", "gpt2"))
    with pytest.raises(ValueError, match="no a mask token.*no an end-of-turn"):
        special_ids(plain, require=("mask", "eos", "eot"))
    assert special_ids(plain, require=("eos",))["eos"] == 50256
    with pytest.raises(ValueError, match="could not load tokenizer"):
        resolve_tokenizer("/no/such/dir/and-not-a-hub-id", cache_dir="/nonexistent")


# ----------------------------------------------------------------------------- data
def test_mbpp_train_split_only():
    rows = load_mbpp("mbpp-train")
    assert len(rows) == 374 and [r["task_id"] for r in rows] == list(range(601, 975))
    assert all("\r\n" not in r["output"] for r in rows) and rows[0]["test_list"][0] in rows[0]["instruction"]
    for bad in ("mbpp-test", "mbpp-full"):
        with pytest.raises(ValueError, match="test split"):
            load_mbpp(bad)
    with pytest.raises(ValueError, match="test split"):
        SFT(source="mbpp-test", cache_dir="/nonexistent").prepare()


def test_mbpp_task_counts(mbpp_task):
    meta = mbpp_task.data["meta"]
    assert meta["n_train"] + meta["dropped"] + meta["n_eval"] + meta["eval_dropped"] == 374
    assert len(mbpp_task) == meta["n_train"] and mbpp_task.n_dropped == meta["dropped"] >= 1  # 2 at 512 tokens
    assert mbpp_task.n_eval == meta["n_eval"] == 19  # 5% held out
    ids = {r["task_id"] for r in load_mbpp("mbpp-train")}
    train_ids = {601 + int(r) for r in mbpp_task.data["train_rows"]}
    eval_ids = {mbpp_task.eval_example(i)["task_id"] for i in range(mbpp_task.n_eval)}
    assert train_ids <= ids and eval_ids <= ids and not train_ids & eval_ids
    assert mbpp_task.vocab_size == 50262 and mbpp_task.mask_id == 50257
    assert "sft" in TASKS.names()


def test_train_batch_layout_and_round_trip(mbpp_task):
    rows = load_mbpp("mbpp-train")
    batch = mbpp_task.train_batch(6, torch.Generator().manual_seed(3))
    ids, fixed = batch["input_ids"], batch["fixed"]
    assert set(batch) == {"input_ids", "fixed"}
    assert ids.shape == fixed.shape == (6, SEQ) and ids.dtype == torch.long and fixed.dtype == torch.bool
    tok = mbpp_task.tokenizer
    for b in range(6):
        n_prompt = int(fixed[b].sum())
        assert fixed[b, :n_prompt].all() and not fixed[b, n_prompt:].any()  # the prompt, then nothing fixed
        prompt = tok.decode(ids[b, :n_prompt].tolist(), clean_up_tokenization_spaces=False)
        assert prompt.startswith("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\n")
        assert prompt.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
        row = next(r for r in rows if r["instruction"] in prompt)
        answer = ids[b, n_prompt:]
        eot = int((answer == 50261).nonzero()[0])
        assert mbpp_task.answer_text(answer) == row["output"]  # exact round trip of the reference code
        assert (answer[eot + 1 :] == 50256).all() and len(answer) > eot + 1  # EOS padding, at least one


def test_same_generator_same_batch(mbpp_task):
    a = mbpp_task.train_batch(5, torch.Generator().manual_seed(11))
    b = mbpp_task.train_batch(5, torch.Generator().manual_seed(11))
    c = mbpp_task.train_batch(5, torch.Generator().manual_seed(12))
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["fixed"], b["fixed"])
    assert not torch.equal(a["input_ids"], c["input_ids"])


def test_cache_is_reused(mbpp_task, cache, monkeypatch):
    calls = []
    original = datasets.Dataset.map

    def counting_map(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(datasets.Dataset, "map", counting_map)
    meta = os.path.join(mbpp_task.cache_path, "meta.json")
    stamp = os.stat(meta).st_mtime_ns
    again = SFT(seq_len=SEQ, gen_length=GEN, cache_dir=cache)
    again.prepare()
    assert calls == [] and os.stat(meta).st_mtime_ns == stamp
    assert again.cache_path == mbpp_task.cache_path
    first, second = (t.train_batch(4, torch.Generator().manual_seed(0)) for t in (again, mbpp_task))
    assert torch.equal(first["input_ids"], second["input_ids"])
    other = SFT(seq_len=SEQ + 64, gen_length=GEN, cache_dir=cache)  # another key: tokenised anew
    other.prepare()
    assert calls and other.cache_path != mbpp_task.cache_path


def test_local_jsonl_custom_fields_plain_format(cache, tmp_path):
    rows = [{"q": f"Say {i} twice.", "a": f"{i} {i}", "extra": i} for i in range(40)]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    task = SFT(source=path, prompt_field="q", answer_field="a", prompt_format="Task: {instruction}\nAnswer:",
               seq_len=32, gen_length=8, eval_fraction=0.1, cache_dir=cache)
    task.prepare()
    assert len(task) == 36 and task.n_eval == 4 and task.n_dropped == 0
    batch = task.train_batch(8, torch.Generator().manual_seed(0))
    tok = task.tokenizer
    for ids, fixed in zip(batch["input_ids"], batch["fixed"]):
        n = int(fixed.sum())
        prompt = tok.decode(ids[:n].tolist())
        i = int(prompt.split("Say ")[1].split(" ")[0])
        assert prompt == f"Task: Say {i} twice.\nAnswer:"
        assert task.answer_text(ids[n:]) == f"{i} {i}"
        assert 50261 not in ids.tolist() and ids[-1] == 50256  # plain: no end of turn, EOS padding
    ex = task.eval_example(0)
    assert set(ex) == {"row", "instruction", "reference"} and ex["reference"] == rows[ex["row"]]["a"]


def test_parquet_files_as_a_list_and_a_glob(cache, tmp_path):
    for k in range(2):
        datasets.Dataset.from_list([{"instruction": f"p{k}{i}", "output": f"a{k}{i}"} for i in range(10)]).to_parquet(
            str(tmp_path / f"part{k}.parquet"))
    files = [str(tmp_path / "part0.parquet"), str(tmp_path / "part1.parquet")]
    by_list = SFT(source=files, seq_len=32, gen_length=8, cache_dir=cache)
    by_glob = SFT(source=str(tmp_path / "part*.parquet"), seq_len=32, gen_length=8, cache_dir=cache)
    assert len(by_list) + by_list.n_eval == 20 and by_list.cache_path == by_glob.cache_path
    g = torch.Generator().manual_seed(1)
    assert by_list.answer_text(by_list.example(0)[0][by_list.example(0)[1]:]) == "a00"
    assert by_glob.train_batch(2, g)["input_ids"].shape == (2, 32)


def test_too_long_examples_dropped_and_counted(cache, tmp_path, caplog):
    rows = [{"instruction": "Echo.", "output": "word " * (3 if i % 2 else 60)} for i in range(20)]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="tasks.sft"):
        task = SFT(source=path, seq_len=48, gen_length=8, eval_source=path, cache_dir=cache)
        task.prepare()
    assert len(task) == 10 and task.n_dropped == 10
    assert any("dropped 10 of 20 training examples" in r.getMessage() for r in caplog.records)
    allong = write_jsonl(tmp_path / "long.jsonl", [{"instruction": "x", "output": "word " * 80}] * 3)
    with pytest.raises(ValueError, match="longer than seq_len = 48"):
        SFT(source=allong, seq_len=48, gen_length=8, eval_source=path, cache_dir=cache).prepare()


def test_eval_batches_left_padded(mbpp_task):
    batches = list(mbpp_task.eval_batches(4))
    assert sum(len(b["input_ids"]) for b in batches) == mbpp_task.n_eval
    index = torch.cat([b["index"] for b in batches])
    assert index.tolist() == list(range(mbpp_task.n_eval))
    eos, mask = mbpp_task.eos_id, mbpp_task.mask_id
    for batch in batches:
        mbpp_task.check_batch(batch)
        ids, fixed, keep = batch["input_ids"], batch["fixed"], batch["attention_mask"]
        L = ids.shape[1]
        assert L <= SEQ and (ids[:, L - GEN :] == mask).all() and not fixed[:, L - GEN :].any()
        assert fixed[:, : L - GEN].all() and keep[:, L - GEN :].all()
        assert (ids[~keep] == eos).all() and (~keep).any(dim=1).sum() >= 1  # some row is padded
        for row_ids, row_keep in zip(ids, keep):
            pad = int((~row_keep).sum())
            assert not row_keep[:pad].any() and row_ids[pad] == 50258  # left padding, then <|startoftext|>
    # a filled sample decodes to its answer; the metrics see where it ended
    batch = batches[0]
    samples = batch["input_ids"].clone()
    ref = mbpp_task.eval_example(0)["reference"]
    answer = mbpp_task.answer_ids(ref)[: GEN - 1]
    samples[0, -GEN : -GEN + len(answer)] = torch.tensor(answer)
    samples[0, -GEN + len(answer) :] = eos
    samples[1:, -GEN:] = 5  # never ended
    if len(answer) < GEN - 1:
        assert mbpp_task.decode(samples[0]) == ref
    m = mbpp_task.sample_metrics(samples, batch)
    assert m["ends"].tolist() == [1.0] + [0.0] * (len(samples) - 1)
    assert m["answer_tokens"][0] == len(answer) - (answer[-1] == 50261) and (m["answer_tokens"][1:] == GEN).all()


def test_eval_limit_and_eval_source(cache):
    task = SFT(seq_len=SEQ, gen_length=GEN, eval_source="mbpp-validation", eval_limit=7, cache_dir=cache)
    assert task.n_eval == 7 and len(task) + task.n_dropped == 374
    assert sum(len(b["input_ids"]) for b in task.eval_batches(3)) == 7
    assert all(511 <= task.eval_example(i)["task_id"] <= 600 for i in range(7))


def test_bad_sources_and_options(cache, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="no file"):
        SFT(source=str(tmp_path / "missing.jsonl"), cache_dir=cache).prepare()
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "a", "completion": "b"}] * 4)
    with pytest.raises(ValueError, match=r"no field 'instruction' \(tasks.sft.prompt_field\).*'prompt'"):
        SFT(source=path, cache_dir=cache).prepare()
    with pytest.raises(ValueError, match="prompt_format"):
        SFT(prompt_format="no placeholder", cache_dir=cache)

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(ValueError, match="could not load source 'someone/some-sft-set'.*no network"):
        SFT(source="someone/some-sft-set", cache_dir=cache).prepare()


def test_gin_options(cache):
    try:
        gin.parse_config(["tasks.sft.seq_len = 256", "tasks.sft.gen_length = 64",
                          f"tasks.sft.cache_dir = '{cache}'", "tasks.sft.prompt_format = '{instruction}\\n'"])
        task = TASKS.build("sft")
        assert (task.seq_len, task.gen_length, task.prompt_format) == (256, 64, "{instruction}\n")
        assert task.cache_root == cache and task.prompt_text("x") == "x\n"
    finally:
        gin.clear_config()
