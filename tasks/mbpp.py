r"""``tasks.mbpp``: MBPP (Austin et al. 2021) as an evaluation task, scored by running the programs.

**Problems**: ``DATA_ROOT/mbpp`` (``mbpp.jsonl``, 974; ``sanitized-mbpp.json``, 427) or, with
``source='hub'`` (``'auto'``: when the files are missing), the hub's ``google-research-datasets/mbpp``.
``split``, in task-id order: ``test`` (11-510, the default), ``prism`` (11-974 = train + validation +
test, the official PRISM evaluation), ``full`` (1-974), ``train`` (601-974), ``validation`` (511-600),
``prompt`` (1-10), ``sanitized`` (the 427 hand-checked problems, with their own wording and tests).

**Prompt styles** (``prompt_style``) and the answer format ``extract_program`` reads in each:

- ``'prism'``: the PRISM authors' instruction, reworded (``PRISM_INSTRUCTION``: only code, between
  ``<py>`` tags, one top-level function of the given name), plain text tokenised with the tokenizer's
  own special tokens. The name comes from the reference code by ``ast``: ``func_name='prism'``, its
  first top-level ``def`` as the official code does (a helper for 38 of the 974 problems);
  ``'tested'``, the first one the tests call. Program: the last ``<py>`` block (an unclosed one runs
  to the end). Reference answer: ``\n<py>\n{code}\n</py>`` (PRISM's training target).
- ``'lm_eval'``: lm-evaluation-harness's ``mbpp``: the shots 2, 3, 4 (question + ``{code}\n[DONE]``)
  and the question ``LM_EVAL_QUESTION`` (all tests, ``[BEGIN]``), joined by blank lines. Program: the
  text before ``[DONE]``.
- ``'chat'``: the chat template, one user turn with the problem and its first test
  (``tasks.sft.mbpp_instruction``, what ``tasks.sft`` trains on). Program: the first fenced block, or
  bare code up to the end of turn.

Each style falls back to the other kind of block, then to the whole text if it parses; else the
program is empty (failed, never run). ``\r\n`` in the data is read as ``\n``.

**Batches, per-sample metrics, scoring and the audit file**: ``tasks.code_task`` (train on MBPP with
``tasks.sft``; ``lm_eval`` with gpt2-chat needs ``seq_len >= 2906 + gen_length``). The tests run after
the program (``check_code``): the sanitized set's ``test_imports``, MBPP's ``test_setup_code``
(``setup_code=True``: problems 367 and 927 build trees with the program's ``Node``; PRISM leaves it
out, so they always fail there), a ``Pair`` stub when the tests build ``Pair`` objects without
defining it (as PRISM), the asserts (``challenge_test_list`` unused). ``timeout`` 3 s as in HF
``code_eval``, which task 123's reference only just meets on a busy machine.
``tasks.code_task.oracle_metrics(task)`` scores the reference solutions in the style's answer format: pass@1 = 1.0.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence

import torch

import prism.paths as paths
from registry import TASKS
from tasks.code_task import CodeTask
from tasks.mbpp_code import (FEWSHOT_IDS, PRISM_INSTRUCTION, STYLES, check_code, extract_program, function_name,
                             lm_eval_prompt, reference_answer)
from tasks.sft_data import mbpp_instruction

HUB_ID = "google-research-datasets/mbpp"
ID_RANGES = {"test": (11, 510), "train": (601, 974), "validation": (511, 600), "prompt": (1, 10),
             "full": (1, 974), "prism": (11, 974)}
SPLIT_SIZES = {"test": 500, "prism": 964, "sanitized": 427, "full": 974, "train": 374, "validation": 90,
               "prompt": 10}
HUB_PARTS = {"test": ["test"], "train": ["train"], "validation": ["validation"], "prompt": ["prompt"],
             "prism": ["train", "validation", "test"], "full": ["prompt", "train", "validation", "test"],
             "sanitized": ["prompt", "train", "validation", "test"]}
# ----------------------------------------------------------------------------- data
def _row(r: Dict[str, Any], sanitized: bool) -> Dict[str, Any]:
    unix = lambda t: (t or "").replace("\r\n", "\n")  # noqa: E731
    return {"task_id": int(r["task_id"]), "text": r["prompt" if sanitized else "text"].strip(),
            "code": unix(r["code"]), "test_list": list(r["test_list"]), "setup": unix(r.get("test_setup_code")),
            "test_imports": list(r.get("test_imports") or [])}


def load_problems(split: str = "test", source: str = "auto", data_dir: Optional[str] = None) -> List[Dict[str, Any]]:
    """The problems of ``split`` in task-id order, each ``{task_id, text, code, test_list, setup,
    test_imports}`` (code with ``\\n`` line ends). ``source``: ``'local'`` (``data_dir``, default
    ``DATA_ROOT/mbpp``), ``'hub'`` or ``'auto'`` (local when the file is there)."""
    if split not in SPLIT_SIZES or source not in ("auto", "local", "hub"):
        raise ValueError(f"tasks.mbpp: split must be one of {sorted(SPLIT_SIZES)} and source 'auto', 'local' or "
                         f"'hub', got {split!r} and {source!r}")
    sanitized = split == "sanitized"
    path = os.path.join(data_dir or os.path.join(paths.DATA_ROOT, "mbpp"),
                        "sanitized-mbpp.json" if sanitized else "mbpp.jsonl")
    if source == "local" or (source == "auto" and os.path.exists(path)):
        if not os.path.exists(path):
            raise FileNotFoundError(f"MBPP file {path} not found (set PRISM_DATA, tasks.mbpp.data_dir, or "
                                    "tasks.mbpp.source = 'hub')")
        with open(path) as f:
            rows = json.load(f) if sanitized else [json.loads(line) for line in f if line.strip()]
    else:
        import datasets

        rows = []
        for part in HUB_PARTS[split]:
            rows += list(datasets.load_dataset(HUB_ID, "sanitized" if sanitized else "full", split=part))
    problems = sorted((_row(r, sanitized) for r in rows), key=lambda p: p["task_id"])
    if not sanitized:
        lo, hi = ID_RANGES[split]
        problems = [p for p in problems if lo <= p["task_id"] <= hi]
    ids = [p["task_id"] for p in problems]
    if len(ids) != SPLIT_SIZES[split] or len(set(ids)) != len(ids):
        raise ValueError(f"MBPP split {split!r}: expected {SPLIT_SIZES[split]} distinct problems, got {len(ids)} "
                         f"({len(set(ids))} distinct)")
    return problems


# ----------------------------------------------------------------------------- the task
@TASKS.register("mbpp")
class MBPP(CodeTask):
    """MBPP generation and execution-based scoring (this module's docstring and ``tasks.code_task``)."""

    task_name = "tasks.mbpp"
    styles = STYLES

    def __init__(self, split: str = "test", prompt_style: str = "prism", tokenizer: Any = "gpt2-chat",
                 seq_len: int = 1024, gen_length: int = 512, samples_per_problem: int = 1, k: Sequence[int] = (1,),
                 execute: bool = True, allow_execution: bool = False, workers: Optional[int] = None,
                 timeout: float = 3.0, memory_mb: int = 1024, max_processes: Optional[int] = None,
                 isolation: str = "auto", allow_weaker_isolation: bool = False, results_file: Optional[str] = None,
                 setup_code: bool = True, func_name: str = "prism", source: str = "auto",
                 data_dir: Optional[str] = None, cache_dir: Optional[str] = None, corpus_scorers: Sequence[Any] = ()):
        for name, value, allowed in (("prompt_style", prompt_style, STYLES), ("split", split, tuple(SPLIT_SIZES)),
                                     ("func_name", func_name, ("prism", "tested")),
                                     ("source", source, ("auto", "local", "hub"))):
            if value not in allowed:
                raise ValueError(f"tasks.mbpp.{name} must be one of {allowed}, got {value!r}")
        super().__init__(tokenizer, seq_len, gen_length, samples_per_problem, k, execute, allow_execution, workers,
                         timeout, memory_mb, max_processes, isolation, allow_weaker_isolation, results_file,
                         cache_dir, corpus_scorers)
        self.split, self.prompt_style = split, prompt_style
        self.setup_code, self.func_name = bool(setup_code), func_name
        self.source, self.data_dir = source, data_dir
        self._problems = self._shots = None

    # ------------------------------------------------------------------------- data
    @property
    def problems(self) -> List[Dict[str, Any]]:
        if self._problems is None:
            self._problems = load_problems(self.split, self.source, self.data_dir)
        return self._problems

    def data_files(self) -> List[str]:
        local = [] if self.source != "local" else [os.path.join(
            self.data_dir or os.path.join(paths.DATA_ROOT, "mbpp"),
            "sanitized-mbpp.json" if self.split == "sanitized" else "mbpp.jsonl")]
        return local + super().data_files()

    @property
    def shots(self) -> List[Dict[str, Any]]:
        """lm-eval's three examples (task ids 2, 3, 4 of the full set)."""
        if self._shots is None:
            by_id = {p["task_id"]: p for p in load_problems("prompt", self.source, self.data_dir)}
            self._shots = [by_id[i] for i in FEWSHOT_IDS]
        return self._shots

    def prompt_text(self, problem: Dict[str, Any]) -> str:
        """The prompt of ``problem`` in this task's style."""
        if self.prompt_style == "prism":
            name = function_name(problem["code"], problem["test_list"], self.func_name)
            return PRISM_INSTRUCTION.format(func_name=name, task_text=problem["text"])
        if self.prompt_style == "lm_eval":
            return lm_eval_prompt(problem, self.shots)
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": mbpp_instruction(problem["text"], problem["test_list"][0])}],
            add_generation_prompt=True, tokenize=False)

    def train_batch(self, batch_size: int, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        raise NotImplementedError("tasks.mbpp is an evaluation task; to train on MBPP use tasks.sft "
                                  "(source = 'mbpp-train', the problems 601-974, never the test split)")

    def extract(self, text: str) -> str:
        return extract_program(text, self.prompt_style)

    def job(self, problem: Dict[str, Any], program: str) -> Dict[str, str]:
        return {"program": program, "tests": check_code(problem, self.setup_code)}

    def reference_text(self, problem: Dict[str, Any]) -> str:
        return reference_answer(problem, self.prompt_style)
