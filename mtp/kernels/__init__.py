"""Hand-written CPU kernels for decoding, called through ``jax.ffi`` (C++ source next to this file).

- ``rows_matmul``: a block of 2..32 rows times a float32 decode matrix, streaming the matrix once
  (XLA:CPU reads it at a third of the bandwidth for such blocks), split over the kernel threads
  (our own workers, which spin between the back-to-back calls of a decode step;
  ``DecodeSettings.kernel_threads`` caps them).
- ``packed_matmul``: any number of rows times a matrix kept in GGUF blocks (Q8_0/Q4_0 as int8,
  Q4_1 as 4-bit), converted in registers; optionally with int8 activations (``q8x``).
- ``decode_attention``: batch-1 attention of a decode step or draft block over the KV cache.
- ``layer_qkv`` / ``layer_rest`` (``decode_layer.cc``, in ``mtp.kernels.cpu``): a whole batch-1
  decode layer with packed weights in two calls (norms, RoPE, attention, SiLU and residuals
  fused around the packed products).

Each computes every output row by the same operations whatever the number of rows, so a token's
logits are bitwise the same alone and inside a speculative block. The library (one unit,
``mtp_kernels.cc``) is built on first use with the system's C++ compiler (``-O3 -march=native``)
into ``~/.cache/mtp/kernels`` and registered as FFI targets; where that is not possible (no
compiler, another backend than CPU, ``DecodeSettings(backend='xla')``, i.e. ``--decode-backend xla``)
decoding uses XLA's own operations, with a warning naming the reason where they failed to build.
"""

from mtp.kernels.cpu import (
    decode_attention,
    kernel_status,
    kernels_built,
    packed_matmul,
    rows_matmul,
    rows_matmul_available,
)

__all__ = ["decode_attention", "kernel_status", "kernels_built", "packed_matmul", "rows_matmul",
           "rows_matmul_available"]
