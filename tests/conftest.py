"""Every test sees 8 simulated CPU devices (set before JAX is imported) so mesh tests can run;
single-device tests build their mesh from ``jax.devices()[:1]``.

Compiled programs go to a persistent XLA cache shared by the test processes (xdist workers and the
``mtp train`` subprocesses of the resume / multi-host / sweep tests, which compile the same tiny
programs again and again). The cache is keyed by the program and the compiler flags, so it never
changes what a test computes; set ``MTP_TEST_XLA_CACHE=off`` to time cold compiles.

Tests draw random numbers with the non-partitionable Threefry (``JAX_THREEFRY_PARTITIONABLE=0``,
inherited by the subprocesses): XLA:CPU compiles a model's random init about 3x faster with it, and
the values are still the same on every mesh and process count. Production keeps JAX's default.

Tests compile with XLA's backend optimization level 0 (the same programs, less LLVM optimization):
compile time dominates tiny tests. ``MTP_TEST_XLA_OPT=default`` compiles as production does.
"""

import os
import tempfile

import pytest

# Tiny test programs spend their time in XLA's compiler, not in running: compiling at backend
# optimization level 0 makes the suite ~1.5x faster (MTP_TEST_XLA_OPT=default compiles as in production).
_OPT = "" if os.environ.get("MTP_TEST_XLA_OPT") == "default" else " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8" + _OPT).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_THREEFRY_PARTITIONABLE", "0")
if os.environ.get("MTP_TEST_XLA_CACHE", "on") != "off":
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                          os.path.join(tempfile.gettempdir(), f"mtp-tests-xla-cache-{os.getuid()}"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.3")


@pytest.fixture(autouse=True)
def _no_calibration_after_in_process_training(monkeypatch):
    """``train()`` ends with ``mtp calibrate`` for 2+ heads (``train.calibrate``: a few seconds of decoding
    on a tiny model); tests that train in this process skip it. tests/test_train_cli.py checks it
    through ``mtp train`` (a subprocess), tests/test_decode_cli.py through ``mtp calibrate``."""
    monkeypatch.setattr("mtp.train.loop.calibrate_after_training", lambda workdir: None)
