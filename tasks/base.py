"""The task contract used by ``prism.train`` and ``run.py``."""
from __future__ import annotations

from typing import Dict, Iterator

import torch


class Task:
    """A task provides batches and metrics; it never builds a model or a sampler.

    A batch is a dict of tensors with at least ``input_ids`` (B, L) long and ``fixed`` (B, L) bool:
    positions that may never be masked or changed (givens, separators, prompts, padding). It may
    also carry ``attention_mask`` (B, L) bool (False = padding).
    """

    vocab_size: int
    mask_id: int
    seq_len: int

    def prepare(self) -> None:
        """Load or generate what the task needs (run on the main process first, then the others,
        so a cache is written once)."""

    def train_batch(self, batch_size: int, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        """One training batch, a deterministic function of ``generator``'s state (so a run resumes
        exactly and every rank sees its own data)."""
        raise NotImplementedError

    def eval_batches(self, batch_size: int) -> Iterator[Dict[str, torch.Tensor]]:
        """Conditioning batches to sample from: ``input_ids`` with ``mask_id`` where to generate."""
        raise NotImplementedError

    def metrics(self, samples: torch.Tensor, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """Per-sample metric values (each a (B,) float tensor) for generated ``samples``."""
        raise NotImplementedError

    def decode(self, sample: torch.Tensor) -> str:
        return " ".join(str(int(t)) for t in sample)
