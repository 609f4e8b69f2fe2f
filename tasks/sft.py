"""``tasks.sft``: supervised fine-tuning on instruction -> answer pairs, in LLaDA's SFT layout.

Training sequence: ``prompt + answer + EOS ... EOS``, exactly ``seq_len`` tokens. The prompt is
``fixed``; the answer and its EOS padding are not (LLaDA's SFT: padded EOS are answer tokens, noised
and predicted), and nothing is attention padding. ``prompt_format='chat'``: the tokenizer's chat
template for one user turn with ``add_generation_prompt=True``, tokenised without adding special
tokens, and the answer ends with end of turn; else a plain template holding ``{instruction}`` (PRISM's
LLaDA recipe: a fixed instruction text, no chat template). Examples longer than ``seq_len`` (with one
EOS) are dropped, counted and logged once.

``source``: ``'mbpp-train'`` (default, offline: MBPP task ids 601-974, instruction = problem text and
first test, answer = reference code with ``\\r\\n`` made ``\\n``; MBPP's test split 11-510 is never
read), ``'mbpp-validation'`` (511-600), local ``.jsonl``/``.json``/``.parquet`` (a path, glob or
list), or a hub dataset for ``datasets.load_dataset(source, subset, split=split)`` (e.g.
``'OpenCoder-LLM/opc-sft-stage2'``, ``subset='educational_instruct'``, fields ``instruction`` /
``output``: the default ``prompt_field`` / ``answer_field``).

Evaluation: ``eval_source`` or, by default, a held-out ``eval_fraction`` of ``source`` (by
``split_seed``; never trained on), the first ``eval_limit``. A conditioning sequence is the prompt,
LEFT-padded with EOS to its batch's longest (padding fixed, ``attention_mask`` False), then
``gen_length`` masks; ``eval_example(i)`` is record ``i``'s instruction and reference.

Tokenised once (``datasets.Dataset.map``) and cached in ``cache_dir/sft/<key>`` (key: source content
or local files' path/size/mtime, fields, tokenizer vocabulary and template, format, lengths, split).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch

import prism.paths as paths
from registry import TASKS
from tasks.base import Task
from tasks.sft_data import describe_source, load_source
from tasks.tokenizers import TokenizerMixin

logger = logging.getLogger(__name__)
CACHE_VERSION = "1"
def _pack(tokenised, rows: Sequence[int], keep) -> Dict[str, np.ndarray]:
    """Concatenate the kept examples of a tokenised Dataset (read 1000 rows at a time) into flat
    int32 ``ids`` with ``offsets``, ``prompt_len`` and their ``rows``."""
    chunks, lengths, plen, kept = [], [], [], []
    has_answer = "answer_ids" in tokenised.column_names
    for start in range(0, len(tokenised), 1000):
        part = tokenised[start : start + 1000]
        answers = part["answer_ids"] if has_answer else [[]] * len(part["prompt_ids"])
        for k, (p, a) in enumerate(zip(part["prompt_ids"], answers)):
            if keep(p, a):
                chunks.append(np.asarray(p + a, dtype=np.int32))
                lengths.append(len(p) + len(a))
                plen.append(len(p))
                kept.append(rows[start + k])
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return {"ids": np.concatenate(chunks) if chunks else np.zeros(0, np.int32), "offsets": offsets,
            "prompt_len": np.asarray(plen, np.int32), "rows": np.asarray(kept, np.int64)}


@TASKS.register("sft")
class SFT(TokenizerMixin, Task):
    """Instruction -> answer SFT (see the module docstring); ``cache_dir`` is a cache root (default
    ``CACHE_ROOT``) for the tokenizer and the data. Per-sample metrics: ``ends`` (EOS or end of turn
    generated: the answer finished within ``gen_length``) and ``answer_tokens`` (tokens before it)."""

    def __init__(
        self,
        source: Any = "mbpp-train",
        subset: Optional[str] = None,
        split: str = "train",
        prompt_field: str = "instruction",
        answer_field: str = "output",
        tokenizer: Any = "gpt2-chat",
        prompt_format: str = "chat",
        seq_len: int = 1024,
        gen_length: int = 256,
        eval_source: Any = None,
        eval_fraction: float = 0.05,
        split_seed: int = 0,
        eval_limit: Optional[int] = None,
        cache_dir: Optional[str] = None,
        corpus_scorers: Sequence[Any] = (),
    ):
        if prompt_format != "chat" and "{instruction}" not in prompt_format:
            raise ValueError(f"tasks.sft.prompt_format must be 'chat' or a template holding '{{instruction}}', "
                             f"got {prompt_format!r}")
        if not 0 < gen_length < seq_len:
            raise ValueError(f"tasks.sft: need 0 < gen_length < seq_len, got {gen_length} and {seq_len}")
        if eval_source is None and not 0 < eval_fraction < 1:
            raise ValueError(f"tasks.sft.eval_fraction must be in (0, 1) without an eval_source, got {eval_fraction}")
        self.source, self.subset, self.split = source, subset, split
        self.prompt_field, self.answer_field = prompt_field, answer_field
        self.tokenizer_spec, self.prompt_format = tokenizer, prompt_format
        self.seq_len, self.gen_length = int(seq_len), int(gen_length)
        self.eval_source, self.eval_fraction, self.split_seed = eval_source, eval_fraction, split_seed
        self.eval_limit = eval_limit
        self.cache_root = os.path.expanduser(cache_dir or paths.CACHE_ROOT)
        self.corpus_scorers = list(corpus_scorers)
        self._tokenizer = None
        self._ids: Optional[Dict[str, Optional[int]]] = None
        self._data: Optional[Dict[str, Any]] = None
        self._key: Optional[str] = None

    # ------------------------------------------------------------------------- tokenizer
    task_name = "tasks.sft"

    def required_special(self):
        return ("mask", "eos", "eot") if self.prompt_format == "chat" else ("mask", "eos")

    def check_tokenizer(self, tokenizer) -> None:
        if self.prompt_format == "chat":
            self.needs_chat_template(tokenizer, "prompt_format='chat'", "give a plain template holding '{instruction}'")

    @property
    def eos_id(self) -> int:
        return self.special["eos"]

    def prompt_text(self, instruction: str) -> str:
        """The prompt string for ``instruction`` (tokenised without adding special tokens)."""
        if self.prompt_format == "chat":
            return self.tokenizer.apply_chat_template([{"role": "user", "content": instruction}],
                                                      add_generation_prompt=True, tokenize=False)
        return self.prompt_format.replace("{instruction}", instruction)

    def answer_ids(self, answer: str) -> List[int]:
        """The answer's tokens with its end-of-turn token in the chat format (no EOS: padding adds it)."""
        ids = self.tokenizer(answer, add_special_tokens=False)["input_ids"]
        return ids + [self.special["eot"]] if self.prompt_format == "chat" else ids

    # ------------------------------------------------------------------------- data and cache
    def cache_key(self) -> str:
        if self._key is None:
            self._key = self._compute_key()
        return self._key

    def _compute_key(self) -> str:
        tok = self.tokenizer
        vocab = hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest()
        spec = {
            "version": CACHE_VERSION,
            "source": describe_source(self.source, self.subset, self.split),
            "fields": [self.prompt_field, self.answer_field],
            "eval": (describe_source(self.eval_source, self.subset, self.split) if self.eval_source is not None
                     else [self.eval_fraction, self.split_seed]),
            "tokenizer": [self.tokenizer_spec if isinstance(self.tokenizer_spec, str) else
                          str(getattr(tok, "name_or_path", "")), len(tok), vocab,
                          str(getattr(tok, "chat_template", "")), self.special],
            "format": self.prompt_format, "seq_len": self.seq_len, "gen_length": self.gen_length,
        }
        return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:20]

    @property
    def cache_path(self) -> str:
        return os.path.join(self.cache_root, "sft", self.cache_key())

    def prepare(self) -> None:
        self.data  # noqa: B018 - builds the tokenizer and the tokenised cache (main process first)

    @property
    def data(self) -> Dict[str, Any]:
        if self._data is None:
            path = self.cache_path
            if not os.path.exists(os.path.join(path, "meta.json")):
                self._build_cache(path)
            self._data = self._read_cache(path)
        return self._data

    def _tokenize(self, ds, prompt_field: str, answer_field: str, with_answer: bool):
        """``ds`` -> a Dataset of ``prompt_ids`` (and ``answer_ids``), by ``Dataset.map``."""
        def encode(batch: Dict[str, list]) -> Dict[str, list]:
            fields = (prompt_field, answer_field) if with_answer else (prompt_field,)
            for field in fields:
                bad = [v for v in batch[field] if not isinstance(v, str)]
                if bad:
                    raise TypeError(f"tasks.sft: field {field!r} must hold strings, found {type(bad[0]).__name__}")
            prompts = [self.prompt_text(x) for x in batch[prompt_field]]
            out = {"prompt_ids": self.tokenizer(prompts, add_special_tokens=False)["input_ids"]}
            if with_answer:
                out["answer_ids"] = [self.answer_ids(a) for a in batch[answer_field]]
            return out

        fingerprint = hashlib.sha256(f"{self.cache_key()}{with_answer}{len(ds)}".encode()).hexdigest()[:16]
        return ds.map(encode, batched=True, batch_size=1000, remove_columns=ds.column_names, keep_in_memory=True,
                      new_fingerprint=fingerprint, desc="tokenising SFT data")

    def _build_cache(self, path: str) -> None:
        ds, pf, af = load_source(self.source, self.subset, self.split, self.prompt_field, self.answer_field,
                                 self.cache_root)
        if self.eval_source is None:
            perm = np.random.default_rng(self.split_seed).permutation(len(ds))
            n_eval = max(1, int(round(len(ds) * self.eval_fraction)))
            eval_rows, train_rows = sorted(perm[:n_eval].tolist()), sorted(perm[n_eval:].tolist())
            eval_ds, epf, eaf = ds, pf, af
        else:
            train_rows = list(range(len(ds)))
            eval_ds, epf, eaf = load_source(self.eval_source, self.subset, self.split, self.prompt_field,
                                            self.answer_field, self.cache_root)
            eval_rows = list(range(len(eval_ds)))
        if not train_rows:
            raise ValueError(f"tasks.sft: source {self.source!r} has no training examples")
        train_tok = self._tokenize(ds.select(train_rows), pf, af, with_answer=True)
        # at least one EOS after the answer
        train = _pack(train_tok, train_rows, lambda p, a: len(p) + len(a) + 1 <= self.seq_len)
        dropped = len(train_rows) - len(train["rows"])
        if dropped:
            logger.warning("tasks.sft: dropped %d of %d training examples longer than seq_len = %d "
                           "(prompt + answer + EOS)", dropped, len(train_rows), self.seq_len)
        if not len(train["rows"]):
            raise ValueError(f"tasks.sft: every one of the {len(train_rows)} training examples of {self.source!r} is "
                             f"longer than seq_len = {self.seq_len}; raise tasks.sft.seq_len")
        eval_sel = eval_ds.select(eval_rows)
        ev = _pack(self._tokenize(eval_sel.select_columns([epf]), epf, eaf, with_answer=False),
                   list(range(len(eval_rows))), lambda p, a: len(p) + self.gen_length <= self.seq_len)
        extra = [c for c in ("task_id", "test_list") if c in eval_sel.column_names]
        records = [{"row": int(eval_rows[j]), "instruction": eval_sel[j][epf], "reference": eval_sel[j][eaf],
                    **{c: eval_sel[j][c] for c in extra}} for j in ev["rows"].tolist()]
        e_dropped = len(eval_rows) - len(records)
        if e_dropped:
            logger.warning("tasks.sft: dropped %d of %d evaluation prompts longer than seq_len - gen_length = %d",
                           e_dropped, len(eval_rows), self.seq_len - self.gen_length)
        meta = {"n_train": len(train["rows"]), "dropped": dropped, "n_eval": len(records), "eval_dropped": e_dropped,
                "source": str(self.source), "eval_source": str(self.eval_source), "seq_len": self.seq_len}
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(path), prefix=".build-")
        try:
            for part, arrays in (("train", train), ("eval", ev)):
                for name, arr in arrays.items():
                    np.save(os.path.join(tmp, f"{part}_{name}.npy"), arr)
            with open(os.path.join(tmp, "eval.jsonl"), "w") as f:
                f.writelines(json.dumps(r) + "\n" for r in records)
            paths.publish_dir(tmp, path, meta)  # meta.json last, then the rename
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    @staticmethod
    def _read_cache(path: str) -> Dict[str, Any]:
        """The cached arrays (token ids memory-mapped: processes on one machine share the pages)."""
        with open(os.path.join(path, "meta.json")) as f:
            data: Dict[str, Any] = {"meta": json.load(f)}
        for part in ("train", "eval"):
            for name in ("ids", "offsets", "prompt_len", "rows"):
                data[f"{part}_{name}"] = np.load(os.path.join(path, f"{part}_{name}.npy"),
                                                 mmap_mode="r" if name == "ids" and part == "train" else None)
        with open(os.path.join(path, "eval.jsonl")) as f:
            data["eval_records"] = [json.loads(line) for line in f if line.strip()]
        return data

    def __len__(self) -> int:
        return len(self.data["train_prompt_len"])

    @property
    def n_dropped(self) -> int:
        return int(self.data["meta"]["dropped"])

    # ------------------------------------------------------------------------- batches
    def _tokens(self, part: str, i: int) -> Tuple[torch.Tensor, int]:
        d = self.data
        off = d[f"{part}_offsets"]
        seq = torch.from_numpy(np.array(d[f"{part}_ids"][int(off[i]) : int(off[i + 1])], dtype=np.int64))
        return seq, int(d[f"{part}_prompt_len"][i])

    def example(self, i: int) -> Tuple[torch.Tensor, int]:
        """Training example ``i`` as (prompt + answer tokens, prompt length)."""
        return self._tokens("train", i)

    def train_batch(self, batch_size: int, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        idx = torch.randint(len(self), (batch_size,), generator=generator)
        input_ids = torch.full((batch_size, self.seq_len), self.eos_id, dtype=torch.long)
        fixed = torch.zeros(batch_size, self.seq_len, dtype=torch.bool)
        for b, i in enumerate(idx.tolist()):
            seq, n_prompt = self.example(i)
            input_ids[b, : len(seq)] = seq
            fixed[b, :n_prompt] = True
        return self.check_batch({"input_ids": input_ids, "fixed": fixed})

    @property
    def n_eval(self) -> int:
        n = len(self.data["eval_records"])
        return min(n, self.eval_limit) if self.eval_limit is not None else n

    def eval_example(self, i: int) -> Dict[str, Any]:
        """Record ``i`` of the evaluation set: ``instruction``, ``reference`` (the answer), ``row`` in
        its source, and MBPP's ``task_id`` / ``test_list`` where the source has them."""
        return self.data["eval_records"][i]

    def eval_batches(self, batch_size: int) -> Iterator[Dict[str, torch.Tensor]]:
        n = self.n_eval
        for start in range(0, n, batch_size):
            prompts = [self._tokens("eval", i)[0] for i in range(start, min(n, start + batch_size))]
            width = max(len(p) for p in prompts)
            L, B = width + self.gen_length, len(prompts)
            input_ids = torch.full((B, L), self.mask_id, dtype=torch.long)
            fixed = torch.zeros(B, L, dtype=torch.bool)
            keep = torch.ones(B, L, dtype=torch.bool)
            for b, p in enumerate(prompts):
                pad = width - len(p)
                input_ids[b, :pad] = self.eos_id
                input_ids[b, pad:width] = p
                fixed[b, :width] = True
                keep[b, :pad] = False
            yield self.check_batch({"input_ids": input_ids, "fixed": fixed, "attention_mask": keep,
                                    "index": torch.arange(start, start + B)})

    # ------------------------------------------------------------------------- text and metrics
    def answer_text(self, ids: Sequence[int]) -> str:
        """The text of answer tokens, up to (not including) the first EOS / end of turn."""
        ids, stop = [int(t) for t in ids], set(self.end_ids)
        ends = [k for k, t in enumerate(ids) if t in stop]
        return self.tokenizer.decode(ids[: ends[0]] if ends else ids, skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)

    def decode(self, tokens: torch.Tensor) -> str:
        """The generated text of an evaluation sample (its last ``gen_length`` positions), up to the
        first EOS or end of turn; left padding and the prompt are dropped."""
        return self.answer_text(tokens[-self.gen_length :])

    def sample_metrics(self, samples: torch.Tensor, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        gen = samples[:, -self.gen_length :]
        is_end = torch.zeros_like(gen, dtype=torch.bool)
        for t in self.end_ids:
            is_end |= gen == t
        ends = is_end.any(dim=1)
        first = torch.where(ends, is_end.float().argmax(dim=1), torch.full_like(gen[:, 0], self.gen_length))
        return {"ends": ends.float(), "answer_tokens": first.float()}
