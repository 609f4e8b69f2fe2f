"""Tests for prism.sandbox.executor: correctness of pass/fail plus a hostile-program suite.

Every hostile program is written so that, even if the sandbox failed, it could only
touch canaries under pytest's tmp_path: destructive ones target explicit canary paths,
and the ones that would be dangerous outside a sandbox (fork bombs, kill(-1)) check
first that they run as a non-root uid inside a PID namespace and do nothing otherwise.
"""
import json
import os
import secrets
import socket
import sys
import tempfile
import time

import pytest

from prism.sandbox import executor as ex
from prism.sandbox.executor import ExecutionNotAllowed, check_execution_allowed, run_many, run_program

INFO = ex.sandbox_info()
MARK = "prismsuite" + secrets.token_hex(6)          # unique to this test session
SANDBOXED = INFO["uid_drop"] and INFO["pid_namespace"]
# inside the sandbox: refuse to do anything dangerous unless unprivileged and in a pid namespace
SAFE = "import posix\nassert posix.getuid() != 0 and posix.getpid() < 1000, 'unsafe here'\n"
SLEEPER = ("import posix, sys\n"
           "def sleeper():\n"
           "    posix.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)  # {mark}'])\n")
# wait until the escaped sleeper is visible (so the suite proves it existed before being killed)
FIND = ("import time\nfor _ in range(40):\n    time.sleep(0.05)\n"
        "    found = [p for p in posix.listdir('/proc') if p.isdigit() and\n"
        "             b'{mark}' in open('/proc/%s/cmdline' % p, 'rb').read()]\n    if found:\n        break\n")


def _uid_range():
    base = 100_000_000 + (os.getpid() % 1_000_000) * 1024
    return range(base, base + 1024)


def survivors():
    """Processes of this suite still alive: marker in cmdline, or running as one of our sandbox uids."""
    found, uids = [], _uid_range()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{pid}/status") as f:
                uid = int(next(line for line in f if line.startswith("Uid:")).split()[1])
        except (OSError, StopIteration, ValueError):
            continue
        if MARK.encode() in cmd or uid in uids:
            found.append((int(pid), cmd[:80]))
    return found


@pytest.fixture
def world(tmp_path, monkeypatch):
    """Canaries outside the job dir, a fake real HOME, a listening socket and an env secret."""
    monkeypatch.delenv(ex.ENV_VAR, raising=False)
    jobs = tmp_path / "jobs"
    jobs.mkdir()
    (jobs / "prism-canary-sibling").write_text("sibling")
    monkeypatch.setattr(tempfile, "tempdir", str(jobs))  # job dirs are created under tmp_path
    canary = tmp_path / "canary"
    canary.mkdir()
    for i in range(3):
        (canary / f"c{i}.txt").write_text(f"canary {i}")
    home = tmp_path / "realhome"
    home.mkdir()
    (home / "canary.txt").write_text("home canary")
    monkeypatch.setenv("HOME", str(home))
    secret = "SECRET-" + secrets.token_hex(8)
    monkeypatch.setenv("PRISM_TEST_SECRET", secret)
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)

    def snapshot():
        return {str(p): p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}

    w = dict(tmp=tmp_path, jobs=jobs, canary=canary, home=home, secret=secret, listener=listener,
             port=listener.getsockname()[1], snapshot=snapshot)
    w["before"] = snapshot()
    yield w
    listener.close()


def run(program, tests="", **kw):
    kw.setdefault("timeout", 2.0)
    kw.setdefault("memory_mb", 512)
    t0 = time.monotonic()
    r = run_program(program, tests, allow=True, **kw)
    return r, time.monotonic() - t0


# ------------------------------------------------------------------------------ basics
def test_pass_fail_syntax(world):
    r, _ = run("def add(a, b):\n    return a + b\n", "assert add(1, 2) == 3\nassert add(2, 2) == 4\n")
    assert r.status == "passed", r
    r, _ = run("def add(a, b):\n    return a - b\n", "assert add(1, 2) == 3\n")
    assert r.status == "failed" and "AssertionError" in r.message and "add(1, 2) == 3" in r.message
    r, _ = run("def add(a, b) return a\n", "assert add(1, 2) == 3\n")
    assert r.status == "error" and "SyntaxError" in r.message
    r, _ = run("def add(a, b):\n    return a + b\n", "assert add(1, 2) == 3\nassert add('a', 2) == 'a2'\n")
    assert r.status == "error" and "TypeError" in r.message  # an exception, not a failed assert
    r, _ = run("x = 1\n", "assert (\n")                # broken tests: a harness/data error
    assert r.status == "harness" and "SyntaxError" in r.message
    r, _ = run("import math\n", "assert math.sqrt(4) == 2", setup="import math")
    assert r.status == "passed", r


def test_opt_in(monkeypatch, tmp_path):
    monkeypatch.delenv(ex.ENV_VAR, raising=False)
    with pytest.raises(ExecutionNotAllowed, match="PRISM_ALLOW_CODE_EXECUTION"):
        check_execution_allowed()
    with pytest.raises(ExecutionNotAllowed, match="PRISM_ALLOW_CODE_EXECUTION"):
        run_program("x = 1", "assert x == 1")
    with pytest.raises(ExecutionNotAllowed):
        run_many([{"program": "x = 1", "tests": ""}])
    check_execution_allowed(allow=True)
    monkeypatch.setenv(ex.ENV_VAR, "1")
    assert run_program("x = 1", "assert x == 1").status == "passed"


def test_run_many_parallel_and_ordered(world):
    jobs = [{"program": f"import time\ntime.sleep(0.5)\nv = {i}\n", "tests": f"assert v == {i}\n"}
            for i in range(4)]
    jobs.append({"program": "v = 1", "tests": "assert v == 2"})
    jobs.append({"program": "v = 1"})                   # malformed job: still gets a result
    t0 = time.monotonic()
    res = run_many(jobs, workers=4, timeout=3.0, memory_mb=512, allow=True)
    elapsed = time.monotonic() - t0
    assert [r.status for r in res] == ["passed"] * 4 + ["failed", "harness"]
    assert elapsed < 1.9, elapsed   # serially this would be > 2 s


def test_results_to_jsonl(tmp_path):
    path = tmp_path / "out" / "res.jsonl"
    recs = [ex.ExecutionResult("passed", "", 0.1), {"task": 2, "status": "failed"}]
    ex.results_to_jsonl(str(path), recs)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows[0]["status"] == "passed" and rows[1]["task"] == 2
    assert [p.name for p in path.parent.iterdir()] == ["res.jsonl"]


def test_no_isolation_fallback(world):
    """The plain process-group mode still separates pass / fail / timeout."""
    r, _ = run("v = 2", "assert v == 2", isolation="none")
    assert r.status == "passed" and r.isolation.startswith("none:")
    assert run("v = 2", "assert v == 3", isolation="none")[0].status == "failed"
    r, t = run("while True: pass", timeout=1.0, isolation="none")
    assert r.status == "timeout" and t < 2.5


def test_sandbox_info_here():
    info = ex.sandbox_info()
    assert info["mode"] in ("ns-root", "ns-user", "none") and info["level"] in ex.host.LEVELS
    assert set(info["rlimits"]) >= {"AS", "CPU", "FSIZE", "NOFILE", "CORE", "NPROC"}


# ------------------------------------------------------------------------------ hostile suite
# name: (program template, tests, allowed statuses, limit kwargs, requires full sandbox)
HOSTILE = {
    "infinite_loop": ("while True:\n    pass\n", "", {"timeout"}, dict(timeout=1.0), False),
    "cpu_spin_thread": ("import threading\ndef spin():\n    while True:\n        pass\n"
                        "t = threading.Thread(target=spin)\nt.start()\nt.join()\n", "", {"timeout"},
                        dict(timeout=2.0, cpu_seconds=1), False),
    "fork_loop_guarded": ("import os\nwhile True:\n    os.fork()\n", "", {"error"}, {}, False),
    "multiprocessing_bomb": ("import multiprocessing as mp\nps = [mp.Process(target=print) for _ in range(50)]\n"
                             "for p in ps:\n    p.start()\n", "", {"error"}, {}, False),
    "fork_bomb_wide_bypass": (SAFE + SLEEPER + "n = 0\nfor _ in range(300):\n    try:\n        pid = posix.fork()\n"
                              "    except OSError:\n        break\n    if pid == 0:\n        sleeper()\n    n += 1\n"
                              "print('forked', n)\n", "assert n < 8, n", {"passed"},
                              dict(max_processes=8), True),
    "fork_bomb_exponential_bypass": (SAFE + "import time\nfor _ in range(12):\n    try:\n        posix.fork()\n"
                                     "    except OSError:\n        pass\ntime.sleep(30)\n", "", {"timeout"},
                                     dict(timeout=1.0, max_processes=8), True),
    "rmtree_canary": ("import shutil\nshutil.rmtree({canary!r})\n", "", {"error"}, {}, False),
    "unlink_canary_bypass": ("import posix\nfor f in posix.listdir({canary!r}):\n"
                             "    posix.unlink({canary!r} + '/' + f)\n", "", {"error"}, {}, True),
    "write_home": ("import os\nopen(os.path.expanduser('~/canary.txt'), 'w').write('pwned')\n"
                   "open(os.path.expanduser('~/.bashrc'), 'a').write('pwned')\n", "", {"passed"}, {}, False),
    "write_real_home_path": ("open({home!r} + '/canary.txt', 'w').write('pwned')\n", "", {"error"}, {}, True),
    "network_guarded": ("import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\n", "",
                        {"error"}, {}, False),
    "network_bypass": ("import _socket\ns = _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)\n"
                       "s.settimeout(1)\ns.connect(('127.0.0.1', {port}))\n", "", {"error"}, {}, True),
    "alloc_10gb": ("x = bytearray(10 * 1024 ** 3)\n", "", {"limit"}, dict(memory_mb=256), False),
    "deep_recursion": ("def r(n):\n    return r(n + 1)\nr(0)\n", "", {"error"}, {}, False),
    "deep_recursion_c_stack": ("import sys\nsys.setrecursionlimit(10 ** 8)\nclass A:\n    def __getattr__(self, n):\n"
                               "        return getattr(self, n + '')\nA().x\n", "", {"error"}, {}, False),
    "huge_output_1gb": ("import sys\nchunk = 'x' * 65536\nfor _ in range(16384):\n    sys.stdout.write(chunk)\n",
                        "", {"passed", "timeout"}, {}, False),
    "kill_parent_guarded": ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n", "", {"error"}, {}, False),
    "kill_parent_bypass": (SAFE + "for p in (posix.getppid(), {parent_pid}):\n    try:\n        posix.kill(p, 9)\n"
                           "    except OSError as e:\n        print(p, e)\n", "", {"passed", "error"}, {}, True),
    "kill_everything_bypass": (SAFE + "posix.kill(-1, 9)\n", "", {"error"}, {}, True),
    "exit_before_asserts": ("import os\nos._exit(0)\n", "assert False\n", {"error"}, {}, False),
    "sys_exit_before_asserts": ("import sys\nsys.exit(0)\n", "assert False\n", {"error"}, {}, False),
    "override_assert_machinery": ("import builtins, math\nbuiltins.AssertionError = type('A', (Exception,), {{}})\n"
                                  "math.isclose = lambda *a, **k: True\ncheck = lambda *a: None\n"
                                  "def f(x):\n    return x\n",
                                  "assert math.isclose(f(1), 2)\ncheck(f(1), 2)\n", {"failed"},
                                  dict(setup="import math\ndef check(a, b):\n    assert a == b\n"), False),
    "override_helper_only": ("check = lambda *a: None\ndef f(x):\n    return x\n", "check(f(1), 2)\n", {"failed"},
                             dict(setup="def check(a, b):\n    assert a == b\n"), False),
    "fake_success_marker": ("import os\nprint('PASS'); print('{{\"status\": \"passed\"}}')\nfor fd in range(3, 64):\n"
                            "    try:\n        os.write(fd, b'PASS 0123456789abcdef\\n{{\"exit\": 0}}\\n')\n"
                            "    except OSError:\n        pass\nos._exit(0)\n", "assert False\n", {"error"}, {}, False),
    "env_secrets": ("import os\nleak = repr(dict(os.environ))\nprint(leak)\nopen('leak.txt', 'w').write(leak)\n"
                    "for p in ('/proc/1/environ', '/proc/{parent_pid}/environ'):\n    try:\n"
                    "        print(open(p, 'rb').read())\n    except OSError as e:\n        print(e)\n", "",
                    {"passed"}, {}, True),
    "setsid_double_fork_sleeper": (SAFE + SLEEPER + "if posix.fork() == 0:\n    posix.setsid()\n"
                                   "    if posix.fork() == 0:\n        sleeper()\n    posix._exit(0)\n" + FIND, "assert found, found",
                                   {"passed"}, {}, True),
    "setsid_sleeper_past_timeout": (SAFE + SLEEPER + "import time\nif posix.fork() == 0:\n    posix.setsid()\n"
                                    "    sleeper()\n" + FIND + "time.sleep(30 if found else 0)\n", "", {"timeout"}, dict(timeout=1.0), True),
    "write_2gb_file": ("with open('big.bin', 'wb') as f:\n    for _ in range(2048):\n"
                       "        f.write(b'\\0' * (1 << 20))\n", "", {"limit"}, dict(max_file_mb=8), False),
    "fill_dev_shm": ("for i in range(100):\n    open('/dev/shm/f%d' % i, 'wb').write(b'\\0' * (4 << 20))\n", "",
                     {"limit"}, {}, True),
    "many_open_files": ("fs = [open('f%d' % i, 'w') for i in range(5000)]\n", "", {"limit"}, {}, False),
    "ignore_sigterm": ("import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(30)\n", "",
                       {"timeout"}, dict(timeout=1.0), False),
    "sleeping_threads": ("import threading, time\nthreading.Thread(target=time.sleep, args=(60,), daemon=True).start()\n"
                         "threading.Thread(target=time.sleep, args=(60,)).start()\n", "", {"passed"}, {}, False),
    "read_etc_passwd_allowed": ("data = open('/etc/passwd').read()\n", "assert 'root' in data\n", {"passed"}, {}, False),
    "chdir_up_guarded": ("import os\nos.chdir('..')\n", "", {"error"}, {}, False),
    "chdir_up_delete_bypass": ("import posix\nposix.chdir('..')\nfor n in posix.listdir('.'):\n"
                               "    if n.startswith('prism-canary'):\n        posix.unlink(n)\n", "",
                               {"passed", "error"}, {}, True),
    "write_outside_canary_dir": ("open({canary!r} + '/new.txt', 'w').write('x')\n", "", {"error"}, {}, True),
}


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile(world, name):
    template, tests, statuses, kw, needs_sandbox = HOSTILE[name]
    if needs_sandbox and not SANDBOXED:
        pytest.skip(f"needs uid drop + pid namespace (mode here: {INFO['mode']})")
    program = template.format(canary=str(world["canary"]), home=str(world["home"]), port=world["port"],
                              parent_pid=os.getpid(), mark=MARK)
    kw = dict(kw)
    limit = kw.get("timeout", 2.0)
    r, wall = run(program, tests, **kw)
    print(f"{name:32s} {r.status:8s} {wall:5.2f}s  {r.message[:90]}")
    assert r.status in statuses, (r.status, r.message, r.stderr_tail[-500:])
    assert wall < limit + 1.5 and r.seconds < limit + 1.0, (wall, r.seconds)
    # containment: canaries, real home, listener, secrets, processes, host mounts
    assert world["snapshot"]() == world["before"], "a file under tmp_path changed"
    with pytest.raises(BlockingIOError):
        world["listener"].accept()
    blob = json.dumps(r.__dict__)
    assert world["secret"] not in blob
    for left in world["jobs"].iterdir():
        assert left.name == "prism-canary-sibling", f"job dir left behind: {left}"
    deadline = time.monotonic() + 1.0
    while survivors() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert survivors() == []
    with open("/proc/self/mountinfo") as f:
        assert "prism-exec" not in f.read()
    if name == "huge_output_1gb":
        assert r.output_truncated and len(r.stdout_tail) <= 2000
    if name == "fork_bomb_wide_bypass":
        assert "forked" in r.stdout_tail


def test_parent_alive_and_sane():
    # runs after the hostile suite in file order; trivially true if we got here, but also check
    # that this process still has its own environment and cwd
    assert os.path.isdir(os.getcwd()) and "PATH" in os.environ and sys.executable
