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

**Batches** (evaluation only: train on MBPP with ``tasks.sft``): the prompt LEFT-padded with EOS
(fixed, ``attention_mask`` False) + ``gen_length`` masks; sequence ``i`` is problem
``i // samples_per_problem``. A prompt longer than ``seq_len - gen_length`` is an error, never a
silently smaller benchmark (``lm_eval`` with gpt2-chat needs ``seq_len >= 2906 + gen_length``).

**Scoring**: ``sample_metrics``: ``extracted``. ``corpus_metrics`` (main process): every program runs
against its tests in ``prism.execution.run_many`` (``workers``, ``timeout``: 3 s as in HF
``code_eval``, which task 123's reference only just meets on a busy machine; ``memory_mb``); returns
``pass@1`` (mean over problems of the passing fraction), the unbiased ``pass@k`` for each ``k`` the
samples allow, ``n_problems`` and the ``exec_timeout`` / ``exec_crashed`` / ``exec_error`` rates, and
adds ``task_id``, ``program``, ``status``, ``passed``, ``exec_message``, ``exec_seconds`` to the records
(the samples file), also written to ``results_file`` if set. After the program run (``check_code``)
the sanitized set's ``test_imports``, MBPP's ``test_setup_code`` (``setup_code=True``: problems 367
and 927 build trees with the program's ``Node``; PRISM leaves it out, so they always fail there), a
``Pair`` stub when the tests build ``Pair`` objects without defining it (as PRISM), the asserts
(``challenge_test_list`` unused). Running generated code needs ``allow_execution=True`` or
``PRISM_ALLOW_CODE_EXECUTION=1``, checked by ``check_scoring`` (which ``evaluate`` and ``run.py`` call
before any scored sampling: no long generation starts without it) and again before anything runs;
``execute=False`` never runs anything (``corpus_metrics`` then adds nothing).
``oracle_metrics(task)`` scores the reference solutions in the style's answer format: pass@1 = 1.0.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

import prism.paths as paths
from prism.passk import pass_at_ks
from registry import TASKS
from tasks.base import Task
from tasks.mbpp_code import (  # noqa: F401  (re-exported: tasks.mbpp.extract_program, ...)
    BEGIN, DONE, END_OF_TEXT, FEWSHOT_IDS, LM_EVAL_QUESTION, PAIR_STUB, PRISM_INSTRUCTION, STYLES, check_code,
    extract_program, function_name, lm_eval_prompt, lm_eval_question, reference_answer)
from tasks.sft import mbpp_instruction
from tasks.tokenizers import TokenizerMixin

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
class MBPP(TokenizerMixin, Task):
    """MBPP generation and execution-based scoring (see the module docstring)."""

    def __init__(self, split: str = "test", prompt_style: str = "prism", tokenizer: Any = "gpt2-chat",
                 seq_len: int = 1024, gen_length: int = 512, samples_per_problem: int = 1, k: Sequence[int] = (1,),
                 execute: bool = True, allow_execution: bool = False, workers: Optional[int] = None,
                 timeout: float = 3.0, memory_mb: int = 1024, results_file: Optional[str] = None,
                 setup_code: bool = True, func_name: str = "prism", source: str = "auto",
                 data_dir: Optional[str] = None, cache_dir: Optional[str] = None, corpus_scorers: Sequence[Any] = ()):
        for name, value, allowed in (("prompt_style", prompt_style, STYLES), ("split", split, tuple(SPLIT_SIZES)),
                                     ("func_name", func_name, ("prism", "tested")),
                                     ("source", source, ("auto", "local", "hub"))):
            if value not in allowed:
                raise ValueError(f"tasks.mbpp.{name} must be one of {allowed}, got {value!r}")
        if not 0 < gen_length < seq_len:
            raise ValueError(f"tasks.mbpp: need 0 < gen_length < seq_len, got {gen_length} and {seq_len}")
        if samples_per_problem < 1 or any(int(x) < 1 for x in k):
            raise ValueError(f"tasks.mbpp: samples_per_problem and k must be >= 1, got {samples_per_problem}, {k}")
        self.split, self.prompt_style, self.tokenizer_spec = split, prompt_style, tokenizer
        self.seq_len, self.gen_length = int(seq_len), int(gen_length)
        self.samples_per_problem, self.k = int(samples_per_problem), tuple(int(x) for x in k)
        self.execute, self.allow_execution = bool(execute), bool(allow_execution)
        self.workers, self.timeout, self.memory_mb = workers, float(timeout), int(memory_mb)
        self.results_file, self.setup_code, self.func_name = results_file, bool(setup_code), func_name
        self.source, self.data_dir = source, data_dir
        self.cache_root = os.path.expanduser(cache_dir or paths.CACHE_ROOT)
        self.corpus_scorers = list(corpus_scorers)
        self._tokenizer = self._ids = self._problems = self._shots = self._prompt_ids = None

    # ------------------------------------------------------------------------- tokenizer and data
    task_name = "tasks.mbpp"

    def check_tokenizer(self, tokenizer) -> None:
        if self.prompt_style == "chat":
            self.needs_chat_template(tokenizer, "prompt_style='chat'", "use prompt_style 'prism' or 'lm_eval'")

    @property
    def problems(self) -> List[Dict[str, Any]]:
        if self._problems is None:
            self._problems = load_problems(self.split, self.source, self.data_dir)
        return self._problems

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

    @property
    def prompt_ids(self) -> List[List[int]]:
        """Each problem's prompt tokens (the chat template holds its own special tokens; a plain
        prompt gets the tokenizer's, like ``tokenizer(prompt)`` in the PRISM code)."""
        if self._prompt_ids is None:
            texts = [self.prompt_text(p) for p in self.problems]
            ids = self.tokenizer(texts, add_special_tokens=self.prompt_style != "chat")["input_ids"]
            longest = max(range(len(ids)), key=lambda i: len(ids[i]))
            if len(ids[longest]) + self.gen_length > self.seq_len:
                raise ValueError(f"tasks.mbpp: the prompt of task {self.problems[longest]['task_id']} has "
                                 f"{len(ids[longest])} tokens, more than seq_len - gen_length = "
                                 f"{self.seq_len - self.gen_length}; raise tasks.mbpp.seq_len to at least "
                                 f"{len(ids[longest]) + self.gen_length}")
            self._prompt_ids = [list(x) for x in ids]
        return self._prompt_ids

    def check_scoring(self) -> None:
        """Raise ``ExecutionNotAllowed`` if programs are to be run (``execute``) without the opt-in
        (``evaluate`` and ``run.py`` call it before any sampling that will be scored)."""
        if self.execute:
            from prism.execution import ExecutionNotAllowed, check_execution_allowed

            try:
                check_execution_allowed(self.allow_execution)
            except ExecutionNotAllowed as err:
                raise ExecutionNotAllowed(f"{err} With gin: tasks.mbpp.allow_execution = True (or tasks.mbpp.execute "
                                          "= False to generate without running anything).") from None

    def prepare(self) -> None:
        self.prompt_ids  # noqa: B018 - loads the problems, the tokenizer and checks the lengths

    # ------------------------------------------------------------------------- batches
    @property
    def n_eval(self) -> int:
        return len(self.problems) * self.samples_per_problem

    def problem_of(self, index: int) -> Dict[str, Any]:
        """The problem of evaluation sequence ``index``."""
        return self.problems[int(index) // self.samples_per_problem]

    def train_batch(self, batch_size: int, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        raise NotImplementedError("tasks.mbpp is an evaluation task; to train on MBPP use tasks.sft "
                                  "(source = 'mbpp-train', the problems 601-974, never the test split)")

    def eval_batches(self, batch_size: int) -> Iterator[Dict[str, torch.Tensor]]:
        prompts, eos, n = self.prompt_ids, self.special["eos"], self.n_eval
        for start in range(0, n, batch_size):
            rows = [prompts[i // self.samples_per_problem] for i in range(start, min(n, start + batch_size))]
            width = max(len(p) for p in rows)
            B, L = len(rows), width + self.gen_length
            input_ids = torch.full((B, L), self.mask_id, dtype=torch.long)
            fixed = torch.zeros(B, L, dtype=torch.bool)
            keep = torch.ones(B, L, dtype=torch.bool)
            for b, p in enumerate(rows):
                pad = width - len(p)
                input_ids[b, :pad] = eos
                input_ids[b, pad:width] = torch.tensor(p, dtype=torch.long)
                fixed[b, :width] = True
                keep[b, :pad] = False
            task_ids = [self.problem_of(i)["task_id"] for i in range(start, start + B)]
            yield self.check_batch({"input_ids": input_ids, "fixed": fixed, "attention_mask": keep,
                                    "index": torch.arange(start, start + B), "task_id": torch.tensor(task_ids)})

    # ------------------------------------------------------------------------- text and metrics
    def decode(self, tokens: torch.Tensor) -> str:
        """The generated text (the last ``gen_length`` positions) up to the first EOS / end of turn."""
        ids, stop = [int(t) for t in tokens[-self.gen_length:]], set(self.end_ids)
        ends = [j for j, t in enumerate(ids) if t in stop]
        return self.tokenizer.decode(ids[: ends[0]] if ends else ids, skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)

    def extract(self, text: str) -> str:
        return extract_program(text, self.prompt_style)

    def sample_metrics(self, samples: torch.Tensor, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        found = [bool(self.extract(self.decode(s))) for s in samples.cpu()]
        return {"extracted": torch.tensor(found, dtype=torch.float)}

    def corpus_metrics(self, records: List[dict]) -> Dict[str, float]:
        out = super().corpus_metrics(records)
        if self.execute:
            self.check_scoring()  # before anything runs
            values = self.score(records)
            clash = sorted(set(values) & set(out))
            if clash:
                raise ValueError(f"tasks.mbpp: corpus metrics {clash} are computed twice")
            out.update(values)
        return out

    def score(self, records: List[dict]) -> Dict[str, float]:
        """Run each record's program on its problem's tests; add the per-sample results to the
        records (and ``results_file``); return pass@1, pass@k, ``n_problems`` and failure rates."""
        from prism.execution import results_to_jsonl, run_many

        programs = [self.extract(r.get("text", "")) for r in records]
        todo = [i for i, p in enumerate(programs) if p]
        jobs = [{"program": programs[i], "tests": check_code(self.problem_of(records[i]["index"]), self.setup_code)}
                for i in todo]
        limits = {"timeout": self.timeout, "memory_mb": self.memory_mb, "allow": self.allow_execution}
        if self.workers is not None:
            limits["workers"] = self.workers
        results = dict(zip(todo, run_many(jobs, **limits))) if jobs else {}
        counts: Dict[int, List[int]] = {}
        rows = []
        for i, rec in enumerate(records):
            tid = self.problem_of(rec["index"])["task_id"]
            res = results.get(i)
            status = res.status if res is not None else "failed"
            message = res.message if res is not None else "no program found in the generated text"
            seconds = float(res.seconds) if res is not None else 0.0
            rec.update({"task_id": tid, "program": programs[i], "status": status, "passed": float(status == "passed"),
                        "exec_message": (message or "")[:2000], "exec_seconds": seconds})
            n_c = counts.setdefault(tid, [0, 0])
            n_c[0] += 1
            n_c[1] += status == "passed"
            rows.append({"task_id": tid, "index": rec["index"], "status": status, "message": rec["exec_message"],
                         "seconds": seconds, "program": programs[i], "text": rec.get("text", "")})
        if self.results_file:
            results_to_jsonl(self.results_file, rows)
        pairs: List[Tuple[int, int]] = [tuple(v) for v in counts.values()]
        metrics = pass_at_ks(pairs, (1,) + self.k)
        metrics["pass@1"] = math.fsum(c / n for n, c in pairs) / len(pairs) if pairs else 0.0  # exactly c / n
        metrics["n_problems"] = float(len(pairs))
        for status in ("timeout", "crashed", "error"):
            metrics[f"exec_{status}"] = sum(r["status"] == status for r in rows) / max(len(rows), 1)
        return metrics


def oracle_records(task: MBPP, problems: Optional[Sequence[int]] = None) -> List[dict]:
    """Records whose texts are the reference solutions of ``task``'s problems (positions in
    ``task.problems``; default all) written in its style's answer format, as ``evaluate`` gathers them."""
    chosen = range(len(task.problems)) if problems is None else problems
    spp = task.samples_per_problem
    return [{"index": p * spp + j, "text": reference_answer(task.problems[p], task.prompt_style)}
            for p in chosen for j in range(spp)]


def oracle_metrics(task: MBPP, problems: Optional[Sequence[int]] = None) -> Dict[str, float]:
    """``task.corpus_metrics`` of ``oracle_records``: pass@1 is 1.0 when extraction, the test
    programs and the executor are right (every MBPP reference solution passes its tests)."""
    return task.corpus_metrics(oracle_records(task, problems))
