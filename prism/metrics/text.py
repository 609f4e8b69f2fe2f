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

The evaluator models (the offline ``'smollm2-135m'`` and ``'minilm'``, or hub ids such as
``'gpt2-large'``) and the scoring itself are in ``prism.metrics.lm_scoring``.
"""
from __future__ import annotations

import math
import random
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import gin
import torch

from prism.metrics.corpus import CorpusMetric, run_scorers
from prism.metrics.lm_scoring import (DEFAULT_REFERENCES, MINILM, SMOLLM2, chunked_head_ok, evaluator_device,
                                      featurize, load_causal_lm, load_featurizer, mauve_from_features, read_texts,
                                      score_texts, token_weighted_ppl, unigram_entropy)



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
        return model, tokenizer, chunked_head_ok(model, next(model.parameters()).device)

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

            device_id = 0 if evaluator_device(self.device).type == "cuda" else -1
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
