"""The one progress/log helper: a line on stderr (stdout stays free for a command's output), from
JAX process 0 only in a multi-process run."""

from __future__ import annotations

import os
import sys


def _process_index() -> int:
    """This process's index without starting a JAX backend before ``jax.distributed`` joins:
    the launchers' MTP_PROCESS_ID, else JAX's own answer once a backend is up."""
    env = os.environ.get("MTP_PROCESS_ID", "").strip()
    if env.isdigit():
        return int(env)
    jax = sys.modules.get("jax")
    if jax is not None:
        try:
            from jax._src import xla_bridge

            if xla_bridge.backends_are_initialized():
                return jax.process_index()
        except Exception:  # noqa: BLE001 -- a private API moved: log from every process
            return 0
    return 0


def log(message: str, prefix: str = "") -> None:
    """Print ``message`` (with an optional ``[prefix]``) on stderr from process 0, flushed."""
    if _process_index() == 0:
        print(f"[{prefix}] {message}" if prefix else message, file=sys.stderr, flush=True)
