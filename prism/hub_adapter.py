"""Adapters in the Hugging Face Hub's shape, and back.

A LoRA run's adapter-only checkpoint (``prism.checkpoint.save_adapter``: ``backbone....lora_A.default.weight``
and ``head.*``) becomes a folder that ``peft.PeftModel.from_pretrained(<released base model>, folder)``
loads, with the quality head beside it:

    adapter_config.json         peft's LoraConfig: r, lora_alpha, lora_dropout, target_modules, base model
    adapter_model.safetensors   base_model.model.<the released model's module name>.lora_{A,B}.weight
    quality_head.safetensors    the PRISM head (prism's names: head.*), for experiment.init_adapter
    README.md                   a model card: base model, recipe, the run's gin config, provenance
    prism_provenance.json       the step, the run's last metrics, versions, commit

The released model's module names are the backbone's own names rewritten by its ``released_names``
(strip, add) pair: LLaDA's are LLaDA's (``model.transformer.blocks.N.q_proj``), MDLM's DiT sits under
``backbone.`` in MDLM's Hub model, a transformers backbone drops its ``model.`` wrapper.
``load_adapter_any`` reads such a folder (a local path or a Hub id) back into an MDM whose LoRA layers
have the folder's rank and alpha, strictly; a plain adapter file goes to ``load_adapter`` as before.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from typing import Any, Dict, List, Optional, Tuple

import torch

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
HEAD_WEIGHTS, CARD, PROVENANCE = "quality_head.safetensors", "README.md", "prism_provenance.json"
LORA_KEY = re.compile(r"^backbone\.(.+)\.lora_([AB])\.default\.weight$")


def released_names(backbone: Any) -> Tuple[str, str]:
    """(strip, add): how a backbone's (an instance or class) own module names become the released model's
    (``Backbone.released_names``)."""
    return tuple(getattr(backbone, "released_names", ("", "")))


def to_released(name: str, names: Tuple[str, str]) -> str:
    strip, add = names
    if strip and not name.startswith(strip):
        raise ValueError(f"module {name!r} does not start with {strip!r}")
    return add + name[len(strip):]


def peft_state(adapter_state: Dict[str, torch.Tensor], names: Tuple[str, str]) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """peft's keys for the LoRA tensors of an adapter-only state, and the adapted modules' released names."""
    out, modules = {}, []
    for key, t in adapter_state.items():
        m = LORA_KEY.match(key)
        if m:
            module = to_released(m.group(1), names)
            out[f"base_model.model.{module}.lora_{m.group(2)}.weight"] = t
            if module not in modules:
                modules.append(module)
    if not out:
        raise ValueError("no LoRA weights (backbone.*.lora_A.default.weight) in the adapter: was the run trained "
                         "with experiment.adapter = @adapters.lora()?")
    return out, sorted(modules)


def lora_config(rank: int, alpha: float, dropout: float, modules: List[str], targets: List[str], exclude: List[str],
                base_model: Optional[str]) -> Dict[str, Any]:
    """peft's adapter_config.json: the user's targets when they name exactly the adapted layers (no
    ``exclude``), else the adapted layers' full names."""
    return {"peft_type": "LORA", "base_model_name_or_path": base_model, "r": int(rank), "lora_alpha": float(alpha),
            "lora_dropout": float(dropout), "target_modules": list(targets) if targets and not exclude else modules,
            "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True, "inference_mode": True,
            "modules_to_save": None, "task_type": None, "use_rslora": False, "use_dora": False,
            "layers_to_transform": None, "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {}}


def model_card(config: Dict[str, Any], gin_config: str, provenance: Dict[str, Any], has_head: bool) -> str:
    base = config["base_model_name_or_path"] or "(a base model built from the gin config below)"
    lines = ["---", "library_name: peft", *([f"base_model: {config['base_model_name_or_path']}"]
                                             if config["base_model_name_or_path"] else []),
             "tags: [prism, masked-diffusion, lora]", "---", "",
             "# A PRISM adapter", "",
             f"LoRA (r = {config['r']}, alpha = {config['lora_alpha']:g}, dropout = {config['lora_dropout']:g}) on "
             f"`{', '.join(config['target_modules'][:6])}`{' ...' if len(config['target_modules']) > 6 else ''} of "
             f"`{base}`" + (", and PRISM's quality head (`quality_head.safetensors`)" if has_head else "") +
             ", trained with prism (Kim et al. 2025, *Fine-Tuning Masked Diffusion for Provable Self-Correction*).",
             "", "```python", "from peft import PeftModel", f"model = PeftModel.from_pretrained(base_model, '<this folder or repo>')",
             "```", "", "In prism, with the head: `experiment.init_adapter = '<this folder or repo>'`.", "",
             "## Provenance", "", "```json", json.dumps({k: v for k, v in provenance.items() if "config" not in k},
                                                        indent=2, default=str), "```", "",
             "## The run's gin config", "", "```gin", gin_config.rstrip(), "```", ""]
    return "\n".join(lines)


def write_hub_folder(adapter_file: str, out: str, lora: Dict[str, Any], backbone: Any, base_model: Optional[str],
                     gin_config: str = "", provenance: Optional[Dict[str, Any]] = None, overwrite: bool = False) -> str:
    """The folder ``out`` from an adapter-only file and the run's LoRA settings (``rank``, ``alpha``,
    ``dropout``, ``target_modules``, ``exclude``); built beside ``out`` and renamed into place."""
    from safetensors.torch import load_file

    from prism.checkpoint import write_safetensors

    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} exists; choose another folder or remove it")
    state = load_file(adapter_file)
    tensors, modules = peft_state(state, released_names(backbone))
    config = lora_config(lora["rank"], lora.get("alpha") or lora["rank"], lora.get("dropout", 0.0), modules,
                         list(lora.get("target_modules") or []), list(lora.get("exclude") or []), base_model)
    head = {k: v for k, v in state.items() if k.startswith("head.")}
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(out)}.")
    try:
        write_safetensors(tensors, os.path.join(tmp, ADAPTER_WEIGHTS), {"format": "pt"})
        if head:
            from prism.checkpoint import ADAPTER_KEY

            write_safetensors(head, os.path.join(tmp, HEAD_WEIGHTS), {ADAPTER_KEY: json.dumps(["head"])})
        with open(os.path.join(tmp, ADAPTER_CONFIG), "w") as f:
            json.dump(config, f, indent=2)
        with open(os.path.join(tmp, PROVENANCE), "w") as f:
            json.dump(provenance or {}, f, indent=2, default=str)
        with open(os.path.join(tmp, CARD), "w") as f:
            f.write(model_card(config, gin_config, provenance or {}, bool(head)))
        if os.path.exists(out):
            shutil.rmtree(out)
        os.rename(tmp, out)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def is_hub_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.exists(os.path.join(path, ADAPTER_CONFIG))


def resolve_folder(path_or_id: str, revision: Optional[str] = None) -> str:
    """A local folder, or a Hub repository id downloaded (``huggingface_hub.snapshot_download``)."""
    if os.path.isdir(path_or_id):
        return path_or_id
    from huggingface_hub import snapshot_download

    return snapshot_download(path_or_id, revision=revision)


def load_hub_folder(model: torch.nn.Module, folder: str, backbone: Any) -> List[str]:
    """Load a Hub-shaped adapter folder into ``model`` (an MDM with LoRA layers of the folder's rank and
    alpha, and a head if the folder has one); strict: every LoRA key must name a LoRA weight."""
    from prism.adapters.lora import ADAPTER_NAME, lora_layers
    from prism.checkpoint import load_weights

    with open(os.path.join(folder, ADAPTER_CONFIG)) as f:
        config = json.load(f)
    if config.get("peft_type") != "LORA":
        raise ValueError(f"{folder}: peft_type {config.get('peft_type')!r}; only LoRA adapters load here")
    layers = lora_layers(getattr(model, "backbone", model))
    if not layers:
        raise ValueError(f"{folder} is a LoRA adapter but the model has no LoRA layers: set experiment.adapter = "
                         f"@adapters.lora() with adapters.lora.rank = {config['r']}, adapters.lora.alpha = "
                         f"{config['lora_alpha']:g}")
    layer = next(iter(layers.values()))
    have = (layer.r[ADAPTER_NAME], float(layer.lora_alpha[ADAPTER_NAME]))
    if have != (int(config["r"]), float(config["lora_alpha"])):
        raise ValueError(f"{folder}: r = {config['r']}, lora_alpha = {config['lora_alpha']:g}, but the model's LoRA has "
                         f"r = {have[0]}, alpha = {have[1]:g}: set adapters.lora.rank / alpha to match")
    strip, add = released_names(backbone)
    key_map = [(rf"^base_model\.model\.{re.escape(add)}(.+)\.lora_([AB])\.weight$",
                rf"backbone.{strip}\1.lora_\2.{ADAPTER_NAME}.weight")]
    loaded = [load_weights(model, os.path.join(folder, ADAPTER_WEIGHTS), key_map=key_map, adapter=True)]
    if os.path.exists(os.path.join(folder, HEAD_WEIGHTS)):
        loaded.append(load_weights(model, os.path.join(folder, HEAD_WEIGHTS), adapter=True))
    return loaded


def load_adapter_any(model: torch.nn.Module, path: str, key_map=None) -> List[str]:
    """``experiment.init_adapter``: an adapter-only file (``prism.checkpoint.load_adapter``), a Hub-shaped
    folder (``load_hub_folder``), or a Hub repository id holding one (downloaded)."""
    from prism.checkpoint import load_adapter

    backbone = getattr(model, "backbone", model)
    if is_hub_folder(path):
        return load_hub_folder(model, path, backbone)
    if os.path.exists(path) or not re.fullmatch(r"[\w.-]+/[\w.-]+", path) or path.endswith(".safetensors"):
        return [load_adapter(model, path, key_map=key_map)]
    try:
        folder = resolve_folder(path)
    except Exception as err:  # noqa: BLE001 - offline, unknown repo, ...: say both readings of the name
        raise FileNotFoundError(f"experiment.init_adapter {path!r} is not a local file or folder, and not a Hub "
                                f"repository that could be downloaded ({type(err).__name__}: {err})") from err
    return load_hub_folder(model, folder, backbone)


def settings_from_config(gin_config: str) -> Dict[str, Any]:
    """The LoRA settings, the backbone class and the base model named by a run's gin config."""
    import gin

    from registry import load_builtin_components

    load_builtin_components()
    gin.clear_config()
    try:
        gin.parse_config(gin_config)

        def value(name, default=None):
            try:
                return gin.query_parameter(name)
            except ValueError:
                return default

        adapter = value("experiment.adapter")
        if adapter is None or "lora" not in str(adapter.selector):
            raise ValueError("the run has no experiment.adapter = @adapters.lora(): nothing to export as a peft adapter")
        from prism.adapters.lora import LoRA

        defaults = LoRA()
        lora = {"rank": value("adapters.lora.rank", defaults.rank), "alpha": value("adapters.lora.alpha"),
                "dropout": value("adapters.lora.dropout", 0.0), "target_modules": value("adapters.lora.target_modules", []),
                "exclude": value("adapters.lora.exclude", [])}
        ref = value("models.mdm.backbone")
        backbone = getattr(getattr(ref, "configurable", None), "wrapped", None)
        selector = getattr(ref, "selector", "")
        base = value(f"{selector}.model_name_or_path") if selector else None
    finally:
        gin.clear_config()
    return {"lora": lora, "backbone": backbone, "base_model": base}
