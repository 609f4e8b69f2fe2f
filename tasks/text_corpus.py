"""The text corpus of ``tasks.text``: documents from the offline Wikipedia dump, local files or a hub
data set, and MDLM's ``wrap`` that packs them into blocks ``[BOS] + seq_len - 2 tokens + [EOS]``
(MDLM's ``wrap = True`` preprocessing; the format is described in ``tasks.text``)."""
from __future__ import annotations

import glob
import os
import re
from typing import Iterable, List, Optional, Sequence

import numpy as np

import prism.paths as paths

WIKI_SOURCE = "wikipedia-offline"
WIKI_DIR = os.path.join("text", "wikipedia_en_wikiextractor")
OWT_EVAL_DOCUMENTS = 100_000  # MDLM: openwebtext-valid = train[-100000:]
LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "txt"}
DOC_RE = re.compile(r'<doc id="(\d+)"[^>]*>\n(.*?)</doc>', re.S)


# ----------------------------------------------------------------------------- wrapping
def fill_blocks(pieces: Iterable[np.ndarray], out: np.ndarray, bos: int, eos: int) -> None:
    """Write the concatenation of ``pieces`` (1-D token arrays) into ``out`` (n, L) as MDLM's wrapped
    blocks ``[BOS] + next L - 2 tokens + [EOS]``; tokens beyond ``n`` full chunks are dropped."""
    n, L = out.shape
    body, row = L - 2, 0
    left = np.zeros(0, dtype=out.dtype)
    for piece in pieces:
        cat = np.concatenate([left, np.asarray(piece, dtype=out.dtype)])
        k = min(len(cat) // body, n - row)
        out[row : row + k, 1:-1] = cat[: k * body].reshape(k, body)
        row, left = row + k, cat[k * body :]
    if row != n:
        raise ValueError(f"wrap: the pieces filled {row} blocks, expected {n}")
    out[:, 0], out[:, -1] = bos, eos


def wrap_documents(docs: Iterable[Sequence[int]], seq_len: int, bos: int, eos: int,
                   dtype=np.int64) -> np.ndarray:
    """MDLM's ``wrap`` of tokenised documents (without special tokens): each followed by EOS,
    concatenated, cut into (n, seq_len) blocks ``[BOS] + seq_len - 2 tokens + [EOS]``."""
    if seq_len < 3:
        raise ValueError(f"wrap needs seq_len >= 3 (BOS, a token, EOS), got {seq_len}")
    pieces = [np.asarray(list(d) + [eos], dtype=dtype) for d in docs]
    out = np.empty((sum(map(len, pieces)) // (seq_len - 2), seq_len), dtype=dtype)
    fill_blocks(pieces, out, bos, eos)
    return out


# ----------------------------------------------------------------------------- sources
def wiki_dir() -> str:
    return os.path.join(paths.DATA_ROOT, WIKI_DIR)


def load_wikiextractor(directory: str, min_chars: int = 200, max_documents: Optional[int] = None) -> List[str]:
    """The article bodies (title line dropped, stripped) of the WikiExtractor files ``wiki_*`` in
    ``directory`` with at least ``min_chars`` characters, in file order (the first ``max_documents``)."""
    files = sorted(glob.glob(os.path.join(directory, "wiki_*")))
    if not files:
        raise FileNotFoundError(f"no WikiExtractor files wiki_* in {directory} (set the PRISM_DATA variable)")
    docs: List[str] = []
    for path in files:
        with open(path, encoding="utf-8") as f:
            for _, body in DOC_RE.findall(f.read()):
                body = body.split("\n", 1)[1].strip() if "\n" in body else ""
                if len(body) >= min_chars:
                    docs.append(body)
                    if max_documents is not None and len(docs) >= max_documents:
                        return docs
    return docs
