"""``tasks.text``: unconditional text (OpenWebText-style) for MDLM training and sampling.

**Sources** (``source``; read by ``tasks.text_corpus``):

- ``'wikipedia-offline'`` (default): ``DATA_ROOT/text/wikipedia_en_wikiextractor/wiki_*`` (WikiExtractor
  output: ``<doc id=.. url=.. title=..>`` / title line / body / ``</doc>``), the articles whose body
  (title line dropped, stripped) has at least ``min_chars`` characters (17,200 at 200), in file order.
  It is the offline stand-in for OpenWebText: same tokenizer and preprocessing, another corpus.
- ``'openwebtext'`` or any other hub dataset id (``datasets.load_dataset(source, subset, split=split)``,
  field ``text_field``); needs a network or a filled Hugging Face cache.
- local files (a path, a glob or a list): ``.jsonl`` / ``.json`` / ``.parquet`` rows (field
  ``text_field``) or ``.txt`` files (each file one document).

**Split.** The last ``eval_documents`` documents are held out (an int: a count; a float in (0, 1): a
fraction; None: 100,000 for ``'openwebtext'``, as MDLM's ``openwebtext-valid = train[-100000:]``, else
5%). Each side is wrapped on its own, so no block holds text of both. ``max_documents`` keeps only the
first N documents of the source (before the split): for tests and quick runs.

**Preprocessing: MDLM's ``wrap``** (``tasks.text_corpus.fill_blocks``). Every document is tokenised without special tokens and followed
by EOS; the documents of a split are concatenated and cut into chunks of ``seq_len - 2`` tokens, each
stored as ``[BOS] + chunk + [EOS]`` (the remainder that fills no chunk is dropped). GPT-2 has a single
``<|endoftext|>`` (50256) for both, so with it a block starts and ends with 50256 and documents are
separated by 50256, exactly as in MDLM's OWT data. Nothing is padding and nothing is fixed.
(MDLM groups within each ``datasets.map`` batch of 1000 documents, dropping a remainder per batch;
here a split is concatenated whole, dropping one remainder.)

**Tokenizer.** ``tokenizer``: None = the GPT-2 files in ``DATA_ROOT/tokenizers/gpt2`` (offline), or a
hub id (``'gpt2'``) / a directory / a tokenizer object. The mask token is one id past the tokenizer
(MDLM: ``mask_id = 50257``, ``vocab_size = 50258``) unless the tokenizer has its own mask token.

**Cache.** Tokenised once with ``datasets.Dataset.map`` into ``cache_dir/text/<key>/`` (default
``CACHE_ROOT``): ``train.npy`` and ``eval.npy``, (n_blocks, seq_len) uint16 (int32 for a vocabulary
over 65,535), read memory-mapped; ``meta.json`` written last. The key hashes the source (the
Wikipedia files' SHA256SUMS, local files' path/size/mtime, or the hub id/subset/split), the text
field, ``min_chars``, ``max_documents``, the split, the tokenizer (name, size, vocabulary, BOS/EOS)
and ``seq_len``. The directory is built beside its final place and renamed into it (atomic).

**Batches.** ``train_batch``: ``torch.randint(n_blocks, (B,), generator)`` rows of ``train.npy``.
``eval_batches``: ``n_eval`` all-mask sequences of ``seq_len`` (unconditional generation), in order.
``reference_texts(n)``: held-out blocks, decoded, for MAUVE and reference rows. Per-sample metric:
``eos`` (number of EOS tokens); corpus metrics: ``corpus_scorers`` (e.g. Gen PPL, MAUVE, entropy).
"""
from __future__ import annotations

import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
from typing import Any, Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch

import prism.paths as paths
from registry import TASKS
from tasks.base import Task, local_files
from tasks.text_corpus import (LOCAL_FORMATS, OWT_EVAL_DOCUMENTS, WIKI_SOURCE, fill_blocks, load_wikiextractor,
                               wiki_dir)
from tasks.tokenizers import gpt2_files, resolve_tokenizer

logger = logging.getLogger(__name__)
CACHE_VERSION = "1"
MASK_TEXT = "<|mask|>"  # how decode shows a mask token left in a sequence


# ----------------------------------------------------------------------------- the task
@TASKS.register("text")
class TextTask(Task):
    """Unconditional text for MDLM-style training and sampling (see the module docstring).
    ``n_eval``: how many sequences ``eval_batches`` yields (ReMDM's MAUVE protocol: 5000);
    ``min_chars``: the shortest Wikipedia article body kept (``'wikipedia-offline'`` only);
    ``num_proc``: processes for tokenising (``Dataset.map``); ``cache_dir``: a cache root."""

    def __init__(
        self,
        source: Any = WIKI_SOURCE,
        subset: Optional[str] = None,
        split: str = "train",
        text_field: str = "text",
        tokenizer: Any = None,
        seq_len: int = 1024,
        eval_documents: Any = None,
        max_documents: Optional[int] = None,
        min_chars: int = 200,
        n_eval: int = 5000,
        num_proc: Optional[int] = None,
        cache_dir: Optional[str] = None,
        corpus_scorers: Sequence[Any] = (),
    ):
        if seq_len < 3:
            raise ValueError(f"tasks.text.seq_len must be at least 3 (BOS, a token, EOS), got {seq_len}")
        if eval_documents is None:
            eval_documents = OWT_EVAL_DOCUMENTS if source == "openwebtext" else 0.05
        if not (isinstance(eval_documents, int) and eval_documents >= 1) and not 0 < eval_documents < 1:
            raise ValueError(f"tasks.text.eval_documents must be a count >= 1 or a fraction in (0, 1), "
                             f"got {eval_documents!r}")
        if max_documents is not None and max_documents < 2:
            raise ValueError(f"tasks.text.max_documents must be at least 2 (train and eval), got {max_documents}")
        self.source, self.subset, self.split, self.text_field = source, subset, split, text_field
        self.tokenizer_spec, self.seq_len = tokenizer, int(seq_len)
        self.eval_documents, self.max_documents, self.min_chars = eval_documents, max_documents, int(min_chars)
        self.n_eval, self.num_proc = int(n_eval), num_proc
        self.cache_root = os.path.expanduser(cache_dir or paths.CACHE_ROOT)
        self.corpus_scorers = list(corpus_scorers)
        self._tokenizer = None
        self._data: Optional[Dict[str, Any]] = None
        self._key: Optional[str] = None

    # ------------------------------------------------------------------------- tokenizer
    @property
    def tokenizer(self):
        if self._tokenizer is None:
            spec = self.tokenizer_spec
            if spec is None:  # the offline GPT-2 files
                spec = os.path.join(paths.DATA_ROOT, "tokenizers", "gpt2")
                if not os.path.isdir(spec):
                    raise FileNotFoundError(f"GPT-2 tokenizer files not found in {spec} (set PRISM_DATA, or "
                                            "tasks.text.tokenizer = 'gpt2' to load them from the hub)")
            tok = resolve_tokenizer(spec, cache_dir=self.cache_root)
            if tok.bos_token_id is None or tok.eos_token_id is None:
                raise ValueError(f"tasks.text: tokenizer {spec!r} needs a BOS and an EOS token for MDLM's wrap")
            tok.model_max_length = 1 << 30  # documents are cut into blocks here, not by the tokenizer
            self._tokenizer = tok
        return self._tokenizer

    @property
    def mask_id(self) -> int:
        own = self.tokenizer.mask_token_id
        return int(own) if own is not None else len(self.tokenizer)

    @property
    def vocab_size(self) -> int:
        return max(len(self.tokenizer), self.mask_id + 1)

    @property
    def bos_id(self) -> int:
        return int(self.tokenizer.bos_token_id)

    @property
    def eos_id(self) -> int:
        return int(self.tokenizer.eos_token_id)

    # ------------------------------------------------------------------------- data and cache
    def describe_source(self) -> Any:
        """What identifies the source's content in the cache key."""
        if self.source == WIKI_SOURCE:
            sums = os.path.join(wiki_dir(), "SHA256SUMS")
            if os.path.exists(sums):  # by content: the same key on every machine
                return [WIKI_SOURCE, hashlib.sha256(open(sums, "rb").read()).hexdigest()]
            files = sorted(glob.glob(os.path.join(wiki_dir(), "wiki_*")))
            return [WIKI_SOURCE] + [[os.path.basename(p), os.path.getsize(p), os.stat(p).st_mtime_ns] for p in files]
        files = local_files(self.source, LOCAL_FORMATS, "tasks.text")
        if files is not None:
            return [[p, os.path.getsize(p), os.stat(p).st_mtime_ns] for p in files]
        return ["hub", self.source, self.subset, self.split]

    def data_files(self) -> List[str]:
        """The GPT-2 files of the default tokenizer, and the Wikipedia files while they are not cached."""
        files = gpt2_files() if self.tokenizer_spec is None else []
        if self.source == WIKI_SOURCE and not os.path.exists(os.path.join(wiki_dir(), "SHA256SUMS")):
            files.append(os.path.join(wiki_dir(), "SHA256SUMS"))
        return files

    def cache_key(self) -> str:
        if self._key is None:
            tok = self.tokenizer
            vocab = hashlib.sha256(json.dumps(sorted(tok.get_vocab().items())).encode()).hexdigest()
            spec = {"version": CACHE_VERSION, "source": self.describe_source(), "field": self.text_field,
                    "min_chars": self.min_chars, "max_documents": self.max_documents,
                    "eval_documents": self.eval_documents, "seq_len": self.seq_len,
                    "tokenizer": [self.tokenizer_spec if isinstance(self.tokenizer_spec, str) else "gpt2 (offline)"
                                  if self.tokenizer_spec is None else str(getattr(tok, "name_or_path", "")),
                                  len(tok), vocab, self.bos_id, self.eos_id]}
            self._key = hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:20]
        return self._key

    @property
    def cache_path(self) -> str:
        return os.path.join(self.cache_root, "text", self.cache_key())

    def prepare(self) -> None:
        self.data  # noqa: B018 - tokenises and caches the blocks (main process first)

    @property
    def data(self) -> Dict[str, Any]:
        if self._data is None:
            path = self.cache_path
            if not os.path.exists(os.path.join(path, "meta.json")):
                self._build(path)
            with open(os.path.join(path, "meta.json")) as f:
                self._data = {"meta": json.load(f)}
            for part in ("train", "eval"):
                self._data[part] = np.load(os.path.join(path, f"{part}.npy"), mmap_mode="r")
        return self._data

    @property
    def train_blocks(self) -> np.ndarray:
        """(n_blocks, seq_len) training blocks, memory-mapped."""
        return self.data["train"]

    @property
    def eval_blocks(self) -> np.ndarray:
        """(n_blocks, seq_len) held-out blocks, memory-mapped."""
        return self.data["eval"]

    def load_documents(self):
        """The source as a ``datasets.Dataset`` with one column, ``text_field`` (at most ``max_documents``)."""
        import datasets

        if self.source == WIKI_SOURCE:
            docs = load_wikiextractor(wiki_dir(), self.min_chars, self.max_documents)
            return datasets.Dataset.from_dict({self.text_field: docs})
        files = local_files(self.source, LOCAL_FORMATS, "tasks.text")
        try:
            if files is not None and files[0].endswith(".txt"):
                docs = [open(p, encoding="utf-8").read() for p in files]
                ds = datasets.Dataset.from_dict({self.text_field: docs})
            elif files is not None:
                ds = datasets.load_dataset(LOCAL_FORMATS[os.path.splitext(files[0])[1]], data_files=files,
                                           split="train", cache_dir=os.path.join(self.cache_root, "hf_datasets"))
            else:
                ds = datasets.load_dataset(self.source, self.subset, split=self.split)
        except Exception as e:  # noqa: BLE001 - name the source whatever went wrong
            raise ValueError(f"tasks.text: could not load source {self.source!r} (subset {self.subset!r}, split "
                             f"{self.split!r}): {type(e).__name__}: {e}. Offline, use '{WIKI_SOURCE}' or local "
                             "files") from e
        if self.text_field not in ds.column_names:
            raise ValueError(f"tasks.text: source {self.source!r} has no field {self.text_field!r} "
                             f"(tasks.text.text_field); its fields: {ds.column_names}")
        if self.max_documents is not None and len(ds) > self.max_documents:
            ds = ds.select(range(self.max_documents))
        return ds.select_columns([self.text_field])

    def split_sizes(self, n_documents: int) -> Dict[str, int]:
        """``{'train': n, 'eval': m}``: the first n documents train, the last m are held out."""
        e = self.eval_documents
        n_eval = int(e) if isinstance(e, int) else max(1, int(round(n_documents * e)))
        if not 0 < n_eval < n_documents:
            raise ValueError(f"tasks.text: cannot hold out {n_eval} of {n_documents} documents and keep some for "
                             "training; lower tasks.text.eval_documents or raise max_documents")
        return {"train": n_documents - n_eval, "eval": n_eval}

    def _wrap_split(self, ds, part: str, out_path: str, dtype) -> int:
        """Tokenise ``ds`` (each document + EOS), wrap it into blocks and save them to ``out_path``;
        returns the number of blocks."""
        tok, eos, field = self.tokenizer, self.eos_id, self.text_field

        def encode(batch: Dict[str, list]) -> Dict[str, list]:
            ids = tok([t or "" for t in batch[field]], add_special_tokens=False)["input_ids"]
            return {"ids": [x + [eos] for x in ids], "length": [len(x) + 1 for x in ids]}

        fingerprint = hashlib.sha256(f"{self.cache_key()}{part}{len(ds)}".encode()).hexdigest()[:16]
        tokenised = ds.map(encode, batched=True, batch_size=1000, remove_columns=ds.column_names,
                           num_proc=self.num_proc, new_fingerprint=fingerprint, desc="tokenising text")
        table = tokenised.with_format("arrow")  # column reads without a Python object per row
        n_blocks = int(np.asarray(table[:]["length"], dtype=np.int64).sum()) // (self.seq_len - 2)
        if not n_blocks:
            raise ValueError(f"tasks.text: the {len(ds)} {part} documents of {self.source!r} fill no block of "
                             f"seq_len = {self.seq_len}; use more documents or a shorter seq_len")

        def pieces() -> Iterator[np.ndarray]:
            for start in range(0, len(table), 10_000):
                ids = table[start : start + 10_000]["ids"].combine_chunks()  # a list array: its values, flat
                yield ids.flatten().to_numpy(zero_copy_only=False).astype(dtype)

        out = np.lib.format.open_memmap(out_path, mode="w+", dtype=dtype, shape=(n_blocks, self.seq_len))
        fill_blocks(pieces(), out, self.bos_id, eos)
        out.flush()
        del out
        return n_blocks

    def _build(self, path: str) -> None:
        ds = self.load_documents()
        sizes = self.split_sizes(len(ds))
        dtype = np.uint16 if self.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = tempfile.mkdtemp(dir=os.path.dirname(path), prefix=".build-")
        try:
            ranges = {"train": range(sizes["train"]), "eval": range(sizes["train"], len(ds))}
            blocks = {part: self._wrap_split(ds.select(rows), part, os.path.join(tmp, f"{part}.npy"), dtype)
                      for part, rows in ranges.items()}
            meta = {"documents": sizes, "blocks": blocks, "seq_len": self.seq_len, "source": str(self.source),
                    "bos": self.bos_id, "eos": self.eos_id, "dtype": np.dtype(dtype).name}
            paths.publish_dir(tmp, path, meta)  # meta.json last, then the rename
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        logger.info("tasks.text: cached %s train and %s eval blocks of %d tokens in %s",
                    blocks["train"], blocks["eval"], self.seq_len, path)

    def __len__(self) -> int:
        return len(self.train_blocks)

    def __bool__(self) -> bool:  # ``task or other`` must not read the data
        return True

    # ------------------------------------------------------------------------- batches
    def train_batch(self, batch_size: int, generator: torch.Generator) -> Dict[str, torch.Tensor]:
        idx = torch.randint(len(self), (batch_size,), generator=generator)
        ids = torch.from_numpy(np.asarray(self.train_blocks[idx.numpy()], dtype=np.int64))
        return self.check_batch({"input_ids": ids, "fixed": torch.zeros_like(ids, dtype=torch.bool)})

    def eval_batches(self, batch_size: int) -> Iterator[Dict[str, torch.Tensor]]:
        for start in range(0, self.n_eval, batch_size):
            B = min(batch_size, self.n_eval - start)
            ids = torch.full((B, self.seq_len), self.mask_id, dtype=torch.long)
            yield self.check_batch({"input_ids": ids, "fixed": torch.zeros_like(ids, dtype=torch.bool),
                                    "index": torch.arange(start, start + B)})

    def reference_texts(self, n: int, seed: int = 0) -> List[str]:
        """``n`` held-out blocks, decoded (BOS/EOS kept as ``<|endoftext|>``, as MDLM decodes its
        reference batches), in a fixed shuffled order of ``seed`` (ReMDM: a seeded shuffled loader)."""
        blocks = self.eval_blocks
        if n > len(blocks):
            raise ValueError(f"tasks.text: {n} reference texts asked for, the held-out split has {len(blocks)} "
                             "blocks; raise tasks.text.eval_documents")
        order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))[:n]
        return [self.decode(torch.from_numpy(np.asarray(blocks[i], dtype=np.int64))) for i in order.tolist()]

    # ------------------------------------------------------------------------- text and metrics
    def decode(self, tokens: torch.Tensor) -> str:
        """The tokenizer's decoding of the whole sequence (special tokens kept, as MDLM's
        ``batch_decode``); mask tokens left in it read ``<|mask|>``."""
        ids, mask = [int(t) for t in tokens], self.mask_id
        if mask not in ids:
            return self.tokenizer.decode(ids, clean_up_tokenization_spaces=False)
        parts, run = [], []
        for t in ids + [mask]:
            if t == mask:
                parts.append(self.tokenizer.decode(run, clean_up_tokenization_spaces=False) if run else "")
                run = []
            else:
                run.append(t)
        return MASK_TEXT.join(parts)

    def sample_metrics(self, samples: torch.Tensor, batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        return {"eos": (samples == self.eos_id).sum(dim=1).float()}
