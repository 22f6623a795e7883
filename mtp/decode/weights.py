"""Decode-time weight layout: per-layer arrays, fused projections, ``[out, in]`` matrices where
they stream from memory (``weights_out_in``).

Training keeps every layer's weights stacked (``[L, ...]``, scanned) and multiplies ``x @ W``
with ``W`` as ``[in, out]``. Batch-1 decoding is bound by reading the weights, and on XLA:CPU both
choices cost a lot there (``mtp bench decode``; docs/decoding.md "Why a decode layout"):

- a static slice of a stacked weight feeding a matmul is materialized first (an extra write and
  read of every weight per token; ~10x slower than separate arrays in an unrolled loop);
- ``[T, in] @ [in, out]`` for a small block of T = 2..16 tokens runs ~2.5x slower than T = 1;
  with ``W`` as ``[out, in]``, ``linear`` computes such a block as one fused multiply + row sum
  that reads ``W`` once (``FUSED_ROWS_MAX``): this is what keeps a speculative block cheap.

On the CPU, ``linear`` hands float32 products of 2..``FUSED_ROWS_MAX`` rows with a matrix of at
least ``KERNEL_MIN_BYTES`` to ``mtp.kernels.rows_matmul``, a hand-written kernel that streams the
matrix once for the whole block at about the speed of XLA's one-row code (one row stays with XLA,
which is slightly faster there); ``DecodeSettings(backend='xla')`` turns it off. Every choice here
follows the ``DecodeSettings`` it is given (``DecodeConfig.settings``; docs/decoding.md).

``decode_weights(model)`` converts once (LoRA adapters merged, q/k/v and gate/up fused, cast to
the compute dtype); ``cached_decode_weights`` keeps the last conversion for the same parameter
arrays and settings so repeated ``generate`` calls reuse it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtp.config import DEFAULT_DECODE_SETTINGS, DecodeSettings
from mtp.decode.packed import PackedMatrix, activations_int8, may_pack, pack_decode_weights, packing_enabled
from mtp.kernels import packed_matmul, rows_matmul, rows_matmul_available
from mtp.model.heads import head_kind
from mtp.model.transformer import rms_norm

CACHE_RESIDENT_BYTES = 1 << 20  # an MLP matrix below this stays in cache from token to token
# [out, in] matrices times a block of 2..FUSED_ROWS_MAX rows: XLA:CPU's dot streams W at 5-7 GB/s
# there (against ~18 GB/s for one row), a fused multiply + row-sum at 9-12 GB/s for any such block
FUSED_ROWS_MAX = 32
DEFAULT_SETTINGS = DEFAULT_DECODE_SETTINGS
KERNEL_MIN_BYTES = DEFAULT_SETTINGS.kernel_min_bytes  # smaller matrices stay in cache: XLA's products are as fast
PREFILL_FLOAT_MAX_BYTES = DEFAULT_SETTINGS.prefill_float_max_bytes  # float32 prefill layers kept up to this size
# below this many rows a prefill streams the float32 layers (4-6x the packed bytes) for little work:
# the packed kernel is as fast (SmolLM2: 16 rows 55 ms packed, ~90 ms float32; 32 rows 105 / 91)
PREFILL_FLOAT_MIN_ROWS = 32


def use_kernel(x_MxI: jax.Array, w: jax.Array, settings: DecodeSettings = DEFAULT_SETTINGS) -> bool:
    """Whether ``linear`` sends this product to ``mtp.kernels.rows_matmul``: a block of 2..32 rows, a
    float32 matrix of at least ``settings.kernel_min_bytes``, the CPU kernels in use."""
    if not 1 < x_MxI.shape[0] <= FUSED_ROWS_MAX or w.dtype != jnp.float32 or w.size * 4 < settings.kernel_min_bytes:
        return False
    return rows_matmul_available(settings)


def weights_out_in(spec, settings: DecodeSettings = DEFAULT_SETTINGS) -> bool:
    """Layout of the decode matrices (``settings.layout``; 'auto': ``[out, in]`` when they stream
    from memory (large models), ``[in, out]`` when they stay in cache (small models: XLA:CPU's
    ``x @ W`` is faster there)."""
    if settings.layout != "auto":
        return settings.layout == "out_in"
    return spec.d_model * spec.resolved_d_ff * jnp.dtype(spec.dtype).itemsize >= CACHE_RESIDENT_BYTES


def linear(x_xI: jax.Array, w: jax.Array, settings: DecodeSettings = DEFAULT_SETTINGS) -> jax.Array:
    """``x @ W`` for a decode matrix: ``w`` is ``[O, I]`` (computed as ``w . x[M, I] -> [O, M]``,
    then transposed) or ``[I, O]`` (plain ``x @ w``): the layout ``weights_out_in`` chose, told
    apart by the input size (square matrices are the same either way up to the transpose, so
    ``decode_weights`` stores those ``[in, out]`` in both layouts)."""
    n_in = x_xI.shape[-1]
    if isinstance(w, PackedMatrix):  # GGUF blocks, dequantized in registers (mtp.decode.packed)
        y_MxO = packed_matmul(x_xI.reshape(-1, n_in), w.q, w.d, w.m, q8x=w.q8x)
        return y_MxO.reshape(*x_xI.shape[:-1], y_MxO.shape[-1])
    x_MxI = x_xI.reshape(-1, n_in).astype(w.dtype)
    M = x_MxI.shape[0]
    if use_kernel(x_MxI, w, settings):
        y_MxO = rows_matmul(x_MxI, w, w_out_in=w.shape[0] != n_in)
    elif w.shape[0] == n_in:
        y_MxO = x_MxI @ w
    elif 1 < M <= FUSED_ROWS_MAX:  # a block of a few tokens: read W once in a fused multiply-reduce
        y_MxO = jnp.sum(w[None] * x_MxI[:, None, :], axis=-1)
    else:
        y_MxO = jax.lax.dot_general(w, x_MxI, (((1,), (1,)), ((), ()))).T
    return y_MxO.reshape(*x_xI.shape[:-1], y_MxO.shape[-1])


def _lora_merged(module, name: str, n_in: int):
    """``W [..., I, O]`` of stacked ``module.name`` (flattened to I x O), LoRA delta added."""
    w = getattr(module, name)[...]
    L = w.shape[0]
    w_LxIxO = w.reshape(L, n_in, -1).astype(jnp.float32)
    if getattr(module, "lora_rank", 0):
        a_LxIxR = getattr(module, f"{name}_lora_a")[...].reshape(L, n_in, -1).astype(jnp.float32)
        b_LxRxO = getattr(module, f"{name}_lora_b")[...].reshape(L, module.lora_rank, -1).astype(jnp.float32)
        w_LxIxO = w_LxIxO + float(module.lora_scale) * jnp.einsum("lir,lro->lio", a_LxIxR, b_LxRxO)
    return w_LxIxO


def _store(w_LxIxO, out_in: bool, dt):
    """A stacked matrix in the decode layout: ``[L, O, I]`` when ``out_in`` and not square."""
    if out_in and w_LxIxO.shape[1] != w_LxIxO.shape[2]:
        w_LxIxO = w_LxIxO.transpose(0, 2, 1)
    return w_LxIxO.astype(dt)


def _layers(blocks, spec, dt, out_in: bool) -> list[dict]:
    """Stacked Blocks -> one dict per layer: norms, ``wqkv`` (D -> (N+2K)H), ``wo`` (NH -> D),
    ``wgu`` (D -> 2F, gate then up), ``wdown`` (F -> D)."""
    D, F = spec.d_model, spec.resolved_d_ff
    NH = spec.n_heads * spec.resolved_head_dim
    attn, mlp = blocks.attn, blocks.mlp
    wqkv = jnp.concatenate([_lora_merged(attn, n, D) for n in ("wq", "wk", "wv")], axis=-1)
    wgu = jnp.concatenate([_lora_merged(mlp, "w_gate", D), _lora_merged(mlp, "w_up", D)], axis=-1)
    wqkv, wgu = _store(wqkv, out_in, dt), _store(wgu, out_in, dt)
    wo, wdown = _store(_lora_merged(attn, "wo", NH), out_in, dt), _store(_lora_merged(mlp, "w_down", F), out_in, dt)
    attn_norm, mlp_norm = blocks.attn_norm.scale[...], blocks.mlp_norm.scale[...]
    return [{"attn_norm": attn_norm[i], "wqkv": wqkv[i], "wo": wo[i], "mlp_norm": mlp_norm[i],
             "wgu": wgu[i], "wdown": wdown[i]} for i in range(wqkv.shape[0])]


def decode_weights(model, out_in: bool | None = None, settings: DecodeSettings = DEFAULT_SETTINGS) -> dict:
    """The decode layout of ``model``'s parameters (works on concrete arrays or inside a trace);
    ``out_in``: the matrix layout, ``weights_out_in(spec, settings)`` by default."""
    spec = model.spec
    dt = jnp.dtype(spec.dtype)
    out_in = weights_out_in(spec, settings) if out_in is None else out_in
    embed_VxD = model.embed[...].astype(dt)
    unembed_DxV = embed_VxD.T if spec.tie_embeddings else model.unembed[...].astype(dt)
    out = {
        "embed": embed_VxD,
        "unembed": _store(unembed_DxV[None], out_in, dt)[0],
        "final_norm": model.final_norm.scale[...],
        "trunk": _layers(model.trunk, spec, dt, out_in),
    }
    if head_kind(spec).layer:
        out["heads"] = _layers(model.heads, spec, dt, out_in)
    else:  # linear / medusa: x + f(x @ W), W square: kept [in, out]
        w = model.heads.w[...].astype(dt)
        b = model.heads.b[...].astype(dt) if head_kind(spec).bias else None
        out["heads"] = [{"w": w[i], **({"b": b[i]} if b is not None else {})} for i in range(w.shape[0])]
    return out


@functools.partial(jax.jit, static_argnames=("graphdef", "out_in"))
def _decode_weights_jit(graphdef, state, out_in: bool):
    return decode_weights(nnx.merge(graphdef, state), out_in)


_LAST: list = []  # [(parameter leaves, decode weights)]: one entry, the last model converted
LAST_PACKING: dict = {}  # pack_decode_weights' report for the last conversion (benchmarks print it)


def cached_decode_weights(model, settings: DecodeSettings = DEFAULT_SETTINGS) -> dict:
    """``decode_weights`` for concrete parameters, reused while the parameter arrays are the same
    objects and ``settings`` the same (a trained or reloaded model has new arrays, so it is
    converted again). A model whose weights are exactly GGUF blocks decodes from the blocks
    (``mtp.decode.packed``) unless ``settings.packed_weights`` is off."""
    graphdef, state = nnx.split(model)
    out_in = weights_out_in(model.spec, settings)
    enabled = packing_enabled(settings) and jnp.dtype(model.spec.dtype) == jnp.float32
    q8x = enabled and activations_int8(settings)
    # what the settings decide here (layout, packing, prefill layers) is part of the key
    key = (out_in, enabled, q8x, settings.prefill_float, settings.prefill_float_max_bytes)
    leaves = [key, *jax.tree.leaves(state)]
    if _LAST and len(_LAST[0][0]) == len(leaves) and _LAST[0][0][0] == key \
            and all(a is b for a, b in zip(_LAST[0][0][1:], leaves[1:])):
        return _LAST[0][1]
    report, floats = {"exact": 0}, None
    if enabled and may_pack(model):
        floats = _decode_weights_jit(graphdef, state, True)
        weights, report = pack_decode_weights(floats, q8x)
    if not report["exact"]:
        weights = floats if floats is not None and out_in else _decode_weights_jit(graphdef, state, out_in)
    else:  # the float32 layers the blocks were packed from serve prompt prefills (prefill_weights)
        layers = {"trunk": floats["trunk"], "heads": floats["heads"]}
        keep = settings.prefill_float and sum(
            int(a.nbytes) for a in jax.tree.leaves(layers)) <= settings.prefill_float_max_bytes
        weights = {**weights, "prefill": layers} if keep else weights
        report["prefill"] = "float32" if keep else "packed"
    LAST_PACKING.clear()
    LAST_PACKING.update(report)
    _LAST[:] = [(leaves, weights)]
    return weights


def prefill_weights(weights: dict, n_rows: int) -> dict:
    """The weights a prefill of ``n_rows`` prompt rows multiplies with: with packed decode weights,
    the float32 layers ``cached_decode_weights`` packed them from, kept beside them (the same values:
    packing is exact), so the prompt goes through XLA's matrix-matrix products; decode steps keep
    the packed weights. The packed kernel converts each block for every 3 rows: a 64-row SmolLM2
    prefill took 200 ms that way and 56-80 ms with float32 layers, 128 rows 471 and 98-155 ms
    (2026-12-02); under ``PREFILL_FLOAT_MIN_ROWS`` rows the prefill stays packed.
    ``DecodeSettings.prefill_float=False`` keeps no float32 layers (``cached_decode_weights``);
    ``prefill_float_max_bytes`` caps them."""
    floats = weights.get("prefill")
    if n_rows < PREFILL_FLOAT_MIN_ROWS or floats is None:
        return weights
    return {**weights, "trunk": floats["trunk"], "heads": floats["heads"]}


def step_bytes(weights: dict) -> int:
    """Bytes of decode weights one plain greedy step streams: the trunk, head 1, the final norm and
    the unembedding (the embedding is only gathered; heads 2..n only draft)."""
    parts = [weights["trunk"], weights["heads"][:1], weights["final_norm"], weights["unembed"]]
    return sum(int(a.size) * jnp.dtype(a.dtype).itemsize for a in jax.tree.leaves(parts))


def project(weights: dict, hidden_xD: jax.Array, eps: float, settings: DecodeSettings = DEFAULT_SETTINGS) -> jax.Array:
    """Shared final norm + unembedding in the decode layout: ``[..., D] -> [..., V]`` logits."""
    return linear(rms_norm(hidden_xD, weights["final_norm"], eps), weights["unembed"], settings)


def draft_unembed(weights: dict, ids) -> tuple[jax.Array, jax.Array | PackedMatrix]:
    """``(ids_N, the unembedding of those N tokens)`` in the decode layout, for heads that draft
    among a few tokens only (``DecodeConfig.draft_ids``): rows of a packed or ``[V, D]`` matrix,
    columns of a ``[D, V]`` one."""
    ids_N = jnp.asarray(np.asarray(ids, np.int32))
    w = weights["unembed"]
    if isinstance(w, PackedMatrix):
        return ids_N, PackedMatrix(w.q[ids_N], w.d[ids_N], None if w.m is None else w.m[ids_N], w.q8x)
    n_embd = weights["final_norm"].shape[0]
    return ids_N, (w[:, ids_N] if w.shape[0] == n_embd else w[ids_N])


def simple_head(hw: dict, x_BxTxD: jax.Array, settings: DecodeSettings = DEFAULT_SETTINGS) -> jax.Array:
    """A ``linear`` (``x + x W``) or ``medusa`` (``x + silu(x W + b)``) head."""
    y = linear(x_BxTxD, hw["w"], settings)
    return x_BxTxD + (jax.nn.silu(y + hw["b"]) if "b" in hw else y)
