"""What the code-generation tasks (``tasks.mbpp``, ``tasks.humaneval``) share: prompt batches, decoding,
and execution-based scoring with the sandboxed executor (``prism.sandbox.executor``).

**Batches** (evaluation only): the prompt LEFT-padded with EOS (fixed, ``attention_mask`` False) +
``gen_length`` masks; sequence ``i`` is problem ``i // samples_per_problem``. A prompt longer than
``seq_len - gen_length`` is an error, never a silently smaller benchmark.

**Per sample** (``sample_metrics``): ``extracted`` (a program was found), ``empty_output`` (nothing but
white space before the first EOS / end of turn) and ``hit_gen_length`` (no EOS / end of turn in the
``gen_length`` generated tokens: the answer may be cut off).

**Scoring** (``corpus_metrics``, main process): every program runs against its tests in
``prism.sandbox.executor.run_many`` (``workers``; ``timeout`` 3 s as HF ``code_eval``; ``memory_mb`` and
``max_processes`` for the whole job; ``isolation`` / ``allow_weaker_isolation``); returns ``pass@1``
(mean over problems of the passing fraction), the unbiased ``pass@k`` for each ``k`` the samples
allow, ``n_problems``, and the rate of each status (``exec_failed``, ``exec_error``, ``exec_limit``,
``exec_timeout``, ``exec_harness``). The records (the samples file) get ``task_id``, ``program``,
``status``, ``passed``, ``exec_message``, ``exec_seconds``; the **audit file** ``results_file`` (when
set) one row per sample: task id, status, message, seconds, the isolation obtained, the program and
the text. Running generated code needs ``allow_execution=True`` or ``PRISM_ALLOW_CODE_EXECUTION=1``,
checked by ``check_scoring`` (``evaluate`` and ``run.py`` call it before any scored sampling, together
with the isolation check: no long generation starts without either); ``execute=False`` never runs
anything.
"""
from __future__ import annotations

import math
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

import prism.paths as paths
from prism.metrics.passk import pass_at_ks
from tasks.base import Task
from tasks.tokenizers import TokenizerMixin

EXEC_STATUSES = ("failed", "error", "limit", "timeout", "harness")


class CodeTask(TokenizerMixin, Task):
    """Base of the code tasks: a subclass sets ``task_name``, ``styles`` (its prompt styles, 'chat'
    the one through the chat template), ``prompt_style`` and ``problems`` and defines
    ``prompt_text(problem)``, ``extract(text)``, ``job(problem, program) -> {program, tests}`` and
    ``reference_text(problem)`` (the reference solution as a model of its style answers: the oracle)."""

    task_name = "tasks.code"
    styles: Tuple[str, ...] = ()
    prompt_style = ""
    add_special_tokens = True  # a plain prompt gets the tokenizer's own special tokens (BOS)

    def __init__(self, tokenizer: Any, seq_len: int, gen_length: int, samples_per_problem: int, k: Sequence[int],
                 execute: bool, allow_execution: bool, workers: Optional[int], timeout: float, memory_mb: int,
                 max_processes: Optional[int], isolation: str, allow_weaker_isolation: bool,
                 results_file: Optional[str], cache_dir: Optional[str], corpus_scorers: Sequence[Any]):
        if not 0 < gen_length < seq_len:
            raise ValueError(f"{self.task_name}: need 0 < gen_length < seq_len, got {gen_length} and {seq_len}")
        if samples_per_problem < 1 or any(int(x) < 1 for x in k):
            raise ValueError(f"{self.task_name}: samples_per_problem and k must be >= 1, got {samples_per_problem}, {k}")
        if isolation not in ("auto", "none", "namespaces", "strict"):
            raise ValueError(f"{self.task_name}.isolation must be 'auto', 'strict', 'namespaces' or 'none', "
                             f"got {isolation!r}")
        self.tokenizer_spec = tokenizer
        self.seq_len, self.gen_length = int(seq_len), int(gen_length)
        self.samples_per_problem, self.k = int(samples_per_problem), tuple(int(x) for x in k)
        self.execute, self.allow_execution = bool(execute), bool(allow_execution)
        self.workers, self.timeout, self.memory_mb = workers, float(timeout), int(memory_mb)
        self.max_processes, self.isolation = max_processes, isolation
        self.allow_weaker_isolation = bool(allow_weaker_isolation)
        self.results_file = results_file
        self.cache_root = os.path.expanduser(cache_dir or paths.CACHE_ROOT)
        self.corpus_scorers = list(corpus_scorers)
        self._tokenizer = self._ids = self._prompt_ids = None

    # ------------------------------------------------------------------------- to define
    @property
    def problems(self) -> List[Dict[str, Any]]:
        raise NotImplementedError

    def prompt_text(self, problem: Dict[str, Any]) -> str:
        raise NotImplementedError

    def extract(self, text: str) -> str:
        raise NotImplementedError

    def job(self, problem: Dict[str, Any], program: str) -> Dict[str, str]:
        raise NotImplementedError

    def reference_text(self, problem: Dict[str, Any]) -> str:
        raise NotImplementedError

    def prompt_is_chat(self) -> bool:
        return self.prompt_style == "chat"

    def check_tokenizer(self, tokenizer) -> None:
        if self.prompt_is_chat():
            others = " or ".join(repr(s) for s in self.styles if s != "chat")
            self.needs_chat_template(tokenizer, "prompt_style='chat'", f"use prompt_style {others}")

    # ------------------------------------------------------------------------- prompts
    @property
    def prompt_ids(self) -> List[List[int]]:
        """Each problem's prompt tokens (the chat template holds its own special tokens; a plain
        prompt gets the tokenizer's, like ``tokenizer(prompt)``)."""
        if self._prompt_ids is None:
            texts = [self.prompt_text(p) for p in self.problems]
            ids = self.tokenizer(texts, add_special_tokens=not self.prompt_is_chat())["input_ids"]
            longest = max(range(len(ids)), key=lambda i: len(ids[i]))
            if len(ids[longest]) + self.gen_length > self.seq_len:
                raise ValueError(f"{self.task_name}: the prompt of task {self.problems[longest]['task_id']} has "
                                 f"{len(ids[longest])} tokens, more than seq_len - gen_length = "
                                 f"{self.seq_len - self.gen_length}; raise {self.task_name}.seq_len to at least "
                                 f"{len(ids[longest]) + self.gen_length}")
            self._prompt_ids = [list(x) for x in ids]
        return self._prompt_ids

    def check_scoring(self) -> None:
        """Raise before any sampling if programs are to be run (``execute``) without the opt-in, or
        without the isolation asked for (``prism.sandbox.host.resolve_isolation``)."""
        if not self.execute:
            return
        from prism.sandbox.executor import ExecutionNotAllowed, check_execution_allowed, resolve_isolation

        try:
            check_execution_allowed(self.allow_execution)
        except ExecutionNotAllowed as err:
            raise ExecutionNotAllowed(f"{err} With gin: {self.task_name}.allow_execution = True (or {self.task_name}."
                                      "execute = False to generate without running anything).") from None
        resolve_isolation(self.isolation, self.allow_weaker_isolation, gin_name=self.task_name)

    def prepare(self) -> None:
        self.prompt_ids  # noqa: B018 - loads the problems, the tokenizer and checks the lengths

    # ------------------------------------------------------------------------- batches
    @property
    def n_eval(self) -> int:
        return len(self.problems) * self.samples_per_problem

    def problem_of(self, index: int) -> Dict[str, Any]:
        """The problem of evaluation sequence ``index``."""
        return self.problems[int(index) // self.samples_per_problem]

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
            batch = {"input_ids": input_ids, "fixed": fixed, "attention_mask": keep,
                     "index": torch.arange(start, start + B)}
            ids = [self.problem_of(i)["task_id"] for i in range(start, start + B)]
            if all(isinstance(t, int) for t in ids):
                batch["task_id"] = torch.tensor(ids)
            yield self.check_batch(batch)

    # ------------------------------------------------------------------------- text and metrics
    def decode(self, tokens: torch.Tensor) -> str:
        """The generated text (the last ``gen_length`` positions) up to the first EOS / end of turn."""
        ids, stop = [int(t) for t in tokens[-self.gen_length:]], set(self.end_ids)
        ends = [j for j, t in enumerate(ids) if t in stop]
        return self.tokenizer.decode(ids[: ends[0]] if ends else ids, skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)

    def sample_metrics(self, samples: torch.Tensor, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        stop = torch.tensor(sorted(set(self.end_ids)), dtype=torch.long)
        gen = samples[:, -self.gen_length:].cpu()
        texts = [self.decode(s) for s in samples.cpu()]
        return {"extracted": torch.tensor([bool(self.extract(t)) for t in texts], dtype=torch.float),
                "empty_output": torch.tensor([not t.strip() for t in texts], dtype=torch.float),
                "hit_gen_length": (~torch.isin(gen, stop).any(dim=1)).float()}

    def corpus_metrics(self, records: List[dict]) -> Dict[str, float]:
        out = super().corpus_metrics(records)
        if self.execute:
            self.check_scoring()  # before anything runs
            values = self.score(records)
            clash = sorted(set(values) & set(out))
            if clash:
                raise ValueError(f"{self.task_name}: corpus metrics {clash} are computed twice")
            out.update(values)
        return out

    def score(self, records: List[dict]) -> Dict[str, float]:
        """Run each record's program on its problem's tests; add the per-sample results to the
        records (and the audit file ``results_file``); return pass@1, pass@k, ``n_problems`` and
        the rate of each status."""
        from prism.sandbox.executor import results_to_jsonl, run_many

        programs = [self.extract(r.get("text", "")) for r in records]
        todo = [i for i, p in enumerate(programs) if p]
        jobs = [self.job(self.problem_of(records[i]["index"]), programs[i]) for i in todo]
        limits = {"timeout": self.timeout, "memory_mb": self.memory_mb, "allow": self.allow_execution,
                  "max_processes": self.max_processes, "isolation": self.isolation,
                  "allow_weaker_isolation": self.allow_weaker_isolation}
        if self.workers is not None:
            limits["workers"] = self.workers
        results = dict(zip(todo, run_many(jobs, **limits))) if jobs else {}
        counts: Dict[Any, List[int]] = {}
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
                         "seconds": seconds, "isolation": res.isolation if res is not None else "",
                         "program": programs[i], "text": rec.get("text", "")})
        if self.results_file:
            results_to_jsonl(self.results_file, rows)
        pairs: List[Tuple[int, int]] = [tuple(v) for v in counts.values()]
        metrics = pass_at_ks(pairs, (1,) + self.k)
        metrics["pass@1"] = math.fsum(c / n for n, c in pairs) / len(pairs) if pairs else 0.0  # exactly c / n
        metrics["n_problems"] = float(len(pairs))
        for status in EXEC_STATUSES:
            metrics[f"exec_{status}"] = sum(r["status"] == status for r in rows) / max(len(rows), 1)
        return metrics


def oracle_records(task: CodeTask, problems: Optional[Sequence[int]] = None) -> List[dict]:
    """Records whose texts are the reference solutions of ``task``'s problems (positions in
    ``task.problems``; default all) written in its style's answer format, as ``evaluate`` gathers them."""
    chosen = range(len(task.problems)) if problems is None else problems
    spp = task.samples_per_problem
    return [{"index": p * spp + j, "text": task.reference_text(task.problems[p])} for p in chosen for j in range(spp)]


def oracle_metrics(task: CodeTask, problems: Optional[Sequence[int]] = None) -> Dict[str, float]:
    """``task.corpus_metrics`` of ``oracle_records``: pass@1 is 1.0 when extraction, the programs the
    task assembles, the tests and the executor are right (every reference solution passes)."""
    return task.corpus_metrics(oracle_records(task, problems))
