"""Mask-token heads (``model.head_type='mask'``; Samragh et al. 2025, "Your LLM Knows the Future").

The model predicts tokens t+2..t+k+1 (k = n_future - 1) by reading k mask tokens appended after
position t through its OWN layers:

- mask j (1..k) is a learned embedding row (``mask_embed[j-1]``; token id ``V + j - 1`` in a decode
  block), placed at position ``t + j`` -- where token t+j will be -- and attends to the tokens
  ``<= t`` and to masks ``1..j`` of its group;
- every trunk layer and head 1's layer carry LoRA adapters *gated* to the mask tokens
  (``LoRA.proj``): on every other row a layer computes ``x @ W`` bit for bit, and no real token
  attends to a mask, so the model's next-token outputs are exactly the base model's;
- a light sampler turns mask j's output ``m_j`` into the draft of token t+j+1 with the token
  before it: ``m_j + silu([norm(m_j) ; norm(embed(x_{t+j}))] @ W_in) @ W_out`` (``W_out = 0`` at
  init), then the shared final norm + unembedding. In training ``x_{t+j}`` is the data token; when
  decoding it is the token just verified (mask 1) or the previous draft.

Training (``mask_head_hidden``) runs in two passes through the same cached layers decoding uses
(``Block.cached``): the tokens ``[B, T]`` first, as a prefill (the training attention, kernel
included; no gradient: nothing trainable acts on them), then
the mask tokens of ``P`` anchors per row (``loss.mask_anchors``) over the tokens' keys and values,
so the backward pass covers ``P * k`` rows, not ``T + P * k``. The loss (``mtp.losses``) adds to
each mask's cross-entropy a consistency term: the KL from head 1's distribution at t+j (what
verification checks the draft against) to mask j's.

Decoding (``mtp.decode.mask_drafts``) appends k mask tokens after every node of the draft chain,
so whichever prefix head 1 accepts, the masks after its last token draft the next block in the
same forward; the mask rows are never verified and their cache slots lie past the accepted length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtp.model.heads import causal_combine
from mtp.model.kv_cache import CacheStep, causal_block_mask, zeros_cache
from mtp.model.transformer import dense, param, positions_from_segments, scan_cached_blocks, zeros_param
from mtp.sharding import constrain

MASK_KEYS = ("mask_embed", "sampler_in", "sampler_h_norm", "sampler_e_norm", "sampler_out")


def init_mask_params(model, spec, rngs: nnx.Rngs) -> None:
    """The mask embeddings ``[k, D]`` and the sampler's parameters, on ``model``."""
    D, k, pd = spec.d_model, spec.n_future - 1, jnp.dtype(spec.param_dtype)
    model.mask_embed = param(rngs, (k, D), (None, "embed"), spec.std(D), pd)
    model.sampler_in = param(rngs, (2 * D, D), (None, "embed_out"), spec.std(2 * D), pd)
    ones = nnx.with_partitioning(nnx.initializers.ones, ("norm",))
    model.sampler_h_norm = nnx.Param(ones(None, (D,), pd))
    model.sampler_e_norm = nnx.Param(ones(None, (D,), pd))
    model.sampler_out = zeros_param((D, D), ("embed_out", "embed"), pd)


def embed_ids(model, tokens_BxT: jax.Array) -> jax.Array:
    """Embeddings of token ids, where ids ``V + j`` (j >= 0) are mask j+1's embedding."""
    V = model.spec.vocab_size
    dt = model.spec.dtype
    x = model.embed[...].astype(dt)[jnp.minimum(tokens_BxT, V - 1)]
    if not hasattr(model, "mask_embed"):
        return x
    masks = model.mask_embed[...].astype(dt)
    m = masks[jnp.clip(tokens_BxT - V, 0, masks.shape[0] - 1)]
    return jnp.where((tokens_BxT >= V)[..., None], m, x)


def sampler(model, m_xD: jax.Array, prev_xD: jax.Array) -> jax.Array:
    """The draft hidden state from a mask's output and the embedding of the token before the one it
    predicts (then ``model.project``)."""
    dt = m_xD.dtype
    x = causal_combine(m_xD, prev_xD, model.sampler_in[...], model.sampler_h_norm[...],
                       model.sampler_e_norm[...], model.spec.norm_eps)
    return m_xD + dense(jax.nn.silu(x), model.sampler_out[...].astype(dt))


def mask_anchors(T: int, P: int) -> np.ndarray:
    """``P`` anchor positions spread evenly over ``T`` (``P = 0`` or ``P >= T``: every position)."""
    if P <= 0 or P >= T:
        return np.arange(T, dtype=np.int32)
    stride = T // P
    return (np.arange(P, dtype=np.int32) * stride + stride - 1).astype(np.int32)


def _masks_mask(segment_ids_BxT, anchors_P: np.ndarray, k: int, S: int) -> jax.Array:
    """Mask (p, j)'s attention ``[B, 1, P*k, S]``: the tokens ``<= anchor_p`` of its document, and
    masks ``1..j`` of its own group (slots ``T + p*k ..``)."""
    B, T = segment_ids_BxT.shape
    P = len(anchors_P)
    anchors = jnp.asarray(anchors_P)
    seg_at_BxP = segment_ids_BxT[:, anchors]
    tok_BxPxT = (jnp.arange(T)[None, None, :] <= anchors[None, :, None]) \
        & (segment_ids_BxT[:, None, :] == seg_at_BxP[:, :, None]) & (seg_at_BxP[:, :, None] != 0)
    group = np.kron(np.eye(P, dtype=bool), causal_block_mask(k))  # [P*k, P*k]
    tok_BxQxT = jnp.repeat(tok_BxPxT, k, axis=1)
    own_BxQxM = jnp.broadcast_to(jnp.asarray(group), (B, P * k, P * k))
    return jnp.concatenate([tok_BxQxT, own_BxQxM], axis=-1)[:, None]


def mask_forward(model, tokens_BxT, segment_ids_BxT, anchors_P: np.ndarray):
    """Head 1's output at every token ``[B, T, D]`` (the base model's: gates off) and the masks'
    outputs before the sampler ``[k, B, P, D]``: mask j of anchor t at ``[j-1, :, p]``."""
    spec = model.spec
    B, T = tokens_BxT.shape
    k, P = spec.n_future - 1, len(anchors_P)
    S = T + P * k
    cache = zeros_cache(spec, B, S, 1, layer_heads=True, sequential=False)
    positions_BxT = positions_from_segments(segment_ids_BxT)
    head1 = model.head_layer(0)
    # pass 1: the tokens (gates off: the frozen base model; nothing here has a gradient), a prefill:
    # the training attention (model.attention's kernel where the length tiles it) over their documents
    zeros_B = jnp.zeros((B,), jnp.int32)
    slots_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    step = CacheStep(zeros_B, slots_BxT, None, prefill=True, segment_ids_BxT=segment_ids_BxT)
    off_BxT = jnp.zeros((B, T), bool)
    x_BxTxD = constrain(embed_ids(model, tokens_BxT), ("batch", "seq", None))
    h_BxTxD, trunk_k, trunk_v = scan_cached_blocks(model.trunk, x_BxTxD, positions_BxT, cache["trunk_k"],
                                                   cache["trunk_v"], step, gate_BxT=off_BxT)
    h1_BxTxD, head_k, head_v = head1.cached(h_BxTxD, positions_BxT, cache["head_k"][0], cache["head_v"][0], step,
                                            off_BxT)
    trunk_k, trunk_v, head_k, head_v = jax.lax.stop_gradient((trunk_k, trunk_v, head_k, head_v))
    # pass 2: P*k mask tokens over the tokens' keys and values (gates on)
    Q = P * k
    j_Q = np.tile(np.arange(1, k + 1, dtype=np.int32), P)
    anchor_Q = np.repeat(np.asarray(anchors_P, np.int32), k)
    ids_BxQ = jnp.broadcast_to(jnp.asarray(spec.vocab_size + j_Q - 1), (B, Q))
    pos_BxQ = positions_BxT[:, anchor_Q] + j_Q[None]
    step = CacheStep(jnp.full((B,), T, jnp.int32), T + jnp.broadcast_to(jnp.arange(Q, dtype=jnp.int32), (B, Q)),
                     _masks_mask(segment_ids_BxT, anchors_P, k, S))
    on_BxQ = jnp.ones((B, Q), bool)
    m_BxQxD, _, _ = scan_cached_blocks(model.trunk, embed_ids(model, ids_BxQ), pos_BxQ, trunk_k, trunk_v, step,
                                       gate_BxT=on_BxQ)
    m_BxQxD, _, _ = head1.cached(m_BxQxD, pos_BxQ, head_k, head_v, step, on_BxQ)
    return h1_BxTxD, m_BxQxD.reshape(B, P, k, -1).transpose(2, 0, 1, 3)


def mask_head_hidden(model, tokens_BxT, segment_ids_BxT=None, anchors_P: np.ndarray | None = None):
    """Every head's output at the anchors ``[n_future, B, P, D]`` (all positions by default, then
    ``P = T`` and this is ``MTPLM.all_head_hidden``'s ``[n_future, B, T, D]``), and head 1's output at
    every token ``[B, T, D]``. Head j+1 at anchor t is the sampler on mask j with the data token
    ``x_{t+j}`` (0 past the end, where its target is masked anyway)."""
    B, T = tokens_BxT.shape
    if segment_ids_BxT is None:
        segment_ids_BxT = jnp.ones_like(tokens_BxT)
    anchors_P = np.arange(T, dtype=np.int32) if anchors_P is None else np.asarray(anchors_P, np.int32)
    h1_BxTxD, m_KxBxPxD = mask_forward(model, tokens_BxT, segment_ids_BxT, anchors_P)
    k = m_KxBxPxD.shape[0]
    padded_BxT = jnp.pad(tokens_BxT, ((0, 0), (0, k)))
    prev_KxBxP = jnp.stack([padded_BxT[:, anchors_P + j] for j in range(1, k + 1)])
    heads = sampler(model, m_KxBxPxD, embed_ids(model, prev_KxBxP))
    return jnp.concatenate([h1_BxTxD[None, :, anchors_P], heads]), h1_BxTxD
