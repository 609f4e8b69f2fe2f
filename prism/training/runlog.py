"""``metrics.jsonl``: one JSON object per logged step, appended by the main process.

Rows are strict JSON (a non-finite value is written as null, never a bare NaN), each written with one
``write`` and flushed, so a kill leaves at most a truncated last line; reading forgives exactly that
line and nothing else.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from typing import Dict, List

from prism.paths import write_text_atomic


def _finite_or_none(v):
    return None if isinstance(v, float) and not math.isfinite(v) else v


def append_row(path: str, row: Dict) -> None:
    line = json.dumps({k: _finite_or_none(v) for k, v in row.items()}, allow_nan=False) + "\n"
    with open(path, "a") as f:
        f.write(line)
        f.flush()


def read_rows(path: str) -> List[Dict]:
    """All complete rows. A last line cut short by a kill (no newline, or not JSON) is dropped with
    a warning; a broken line before the last one is an error that names the file and the line."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.read().split("\n")
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        last = i == len(lines) - 1 or (i == len(lines) - 2 and not lines[-1].strip())
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if last:
                warnings.warn(f"{path}: dropping a truncated last line ({line[:60]!r}...): the run was killed while writing it")
                continue
            raise ValueError(f"{path} line {i + 1} is not JSON ({err}); fix or delete that line, then resume") from None
    return rows


def keep_rows_up_to(path: str, step: int) -> None:
    """Keep the rows of steps ≤ ``step`` (what the checkpoint a run resumes from had logged), so a
    resumed or restarted run logs every step exactly once."""
    if not os.path.exists(path):
        return
    rows = [r for r in read_rows(path) if r.get("step", 0) <= step]
    write_text_atomic(path, "".join(json.dumps(r, allow_nan=False) + "\n" for r in rows))
