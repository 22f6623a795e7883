"""The HumanEval sandbox creates nothing outside its temporary directory: FIFOs, device nodes,
regular files, UNIX sockets, hard and symbolic links, renames, copies, directories, temp files,
anything made through a dir_fd, and the tricks that would bring back the original os.mkfifo/mknod.

Every escape runs in both network modes (with ``unshare -rn`` and with the audit hook alone) and
against each file-system layer on its own (``filesystem='hook'``: the audit hook, ``'kernel'``:
Landlock, where the kernel offers it) and both together (``'auto'``). A batch program tries all
escapes (catching each refusal, one line per attempt); each escape named in the issue also runs
alone, uncaught, and must not pass. Nothing may exist in the outside directory afterwards.
"""

from __future__ import annotations

import os
import re

import pytest

from mtp.evals.sandbox import landlock_abi, run_program, unshare_available

NETWORKS = [pytest.param("unshare", marks=pytest.mark.skipif(
                not unshare_available(), reason="no unprivileged user namespaces here")), "hook"]
KERNEL = pytest.mark.skipif(not landlock_abi(), reason="this kernel offers no Landlock")
FILESYSTEMS = ["hook", pytest.param("kernel", marks=KERNEL), "auto"]

PRELUDE = """\
import importlib, importlib.util, os, pathlib, shutil, socket, stat, sys, tempfile
T = {outside!r}
open("f", "w").close()
"""

# name -> code that tries to create something in the directory T, which lies outside the sandbox
ESCAPES = {
    "mkfifo": "os.mkfifo(T + '/fifo')",
    "mknod_regular": "os.mknod(T + '/regular', 0o600 | stat.S_IFREG)",
    "mknod_fifo": "os.mknod(T + '/fifo', 0o600 | stat.S_IFIFO)",
    "mknod_char_device": "os.mknod(T + '/null', 0o666 | stat.S_IFCHR, os.makedev(1, 3))",
    "mknod_char_device_inside": "os.mknod('null', 0o666 | stat.S_IFCHR, os.makedev(1, 3))",
    "unix_socket_bind": "socket.socket(socket.AF_UNIX).bind(T + '/sock')",
    "unix_socket_bind_bytes": "socket.socket(socket.AF_UNIX).bind((T + '/sock').encode())",
    "unix_socket_abstract": "socket.socket(socket.AF_UNIX).bind('\\0mtp-sandbox-test')",
    "hard_link": "os.link('f', T + '/link')",
    "symlink": "os.symlink('/etc/passwd', T + '/symlink')",
    "rename": "os.rename('f', T + '/renamed')",
    "replace": "os.replace('f', T + '/replaced')",
    "shutil_copy": "shutil.copy('f', T + '/copy')",
    "shutil_copy2": "shutil.copy2('f', T + '/copy2')",
    "shutil_copytree": "os.mkdir('tree'); shutil.copytree('tree', T + '/tree')",
    "shutil_move": "shutil.move('f', T + '/moved')",
    "open_x": "open(T + '/x', 'x')",
    "open_w_through_symlink": "os.symlink(T, 'out'); open('out/w', 'w')",
    "os_open_creat": "os.open(T + '/creat', os.O_CREAT | os.O_WRONLY)",
    "os_open_creat_bytes": "os.open((T + '/creat').encode(), os.O_CREAT | os.O_RDONLY)",
    "pathlib_write_text": "pathlib.Path(T, 'p').write_text('x')",
    "pathlib_touch": "pathlib.Path(T, 'touched').touch()",
    "pathlib_mkdir": "pathlib.Path(T, 'dir').mkdir()",
    "tempfile_mkstemp": "tempfile.mkstemp(dir=T)",
    "tempfile_mkdtemp": "tempfile.mkdtemp(dir=T)",
    "tempfile_named": "tempfile.NamedTemporaryFile(dir=T, delete=False)",
    "makedirs": "os.makedirs(T + '/a/b')",
    "dir_fd_open": "fd = os.open(T, os.O_RDONLY); os.open('n', os.O_CREAT | os.O_WRONLY, dir_fd=fd)",
    "dir_fd_mkfifo": "fd = os.open(T, os.O_RDONLY); os.mkfifo('n', dir_fd=fd)",
    "dir_fd_mknod": "fd = os.open(T, os.O_RDONLY); os.mknod('n', 0o600 | stat.S_IFREG, dir_fd=fd)",
    "dir_fd_mkdir": "fd = os.open(T, os.O_RDONLY); os.mkdir('n', dir_fd=fd)",
    "dir_fd_symlink": "fd = os.open(T, os.O_RDONLY); os.symlink('/etc', 'n', dir_fd=fd)",
    "dir_fd_rename": "fd = os.open(T, os.O_RDONLY); os.rename('f', 'n', dst_dir_fd=fd)",
    # a path that stays inside relative to a deep cwd, but leads to T relative to the dir_fd
    "dir_fd_relative_to_another_dir": """\
rel = os.path.relpath(T, os.getcwd())
fd = os.open('.', os.O_RDONLY)
home = os.getcwd()
deep = '/'.join(['d'] * (rel.count('..') + 2))
os.makedirs(deep)
os.chdir(deep)
try:
    os.open(rel + '/deep', os.O_CREAT | os.O_WRONLY, dir_fd=fd)
finally:
    os.chdir(home)""",
    "reload_posix": "import posix; importlib.reload(posix); posix.mkfifo(T + '/reloaded')",
    "fresh_posix": "importlib.util.module_from_spec(importlib.util.find_spec('posix')).mkfifo(T + '/fresh')",
    "imp_create_builtin": "import _imp; _imp.create_builtin(importlib.util.find_spec('posix')).mknod(T + '/imp')",
    "sys_modules_posix": """\
saved = sys.modules.pop('posix')
try:
    __import__('posix').mkfifo(T + '/reimported')
finally:
    sys.modules['posix'] = saved""",
    "originals_in_supports_dir_fd": "[f for f in os.supports_dir_fd if f.__name__ == 'mkfifo'][0](T + '/sup')",
    "originals_in_wrapper_globals": """\
found = [v for v in list(os.mkfifo.__globals__.values()) + [c.cell_contents for c in os.mkfifo.__closure__ or ()]
         if getattr(v, '__name__', '') == 'mkfifo' and v is not os.mkfifo]
found[0](T + '/glob')""",
    "originals_in_traceback_frames": """\
try:
    os.mkdir(T + '/x')
except PermissionError as e:
    tb = e.__traceback__
    while tb.tb_next:
        tb = tb.tb_next
    tb.tb_frame.f_globals['ORIG_MKFIFO'](T + '/tb')""",
    "forged_audit_event": """\
box = []
sys.audit('mtp.sandbox', 'mkfifo', T + '/forged', 0o600, None, box)
assert box and box[0][0] == 'ok', box""",
    "ctypes": "import ctypes; ctypes.CDLL(None).mkfifo((T + '/ctypes').encode(), 0o600)",
    "subprocess": "import subprocess; subprocess.run(['mkfifo', T + '/sub'])",
    "gc_referrers": "import gc; gc.get_referrers(os.mkfifo)",
    "native_code_written_by_the_program": """\
import _json
shutil.copy(_json.__file__, 'evil' + os.path.basename(_json.__file__)[5:])
spec = importlib.util.spec_from_file_location('_json', os.path.abspath('evil' + os.path.basename(_json.__file__)[5:]))
importlib.util.module_from_spec(spec)""",
}

# escapes that look for the original functions: with nothing to find they fail on the lookup
INTROSPECTION = {
    "originals_in_wrapper_globals": "IndexError: ",
    "originals_in_traceback_frames": r"(PermissionError: sandbox: reading the sandbox's own frames|KeyError: )",
    "forged_audit_event": r"AssertionError: \[\('err', <class 'PermissionError'>",
}

# the escapes each also run on their own, uncaught
ALONE = ["mkfifo", "mknod_regular", "mknod_fifo", "mknod_char_device", "unix_socket_bind", "hard_link",
         "symlink", "rename", "replace", "shutil_copy", "open_x", "os_open_creat", "pathlib_write_text",
         "tempfile_mkstemp", "makedirs", "dir_fd_open", "dir_fd_mkfifo", "dir_fd_relative_to_another_dir",
         "reload_posix", "fresh_posix", "sys_modules_posix", "originals_in_traceback_frames"]

BATCH = PRELUDE + """\
ATTEMPTS = {attempts!r}
for name, code in ATTEMPTS.items():
    scope = dict(globals())
    try:
        exec(code, scope)
    except BaseException as e:
        print(name + ': refused ' + type(e).__name__ + ': ' + str(e)[:150].replace('\\n', ' '), file=sys.stderr)
    else:
        print(name + ': NOT REFUSED', file=sys.stderr)
"""


@pytest.fixture
def outside(tmp_path):
    """An empty directory outside the sandbox; the test fails if anything is left in it."""
    d = tmp_path / "outside"
    d.mkdir()
    yield d
    left = sorted(os.listdir(d))
    assert left == [], f"created outside the sandbox: {left}"


@pytest.mark.parametrize("filesystem", FILESYSTEMS)
@pytest.mark.parametrize("network", NETWORKS)
def test_every_escape_is_refused(outside, network, filesystem):
    program = BATCH.format(outside=str(outside), attempts=ESCAPES)
    r = run_program(program, network=network, filesystem=filesystem, timeout_s=30, stderr_chars=40000)
    assert r.status == "passed", r
    lines = dict(re.findall(r"^(\w+): (.*)$", r.stderr_tail, re.M))
    for name in ESCAPES:
        assert name in lines, (name, r.stderr_tail)
        # refused by the sandbox (or the kernel), not broken: introspection finds nothing to call
        expected = INTROSPECTION.get(name, r"(PermissionError|ImportError): ")
        assert re.match("refused " + expected, lines[name]), (name, lines[name])


@pytest.mark.parametrize("name", ALONE)
@pytest.mark.parametrize("network", NETWORKS)
def test_each_escape_alone_does_not_pass(outside, network, name):
    program = PRELUDE.format(outside=str(outside)) + ESCAPES[name] + "\n"
    r = run_program(program, network=network, filesystem="hook")
    assert r.status == "failed" and not r.passed and "sandbox: " in r.stderr_tail, (name, r)


@pytest.mark.parametrize("filesystem", FILESYSTEMS)
@pytest.mark.parametrize("network", NETWORKS)
def test_work_inside_the_temp_dir_passes(network, filesystem):
    program = """\
import os, pathlib, shutil, socket, stat, tempfile
open('a.txt', 'w').write('hello')
os.mkfifo('fifo')
assert stat.S_ISFIFO(os.stat('fifo').st_mode)
server = socket.socket(socket.AF_UNIX)
server.bind('sock')
server.listen(1)
client = socket.socket(socket.AF_UNIX)
client.connect(os.path.abspath('sock'))
client.close()
os.symlink('a.txt', 'soft')
assert open('soft').read() == 'hello'
os.link('a.txt', 'hard')
os.makedirs('d/e')
os.replace('hard', 'd/e/moved')
shutil.copy2('a.txt', 'd/copy')
pathlib.Path('d', 'p.txt').write_text('x')
fd = os.open('d', os.O_RDONLY)
os.close(os.open('via_fd', os.O_CREAT | os.O_WRONLY, dir_fd=fd))
os.mkfifo('fifo_via_fd', dir_fd=fd)
os.mkdir('dir_via_fd', dir_fd=fd)
os.close(fd)
assert sorted(os.listdir('d')) == ['copy', 'dir_via_fd', 'e', 'fifo_via_fd', 'p.txt', 'via_fd']
with tempfile.TemporaryDirectory() as t:
    os.mkfifo(os.path.join(t, 'f'))
    open(os.path.join(t, 'x'), 'w').write('1')
with tempfile.NamedTemporaryFile('w') as f:
    f.write('tmp')
shutil.rmtree('d')
with open(os.devnull, 'w') as f:
    f.write('discarded')
import decimal, json
print(json.dumps(str(decimal.Decimal('1.5'))))
"""
    r = run_program(program, network=network, filesystem=filesystem, timeout_s=20)
    assert r.passed, r


@pytest.mark.parametrize("network", NETWORKS)
def test_mknod_inside_is_refused_only_to_root_outside_a_user_namespace(network):
    program = "import os, stat\nos.mknod('node', 0o600 | stat.S_IFIFO)\nassert stat.S_ISFIFO(os.stat('node').st_mode)\n"
    r = run_program(program, network=network)
    if os.geteuid() == 0 and network == "hook":
        assert r.status == "failed" and "runs as root outside a user namespace" in r.stderr_tail, r
    else:
        assert r.passed, r


@pytest.mark.parametrize("network", NETWORKS)
def test_root_child_has_no_capabilities_and_no_new_privileges(network):
    program = """\
status = dict(line.split(':', 1) for line in open('/proc/self/status'))
assert status['NoNewPrivs'].strip() == '1', status['NoNewPrivs']
if status['Uid'].split()[1] == '0':
    for key in ('CapEff', 'CapPrm', 'CapBnd', 'CapAmb'):
        assert int(status[key], 16) == 0, (key, status[key])
"""
    r = run_program(program, network=network)
    assert r.passed, r


def test_filesystem_mode_is_validated():
    with pytest.raises(ValueError, match="filesystem="):
        run_program("pass", filesystem="none")
