"""Decode settings on the command line: the flags of ``mtp.config.DecodeSettings`` (one argparse
group, "decode backend (CPU kernels)") for the commands that decode, and the settings they give.

Every setting changes how a decode computes, never what (``--packed-activations int8`` aside, which
is lossy); docs/decoding.md "Decode settings" says what each one does and when to change it.
"""

from __future__ import annotations

import argparse

from mtp.config import DECODE_BACKENDS, DECODE_LAYOUTS, DEFAULT_DECODE_SETTINGS, PACKED_ACTIVATIONS, DecodeSettings

DEFAULTS = DEFAULT_DECODE_SETTINGS
GROUP = "decode backend (CPU kernels)"


def _bytes(text: str) -> int:
    """A byte count: ``4294967296``, ``4e9`` or ``4GiB``/``512MiB``/``64KiB``."""
    units = {"kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30}
    low = text.strip().lower()
    scale = next((units[u] for u in units if low.endswith(u)), 1)
    number = low[:-3] if scale > 1 else low
    try:
        value = int(float(number) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of bytes (4294967296, 4e9 or 4GiB)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a byte count cannot be negative")
    return value


def _threads(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of threads, or 0 for XLA's CPU thread count")
    return value


def add_decode_settings(parser: argparse.ArgumentParser) -> None:
    """The ``DecodeSettings`` flags, defaults shown, in their own help group."""
    g = parser.add_argument_group(GROUP, "how decoding computes on this machine; none of these changes the"
                                  " output (except --packed-activations int8). On GPU and TPU the XLA path runs.")
    g.add_argument("--decode-backend", choices=DECODE_BACKENDS, default=DEFAULTS.backend,
                   help="auto: the hand-written CPU kernels (mtp/kernels) on a CPU backend where they build, else"
                        " XLA; xla: XLA's own operations only; cpu_kernels: the kernels or an error"
                        " (default %(default)s)")
    g.add_argument("--decode-layout", choices=DECODE_LAYOUTS, default=DEFAULTS.layout,
                   help="decode matrices stored [out, in] (streamed from memory) or [in, out] (cache-resident);"
                        " auto: by the model's size (default %(default)s)")
    g.add_argument("--packed-weights", action=argparse.BooleanOptionalAction, default=DEFAULTS.packed_weights,
                   help="decode from GGUF blocks when the weights are exactly such blocks (a model converted"
                        " from a quantized GGUF); needs the CPU kernels (default %(default)s)")
    g.add_argument("--packed-activations", choices=PACKED_ACTIVATIONS, default=DEFAULTS.packed_activations,
                   help="packed products with float32 activations (exact) or int8 blocks like llama.cpp (about 2x"
                        " faster products; the output is no longer the float model's) (default %(default)s)")
    g.add_argument("--fused-layers", action=argparse.BooleanOptionalAction, default=DEFAULTS.fused_layers,
                   help="run a packed decode layer as two fused kernel calls (default %(default)s)")
    g.add_argument("--prefill-float", action=argparse.BooleanOptionalAction, default=DEFAULTS.prefill_float,
                   help="with packed weights, keep float32 layers beside them for prompt prefills of 32+ rows"
                        " (faster prefills, more memory) (default %(default)s)")
    g.add_argument("--prefill-float-max-bytes", type=_bytes, default=DEFAULTS.prefill_float_max_bytes,
                   metavar="BYTES", help="keep those float32 prefill layers only up to this size (4e9, 4GiB;"
                                         " default %(default)s)")
    g.add_argument("--kernel-min-bytes", type=_bytes, default=DEFAULTS.kernel_min_bytes, metavar="BYTES",
                   help="float32 matrices smaller than this stay with XLA's products (they sit in cache)"
                        " (default %(default)s)")
    g.add_argument("--kernel-threads", type=_threads, default=DEFAULTS.kernel_threads, metavar="N",
                   help="threads of the CPU kernels, 0: XLA's CPU thread count; fixed at the kernels' first"
                        " call in a process (default %(default)s)")


def settings_from_args(args: argparse.Namespace) -> DecodeSettings:
    """The ``DecodeSettings`` of parsed ``add_decode_settings`` flags (a ``ValueError`` naming a bad one)."""
    return DecodeSettings(backend=args.decode_backend, layout=args.decode_layout, packed_weights=args.packed_weights,
                          packed_activations=args.packed_activations, fused_layers=args.fused_layers,
                          prefill_float=args.prefill_float, prefill_float_max_bytes=args.prefill_float_max_bytes,
                          kernel_min_bytes=args.kernel_min_bytes, kernel_threads=args.kernel_threads)
