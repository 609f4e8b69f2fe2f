"""Tokenizers for text tasks: resolve a spec to a Hugging Face tokenizer, build the offline
``gpt2-chat`` tokenizer, and read the special ids a masked-diffusion text task needs.

``gpt2-chat`` is the GPT-2 BPE tokenizer (``DATA_ROOT/tokenizers/gpt2``) with special tokens added in
LLaDA-8B-Instruct's style, so a small model trained offline sees sequences of the same shape as LLaDA:

- ``<|mdm_mask|>`` the mask token (``mask_token``), ``<|startoftext|>`` BOS (``bos_token``);
- ``<|start_header_id|>``, ``<|end_header_id|>``, ``<|eot_id|>`` (end of turn);
- EOS and pad: GPT-2's own ``<|endoftext|>`` (50256);
- a chat template rendering one user turn as
  ``<|startoftext|><|start_header_id|>user<|end_header_id|>\\n\\n{content}<|eot_id|>`` followed, with
  ``add_generation_prompt=True``, by ``<|start_header_id|>assistant<|end_header_id|>\\n\\n``; every
  turn (an assistant's too) ends with ``<|eot_id|>``.

The ids (GPT-2 has 50257 tokens): mask 50257, BOS 50258, start header 50259, end header 50260,
end of turn 50261; ``len(tokenizer) == 50262``.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Dict, Iterable, List, Optional, Tuple

import prism.paths as paths

MASK_TOKEN = "<|mdm_mask|>"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
START_HEADER, END_HEADER, EOT_TOKEN = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
CHAT_SPEC = "gpt2-chat"
RECIPE_VERSION = "1"  # bump when the built tokenizer changes: a cached copy of another version is rebuilt
RECIPE_FILE = "prism_recipe.json"

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "<|start_header_id|>{{ message['role'] }}<|end_header_id|>\n\n{{ message['content'] }}<|eot_id|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


def _auto_tokenizer(name_or_dir: str, **kwargs: Any):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(name_or_dir, **kwargs)


def gpt2_files() -> List[str]:
    """The GPT-2 BPE files the offline tokenizers are built from (``python -m prism.data fetch gpt2``)."""
    base = os.path.join(paths.DATA_ROOT, "tokenizers", "gpt2")
    return [os.path.join(base, "vocab.json"), os.path.join(base, "merges.txt")]


def build_chat_tokenizer(out_dir: str, base: Optional[str] = None):
    """Build ``gpt2-chat`` from the GPT-2 files in ``base`` (default ``DATA_ROOT/tokenizers/gpt2``),
    save it to ``out_dir`` (``save_pretrained``: a tokenizer directory ``AutoTokenizer`` loads offline)
    and return it."""
    base = base or os.path.join(paths.DATA_ROOT, "tokenizers", "gpt2")
    if not os.path.isdir(base):
        raise FileNotFoundError(f"GPT-2 tokenizer files not found in {base} (set the PRISM_DATA variable)")
    tok = _auto_tokenizer(base)
    if len(tok) != 50257 or tok.convert_tokens_to_ids(EOS_TOKEN) != 50256:
        raise ValueError(f"{base}: expected the GPT-2 tokenizer (50257 tokens, {EOS_TOKEN} = 50256), got "
                         f"{len(tok)} tokens")
    tok.add_special_tokens({
        "mask_token": MASK_TOKEN,
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "additional_special_tokens": [START_HEADER, END_HEADER, EOT_TOKEN],
    })
    tok.chat_template = CHAT_TEMPLATE
    tok.model_max_length = 1 << 30  # the task's seq_len bounds sequences, not the tokenizer
    os.makedirs(out_dir, exist_ok=True)
    tok.save_pretrained(out_dir)
    with open(os.path.join(out_dir, RECIPE_FILE), "w") as f:
        json.dump({"recipe": CHAT_SPEC, "version": RECIPE_VERSION, "base": os.path.abspath(base)}, f)
    return tok


def _recipe_version(directory: str) -> Optional[str]:
    try:
        with open(os.path.join(directory, RECIPE_FILE)) as f:
            return json.load(f).get("version")
    except (OSError, ValueError):
        return None


def chat_tokenizer_dir(cache_dir: Optional[str] = None) -> str:
    """The directory of the built ``gpt2-chat`` tokenizer, building it first if it is missing or of
    another recipe version. Built in a temporary directory beside it and renamed into place, so
    concurrent processes never see a half-written tokenizer."""
    root = os.path.join(os.path.expanduser(cache_dir or paths.CACHE_ROOT), "tokenizers")
    target = os.path.join(root, CHAT_SPEC)
    if _recipe_version(target) == RECIPE_VERSION:
        return target
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=root, prefix=f".{CHAT_SPEC}.build-")
    try:
        build_chat_tokenizer(tmp)
        if os.path.isdir(target):  # a stale version (or a racing builder's fresh one): replace it
            if _recipe_version(target) == RECIPE_VERSION:
                return target
            stale = tempfile.mkdtemp(dir=root, prefix=f".{CHAT_SPEC}.stale-")
            os.rmdir(stale)
            os.rename(target, stale)
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:  # another process renamed its build in first
            if _recipe_version(target) != RECIPE_VERSION:
                raise
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_tokenizer(spec: Any, cache_dir: Optional[str] = None):
    """A tokenizer from ``spec``: an already-built tokenizer object (returned as is), a local
    tokenizer directory, a Hugging Face hub id (e.g. ``'GSAI-ML/LLaDA-8B-Instruct'``), or
    ``'gpt2-chat'`` (built once into ``CACHE_ROOT/tokenizers/gpt2-chat`` and loaded from there)."""
    if not isinstance(spec, str):
        if hasattr(spec, "convert_tokens_to_ids"):
            return spec
        raise TypeError(f"tokenizer spec must be a name, a directory or a tokenizer, got {type(spec).__name__}")
    if spec == CHAT_SPEC:
        return _auto_tokenizer(chat_tokenizer_dir(cache_dir))
    local = os.path.expanduser(spec)
    if os.path.isdir(local):
        return _auto_tokenizer(local)
    try:
        return _auto_tokenizer(spec)
    except Exception as e:  # noqa: BLE001 - hub errors come in many types; name the spec
        raise ValueError(f"could not load tokenizer {spec!r}: not a local directory, not loadable from the "
                         f"Hugging Face hub ({type(e).__name__}: {e}); '{CHAT_SPEC}' works offline") from e


SPECIAL_NAMES = ("mask", "eos", "bos", "eot")


def special_ids(tokenizer, require: Iterable[str] = ("mask", "eos")) -> Dict[str, Optional[int]]:
    """The special ids a masked-diffusion text task uses, as ``{'mask', 'eos', 'bos', 'eot'}``:

    - mask: the token ``<|mdm_mask|>`` (LLaDA's), else ``tokenizer.mask_token``;
    - eos: the token ``<|endoftext|>`` when the vocabulary has it (GPT-2's; LLaDA's EOS, 126081, with
      which its SFT pads answers, whatever the tokenizer names as ``eos_token``), else
      ``tokenizer.eos_token``; bos: ``tokenizer.bos_token``;
    - eot (end of turn): the token ``<|eot_id|>``.

    Missing ones are None; a name in ``require`` that is missing raises a ValueError naming it."""
    vocab = tokenizer.get_vocab()  # added tokens included (convert_tokens_to_ids would answer unk's id)
    ids: Dict[str, Optional[int]] = {
        "mask": vocab.get(MASK_TOKEN),
        "eos": vocab.get("<|endoftext|>", tokenizer.eos_token_id),
        "bos": tokenizer.bos_token_id,
        "eot": vocab.get(EOT_TOKEN),
    }
    if ids["mask"] is None:
        ids["mask"] = tokenizer.mask_token_id
    unknown = sorted(set(require) - set(SPECIAL_NAMES))
    if unknown:
        raise ValueError(f"unknown special token names {unknown}; known: {list(SPECIAL_NAMES)}")
    what = {"mask": f"a mask token ({MASK_TOKEN} or tokenizer.mask_token)", "eos": "an EOS token (eos_token)",
            "bos": "a BOS token (bos_token)", "eot": f"an end-of-turn token ({EOT_TOKEN})"}
    missing = [what[k] for k in require if ids[k] is None]
    if missing:
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ValueError(f"tokenizer {name!r} has no {', no '.join(missing)}; use one that does (e.g. "
                         f"'{CHAT_SPEC}', or 'GSAI-ML/LLaDA-8B-Instruct')")
    return ids


class TokenizerMixin:
    """The tokenizer side of a text task: ``tokenizer`` loaded on first use from ``tokenizer_spec``
    (``resolve_tokenizer``, cache under ``cache_root``), its ``special`` ids, ``vocab_size``
    (``len(tokenizer)``), ``mask_id`` and ``end_ids`` (EOS and end of turn). A task sets
    ``tokenizer_spec``, ``cache_root``, ``_tokenizer = None`` and may override ``required_special``
    and ``check_tokenizer`` (e.g. a chat prompt needs a chat template)."""

    task_name = "task"

    def data_files(self) -> List[str]:
        """The GPT-2 files ``'gpt2-chat'`` is built from, while it is not built in the cache yet."""
        if self.tokenizer_spec == CHAT_SPEC and self._tokenizer is None and \
                _recipe_version(os.path.join(self.cache_root, "tokenizers", CHAT_SPEC)) != RECIPE_VERSION:
            return gpt2_files()
        return []

    def required_special(self) -> Tuple[str, ...]:
        return ("mask", "eos")

    def check_tokenizer(self, tokenizer) -> None:
        """Raise a ValueError if ``tokenizer`` cannot serve this task's settings."""

    def needs_chat_template(self, tokenizer, option: str, alternative: str) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"{self.task_name}: {option} but tokenizer {self.tokenizer_spec!r} has no chat "
                             f"template; {alternative}")

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            tok = resolve_tokenizer(self.tokenizer_spec, cache_dir=self.cache_root)
            self._ids = special_ids(tok, require=self.required_special())
            self.check_tokenizer(tok)
            self._tokenizer = tok
        return self._tokenizer

    @property
    def special(self) -> Dict[str, Optional[int]]:
        self.tokenizer  # noqa: B018 - loads the ids too
        return self._ids

    @property
    def vocab_size(self) -> int:
        return len(self.tokenizer)

    @property
    def mask_id(self) -> int:
        return self.special["mask"]

    @property
    def end_ids(self) -> List[int]:
        """The tokens that end an answer: EOS and (when the tokenizer has one) end of turn."""
        return [t for t in (self.special["eos"], self.special["eot"]) if t is not None]

