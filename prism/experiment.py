"""``experiment``: what a run is made of. The experiment owns the combination; a task never builds
a model and a sampler never knows the task."""
from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import gin
import torch
from safetensors.torch import load_file, save_file

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
) -> Experiment:
    """Bind the parts of a run.

    ``init_checkpoint``: weights to start from (a ``.safetensors`` file or a checkpoint directory of
    ``run.py train``), loaded strictly; relative paths are resolved against the repository root.
    ``init_new``: sub-modules that are new in this run and may be absent from the checkpoint (e.g.
    ``['head']`` to fine-tune a pretrained MDM with a fresh quality head); they keep their own init.
    ``trainable``: glob patterns of parameter names that train (e.g. ``['head.*']`` for the head
    only, ``['critic.*']`` for a Token-Critic on a frozen MDM); None trains everything.
    After the weights are loaded the loss may take what it needs from the model (``Loss.attach``:
    e.g. a frozen copy of the pretrained MDM)."""
    if model.vocab_size < task.vocab_size or model.mask_id != task.mask_id:
        raise ValueError(
            f"model (vocab {model.vocab_size}, mask id {model.mask_id}) does not fit task "
            f"{type(task).__name__} (vocab {task.vocab_size}, mask id {task.mask_id})"
        )
    if init_checkpoint:
        load_weights(model, init_checkpoint, new_modules=init_new)
    if trainable is not None:
        set_trainable(model, trainable)
    if loss is not None:
        loss.attach(model)
    return Experiment(model, task, loss, sampler, seed, init_checkpoint)


def resolve_weights_path(path: str) -> str:
    from prism.paths import REPO_ROOT

    if not os.path.isabs(path) and not os.path.exists(path):
        path = os.path.join(REPO_ROOT, path)
    if os.path.isdir(path):
        path = os.path.join(path, "weights.safetensors")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"checkpoint weights {path} not found. Point experiment.init_checkpoint at a .safetensors file "
            "or a run's checkpoints/step_XXXXXXXX directory (train one with `python run.py train gin/sudoku/mdm.gin`)."
        )
    return path


def parameter_aliases(model: torch.nn.Module) -> dict:
    """{name: canonical name} for every parameter name, tied weights (e.g. an LM head sharing the
    embedding matrix) mapping to the first name that holds the same tensor."""
    first: dict = {}
    return {name: first.setdefault(id(p), name) for name, p in model.named_parameters(remove_duplicate=False)}


def save_weights(state: dict, model: torch.nn.Module, path: str) -> None:
    """Write a state dict as safetensors, each tied tensor once (safetensors refuses shared memory)."""
    aliases = parameter_aliases(model)
    unique = {k: v.detach().contiguous().cpu() for k, v in state.items() if aliases.get(k, k) == k}
    save_file(unique, path)


def set_trainable(model: torch.nn.Module, patterns: Sequence[str]) -> int:
    """Train only the parameters whose name matches one of the glob ``patterns``; returns how many
    parameter tensors train. A pattern that matches nothing is an error (a typo would otherwise
    silently freeze the whole model)."""
    names = [n for n, _ in model.named_parameters()]
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            prefixes = sorted({n.split(".")[0] + ".*" for n in names})
            raise ValueError(f"experiment.trainable pattern {pattern!r} matches no parameter; "
                             f"top-level patterns of this model: {prefixes}")
    n_train = 0
    for name, p in model.named_parameters():
        p.requires_grad_(any(fnmatch.fnmatchcase(name, pat) for pat in patterns))
        n_train += int(p.requires_grad)
    return n_train


def load_weights(model: torch.nn.Module, path: str, new_modules: Sequence[str] = ()) -> str:
    """Load a safetensors state dict into ``model``; a checkpoint that does not match the model fails
    with the missing, unexpected and mis-shaped names. Names under ``new_modules`` (e.g. ``head``)
    may be missing: they keep their initialisation."""
    path = resolve_weights_path(path)
    state = load_file(path)
    own = model.state_dict()
    for name, canonical in parameter_aliases(model).items():  # tied weights are stored once
        if name not in state and canonical in state:
            state[name] = state[canonical]
    for name in own:
        if name not in state and any(name == m or name.startswith(m + ".") for m in new_modules):
            state[name] = own[name]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                    for k in set(own) & set(state) if state[k].shape != own[k].shape)
    if missing or unexpected or shapes:
        raise ValueError(
            f"checkpoint {path} does not match the model. missing: {missing[:8]}; unexpected: "
            f"{unexpected[:8]}; shape mismatches: {shapes[:8]}. Check the backbone preset and sizes "
            "in the gin files against the ones the checkpoint was trained with (its recipe gin file)."
            + (f" To start the new modules {sorted({m.split('.')[0] for m in missing})} from their initialisation, "
               "list them in experiment.init_new (e.g. experiment.init_new = ['head'])." if missing and not unexpected else "")
        )
    model.load_state_dict(state)
    return path
