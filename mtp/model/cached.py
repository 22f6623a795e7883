"""The model's cached forward: prompt prefill, one-token steps, draft chains and trees, all through
the model's own modules (``Block.cached``, the trunk scanned, heads by ``head_kind``).

This is what decoding runs on every backend but the CPU kernels (``mtp.decode.backend``), sharded
or not: under ``mtp.sharding.activation_rules`` the parameters, activations and the KV cache
(``mtp.model.kv_cache``) follow the training rules.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtp.model.heads import causal_combine, head_kind
from mtp.model.kv_cache import CacheStep, cache_mask, cache_step, causal_block_mask, write_rows, zeros_cache
from mtp.model.masked import embed_ids
from mtp.model.transformer import dense, scan_cached_blocks
from mtp.sharding import constrain


def init_cache(spec, batch: int, max_len: int, n_heads: int) -> dict:
    """An empty KV cache (``mtp.model.kv_cache``) of ``batch`` rows and ``max_len`` slots for the trunk
    and the first ``n_heads`` heads of a model of this spec."""
    kind = head_kind(spec)
    return zeros_cache(spec, batch, max_len, n_heads, layer_heads=kind.layer, sequential=kind.sequential)


def cached_forward(model, cache: dict, tokens_BxT, lengths_B, depth_T, block_mask_TxT, n_heads: int, *,
                   prefill: bool = False):
    """Hidden states of the first ``n_heads`` heads ``[n_heads, B, T, D]`` for new tokens at tree
    depths ``depth_T`` after each row's ``lengths_b`` cached tokens, and the cache with their keys
    and values written. ``prefill``: the tokens are a prompt and the cache is empty."""
    spec, kind = model.spec, head_kind(model.spec)
    S = cache["trunk_k"].shape[3]
    positions_BxT, step = cache_step(lengths_B, depth_T, block_mask_TxT, S, prefill=prefill)
    x_BxTxD = constrain(embed_ids(model, tokens_BxT), ("batch", "seq", None))
    gate_BxT = tokens_BxT >= spec.vocab_size if kind.masked else None  # mask tokens: LoRA on (mtp.model.masked)
    states = not model.shared_head_input
    h_BxTxD, trunk_k, trunk_v, *outs = scan_cached_blocks(model.trunk, x_BxTxD, positions_BxT, cache["trunk_k"],
                                                          cache["trunk_v"], step, return_states=states,
                                                          gate_BxT=gate_BxT)
    if states and n_heads > 1:  # the head inputs of MTPLM.trunk_features
        sources, src_N = model.head_sources(x_BxTxD, outs[0])
        head_in = [sources[src_N[i]] for i in range(n_heads)]
    else:
        head_in = [h_BxTxD] * n_heads
    head_k, head_v, hidden = cache["head_k"], cache["head_v"], []
    for i in range(n_heads):
        head = model.head_layer(i)
        if kind.layer:
            h_i, k_i, v_i = head.cached(head_in[i], positions_BxT, head_k[i], head_v[i], step, gate_BxT)
            head_k, head_v = head_k.at[i].set(k_i), head_v.at[i].set(v_i)
        else:
            h_i = head(head_in[i], positions_BxT, None)
        hidden.append(h_i)
    new = {"trunk_k": trunk_k, "trunk_v": trunk_v, "head_k": head_k, "head_v": head_v}
    if "h1" in cache:  # sequential heads: head 2 reads head 1's output
        new["h1"] = write_rows(cache["h1"][0], hidden[0], lengths_B, step.slots_BxT)[None]
    return jnp.stack(hidden), new


def cached_causal_drafts(model, cache: dict, seq_BxS, lengths_B, n_heads: int, window: int):
    """Sequential (``HeadKind.sequential``) drafting: ``(drafts [B, n_heads-1], cache)``.

    ``lengths_B`` slots hold the accepted prefix in the trunk cache and head 1's outputs
    (``cache['h1']``); ``seq_BxS`` holds the tokens by position, the next (not yet cached) token at
    ``lengths_b``. Head k at position p reads head k-1's output there and token ``p + k - 1``; its
    cache entries are final only once that token is known, so every call recomputes heads 2..k over
    the last ``window`` positions (``>= 2k - 1`` covers what changed since the last call) on top of
    their cached older entries, feeding each head the drafts of the heads before it where the
    tokens are not known yet: draft k (head k at the last position) predicts token
    ``lengths_b + k - 1``.
    """
    spec = model.spec
    B, S = seq_BxS.shape
    b_Bx1 = jnp.arange(B)[:, None]
    start_B = jnp.maximum(lengths_B - window, 0)
    pos_BxW = start_B[:, None] + jnp.arange(window, dtype=jnp.int32)[None, :]
    step = CacheStep(start_B, pos_BxW, cache_mask(start_B, causal_block_mask(window), S))
    last_B = lengths_B - 1 - start_B
    prev_BxWxD = cache["h1"][0][b_Bx1, jnp.minimum(pos_BxW, S - 1)]
    embed_VxD = model.embed[...].astype(spec.dtype)
    head_k, head_v, drafts = cache["head_k"], cache["head_v"], []
    for k in range(2, n_heads + 1):
        tok_BxW = seq_BxS[b_Bx1, jnp.minimum(pos_BxW + k - 1, S - 1)]
        x_BxWxD = causal_combine(prev_BxWxD, embed_VxD[tok_BxW], *model.combine_params(k), spec.norm_eps)
        prev_BxWxD, k_i, v_i = model.head_layer(k - 1).cached(x_BxWxD, pos_BxW, head_k[k - 1], head_v[k - 1], step)
        head_k, head_v = head_k.at[k - 1].set(k_i), head_v.at[k - 1].set(v_i)
        last_BxD = jnp.take_along_axis(prev_BxWxD, last_B[:, None, None], axis=1)[:, 0]
        d_B = jnp.argmax(model.project(last_BxD), -1).astype(jnp.int32)
        seq_BxS = seq_BxS.at[jnp.arange(B), lengths_B + k - 1].set(d_B, mode="drop")
        drafts.append(d_B)
    return jnp.stack(drafts, axis=1), {**cache, "head_k": head_k, "head_v": head_v}


def draft_logits(model, hidden_xD, ids_N) -> jax.Array:
    """Logits over the token ids ``ids_N`` only (a draft vocabulary): ``[..., N]``."""
    return dense(model.final_norm(hidden_xD), model.unembed_DxV()[:, ids_N])
