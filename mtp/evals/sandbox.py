"""Run untrusted Python (model-written code plus its tests) in a constrained child process.

Each program runs as ``python -I -B -c BOOTSTRAP program.py`` in a fresh temporary directory (its
cwd, ``HOME`` and ``TMPDIR``), in its own process group, with a small environment. The bootstrap
runs before any untrusted code and

- sets resource limits (``RLIMIT_AS`` memory, ``RLIMIT_CPU``, ``RLIMIT_FSIZE``, ``RLIMIT_NPROC``,
  no core files), soft = hard so the program cannot raise them again;
- kernel layer: sets ``no_new_privs``; where the kernel offers Landlock (Linux >= 5.13), restricts
  the process so that nothing can be created, written, removed, renamed or linked outside the temp
  dir (``/dev/null`` may be written), no device node anywhere, and, as the ABI allows, no TCP
  bind/connect, no abstract UNIX sockets or signals outside the sandbox; when the child is root
  (also root of ``unshare -r``'s user namespace) it drops every capability (bounding set,
  effective, permitted, ambient), so no device nodes, no ``CAP_DAC_OVERRIDE``;
- Python layer: installs a ``sys.addaudithook`` hook that refuses creating, writing, removing,
  renaming, linking, chmod/chown/utime/truncate/xattr of anything outside the temp dir (paths,
  ``dir_fd`` arguments and descriptors are resolved the way the kernel does, through
  ``/proc/self/fd`` and the symlinks on the way); ``os.open``, ``os.mkfifo`` and ``os.mknod``
  (which raise no audit event, or one without its ``dir_fd``) are replaced everywhere they are
  referenced by wrappers that route through the hook, which alone holds the originals; device nodes
  are refused, and ``os.mknod`` entirely when the child is root outside a user namespace; UNIX
  sockets may be bound or connected inside the temp dir only; fresh copies of ``posix``/``_imp``
  or of refused native modules, and extension modules the program wrote, are refused at
  ``_imp.create_builtin``/``_imp.create_dynamic``; creating processes (``os.fork``, ``os.system``,
  ``os.exec*``, ``os.spawn*``, ``os.posix_spawn``, ``subprocess.Popen``, ``_posixsubprocess``),
  loading native code (``ctypes``), subinterpreters, network use (``socket.connect/bind/sendto/
  sendmsg`` but UNIX sockets inside, name lookups), signalling other processes, tracing, ``gc``
  introspection and reading the hook's own frames are refused;
- then executes the program as ``__main__``.

The parent adds the wall-clock timeout (the whole process group is SIGKILLed) and, where the
kernel allows unprivileged user namespaces, runs the child under ``unshare -rn`` so it has no
network interface but loopback (down). Stdout/stderr go to files, capped by ``RLIMIT_FSIZE``.

Audit hooks are a guard against accidents, not a security boundary; Landlock is the part that
holds against adversarial code. See docs/evaluation.md for what this does not protect against.
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
FILESYSTEM_MODES = ("auto", "landlock", "hook", "kernel")
SETUP_FAILED = 121  # the child's exit code when a required isolation layer is not available

# The audit hook and its helpers. Executed by the bootstrap in a namespace of its own (NS), with the
# values listed in _guard() injected: frames whose f_globals is NS are the sandbox's own, and the
# original os.open/mkfifo/mknod and _imp.create_* live only here. Nothing here may run code of the
# program's objects (a __fspath__, __eq__ or __hash__ would see these frames): paths are copied to
# exact str with "".join, ints with int.__add__, types are compared with `is`.
_GUARD = r'''
NS = globals()
S_IFMT, S_IFLNK, S_IFCHR, S_IFBLK = 0o170000, 0o120000, 0o020000, 0o060000
TB_PENDING, OPEN_PENDING = {}, {}

# event -> ((index of a path argument that must lie inside, index of its dir_fd argument or None), ...)
PATHS = {
    "os.remove": ((0, 1),), "os.rmdir": ((0, 1),), "os.mkdir": ((0, 2),),
    "os.rename": ((0, 2), (1, 3)), "os.link": ((0, 2), (1, 3)), "os.symlink": ((1, 2),),
    "os.truncate": ((0, None),), "os.chmod": ((0, 2),), "os.chown": ((0, 3),), "os.utime": ((0, 3),),
    "os.chflags": ((0, None),), "os.lchflags": ((0, None),), "os.lchmod": ((0, None),),
    "os.setxattr": ((0, None),), "os.removexattr": ((0, None),), "shutil.rmtree": ((0, 1),),
    "shutil.copyfile": ((1, None),), "shutil.copymode": ((1, None),), "shutil.copystat": ((1, None),),
    "shutil.move": ((0, None), (1, None)), "sqlite3.connect": ((0, None),),
}
REFUSED_EVENTS = frozenset({
    "os.fork", "os.forkpty", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "subprocess.Popen",
    "pty.spawn", "ctypes.dlopen", "ctypes.dlsym", "ctypes.call_function", "socket.sendto",
    "socket.sendmsg", "socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr",
    "socket.gethostbyname_ex", "os.kill", "os.killpg", "signal.pthread_kill", "os.setsid",
    "resource.setrlimit", "resource.prlimit", "sys.addaudithook", "os.chroot", "webbrowser.open",
    "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys.settrace", "sys.setprofile",
    "sys._current_frames", "sys._current_exceptions", "cpython.PyInterpreterState_New",
    "syslog.openlog", "syslog.syslog",
})


def deny(what, exc=PermissionError):
    raise exc("sandbox: " + what + " is not allowed")


def is_int(x):
    return issubclass(type(x), int)


def text(p):
    """p as an exact str (None: not a path the sandbox reads)."""
    t = type(p)
    if t is str:
        return p
    if issubclass(t, str):
        return "".join((p,))
    if issubclass(t, bytes):
        return str(p, FS_ENCODING, "surrogateescape")
    for k in PATH_TYPES:
        if t is k:
            return pathlib_text(p)
    return None


def pathlib_text(p):
    """str(p) of a pathlib path, read from its slots as PurePath.__str__ computes it (that method,
    which the program could have replaced, is not called)."""
    try:
        return exact(PATH_SLOTS[0](p))
    except AttributeError:  # not computed yet
        pass
    drv, root, parts = PATH_SLOTS[1](p), PATH_SLOTS[2](p), PATH_SLOTS[3](p)
    if type(drv) is not str or type(root) is not str or type(parts) is not list:
        return None
    for part in parts:
        if type(part) is not str:
            return None
    if drv or root:
        return drv + root + "/".join(parts[1:])
    return "/".join(parts) or "."


def exact(s):
    return "".join((s,)) if issubclass(type(s), str) else None


def fd_target(fd):
    return readlink("/proc/self/fd/%d" % ADD0(fd))


def resolve(path, dir_fd):
    """The absolute path without symlinks that the kernel would use for path (None: unknown)."""
    try:
        s = text(path)
        if s is None or s == "" or "\0" in s:
            return None
        if s[:1] == "/":
            cur = ""
        else:
            if dir_fd is None or (is_int(dir_fd) and (ADD0(dir_fd) == -1 or ADD0(dir_fd) == AT_FDCWD)):
                base = getcwd()
            elif is_int(dir_fd):
                base = fd_target(dir_fd)
            else:
                return None
            if base[:1] != "/":
                return None
            cur = base.rstrip("/")
        todo = s.split("/")
        todo.reverse()
        hops = 0
        while todo:
            name = todo.pop()
            if name == "" or name == ".":
                continue
            if name == "..":
                cur = cur[:cur.rfind("/")] if cur else ""
                continue
            new = cur + "/" + name
            try:
                mode = lstat(new).st_mode
            except OSError:
                mode = 0
            if (mode & S_IFMT) == S_IFLNK:
                hops += 1
                if hops > 40:
                    return None
                target = readlink(new)
                if target[:1] == "/":
                    cur = ""
                more = target.split("/")
                more.reverse()
                todo.extend(more)
                continue
            cur = new
        return cur or "/"
    except Exception:
        return None


def within(real):
    return real is not None and (real == WORK or real.startswith(WORK + "/"))


def check(path, dir_fd, what, devnull=False):
    """Refuse unless path (relative to dir_fd; or the file behind a descriptor) lies inside WORK."""
    if not CHECK_PATHS:
        return
    if is_int(path):
        try:
            path = fd_target(path)
        except Exception:
            return  # not an open descriptor: the call fails by itself
        if path[:1] != "/":
            return  # a pipe, a socket, an anonymous file
        dir_fd = None
    real = resolve(path, dir_fd)
    if within(real) or (devnull and real == "/dev/null"):
        return
    shown = text(path)
    deny(what + " " + (repr(shown) if shown is not None else "(a path object of an unknown type)")
         + " outside the sandbox directory")


def on_open(args):
    if len(args) < 3:
        return
    path, mode, flags = args[0], args[1], args[2]
    if is_int(path):
        return  # an already open descriptor (FileIO(fd), os.fdopen)
    flags = ADD0(flags) if is_int(flags) else 0
    if mode is None:  # os.open: only through the wrapper, which checked it with its dir_fd
        for p in OPEN_PENDING.get(get_ident(), ()):
            if p is path:
                return
        if flags & WRITE_FLAGS:
            deny("os.open for writing (not through the sandbox's os.open)")
        return
    m = text(mode) or ""
    if flags & WRITE_FLAGS or "w" in m or "a" in m or "x" in m or "+" in m:
        check(path, None, "writing", devnull=True)


def on_getattr(args):
    if len(args) < 2:
        return
    obj, name = args[0], text(args[1])
    if name == "tb_frame" and type(obj) is TracebackType:
        stack = TB_PENDING.setdefault(get_ident(), [])
        for x in stack:
            if x is obj:
                return  # our own read below
        stack.append(obj)
        try:
            frame = obj.tb_frame
        finally:
            stack.pop()
        if type(frame) is FrameType and frame.f_globals is NS:
            deny("reading the sandbox's own frames")


def on_socket(event, args):
    if len(args) >= 2:
        try:
            family = SOCK_FAMILY(args[0])
        except Exception:
            family = None
        if family == AF_UNIX:
            t = type(args[1])
            s = text(args[1]) if issubclass(t, str) or issubclass(t, bytes) else None
            if s is None or s == "" or s[0] == "\0":
                deny(event + " of an abstract or unnamed UNIX socket")
            check(s, None, event)
            return
    deny(event)


def protected(name):
    return name in PROTECTED or name.rpartition(".")[2] in PROTECTED


def exact_path(p):
    return type(p) is str or type(p) is bytes


def op_open(args):
    path, flags, mode, dir_fd = args[1], args[2], args[3], args[4]
    if not exact_path(path) or type(flags) is not int or type(mode) is not int or not (
            dir_fd is None or type(dir_fd) is int):
        deny("a malformed sandbox call")
    if flags & WRITE_FLAGS:
        check(path, dir_fd, "os.open for writing", devnull=True)
    stack = OPEN_PENDING.setdefault(get_ident(), [])
    stack.append(path)
    try:
        return ORIG_OPEN(path, flags, mode, dir_fd=dir_fd)
    finally:
        stack.pop()


def op_mkfifo(args):
    path, mode, dir_fd = args[1], args[2], args[3]
    if not exact_path(path) or type(mode) is not int or not (dir_fd is None or type(dir_fd) is int):
        deny("a malformed sandbox call")
    check(path, dir_fd, "os.mkfifo")
    return ORIG_MKFIFO(path, mode, dir_fd=dir_fd)


def op_mknod(args):
    path, mode, device, dir_fd = args[1], args[2], args[3], args[4]
    if not exact_path(path) or type(mode) is not int or type(device) is not int or not (
            dir_fd is None or type(dir_fd) is int):
        deny("a malformed sandbox call")
    if CHECK_PATHS:
        kind = mode & S_IFMT
        if kind == S_IFCHR or kind == S_IFBLK:
            deny("os.mknod of a device node")
        if MKNOD_REFUSED:
            deny("os.mknod (the sandbox runs as root outside a user namespace)")
    check(path, dir_fd, "os.mknod")
    return ORIG_MKNOD(path, mode, device, dir_fd=dir_fd)


def op_create_builtin(args):
    name = args[1]
    if type(name) is not str:
        deny("a malformed sandbox call")
    if protected(name):
        deny("a new copy of the module " + repr(name), ImportError)
    return ORIG_CREATE_BUILTIN(SimpleNamespace(name=name, origin="built-in"))


def op_create_dynamic(args):
    name, origin, extra = args[1], args[2], args[3]
    if type(name) is not str or type(origin) is not str or type(extra) is not tuple or len(extra) != 3:
        deny("a malformed sandbox call")
    if protected(name):
        deny("loading the module " + repr(name), ImportError)
    real = resolve(origin, None)
    if real is None or within(real):
        deny("loading native code from the sandbox directory (" + repr(origin) + ")", ImportError)
    return ORIG_CREATE_DYNAMIC(SimpleNamespace(name=name, origin=real, loader=extra[0], parent=extra[1],
                                               submodule_search_locations=extra[2]))


OPS = {"open": (6, op_open), "mkfifo": (5, op_mkfifo), "mknod": (6, op_mknod),
       "create_builtin": (3, op_create_builtin), "create_dynamic": (5, op_create_dynamic)}


def on_call(args):
    """A wrapper's request: ("mtp.sandbox", op, *arguments, box); the answer goes into box."""
    n = len(args)
    op = args[0] if n else None
    box = args[n - 1] if n else None
    entry = OPS.get(op) if type(op) is str else None
    if entry is None or entry[0] != n or type(box) is not list or len(box) != 0:
        deny("a malformed sandbox call")
    try:
        answer = ("ok", entry[1](args))
    except Exception as e:  # handed back as a fresh exception: no frame of ours in its traceback
        answer = ("err", type(e), e.args)
    box.append(answer)


def hook(event, args):
    if event == "open":
        return on_open(args)
    spec = PATHS.get(event)
    if spec is not None:
        n = len(args)
        for i, d in spec:
            if i < n:
                check(args[i], args[d] if d is not None and d < n else None, event)
        return
    if event == "mtp.sandbox":
        return on_call(args)
    if event in REFUSED_EVENTS:
        deny(event)
    if event == "import":
        name = text(args[0]) if args else None
        if name is None or name in REFUSED_IMPORTS or name.partition(".")[0] in REFUSED_IMPORTS:
            deny("importing " + repr(name), ImportError)
    elif event == "object.__getattr__":
        on_getattr(args)
    elif event == "socket.bind" or event == "socket.connect":
        on_socket(event, args)
'''

# What replaces os.open, os.mkfifo, os.mknod, _imp.create_builtin and _imp.create_dynamic in the
# child. Reachable by the program (os.open.__globals__), so it holds nothing but sys.audit and C
# builtins: it converts the arguments once (a path object's __fspath__ runs here, once) and asks
# the hook, which checks and calls the original with exactly these values.
_WRAPPERS = r'''
def _path(p):
    p = _fspath(p)
    t = type(p)
    if t is str or t is bytes:
        return p
    if issubclass(t, str):
        return "".join((p,))
    if issubclass(t, bytes):
        return b"".join((p,))
    raise TypeError("expected str, bytes or os.PathLike object")


def _int(x):
    return _add0(_index(x))


def _fd(x):
    return None if x is None else _int(x)


def _name(x):
    if not issubclass(type(x), str):
        raise TypeError("module spec name and origin must be str")
    return "".join((x,))


def _answer(box, path):
    if len(box) != 1:
        raise PermissionError("sandbox: the call was not answered")
    answer = box[0]
    if answer[0] == "ok":
        return answer[1]
    cls, args = answer[1], answer[2]
    if issubclass(cls, OSError) and len(args) == 2 and path is not None:
        raise cls(args[0], args[1], path)
    raise cls(*args)


def open(path, flags, mode=0o777, *, dir_fd=None):
    box, p = [], _path(path)
    _audit("mtp.sandbox", "open", p, _int(flags), _int(mode), _fd(dir_fd), box)
    return _answer(box, p)


def mkfifo(path, mode=0o666, *, dir_fd=None):
    box, p = [], _path(path)
    _audit("mtp.sandbox", "mkfifo", p, _int(mode), _fd(dir_fd), box)
    return _answer(box, p)


def mknod(path, mode=0o600, device=0, *, dir_fd=None):
    box, p = [], _path(path)
    _audit("mtp.sandbox", "mknod", p, _int(mode), _int(device), _fd(dir_fd), box)
    return _answer(box, p)


def create_builtin(spec):
    box = []
    _audit("mtp.sandbox", "create_builtin", _name(spec.name), box)
    return _answer(box, None)


def create_dynamic(spec, file=None):
    box = []
    extra = (getattr(spec, "loader", None), getattr(spec, "parent", None),
             getattr(spec, "submodule_search_locations", None))
    _audit("mtp.sandbox", "create_dynamic", _name(spec.name), _name(spec.origin), extra, box)
    return _answer(box, None)
'''

# Runs in the child before the program. argv: [-c, work_dir, program_path, limits, filesystem mode].
_BOOT = r'''
import os, sys, resource

SETUP_FAILED = SETUP_FAILED_VALUE
# refused imports, and fresh copies refused at _imp.create_*: process creation, native code, test
# modules with raw memory access, subinterpreters (which would have no audit hook)
ALWAYS_REFUSED = frozenset({
    "_posixsubprocess", "_ctypes", "ctypes", "_testcapi", "_testinternalcapi", "_testbuffer",
    "_testmultiphase", "_testclinic", "_testimportmultiple", "_ctypes_test", "_xxsubinterpreters",
    "_xxinterpchannels", "_xxtestfuzz", "xxlimited", "xxlimited_35", "xxsubtype"})
# C code that creates files without an audit event (sem_open, shm_open, sqlite ATTACH, dbm, readline
# history): refused unless Landlock stops the creation in the kernel
UNAUDITED_WRITERS = frozenset({"_multiprocessing", "_posixshmem", "_sqlite3", "_gdbm", "_dbm", "readline"})


def _set_limits(limits):
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


def _landlock(ctypes, call, work):
    """Allow creating/writing/removing only beneath work (no device nodes), /dev/null writable; no
    TCP bind/connect (ABI >= 4), abstract UNIX sockets and signals scoped (ABI >= 6). -> (abi, why)"""
    abi = call(444, None, 0, 1)  # landlock_create_ruleset(NULL, 0, LANDLOCK_CREATE_RULESET_VERSION)
    if abi < 1:
        return 0, "landlock_create_ruleset: " + os.strerror(ctypes.get_errno())
    devices = 1 << 6 | 1 << 11  # MAKE_CHAR, MAKE_BLOCK
    # WRITE_FILE, REMOVE_DIR, REMOVE_FILE, MAKE_{CHAR,DIR,REG,SOCK,FIFO,BLOCK,SYM}
    handled = 1 << 1 | 1 << 4 | 1 << 5 | 1 << 7 | 1 << 8 | 1 << 9 | 1 << 10 | 1 << 12 | devices
    if abi >= 2:
        handled |= 1 << 13  # REFER (rename/link across directories)
    if abi >= 3:
        handled |= 1 << 14  # TRUNCATE

    class Ruleset(ctypes.Structure):
        _fields_ = [("fs", ctypes.c_uint64), ("net", ctypes.c_uint64), ("scoped", ctypes.c_uint64)]

    class Beneath(ctypes.Structure):
        _pack_ = 1
        _fields_ = [("allowed", ctypes.c_uint64), ("fd", ctypes.c_int32)]

    attr = Ruleset(handled, 3 if abi >= 4 else 0, 3 if abi >= 6 else 0)
    ruleset = call(444, ctypes.byref(attr), 8 if abi < 4 else 16 if abi < 6 else 24, 0)
    if ruleset < 0:
        return 0, "landlock_create_ruleset: " + os.strerror(ctypes.get_errno())
    try:
        rules = ((work, handled & ~devices, True),
                 ("/dev/null", (1 << 1) | (1 << 14 if abi >= 3 else 0), False))
        for path, allowed, required in rules:
            try:
                fd = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                if required:
                    raise
                continue
            try:
                # LANDLOCK_RULE_PATH_BENEATH
                if call(445, ruleset, 1, ctypes.byref(Beneath(allowed, fd)), 0) != 0 and required:
                    return 0, "landlock_add_rule: " + os.strerror(ctypes.get_errno())
            finally:
                os.close(fd)
        if call(446, ruleset, 0) != 0:  # landlock_restrict_self
            return 0, "landlock_restrict_self: " + os.strerror(ctypes.get_errno())
    finally:
        os.close(ruleset)
    return abi, ""


def _drop_capabilities(ctypes, libc, L):
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last = int(f.read())
    except (OSError, ValueError):
        last = 63
    for cap in range(last + 1):
        libc.prctl(L(24), L(cap), L(0), L(0), L(0))  # PR_CAPBSET_DROP
    libc.prctl(L(47), L(4), L(0), L(0), L(0))  # PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL
    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    libc.capset(header, (ctypes.c_uint32 * 6)())  # effective, permitted, inheritable: empty


def _kernel(work, fs_mode):
    """no_new_privs, Landlock (unless fs_mode is 'hook'), every capability dropped when root.
    Returns the Landlock ABI in force (0: none); exits when Landlock is required and missing."""
    abi, why = 0, "no ctypes"
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        L = ctypes.c_long

        def call(*args):
            return libc.syscall(*[L(a) if isinstance(a, int) else a for a in args])

        libc.prctl(L(38), L(1), L(0), L(0), L(0))  # PR_SET_NO_NEW_PRIVS
        if fs_mode != "hook":
            abi, why = _landlock(ctypes, call, work)
        if os.geteuid() == 0:
            _drop_capabilities(ctypes, libc, L)
    except Exception as e:
        why = why if abi else f"{type(e).__name__}: {e}"
    finally:
        for name in [m for m in sys.modules if m in ("ctypes", "_ctypes") or m.startswith("ctypes.")]:
            del sys.modules[name]
    if fs_mode in ("landlock", "kernel") and not abi:
        sys.stderr.write("sandbox setup: Landlock is not available (" + why + ")\n")
        sys.stderr.flush()
        os._exit(SETUP_FAILED)
    return abi


def _replace(pairs):
    """Point every dict, set and list that holds an original at its wrapper (os and posix module
    dicts, os.supports_dir_fd, ...)."""
    import gc
    refs = gc.get_referrers(*[old for old, _ in pairs])
    for old, new in pairs:
        for ref in refs:
            t = type(ref)
            if t is dict:
                for k, v in list(ref.items()):
                    if v is old:
                        ref[k] = new
            elif t is set:
                if old in ref:
                    ref.discard(old)
                    ref.add(new)
            elif t is list:
                for i, v in enumerate(ref):
                    if v is old:
                        ref[i] = new


def _guard(work, fs_mode, landlock):
    import _imp, _operator, _socket, _thread, builtins, pathlib, posix, types
    try:
        with open("/proc/self/uid_map") as f:
            initial_userns = f.read().split()[:3] == ["0", "0", "4294967295"]
    except OSError:
        initial_userns = True
    refused = ALWAYS_REFUSED if landlock else ALWAYS_REFUSED | UNAUDITED_WRITERS
    wrappers = {"__name__": "posix", "__builtins__": dict(builtins.__dict__), "_audit": sys.audit,
                "_fspath": posix.fspath, "_index": _operator.index, "_add0": (0).__add__}
    exec(WRAPPERS, wrappers)
    names = (("open", posix), ("mkfifo", posix), ("mknod", posix), ("create_builtin", _imp),
             ("create_dynamic", _imp))
    originals = tuple(getattr(module, name) for name, module in names)
    _replace(tuple(zip(originals, (wrappers[name] for name, _ in names))))
    ns = {"__name__": "mtp_sandbox_guard", "__builtins__": dict(builtins.__dict__),
          "WORK": work, "CHECK_PATHS": fs_mode != "kernel",
          "MKNOD_REFUSED": os.geteuid() == 0 and initial_userns,
          "REFUSED_IMPORTS": refused, "PROTECTED": refused | {"posix", "_imp"},
          "WRITE_FLAGS": os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC,
          "AT_FDCWD": -100, "FS_ENCODING": sys.getfilesystemencoding(), "ADD0": (0).__add__,
          "lstat": posix.lstat, "readlink": posix.readlink, "getcwd": posix.getcwd,
          "get_ident": _thread.get_ident, "SOCK_FAMILY": _socket.socket.__dict__["family"].__get__,
          "AF_UNIX": _socket.AF_UNIX, "SimpleNamespace": types.SimpleNamespace,
          "TracebackType": types.TracebackType, "FrameType": types.FrameType,
          "PATH_TYPES": (pathlib.PosixPath, pathlib.PurePosixPath),
          "PATH_SLOTS": tuple(pathlib.PurePath.__dict__[k].__get__ for k in ("_str", "_drv", "_root", "_parts")),
          "ORIG_OPEN": originals[0], "ORIG_MKFIFO": originals[1], "ORIG_MKNOD": originals[2],
          "ORIG_CREATE_BUILTIN": originals[3], "ORIG_CREATE_DYNAMIC": originals[4]}
    exec(GUARD, ns)
    sys.addaudithook(ns["hook"])


def _main():
    work, program, limits, fs_mode = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4]
    with open(program, encoding="utf-8") as f:
        code = compile(f.read(), "program.py", "exec")
    sys.argv[:] = ["program.py"]
    work = os.path.realpath(work)
    _set_limits(limits)
    _guard(work, fs_mode, _kernel(work, fs_mode))
    exec(code, {"__name__": "__main__", "__builtins__": __builtins__})
'''

BOOTSTRAP = (_BOOT.replace("SETUP_FAILED_VALUE", str(SETUP_FAILED))
             + f"\nGUARD = {_GUARD!r}\nWRAPPERS = {_WRAPPERS!r}\n_main()\n")


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


@functools.cache
def landlock_abi() -> int:
    """The Landlock ABI version the kernel offers this process (0: none; Linux >= 5.13 with the
    ``landlock`` LSM enabled, and no seccomp filter refusing the syscall)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.syscall.restype = ctypes.c_long
        abi = libc.syscall(ctypes.c_long(444), None, ctypes.c_long(0), ctypes.c_long(1))
    except (OSError, AttributeError, ImportError):
        return 0
    return max(int(abi), 0)


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
                network: str = "auto", filesystem: str = "auto", python: str | None = None,
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
      filesystem: 'auto' (Landlock when the kernel offers it, plus the audit hook), 'landlock'
        (required; an error if unavailable), 'hook' (audit hook only), 'kernel' (Landlock only, the
        hook's file checks off: for testing the kernel layer on its own).
      python: interpreter (default: this one).
    """
    cpu_s = int(cpu_s if cpu_s is not None else int(timeout_s) + 1)
    limits = f"{memory_mb * 2**20},{cpu_s},{max_file_mb * 2**20},{max_processes}"
    use_unshare = {"auto": unshare_available(), "unshare": True, "hook": False}.get(network)
    if use_unshare is None:
        raise ValueError(f"network={network!r}: use 'auto', 'unshare' or 'hook'.")
    if use_unshare and not unshare_available():
        raise RuntimeError("network='unshare' but `unshare -rn` does not work on this machine.")
    if filesystem not in FILESYSTEM_MODES:
        raise ValueError(f"filesystem={filesystem!r}: use one of {', '.join(FILESYSTEM_MODES)}.")
    if filesystem in ("landlock", "kernel") and not landlock_abi():
        raise RuntimeError(f"filesystem={filesystem!r} but this kernel offers no Landlock.")
    root = Path(tempfile.mkdtemp(prefix="mtp-sandbox-"))
    try:
        work = root / "work"
        work.mkdir()
        prog = root / "program.py"
        prog.write_text(program, encoding="utf-8")
        cmd = [python or sys.executable, "-I", "-B", "-c", BOOTSTRAP, str(work), str(prog), limits,
               filesystem]
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
        elif rc == SETUP_FAILED and "sandbox setup:" in stderr:
            status = "error"
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
