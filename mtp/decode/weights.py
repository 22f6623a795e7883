"""Decode-time weight layout: per-layer arrays, fused projections, ``[out, in]`` matrices.

Training keeps every layer's weights stacked (``[L, ...]``, scanned) and multiplies ``x @ W``
with ``W`` as ``[in, out]``. Batch-1 decoding is bound by reading the weights, and on XLA:CPU both
choices cost a lot there (``mtp bench decode``; docs/decoding.md "Why a decode layout"):

- a static slice of a stacked weight feeding a matmul is materialized first (an extra write and
  read of every weight per token; ~10x slower than separate arrays in an unrolled loop);
- ``[T, in] @ [in, out]`` for a small block of T = 2..16 tokens runs ~2.5x slower than T = 1,
  while ``W[out, in] . x[T, in] -> [out, T]`` costs ~1.3x: this is what makes a speculative block
  nearly as cheap as one token.

``decode_weights(model)`` converts once (LoRA adapters merged, q/k/v and gate/up fused, cast to
the compute dtype); ``cached_decode_weights`` keeps the last conversion for the same parameter
arrays so repeated ``generate`` calls reuse it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from mtp.model.heads import LAYER_HEADS
from mtp.model.transformer import rms_norm


def linear(x_xI: jax.Array, w_OxI: jax.Array) -> jax.Array:
    """``x @ w.T`` computed as ``w[O, I] . x[M, I] -> [O, M]`` then transposed (see module doc)."""
    x_MxI = x_xI.reshape(-1, x_xI.shape[-1])
    y_OxM = jax.lax.dot_general(w_OxI, x_MxI.astype(w_OxI.dtype), (((1,), (1,)), ((), ())))
    return y_OxM.T.reshape(*x_xI.shape[:-1], w_OxI.shape[0])


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


def _layers(blocks, spec, dt) -> list[dict]:
    """Stacked Blocks -> one dict per layer: norms, ``wqkv [(N+2K)H, D]``, ``wo [D, NH]``,
    ``wgu [2F, D]``, ``wdown [D, F]``."""
    D, F = spec.d_model, spec.resolved_d_ff
    NH = spec.n_heads * spec.resolved_head_dim
    attn, mlp = blocks.attn, blocks.mlp
    q, k, v = (_lora_merged(attn, n, D) for n in ("wq", "wk", "wv"))
    wqkv = jnp.concatenate([q, k, v], axis=-1).transpose(0, 2, 1).astype(dt)
    wo = _lora_merged(attn, "wo", NH).transpose(0, 2, 1).astype(dt)
    wgu = jnp.concatenate([_lora_merged(mlp, "w_gate", D), _lora_merged(mlp, "w_up", D)], axis=-1)
    wgu = wgu.transpose(0, 2, 1).astype(dt)
    wdown = _lora_merged(mlp, "w_down", F).transpose(0, 2, 1).astype(dt)
    attn_norm, mlp_norm = blocks.attn_norm.scale[...], blocks.mlp_norm.scale[...]
    return [{"attn_norm": attn_norm[i], "wqkv": wqkv[i], "wo": wo[i], "mlp_norm": mlp_norm[i],
             "wgu": wgu[i], "wdown": wdown[i]} for i in range(wqkv.shape[0])]


def decode_weights(model) -> dict:
    """The decode layout of ``model``'s parameters (works on concrete arrays or inside a trace)."""
    spec = model.spec
    dt = jnp.dtype(spec.dtype)
    embed_VxD = model.embed[...].astype(dt)
    out = {
        "embed": embed_VxD,
        "unembed": embed_VxD if spec.tie_embeddings else model.unembed[...].T.astype(dt),
        "final_norm": model.final_norm.scale[...],
        "trunk": _layers(model.trunk, spec, dt),
    }
    if spec.head_type in LAYER_HEADS:
        out["heads"] = _layers(model.heads, spec, dt)
    else:  # linear / medusa: x + f(x @ W), W as [out, in]
        w = model.heads.w[...].transpose(0, 2, 1).astype(dt)
        b = model.heads.b[...].astype(dt) if spec.head_type == "medusa" else None
        out["heads"] = [{"w": w[i], **({"b": b[i]} if b is not None else {})} for i in range(w.shape[0])]
    return out


@functools.partial(jax.jit, static_argnames="graphdef")
def _decode_weights_jit(graphdef, state):
    return decode_weights(nnx.merge(graphdef, state))


_LAST: list = []  # [(parameter leaves, decode weights)]: one entry, the last model converted


def cached_decode_weights(model) -> dict:
    """``decode_weights`` for concrete parameters, reused while the parameter arrays are the same
    objects (a trained or reloaded model has new arrays, so it is converted again)."""
    graphdef, state = nnx.split(model)
    leaves = jax.tree.leaves(state)
    if _LAST and len(_LAST[0][0]) == len(leaves) and all(a is b for a, b in zip(_LAST[0][0], leaves)):
        return _LAST[0][1]
    weights = _decode_weights_jit(graphdef, state)
    _LAST[:] = [(leaves, weights)]
    return weights


def project(weights: dict, hidden_xD: jax.Array, eps: float) -> jax.Array:
    """Shared final norm + unembedding in the decode layout: ``[..., D] -> [..., V]`` logits."""
    return linear(rms_norm(hidden_xD, weights["final_norm"], eps), weights["unembed"])


def simple_head(hw: dict, x_BxTxD: jax.Array) -> jax.Array:
    """A ``linear`` (``x + x W``) or ``medusa`` (``x + silu(x W + b)``) head."""
    y = linear(x_BxTxD, hw["w"])
    return x_BxTxD + (jax.nn.silu(y + hw["b"]) if "b" in hw else y)
