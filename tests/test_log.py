"""mtp.log.log: one stderr line from process 0, without starting a JAX backend."""

from __future__ import annotations

import subprocess
import sys

from mtp.log import log


def test_a_line_on_stderr_with_an_optional_prefix(capsys, monkeypatch):
    monkeypatch.delenv("MTP_PROCESS_ID", raising=False)
    log("plain")
    log("tagged", prefix="study")
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == "plain\n[study] tagged\n"


def test_only_process_zero_logs(capsys, monkeypatch):
    monkeypatch.setenv("MTP_PROCESS_ID", "1")
    log("from process 1")
    monkeypatch.setenv("MTP_PROCESS_ID", "0")
    log("from process 0")
    assert capsys.readouterr().err == "from process 0\n"


def test_logging_before_jax_distributed_starts_no_backend():
    code = ("import jax; from jax._src import xla_bridge; from mtp.log import log; log('early');"
            " print(xla_bridge.backends_are_initialized())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False" and out.stderr.endswith("early\n")
