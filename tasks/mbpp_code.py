"""MBPP's prompt styles, answer formats and code extraction (used by ``tasks.mbpp``): the function name
from the reference code, PRISM's instruction, lm-evaluation-harness's 3-shot prompt, the test code
run after a program, and reading the program back out of generated text."""
from __future__ import annotations

import ast
import re
import textwrap
import warnings
from typing import Any, Dict, Optional, Sequence

STYLES = ("prism", "lm_eval", "chat")
FEWSHOT_IDS = (2, 3, 4)
DONE, BEGIN = "[DONE]", "[BEGIN]"
END_OF_TEXT = ("<|eot_id|>", "<|endoftext|>")  # in raw texts decoded with their special tokens

PRISM_INSTRUCTION = """Write only valid Python code for the task below.
- Put the code between <py> and </py> and write nothing else.
- No markdown, no explanations, no comments.
- Do not print anything or read input. Do not write files or use the network.
- If you need imports, use only the Python standard library, at the top.
- Define exactly one top-level function, named {func_name} (keep this name).
- Do not write tests or an `if __name__ == "__main__":` block.

Task:
{task_text}

Format:
<py>
# standard-library imports, if any

def {func_name}(...):
    ...
</py>
"""

LM_EVAL_QUESTION = ("You are an expert Python programmer, and here is your task: {text} "
                    "Your code should pass these tests:\n\n{tests}\n[BEGIN]\n")

PAIR_STUB = "class Pair:\n    def __init__(self, a, b):\n        self.a = a\n        self.b = b\n"


def function_name(code: str, tests: Sequence[str] = (), rule: str = "prism") -> Optional[str]:
    """The function a prompt names: ``'prism'``, the first top-level ``def`` of ``code`` (``ast``;
    a ``def`` at the start of a line if it does not parse), as the PRISM code does; ``'tested'``,
    the first top-level ``def`` that ``tests`` call (else the first)."""
    tree = _parse(code)
    if tree is not None:
        names = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
    else:
        names = re.findall(r"^def\s+([A-Za-z_]\w*)\s*\(", code, flags=re.M)
    if rule == "tested":
        called = " ".join(tests)
        names = [n for n in names if re.search(rf"\b{re.escape(n)}\s*\(", called)] or names
    elif rule != "prism":
        raise ValueError(f"tasks.mbpp.func_name must be 'prism' or 'tested', got {rule!r}")
    return names[0] if names else None


def lm_eval_question(problem: Dict[str, Any]) -> str:
    return LM_EVAL_QUESTION.format(text=problem["text"], tests="\n".join(problem["test_list"]))


def lm_eval_prompt(problem: Dict[str, Any], shots: Sequence[Dict[str, Any]]) -> str:
    """lm-eval's ``mbpp`` prompt: each shot's question + ``{code}\\n[DONE]``, then the question,
    joined by blank lines (its ``fewshot_delimiter``; the target delimiter is empty)."""
    parts = [lm_eval_question(s) + reference_answer(s, "lm_eval") for s in shots]
    return "\n\n".join(parts + [lm_eval_question(problem)])


def reference_answer(problem: Dict[str, Any], style: str) -> str:
    """The reference solution written as a model of ``style`` should answer (the oracle's text)."""
    code = problem["code"]
    if style == "prism":
        return f"\n<py>\n{code}\n</py>"  # PRISM's training target
    if style == "lm_eval":
        return f"{code}\n{DONE}"
    if style == "chat":
        return f"```python\n{code}\n```"
    raise ValueError(f"tasks.mbpp.prompt_style must be one of {STYLES}, got {style!r}")


def check_code(problem: Dict[str, Any], setup_code: bool = True) -> str:
    """What runs after the program: test imports, setup code, a ``Pair`` stub if needed, asserts."""
    asserts = "\n".join(problem["test_list"])
    parts = list(problem["test_imports"])
    if setup_code and problem["setup"].strip():
        parts.append(problem["setup"].rstrip())
    if re.search(r"\bPair\(", asserts) and "class Pair" not in asserts:
        parts.append(PAIR_STUB)
    return "\n".join(parts + [asserts]) + "\n"


# ----------------------------------------------------------------------------- extraction
def _trim(code: str) -> str:
    """Drop blank lines around ``code`` (and a common indentation, when its first line has one)."""
    code = re.sub(r"\A(?:[ \t]*\r?\n)+", "", code.rstrip())
    return textwrap.dedent(code) if code[:1] in (" ", "\t") else code


def _py_block(text: str) -> Optional[str]:
    closed = re.findall(r"<py>(.*?)</py>", text, flags=re.S | re.I)
    if closed:
        return closed[-1]
    at = text.lower().rfind("<py>")
    return text[at + 4:] if at >= 0 else None  # unclosed: to the end


def _fenced_block(text: str) -> Optional[str]:
    m = re.search(r"```[ \t]*[\w+-]*[ \t]*\n(.*?)(?:```|\Z)", text, flags=re.S)  # unclosed: to the end
    return m.group(1) if m else None


def _parse(code: str) -> Optional[ast.Module]:
    """``ast.parse(code)``, or None if it does not parse (without warnings about its escapes)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return ast.parse(code)
        except (SyntaxError, ValueError):
            return None


def extract_program(text: str, style: str) -> str:
    """The program in a generated ``text`` of prompt style ``style`` ('' when there is none):
    the text before the end of turn (and, for ``'lm_eval'``, before ``[DONE]``); then the last
    ``<py>`` block (``'prism'``) or the first fenced block (the others), else the other kind; else
    the whole text if it parses as Python."""
    if style not in STYLES:
        raise ValueError(f"tasks.mbpp.prompt_style must be one of {STYLES}, got {style!r}")
    for stop in END_OF_TEXT + ((DONE,) if style == "lm_eval" else ()):
        text = text.split(stop, 1)[0]
    if style == "lm_eval" and text.lstrip().startswith(BEGIN):
        text = text.lstrip()[len(BEGIN):]
    finders = (_py_block, _fenced_block) if style == "prism" else (_fenced_block, _py_block)
    for find in finders:
        block = find(text)
        if block is not None and block.strip():
            return _trim(block)
    bare = _trim(text)
    return bare if bare and _parse(bare) is not None else ""
