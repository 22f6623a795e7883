"""KV cache for the trunk and every head layer, and the cached forward pass.

Static shapes: keys/values ``[L, B, S, K, H]`` (trunk) and ``[k, B, S, K, H]`` (the first k heads),
plus a per-row length pointer ``lengths_B``. A forward over ``T`` new tokens writes their keys and
values at slots ``lengths_b .. lengths_b + T - 1`` of row b; a new token at block index t attends
to every slot ``< lengths_b`` (the accepted prefix) and to the block tokens that ``block_mask_TxT``
allows (causal for a prompt or a chain, ancestors for a tree). Rolling back is setting
``lengths_B``: slots past the length are never attended to and are overwritten later.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtp.model.heads import LAYER_HEADS, causal_combine
from mtp.model.lm import MTPLM


def init_cache(spec, batch: int, max_len: int, n_heads: int) -> dict:
    K, H, dt = spec.n_kv_heads, spec.resolved_head_dim, jnp.dtype(spec.dtype)
    L = spec.trunk_layers
    n_head_layers = n_heads if spec.head_type in LAYER_HEADS else 0
    cache = {
        "trunk_k": jnp.zeros((L, batch, max_len, K, H), dt),
        "trunk_v": jnp.zeros((L, batch, max_len, K, H), dt),
        "head_k": jnp.zeros((n_head_layers, batch, max_len, K, H), dt),
        "head_v": jnp.zeros((n_head_layers, batch, max_len, K, H), dt),
    }
    if spec.head_type == "causal":  # head 1's output per slot: what sequential head 2 reads
        cache["h1"] = jnp.zeros((1, batch, max_len, spec.d_model), dt)
    return cache


def cache_mask(lengths_B, block_mask_TxT, max_len: int):
    """bool ``[B, 1, T, S]``: prefix slots ``< lengths_b`` plus the allowed block slots."""
    T = block_mask_TxT.shape[0]
    rel_BxS = jnp.arange(max_len, dtype=jnp.int32)[None, :] - lengths_B[:, None]
    prefix_BxS = rel_BxS < 0
    in_block_BxS = (rel_BxS >= 0) & (rel_BxS < T)
    block_BxTxS = jnp.asarray(block_mask_TxT)[:, jnp.clip(rel_BxS, 0, T - 1)].transpose(1, 0, 2)
    return (prefix_BxS[:, None, :] | (in_block_BxS[:, None, :] & block_BxTxS))[:, None]


def _block_step(block, x_BxTxD, positions_BxT, mask_Bx1xTxS, k_BxSxKxH, v_BxSxKxH, slots_BxT):
    """One transformer layer over the new tokens, writing their keys/values into the cache."""
    b_Bx1 = jnp.arange(x_BxTxD.shape[0])[:, None]
    q_BxTxNxH, k_BxTxKxH, v_BxTxKxH = block.attn.qkv(block.attn_norm(x_BxTxD), positions_BxT)
    k_BxSxKxH = k_BxSxKxH.at[b_Bx1, slots_BxT].set(k_BxTxKxH, mode="drop")
    v_BxSxKxH = v_BxSxKxH.at[b_Bx1, slots_BxT].set(v_BxTxKxH, mode="drop")
    out_BxTxNxH = jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=mask_Bx1xTxS,
                                               implementation="xla")
    x_BxTxD = x_BxTxD + block.attn.out(out_BxTxNxH)
    x_BxTxD = x_BxTxD + block.mlp(block.mlp_norm(x_BxTxD))
    return x_BxTxD, k_BxSxKxH, v_BxSxKxH


def forward_cached(model: MTPLM, cache: dict, tokens_BxT, lengths_B, depth_T, block_mask_TxT,
                   n_heads: int, unroll: bool = True):
    """Hidden states of the first ``n_heads`` heads ``[n_heads, B, T, D]`` for new tokens placed at
    ``lengths_B + depth_T`` (their positions), and the cache with their keys/values written."""
    S = cache["trunk_k"].shape[2]
    depth_T = jnp.asarray(depth_T, jnp.int32)
    positions_BxT = lengths_B[:, None] + depth_T[None, :]
    slots_BxT = lengths_B[:, None] + jnp.arange(tokens_BxT.shape[1], dtype=jnp.int32)[None, :]
    mask = cache_mask(lengths_B, block_mask_TxT, S)
    x_BxTxD = model.embed[...].astype(model.spec.dtype)[tokens_BxT]

    trunk_def, trunk_state = nnx.split(model.trunk)

    states = not model.shared_head_input  # heads 2..n read an earlier layer or a mix of all

    def layer(x_BxTxD, xs):
        state, k_BxSxKxH, v_BxSxKxH = xs
        x_BxTxD, k_BxSxKxH, v_BxSxKxH = _block_step(nnx.merge(trunk_def, state), x_BxTxD, positions_BxT,
                                                    mask, k_BxSxKxH, v_BxSxKxH, slots_BxT)
        return x_BxTxD, (k_BxSxKxH, v_BxSxKxH, x_BxTxD if states else None)

    h_BxTxD, (trunk_k, trunk_v, states_LxBxTxD) = jax.lax.scan(
        layer, x_BxTxD, (trunk_state, cache["trunk_k"], cache["trunk_v"]), unroll=unroll)
    if states and n_heads > 1:  # the same head inputs as MTPLM.trunk_features
        sources, src_N = model.head_sources(x_BxTxD, states_LxBxTxD)
        head_in = [sources[src_N[i]] for i in range(n_heads)]
    else:
        head_in = [h_BxTxD] * n_heads
    # Heads one at a time with static slices: plain 2-D matmuls (a vmapped batched matmul is
    # several times slower on XLA:CPU), n_heads <= n_future is small.
    head_k, head_v, hidden = cache["head_k"], cache["head_v"], []
    for i in range(n_heads):
        head = model.head_layer(i)
        if model.spec.head_type in LAYER_HEADS:
            h_i, k_i, v_i = _block_step(head, head_in[i], positions_BxT, mask, head_k[i], head_v[i], slots_BxT)
            head_k, head_v = head_k.at[i].set(k_i), head_v.at[i].set(v_i)
        else:
            h_i = head(head_in[i], None, None)
        hidden.append(h_i)
    hidden_NxBxTxD = jnp.stack(hidden)
    new = {"trunk_k": trunk_k, "trunk_v": trunk_v, "head_k": head_k, "head_v": head_v}
    if "h1" in cache:
        b_Bx1 = jnp.arange(tokens_BxT.shape[0])[:, None]
        new["h1"] = cache["h1"].at[0, b_Bx1, slots_BxT].set(hidden_NxBxTxD[0], mode="drop")
    return hidden_NxBxTxD, new


def causal_drafts(model: MTPLM, cache: dict, seq_BxS, lengths_B, n_heads: int, window: int):
    """Sequential (``head_type='causal'``) drafting: ``(drafts [B, n_heads-1], cache)``.

    ``lengths_B`` slots hold the accepted prefix in the trunk cache and head 1's outputs
    (``cache['h1']``); ``seq_BxS`` holds the tokens by position, the next (not yet cached) token
    at ``lengths_b``. Head k at position p reads head k-1's output there and token ``p + k - 1``;
    its cache entries are final only once that token is known, so every call recomputes heads
    2..k over the last ``window`` positions (``>= 2k - 1`` covers what changed since the last
    call, see ``generate``) on top of their cached older entries, feeding each head the drafts of
    the heads before it where the tokens are not known yet: draft k (head k at the last position)
    predicts token ``lengths_b + k - 1``.
    """
    spec = model.spec
    B, S = seq_BxS.shape
    b_Bx1 = jnp.arange(B)[:, None]
    start_B = jnp.maximum(lengths_B - window, 0)
    pos_BxW = start_B[:, None] + jnp.arange(window, dtype=jnp.int32)[None, :]
    mask = cache_mask(start_B, np.tril(np.ones((window, window), bool)), S)
    last_B = lengths_B - 1 - start_B
    prev_BxWxD = cache["h1"][0][b_Bx1, jnp.minimum(pos_BxW, S - 1)]
    embed = model.embed[...].astype(spec.dtype)
    head_k, head_v, drafts = cache["head_k"], cache["head_v"], []
    for k in range(2, n_heads + 1):
        tok_BxW = seq_BxS[b_Bx1, jnp.minimum(pos_BxW + k - 1, S - 1)]
        x = causal_combine(prev_BxWxD, embed[tok_BxW], model.causal_proj[k - 2], model.causal_h_norm[k - 2],
                           model.causal_e_norm[k - 2], spec.norm_eps)
        prev_BxWxD, k_i, v_i = _block_step(model.head_layer(k - 1), x, pos_BxW, mask, head_k[k - 1],
                                           head_v[k - 1], pos_BxW)
        head_k, head_v = head_k.at[k - 1].set(k_i), head_v.at[k - 1].set(v_i)
        last_BxD = jnp.take_along_axis(prev_BxWxD, last_B[:, None, None], axis=1)[:, 0]
        d_B = jnp.argmax(model.project(last_BxD), -1).astype(jnp.int32)
        seq_BxS = seq_BxS.at[jnp.arange(B), lengths_B + k - 1].set(d_B, mode="drop")
        drafts.append(d_B)
    cache = {**cache, "head_k": head_k, "head_v": head_v}
    return jnp.stack(drafts, axis=1), cache


def compact_cache(cache: dict, lengths_B, path_BxD):
    """Move the accepted tree path's entries (block indices ``path_BxD``) to consecutive slots
    ``lengths_b + 0 .. D-1`` (a no-op for chains, where the path is 0, 1, 2, ...)."""
    b_Bx1 = jnp.arange(lengths_B.shape[0])[:, None]
    src_BxD = lengths_B[:, None] + path_BxD
    dst_BxD = lengths_B[:, None] + jnp.arange(path_BxD.shape[1], dtype=jnp.int32)[None, :]

    def move(c_LxBxSxKxH):
        moved = c_LxBxSxKxH[:, b_Bx1, src_BxD]
        return c_LxBxSxKxH.at[:, b_Bx1, dst_BxD].set(moved, mode="drop")

    return jax.tree.map(move, cache)
