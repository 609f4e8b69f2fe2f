"""Where ``tasks.sft``'s pairs come from: MBPP's train / validation splits offline (never its test
split), local ``.jsonl`` / ``.json`` / ``.parquet`` files, or a hub dataset; and what identifies a
source's content in the cache key."""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Dict, List, Optional

import prism.paths as paths
from tasks.base import local_files

MBPP_SPLITS = {"mbpp-train": (601, 974), "mbpp-validation": (511, 600)}
MBPP_TEST = (11, 510)  # never read by this task
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def mbpp_instruction(text: str, first_test: str) -> str:
    """The MBPP prompt: the problem statement and its first test (so the function name is known)."""
    return f"{text.strip()}\nYour code should pass this test:\n{first_test.strip()}"


def load_mbpp(name: str, data_dir: Optional[str] = None) -> List[Dict[str, Any]]:
    """Rows ``{instruction, output, task_id, test_list}`` of one MBPP split (``'mbpp-train'`` or
    ``'mbpp-validation'``) in task-id order; the test split is refused."""
    if name not in MBPP_SPLITS:
        raise ValueError(f"MBPP source {name!r}: only {sorted(MBPP_SPLITS)} may be used here (MBPP's test "
                         f"split, task ids {MBPP_TEST[0]}-{MBPP_TEST[1]}, is kept for evaluation)")
    lo, hi = MBPP_SPLITS[name]
    path = os.path.join(data_dir or os.path.join(paths.DATA_ROOT, "mbpp"), "mbpp.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"MBPP file {path} not found (set the PRISM_DATA variable)")
    with open(path) as f:
        rows = sorted((r for r in map(json.loads, filter(str.strip, f)) if lo <= int(r["task_id"]) <= hi),
                      key=lambda r: int(r["task_id"]))
    ids = [int(r["task_id"]) for r in rows]
    if ids != list(range(lo, hi + 1)):
        raise ValueError(f"{path}: expected task ids {lo}-{hi} once each for {name}, got {len(ids)} rows")
    assert not any(MBPP_TEST[0] <= i <= MBPP_TEST[1] for i in ids), "MBPP test problems in a training source"
    return [{"instruction": mbpp_instruction(r["text"], r["test_list"][0]),
             "output": r["code"].replace("\r\n", "\n"), "task_id": int(r["task_id"]),
             "test_list": list(r["test_list"])} for r in rows]


def describe_source(source: Any, subset: Optional[str], split: str) -> Any:
    """What identifies a source's content in the cache key."""
    if isinstance(source, str) and source in MBPP_SPLITS:  # by content: the same key on every machine
        p = os.path.join(paths.DATA_ROOT, "mbpp", "mbpp.jsonl")
        digest = hashlib.sha256(open(p, "rb").read()).hexdigest() if os.path.exists(p) else None
        return [source, digest]
    files = local_files(source, LOCAL_FORMATS, "tasks.sft")
    if files is not None:
        return [[p, os.stat(p).st_size, os.stat(p).st_mtime_ns] for p in files]
    return ["hub", source, subset, split]


def load_source(source: Any, subset: Optional[str], split: str, prompt_field: str, answer_field: str,
                cache_dir: str):
    """``(datasets.Dataset, prompt_field, answer_field)`` of a source (MBPP sources use their own
    field names). Missing fields or an unloadable source raise an error naming them."""
    import datasets

    if isinstance(source, str) and (source in MBPP_SPLITS or source.startswith("mbpp-")):
        return datasets.Dataset.from_list(load_mbpp(source)), "instruction", "output"
    files = local_files(source, LOCAL_FORMATS, "tasks.sft")
    try:
        if files is not None:
            fmt = LOCAL_FORMATS[os.path.splitext(files[0])[1]]
            ds = datasets.load_dataset(fmt, data_files=files, split="train",
                                       cache_dir=os.path.join(cache_dir, "hf_datasets"))
        else:
            ds = datasets.load_dataset(source, subset, split=split)
    except Exception as e:  # noqa: BLE001 - name the source whatever went wrong
        raise ValueError(f"tasks.sft: could not load source {source!r} (subset {subset!r}, split {split!r}): "
                         f"{type(e).__name__}: {e}. Offline, use 'mbpp-train' or local .jsonl/.parquet files") from e
    for role, field in (("prompt_field", prompt_field), ("answer_field", answer_field)):
        if field not in ds.column_names:
            raise ValueError(f"tasks.sft: source {source!r} has no field {field!r} (tasks.sft.{role}); "
                             f"its fields: {ds.column_names}")
    return ds, prompt_field, answer_field
