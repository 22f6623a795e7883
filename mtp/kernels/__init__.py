"""Hand-written CPU kernels for decoding, called through ``jax.ffi``.

XLA:CPU multiplies one token by a large matrix well, but a block of 2..32 tokens (a speculative
draft block) streams the matrix at a third of the memory bandwidth. ``rows_matmul`` (C++ source
next to this file) streams each weight once for the whole block, split over XLA's intra-op threads.
It is built on first use with the system's C++ compiler (``-O3 -march=native``) into
``~/.cache/mtp/kernels`` and registered as an FFI target; where that is not possible (no compiler,
another backend than CPU, ``MTP_CPU_KERNELS=0``) decoding uses XLA's own products, with a warning
naming the reason.
"""

from mtp.kernels.cpu import kernel_status, packed_matmul, rows_matmul, rows_matmul_available

__all__ = ["kernel_status", "packed_matmul", "rows_matmul", "rows_matmul_available"]
