"""safetensors files read and written one tensor at a time, with no memory map and no second copy.

The format (huggingface/safetensors): an 8-byte little-endian header length n, n bytes of JSON
(``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, offsets relative
to the end of the header), then the tensors' bytes.

Why not ``safe_open(...).get_tensor``: it copies out of a memory map, and the mapped pages it touched
stay in the process's resident set until the file is closed, so loading a 3 GB shard that way costs
its bytes twice (the copy and the mapped pages). ``read_into`` reads a tensor's bytes with ordinary
``readinto`` calls straight into the destination's storage (same dtype) or through a bounded staging
buffer (a cast), so loading a model costs the model's bytes plus at most ``CHUNK_BYTES``.

``StreamWriter`` writes a file whose tensors are known by name, shape and dtype up front: the header
first, then each tensor as it is produced (a random 8B model never exists in memory, even per shard),
atomically (a temporary file renamed into place).
"""
from __future__ import annotations

import json
import math
import os
import struct
from typing import Callable, Dict, Iterable, Optional, Sequence, Tuple

import torch

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
NAMES = {v: k for k, v in DTYPES.items()}
CHUNK_BYTES = 64 * 2**20  # staging buffer for a cast while reading, and the write granularity


def read_header(path: str) -> Tuple[Dict[str, dict], int]:
    """({name: {'dtype', 'shape', 'data_offsets'}}, offset of the data section); ``__metadata__`` dropped."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path} is not a safetensors file (shorter than its 8-byte header length)")
        (n,) = struct.unpack("<Q", raw)
        if n > 100 * 2**20:
            raise ValueError(f"{path}: header length {n} is implausible; the file is not a safetensors file")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def _as_bytes(t: torch.Tensor) -> memoryview:
    return memoryview(t.view(-1).view(torch.uint8).numpy())


def read_into(f, entry: dict, data_start: int, dest: torch.Tensor) -> torch.Tensor:
    """Read one tensor (its header ``entry``) from the open file ``f`` into ``dest`` (a contiguous CPU
    tensor of the same number of elements), casting through a staging buffer when the dtypes differ."""
    src_dtype = DTYPES.get(entry["dtype"])
    if src_dtype is None:
        raise ValueError(f"safetensors dtype {entry['dtype']} is not supported here ({', '.join(DTYPES)})")
    numel = math.prod(entry["shape"])
    begin, end = entry["data_offsets"]
    item = src_dtype.itemsize
    if end - begin != numel * item or dest.numel() != numel:
        raise ValueError(f"tensor of shape {entry['shape']} ({entry['dtype']}) spans {end - begin} bytes; "
                         f"destination holds {dest.numel()} elements")
    if dest.device.type != "cpu" or not dest.is_contiguous():
        raise ValueError("read_into needs a contiguous CPU destination")
    f.seek(data_start + begin)
    flat = dest.view(-1)
    if src_dtype == dest.dtype:
        view, done = _as_bytes(flat), 0
        while done < len(view):
            got = f.readinto(view[done:done + CHUNK_BYTES])
            if not got:
                raise ValueError(f"unexpected end of file reading a tensor at offset {begin}")
            done += got
        return dest
    per = max(1, CHUNK_BYTES // item)
    stage = torch.empty(min(per, numel), dtype=src_dtype)
    for lo in range(0, numel, per):
        n = min(per, numel - lo)
        view = _as_bytes(stage[:n])
        if f.readinto(view) != len(view):
            raise ValueError(f"unexpected end of file reading a tensor at offset {begin}")
        flat[lo:lo + n].copy_(stage[:n])
    return dest


def iter_tensors(path: str, make: Callable[[str, tuple, torch.dtype], Optional[torch.Tensor]]):
    """For every tensor of ``path`` in file order, ``make(name, shape, file dtype)`` returns the
    contiguous CPU tensor to fill (or None to skip it); each is read straight into it and yielded as
    (name, tensor)."""
    header, start = read_header(path)
    order = sorted(header, key=lambda k: header[k]["data_offsets"][0])
    with open(path, "rb", buffering=0) as f:
        for name in order:
            entry = header[name]
            dest = make(name, tuple(entry["shape"]), DTYPES.get(entry["dtype"]))
            if dest is not None:
                yield name, read_into(f, entry, start, dest)


class StreamWriter:
    """Write a safetensors file tensor by tensor: ``specs`` [(name, shape, dtype)] fixes the header,
    then ``write(name, tensor)`` in the same order (each tensor may be freed right after). Atomic:
    the file appears under ``path`` only after ``close()`` saw every tensor written."""

    def __init__(self, path: str, specs: Sequence[Tuple[str, Sequence[int], torch.dtype]],
                 metadata: Optional[Dict[str, str]] = None):
        self.path, self.tmp = path, path + ".tmp"
        header: Dict[str, dict] = {"__metadata__": {"format": "pt", **(metadata or {})}}
        offset = 0
        self.expected = []
        for name, shape, dtype in specs:
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            self.expected.append((name, tuple(shape), dtype))
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data section 8-byte aligned, as the reference writer does
        self.f = open(self.tmp, "wb")
        self.f.write(struct.pack("<Q", len(raw)) + raw)
        self.next = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        want = self.expected[self.next] if self.next < len(self.expected) else None
        got = (name, tuple(tensor.shape), tensor.dtype)
        if want != got:
            self.abort()
            raise ValueError(f"StreamWriter for {self.path}: expected {want}, got {got}")
        view = _as_bytes(tensor.detach().contiguous().cpu())
        for lo in range(0, len(view), CHUNK_BYTES):
            self.f.write(view[lo:lo + CHUNK_BYTES])
        self.next += 1

    def close(self) -> None:
        if self.next != len(self.expected):
            self.abort()
            raise ValueError(f"StreamWriter for {self.path}: {len(self.expected) - self.next} tensors never written")
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        if not self.f.closed:
            self.f.close()
        if os.path.exists(self.tmp):
            os.remove(self.tmp)

    def __enter__(self):
        return self

    def __exit__(self, kind, *_):
        if kind is None:
            self.close()
        else:
            self.abort()


def write_streamed(path: str, specs: Iterable[Tuple[str, Sequence[int], torch.dtype]],
                   produce: Callable[[str, tuple, torch.dtype], torch.Tensor],
                   metadata: Optional[Dict[str, str]] = None) -> int:
    """Write ``specs`` to ``path``, each tensor made by ``produce(name, shape, dtype)`` just before it is
    written; returns the bytes of tensor data."""
    specs = [(n, tuple(s), d) for n, s, d in specs]
    with StreamWriter(path, specs, metadata) as w:
        for name, shape, dtype in specs:
            w.write(name, produce(name, shape, dtype))
    return sum(math.prod(s) * d.itemsize for _, s, d in specs)
