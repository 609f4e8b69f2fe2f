"""``evaluate``: generate from the task's conditioning batches with the experiment's sampler, sharded
over processes, and score the samples at the task's two levels.

Batch ``i`` (of ``batch_size`` conditioning sequences, in the task's order) is sampled by process
``i % num_processes`` with the generator ``step_generator(seed, i, domain=1)``: the tokens of a batch
do not depend on which process samples it or on how many processes there are. Each process scores
its own samples with ``task.sample_metrics`` right after sampling them. The records (index, tokens,
text, per-sample metrics) and the forward-pass counts of every process are then gathered to the main
process and sorted by index; there, once, the means are taken in index order (so N processes report
exactly what one process reports), ``task.corpus_metrics`` runs on the whole set (evaluator models
load there, on first use), and the samples file is written. The metrics are then broadcast, so every
process returns the same dict.
"""
from __future__ import annotations

import json
import math
import os
import time
from typing import Any, Dict, List, Optional

import gin
import torch
from tqdm.auto import tqdm

from prism.experiment import Experiment
from prism.training.loop import step_generator

RECORD_FIELDS = ("index", "tokens", "text")


def _check_sample_metrics(values: Dict[str, Any], n: int, task) -> Dict[str, torch.Tensor]:
    for name, v in values.items():
        if name in RECORD_FIELDS:
            raise ValueError(f"{type(task).__name__}.sample_metrics: {name!r} is a field of every sample record; rename it")
        if not torch.is_tensor(v) or tuple(v.shape) != (n,):
            shape = tuple(v.shape) if torch.is_tensor(v) else type(v).__name__
            raise ValueError(f"{type(task).__name__}.sample_metrics[{name!r}] must be a ({n},) tensor, one value "
                             f"per sample, got {shape}")
    return {k: v.detach().float().cpu() for k, v in values.items()}


def summarize(records: List[dict], nfe: List[List[int]], task=None) -> Dict[str, float]:
    """Means of the per-sample metrics over ``records`` (in their order), ``n`` and ``nfe`` (forward
    passes per batch, from (batch index, passes) pairs); then the task's corpus metrics if ``task``."""
    keys = sorted({k for r in records for k in r if k not in RECORD_FIELDS})
    metrics: Dict[str, float] = {}
    for k in keys:
        values = [r[k] for r in records if k in r]
        if len(values) == len(records) and all(isinstance(v, (int, float)) for v in values):
            metrics[k] = math.fsum(values) / len(values)
    metrics["n"] = len(records)
    metrics["nfe"] = math.fsum(p for _, p in sorted(nfe)) / max(len(nfe), 1)
    if task is not None:
        corpus = task.corpus_metrics(records)
        clash = sorted(set(corpus) & set(metrics))
        if clash:
            raise ValueError(f"{type(task).__name__}.corpus_metrics returns {clash}, which are already per-sample "
                             "means or evaluation counts; rename them")
        metrics.update(corpus)
    return metrics


@gin.configurable("evaluate")
def generate_and_score(
    exp: Experiment,
    accelerator,
    output_dir: Optional[str],
    batch_size: int = 256,
    limit: Optional[int] = None,
    write_samples: bool = True,
    score: bool = True,
    tag: str = "",
) -> Dict[str, float]:
    """Sample every conditioning batch of ``exp.eval_task`` (the first ``limit`` sequences), write
    ``samples{tag}.jsonl`` and return the mean per-sample metrics, the corpus metrics, ``n``,
    ``nfe`` (mean forward passes per batch) and ``seconds`` (sampling and gathering, before the
    corpus metrics). ``score = False`` (``run.py sample``): no metrics of either level. The main
    process shows a progress bar over all batches, with the running means of its own."""
    if exp.sampler is None:
        raise ValueError("sampling needs experiment.sampler (e.g. experiment.sampler = @samplers.mdlm())")
    task = getattr(exp, "eval_task", None) or exp.task  # an experiment-like object without one: its task
    if score:
        task.check_scoring()  # e.g. code execution not allowed: say so before any sampling
    model = exp.model.to(accelerator.device).eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    records: List[dict] = []
    nfe: List[List[int]] = []  # (batch index, forward passes) of the batches this process sampled
    taken = 0
    t0 = time.time()
    bar = tqdm(desc=f"sampling {tag.lstrip('_')}".strip(), unit="batch", dynamic_ncols=True,
               total=math.ceil(limit / batch_size) if limit is not None else None,
               disable=not accelerator.is_local_main_process)
    for i, batch in enumerate(task.eval_batches(batch_size)):
        if limit is not None and taken >= limit:
            break
        if limit is not None:
            batch = {k: v[: limit - taken] for k, v in batch.items()}
        task.check_batch(batch)  # on every process: a bad batch stops all of them, not one
        start = taken
        taken += len(batch["input_ids"])
        if i % world != rank:
            bar.update(1)  # another process samples it
            continue
        batch = {k: v.to(accelerator.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        out = exp.sampler(model, batch, step_generator(exp.seed, i, domain=1))
        nfe.append([i, int(out.nfe)])
        values = _check_sample_metrics(task.sample_metrics(out.tokens, batch), len(out.tokens), task) if score else {}
        for j, tokens in enumerate(out.tokens.cpu()):
            rec = {"index": start + j, "tokens": tokens.tolist(), "text": task.decode(tokens)}
            rec.update({k: float(v[j]) for k, v in values.items()})
            records.append(rec)
        bar.update(1)
        if values:
            bar.set_postfix({k: f"{sum(r[k] for r in records) / len(records):.3f}" for k in sorted(values)})
    bar.close()

    if world > 1:
        from accelerate.utils import gather_object

        shards = gather_object([{"records": records, "nfe": nfe}])  # one entry per process
        records = [r for s in shards for r in s["records"]]
        nfe = [p for s in shards for p in s["nfe"]]
    metrics: Optional[Dict[str, float]] = None
    if accelerator.is_main_process:
        records.sort(key=lambda r: r["index"])
        if [r["index"] for r in records] != list(range(taken)):
            raise RuntimeError(f"evaluate gathered {len(records)} samples, expected indices 0..{taken - 1} once each")
        seconds = time.time() - t0
        if score:
            metrics = summarize(records, nfe, task)  # corpus metrics may add per-sample fields: before writing
        else:
            metrics = {"n": len(records), "nfe": math.fsum(p for _, p in sorted(nfe)) / max(len(nfe), 1)}
        metrics["seconds"] = seconds
        if output_dir and write_samples:
            with open(os.path.join(output_dir, f"samples{tag}.jsonl"), "w") as f:
                for r in records:
                    f.write(json.dumps(r) + "\n")
    if world > 1:
        from accelerate.utils import broadcast_object_list

        metrics = broadcast_object_list([metrics])[0]
    return metrics
