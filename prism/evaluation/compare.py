"""``compare``: several experiments side by side in one ``run.py eval`` (or ``sample``), composed
from gin alone.

Each row is a gin scope. ``compare.rows = ['vanilla', 'prism']`` builds one experiment per row
inside ``gin.config_scope(row)``, so a scoped binding such as
``prism/experiment.init_checkpoint = '...'`` or ``prism/experiment.sampler = @samplers.prism()``
applies to that row only (also to everything built through ``@x()`` references while the row is
built: the model, its head, the sampler and its rules); unscoped bindings apply to every row. A
nested row ``'prism/confident'`` inherits the bindings of ``prism/`` and adds its own
(``prism/confident/samplers.prism.unmask_rule = ...``). Each row is evaluated by ``evaluate`` (also
inside its scope) and writes ``samples_<row>.jsonl`` (``/`` → ``_``); the result is one table row per
scope. A row's weights are its own ``experiment.init_checkpoint``, never the output directory's
checkpoints.

``picture``: optionally a function ``(model, tokens, batch, path, title)`` (e.g.
``@tasks.sudoku_quality_board``) called on the main process for one sample of row ``picture_row``
(default: the first row whose model has a quality head), writing ``quality_<row>.png``: sample
``picture_index``, or with ``picture_index = 'first_failure'`` the first sample whose ``success`` is 0
(the first one if the row solved every one).
"""
from __future__ import annotations

import json
import os
from typing import Callable, List, Optional, Sequence, Tuple, Union

import gin
import torch

from prism.evaluation.evaluate import generate_and_score
from prism.experiment import build_experiment
from registry import REGISTRIES


def row_slug(row: str) -> str:
    return row.replace("/", "_")


def scoped_query(scope: str, name: str, default=None):
    """The value gin gives parameter ``name`` inside ``scope``: the most specific scoped binding
    (``a/b/name``, then ``a/name``), else the unscoped one, else ``default``."""
    parts = scope.split("/") if scope else []
    for k in range(len(parts), -1, -1):
        try:
            return gin.query_parameter("/".join(parts[:k] + [name]))
        except ValueError:
            continue
    return default


def registry_name(obj, kind: str) -> str:
    """The registry name of a built component (``linear`` for a ``heads.linear``), else its class."""
    for name, entry in REGISTRIES[kind]._entries.items():
        if isinstance(entry, type) and type(obj) is entry:
            return name
    return type(obj).__name__


def describe_sampler(sampler) -> str:
    """A step-loop sampler in words: schedule (strategy, K, T), unmasking rule, remasking rule."""
    schedule = getattr(sampler, "schedule", None)
    if schedule is None:
        return type(sampler).__name__
    words = [registry_name(schedule, "schedules")]
    if getattr(schedule, "strategy", None):
        words.append(str(schedule.strategy))
    if getattr(schedule, "num_remask", None) is not None:
        words.append(f"K={schedule.num_remask}")
    if getattr(schedule, "n_steps", None) is not None:
        words.append(f"T={schedule.n_steps}")
    text = " ".join(words)
    if getattr(sampler, "unmask_rule", None) is not None:
        text += f", unmask {registry_name(sampler.unmask_rule, 'unmask_rules')}"
    remask = getattr(sampler, "remask_rule", None)
    remask = getattr(remask, "rule", remask)  # PRISM-loop wraps the rule it uses
    if remask is not None:
        text += f", remask {registry_name(remask, 'remask_rules')}"
    return text


def _row_sample(output_dir: str, row: str, index: Union[int, str]) -> Tuple[int, torch.Tensor]:
    """(index, tokens) of sample ``index`` of the row's samples file, or of its first failure."""
    with open(os.path.join(output_dir, f"samples_{row_slug(row)}.jsonl")) as f:
        records = [json.loads(line) for line in f]
    if index == "first_failure":
        failed = [r for r in records if r.get("success", 1.0) == 0.0]
        rec = failed[0] if failed else records[0]
    else:
        match = [r for r in records if r["index"] == index]
        if not match:
            raise ValueError(f"compare.picture_index = {index}: row {row!r} has no sample with that index (see evaluate.limit)")
        rec = match[0]
    return rec["index"], torch.tensor(rec["tokens"], dtype=torch.long)


def _conditioning(task, index: int) -> dict:
    for i, batch in enumerate(task.eval_batches(1)):
        if i == index:
            return {k: v[0] for k, v in batch.items()}
    raise ValueError(f"compare.picture_index = {index}: the task has fewer conditioning sequences")


@gin.configurable("compare")
def compare_rows(
    accelerator,
    output_dir: Optional[str],
    rows: Sequence[str] = (),
    score: bool = True,
    picture: Optional[Callable] = None,
    picture_row: Optional[str] = None,
    picture_index: Union[int, str] = 0,
) -> Optional[List[dict]]:
    """Build and evaluate one experiment per gin scope in ``rows``; returns one table row per scope
    (row, weights, head, sampler and the metrics of ``evaluate``), or None when ``rows`` is empty
    (a plain single-experiment run)."""
    if not rows:
        return None
    rows = list(rows)
    if len({row_slug(r) for r in rows}) != len(rows):
        raise ValueError(f"compare.rows must name distinct scopes (after '/' -> '_'): {rows}")
    if picture_row is not None and picture_row not in rows:
        raise ValueError(f"compare.picture_row {picture_row!r} is not one of compare.rows {rows}")
    if not (isinstance(picture_index, int) or picture_index == "first_failure"):
        raise ValueError(f"compare.picture_index must be an int or 'first_failure', got {picture_index!r}")
    from accelerate.utils import set_seed

    table: List[dict] = []
    for row in rows:
        with gin.config_scope(row):
            set_seed(scoped_query(row, "experiment.seed", 0))  # each row's initialisation independent of the others
            exp = build_experiment()
            head = getattr(exp.model, "head", None)
            accelerator.print(f"[{row}] weights {exp.init_checkpoint or 'random init'}, sampler {describe_sampler(exp.sampler)}")
            metrics = generate_and_score(exp, accelerator, output_dir, score=score, tag=f"_{row_slug(row)}")
        table.append({"row": row, "weights": exp.init_checkpoint or "random init",
                      "head": registry_name(head, "heads") if head is not None else "-",
                      "sampler": describe_sampler(exp.sampler), **metrics})
        wants_picture = picture is not None and (row == picture_row or (picture_row is None and head is not None))
        if wants_picture and accelerator.is_main_process and output_dir:
            path = os.path.join(output_dir, f"quality_{row_slug(row)}.png")
            index, tokens = _row_sample(output_dir, row, picture_index)
            info = picture(exp.model, tokens, _conditioning(exp.eval_task, index), path, title=f"{row}, sample {index}")
            accelerator.print(f"[{row}] wrote {path}" + (f" {info}" if info else ""))
        if wants_picture:
            picture = None  # one picture
        del exp
    if picture is not None:
        accelerator.print("compare.picture: no picture drawn (no row has a quality head; set compare.picture_row)")
    return table
