"""Run untrusted Python (model-written code plus its tests) in a constrained child process.

Each program runs as ``python -I -B -c BOOTSTRAP program.py`` in a fresh temporary directory (its
cwd, ``HOME`` and ``TMPDIR``), in its own process group, with a small environment. The bootstrap
runs before any untrusted code and

- sets resource limits (``RLIMIT_AS`` memory, ``RLIMIT_CPU``, ``RLIMIT_FSIZE``, ``RLIMIT_NPROC``,
  no core files), soft = hard so the program cannot raise them again;
- installs a ``sys.addaudithook`` hook that refuses: opening a file for writing (any of
  ``w a x +``, or ``O_WRONLY/O_RDWR/O_CREAT/O_APPEND/O_TRUNC``), and removing, renaming, linking,
  creating directories, chmod/chown/utime/truncate/xattr, anywhere outside the temp dir (paths are
  resolved with ``realpath``, so a symlink inside the temp dir does not lead out of it; calls with
  a ``dir_fd`` and ``os.open`` of a directory outside are refused); creating processes
  (``os.fork``, ``os.system``, ``os.exec*``, ``os.spawn*``, ``os.posix_spawn``,
  ``subprocess.Popen``, importing ``_posixsubprocess``); loading native code (``ctypes``);
  network use (``socket.connect/bind/sendto/sendmsg``, name lookups); signalling other
  processes;
- then executes the program as ``__main__``.

The parent adds the wall-clock timeout (the whole process group is SIGKILLed) and, where the
kernel allows unprivileged user namespaces, runs the child under ``unshare -rn`` so it has no
network interface but loopback (down). Stdout/stderr go to files, capped by ``RLIMIT_FSIZE``.

Audit hooks are a guard against accidents, not a security boundary: see docs/evaluation.md for
what this does not protect against.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STATUSES = ("passed", "failed", "timeout", "memory", "error")

# Runs in the child before the program. argv: [-c, work_dir, program_path, limits].
BOOTSTRAP = r'''
import os, sys, resource

def _sandbox(work, limits):
    mem, cpu, fsize, nproc = (int(x) for x in limits.split(","))
    for res, value in ((resource.RLIMIT_AS, mem), (resource.RLIMIT_CPU, cpu),
                       (resource.RLIMIT_FSIZE, fsize), (resource.RLIMIT_NPROC, nproc),
                       (resource.RLIMIT_CORE, 0)):
        if value >= 0:  # CPU: SIGXCPU at the soft limit (the hard one would SIGKILL)
            hard = value + 1 if res == resource.RLIMIT_CPU else value
            try:
                resource.setrlimit(res, (value, hard))
            except (ValueError, OSError):
                pass

    realpath, isdir, fsdecode, sep = os.path.realpath, os.path.isdir, os.fsdecode, os.sep
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC

    def inside(path):
        if isinstance(path, int):  # an already open descriptor
            return True
        try:
            real = realpath(fsdecode(path))
        except Exception:
            return False
        return real == work or real.startswith(work + sep)

    # event -> indices of path arguments that must lie inside, index of a dir_fd argument (or None)
    paths = {
        "os.remove": ((0,), 1), "os.rmdir": ((0,), 1), "os.mkdir": ((0,), 2),
        "os.rename": ((0, 1), 2), "os.link": ((0, 1), 2), "os.symlink": ((1,), 2),
        "os.truncate": ((0,), None), "os.chmod": ((0,), 2), "os.chown": ((0,), 3),
        "os.utime": ((0,), 3), "os.chflags": ((0,), None), "os.lchflags": ((0,), None),
        "os.lchmod": ((0,), None), "os.setxattr": ((0,), None), "os.removexattr": ((0,), None),
        "shutil.rmtree": ((0,), None), "shutil.copyfile": ((1,), None),
        "shutil.copymode": ((1,), None), "shutil.copystat": ((1,), None),
        "shutil.move": ((0, 1), None), "sqlite3.connect": ((0,), None),
    }
    refused = {
        "os.fork", "os.forkpty", "os.system", "os.exec", "os.spawn", "os.posix_spawn",
        "subprocess.Popen", "pty.spawn", "ctypes.dlopen", "ctypes.dlsym", "ctypes.call_function",
        "socket.connect", "socket.bind", "socket.sendto", "socket.sendmsg", "socket.getaddrinfo",
        "socket.gethostbyname", "socket.gethostbyaddr", "socket.gethostbyname_ex",
        "os.kill", "os.killpg", "signal.pthread_kill", "os.setsid", "resource.setrlimit",
        "resource.prlimit", "sys.addaudithook", "os.chroot", "webbrowser.open",
    }
    refused_imports = {"_posixsubprocess", "_ctypes", "ctypes"}

    def deny(event, what):
        raise PermissionError(f"sandbox: {event} {what!r} is not allowed")

    def hook(event, args):
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None, 0))[:3]
            writes = bool((flags or 0) & write_flags) or any(c in (mode or "") for c in "wax+")
            if isinstance(path, int):
                return
            if writes and not inside(path):
                deny("writing", path)
            if mode is None and not inside(path):  # os.open: no dir fds outside (dir_fd tricks)
                try:
                    if isdir(path):
                        deny("opening directory", path)
                except PermissionError:
                    raise
                except Exception:
                    pass
        elif event in paths:
            indices, dir_fd = paths[event]
            if dir_fd is not None and len(args) > dir_fd and args[dir_fd] not in (None, -1):
                deny(event + " with dir_fd", args[0])
            for i in indices:
                if i < len(args) and not inside(args[i]):
                    deny(event, args[i])
        elif event in refused:
            deny(event, args[0] if args else "")
        elif event == "import" and args and args[0] in refused_imports:
            raise ImportError(f"sandbox: importing {args[0]} is not allowed")

    sys.addaudithook(hook)


def _main():
    work, program, limits = sys.argv[1], sys.argv[2], sys.argv[3]
    with open(program, encoding="utf-8") as f:
        source = f.read()
    code = compile(source, "program.py", "exec")
    sys.argv[:] = ["program.py"]
    _sandbox(os.path.realpath(work), limits)
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})

_main()
'''


@dataclasses.dataclass
class SandboxResult:
    """``status``: passed (exit 0) | failed (non-zero exit: an exception, a failed assert, a
    refused operation) | timeout (wall or CPU limit) | memory (MemoryError or killed for memory)
    | error (the sandbox itself could not run the program, or output exceeded its limit)."""

    passed: bool
    status: str
    stderr_tail: str
    returncode: int | None
    elapsed_s: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@functools.cache
def unshare_available() -> bool:
    """Whether ``unshare -rn`` (new user + network namespace, no privileges) works here."""
    exe = shutil.which("unshare")
    if not exe:
        return False
    try:
        return subprocess.run([exe, "-rn", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def _tail(path: Path, limit: int) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - limit))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def run_program(program: str, *, timeout_s: float = 5.0, memory_mb: int = 1024,
                cpu_s: int | None = None, max_file_mb: int = 16, max_processes: int = 0,
                network: str = "auto", python: str | None = None,
                stderr_chars: int = 2000) -> SandboxResult:
    """Run ``program`` (Python source) in the sandbox; see the module docstring.

    Args:
      timeout_s: wall-clock limit; the process group is killed when it passes.
      memory_mb: address-space limit (RLIMIT_AS) of the child.
      cpu_s: CPU-time limit (default: the wall limit rounded up, plus one second).
      max_file_mb: largest file the child may write (RLIMIT_FSIZE), its stdout/stderr included.
      max_processes: RLIMIT_NPROC (-1 leaves it alone). Linux does not enforce it for root, and
        process creation is refused by the audit hook anyway.
      network: 'auto' (``unshare -rn`` when it works, else only the audit hook), 'unshare'
        (required; an error if unavailable), 'hook' (audit hook only).
      python: interpreter (default: this one).
    """
    cpu_s = int(cpu_s if cpu_s is not None else int(timeout_s) + 1)
    limits = f"{memory_mb * 2**20},{cpu_s},{max_file_mb * 2**20},{max_processes}"
    use_unshare = {"auto": unshare_available(), "unshare": True, "hook": False}.get(network)
    if use_unshare is None:
        raise ValueError(f"network={network!r}: use 'auto', 'unshare' or 'hook'.")
    if use_unshare and not unshare_available():
        raise RuntimeError("network='unshare' but `unshare -rn` does not work on this machine.")
    root = Path(tempfile.mkdtemp(prefix="mtp-sandbox-"))
    try:
        work = root / "work"
        work.mkdir()
        prog = root / "program.py"
        prog.write_text(program, encoding="utf-8")
        cmd = [python or sys.executable, "-I", "-B", "-c", BOOTSTRAP, str(work), str(prog), limits]
        if use_unshare:
            cmd = [shutil.which("unshare") or "unshare", "-rn", "--", *cmd]
        env = {"PATH": "/usr/bin:/bin", "HOME": str(work), "TMPDIR": str(work), "LANG": "C.UTF-8",
               "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
        start = time.perf_counter()
        timed_out = False
        with (root / "stdout").open("wb") as out, (root / "stderr").open("wb") as err:
            try:
                proc = subprocess.Popen(cmd, cwd=work, env=env, stdin=subprocess.DEVNULL,
                                        stdout=out, stderr=err, start_new_session=True)
            except OSError as e:
                return SandboxResult(False, "error", f"could not start the sandbox: {e}", None, 0.0)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                try:  # the whole group (not yet reaped, so the id is still ours)
                    os.killpg(proc.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                proc.wait()
        elapsed = time.perf_counter() - start
        stderr = _tail(root / "stderr", stderr_chars)
        rc = proc.returncode
        if timed_out:
            status = "timeout"
        elif rc == 0:
            status = "passed"
        elif rc == -signal.SIGXCPU:
            status = "timeout"
        elif "MemoryError" in stderr or rc == -signal.SIGKILL:  # SIGKILL not ours: the OOM killer
            status = "memory"
        elif rc == -signal.SIGXFSZ:
            status, stderr = "error", stderr + f"\nsandbox: output or file over {max_file_mb} MiB"
        elif rc is not None and rc < 0:
            status = "failed" if rc != -signal.SIGSEGV else "error"
        else:
            status = "failed"
        return SandboxResult(status == "passed", status, stderr[-stderr_chars:], rc, elapsed)
    finally:
        shutil.rmtree(root, ignore_errors=True)
