"""Build, load and call ``rows_matmul.cc`` (see the package docstring)."""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mtp.config import DEFAULT_DECODE_SETTINGS, DecodeSettings

SOURCE = Path(__file__).with_name("mtp_kernels.cc")  # includes the two below
SOURCES = [SOURCE, SOURCE.with_name("rows_matmul.cc"), SOURCE.with_name("decode_layer.cc")]
TARGET = "mtp_rows_matmul"
TARGETS = {TARGET: "MtpRowsMatmul", "mtp_rows_matmul_s8": "MtpRowsMatmulS8", "mtp_rows_matmul_u4": "MtpRowsMatmulU4",
           "mtp_decode_attention": "MtpDecodeAttention", "mtp_layer_qkv": "MtpLayerQkv",
           "mtp_layer_rest": "MtpLayerRest"}
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fPIC", "-shared", "-std=c++17", "-w"]
_STATUS: dict = {"available": None, "reason": "not tried yet", "library": None}
_LIB: list = []  # the loaded library (ctypes), once built
_THREADS: dict = {}  # {'requested': cap, 'in_effect': cap}: DecodeSettings.kernel_threads last applied
DEFAULT_SETTINGS = DEFAULT_DECODE_SETTINGS


def cache_dir() -> Path:
    root = os.environ.get("MTP_KERNEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "mtp", "kernels")
    return Path(root)


def _cpu_id() -> str:
    """What ``-march=native`` depends on: the CPU's model and feature flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))][:2]
        return "\n".join(lines)
    except OSError:
        return platform.processor() or platform.machine()


def build(compiler: str | None = None) -> Path:
    """The shared library for this source, compiler flags, jaxlib headers and CPU: compiled once
    (atomically, so concurrent processes are safe), then reused. Raises ``RuntimeError`` with the
    compiler's message when it fails."""
    cxx = compiler or os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")
    if not cxx:
        raise RuntimeError("no C++ compiler found (install g++ or set CXX)")
    include = jax.ffi.include_dir()
    key = hashlib.sha256("\0".join([*(p.read_text() for p in SOURCES), " ".join(FLAGS), cxx, include, jax.__version__,
                                    _cpu_id()]).encode()).hexdigest()[:16]
    out = cache_dir() / f"mtp_kernels-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    cmd = [cxx, *FLAGS, f"-I{include}", str(SOURCE), "-o", tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    os.replace(tmp, out)
    return out


def kernels_built() -> bool:
    """Whether the kernel library is built and registered here (tried once: on a CPU backend with a
    C++ compiler); ``kernel_status()['reason']`` says why not."""
    if _STATUS["available"] is None:
        _STATUS["available"] = _load()
    return _STATUS["available"]


def rows_matmul_available(settings: DecodeSettings = DEFAULT_SETTINGS) -> bool:
    """Whether decoding with ``settings`` uses the CPU kernels: ``backend`` 'xla' never, 'auto'
    where they build (a CPU backend), 'cpu_kernels' always (a ``ValueError`` naming the reason when
    they cannot run here). Applies ``settings.kernel_threads``."""
    if settings.backend == "xla":
        return False
    if not kernels_built():
        if settings.backend == "cpu_kernels":
            raise ValueError(f"decode backend 'cpu_kernels': the CPU kernels cannot run here ({_STATUS['reason']});"
                             " use --decode-backend auto or xla.")
        return False
    set_kernel_threads(settings.kernel_threads)
    return True


def set_kernel_threads(cap: int) -> int:
    """Caps the kernels' threads (0: XLA's CPU thread count) before their first call; the count is
    fixed for the process from then on, so a later different cap only warns. Returns the cap in
    effect."""
    if _THREADS.get("requested") == cap or not _LIB:
        return _THREADS.get("in_effect", cap)
    in_effect = int(_LIB[0].MtpSetKernelThreads(ctypes.c_int64(cap)))
    if in_effect != cap:
        warnings.warn(f"mtp: kernel_threads={cap} ignored: the CPU kernels already run on"
                      f" {in_effect or 'XLA’s count of'} threads in this process (the count is fixed at their"
                      " first call); start a new process to change it.", stacklevel=3)
    _THREADS.update(requested=cap, in_effect=in_effect)
    return in_effect


def kernel_status() -> dict:
    """``{'available', 'reason', 'library'}``: whether the kernel library runs here (see
    ``rows_matmul_available`` for whether a decode uses it)."""
    kernels_built()
    return dict(_STATUS)


def _load() -> bool:
    if jax.default_backend() != "cpu":
        _STATUS["reason"] = f"the default backend is {jax.default_backend()}, not cpu"
        return False
    try:
        path = build()
        lib = ctypes.cdll.LoadLibrary(str(path))
        for target, symbol in TARGETS.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
        lib.MtpSetKernelThreads.restype = ctypes.c_int64
        lib.MtpSetKernelThreads.argtypes = [ctypes.c_int64]
    except Exception as e:  # noqa: BLE001 - any failure means: use XLA's products instead
        _STATUS["reason"] = f"could not build or load {SOURCE.name}: {e}"
        warnings.warn(f"mtp: decoding uses XLA's matrix products ({_STATUS['reason']}); pass --decode-backend"
                      " xla (DecodeSettings(backend='xla')) to silence this.", stacklevel=3)
        print(f"[mtp.kernels] {_STATUS['reason']}", file=sys.stderr)
        return False
    _LIB[:] = [lib]
    _STATUS.update(reason="built and registered", library=str(path))
    return True


def rows_matmul(x_MxI: jax.Array, w: jax.Array, w_out_in: bool) -> jax.Array:
    """``x @ W`` in float32 for ``W`` stored ``[O, I]`` (``w_out_in``) or ``[I, O]``. Each output row
    is bitwise the same whatever the number of rows ``M`` (see the C++ source)."""
    if not kernels_built():
        raise RuntimeError(f"mtp rows_matmul kernel unavailable: {_STATUS['reason']}")
    n_out = w.shape[0] if w_out_in else w.shape[1]
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((x_MxI.shape[0], n_out), jnp.float32),
                            vmap_method="sequential")
    return call(x_MxI.astype(jnp.float32), w.astype(jnp.float32), w_out_in=w_out_in)



def packed_matmul(x_MxI: jax.Array, q: jax.Array, d: jax.Array, m: jax.Array | None = None, *,
                  q8x: bool = False) -> jax.Array:
    """``x @ W.T`` for ``W [O, I]`` packed in blocks of 32 along ``I`` and dequantized in registers:
    ``q`` int8 ``[O, I]`` with ``W = d * q`` (``m`` None), or ``q`` uint8 ``[O, I / 2]`` (two 4-bit
    values a byte, GGUF's Q4_1 order) with ``W = d * q + m``; ``d``, ``m``: float32 ``[O, I / 32]``.
    Within float rounding of the float32 product, and row-independent like ``rows_matmul``.
    ``q8x``: quantize each block of 32 of ``x`` to int8 first (llama.cpp's activations; integer
    dot products, ~2x faster, an error of up to half a step of x's block scale per element)."""
    if not kernels_built():
        raise RuntimeError(f"mtp packed kernel unavailable: {_STATUS['reason']}")
    out = jax.ShapeDtypeStruct((x_MxI.shape[0], d.shape[0]), jnp.float32)
    x = x_MxI.astype(jnp.float32)
    if m is None:
        return jax.ffi.ffi_call("mtp_rows_matmul_s8", out, vmap_method="sequential")(x, q, d, q8x=q8x)
    return jax.ffi.ffi_call("mtp_rows_matmul_u4", out, vmap_method="sequential")(x, q, d, m, q8x=q8x)


def decode_attention(q_TxNxH: jax.Array, k_KxSxH: jax.Array, v_KxSxH: jax.Array, mask_TxS: jax.Array) -> jax.Array:
    """Batch-1 grouped-query attention of T new tokens over a cache (``[T, N, H]`` out), scale
    ``1/sqrt(H)``, float32; each token's result is bitwise independent of T (see the C++ source)."""
    if not kernels_built():
        raise RuntimeError(f"mtp decode attention kernel unavailable: {_STATUS['reason']}")
    H = q_TxNxH.shape[-1]
    call = jax.ffi.ffi_call("mtp_decode_attention", jax.ShapeDtypeStruct(q_TxNxH.shape, jnp.float32),
                            vmap_method="sequential")
    return call(q_TxNxH.astype(jnp.float32), k_KxSxH.astype(jnp.float32), v_KxSxH.astype(jnp.float32),
                mask_TxS.astype(jnp.uint8), scale=np.float32(H ** -0.5))


def _packed_args(w) -> tuple:
    """A ``PackedMatrix``'s operands for the fused layer: q, d and m (an empty m for s8 blocks)."""
    m = w.m if w.m is not None else jnp.zeros((0, 0), jnp.float32)
    return w.q, w.d, m


def layer_qkv(x_TxD: jax.Array, norm_D: jax.Array, wqkv, cos_TxH2: jax.Array, sin_TxH2: jax.Array, *, n_heads: int,
              n_kv_heads: int, eps: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The fused first half of a batch-1 decode layer (``decode_layer.cc``): RMSNorm, the packed
    ``wqkv`` product and RoPE (angles' ``cos``/``sin`` ``[T, H / 2]``) -> ``q [T, N, H]``,
    ``k [K, T, H]``, ``v [K, T, H]`` (keys and values in the cache's layout)."""
    T = x_TxD.shape[0]
    H = 2 * cos_TxH2.shape[-1]
    out = (jax.ShapeDtypeStruct((T, n_heads, H), jnp.float32),
           jax.ShapeDtypeStruct((n_kv_heads, T, H), jnp.float32),
           jax.ShapeDtypeStruct((n_kv_heads, T, H), jnp.float32))
    call = jax.ffi.ffi_call("mtp_layer_qkv", out, vmap_method="sequential")
    return call(x_TxD.astype(jnp.float32), norm_D.astype(jnp.float32), *_packed_args(wqkv), cos_TxH2, sin_TxH2,
                eps=np.float32(eps), q8x=bool(wqkv.q8x))


def layer_rest(x_TxD: jax.Array, q_TxNxH: jax.Array, k_KxSxH: jax.Array, v_KxSxH: jax.Array, mask_TxS: jax.Array,
               wo, mlp_norm_D: jax.Array, wgu, wdown, *, eps: float) -> jax.Array:
    """The fused second half (``decode_layer.cc``): attention over the cache (already holding the
    new keys and values), ``x + attn @ wo``, RMSNorm, ``silu(gate) * up``, ``@ wdown`` and the
    residual -> the layer's output ``[T, D]``."""
    H = q_TxNxH.shape[-1]
    call = jax.ffi.ffi_call("mtp_layer_rest", jax.ShapeDtypeStruct(x_TxD.shape, jnp.float32), vmap_method="sequential")
    return call(x_TxD.astype(jnp.float32), q_TxNxH, k_KxSxH, v_KxSxH, mask_TxS.astype(jnp.uint8), *_packed_args(wo),
                mlp_norm_D.astype(jnp.float32), *_packed_args(wgu), *_packed_args(wdown), eps=np.float32(eps),
                scale=np.float32(H ** -0.5), q8x=bool(wo.q8x))
