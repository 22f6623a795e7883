"""Per-head shifted cross-entropy for MTP, in two implementations with identical results.

Head i (1-based) at position t predicts token t+i. A target is masked when t+i falls past the
sequence end, when it belongs to another document than position t (packing's segment ids), or
when position t is padding (segment id 0).

- ``'vmap'``: every head at once; materializes ``[n_future, B, T, V]`` logits.
- ``'scan'``: memory-flat (Gloeckle et al. 2024, Sec. 2): heads one at a time inside
  ``lax.scan``, each head's forward, loss and backward done at once with ``jax.vjp`` and only the
  gradient sums kept, so one head's activations and logits are alive at a time and nothing is
  recomputed; gradients of all heads accumulate into the trunk output (a ``custom_vjp`` passes
  them on; with ``model.branch_layer`` / ``hidden_mix`` the heads read per-head inputs and their
  gradients accumulate per input; sequential ``'causal'`` heads depend on each other, so there the
  head forwards run in sequence under plain autodiff and only the losses go one head at a time).
  ``chunk`` further cuts each head's cross-entropy into
  ``[B, chunk, V]`` blocks (at the price of recomputing the logits); 0 = whole sequence.

Both return ``(loss, aux)``: ``loss = sum_i w_i * sum_ce_i / count_i`` where ``count_i`` is the
number of valid targets of head i in the WHOLE batch (``normalizer_N``; with gradient accumulation
the micro-batch losses then add up to the full-batch loss exactly), and ``aux`` holds the per-head
sums ``sum_ce_N``, ``sum_correct_N`` and ``count_N`` of this (micro-)batch.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtp.model.transformer import dense, rms_norm

LOSS_IMPLS = ("vmap", "scan")
WEIGHTINGS = ("uniform", "geometric")


def head_targets(tokens_BxT: jax.Array, segment_ids_BxT: jax.Array, n_future: int):
    """Targets ``[N, B, T]`` (token t+i for head i) and their validity mask ``[N, B, T]``."""
    targets, masks = [], []
    for i in range(1, n_future + 1):
        tgt_BxT = jnp.pad(tokens_BxT[:, i:], ((0, 0), (0, i)))
        seg_BxT = jnp.pad(segment_ids_BxT[:, i:], ((0, 0), (0, i)))  # 0 past the end
        targets.append(tgt_BxT)
        masks.append((seg_BxT == segment_ids_BxT) & (segment_ids_BxT != 0))
    return jnp.stack(targets), jnp.stack(masks)


def head_weights(loss_cfg, n_future: int) -> np.ndarray:
    """Per-head loss weights from config: explicit list, uniform, or geometric r^(i-1)."""
    explicit = tuple(loss_cfg.get("head_weights", ()) or ())
    if explicit:
        if len(explicit) != n_future:
            raise ValueError(
                f"loss.head_weights has {len(explicit)} entries but model.n_future={n_future};"
                f" give one weight per head or set loss.head_weights=() to use loss.weighting.")
        return np.asarray(explicit, np.float32)
    if loss_cfg.weighting == "uniform":
        return np.ones(n_future, np.float32)
    if loss_cfg.weighting == "geometric":
        return np.asarray([loss_cfg.geometric_r ** i for i in range(n_future)], np.float32)
    raise ValueError(f"loss.weighting={loss_cfg.weighting!r} is unknown; use one of {WEIGHTINGS}.")


def _ce_sums(logits_xV, targets_x, mask_x):
    """Masked cross-entropy and top-1 hits per position (softmax in float32)."""
    logits_xV = logits_xV.astype(jnp.float32)
    # One max-reduce serves both the stable logsumexp and top-1 (target logit == max, ties aside);
    # on CPU a separate argmax costs as much as the whole softmax.
    max_x = jax.lax.stop_gradient(jnp.max(logits_xV, axis=-1))
    lse_x = max_x + jnp.log(jnp.sum(jnp.exp(logits_xV - max_x[..., None]), axis=-1))
    # A masked sum instead of a gather: its gradient is a fused select, not a scatter.
    is_target_xV = jnp.arange(logits_xV.shape[-1], dtype=targets_x.dtype) == targets_x[..., None]
    target_logit_x = jnp.sum(jnp.where(is_target_xV, logits_xV, 0.0), axis=-1)
    ce_x = lse_x - target_logit_x
    correct_x = target_logit_x >= max_x
    return ce_x * mask_x, correct_x * mask_x


def _finish(sum_ce_N, sum_correct_N, count_N, weights_N, normalizer_N):
    loss = jnp.sum(weights_N * sum_ce_N / jnp.maximum(normalizer_N, 1.0))
    return loss, {"sum_ce": sum_ce_N, "sum_correct": sum_correct_N, "count": count_N}


def loss_vmap(model, tokens_BxT, segment_ids_BxT, weights_N, normalizer_N):
    n_future = model.spec.n_future
    targets_NxBxT, mask_NxBxT = head_targets(tokens_BxT, segment_ids_BxT, n_future)
    logits_NxBxTxV = model(tokens_BxT, segment_ids_BxT)
    ce_NxBxT, correct_NxBxT = _ce_sums(logits_NxBxTxV, targets_NxBxT, mask_NxBxT)
    return _finish(ce_NxBxT.sum((1, 2)), correct_NxBxT.sum((1, 2)).astype(jnp.float32),
                   mask_NxBxT.sum((1, 2)).astype(jnp.float32), weights_N, normalizer_N)


def chunked_ce(hidden_BxTxD, norm_scale_D, eps, unembed_DxV, targets_BxT, mask_BxT, chunk: int):
    """Sums of CE and hits for one head. With ``0 < chunk < T`` the sequence is processed in
    chunks under ``jax.checkpoint``, so no more than ``[B, chunk, V]`` logits are ever alive (the
    logits are recomputed in the backward pass); otherwise the head's ``[B, T, V]`` logits are
    computed once."""
    B, T, D = hidden_BxTxD.shape
    chunk = chunk if 0 < chunk < T and T % chunk == 0 else T
    C = T // chunk

    def one_chunk(h_BxCxD, t_BxC, m_BxC):
        logits_BxCxV = dense(rms_norm(h_BxCxD, norm_scale_D, eps), unembed_DxV)
        ce, correct = _ce_sums(logits_BxCxV, t_BxC, m_BxC)
        return ce.sum(), correct.sum().astype(jnp.float32)

    if C == 1:
        return one_chunk(hidden_BxTxD, targets_BxT, mask_BxT)

    def split(x):  # [B, T, ...] -> [C, B, chunk, ...]
        return jnp.swapaxes(x.reshape(B, C, chunk, *x.shape[2:]), 0, 1)

    def body(acc, xs):
        ce, correct = jax.checkpoint(one_chunk)(*xs)
        return (acc[0] + ce, acc[1] + correct), None

    zero = jnp.zeros((), jnp.float32)
    (sum_ce, sum_correct), _ = jax.lax.scan(
        body, (zero, zero), (split(hidden_BxTxD), split(targets_BxT), split(mask_BxT)))
    return sum_ce, sum_correct


def _memory_flat_heads(head_def, eps: float, chunk: int, sourced: bool = False):
    """``f(h, head_state, unembed, norm_scale, positions, attn_mask, targets_N, mask_N, weights_N,
    normalizer_N, src_N) -> (loss, sum_ce_N, sum_correct_N)`` whose gradient is computed head by
    head INSIDE the forward pass (Gloeckle et al.'s memory-efficient schedule): ``lax.scan`` over
    the heads runs each head's forward, loss and ``jax.vjp`` backward at once and keeps only the
    running sums of the gradients, so one head's activations and logits are alive at a time and
    nothing is recomputed. A ``custom_vjp`` hands those gradients to the trunk's backward pass.

    ``h`` is the trunk output ``[B, T, D]`` every head reads (``src_N`` unused), or, with
    ``sourced``, ``[S, B, T, D]`` per-head sources (branch layer, hidden mix): head i reads
    ``h[src_N[i]]`` and its input gradient is added into slot ``src_N[i]`` of an ``[S, B, T, D]``
    accumulator."""

    def pick(h, src):
        return jax.lax.dynamic_index_in_dim(h, src, 0, keepdims=False) if sourced else h

    def head_loss(h, state_i, unembed, norm_scale, positions, attn_mask, targets, mask, w, norm):
        hidden = nnx.merge(head_def, state_i)(h, positions, attn_mask)
        sum_ce, sum_correct = chunked_ce(hidden, norm_scale, eps, unembed, targets, mask, chunk)
        return w * sum_ce / jnp.maximum(norm, 1.0), (sum_ce, sum_correct)

    def primal(h, head_state, unembed, norm_scale, positions, attn_mask, targets_N, mask_N,
               weights_N, normalizer_N, src_N):
        def body(_, xs):
            state_i, targets, mask, w, norm, src = xs
            return None, head_loss(pick(h, src), state_i, unembed, norm_scale, positions, attn_mask,
                                   targets, mask, w, norm)

        _, (loss_N, (ce_N, correct_N)) = jax.lax.scan(
            body, None, (head_state, targets_N, mask_N, weights_N, normalizer_N, src_N))
        return loss_N.sum(), ce_N, correct_N

    def fwd(h, head_state, unembed, norm_scale, positions, attn_mask, targets_N, mask_N,
            weights_N, normalizer_N, src_N):
        def body(acc, xs):
            state_i, targets, mask, w, norm, src = xs

            def f(h_, s_, u_, n_):
                return head_loss(h_, s_, u_, n_, positions, attn_mask, targets, mask, w, norm)

            loss_i, vjp, aux_i = jax.vjp(f, pick(h, src), state_i, unembed, norm_scale, has_aux=True)
            g_h, g_state, g_unembed, g_norm = vjp(jnp.ones_like(loss_i))
            g_h = g_h.astype(jnp.float32)
            if sourced:
                acc_h = jax.lax.dynamic_update_index_in_dim(acc[0], pick(acc[0], src) + g_h, src, 0)
            else:
                acc_h = acc[0] + g_h
            acc = (acc_h, acc[1] + g_unembed.astype(jnp.float32), acc[2] + g_norm.astype(jnp.float32))
            return acc, (loss_i, aux_i, g_state)

        zeros = tuple(jnp.zeros(x.shape, jnp.float32) for x in (h, unembed, norm_scale))
        (g_h, g_unembed, g_norm), (loss_N, (ce_N, correct_N), g_state) = jax.lax.scan(
            body, zeros, (head_state, targets_N, mask_N, weights_N, normalizer_N, src_N))
        grads = (g_h.astype(h.dtype), g_state, g_unembed.astype(unembed.dtype),
                 g_norm.astype(norm_scale.dtype))
        return (loss_N.sum(), ce_N, correct_N), grads

    def bwd(grads, cotangents):
        g_loss = cotangents[0]  # the per-head sums are metrics: their cotangents are ignored
        g_h, g_state, g_unembed, g_norm = jax.tree.map(lambda g: g * g_loss.astype(g.dtype), grads)
        return (g_h, g_state, g_unembed, g_norm) + (None,) * 7

    f = jax.custom_vjp(primal)
    f.defvjp(fwd, bwd)
    return f


def _loss_sequential(model, tokens_BxT, segment_ids_BxT, weights_N, normalizer_N, chunk: int):
    """``head_type='causal'``: head k reads head k-1's output, so the head forwards run in sequence
    (``MTPLM.causal_head_hidden``) under plain autodiff; the cross-entropies still go one head at a
    time (``lax.scan``, chunked), so only one head's logits are ever alive."""
    spec = model.spec
    targets_NxBxT, mask_NxBxT = head_targets(tokens_BxT, segment_ids_BxT, spec.n_future)
    hidden_NxBxTxD = model.all_head_hidden(tokens_BxT, segment_ids_BxT)
    unembed, scale = model.unembed_DxV(), model.final_norm.scale[...]

    def body(_, xs):
        hidden, targets, mask = xs
        return None, chunked_ce(hidden, scale, spec.norm_eps, unembed, targets, mask, chunk)

    _, (sum_ce_N, sum_correct_N) = jax.lax.scan(body, None, (hidden_NxBxTxD, targets_NxBxT, mask_NxBxT))
    count_N = mask_NxBxT.sum((1, 2)).astype(jnp.float32)
    return _finish(sum_ce_N, sum_correct_N, count_N, jnp.asarray(weights_N, jnp.float32),
                   jnp.asarray(normalizer_N, jnp.float32))


def loss_scan(model, tokens_BxT, segment_ids_BxT, weights_N, normalizer_N, chunk: int = 128):
    spec = model.spec
    if spec.head_type == "causal":
        return _loss_sequential(model, tokens_BxT, segment_ids_BxT, weights_N, normalizer_N, chunk)
    targets_NxBxT, mask_NxBxT = head_targets(tokens_BxT, segment_ids_BxT, spec.n_future)
    h, src_N, positions_BxT, mask_Bx1xTxT = model.trunk_features(tokens_BxT, segment_ids_BxT)
    head_def, head_state = nnx.split(model.heads)
    heads = _memory_flat_heads(head_def, spec.norm_eps, chunk, sourced=src_N is not None)
    src_N = jnp.zeros(spec.n_future, jnp.int32) if src_N is None else jnp.asarray(src_N, jnp.int32)
    loss, sum_ce_N, sum_correct_N = heads(
        h, head_state, model.unembed_DxV(), model.final_norm.scale[...], positions_BxT,
        mask_Bx1xTxT, targets_NxBxT, mask_NxBxT, jnp.asarray(weights_N, jnp.float32),
        jnp.asarray(normalizer_N, jnp.float32), src_N)
    count_N = mask_NxBxT.sum((1, 2)).astype(jnp.float32)
    return loss, {"sum_ce": sum_ce_N, "sum_correct": sum_correct_N, "count": count_N}


def compute_loss(impl: str, model, tokens_BxT, segment_ids_BxT, weights_N, normalizer_N,
                 chunk: int = 128):
    if impl == "vmap":
        return loss_vmap(model, tokens_BxT, segment_ids_BxT, weights_N, normalizer_N)
    if impl == "scan":
        return loss_scan(model, tokens_BxT, segment_ids_BxT, weights_N, normalizer_N, chunk)
    raise ValueError(f"loss.impl={impl!r} is unknown; use one of {LOSS_IMPLS}.")
