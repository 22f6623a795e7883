"""The KV cache of the model's own layers, and what one cached forward shares across them.

Layout (one for every decode backend): keys/values ``[L, B, K, S, H]`` for the ``L`` trunk layers
and ``[k, B, K, S, H]`` for the first ``k`` head layers, plus (sequential heads) head 1's output
per slot ``h1 [1, B, S, D]``. Logical axes ``(layers|mtp_heads, batch, kv_heads, cache_seq,
head_dim)`` map to the mesh by the training rules (``mtp.sharding``): batch rows over ``data``, kv
heads over ``tensor`` (replicated where the kv heads do not divide it, e.g. 2 kv heads on
tensor=4).

A forward over ``T`` new tokens of row b writes their keys and values at slots ``lengths_b ..
lengths_b + T - 1``; a new token at block index t attends to every slot ``< lengths_b`` (the
accepted prefix) and to the block tokens ``block_mask_TxT`` allows (causal for a prompt or a chain,
ancestors for a tree). Rolling back is setting ``lengths_B``: slots past the length are never
attended to and are overwritten later.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from mtp.sharding import constrain

CACHE_AXES = ("layers", "batch", "kv_heads", None, "head_dim")  # [L, B, K, S, H]
H1_AXES = (None, "batch", None, None)  # [1, B, S, D]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class CacheStep:
    """What every layer of one cached forward shares: the rows' cache lengths ``[B]``, the slots the
    new tokens go to ``[B, T]``, the mask over the cache ``[B, 1, T, S]``, and (static) whether this
    is a prompt prefill into an empty cache (the new tokens then attend only to each other, so the
    training attention -- ``model.attention``'s kernel where it applies -- computes it; its
    ``segment_ids_BxT``, when given, keep packed documents apart as in training)."""

    lengths_B: jax.Array
    slots_BxT: jax.Array
    mask_Bx1xTxS: jax.Array | None
    prefill: bool = dataclasses.field(default=False, metadata={"static": True})
    segment_ids_BxT: jax.Array | None = None


def cache_mask(lengths_B, block_mask_TxT, max_len: int) -> jax.Array:
    """bool ``[B, 1, T, S]``: prefix slots ``< lengths_b`` plus the allowed block slots."""
    T = block_mask_TxT.shape[0]
    rel_BxS = jnp.arange(max_len, dtype=jnp.int32)[None, :] - lengths_B[:, None]
    prefix_BxS = rel_BxS < 0
    in_block_BxS = (rel_BxS >= 0) & (rel_BxS < T)
    block_BxTxS = jnp.asarray(block_mask_TxT)[:, jnp.clip(rel_BxS, 0, T - 1)].transpose(1, 0, 2)
    return (prefix_BxS[:, None, :] | (in_block_BxS[:, None, :] & block_BxTxS))[:, None]


def cache_step(lengths_B, depth_T, block_mask_TxT, max_len: int, *, prefill: bool = False):
    """``(positions_BxT, CacheStep)`` of a block of new tokens at tree depths ``depth_T`` after each
    row's ``lengths_b`` cached tokens (a prompt or a chain: depths ``0 .. T-1``)."""
    depth_T = jnp.asarray(depth_T, jnp.int32)
    positions_BxT = lengths_B[:, None] + depth_T[None, :]
    slots_BxT = lengths_B[:, None] + jnp.arange(depth_T.shape[0], dtype=jnp.int32)[None, :]
    return positions_BxT, CacheStep(lengths_B, slots_BxT, cache_mask(lengths_B, block_mask_TxT, max_len), prefill)


def zeros_cache(spec, batch: int, max_len: int, n_heads: int, *, layer_heads: bool, sequential: bool) -> dict:
    """Zeros in the cache layout for ``n_heads`` heads (``layer_heads``: the heads are transformer
    layers with keys and values; ``sequential``: head 1's outputs are kept for head 2)."""
    K, H, dt = spec.n_kv_heads, spec.resolved_head_dim, jnp.dtype(spec.dtype)
    L = spec.trunk_layers
    n_layers = n_heads if layer_heads else 0

    def zeros(n):
        return constrain(jnp.zeros((n, batch, K, max_len, H), dt), CACHE_AXES)

    cache = {"trunk_k": zeros(L), "trunk_v": zeros(L), "head_k": zeros(n_layers), "head_v": zeros(n_layers)}
    if sequential:
        cache["h1"] = constrain(jnp.zeros((1, batch, max_len, spec.d_model), dt), H1_AXES)
    return cache


def write_rows(c_BxSxX, new_BxTxX, lengths_B, slots_BxT):
    """New entries at ``lengths_b ..`` of a ``[B, S, ...]`` buffer: an in-place dynamic update for
    one row, a scatter for more."""
    new_BxTxX = new_BxTxX.astype(c_BxSxX.dtype)
    if c_BxSxX.shape[0] == 1:
        zero = jnp.zeros((), jnp.int32)
        return jax.lax.dynamic_update_slice(c_BxSxX, new_BxTxX, (zero, lengths_B[0]) + (zero,) * (c_BxSxX.ndim - 2))
    b_Bx1 = jnp.arange(c_BxSxX.shape[0])[:, None]
    return c_BxSxX.at[b_Bx1, slots_BxT].set(new_BxTxX, mode="drop")


def write_kv(c_BxKxSxH, new_BxTxKxH, step: CacheStep):
    """One layer's new keys (or values) ``[B, T, K, H]`` into its cache ``[B, K, S, H]`` at
    ``step.slots_BxT``."""
    new = new_BxTxKxH.astype(c_BxKxSxH.dtype)
    if c_BxKxSxH.shape[0] == 1:
        zero = jnp.zeros((), jnp.int32)
        return jax.lax.dynamic_update_slice(c_BxKxSxH, new.transpose(0, 2, 1, 3),
                                            (zero, zero, step.lengths_B[0], zero))
    b_Bx1 = jnp.arange(c_BxKxSxH.shape[0])[:, None]
    # advanced indices (b, slots) around a slice: the update is [B, T, K, H]
    return c_BxKxSxH.at[b_Bx1, :, step.slots_BxT].set(new, mode="drop")


def compact(cache: dict, lengths_B, path_BxD) -> dict:
    """Move the accepted tree path's entries (block indices ``path_BxD``) to consecutive slots
    ``lengths_b + 0 .. D-1`` of every layer (a no-op for chains: the path is 0, 1, 2, ...)."""
    B = lengths_B.shape[0]
    b_Bx1 = jnp.arange(B)[:, None]
    src_BxD = lengths_B[:, None] + path_BxD
    dst_BxD = lengths_B[:, None] + jnp.arange(path_BxD.shape[1], dtype=jnp.int32)[None, :]

    def move_kv(c_LxBxKxSxH):  # gathered [L, B, D, K, H] written back at the destination slots
        moved = c_LxBxKxSxH[:, b_Bx1, :, src_BxD]
        return c_LxBxKxSxH.at[:, b_Bx1, :, dst_BxD].set(moved, mode="drop")

    def move_rows(c_1xBxSxD):
        return c_1xBxSxD.at[:, b_Bx1, dst_BxD].set(c_1xBxSxD[:, b_Bx1, src_BxD], mode="drop")

    return {name: (move_rows if name == "h1" else move_kv)(c) for name, c in cache.items()}


def causal_block_mask(T: int) -> np.ndarray:
    return np.tril(np.ones((T, T), bool))
