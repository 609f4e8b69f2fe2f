"""``experiment``: what a run is made of. The experiment owns the combination; a task never builds
a model and a sampler never knows the task."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Tuple

import gin
import torch

# save_weights is re-exported for callers that import it from here (tests/test_prism.py, tests/test_main_job.py)
from prism.checkpoint import as_dtype, load_weights, select
from prism.losses.base import Loss
from prism.model import MDM
from tasks.base import Task


@dataclass
class Experiment:
    model: MDM
    task: Task
    loss: Optional[Loss]
    sampler: Optional[Any]
    seed: int
    init_checkpoint: Optional[str]
    eval_task: Optional[Task] = None  # what sample / eval (and train's evaluations) run on; None: ``task``

    def __post_init__(self):
        if self.eval_task is None:
            self.eval_task = self.task


@gin.configurable("experiment")
def build_experiment(
    model: MDM = gin.REQUIRED,
    task: Task = gin.REQUIRED,
    loss: Optional[Loss] = None,
    sampler: Optional[Any] = None,
    seed: int = 0,
    init_checkpoint: Optional[str] = None,
    init_new: Sequence[str] = (),
    trainable: Optional[Sequence[str]] = None,
    key_map: Sequence[Tuple[str, Optional[str]]] = (),
    dtype: Optional[str] = None,
    init_adapter: Optional[str] = None,
    adapter: Optional[Any] = None,
    eval_task: Optional[Task] = None,
) -> Experiment:
    r"""Bind the parts of a run.

    ``task``: what training draws batches from; ``eval_task``: what ``sample`` / ``eval`` (and the
    evaluations around training) generate for and score, e.g. SFT pairs to train on and MBPP to
    evaluate (default: ``task``).

    ``init_checkpoint``: weights to start from (a ``.safetensors`` file, a checkpoint directory of
    ``run.py train``, or a sharded model's directory with ``model.safetensors.index.json``), loaded
    strictly (``prism/checkpoint.py``); relative paths are resolved against the repository root.
    ``key_map``: (regex, replacement) pairs applied in order to the checkpoint's keys before they are
    matched (replacement None drops the key), e.g. ``[(r'^backbone\.vocab_embed\.embedding$',
    'backbone.vocab_embed')]`` for MDLM's released weights.
    ``dtype``: cast the model's floating-point weights (e.g. 'bfloat16') before loading; None keeps them.
    ``init_new``: patterns of parameters that are new in this run and may be absent from the
    checkpoint (e.g. ``['head']`` to fine-tune a pretrained MDM with a fresh quality head); they keep
    their own init. ``init_adapter``: an adapter-only file (``prism.checkpoint.save_adapter``) loaded
    on top of ``init_checkpoint``; each of its keys must name a parameter.
    ``adapter``: parameter-efficient fine-tuning added once the base weights are loaded (before
    ``init_adapter``), e.g. ``@adapters.lora()`` (``prism/adapters/lora.py``): the base is frozen and
    only the adapter's weights and the quality head train, unless ``trainable`` says otherwise.
    ``trainable``: patterns of parameter names that train (e.g. ``['head']`` for the head only,
    ``['critic.*']`` for a Token-Critic on a frozen MDM); None trains everything.
    ``init_new`` and ``trainable`` match alike (``prism.checkpoint.matches``: globs, ``*`` crossing
    dots, a bare module name meaning itself and everything under it); a pattern that matches no
    parameter is an error.
    After the weights are loaded the loss may take what it needs from the model (``Loss.attach``:
    e.g. a frozen copy of the pretrained MDM)."""
    for t in (task,) if eval_task is None else (task, eval_task):
        if model.vocab_size < t.vocab_size or model.mask_id != t.mask_id:
            raise ValueError(
                f"model (vocab {model.vocab_size}, mask id {model.mask_id}) does not fit task "
                f"{type(t).__name__} (vocab {t.vocab_size}, mask id {t.mask_id})"
            )
    if init_checkpoint:
        load_weights(model, init_checkpoint, new_modules=init_new, key_map=key_map, dtype=dtype)
    elif dtype is not None:
        model.to(dtype=as_dtype(dtype))
    if adapter is not None:
        adapter.apply(model)
    if init_adapter:
        from prism.hub_adapter import load_adapter_any

        load_adapter_any(model, init_adapter, key_map=key_map)
    if trainable is not None:
        set_trainable(model, trainable)
    elif adapter is not None:
        set_trainable(model, adapter.trainable_names(model))
    if loss is not None:
        loss.attach(model)
    return Experiment(model, task, loss, sampler, seed, init_checkpoint, eval_task)


def set_trainable(model: torch.nn.Module, patterns: Sequence[str]) -> int:
    """Train only the parameters whose name matches one of ``patterns`` (``prism.checkpoint.matches``:
    globs, a bare module name covering what is under it); returns how many parameter tensors train. A
    pattern that matches nothing is an error (a typo would otherwise silently freeze the whole model)."""
    chosen = set(select([n for n, _ in model.named_parameters()], patterns, "experiment.trainable"))
    n_train = 0
    for name, p in model.named_parameters():
        p.requires_grad_(name in chosen)
        n_train += int(p.requires_grad)
    return n_train


def from_gin(configs: Sequence[str], bindings: Sequence[str] = (), user_dirs: Sequence[str] = ()) -> Experiment:
    """Build an experiment from gin files (paths, or relative to ``gin/``) and bindings, as ``run.py``
    does but without a run directory (the library's front door: see the README's Python example)."""
    from prism.config import parse_gin
    from registry import import_user_dir, load_builtin_components

    load_builtin_components()
    for d in user_dirs:
        import_user_dir(d)
    gin.clear_config()
    parse_gin(configs, bindings)
    return build_experiment()
