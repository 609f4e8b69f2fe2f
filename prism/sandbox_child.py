"""The trusted side of ``prism.execution``'s sandbox: the code the executor runs first in every fresh
interpreter (``python -I -c <this file's text>``), before any model-written code. It reads its job
from stdin (program, tests, limits, which file descriptors carry the success token and the result),
sets the resource limits and, where the executor found private namespaces, the size-capped mounts,
drops to the job's own user id, installs the guard, runs setup → program → (restored builtins and
modules) → tests, and only after the last test statement passes the token on. Importing this module
does nothing; it is never imported by the executor (only read as text).
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
def _mounts(P):
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    def mount(src, tgt, fs, flags, data):
        if libc.mount(src.encode(), tgt.encode(), fs.encode() if fs else None,
                      ctypes.c_ulong(flags), data.encode() if data else None) != 0:
            err = ctypes.get_errno(); raise OSError(err, "mount %s: %s" % (tgt, os.strerror(err)))
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
    for d in ("/tmp", "/var/tmp", "/dev/shm"):
        if os.path.isdir(d) and not os.path.islink(d):
            mount("tmpfs", d, "tmpfs", TMP, "mode=1777,size=8m")
    os.makedirs(P["jobdir"], exist_ok=True)
    mount("tmpfs", P["jobdir"], "tmpfs", TMP, "mode=0700,size=%dm" % P["disk_mb"])
    if P["uid"] is not None: os.chown(P["jobdir"], P["uid"], P["uid"])
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
def _worker(P, report):
    import builtins, types
    exit_, read, write, out, err = os._exit, os.read, os.write, sys.stdout, sys.stderr
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
            report(status="error", message="setup/tests do not compile: " + _fmt(e)); done(2)
        main = types.ModuleType("__main__"); ns = main.__dict__; ns["__builtins__"] = builtins
        sys.modules["__main__"] = main
        bdict = builtins.__dict__; bsnap = dict(bdict)
        mods = {n: (m, dict(vars(m))) for n, m in list(sys.modules.items()) if hasattr(m, "__dict__")}
        exec(setup_c, ns); setup_names = dict(ns)
    except BaseException as e:
        report(status="error", message="sandbox setup failed: " + _fmt(e)); done(3)
    try:
        exec(compile(P["program"], "<program>", "exec"), ns)
    except BaseException as e:
        report(status="failed", message="program: " + _fmt(e, "<program>", P["program"])); done(1)
    try:
        _restore(bdict, bsnap, mods, ns, setup_names)
        exec(tests_c, ns)
    except BaseException as e:
        report(status="failed", message=_fmt(e, "<tests>", P["tests"])); done(1)
    try: write(P["res_fd"], b"PASS " + read(P["tok_fd"], 256) + b"\n")
    except BaseException: done(4)
    done(0)
def _main():
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
        for name, lim in P["rlimits"].items(): resource.setrlimit(getattr(resource, name), tuple(lim))
        if P["mounts"]: _mounts(P)
    except BaseException as e:
        report(status="error", message="sandbox setup failed: " + _fmt(e)); os._exit(3)
    pid = os.fork()
    if pid == 0:
        try: _worker(P, report)
        finally: os._exit(70)
    os.close(P["tok_fd"])
    _, st = os.waitpid(pid, 0)
    report(exit=os.waitstatus_to_exitcode(st))
    os._exit(0)
if __name__ == "__main__":  # run by the executor as `python -I -c <this file>`
    _main()
