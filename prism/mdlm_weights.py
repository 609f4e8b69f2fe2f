r"""MDLM's released weights (Sahoo et al. 2024, kuleshov-group/mdlm) in PRISM's ``models.mdm`` with
``backbones.dit``, and PRISM's DiT weights back in MDLM's layout.

Two layouts are released, with the same parameter names:

- the Hugging Face model ``kuleshov-group/mdlm-owt`` (``model.safetensors``): keys ``backbone.<MDLM DIT
  name>``, plus the persistent rotary buffer ``backbone.rotary_emb.inv_freq``;
- the Lightning ``.ckpt`` of MDLM's training code: ``state_dict`` (the same ``backbone.*`` keys, noise
  schedule keys ``noise.*`` if any) and ``ema = {decay, num_updates, shadow_params}``, where
  ``shadow_params`` is a list (no names) over ``chain(backbone.parameters(), noise.parameters())``;
  MDLM samples and evaluates with these EMA values unless ``eval.disable_ema``.

PRISM's names differ in one place: MDLM's ``vocab_embed`` is a module holding ``embedding``, PRISM's
``vocab_embed`` is the Parameter itself. Every other parameter name (``sigma_map.mlp.{0,2}``,
``blocks.i.{norm1, attn_qkv, attn_out, norm2, mlp.{0,2}, adaLN_modulation}``, ``output_layer.{norm_final,
linear, adaLN_modulation}``) is the same; the rotary table is a non-persistent buffer in PRISM
(recomputed from the head size) and is dropped.

Use from gin, for the Hugging Face layout::

    experiment.init_checkpoint = '/path/to/mdlm-owt'     # the directory or its model.safetensors
    experiment.key_map = %MDLM_KEY_MAP                    # or @mdlm_key_map()
    backbones.dit.preset = 'small'                        # 768 wide, 12 blocks, cond 128
    # vocab 50258 (GPT-2 + mask id 50257); MDLM-OWT has time_conditioning False (PRISM's default)

or the same pairs as a literal: ``experiment.key_map = [(r'^backbone\.vocab_embed\.embedding$',
'backbone.vocab_embed'), (r'^backbone\.rotary_emb\.inv_freq$', None), (r'^noise\.', None)]``.

For a Lightning ``.ckpt``, convert once into PRISM's layout (EMA values by default) and point
``experiment.init_checkpoint`` at the result, with no key map::

    python -m prism.mdlm_weights convert last.ckpt mdlm.safetensors [--no-ema] [--dtype bfloat16]

(``convert`` also takes the Hugging Face file or directory.) From Python: ``load_mdlm_lightning(model,
path, use_ema=True)``; ``save_mdlm_hf(model, path)`` writes a PRISM DiT MDM in the Hugging Face layout.

MDLM's parameter order (registration order of its ``DIT.__init__``, which ``backbone.parameters()``
follows; ``rotary_emb`` holds only a buffer, dropout modules nothing, the log-linear noise schedule no
parameter) is, for ``n`` blocks, ``10 n + 10`` tensors::

    0       vocab_embed.embedding
    1-4     sigma_map.mlp.0.weight, sigma_map.mlp.0.bias, sigma_map.mlp.2.weight, sigma_map.mlp.2.bias
    5+10i.. blocks.i.norm1.weight, .attn_qkv.weight, .attn_out.weight, .norm2.weight, .mlp.0.weight,
            .mlp.0.bias, .mlp.2.weight, .mlp.2.bias, .adaLN_modulation.weight, .adaLN_modulation.bias
    5+10n.. output_layer.norm_final.weight, .linear.weight, .linear.bias, .adaLN_modulation.weight,
            .adaLN_modulation.bias

(``mdlm_layout``; 130 tensors for MDLM-OWT.)
"""
from __future__ import annotations

import argparse
import os
import pickle
import re
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import gin
import torch

from prism.checkpoint import (as_dtype, compile_key_map, map_key, resolve_weights_path, select, weight_files,
                              write_safetensors)

# (regex, replacement) pairs from MDLM's names (Hugging Face file or Lightning state_dict) to PRISM's.
MDLM_KEY_MAP: List[Tuple[str, Optional[str]]] = [
    (r"^backbone\.vocab_embed\.embedding$", "backbone.vocab_embed"),
    (r"^backbone\.rotary_emb\.inv_freq$", None),  # persistent in MDLM, recomputed in PRISM
    (r"^noise\.", None),  # the noise schedule's entries (the log-linear schedule has none)
]
# The inverse, from PRISM's names to MDLM's (both layouts).
PRISM_TO_MDLM_KEY_MAP: List[Tuple[str, Optional[str]]] = [
    (r"^backbone\.vocab_embed$", "backbone.vocab_embed.embedding"),
]
ROTARY_KEY = "backbone.rotary_emb.inv_freq"


def mdlm_key_map() -> List[Tuple[str, Optional[str]]]:
    """``MDLM_KEY_MAP`` (gin: ``experiment.key_map = @mdlm_key_map()``)."""
    return list(MDLM_KEY_MAP)


if __name__ != "__main__":  # ``python -m prism.mdlm_weights`` runs this file as __main__ too: register once
    gin.constant("MDLM_KEY_MAP", tuple(MDLM_KEY_MAP))
    gin.configurable("mdlm_key_map", module="checkpoint")(mdlm_key_map)


# --------------------------------------------------------------------------------------- layout
def mdlm_layout(n_blocks: int, vocab_size: int = 50258, hidden_size: int = 768, cond_dim: int = 128,
                mlp_ratio: int = 4, frequency_size: int = 256) -> Dict[str, Tuple[int, ...]]:
    """MDLM's DiT parameters as its Lightning module names them (``backbone.`` prefix), in MDLM's
    registration order (the order of ``backbone.parameters()`` and so of ``ema.shadow_params``), with
    their shapes. Defaults: MDLM-OWT's sizes."""
    D, C, H = hidden_size, cond_dim, mlp_ratio * hidden_size
    out: Dict[str, Tuple[int, ...]] = {
        "backbone.vocab_embed.embedding": (vocab_size, D),
        "backbone.sigma_map.mlp.0.weight": (C, frequency_size),
        "backbone.sigma_map.mlp.0.bias": (C,),
        "backbone.sigma_map.mlp.2.weight": (C, C),
        "backbone.sigma_map.mlp.2.bias": (C,),
    }
    for i in range(n_blocks):
        p = f"backbone.blocks.{i}."
        out.update({
            p + "norm1.weight": (D,),
            p + "attn_qkv.weight": (3 * D, D),
            p + "attn_out.weight": (D, D),
            p + "norm2.weight": (D,),
            p + "mlp.0.weight": (H, D),
            p + "mlp.0.bias": (H,),
            p + "mlp.2.weight": (D, H),
            p + "mlp.2.bias": (D,),
            p + "adaLN_modulation.weight": (6 * D, C),
            p + "adaLN_modulation.bias": (6 * D,),
        })
    out.update({
        "backbone.output_layer.norm_final.weight": (D,),
        "backbone.output_layer.linear.weight": (vocab_size, D),
        "backbone.output_layer.linear.bias": (vocab_size,),
        "backbone.output_layer.adaLN_modulation.weight": (2 * D, C),
        "backbone.output_layer.adaLN_modulation.bias": (2 * D,),
    })
    return out


def mdlm_parameter_names(n_blocks: int) -> List[str]:
    """MDLM's parameter names in ``ema.shadow_params`` order (position i ↔ name i)."""
    return list(mdlm_layout(n_blocks, 1, 1, 1))


def to_prism_names(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """MDLM names → PRISM's (``MDLM_KEY_MAP``; the rotary buffer and noise entries dropped)."""
    rules = compile_key_map(MDLM_KEY_MAP)
    out = {}
    for key, value in state.items():
        name = map_key(key, rules)
        if name is not None:
            out[name] = value
    return out


def mdlm_hf_state(model: torch.nn.Module, rotary: bool = True) -> Dict[str, torch.Tensor]:
    """A PRISM ``models.mdm`` with ``backbones.dit`` as MDLM's state dict (the Hugging Face / Lightning
    names), with the rotary buffer MDLM keeps (``rotary=True``). Only the backbone: a head or critic
    has no place in MDLM's layout and is an error, as is a DiT with position-group embeddings."""
    rules = compile_key_map(PRISM_TO_MDLM_KEY_MAP)
    extra = [n for n in model.state_dict() if not n.startswith("backbone.") or ".group_embed." in n]
    if extra:
        raise ValueError(f"MDLM's layout has only the DiT backbone; the model also has {extra[:8]}")
    state = {map_key(n, rules): t.detach() for n, t in model.state_dict().items()}
    if rotary:
        state[ROTARY_KEY] = model.backbone.rotary.inv_freq.detach().float()
    return state


def save_mdlm_hf(model: torch.nn.Module, path: str, dtype=None) -> List[str]:
    """Write ``model`` as MDLM's ``model.safetensors`` (atomic); returns the keys written."""
    dtype = as_dtype(dtype)
    state = {k: (v.to(dtype) if dtype is not None and k != ROTARY_KEY else v).contiguous().cpu()
             for k, v in mdlm_hf_state(model).items()}
    write_safetensors(state, path)
    return list(state)


# ---------------------------------------------------------------------------- Lightning .ckpt
class Opaque:
    """Stands in for a pickled object whose class this reader does not import (omegaconf's ``DictConfig``
    in MDLM's ``hyper_parameters``, a tokenizer, Lightning's loop state): its constructor arguments and
    pickled state are kept as plain data in ``args`` and ``state``; no code of its class runs."""

    def __init__(self, *args, **kwargs):
        self.args, self.state = args, None

    def __setstate__(self, state):
        self.state = state


# what a tensor checkpoint needs from the pickle, and nothing that runs code of the file's choosing
_ALLOWED = {("collections", "OrderedDict"), ("builtins", "set"), ("builtins", "frozenset"), ("builtins", "slice"),
            ("builtins", "complex"), ("builtins", "bytearray"), ("copyreg", "_reconstructor"),
            ("torch._utils", "_rebuild_tensor_v2"), ("torch._utils", "_rebuild_parameter"),
            ("torch._utils", "_rebuild_parameter_with_state"), ("torch", "Size"), ("torch", "device"),
            ("torch.serialization", "_get_layout"), ("torch", "float32"), ("torch", "bfloat16"), ("torch", "float16"),
            ("torch", "float64"), ("torch", "int64"), ("torch", "int32"), ("torch", "bool")}


class _OpaqueUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) in _ALLOWED or (module == "torch" and name.endswith("Storage")):
            return super().find_class(module, name)
        return type(name, (Opaque,), {"__module__": f"prism.opaque.{module}"})


class _OpaquePickle:
    """A ``pickle_module`` for ``torch.load``: tensors as usual, every other class an ``Opaque``."""

    Unpickler = _OpaqueUnpickler
    __name__ = "prism_opaque_pickle"

    @staticmethod
    def load(f, **kwargs):
        return _OpaqueUnpickler(f, **kwargs).load()


def read_lightning(path: str) -> dict:
    """``torch.load`` of a Lightning checkpoint on the CPU. Tensor-only pickles load with
    ``weights_only=True``; MDLM's real checkpoints also pickle omegaconf objects (``hyper_parameters``,
    a ``DictConfig``) and more, which that refuses: those are read with an unpickler that rebuilds
    tensors and turns every other class into an ``Opaque`` record, so neither omegaconf nor any code
    named by the file is imported or run (the weights are all this reader needs)."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"MDLM checkpoint {path} not found")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, pickle_module=_OpaquePickle)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        keys = sorted(ckpt) if isinstance(ckpt, dict) else type(ckpt).__name__
        raise ValueError(f"{path} is not a Lightning checkpoint: no 'state_dict' entry (found {keys})")
    return ckpt


def n_blocks_of(state: Dict[str, torch.Tensor], source: str) -> int:
    found = {int(m.group(1)) for k in state if (m := re.match(r"^backbone\.blocks\.(\d+)\.", k))}
    if not found or found != set(range(max(found) + 1)):
        raise ValueError(f"{source}: the backbone.blocks.* keys do not number blocks 0..n-1 (found {sorted(found)}); "
                         "is this MDLM's DiT (config.backbone = 'dit')?")
    return max(found) + 1


def lightning_state(ckpt: dict, use_ema: bool = True, source: str = "checkpoint"
                    ) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """PRISM-named weights from a Lightning checkpoint dict, and the keys of its ``state_dict`` left
    out (not under ``backbone.``: the noise schedule's, any others). With ``use_ema`` each backbone
    parameter is replaced by ``ema.shadow_params`` at its position in MDLM's order (``mdlm_layout``);
    the list's length and every tensor's shape are checked against that order first."""
    sd = ckpt["state_dict"]
    backbone = {k: v for k, v in sd.items() if k.startswith("backbone.")}
    dropped = [k for k in sd if not k.startswith("backbone.")]
    if use_ema:
        ema = ckpt.get("ema")
        if not isinstance(ema, dict) or "shadow_params" not in ema:
            raise ValueError(f"{source} has no ema.shadow_params (MDLM trained with training.ema = 0?); "
                             "use its state_dict with use_ema=False (convert --no-ema)")
        n = n_blocks_of(backbone, source)
        names = mdlm_parameter_names(n)
        shadow = list(ema["shadow_params"])
        if len(shadow) != len(names):
            raise ValueError(
                f"{source}: ema.shadow_params has {len(shadow)} tensors, expected {len(names)} (MDLM's DiT with {n} "
                f"blocks has 10*{n}+10 = {len(names)} parameters and the log-linear noise schedule none); found "
                f"{len(shadow)}. A checkpoint of another architecture or a noise schedule with parameters is not "
                "supported; use_ema=False (convert --no-ema) reads its state_dict instead")
        absent = [k for k in names if k not in backbone]
        if absent:
            raise ValueError(f"{source}: state_dict lacks MDLM parameters {absent[:8]}; cannot place ema.shadow_params")
        for i, (name, tensor) in enumerate(zip(names, shadow)):
            if tuple(tensor.shape) != tuple(backbone[name].shape):
                raise ValueError(f"{source}: ema.shadow_params[{i}] has shape {tuple(tensor.shape)}, but position {i} "
                                 f"of MDLM's order is {name} with shape {tuple(backbone[name].shape)}")
            backbone[name] = tensor
    return to_prism_names(backbone), dropped


@torch.no_grad()
def load_state(model: torch.nn.Module, state: Dict[str, torch.Tensor], source: str, new_modules=()) -> None:
    """Copy PRISM-named tensors into ``model``, strictly as ``prism.checkpoint.load_weights``: missing,
    unexpected and mis-shaped names are all reported, and the model is untouched on an error."""
    own = model.state_dict()
    allowed = set(select(own, new_modules, "experiment.init_new")) if new_modules else set()
    missing = sorted(n for n in own if n not in state and n not in allowed)
    unexpected = sorted(n for n in state if n not in own)
    shapes = sorted(f"{n}: checkpoint {tuple(state[n].shape)} vs model {tuple(own[n].shape)}"
                    for n in state if n in own and tuple(state[n].shape) != tuple(own[n].shape))
    if missing or unexpected or shapes:
        def show(names):
            return f"{names[:8]}" + (f" (+{len(names) - 8} more)" if len(names) > 8 else "")
        raise ValueError(f"MDLM checkpoint {source} does not match the model. missing: {show(missing)}; unexpected: "
                         f"{show(unexpected)}; shape mismatches: {show(shapes)}. MDLM-OWT is backbones.dit.preset = "
                         "'small' with vocab_size 50258 (mask id 50257); new modules (e.g. a quality head) go in "
                         "experiment.init_new.")
    for name, tensor in state.items():
        own[name].copy_(tensor)


def load_mdlm_lightning(model: torch.nn.Module, path: str, use_ema: bool = True, new_modules=()) -> List[str]:
    """Load MDLM's Lightning ``.ckpt`` into a PRISM DiT MDM (EMA weights by default, as MDLM samples);
    returns the state_dict keys left out (not under ``backbone.``)."""
    state, dropped = lightning_state(read_lightning(path), use_ema, path)
    load_state(model, state, path, new_modules)
    return dropped


def read_hf(path: str) -> Dict[str, torch.Tensor]:
    """MDLM's Hugging Face weights (file, directory or sharded index), PRISM-named."""
    from safetensors.torch import load_file

    state: Dict[str, torch.Tensor] = {}
    for file in weight_files(resolve_weights_path(path)):
        state.update(load_file(file))
    return to_prism_names(state)


def convert(src: str, out: str, use_ema: bool = True, dtype=None) -> Dict[str, object]:
    """MDLM weights (a Lightning ``.ckpt``, or the Hugging Face file / directory) → one safetensors
    file in PRISM's layout (atomic), for ``experiment.init_checkpoint`` with no key map."""
    dropped: List[str] = []
    if src.endswith(".ckpt") or (os.path.isfile(src) and not src.endswith((".safetensors", ".json"))):
        state, dropped = lightning_state(read_lightning(src), use_ema, src)
        kind = "lightning-ema" if use_ema else "lightning-state_dict"
    else:
        state, kind = read_hf(src), "huggingface"
    dtype = as_dtype(dtype)
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).contiguous() for k, v in state.items()}
    write_safetensors(tensors, out, {"converted_from": os.path.basename(os.path.normpath(src)), "mdlm_source": kind})
    return {"out": out, "source": kind, "tensors": len(tensors),
            "parameters": sum(t.numel() for t in tensors.values()), "dropped": dropped}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(prog="python -m prism.mdlm_weights", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    conv = sub.add_parser("convert", help="MDLM weights (.ckpt or Hugging Face) -> PRISM's layout (.safetensors)")
    conv.add_argument("src", help="MDLM's Lightning .ckpt, or mdlm-owt's model.safetensors / its directory")
    conv.add_argument("out", help="the .safetensors file to write (experiment.init_checkpoint, no key map)")
    conv.add_argument("--no-ema", dest="use_ema", action="store_false",
                      help="a .ckpt's raw state_dict instead of its EMA weights (MDLM samples with the EMA)")
    conv.add_argument("--dtype", default=None, help="cast floating-point weights, e.g. bfloat16")
    args = parser.parse_args(argv)
    info = convert(args.src, args.out, use_ema=args.use_ema, dtype=args.dtype)
    print(f"wrote {info['out']}: {info['tensors']} tensors, {info['parameters']:,} parameters from {info['source']}"
          + (f"; left out {info['dropped']}" if info["dropped"] else ""))
    return info


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
