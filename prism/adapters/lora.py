r"""``adapters.lora``: LoRA (Hu et al. 2021) on the backbone's linear layers, through peft's low-level
``inject_adapter_in_model`` (no ``PeftModel`` wrapper: the MDM stays an MDM).

    experiment.adapter = @adapters.lora()
    adapters.lora.rank = 256                                   # PRISM's LLaDA recipe: r = alpha = 256,
    adapters.lora.alpha = 256                                  # q/k/v projections, dropout 0.1
    adapters.lora.dropout = 0.1
    adapters.lora.target_modules = ['q_proj', 'k_proj', 'v_proj']   # ['attn_qkv'] for backbones.dit

A target is a module-name suffix as peft takes it: ``'q_proj'`` names every module called ``q_proj``
or ending in ``.q_proj``; a full name (``'blocks.0.attn_qkv'``) names one module. Targets are checked
before anything is injected: a name that matches no module, or matches a module that is not a linear
layer, is an error listing the backbone's linear layers. The output layer (the vocabulary projection)
is adapted only when named in full. Each adapted layer computes W·x + (alpha / rank)·B·A·dropout(x);
B starts at zero, so the injected model computes exactly what the base did. Dropout acts only in
training mode. ``dtype``: the LoRA weights' dtype (default float32, also on a bfloat16 base: peft
casts the layer input to it and the result back).

After ``apply`` the base is frozen; ``prism.experiment.build_experiment`` then trains the LoRA
weights and the quality head (``experiment.trainable`` overrides). ``merged_state_dict`` /
``merge_lora`` fold the adapter into plain weights (W + (alpha / rank)·B·A) that load into the same
model built without an adapter.
"""
from __future__ import annotations

import re
import sys
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import nn

from registry import ADAPTERS  # (registry/__init__.py does not re-export it yet)

ADAPTER_NAME = "default"


def lora_layers(module: nn.Module) -> Dict[str, nn.Module]:
    """{name: peft LoRA layer} of ``module`` (empty without importing peft when it was never loaded)."""
    if "peft" not in sys.modules:
        return {}
    from peft.tuners.lora import LoraLayer

    return {name: m for name, m in module.named_modules() if isinstance(m, LoraLayer)}


def lora_parameter_names(model: nn.Module) -> List[str]:
    """The names of ``model``'s LoRA weights (``...lora_A.default.weight``, ``...lora_B.default.weight``)."""
    layers = lora_layers(model)
    prefixes = tuple(f"{name}.lora_" for name in layers)
    return [n for n, _ in model.named_parameters() if prefixes and n.startswith(prefixes)]


def names_match(name: str, target: str) -> bool:
    """peft's rule for a list of target names: the module's full name, or a suffix after a dot."""
    return name == target or name.endswith("." + target)


def short_name(name: str) -> str:
    """The suffix a target would use: the last part of a module name, two parts when the last is an
    index (``blocks.3.q_proj`` → ``q_proj``, ``blocks.0.mlp.2`` → ``mlp.2``)."""
    parts = name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def output_layer_names(module: nn.Module) -> List[str]:
    """The names of the vocabulary projections in ``module``: what a transformers model's
    ``get_output_embeddings()`` returns, and any linear layer with ``vocab_size`` outputs."""
    vocab = getattr(module, "vocab_size", None)
    heads = set()
    for m in module.modules():
        get = getattr(m, "get_output_embeddings", None)
        if callable(get):
            try:
                found = get()
            except Exception:  # a model without output embeddings may raise (NotImplementedError, ...)
                found = None
            if isinstance(found, nn.Module):
                heads.add(id(found))
    return [name for name, m in module.named_modules() if name and (id(m) in heads or (
        isinstance(m, nn.Linear) and vocab is not None and m.out_features == vocab))]


def _as_list(value, option: str) -> List[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    out = list(value)
    if not all(isinstance(v, str) for v in out):
        raise TypeError(f"adapters.lora.{option} must be a list of module names, got {value!r}")
    return out


def choose_modules(module: nn.Module, targets: Sequence[str], exclude: Sequence[str] = ()) -> List[str]:
    """The full names of the linear layers of ``module`` that ``targets`` name (less ``exclude``), after
    checking every name: each must match at least one module, only linear layers, and the output layer
    only when named in full."""
    linear = [name for name, m in module.named_modules() if name and isinstance(m, nn.Linear)]
    every = [name for name, _ in module.named_modules() if name]
    outputs = set(output_layer_names(module))
    known = sorted({short_name(n) for n in linear if n not in outputs})

    def listing() -> str:
        shown = ", ".join(repr(k) for k in known) or "(none)"
        out = f"; the output layer (adapted only when named in full): {sorted(outputs)}" if outputs else ""
        return f"the backbone's linear layers: {shown}{out}"

    if not targets:
        raise ValueError(f"adapters.lora.target_modules is empty: name the layers to adapt, e.g. "
                         f"adapters.lora.target_modules = ['q_proj', 'k_proj', 'v_proj']; {listing()}")
    chosen: List[str] = []
    for target in targets:
        hits = [n for n in every if names_match(n, target)]
        if not hits:
            raise ValueError(f"adapters.lora.target_modules: {target!r} matches no module; {listing()}")
        not_linear = [n for n in hits if n not in set(linear)]
        if not_linear:
            raise ValueError(f"adapters.lora.target_modules: {target!r} matches modules that are not linear layers "
                             f"({not_linear[:4]}); LoRA adapts linear layers only; {listing()}")
        refused = [n for n in hits if n in outputs and n != target]
        if refused:
            raise ValueError(f"adapters.lora.target_modules: {target!r} would adapt the output layer {refused} "
                             f"(the vocabulary projection); name it in full ({refused[0]!r}) to adapt it on purpose")
        chosen += [n for n in hits if n not in chosen]
    for name in exclude:
        dropped = [n for n in chosen if names_match(n, name)]
        if not dropped:
            raise ValueError(f"adapters.lora.exclude: {name!r} matches none of the targeted layers "
                             f"({sorted({short_name(n) for n in chosen})})")
        chosen = [n for n in chosen if n not in dropped]
    if not chosen:
        raise ValueError("adapters.lora.exclude removes every targeted layer: nothing would be adapted")
    return chosen


@ADAPTERS.register("lora")
class LoRA:
    """LoRA on the backbone (see the module docstring). ``rank`` r, ``alpha`` (default: = rank, a
    scale of 1), ``dropout`` on the adapter's input, ``target_modules`` (module-name suffixes),
    ``exclude`` (names taken out of what the targets match), ``dtype`` of the LoRA weights (None: the
    base layer's)."""

    def __init__(self, rank: int = 8, alpha: Optional[float] = None, dropout: float = 0.0,
                 target_modules: Union[str, Sequence[str], None] = None, exclude: Union[str, Sequence[str], None] = (),
                 dtype: Optional[str] = "float32"):
        if int(rank) < 1:
            raise ValueError(f"adapters.lora.rank must be a positive integer, got {rank}")
        if not 0.0 <= float(dropout) < 1.0:
            raise ValueError(f"adapters.lora.dropout must be in [0, 1), got {dropout}")
        self.rank, self.alpha, self.dropout = int(rank), float(rank if alpha is None else alpha), float(dropout)
        self.target_modules = _as_list(target_modules, "target_modules")
        self.exclude = _as_list(exclude, "exclude")
        from prism.checkpoint import as_dtype

        self.dtype = as_dtype(dtype)

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank

    def __repr__(self) -> str:
        return (f"LoRA(rank={self.rank}, alpha={self.alpha:g}, dropout={self.dropout:g}, "
                f"target_modules={self.target_modules}, exclude={self.exclude})")

    def apply(self, model: nn.Module) -> List[str]:
        """Inject LoRA into ``model.backbone`` (or ``model`` itself when it has no backbone), freeze
        the backbone's base weights; returns the names (within the backbone) of the adapted layers."""
        from peft import LoraConfig, inject_adapter_in_model

        module = getattr(model, "backbone", model)
        if lora_layers(module):
            raise ValueError("the backbone already holds LoRA layers: an adapter is applied once")
        chosen = choose_modules(module, self.target_modules, self.exclude)
        # a full-match regex of exactly the chosen names: peft adapts these and nothing else
        pattern = "(?:" + "|".join(re.escape(n) for n in chosen) + ")"
        config = LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=pattern,
                            bias="none", init_lora_weights=True)
        inject_adapter_in_model(config, module, adapter_name=ADAPTER_NAME)
        layers = lora_layers(module)
        if sorted(layers) != sorted(chosen):  # never expected: peft's matching and ours disagree
            raise RuntimeError(f"peft adapted {sorted(layers)[:6]}, expected {sorted(chosen)[:6]}")
        for layer in layers.values():
            if self.dtype is not None:
                layer.lora_A.to(dtype=self.dtype)
                layer.lora_B.to(dtype=self.dtype)
        module.train(module.training)  # the new layers (created in training mode) take the backbone's mode
        for name, p in module.named_parameters():
            p.requires_grad_(".lora_" in name and name.split(".lora_")[0] in layers)
        return chosen

    def trainable_names(self, model: nn.Module) -> List[str]:
        """What trains by default after ``apply``: the LoRA weights and the quality head (if any)."""
        names = lora_parameter_names(model)
        head = getattr(model, "head", None)
        if head is not None:
            names += [n for n, _ in model.named_parameters() if n.startswith("head.")]
        return names


# ---------------------------------------------------------------------------------------- merging
@torch.no_grad()
def delta_weight(layer: nn.Module) -> torch.Tensor:
    """(alpha / rank)·B·A of a LoRA layer (summed over its adapters), in float32, shaped as the base weight."""
    delta = None
    for name in layer.lora_A:
        part = layer.lora_B[name].weight.float() @ layer.lora_A[name].weight.float() * layer.scaling[name]
        if getattr(layer, "fan_in_fan_out", False):
            part = part.T
        delta = part if delta is None else delta + part
    return delta


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``model.state_dict()`` with every LoRA layer folded in: ``X.base_layer.weight`` becomes
    ``X.weight`` = W + (alpha / rank)·B·A (in the base weight's dtype), ``X.base_layer.bias`` becomes
    ``X.bias``, the LoRA weights are dropped. The names are those of the model without an adapter.
    The model itself is not changed."""
    layers = lora_layers(model)
    out: Dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if ".base_layer." in key and key.split(".base_layer.")[0] in layers:
            prefix, rest = key.split(".base_layer.", 1)
            if rest == "weight":
                value = (value.float() + delta_weight(layers[prefix]).to(value.device)).to(value.dtype)
            out[f"{prefix}.{rest}"] = value
        elif ".lora_" in key and key.split(".lora_")[0] in layers:
            continue
        else:
            out[key] = value
    return out


@torch.no_grad()
def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA layer of ``model`` into its base layer IN PLACE and put the base layer back in
    its place: the model then has the plain modules and names of one built without an adapter.
    Returns how many layers were merged."""
    layers = lora_layers(model)
    for name, layer in layers.items():
        base = layer.get_base_layer()
        base.weight.copy_((base.weight.float() + delta_weight(layer).to(base.weight.device)).to(base.weight.dtype))
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, base)
    for m in model.modules():
        if "peft_config" in vars(m):
            del m.peft_config
    return len(layers)
