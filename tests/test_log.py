"""mtp.log.log: one stderr line from process 0, without starting a JAX backend."""

from __future__ import annotations

import subprocess
import sys

import jax

import mtp.distributed
from mtp.log import log


def test_a_line_on_stderr_with_an_optional_prefix(capsys):
    log("plain")
    log("tagged", prefix="study")
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "plain\n[study] tagged\n"


def test_only_process_zero_logs(capsys, monkeypatch):
    monkeypatch.setattr(mtp.distributed, "_initialized", True)  # joined: JAX's process index counts
    monkeypatch.setattr(jax, "process_index", lambda: 1)
    log("from process 1")
    monkeypatch.setattr(jax, "process_index", lambda: 0)
    log("from process 0")
    assert capsys.readouterr().err == "from process 0\n"


def test_logging_before_jax_distributed_starts_no_backend():
    code = ("import jax; from jax._src import xla_bridge; from mtp.log import log; log('early');"
            " print(xla_bridge.backends_are_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False" and out.stderr.endswith("early\n")
