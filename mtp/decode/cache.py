"""KV cache for the trunk and every head layer, and the cached forward pass.

Static shapes: keys/values ``[L, B, K, S, H]`` (trunk) and ``[k, B, K, S, H]`` (the first k
heads), plus a per-row length pointer ``lengths_B``. A forward over ``T`` new tokens writes their
keys and values at slots ``lengths_b .. lengths_b + T - 1`` of row b; a new token at block index t
attends to every slot ``< lengths_b`` (the accepted prefix) and to the block tokens that
``block_mask_TxT`` allows (causal for a prompt or a chain, ancestors for a tree). Rolling back is
setting ``lengths_B``: slots past the length are never attended to and are overwritten later.

The decode loop carries one ``[B*K, S, H]`` array per layer (``unstack_cache``): attention reads
each kv head's keys as one contiguous ``[S, H]`` matrix, straight from the updated buffer, so XLA
updates the cache in place with no per-step copy or transpose of it (an ``[S, K, H]`` layout or a
batch axis of 1 to squeeze made XLA copy every layer's cache every step).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mtp.config import DecodeSettings
from mtp.decode.packed import MATRICES, PackedMatrix
from mtp.decode.weights import DEFAULT_SETTINGS, decode_weights, linear, project, simple_head
from mtp.kernels import rows_matmul_available
from mtp.kernels.cpu import decode_attention, layer_qkv, layer_rest
from mtp.model.heads import causal_combine, head_kind
from mtp.model.kv_cache import cache_mask, write_rows
from mtp.model.lm import MTPLM
from mtp.model.transformer import rms_norm, rope, rope_angles


def unstack_cache(cache: dict) -> dict:
    """Stacked cache -> the per-layer lists the decode loop carries: keys/values ``[B*K, S, H]``,
    head-1 outputs ``[B, S, D]`` (no slicing of a stacked buffer per step)."""
    def layer(name, c):
        return c.reshape(-1, *c.shape[2:]) if name != "h1" else c  # [B, K, S, H] -> [B*K, S, H]

    return {name: [layer(name, c[i]) for i in range(c.shape[0])] for name, c in cache.items()}


def stack_cache(layered: dict, like: dict) -> dict:
    return {name: jnp.stack(layered[name]).reshape(like[name].shape) if layered[name] else like[name]
            for name in like}


def _write_kv(c_CxSxH, new_BxTxKxH, lengths_B, slots_BxT):
    """New keys/values into a per-layer cache ``[B*K, S, H]`` at slots ``lengths_b ..``: an
    in-place dynamic update for one row, a scatter for more."""
    B, T, K, H = new_BxTxKxH.shape
    if B == 1:
        zero = jnp.zeros((), jnp.int32)
        new_KxTxH = new_BxTxKxH[0].astype(c_CxSxH.dtype).transpose(1, 0, 2)
        return jax.lax.dynamic_update_slice(c_CxSxH, new_KxTxH, (zero, lengths_B[0], zero))
    c_BxKxSxH = c_CxSxH.reshape(B, K, -1, H)
    b_Bx1 = jnp.arange(B)[:, None]
    c_BxKxSxH = c_BxKxSxH.at[b_Bx1, :, slots_BxT].set(new_BxTxKxH.astype(c_CxSxH.dtype), mode="drop")
    return c_BxKxSxH.reshape(B * K, -1, H)  # indexed dims come first: the update is [B, T, K, H]


ATTENTION_KERNEL_MAX_T = 64  # decode steps and draft blocks; a prefill stays with XLA's products


def use_attention_kernel(B: int, T: int, H: int, dtype, settings: DecodeSettings = DEFAULT_SETTINGS) -> bool:
    """Whether ``attend`` runs ``mtp.kernels.decode_attention``: batch 1, a decode step or draft
    block, float32, on the CPU with the kernels built. Its per-token results do not depend on the
    block size, which is what makes speculative decoding bitwise equal to plain greedy."""
    if B != 1 or T > ATTENTION_KERNEL_MAX_T or H % 8 or jnp.dtype(dtype) != jnp.float32:
        return False
    return rows_matmul_available(settings)


def attend(q_BxTxNxH, k_CxSxH, v_CxSxH, mask_Bx1xTxS, settings: DecodeSettings = DEFAULT_SETTINGS):
    """Grouped-query attention of the new tokens over a per-layer cache ``[B*K, S, H]`` (already
    holding their own keys/values): query head n reads kv head ``n // (N / K)``
    (jax.nn.dot_product_attention's grouping), scale ``1/sqrt(H)``, float32 softmax."""
    B, T, N, H = q_BxTxNxH.shape
    K = k_CxSxH.shape[0] // B
    G = N // K
    if use_attention_kernel(B, T, H, k_CxSxH.dtype, settings):
        out_TxNxH = decode_attention(q_BxTxNxH[0], k_CxSxH, v_CxSxH, mask_Bx1xTxS[0, 0])
        return out_TxNxH.reshape(B, T, N * H).astype(q_BxTxNxH.dtype)
    q_CxQxH = q_BxTxNxH.reshape(B, T, K, G, H).transpose(0, 2, 3, 1, 4).reshape(B * K, G * T, H)  # row g*T + t
    s_CxQxS = jnp.einsum("cqh,csh->cqs", q_CxQxH, k_CxSxH).astype(jnp.float32) * (H ** -0.5)
    mask_CxQxS = jnp.repeat(jnp.tile(mask_Bx1xTxS[:, 0], (1, G, 1)), K, axis=0)
    p_CxQxS = jax.nn.softmax(jnp.where(mask_CxQxS, s_CxQxS, jnp.finfo(jnp.float32).min), axis=-1)
    o_CxQxH = jnp.einsum("cqs,csh->cqh", p_CxQxS.astype(v_CxSxH.dtype), v_CxSxH)
    return o_CxQxH.reshape(B, K, G, T, H).transpose(0, 3, 1, 2, 4).reshape(B, T, N * H)


def use_fused_layer(lw: dict, B: int, T: int, H: int, dtype, settings: DecodeSettings = DEFAULT_SETTINGS) -> bool:
    """Whether ``_block_step`` runs the layer as the two fused kernel calls of
    ``mtp/kernels/decode_layer.cc`` (``layer_qkv``, ``layer_rest``): where the attention kernel
    runs (batch 1, a decode step or draft block, float32) and all four matrices are packed
    (``mtp.decode.packed``) with the same activations. ``settings.fused_layers=False`` turns it off."""
    if not settings.fused_layers:
        return False
    mats = [lw.get(key) for key in MATRICES]
    if not all(isinstance(w, PackedMatrix) for w in mats) or len({w.q8x for w in mats}) != 1:
        return False
    return use_attention_kernel(B, T, H, dtype, settings)


def fused_tables(spec, positions_BxT, mask_Bx1xTxS):
    """What every fused layer of a forward shares (batch 1): RoPE's ``cos``/``sin`` ``[T, H / 2]``
    (the values ``rope`` uses) and the attention mask ``[T, S]`` as uint8."""
    angle_TxH2 = rope_angles(positions_BxT[0], spec.resolved_head_dim, spec.rope_theta)
    return jnp.cos(angle_TxH2), jnp.sin(angle_TxH2), mask_Bx1xTxS[0, 0].astype(jnp.uint8)


def _fused_block_step(lw: dict, spec, x_BxTxD, tables, k_CxSxH, v_CxSxH, lengths_B):
    """``_block_step`` in two kernel calls (``use_fused_layer``); XLA writes the new keys and values
    into the cache in place between them."""
    cos_TxH2, sin_TxH2, mask_TxS = tables
    eps = spec.norm_eps
    q_TxNxH, k_KxTxH, v_KxTxH = layer_qkv(x_BxTxD[0], lw["attn_norm"], lw["wqkv"], cos_TxH2, sin_TxH2,
                                          n_heads=spec.n_heads, n_kv_heads=spec.n_kv_heads, eps=eps)
    zero = jnp.zeros((), jnp.int32)
    k_CxSxH = jax.lax.dynamic_update_slice(k_CxSxH, k_KxTxH, (zero, lengths_B[0], zero))
    v_CxSxH = jax.lax.dynamic_update_slice(v_CxSxH, v_KxTxH, (zero, lengths_B[0], zero))
    x_TxD = layer_rest(x_BxTxD[0], q_TxNxH, k_CxSxH, v_CxSxH, mask_TxS, lw["wo"], lw["mlp_norm"], lw["wgu"],
                       lw["wdown"], eps=eps)
    return x_TxD[None].astype(x_BxTxD.dtype), k_CxSxH, v_CxSxH


def _block_step(lw: dict, spec, x_BxTxD, positions_BxT, mask_Bx1xTxS, k_CxSxH, v_CxSxH, lengths_B, slots_BxT,
                tables=None, settings: DecodeSettings = DEFAULT_SETTINGS):
    """One transformer layer (decode layout ``lw``) over the new tokens, writing their keys and
    values into the per-layer cache (slots ``lengths_b + 0 .. T-1``, inside the cache).
    ``tables``: ``fused_tables`` when the caller computed them once for all layers."""
    B, T, _ = x_BxTxD.shape
    N, K, H, eps = spec.n_heads, spec.n_kv_heads, spec.resolved_head_dim, spec.norm_eps
    if use_fused_layer(lw, B, T, H, k_CxSxH.dtype, settings):
        tables = fused_tables(spec, positions_BxT, mask_Bx1xTxS) if tables is None else tables
        return _fused_block_step(lw, spec, x_BxTxD, tables, k_CxSxH, v_CxSxH, lengths_B)
    qkv_BxTxC = linear(rms_norm(x_BxTxD, lw["attn_norm"], eps), lw["wqkv"], settings)
    q_BxTxNxH = rope(qkv_BxTxC[..., :N * H].reshape(B, T, N, H), positions_BxT, spec.rope_theta)
    k_BxTxKxH = rope(qkv_BxTxC[..., N * H:(N + K) * H].reshape(B, T, K, H), positions_BxT, spec.rope_theta)
    v_BxTxKxH = qkv_BxTxC[..., (N + K) * H:].reshape(B, T, K, H)
    k_CxSxH = _write_kv(k_CxSxH, k_BxTxKxH, lengths_B, slots_BxT)
    v_CxSxH = _write_kv(v_CxSxH, v_BxTxKxH, lengths_B, slots_BxT)
    out_BxTxNH = attend(q_BxTxNxH, k_CxSxH, v_CxSxH, mask_Bx1xTxS, settings)
    x_BxTxD = x_BxTxD + linear(out_BxTxNH, lw["wo"], settings)
    gu_BxTx2F = linear(rms_norm(x_BxTxD, lw["mlp_norm"], eps), lw["wgu"], settings)
    gate_BxTxF, up_BxTxF = jnp.split(gu_BxTx2F, 2, axis=-1)
    return x_BxTxD + linear(jax.nn.silu(gate_BxTxF) * up_BxTxF, lw["wdown"], settings), k_CxSxH, v_CxSxH


def forward_layered(model: MTPLM, weights: dict, cache: dict, tokens_BxT, lengths_B, depth_T,
                    block_mask_TxT, n_heads: int, settings: DecodeSettings = DEFAULT_SETTINGS):
    """``forward_cached`` on the decode layout (``mtp.decode.weights``) and a per-layer cache
    (``unstack_cache``): what the decode loop runs (``settings``: ``DecodeConfig.settings``)."""
    spec = model.spec
    S = cache["trunk_k"][0].shape[1]
    depth_T = jnp.asarray(depth_T, jnp.int32)
    positions_BxT = lengths_B[:, None] + depth_T[None, :]
    slots_BxT = lengths_B[:, None] + jnp.arange(tokens_BxT.shape[1], dtype=jnp.int32)[None, :]
    mask = cache_mask(lengths_B, block_mask_TxT, S)
    x_BxTxD = weights["embed"][tokens_BxT]
    states = not model.shared_head_input  # heads 2..n read an earlier layer or a mix of all
    B, T = tokens_BxT.shape
    layers = [*zip(weights["trunk"], cache["trunk_k"]), *zip(weights["heads"], cache["head_k"])]
    fused = any(use_fused_layer(lw, B, T, spec.resolved_head_dim, k_c.dtype, settings) for lw, k_c in layers)
    tables = fused_tables(spec, positions_BxT, mask) if fused else None  # shared by every fused layer

    h_BxTxD, trunk_k, trunk_v, outs = x_BxTxD, [], [], []
    for lw, k_c, v_c in zip(weights["trunk"], cache["trunk_k"], cache["trunk_v"]):
        h_BxTxD, k_c, v_c = _block_step(lw, spec, h_BxTxD, positions_BxT, mask, k_c, v_c, lengths_B, slots_BxT,
                                        tables, settings)
        trunk_k.append(k_c)
        trunk_v.append(v_c)
        outs.append(h_BxTxD)
    if states and n_heads > 1:  # the same head inputs as MTPLM.trunk_features
        sources, src_N = model.head_sources(x_BxTxD, jnp.stack(outs))
        head_in = [sources[src_N[i]] for i in range(n_heads)]
    else:
        head_in = [h_BxTxD] * n_heads
    head_k, head_v, hidden = list(cache["head_k"]), list(cache["head_v"]), []
    for i in range(n_heads):
        hw = weights["heads"][head_kind(spec).param_index(i)]
        if head_kind(spec).layer:
            h_i, head_k[i], head_v[i] = _block_step(hw, spec, head_in[i], positions_BxT, mask, head_k[i],
                                                    head_v[i], lengths_B, slots_BxT, tables, settings)
        else:
            h_i = simple_head(hw, head_in[i], settings)
        hidden.append(h_i)
    hidden_NxBxTxD = jnp.stack(hidden)
    new = {"trunk_k": trunk_k, "trunk_v": trunk_v, "head_k": head_k, "head_v": head_v}
    if "h1" in cache:
        new["h1"] = [write_rows(cache["h1"][0], hidden_NxBxTxD[0], lengths_B, slots_BxT)]
    return hidden_NxBxTxD, new


def forward_cached(model: MTPLM, cache: dict, tokens_BxT, lengths_B, depth_T, block_mask_TxT,
                   n_heads: int, weights: dict | None = None):
    """Hidden states of the first ``n_heads`` heads ``[n_heads, B, T, D]`` for new tokens placed at
    ``lengths_B + depth_T`` (their positions), and the cache with their keys/values written.
    ``weights``: the model's decode layout (``cached_decode_weights``); converted here if None."""
    weights = decode_weights(model) if weights is None else weights
    hidden, layered = forward_layered(model, weights, unstack_cache(cache), tokens_BxT, lengths_B, depth_T,
                                      block_mask_TxT, n_heads)
    return hidden, stack_cache(layered, cache)


def causal_drafts_layered(model: MTPLM, weights: dict, cache: dict, seq_BxS, lengths_B, n_heads: int,
                          window: int, settings: DecodeSettings = DEFAULT_SETTINGS):
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
    head_k, head_v, drafts = list(cache["head_k"]), list(cache["head_v"]), []
    for k in range(2, n_heads + 1):
        tok_BxW = seq_BxS[b_Bx1, jnp.minimum(pos_BxW + k - 1, S - 1)]
        x = causal_combine(prev_BxWxD, weights["embed"][tok_BxW], *model.combine_params(k), spec.norm_eps)
        hw = weights["heads"][head_kind(spec).param_index(k - 1)]
        prev_BxWxD, head_k[k - 1], head_v[k - 1] = _block_step(
            hw, spec, x, pos_BxW, mask, head_k[k - 1], head_v[k - 1], start_B, pos_BxW, settings=settings)
        last_BxD = jnp.take_along_axis(prev_BxWxD, last_B[:, None, None], axis=1)[:, 0]
        d_B = jnp.argmax(project(weights, last_BxD, spec.norm_eps, settings), -1).astype(jnp.int32)
        seq_BxS = seq_BxS.at[jnp.arange(B), lengths_B + k - 1].set(d_B, mode="drop")
        drafts.append(d_B)
    return jnp.stack(drafts, axis=1), {**cache, "head_k": head_k, "head_v": head_v}


def causal_drafts(model: MTPLM, cache: dict, seq_BxS, lengths_B, n_heads: int, window: int,
                  weights: dict | None = None):
    """``causal_drafts_layered`` on a stacked cache (``init_cache``)."""
    weights = decode_weights(model) if weights is None else weights
    drafts, layered = causal_drafts_layered(model, weights, unstack_cache(cache), seq_BxS, lengths_B, n_heads,
                                            window)
    return drafts, stack_cache(layered, cache)


def compact_cache(cache: dict, lengths_B, path_BxD):
    """Move the accepted tree path's entries (block indices ``path_BxD``) to consecutive slots
    ``lengths_b + 0 .. D-1`` of a per-layer cache (a no-op for chains: the path is 0, 1, 2, ...)."""
    b_Bx1 = jnp.arange(lengths_B.shape[0])[:, None]
    src_BxD = lengths_B[:, None] + path_BxD
    dst_BxD = lengths_B[:, None] + jnp.arange(path_BxD.shape[1], dtype=jnp.int32)[None, :]

    def move(c_BxSxX):
        return write_rows(c_BxSxX, c_BxSxX[b_Bx1, src_BxD], lengths_B, dst_BxD)

    def move_kv(c_CxSxH):
        c_BxKxSxH = c_CxSxH.reshape(lengths_B.shape[0], -1, *c_CxSxH.shape[1:])
        return _write_kv(c_CxSxH, c_BxKxSxH[b_Bx1, :, src_BxD], lengths_B, dst_BxD)  # [B, D, K, H]

    return {name: [(move if name == "h1" else move_kv)(c) for c in layers] for name, layers in cache.items()}
