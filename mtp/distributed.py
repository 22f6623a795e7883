"""Multi-process (multi-host) setup: ``jax.distributed`` from ``MTP_*`` variables, barriers, and
"process 0 first" for work that writes a shared cache.

The launchers in launch/ set these variables for every process:

  MTP_COORDINATOR     host:port of process 0's coordination service (e.g. 127.0.0.1:12345)
  MTP_NUM_PROCESSES   number of processes in the run
  MTP_PROCESS_ID      this process's index, 0 .. MTP_NUM_PROCESSES-1
  MTP_DISTRIBUTED     'auto': let JAX detect all of the above (TPU pod VMs, SLURM); '0': stay
                      single-process even if other MTP_* variables are set

With none of them set (a plain ``mtp train``) initialization is a no-op and the run is one process.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterator

import jax
from jax._src import distributed as jax_distributed  # its coordination client has a timeout
from jax._src import xla_bridge
from jax.experimental import multihost_utils

_BARRIER_TIMEOUT_S = 3600  # process 0 may be building a corpus + tokenizer cache meanwhile
_barrier_ids = itertools.count()
_initialized = False


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"mtp: {name}={value!r} is not an integer. Fix: unset it or set a number.") from None


def initialize() -> None:
    """Join the multi-process run described by ``MTP_*`` (see the module docstring), once.

    Must run before anything else touches JAX devices. On CPU the cross-process collectives use
    gloo (XLA's CPU backend has none by default, so a multi-process CPU computation would fail).
    """
    global _initialized
    if _initialized:
        return
    mode = os.environ.get("MTP_DISTRIBUTED", "").strip().lower()
    if mode in ("0", "off", "false", "no"):
        return
    coordinator = os.environ.get("MTP_COORDINATOR", "").strip() or None
    num_processes = _env_int("MTP_NUM_PROCESSES")
    process_id = _env_int("MTP_PROCESS_ID")
    if mode != "auto" and (num_processes or 1) == 1:
        return  # single process: nothing to join
    if mode != "auto" and (coordinator is None or process_id is None):
        raise SystemExit(
            f"mtp: MTP_NUM_PROCESSES={num_processes} but MTP_COORDINATOR={coordinator!r} and"
            f" MTP_PROCESS_ID={process_id!r}; a multi-process run needs all three (launch/local.sh"
            " sets them), or MTP_DISTRIBUTED=auto on a TPU pod / SLURM allocation.")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise SystemExit(f"mtp: MTP_PROCESS_ID={process_id} is outside"
                         f" [0, MTP_NUM_PROCESSES={num_processes}).")

    # Only the CPU client reads this (GPU/TPU collectives are unaffected). gloo is this jax's default
    # but older ones had none, and a user may have turned it off; MPI stays if chosen.
    if jax.config.jax_cpu_collectives_implementation not in ("gloo", "mpi"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                               process_id=process_id)
    _initialized = True


def process_index() -> int:
    """This process's index, safe to ask before ``initialize()``: asking JAX then would start a
    single-process backend and break the join, so until a backend is up the answer is 0."""
    if _initialized or xla_bridge.backends_are_initialized():
        return jax.process_index()
    return 0


def barrier(name: str, timeout_s: int = _BARRIER_TIMEOUT_S) -> None:
    """Block until every process reaches the barrier ``name``; a no-op for one process."""
    if jax.process_count() == 1:
        return
    client = jax_distributed.global_state.client
    unique = f"mtp:{name}:{next(_barrier_ids)}"  # every process numbers its barriers in the same order
    if client is not None and hasattr(client, "wait_at_barrier"):
        client.wait_at_barrier(unique, timeout_s * 1000)
    else:
        multihost_utils.sync_global_devices(unique)


@contextlib.contextmanager
def process_zero_first(name: str) -> Iterator[None]:
    """Process 0 runs the body first; the others wait, then run it (e.g. to reuse a cache).

    Every process enters the barrier exactly once: process 0 after its body, the others before.
    """
    if jax.process_index() != 0:
        barrier(name)
    yield
    if jax.process_index() == 0:
        barrier(name)
