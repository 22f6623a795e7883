"""The one progress/log helper: a line on stderr (stdout stays free for a command's output), from
JAX process 0 only in a multi-process run."""

from __future__ import annotations

import sys

from mtp.distributed import process_index


def log(message: str, prefix: str = "") -> None:
    """Print ``message`` (with an optional ``[prefix]``) on stderr from process 0, flushed."""
    if process_index() == 0:
        print(f"[{prefix}] {message}" if prefix else message, file=sys.stderr, flush=True)
