"""tasks.mbpp (splits, prompt styles, extraction, batches, execution-based scoring, the oracle) and
prism.metrics.passk. Programs run through prism.sandbox.executor with the opt-in given by the ``allowed`` fixture;
the all-974 oracle is marked slow."""
import json
import math
import time

import pytest
import torch

from prism.metrics.passk import mean_pass_at_k, pass_at_k, pass_at_ks
from registry import TASKS
from tasks.code_task import oracle_metrics, oracle_records
from tasks.mbpp import MBPP, SPLIT_SIZES, load_problems
from tasks.mbpp_code import (FEWSHOT_IDS, PRISM_INSTRUCTION, STYLES, check_code, extract_program, function_name,
                             reference_answer)
from tasks.tokenizers import chat_tokenizer_dir

ENV = "PRISM_ALLOW_CODE_EXECUTION"
RANGES = {"test": (11, 510), "prism": (11, 974), "full": (1, 974), "train": (601, 974), "validation": (511, 600),
          "prompt": (1, 10)}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("prism_cache"))
    chat_tokenizer_dir(root)
    return root


@pytest.fixture
def allowed(monkeypatch):
    monkeypatch.setenv(ENV, "1")


@pytest.fixture
def not_allowed(monkeypatch):
    monkeypatch.delenv(ENV, raising=False)


def make(cache, **kw):
    kw.setdefault("seq_len", 4096)
    kw.setdefault("workers", 2)
    kw.setdefault("timeout", 30.0)  # the oracle checks answers, not speed: task 123 takes seconds on a busy machine
    return MBPP(cache_dir=cache, **kw)


# ----------------------------------------------------------------------------- data
def test_split_sizes_and_id_ranges():
    sizes = {}
    for split, n in SPLIT_SIZES.items():
        problems = load_problems(split, source="local")
        ids = [p["task_id"] for p in problems]
        sizes[split] = len(ids)
        assert ids == sorted(set(ids))
        if split in RANGES:
            lo, hi = RANGES[split]
            assert ids == list(range(lo, hi + 1))
        for p in problems:
            assert p["text"] and p["code"] and p["test_list"] and "\r\n" not in p["code"]
    assert sizes == {"test": 500, "prism": 964, "sanitized": 427, "full": 974, "train": 374, "validation": 90,
                     "prompt": 10}
    sanitized = load_problems("sanitized")
    assert sum(bool(p["test_imports"]) for p in sanitized) == 13
    with pytest.raises(ValueError, match="split must be one of"):
        load_problems("dev")


def test_function_name_rules():
    by_id = {p["task_id"]: p for p in load_problems("full")}
    p = by_id[6]  # a helper is defined first
    assert function_name(p["code"], p["test_list"], "prism") == "is_Power_Of_Two"
    assert function_name(p["code"], p["test_list"], "tested") == "differ_At_One_Bit_Pos"
    assert function_name("def f(:\n  pass\ndef g(x):", ()) == "f"  # regex fallback when it does not parse
    assert function_name(by_id[11]["code"]) == "remove_Occ"


def test_test_program_setup_imports_and_pair_stub():
    by_id = {p["task_id"]: p for p in load_problems("full")}
    t367 = check_code(by_id[367])
    assert t367.index("root = Node(1)") < t367.index("assert is_tree_balanced")
    assert "root = Node(1)" not in check_code(by_id[367], setup_code=False)
    assert "class Pair" in check_code(by_id[601]) and "class Pair" not in check_code(by_id[166])
    s82 = {p["task_id"]: p for p in load_problems("sanitized")}[82]
    assert check_code(s82).startswith("import math\n")


# ----------------------------------------------------------------------------- prompts
def test_prompt_styles_render(cache):
    prism = make(cache, prompt_style="prism")
    p = prism.problems[0]
    assert p["task_id"] == 11
    text = prism.prompt_text(p)
    assert "Define exactly one top-level function, named remove_Occ (keep this name)." in text
    assert "<py>" in text and "</py>" in text and p["text"] in text and "def remove_Occ(...):" in text
    assert "assert" not in text  # PRISM's prompt gives no tests
    assert text == PRISM_INSTRUCTION.format(func_name="remove_Occ", task_text=p["text"])

    lm = make(cache, prompt_style="lm_eval")
    text = lm.prompt_text(p)
    assert [s["task_id"] for s in lm.shots] == list(FEWSHOT_IDS)
    assert text.count("You are an expert Python programmer, and here is your task: ") == 4
    assert text.count("[BEGIN]\n") == 4 and text.count("\n[DONE]\n\n") == 3
    for name in ("similar_elements", "is_not_prime", "heap_queue_largest"):
        assert f"def {name}(" in text
    assert text.endswith("Your code should pass these tests:\n\n" + "\n".join(p["test_list"]) + "\n[BEGIN]\n")

    chat = make(cache, prompt_style="chat")
    text = chat.prompt_text(p)
    assert text.startswith("<|startoftext|><|start_header_id|>user<|end_header_id|>\n\n" + p["text"])
    assert p["test_list"][0] in text and p["test_list"][1] not in text
    assert text.endswith("<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    with pytest.raises(ValueError, match="prompt_style"):
        MBPP(prompt_style="fewshot")


def test_long_prompt_is_an_error_not_a_drop(cache):
    task = make(cache, prompt_style="lm_eval", seq_len=1024, gen_length=256, execute=False)
    with pytest.raises(ValueError, match="raise tasks.mbpp.seq_len"):
        task.prompt_ids  # noqa: B018


# ----------------------------------------------------------------------------- extraction
def test_extraction_per_style():
    code = "def f(x):\n    return x + 1"
    # prism: the last <py> block; an unclosed one runs to the end
    assert extract_program(f"<py>\nold\n</py> text <py>\n{code}\n</py> trailing", "prism") == code
    assert extract_program(f"\n<py>\n{code}\n", "prism") == code
    assert extract_program(f"```python\n{code}\n```", "prism") == code
    # lm_eval: stop at [DONE]
    assert extract_program(f"{code}\n[DONE]\n\nYou are an expert Python programmer [BEGIN]\nx = 1", "lm_eval") == code
    assert extract_program(f"[BEGIN]\n{code}\n[DONE]", "lm_eval") == code
    # chat: the first fenced block, or bare code up to the end of turn
    assert extract_program(f"Here it is:\n```python\n{code}\n```\nUsage:\n```\nf(1)\n```", "chat") == code
    assert extract_program(f"{code}<|eot_id|>more", "chat") == code
    assert extract_program(f"```py\n{code}", "chat") == code
    # no code: an empty program
    for style in STYLES:
        assert extract_program("Sorry, I cannot solve this task.", style) == ""
        assert extract_program("", style) == ""
    with pytest.raises(ValueError):
        extract_program(code, "plain")


def test_reference_answers_round_trip():
    for p in load_problems("prompt"):
        for style in STYLES:
            assert extract_program(reference_answer(p, style), style) == p["code"].strip("\n").rstrip()


# ----------------------------------------------------------------------------- pass@k
def test_pass_at_k_hand_computed():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 0, 2) == 0.0 and pass_at_k(5, 5, 3) == 1.0 and pass_at_k(5, 4, 2) == 1.0
    assert pass_at_k(200, 13, 10) == pytest.approx(1 - math.comb(187, 10) / math.comb(200, 10))
    assert mean_pass_at_k([(5, 2), (5, 5)], 1) == pytest.approx(0.7)
    assert pass_at_ks([(5, 2), (3, 1)], [1, 3, 5]) == pytest.approx({"pass@1": (0.4 + 1 / 3) / 2, "pass@3": 0.95})
    for bad in ((5, 6, 1), (5, 2, 0), (2, 1, 3)):
        with pytest.raises(ValueError):
            pass_at_k(*bad)


# ----------------------------------------------------------------------------- opt-in
def test_execution_needs_opt_in(cache, not_allowed):
    from prism.sandbox.executor import ExecutionNotAllowed

    task = make(cache, split="prompt")
    task.prepare()  # generating (run.py sample) needs no opt-in
    next(task.eval_batches(2))
    with pytest.raises(ExecutionNotAllowed, match="tasks.mbpp.allow_execution = True"):
        task.check_scoring()  # what evaluate and run.py call before a scored sampling
    with pytest.raises(ExecutionNotAllowed):
        task.corpus_metrics(oracle_records(task, [0]))
    # generation only, or the gin flag
    unscored = make(cache, split="prompt", execute=False)
    unscored.check_scoring()
    assert unscored.corpus_metrics(oracle_records(task, [0])) == {}
    flagged = make(cache, split="prompt", allow_execution=True)
    flagged.check_scoring()
    assert flagged.corpus_metrics(oracle_records(flagged, [0]))["pass@1"] == 1.0


# ----------------------------------------------------------------------------- batches
def test_eval_batches_left_padded(cache, allowed):
    task = TASKS.build("mbpp", split="test", prompt_style="prism", seq_len=1024, gen_length=128, cache_dir=cache,
                       samples_per_problem=2)
    task.prepare()
    assert task.vocab_size == 50262 and task.mask_id == 50257 and task.n_eval == 1000
    batches = iter(task.eval_batches(5))
    for start in (0, 5):
        b = task.check_batch(next(batches))
        ids, fixed, keep = b["input_ids"], b["fixed"], b["attention_mask"]
        assert b["index"].tolist() == list(range(start, start + 5))
        assert b["task_id"].tolist() == [11 + i // 2 for i in range(start, start + 5)]
        width = ids.shape[1] - 128
        assert (ids[:, width:] == task.mask_id).all() and not fixed[:, width:].any() and fixed[:, :width].all()
        for row in range(5):
            prompt = task.prompt_ids[(start + row) // 2]
            pad = width - len(prompt)
            assert ids[row, pad:width].tolist() == prompt and not keep[row, :pad].any() and keep[row, pad:].all()
            assert (ids[row, :pad] == 50256).all()
    with pytest.raises(NotImplementedError, match="tasks.sft"):
        task.train_batch(2, torch.Generator())


def test_decode_and_sample_metrics(cache, allowed):
    task = make(cache, split="prompt", prompt_style="prism", gen_length=256)
    batch = next(task.eval_batches(2))
    samples = batch["input_ids"].clone()
    answers = [reference_answer(task.problems[0], "prism"), "I do not know."]
    for row, answer in enumerate(answers):
        ids = task.tokenizer(answer, add_special_tokens=False)["input_ids"] + [task.special["eos"]]
        samples[row, -256:] = task.special["eos"]
        samples[row, -256:-256 + len(ids)] = torch.tensor(ids)
    assert [task.decode(s) for s in samples] == answers
    m = task.sample_metrics(samples, batch)
    assert m["extracted"].tolist() == [1.0, 0.0] and m["empty_output"].tolist() == [0.0, 0.0]
    assert m["hit_gen_length"].tolist() == [0.0, 0.0]
    samples[0, -256:] = task.special["eos"]          # an empty answer
    samples[1, -256:] = task.tokenizer("x", add_special_tokens=False)["input_ids"][0]  # no EOS: cut off
    m = task.sample_metrics(samples, batch)
    assert m["empty_output"].tolist() == [1.0, 0.0] and m["hit_gen_length"].tolist() == [0.0, 1.0]


# ----------------------------------------------------------------------------- scoring and the oracle
@pytest.mark.parametrize("split,style", [("test", "prism"), ("prism", "lm_eval"), ("sanitized", "chat"),
                                         ("full", "prism"), ("train", "lm_eval"), ("validation", "chat"),
                                         ("prompt", "prism")])
def test_oracle_sample_of_each_split(cache, allowed, split, style):
    task = make(cache, split=split, prompt_style=style)
    n = len(task.problems)
    chosen = sorted({round(i * (n - 1) / 29) for i in range(30)})  # 30 problems spread over the split
    if split in ("test", "prism", "full"):
        chosen = sorted(set(chosen) | {i for i, p in enumerate(task.problems) if p["task_id"] in (367, 601, 927)})
    metrics = oracle_metrics(task, chosen)
    assert metrics["pass@1"] == 1.0 and metrics["n_problems"] == len(chosen)
    assert all(metrics[f"exec_{s}"] == 0.0 for s in ("failed", "error", "limit", "timeout", "harness"))


def test_oracle_every_style_and_wrong_programs(cache, allowed, tmp_path):
    results = tmp_path / "sub" / "results.jsonl"
    for style in STYLES:
        task = make(cache, split="validation", prompt_style=style, results_file=str(results))
        assert oracle_metrics(task, range(8))["pass@1"] == 1.0
        wrong = [{"index": i, "text": reference_answer({"code": "def nothing():\n    return None"}, style)}
                 for i in range(4)]
        wrong.append({"index": 4, "text": "no code here, sorry."})
        metrics = task.corpus_metrics(wrong)
        assert metrics["pass@1"] == 0.0 and metrics["n_problems"] == 5
        assert [r["status"] for r in wrong] == ["error"] * 4 + ["failed"] and wrong[4]["program"] == ""
        assert "NameError" in wrong[0]["exec_message"] and metrics["exec_error"] == 0.8
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(rows) == 5 and rows[0]["task_id"] == 511
    assert {"task_id", "status", "message", "seconds", "isolation", "program", "text"} <= set(rows[0])


def test_pass_at_k_from_repeated_samples(cache, allowed):
    task = make(cache, split="prompt", prompt_style="lm_eval", samples_per_problem=5, k=(1, 2, 5, 10))
    records = oracle_records(task, [0, 1])  # problems 0 and 1, five samples each
    for r in records[2:5] + records[5:10]:  # problem 0: 2 of 5 pass; problem 1: none
        r["text"] = "def broken(:\n[DONE]"
    metrics = task.corpus_metrics(records)
    assert metrics["pass@1"] == pytest.approx(0.2)
    assert metrics["pass@2"] == pytest.approx(0.35) and metrics["pass@5"] == pytest.approx(0.5)
    assert "pass@10" not in metrics  # five samples per problem allow k <= 5
    assert [r["task_id"] for r in records] == [1] * 5 + [2] * 5


@pytest.mark.slow
@pytest.mark.parametrize("split,style", [("full", "prism"), ("sanitized", "lm_eval")])
def test_oracle_every_reference_solution(cache, allowed, split, style):
    task = make(cache, split=split, prompt_style=style, workers=None)
    t0 = time.time()
    records = oracle_records(task)
    metrics = task.corpus_metrics(records)
    failed = [(r["task_id"], r["status"], r["exec_message"][:200]) for r in records if r["status"] != "passed"]
    assert not failed, failed
    assert metrics["pass@1"] == 1.0 and metrics["n_problems"] == SPLIT_SIZES[split]
    print(f"oracle {split}: {len(records)} programs in {time.time() - t0:.1f} s")
