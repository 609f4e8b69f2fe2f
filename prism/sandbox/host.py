"""The host side of ``prism.sandbox.executor``'s sandbox: what this machine can isolate with (probed once),
one control group per job, and the bookkeeping around a job (sandbox uids, paths to keep visible,
killing what is left).

Isolation levels (``LEVELS``, weakest first), each including the one before it:

* ``none``: a process group with resource limits (rlimits) only.
* ``namespaces``: ``unshare`` namespaces (network, PID, IPC, UTS, mount), a read-only root file
  system with fresh size-capped tmpfs on the job dir, ``/tmp``, ``/var/tmp`` and ``/dev/shm``, as
  root a fresh uid per job. The job's memory and process count are bounded by per-process limits
  divided so that their product is the job's limit (``JobLimits``).
* ``strict``: as ``namespaces``, and a control group per job (cgroup v1 ``memory`` + ``pids``, or
  v2 ``memory.max`` + ``pids.max``) holds the whole job's memory and process count.
"""
from __future__ import annotations

import dataclasses
import os
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from typing import Any, Dict, List, Optional

LEVELS = ("none", "namespaces", "strict")
NS_FLAGS = ["--net", "--pid", "--ipc", "--uts", "--mount", "--fork", "--kill-child", "--mount-proc"]
REPLACED = ("/tmp", "/var/tmp", "/dev/shm")     # fresh tmpfs inside the sandbox
CGROUP_ROOT = "/sys/fs/cgroup"
_INFO: Optional[Dict[str, Any]] = None
_INFO_LOCK = threading.Lock()
_UID_LOCK = threading.Lock()
_UIDS: set = set()


class IsolationUnavailable(RuntimeError):
    """The requested isolation cannot be had on this machine (and no weaker mode was allowed)."""


# --------------------------------------------------------------------------- control groups
def _own_cgroup(controller: str) -> Optional[str]:
    """This process's cgroup path for a v1 ``controller`` ('' = v2), from /proc/self/cgroup."""
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, names, path = line.rstrip("\n").split(":", 2)
                if controller in names.split(",") or (controller == "" and names == ""):
                    return path
    except OSError:
        pass
    return None


@dataclasses.dataclass
class CGroupJob:
    """One job's control group(s): created with the job's limits, joined by the job's trusted bootstrap
    (its ``procs`` files), read after the job (``oom_killed``, ``pids_refused``), killed and removed."""

    version: str
    dirs: Dict[str, str]            # controller ('memory', 'pids', or 'unified') -> directory

    @property
    def procs(self) -> List[str]:
        return [os.path.join(d, "cgroup.procs") for d in dict.fromkeys(self.dirs.values())]

    def _read(self, ctrl: str, name: str) -> str:
        try:
            with open(os.path.join(self.dirs[ctrl], name)) as f:
                return f.read()
        except (OSError, KeyError):
            return ""

    def _field(self, ctrl: str, name: str, key: str) -> int:
        for line in self._read(ctrl, name).splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[0] == key:
                return int(parts[1])
        return 0

    def oom_killed(self) -> bool:
        """Did the kernel kill a process of the job for its memory limit (Eq.: the v1 ``oom_kill``
        counter of memory.oom_control, or v2 ``memory.events``)?"""
        if self.version == "v1":
            return self._field("memory", "memory.oom_control", "oom_kill") > 0
        return self._field("unified", "memory.events", "oom_kill") > 0

    def pids_refused(self) -> bool:
        """Did the job try to create more processes than ``pids.max``?"""
        return self._field("pids" if self.version == "v1" else "unified", "pids.events", "max") > 0

    def pids(self) -> List[int]:
        out = []
        for path in self.procs:
            try:
                with open(path) as f:
                    out += [int(x) for x in f.read().split()]
            except OSError:
                pass
        return out

    def destroy(self, wait: float = 2.0) -> None:
        """SIGKILL everything still in the group, then remove it (retried while the kernel reaps)."""
        deadline = time.monotonic() + wait
        for d in dict.fromkeys(self.dirs.values()):
            while True:
                for pid in self.pids():
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except OSError:
                        pass
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        break
                    time.sleep(0.01)


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def create_cgroup(version: str, memory_bytes: int, max_pids: int, root: str = CGROUP_ROOT,
                  name: Optional[str] = None) -> CGroupJob:
    """A fresh group (v1: one under this process's ``memory`` and one under its ``pids`` hierarchy;
    v2: one under this process's group) with the job's memory (no swap) and process limits."""
    name = name or f"prism-exec-{os.getpid()}-{secrets.token_hex(4)}"
    made: Dict[str, str] = {}
    job = CGroupJob(version, made)
    try:
        if version == "v1":
            for ctrl in ("memory", "pids"):
                d = os.path.join(root, ctrl, (_own_cgroup(ctrl) or "/").lstrip("/"), name)
                os.mkdir(d)
                made[ctrl] = d
            _write(os.path.join(made["memory"], "memory.limit_in_bytes"), str(memory_bytes))
            sw = os.path.join(made["memory"], "memory.memsw.limit_in_bytes")
            if os.path.exists(sw):
                _write(sw, str(memory_bytes))
            _write(os.path.join(made["pids"], "pids.max"), str(max_pids))
        elif version == "v2":
            d = os.path.join(root, (_own_cgroup("") or "/").lstrip("/"), name)
            os.mkdir(d)
            made["unified"] = d
            _write(os.path.join(d, "memory.max"), str(memory_bytes))
            if os.path.exists(os.path.join(d, "memory.swap.max")):
                _write(os.path.join(d, "memory.swap.max"), "0")
            _write(os.path.join(d, "pids.max"), str(max_pids))
        else:
            raise ValueError(f"cgroup version must be 'v1' or 'v2', got {version!r}")
    except BaseException:
        job.destroy(wait=0.2)
        raise
    return job


def cgroup_version(root: str = CGROUP_ROOT) -> Optional[str]:
    """'v1' or 'v2' when this process can create a job group with memory and process limits, else None.
    v2 needs ``memory`` and ``pids`` in the subtree_control of this process's group (a delegated
    subtree); v1 needs the ``memory`` and ``pids`` hierarchies writable (as root)."""
    v2_parent = os.path.join(root, (_own_cgroup("") or "/").lstrip("/"))
    try:
        with open(os.path.join(v2_parent, "cgroup.subtree_control")) as f:
            v2_ok = {"memory", "pids"} <= set(f.read().split())
    except OSError:
        v2_ok = False
    for version, ok in (("v2", v2_ok), ("v1", os.path.isdir(os.path.join(root, "memory"))
                                         and os.path.isdir(os.path.join(root, "pids")))):
        if not ok:
            continue
        try:
            create_cgroup(version, 64 << 20, 4, root).destroy(wait=0.5)
            return version
        except OSError:
            continue
    return None


# --------------------------------------------------------------------------- what the machine gives
def _probe(prefix: List[str]) -> bool:
    try:
        return subprocess.run(prefix + ["true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def sandbox_info() -> Dict[str, Any]:
    """Which isolation this machine gives (probed once per process, cached): ``mode`` ('ns-root',
    'ns-user' or 'none'), the ``unshare`` prefix, ``cgroup`` ('v1', 'v2' or None) and ``level``."""
    global _INFO
    with _INFO_LOCK:
        if _INFO is None:
            unshare = shutil.which("unshare")
            mode, prefix = "none", []
            if unshare and os.geteuid() == 0 and _probe([unshare] + NS_FLAGS):
                mode, prefix = "ns-root", [unshare] + NS_FLAGS
            elif unshare and _probe([unshare, "--user", "--map-root-user"] + NS_FLAGS):
                mode, prefix = "ns-user", [unshare, "--user", "--map-root-user"] + NS_FLAGS
            cg = cgroup_version() if mode != "none" else None
            _INFO = {"mode": mode, "prefix": prefix, "uid_drop": mode == "ns-root", "cgroup": cg,
                     "level": "strict" if cg else ("namespaces" if mode != "none" else "none"),
                     "network_namespace": mode != "none", "pid_namespace": mode != "none",
                     "read_only_root": mode != "none", "nproc_enforced": mode == "ns-root" or os.geteuid() != 0,
                     "rlimits": ["AS", "CPU", "FSIZE", "NOFILE", "CORE", "NPROC"]}
        return dict(_INFO)


def _missing(level: str, info: Dict[str, Any]) -> str:
    if LEVELS.index(info["level"]) < LEVELS.index("namespaces"):
        why = ("`unshare` is not installed (util-linux)" if not shutil.which("unshare") else
               "`unshare` cannot create network/PID/mount namespaces here (as root: a container without "
               "CAP_SYS_ADMIN; otherwise: unprivileged user namespaces are disabled)")
        if level == "strict":
            why += "; and no writable cgroup memory + pids controllers"
        return why
    return ("no writable cgroup memory + pids controllers (cgroup v1 needs root; v2 needs a delegated "
            "subtree with memory and pids in cgroup.subtree_control)")


def resolve_isolation(isolation: str = "auto", allow_weaker_isolation: bool = False,
                      gin_name: str = "tasks.mbpp") -> Dict[str, Any]:
    """The sandbox settings for a request: ``'auto'`` (the strongest available, at least
    ``namespaces``), ``'strict'``, ``'namespaces'`` or ``'none'`` (asked for by name: allowed).
    A request the machine cannot meet raises ``IsolationUnavailable`` saying what is missing, unless
    ``allow_weaker_isolation`` (then the strongest available is used, and recorded). ``gin_name``: the
    configurable whose options the refusal names (the task that runs the code)."""
    if isolation not in ("auto",) + LEVELS:
        raise ValueError(f"isolation must be one of {('auto',) + LEVELS}, got {isolation!r}")
    info = sandbox_info()
    want = "namespaces" if isolation == "auto" else isolation
    if LEVELS.index(info["level"]) < LEVELS.index(want) and not allow_weaker_isolation:
        raise IsolationUnavailable(
            f"the code sandbox needs isolation {want!r} but this machine gives {info['level']!r}: "
            f"{_missing(want, info)}. To run generated code with weaker isolation, ask for it by name: "
            "allow_weaker_isolation=True (the strongest available is used and recorded), or isolation="
            f"'{info['level']}' (gin: {gin_name}.allow_weaker_isolation = True or {gin_name}.isolation = "
            f"'{info['level']}').")
    level = info["level"] if isolation == "auto" or allow_weaker_isolation else want
    level = LEVELS[min(LEVELS.index(level), LEVELS.index(info["level"]))]
    out = dict(info, level=level)
    if level == "none":
        out.update(mode="none", prefix=[], uid_drop=False, read_only_root=False)
    if level != "strict":
        out["cgroup"] = None
    return out


@dataclasses.dataclass
class JobLimits:
    """How a job's memory and process limits are enforced: with a cgroup, for the whole job (and each
    process's address space at the job's limit); without, ``per_process_mb = memory_mb // processes``
    so that processes x address space, the most the job can hold, stays within ``memory_mb``."""

    memory_mb: int
    processes: int
    per_process_mb: int
    cgroup: Optional[str]

    @classmethod
    def make(cls, memory_mb: int, max_processes: Optional[int], cgroup: Optional[str]) -> "JobLimits":
        processes = int(max_processes if max_processes is not None else (16 if cgroup else 4))
        if memory_mb < 16 or processes < 1:
            raise ValueError(f"need memory_mb >= 16 and max_processes >= 1, got {memory_mb}, {processes}")
        per = memory_mb if cgroup else memory_mb // processes
        if per < 16:
            raise ValueError(f"without a cgroup each of the {processes} processes may use memory_mb // "
                             f"max_processes = {per} MiB: too little for Python; lower max_processes")
        return cls(int(memory_mb), processes, int(per), cgroup)

    def describe(self) -> str:
        if self.cgroup:
            return f"cgroup {self.cgroup}: {self.memory_mb} MiB and {self.processes} processes per job"
        return f"rlimits: {self.processes} processes x {self.per_process_mb} MiB address space"


# --------------------------------------------------------------------------- job bookkeeping
def each_proc(name: str):
    """(pid, contents) of every readable /proc/<pid>/<name>."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/{name}", "rb") as f:
                yield int(pid), f.read()
        except OSError:
            pass


def task_count(uid: int) -> int:
    """Tasks (threads) of ``uid``: what RLIMIT_NPROC counts."""
    n = 0
    for _pid, st in each_proc("status"):
        fields = dict(line.split(b":", 1) for line in st.splitlines() if b":" in line)
        if int(fields.get(b"Uid", b"-1").split()[0]) == uid:
            n += int(fields.get(b"Threads", b"1"))
    return n


def interpreter_paths() -> List[str]:
    """Where this interpreter, its prefix and its import path live (real paths, outermost first)."""
    cands = [os.path.dirname(sys.executable), os.path.dirname(os.path.realpath(sys.executable)),
             sys.prefix, sys.base_prefix, sys.exec_prefix] + [p for p in sys.path if p]
    out: List[str] = []
    for p in sorted({os.path.realpath(c) for c in cands if os.path.exists(c)}, key=len):
        if not any(p == q or p.startswith(q.rstrip("/") + "/") for q in out):
            out.append(p)
    return out


def kept_paths(replaced=REPLACED) -> List[str]:
    """Interpreter paths under a directory the sandbox replaces with an empty tmpfs (a virtual
    environment under /tmp): bound back read-only inside, so a program can start the interpreter."""
    return [p for p in interpreter_paths() if any(p.startswith(r + "/") for r in replaced)]


def exposures() -> Dict[str, List[str]]:
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


def alloc_uid() -> int:
    with _UID_LOCK:
        base = 100_000_000 + (os.getpid() % 1_000_000) * 1024
        for i in range(1024):
            if base + i not in _UIDS:
                _UIDS.add(base + i)
                return base + i
    raise RuntimeError("no free sandbox uid")


def free_uid(uid: int) -> None:
    with _UID_LOCK:
        _UIDS.discard(uid)


def kill_marked(marker: bytes) -> None:
    """SIGKILL every process whose environment still carries this job's marker."""
    for pid, env in each_proc("environ"):
        if marker in env and pid != os.getpid():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
