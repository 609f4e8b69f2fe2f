"""Where the project finds shared data and caches (overridable by environment variables)."""
import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The data folder: PRISM_DATA; else ../shared/data beside the checkout where it exists (read from there,
# never copied); else ~/.cache/prism/data, where `python -m prism.data fetch ...` writes.
_SHARED_DATA = os.path.join(os.path.dirname(REPO_ROOT), "shared", "data")
DATA_ROOT = os.environ.get("PRISM_DATA") or (
    _SHARED_DATA if os.path.isdir(_SHARED_DATA) else os.path.join(os.path.expanduser("~"), ".cache", "prism", "data"))
CACHE_ROOT = os.environ.get("PRISM_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "prism"))


def write_text_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: readers (and a crash) see
    the old content or the new one, never a half-written file."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def publish_dir(tmp: str, path: str, meta: dict) -> None:
    """Finish a cache directory built in ``tmp``: write ``meta.json`` last (its presence marks a
    complete cache) and rename ``tmp`` to ``path``. If another process published ``path`` first, its
    copy stays and ``tmp`` is left for the caller to remove; any other failure is raised."""
    import json

    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f)
    try:
        os.rename(tmp, path)
    except OSError:
        if not os.path.exists(os.path.join(path, "meta.json")):
            raise

