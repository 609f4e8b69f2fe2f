"""``evaluate``: generate from the task's conditioning batches with the experiment's sampler,
sharded over processes; per-sample task metrics are gathered to the main process."""
from __future__ import annotations

import json
import math
import os
import time
from typing import Dict, List, Optional

import gin
import torch
from tqdm.auto import tqdm

from prism.experiment import Experiment
from prism.train import step_generator


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
    """Sample every conditioning batch of ``exp.task`` (the first ``limit`` sequences), write
    ``samples{tag}.jsonl`` and return mean metrics, ``nfe`` (mean forward passes per batch) and
    ``seconds``. The main process shows a progress bar over the batches."""
    if exp.sampler is None:
        raise ValueError("sampling needs experiment.sampler (e.g. experiment.sampler = @samplers.mdlm())")
    model = exp.model.to(accelerator.device).eval()
    rank, world = accelerator.process_index, accelerator.num_processes
    records: List[dict] = []
    sums: Dict[str, float] = {}
    count, nfe_sum, n_batches, taken = 0, 0, 0, 0
    t0 = time.time()
    bar = tqdm(desc=f"sampling {tag.lstrip('_')}".strip(), unit="batch", dynamic_ncols=True,
               total=math.ceil(limit / batch_size) if limit is not None else None,
               disable=not accelerator.is_local_main_process)
    for i, batch in enumerate(exp.task.eval_batches(batch_size)):
        if limit is not None and taken >= limit:
            break
        if limit is not None:
            batch = {k: v[: limit - taken] for k, v in batch.items()}
        taken += len(batch["input_ids"])
        if i % world != rank:
            bar.update(1)  # another process samples it
            continue
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        out = exp.sampler(model, batch, step_generator(exp.seed, i, domain=1))
        nfe_sum += out.nfe
        n_batches += 1
        values = exp.task.metrics(out.tokens, batch) if score else {}
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + float(v.sum())
        count += len(out.tokens)
        for j, tokens in enumerate(out.tokens.cpu()):
            rec = {"index": i * batch_size + j, "tokens": tokens.tolist(), "text": exp.task.decode(tokens)}
            rec.update({k: float(v[j]) for k, v in values.items()})
            records.append(rec)
        bar.update(1)
        bar.set_postfix({k: f"{v / max(count, 1):.3f}" for k, v in sorted(sums.items())})
    bar.close()
    keys = sorted(sums)
    totals = torch.tensor([sums[k] for k in keys] + [count, nfe_sum, n_batches], dtype=torch.float64)
    totals = accelerator.reduce(totals.to(accelerator.device), "sum").cpu()
    n = max(float(totals[-3]), 1.0)
    metrics = {k: float(totals[j]) / n for j, k in enumerate(keys)}
    metrics.update(n=int(totals[-3]), nfe=float(totals[-2]) / max(float(totals[-1]), 1.0), seconds=time.time() - t0)
    from accelerate.utils import gather_object

    all_records = gather_object(records) if world > 1 else records
    if accelerator.is_main_process and output_dir and write_samples:
        all_records.sort(key=lambda r: r["index"])
        with open(os.path.join(output_dir, f"samples{tag}.jsonl"), "w") as f:
            for r in all_records:
                f.write(json.dumps(r) + "\n")
    return metrics
