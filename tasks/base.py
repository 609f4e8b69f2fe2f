"""The task contract used by ``prism.training.loop``, ``prism.evaluation.evaluate`` and ``run.py``.

A task owns everything about the data: its tokenizer, its sequence length, which positions are
given, how a sample reads as text, and how samples are scored. It never builds a model or a sampler.

**Batches.** A batch is a dict with at least

- ``input_ids`` (B, L) long, L <= ``seq_len``; in an evaluation batch the positions to generate hold
  ``mask_id``;
- ``fixed`` (B, L) bool: positions that are never masked in training and never changed by a sampler
  (Sudoku's givens and end-of-line tokens, a prompt, padding);

and optionally

- ``attention_mask`` (B, L) bool: False exactly at padding, which no position may attend to.
  Padding must also be ``fixed`` (it is never generated). Losses and samplers pass it to the model
  unchanged (``evaluate`` hands the whole batch to the sampler); without it nothing is padding.

Other keys are allowed (e.g. problem ids), as tensors or lists with B entries.
``check_batch`` enforces the rules above; ``evaluate`` calls it on every evaluation batch.

**Metrics, at two levels.**

- ``sample_metrics(samples, batch) -> {name: (B,) tensor}``: per sample, computed on the process
  that generated the batch, right after sampling (cheap checks: Sudoku's ``success``). Their means
  are reported; the values are written with each sample.
- ``corpus_metrics(records) -> {name: float}``: once, on the main process, after the samples of all
  processes are gathered in order (``records[i]`` is the i-th conditioning sequence: ``index``,
  ``tokens``, ``text`` and the sample metrics). This is where metrics of a set live (MAUVE against
  reference texts, token-weighted perplexity, pass@1 from executing programs on CPU workers, a
  confidence interval). The default runs the task's ``corpus_scorers`` (``prism.metrics.corpus.CorpusMetric``
  objects, which load evaluator models lazily on first use), so nothing is loaded on the other
  processes or by ``sample``. A scorer may add per-sample fields to the records; they are written to
  the samples file, which is written after the corpus metrics.
"""
from __future__ import annotations

import glob
import os
from typing import Any, Dict, Iterator, List, Optional, Sequence

import torch


class Task:
    """Batches, text and metrics of one task (see the module docstring for the contract)."""

    vocab_size: int
    mask_id: int
    seq_len: int  # the longest sequence (prompt + generation + padding); a gin option of each task
    tokenizer: Optional[Any] = None  # text tasks: their tokenizer (e.g. loaded lazily by a property)
    corpus_scorers: Sequence[Any] = ()  # prism.metrics.corpus.CorpusMetric objects run by corpus_metrics

    def prepare(self) -> None:
        """Load or generate what the task needs (run on the main process first, then the others,
        so a cache is written once)."""

    def data_files(self) -> List[str]:
        """The files this task will read from the data folder (none by default); ``check_data`` is
        called by ``run.py`` before any model is built."""
        return []

    def check_data(self) -> None:
        """Raise ``prism.data.MissingData``, naming the fetch command, if a file of ``data_files`` is missing."""
        from prism.data import require

        require(self.data_files(), type(self).__name__)

    def check_scoring(self) -> None:
        """Raise, with what to do about it, if this task's metrics cannot be computed here (e.g. MBPP
        without the opt-in to execute generated code): called before any sampling that will be scored."""

    def train_batch(self, batch_size: int, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        """One training batch, a deterministic function of ``generator``'s state (so a run resumes
        exactly and every rank sees its own data)."""
        raise NotImplementedError

    def eval_batches(self, batch_size: int) -> Iterator[Dict[str, torch.Tensor]]:
        """Conditioning batches to sample from, always in the same order: ``input_ids`` with
        ``mask_id`` where to generate."""
        raise NotImplementedError

    def check_batch(self, batch: Dict[str, Any]) -> Dict[str, Any]:
        """Raise a ValueError naming the problem if ``batch`` breaks the contract; return it."""
        name = type(self).__name__
        for key in ("input_ids", "fixed"):
            if key not in batch:
                raise ValueError(f"{name} batch has no {key!r} (keys: {sorted(batch)})")
        ids = batch["input_ids"]
        if ids.dim() != 2:
            raise ValueError(f"{name} batch: input_ids must be (B, L), got shape {tuple(ids.shape)}")
        B, L = ids.shape
        if L > self.seq_len:
            raise ValueError(f"{name} batch of length {L} is longer than the task's seq_len = {self.seq_len}")
        for key in ("fixed", "attention_mask"):
            v = batch.get(key)
            if v is not None and (tuple(v.shape) != (B, L) or v.dtype != torch.bool):
                raise ValueError(f"{name} batch: {key} must be a ({B}, {L}) bool tensor, got "
                                 f"{tuple(v.shape)} {v.dtype}")
        keep = batch.get("attention_mask")
        if keep is not None and bool((~keep & ~batch["fixed"]).any()):
            raise ValueError(f"{name} batch: padding (attention_mask False) must also be fixed")
        for key, v in batch.items():
            if len(v) != B:
                raise ValueError(f"{name} batch: {key!r} has {len(v)} entries for {B} sequences")
        return batch

    def sample_metrics(self, samples: torch.Tensor, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Per-sample metric values (each a (B,) float tensor) for generated ``samples`` (B, L)."""
        raise NotImplementedError

    def corpus_metrics(self, records: List[dict]) -> Dict[str, float]:
        """Metrics of the whole set of samples (every process's, in order), computed once on the
        main process. The default merges the results of ``corpus_scorers``."""
        from prism.metrics.corpus import run_scorers

        return run_scorers(self.corpus_scorers, records, type(self).__name__)

    def decode(self, tokens: torch.Tensor) -> str:
        """One sequence (L,) as human-readable text. Default: the tokenizer's decoding when the task
        has one (a text task overrides it to drop its padding), else the token ids; Sudoku draws
        the board."""
        ids = [int(t) for t in tokens]
        if self.tokenizer is not None:
            return self.tokenizer.decode(ids)
        return " ".join(map(str, ids))


def local_files(source: Any, formats: Dict[str, str], owner: str) -> Optional[List[str]]:
    """The files of a local data source (a path, a glob or a list of them) with one of ``formats``'
    extensions, or None for a hub id / name; ``owner`` (e.g. 'tasks.sft') names the task in errors."""
    items = list(source) if isinstance(source, (list, tuple)) else [source]
    if not all(isinstance(s, str) for s in items):
        raise TypeError(f"{owner} source must be a string or a list of paths, got {source!r}")
    if not isinstance(source, (list, tuple)) and not any(source.endswith(e) for e in formats):
        return None
    files: List[str] = []
    for item in map(os.path.expanduser, items):
        found = sorted(glob.glob(item)) if glob.has_magic(item) else ([item] if os.path.exists(item) else [])
        if not found:
            raise FileNotFoundError(f"{owner} source: no file {item!r}")
        files += [os.path.abspath(p) for p in found]
    exts = {os.path.splitext(p)[1] for p in files}
    if len(exts) != 1 or not exts <= set(formats):
        raise ValueError(f"{owner} source files must all be one of {sorted(formats)}, got {sorted(exts)}")
    return files
