"""LLaDA's released checkpoint layout on disk: where the files are (a directory or a hub id), which
safetensors files hold the weights, and writing a backbone in that layout (``config.json`` in the
released format, ``model-0000k-of-0000n.safetensors`` shards, ``model.safetensors.index.json``)."""
from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional

from prism.checkpoint import HF_INDEX, HF_WEIGHTS, as_dtype, write_safetensors

HUB_ID = "GSAI-ML/LLaDA-8B-Instruct"
# Pin for hub ids. The project's references name the config commit of GSAI-ML/LLaDA-8B-Instruct only by
# its short hash 6059b30; its full 40-hex commit could not be confirmed offline, so nothing is pinned by
# default: set ``backbones.llada.revision`` to a full commit for reproducible downloads.
REVISION: Optional[str] = None


def resolve_model_dir(model_name_or_path: str, revision: Optional[str] = REVISION) -> str:
    """A local directory as is; otherwise a hub id, downloaded (config and safetensors only)."""
    if os.path.isdir(model_name_or_path):
        return model_name_or_path
    if os.path.exists(model_name_or_path) or model_name_or_path.count("/") != 1:
        raise FileNotFoundError(f"backbones.llada.model_name_or_path {model_name_or_path!r} is neither a directory "
                                f"(config.json + safetensors) nor a hub id such as {HUB_ID!r}")
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id=model_name_or_path, revision=revision,
                             allow_patterns=["*.json", "*.safetensors"])


def checkpoint_files(directory: str) -> List[str]:
    """The safetensors files of a released-layout directory: the index's shards, or model.safetensors."""
    index = os.path.join(directory, HF_INDEX)
    if os.path.exists(index):
        with open(index) as f:
            shards = list(dict.fromkeys(json.load(f)["weight_map"].values()))
        files = [os.path.join(directory, s) for s in shards]
        absent = [p for p in files if not os.path.exists(p)]
        if absent:
            raise FileNotFoundError(f"{index} names shards that are not there: {absent[:4]}")
        return files
    single = os.path.join(directory, HF_WEIGHTS)
    if os.path.exists(single):
        return [single]
    raise FileNotFoundError(f"{directory} has neither {HF_INDEX} nor {HF_WEIGHTS} (only safetensors are read)")


def released_config(cfg: Dict[str, Any]) -> Dict[str, Any]:
    """A config.json in the released format for a resolved config."""
    keys = ("d_model", "n_layers", "n_heads", "n_kv_heads", "mlp_hidden_size", "vocab_size", "embedding_size",
            "max_sequence_length", "rms_norm_eps", "rope_theta", "mask_token_id", "eos_token_id", "pad_token_id",
            "bos_token_id")
    out = dict(architectures=["LLaDAModelLM"], model_type="llada", block_type="llama", layer_norm_type="rms",
               activation_type="silu", rope=True, alibi=False, include_bias=False, weight_tying=False,
               rope_full_precision=True)
    out.update({k: cfg[k] for k in keys if cfg.get(k) is not None})
    return out


def save_released_layout(backbone, directory: str, max_shard_bytes: int = 5 * 2**30,
                         dtype=None) -> List[str]:
    """Write ``backbone`` as the released checkpoint is laid out: ``model-0000k-of-0000n.safetensors``
    shards of at most ``max_shard_bytes`` (a larger tensor gets a shard of its own),
    ``model.safetensors.index.json`` (``metadata.total_size``, ``weight_map``) and ``config.json``.
    Returns the shard file names."""
    os.makedirs(directory, exist_ok=True)
    dtype = as_dtype(dtype)
    state = {k: (v.to(dtype) if dtype is not None else v).detach() for k, v in backbone.state_dict().items()}
    groups: List[List[str]] = [[]]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    n = len(groups)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {}
    for file, group in zip(names, groups):
        write_safetensors({k: state[k].contiguous().cpu() for k in group}, os.path.join(directory, file))
        weight_map.update({k: file for k in group})
    total = sum(t.numel() * t.element_size() for t in state.values())
    with open(os.path.join(directory, HF_INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(released_config(backbone.config), f, indent=2)
    return names


