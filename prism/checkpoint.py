"""Checkpoints in one module: where weights are, how they are read into a model and written out, and
which parameters a name pattern means.

- **Names.** ``matches`` / ``select`` are the one rule for ``experiment.init_new``,
  ``experiment.trainable``, adapter files and ``prism.export --only``: glob patterns (fnmatch, ``*``
  crosses dots) on parameter names, a bare module name ``head`` meaning ``head`` and ``head.*``; a
  pattern that matches nothing is an error that lists the model's top-level names.
- **Reading** (``load_weights``, ``load_adapter``): a ``.safetensors`` file, a directory holding
  ``weights.safetensors`` or ``model.safetensors``, or a sharded Hugging Face layout
  (``model.safetensors.index.json`` + shards). Keys go through a key map (ordered (regex,
  replacement) pairs; replacement None drops the key) before they are matched; the headers are
  checked first (missing, unexpected, mis-shaped names: the model is untouched on an error), then
  tensors are copied in one at a time, so the whole model never sits twice in memory. ``dtype``
  casts the model's floating-point weights before the copy.
- **Writing** (``save_weights``, ``save_adapter``): atomic (a temporary file, then ``os.replace``),
  each tied tensor once, an optional dtype, optionally only the names matching some patterns (an
  adapter file, loaded back onto base weights from elsewhere by ``load_adapter``).
- **Copying** (``copy_weights``, ``prism.export``). A training run's directory and its checkpoints:
  ``prism.training.checkpoints``.
"""
from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from prism.safetensors_stream import iter_tensors

WEIGHTS = "weights.safetensors"
HF_WEIGHTS = "model.safetensors"
HF_INDEX = "model.safetensors.index.json"
ADAPTER_KEY = "prism_adapter"  # safetensors metadata of an adapter-only file: its patterns (JSON)

Patterns = Union[str, Sequence[str]]
KeyMap = Sequence[Tuple[str, Optional[str]]]


# ---------------------------------------------------------------------------------------- names
def matches(name: str, pattern: str) -> bool:
    """The one matching rule: a glob on the name, where a bare module name also covers what is under it."""
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, pattern + ".*")


def select(names: Iterable[str], patterns: Patterns, option: str) -> List[str]:
    """The names (in their order) that match any of ``patterns``; a pattern matching none of them is
    an error naming ``option`` and the top-level names there are."""
    names = list(names)
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    for pattern in patterns:
        if not any(matches(n, pattern) for n in names):
            tops = sorted({n.split(".")[0] for n in names})
            raise ValueError(f"{option} pattern {pattern!r} matches no parameter; top-level names: {tops} "
                             "(a bare name such as 'head' means 'head' and 'head.*'; '*' crosses dots)")
    return [n for n in names if any(matches(n, p) for p in patterns)]


def parameter_aliases(model: torch.nn.Module) -> dict:
    """{name: canonical name} for every parameter name, tied weights (e.g. an LM head sharing the
    embedding matrix) mapping to the first name that holds the same tensor."""
    first: dict = {}
    return {name: first.setdefault(id(p), name) for name, p in model.named_parameters(remove_duplicate=False)}


def as_dtype(dtype) -> Optional[torch.dtype]:
    """None, a torch dtype, or its name ('bfloat16', 'bf16', 'float16', 'fp16', 'float32', ...)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "fp64": "float64"}.get(str(dtype), str(dtype))
    found = getattr(torch, name.replace("torch.", ""), None)
    if not isinstance(found, torch.dtype) or not found.is_floating_point:
        raise ValueError(f"dtype {dtype!r}: use a floating-point dtype name such as 'bfloat16', 'float16' or 'float32'")
    return found


def compile_key_map(key_map: Optional[KeyMap]) -> List[Tuple[re.Pattern, Optional[str]]]:
    out = []
    for entry in key_map or ():
        if isinstance(entry, str) or len(entry) != 2:
            raise ValueError(f"experiment.key_map entry {entry!r}: each entry is a pair (regex, replacement), "
                             r"e.g. (r'^backbone\.vocab_embed\.embedding$', 'backbone.vocab_embed')")
        try:
            out.append((re.compile(entry[0]), entry[1]))
        except re.error as err:
            raise ValueError(f"experiment.key_map pattern {entry[0]!r} is not a valid regex: {err}") from None
    return out


def map_key(key: str, key_map: Sequence[Tuple[re.Pattern, Optional[str]]]) -> Optional[str]:
    """``key`` through each (regex, replacement) in order (``re.sub``); None: dropped by a rule whose replacement is None."""
    for rx, repl in key_map:
        if repl is None:
            if rx.search(key):
                return None
        else:
            key = rx.sub(repl, key)
    return key


# ---------------------------------------------------------------------------------------- paths
def resolve_weights_path(path: str) -> str:
    """A weights file, index or directory (relative paths also against the repository root) → the
    file to read: the path itself, or the directory's weights.safetensors, model.safetensors.index.json
    or model.safetensors."""
    from prism.paths import REPO_ROOT

    if not os.path.isabs(path) and not os.path.exists(path):
        path = os.path.join(REPO_ROOT, path)
    if os.path.isdir(path):
        inside = [os.path.join(path, n) for n in (WEIGHTS, HF_INDEX, HF_WEIGHTS)]
        path = next((p for p in inside if os.path.exists(p)), inside[0])
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"checkpoint weights {path} not found. Point experiment.init_checkpoint at a .safetensors file, a "
            "sharded model's directory (model.safetensors.index.json) or a run's checkpoints/step_XXXXXXXX "
            "directory (train one with `python run.py train gin/sudoku/mdm.gin`)."
        )
    return path


def weight_files(path: str) -> List[str]:
    """The safetensors files behind a resolved path: the file itself, or the shards its index names."""
    if not path.endswith(".json"):
        return [path]
    with open(path) as f:
        shards = list(dict.fromkeys(json.load(f)["weight_map"].values()))
    files = [os.path.join(os.path.dirname(path), s) for s in shards]
    absent = [f for f in files if not os.path.exists(f)]
    if absent:
        raise FileNotFoundError(f"{path} names shards that are not there: {absent[:4]}")
    return files


def file_metadata(path: str) -> dict:
    with safe_open(weight_files(path)[0], framework="pt") as f:
        return f.metadata() or {}


def read_layout(files: Sequence[str], key_map) -> Dict[str, Tuple[tuple, str, str]]:
    """{model name: (shape, file, checkpoint key)} from the files' headers only (no tensor is read)."""
    found: Dict[str, Tuple[tuple, str, str]] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                name = map_key(key, key_map)
                if name is None:
                    continue
                if name in found:
                    raise ValueError(f"checkpoint keys {found[name][2]!r} and {key!r} both become {name!r}: check experiment.key_map")
                found[name] = (tuple(f.get_slice(key).get_shape()), file, key)
    return found


# ------------------------------------------------------------------------------------- reading
@torch.no_grad()
def load_weights(model: torch.nn.Module, path: str, new_modules: Patterns = (), *, key_map: Optional[KeyMap] = None,
                 dtype=None, adapter: bool = False) -> str:
    """Load safetensors weights into ``model``; returns the file read.

    Strict: a checkpoint that does not fit fails with the missing, unexpected and mis-shaped names
    (after ``key_map``), and the model is left untouched. ``new_modules``: patterns of names that may
    be missing (``experiment.init_new``, e.g. ``['head']``): they keep their initialisation.
    ``adapter``: the file holds only some weights (the rest came from elsewhere); every key in it must
    still name a parameter. ``dtype``: cast the model's floating-point weights first (None: keep them)."""
    path, key_map, dtype = resolve_weights_path(path), compile_key_map(key_map), as_dtype(dtype)
    files = weight_files(path)
    found = read_layout(files, key_map)
    own = model.state_dict()
    canon = parameter_aliases(model)  # tied weights are stored once, under any of their names
    have = {canon.get(n, n) for n in found if n in own}
    allowed = set(own) if adapter else set(select(own, new_modules, "experiment.init_new") if new_modules else ())
    missing = sorted(n for n in own if canon.get(n, n) not in have and n not in allowed)
    unexpected = sorted(n if found[n][2] == n else f"{n} (key {found[n][2]})" for n in found if n not in own)
    shapes = sorted(f"{n}: checkpoint {found[n][0]} vs model {tuple(own[n].shape)}"
                    for n in found if n in own and found[n][0] != tuple(own[n].shape))
    if adapter and not found:
        raise ValueError(f"adapter file {path} holds no weights")
    if missing or unexpected or shapes:
        raise ValueError(mismatch_message(path, missing, unexpected, shapes, adapter))
    if dtype is not None:
        model.to(dtype=dtype)
        own = model.state_dict()
    for file in files:  # read (and cast) straight into the model's own storage: no second copy of anything
        def target(key, shape, _):
            name = map_key(key, key_map)
            if name is None:
                return None
            dest = own[name]
            return dest if dest.device.type == "cpu" and dest.is_contiguous() else torch.empty_like(dest, device="cpu")

        for key, tensor in iter_tensors(file, target):
            dest = own[map_key(key, key_map)]
            if tensor is not dest:
                dest.copy_(tensor)
    return path


def load_adapter(model: torch.nn.Module, path: str, *, key_map: Optional[KeyMap] = None, dtype=None) -> str:
    """Load an adapter-only file (``save_adapter``) onto a model whose other weights came from
    elsewhere; an adapter key that names no parameter of the model is an error."""
    return load_weights(model, path, key_map=key_map, dtype=dtype, adapter=True)


def mismatch_message(path: str, missing: List[str], unexpected: List[str], shapes: List[str], adapter: bool) -> str:
    def show(names):
        return f"{names[:8]}" + (f" (+{len(names) - 8} more)" if len(names) > 8 else "")

    if adapter:
        return (f"adapter {path} does not fit the model. keys that match no parameter: {show(unexpected)}; shape "
                f"mismatches: {show(shapes)}. Check the adapter's target modules (and experiment.key_map).")
    msg = (f"checkpoint {path} does not match the model. missing: {show(missing)}; unexpected: {show(unexpected)}; "
           f"shape mismatches: {show(shapes)}. Check the backbone preset and sizes in the gin files against the "
           "ones the checkpoint was trained with (its recipe gin file).")
    if missing and not unexpected:
        if ADAPTER_KEY in file_metadata(path):
            msg += " This file is adapter-only: load the base weights first and the file with experiment.init_adapter."
        else:
            msg += (f" To start the new modules {sorted({m.split('.')[0] for m in missing})} from their initialisation, "
                    "list them in experiment.init_new (e.g. experiment.init_new = ['head']).")
    elif missing and unexpected:
        msg += (" If the checkpoint names the same weights differently (e.g. MDLM's backbone.vocab_embed.embedding "
                r"for backbone.vocab_embed), rename its keys with experiment.key_map = [(r'^regex$', 'replacement')]; "
                "a replacement None drops a key.")
    return msg


# ------------------------------------------------------------------------------------- writing
def write_safetensors(tensors: Dict[str, torch.Tensor], path: str, metadata: Optional[dict] = None) -> None:
    """Atomic: written to a temporary file beside ``path`` and renamed into place; on any failure the
    temporary file is removed and ``path`` (old content or none) is untouched. Missing parent
    folders are made (``convert mdlm.ckpt runs/x.safetensors`` in a fresh clone has no runs/)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    try:
        save_file(tensors, tmp, metadata={"format": "pt", **(metadata or {})})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _cast(t: torch.Tensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def save_weights(state: Dict[str, torch.Tensor], model: Optional[torch.nn.Module], path: str, *, dtype=None,
                 only: Optional[Patterns] = None) -> List[str]:
    """Write a state dict as safetensors, atomically, each tied tensor once (safetensors refuses shared
    memory; ``model`` tells which names are tied). ``dtype`` casts floating-point tensors; ``only``:
    patterns of the names to keep (an adapter-only file, marked as such). Returns the names written."""
    canon = parameter_aliases(model) if model is not None else {}
    if only is not None:
        chosen = select(state, only, "adapter")
        names = list(dict.fromkeys(canon.get(n, n) if canon.get(n, n) in state else n for n in chosen))
    else:
        names = [n for n in state if canon.get(n, n) == n or canon.get(n, n) not in state]
    dtype = as_dtype(dtype)
    tensors = {n: _cast(state[n].detach(), dtype).contiguous().cpu() for n in names}
    only = [only] if isinstance(only, str) else only
    write_safetensors(tensors, path, {ADAPTER_KEY: json.dumps(list(only))} if only is not None else None)
    return names


def save_adapter(model: torch.nn.Module, path: str, patterns: Patterns, *, dtype=None) -> List[str]:
    """Only the weights matching ``patterns`` (e.g. ``['head.*', '*lora_*']``); ``load_adapter`` reads them back."""
    return save_weights(model.state_dict(), model, path, dtype=dtype, only=patterns)


def copy_weights(src: str, out: str, *, only: Optional[Patterns] = None, dtype=None) -> None:
    """``src``'s weights (a file, directory or sharded index) as one file ``out``, atomically: a byte
    copy, or (with ``only`` / ``dtype``, or several shards) read tensor by tensor and rewritten."""
    src = resolve_weights_path(src)
    files = weight_files(src)
    if only is None and dtype is None and len(files) == 1:
        shutil.copyfile(files[0], out + ".tmp")
        os.replace(out + ".tmp", out)
        return
    layout = read_layout(files, [])
    keep = set(select(layout, only, "prism.export --only") if only is not None else layout)
    tensors = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                if key in keep:
                    tensors[key] = _cast(f.get_tensor(key), as_dtype(dtype))
    only = [only] if isinstance(only, str) else only
    write_safetensors(tensors, out, {ADAPTER_KEY: json.dumps(list(only))} if only is not None else file_metadata(src))
