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

Targets (``loss.targets``): ``'data'``, the corpus tokens; or ``'self'`` (self-distillation, for
heads on a pretrained model): head i at position t learns the model's OWN greedy token for t+i,
i.e. head 1's argmax at position t+i-1 (computed without gradients). That is what exact
self-speculative decoding checks a draft against, so a head trained on it drafts what the model
would have written instead of what the corpus says (Medusa-2's self-distillation, from teacher-forced
prefixes). ``'self_onpolicy'``: the same targets, kept only where the corpus tokens between t and
t+i are the model's own too (``on_policy_mask``): decoding verifies a draft after the model's own
tokens, so targets that follow a token the model would not have written teach the wrong thing.

Training-only savings of the ``'scan'`` loss (exact: the same gradients for everything that trains):
``active`` runs only the heads with a nonzero loss weight (a frozen head 1 with weight 0 costs
nothing), and ``train_unembed=False`` skips the gradient of the shared unembedding and final norm
(a frozen trunk's): per head that is one ``[B*T, D] x [D, V]`` product less.

``loss.draft_vocab = M`` (frozen head 1, heads 2..n only): each head's cross-entropy runs over the M
most frequent train tokens, the draft vocabulary decoding drafts among (``mtp.decode.draft_vocab``),
targets outside it masked: per head a ``[B*T, D] x [D, M]`` product instead of ``[D, V]`` (SmolLM2:
8192 of 49152 tokens), the same thing learned for every token a draft can propose.

``head_type='mask'`` (``mtp.model.masked``) has its own loss, whichever ``impl``: every head at
``loss.mask_anchors`` positions per row (head 1 included, at the same positions), plus
``loss.consistency`` times the KL from head 1's distribution at t+i-1 to head i's at t (the
distribution that verification checks head i's draft against).

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

from mtp.config import LOSS_IMPLS, LOSS_TARGETS
from mtp.model import masked
from mtp.model.heads import head_kind
from mtp.model.transformer import dense, rms_norm


def head_targets(tokens_BxT: jax.Array, segment_ids_BxT: jax.Array, n_future: int):
    """Targets ``[N, B, T]`` (token t+i for head i) and their validity mask ``[N, B, T]``."""
    targets, masks = [], []
    for i in range(1, n_future + 1):
        tgt_BxT = jnp.pad(tokens_BxT[:, i:], ((0, 0), (0, i)))
        seg_BxT = jnp.pad(segment_ids_BxT[:, i:], ((0, 0), (0, i)))  # 0 past the end
        targets.append(tgt_BxT)
        masks.append((seg_BxT == segment_ids_BxT) & (segment_ids_BxT != 0))
    return jnp.stack(targets), jnp.stack(masks)


def self_tokens(tokens_BxT: jax.Array, greedy_BxT: jax.Array) -> jax.Array:
    """The sequence whose token s is the model's greedy prediction for s (from position s-1):
    ``head_targets`` of it give head i the model's own token for t+i."""
    return jnp.concatenate([tokens_BxT[:, :1], greedy_BxT[:, :-1].astype(tokens_BxT.dtype)], axis=1)


def on_policy_mask(tokens_BxT: jax.Array, own_BxT: jax.Array, n_future: int) -> jax.Array:
    """``[N, B, T]``: head i at position t is on the decoding path when the corpus tokens t+1 ..
    t+i-1 are the model's own greedy tokens (``own_BxT``, from ``self_tokens``): only then is the
    model's token for t+i, given the corpus prefix, what speculative decoding checks head i's draft
    against (it verifies after the model's own tokens, not the corpus'). Head 1: always."""
    agree_BxT = tokens_BxT == own_BxT
    masks, run_BxT = [jnp.ones_like(agree_BxT)], jnp.ones_like(agree_BxT)
    for i in range(1, n_future):
        run_BxT = run_BxT & jnp.pad(agree_BxT[:, i:], ((0, 0), (0, i)))  # token t+i agrees too
        masks.append(run_BxT)
    return jnp.stack(masks)


def _chunk_len(chunk: int, T: int) -> int:
    """The sequence chunk actually used: ``chunk`` when it divides ``T`` (0 < chunk < T), else T."""
    return chunk if 0 < chunk < T and T % chunk == 0 else T


def _split_seq(x_BxTx, chunk: int):
    """``[B, T, ...] -> [T/chunk, B, chunk, ...]``."""
    B, T = x_BxTx.shape[:2]
    return jnp.swapaxes(x_BxTx.reshape(B, T // chunk, chunk, *x_BxTx.shape[2:]), 0, 1)


def greedy_tokens(hidden_BxTxD, norm_scale_D, eps, unembed_DxV, chunk: int) -> jax.Array:
    """Argmax of ``norm(hidden) @ unembed`` at every position, without gradients; in sequence
    chunks of ``chunk`` (as ``chunked_ce``), so at most ``[B, chunk, V]`` logits are alive."""
    hidden_BxTxD = jax.lax.stop_gradient(hidden_BxTxD)
    B, T, _ = hidden_BxTxD.shape
    chunk = _chunk_len(chunk, T)

    def one(h_BxCxD):
        return jnp.argmax(dense(rms_norm(h_BxCxD, norm_scale_D, eps), unembed_DxV).astype(jnp.float32), -1)

    if chunk == T:
        return one(hidden_BxTxD)
    return jnp.swapaxes(jax.lax.map(one, _split_seq(hidden_BxTxD, chunk)), 0, 1).reshape(B, T)


def loss_targets(kind: str, tokens_BxT, segment_ids_BxT, n_future: int, greedy_fn):
    """``head_targets`` of the corpus (``'data'``) or of the model's own greedy tokens (``'self'``;
    ``greedy_fn()`` gives head 1's argmax ``[B, T]``, only called then)."""
    if kind == "data":
        return head_targets(tokens_BxT, segment_ids_BxT, n_future)
    if kind == "self":
        return head_targets(self_tokens(tokens_BxT, greedy_fn()), segment_ids_BxT, n_future)
    if kind == "self_onpolicy":
        own_BxT = self_tokens(tokens_BxT, greedy_fn())
        targets_NxBxT, mask_NxBxT = head_targets(own_BxT, segment_ids_BxT, n_future)
        return targets_NxBxT, mask_NxBxT & on_policy_mask(tokens_BxT, own_BxT, n_future)
    raise ValueError(f"loss.targets={kind!r} is unknown; use one of {LOSS_TARGETS}.")


def to_draft_vocab(targets_NxBxT, mask_NxBxT, unembed_DxV, vocab_ids_M):
    """``loss.draft_vocab``: the targets as indices into the draft vocabulary ``vocab_ids_M``, a target
    outside it masked (no draft could propose it; head 1 verifies over the whole vocabulary), and the
    unembedding's columns of those tokens: ``(targets, mask, unembed_DxM)``."""
    V, M = unembed_DxV.shape[1], vocab_ids_M.shape[0]
    lut_V = jnp.full((V,), -1, jnp.int32).at[vocab_ids_M].set(jnp.arange(M, dtype=jnp.int32))
    sub_NxBxT = lut_V[targets_NxBxT]
    return jnp.maximum(sub_NxBxT, 0), mask_NxBxT & (sub_NxBxT >= 0), unembed_DxV[:, vocab_ids_M]


def _active_index(active, n_future: int):
    """``active`` as a static index array, or None when every head runs."""
    return None if active is None or len(active) == n_future else np.asarray(active, np.int32)


def _to_all_heads(idx, n_future: int, *sums_A):
    """Per-active-head sums back in ``n_future`` slots (skipped heads report 0)."""
    zeros = jnp.zeros((n_future,), jnp.float32)
    return tuple(zeros.at[idx].set(x) for x in sums_A)


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


def loss_vmap(model, tokens_BxT, segment_ids_BxT, weights_N, normalizer_N, targets: str = "data"):
    n_future = model.spec.n_future
    logits_NxBxTxV = model(tokens_BxT, segment_ids_BxT)
    targets_NxBxT, mask_NxBxT = loss_targets(
        targets, tokens_BxT, segment_ids_BxT, n_future,
        lambda: jnp.argmax(jax.lax.stop_gradient(logits_NxBxTxV[0]), -1))
    ce_NxBxT, correct_NxBxT = _ce_sums(logits_NxBxTxV, targets_NxBxT, mask_NxBxT)
    return _finish(ce_NxBxT.sum((1, 2)), correct_NxBxT.sum((1, 2)).astype(jnp.float32),
                   mask_NxBxT.sum((1, 2)).astype(jnp.float32), weights_N, normalizer_N)


def chunked_ce(hidden_BxTxD, norm_scale_D, eps, unembed_DxV, targets_BxT, mask_BxT, chunk: int):
    """Sums of CE and hits for one head. With ``0 < chunk < T`` the sequence is processed in
    chunks under ``jax.checkpoint``, so no more than ``[B, chunk, V]`` logits are ever alive (the
    logits are recomputed in the backward pass); otherwise the head's ``[B, T, V]`` logits are
    computed once."""
    chunk = _chunk_len(chunk, hidden_BxTxD.shape[1])

    def one_chunk(h_BxCxD, t_BxC, m_BxC):
        logits_BxCxV = dense(rms_norm(h_BxCxD, norm_scale_D, eps), unembed_DxV)
        ce, correct = _ce_sums(logits_BxCxV, t_BxC, m_BxC)
        return ce.sum(), correct.sum().astype(jnp.float32)

    if chunk == hidden_BxTxD.shape[1]:
        return one_chunk(hidden_BxTxD, targets_BxT, mask_BxT)

    def body(acc, xs):
        ce, correct = jax.checkpoint(one_chunk)(*xs)
        return (acc[0] + ce, acc[1] + correct), None

    zero = jnp.zeros((), jnp.float32)
    (sum_ce, sum_correct), _ = jax.lax.scan(
        body, (zero, zero), tuple(_split_seq(x, chunk) for x in (hidden_BxTxD, targets_BxT, mask_BxT)))
    return sum_ce, sum_correct


def _memory_flat_heads(head_def, eps: float, chunk: int, sourced: bool = False, train_unembed: bool = True):
    """``f(h, head_state, unembed, norm_scale, positions, attn_mask, targets_N, mask_N, weights_N,
    normalizer_N, src_N) -> (loss, sum_ce_N, sum_correct_N)`` whose gradient is computed head by
    head INSIDE the forward pass (Gloeckle et al.'s memory-efficient schedule): ``lax.scan`` over
    the heads runs each head's forward, loss and ``jax.vjp`` backward at once and keeps only the
    running sums of the gradients, so one head's activations and logits are alive at a time and
    nothing is recomputed. A ``custom_vjp`` hands those gradients to the trunk's backward pass.

    ``h`` is the trunk output ``[B, T, D]`` every head reads (``src_N`` unused), or, with
    ``sourced``, ``[S, B, T, D]`` per-head sources (branch layer, hidden mix): head i reads
    ``h[src_N[i]]`` and its input gradient is added into slot ``src_N[i]`` of an ``[S, B, T, D]``
    accumulator. ``train_unembed=False``: the unembedding's and final norm's gradients are not
    computed (zeros are handed back), for a frozen trunk."""

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

            if train_unembed:
                loss_i, vjp, aux_i = jax.vjp(f, pick(h, src), state_i, unembed, norm_scale, has_aux=True)
                g_h, g_state, g_unembed, g_norm = vjp(jnp.ones_like(loss_i))
            else:
                loss_i, vjp, aux_i = jax.vjp(lambda h_, s_: f(h_, s_, unembed, norm_scale),
                                             pick(h, src), state_i, has_aux=True)
                g_h, g_state = vjp(jnp.ones_like(loss_i))
            g_h = g_h.astype(jnp.float32)
            if sourced:
                acc_h = jax.lax.dynamic_update_index_in_dim(acc[0], pick(acc[0], src) + g_h, src, 0)
            else:
                acc_h = acc[0] + g_h
            acc = (acc_h,) + ((acc[1] + g_unembed.astype(jnp.float32), acc[2] + g_norm.astype(jnp.float32))
                              if train_unembed else ())
            return acc, (loss_i, aux_i, g_state)

        shared = (h, unembed, norm_scale) if train_unembed else (h,)
        zeros = tuple(jnp.zeros(x.shape, jnp.float32) for x in shared)
        acc, (loss_N, (ce_N, correct_N), g_state) = jax.lax.scan(
            body, zeros, (head_state, targets_N, mask_N, weights_N, normalizer_N, src_N))
        g_h = acc[0]
        g_unembed, g_norm = acc[1:] if train_unembed else (jnp.zeros(unembed.shape), jnp.zeros(norm_scale.shape))
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


def _loss_sequential(model, tokens_BxT, segment_ids_BxT, weights_N, normalizer_N, chunk: int,
                     targets: str = "data", active=None, vocab_ids=None):
    """``head_type='causal'``: head k reads head k-1's output, so the head forwards run in sequence
    (``MTPLM.causal_head_hidden``) under plain autodiff; the cross-entropies still go one head at a
    time (``lax.scan``, chunked), so only one head's logits are ever alive, and only for the
    ``active`` heads (a frozen head 1 with weight 0 still runs: head 2 reads its output)."""
    spec = model.spec
    hidden_NxBxTxD = model.all_head_hidden(tokens_BxT, segment_ids_BxT)
    unembed, scale = model.unembed_DxV(), model.final_norm.scale[...]
    targets_NxBxT, mask_NxBxT = loss_targets(
        targets, tokens_BxT, segment_ids_BxT, spec.n_future,
        lambda: greedy_tokens(hidden_NxBxTxD[0], scale, spec.norm_eps, unembed, chunk))
    if vocab_ids is not None:  # only heads 2..n run (head 1's weight is 0): all over the draft vocabulary
        targets_NxBxT, mask_NxBxT, unembed = to_draft_vocab(targets_NxBxT, mask_NxBxT, unembed, vocab_ids)

    def body(_, xs):
        hidden, targets, mask = xs
        return None, chunked_ce(hidden, scale, spec.norm_eps, unembed, targets, mask, chunk)

    idx = _active_index(active, spec.n_future)
    if idx is None:
        _, (sum_ce_N, sum_correct_N) = jax.lax.scan(body, None, (hidden_NxBxTxD, targets_NxBxT, mask_NxBxT))
        count_N = mask_NxBxT.sum((1, 2)).astype(jnp.float32)
    else:
        _, sums = jax.lax.scan(body, None, (hidden_NxBxTxD[idx], targets_NxBxT[idx], mask_NxBxT[idx]))
        count_A = mask_NxBxT[idx].sum((1, 2)).astype(jnp.float32)
        sum_ce_N, sum_correct_N, count_N = _to_all_heads(idx, spec.n_future, *sums, count_A)
    return _finish(sum_ce_N, sum_correct_N, count_N, jnp.asarray(weights_N, jnp.float32),
                   jnp.asarray(normalizer_N, jnp.float32))


def loss_normalizer(spec, tokens_BxT, segment_ids_BxT, mask_anchors: int = 0) -> jax.Array:
    """Valid targets per head in the whole batch ``[N]`` (the loss divides each head's sum by it);
    mask heads count their anchors only."""
    _, mask_NxBxT = head_targets(tokens_BxT, segment_ids_BxT, spec.n_future)
    if head_kind(spec).masked:
        mask_NxBxT = mask_NxBxT[:, :, masked.mask_anchors(tokens_BxT.shape[1], mask_anchors)]
    return mask_NxBxT.sum((1, 2)).astype(jnp.float32)


def _kl_sums(hidden_BxPxD, teacher_BxPxD, norm_scale_D, eps, unembed_DxV, mask_BxP):
    """Sum over valid positions of ``KL(softmax(teacher logits) || softmax(logits))`` (float32; no
    gradient into the teacher)."""
    def logp(h):
        return jax.nn.log_softmax(dense(rms_norm(h, norm_scale_D, eps), unembed_DxV).astype(jnp.float32), -1)

    logp_t = jax.lax.stop_gradient(logp(teacher_BxPxD))
    kl_BxP = jnp.sum(jnp.exp(logp_t) * (logp_t - logp(hidden_BxPxD)), axis=-1)
    return jnp.sum(kl_BxP * mask_BxP)


def _loss_masked(model, tokens_BxT, segment_ids_BxT, weights_N, normalizer_N, chunk: int, targets: str,
                 active, vocab_ids, mask_anchors: int, consistency: float):
    """``head_type='mask'``: the heads' outputs at the anchors (``masked.mask_head_hidden``), the
    targets of ``loss_targets`` there, cross-entropy plus ``consistency`` x KL to head 1 one head at
    a time (``lax.scan``), only for the ``active`` heads."""
    spec = model.spec
    N, T, eps = spec.n_future, tokens_BxT.shape[1], spec.norm_eps
    anchors_P = masked.mask_anchors(T, mask_anchors)
    hidden_NxBxPxD, h1_BxTxD = masked.mask_head_hidden(model, tokens_BxT, segment_ids_BxT, anchors_P)
    unembed, scale = model.unembed_DxV(), model.final_norm.scale[...]
    targets_NxBxT, mask_NxBxT = loss_targets(targets, tokens_BxT, segment_ids_BxT, N,
                                             lambda: greedy_tokens(h1_BxTxD, scale, eps, unembed, chunk))
    targets_NxBxP, mask_NxBxP = targets_NxBxT[:, :, anchors_P], mask_NxBxT[:, :, anchors_P]
    if vocab_ids is not None:
        targets_NxBxP, mask_NxBxP, unembed = to_draft_vocab(targets_NxBxP, mask_NxBxP, unembed, vocab_ids)
    # head i+1 (0-based i) drafts token t+i+1, which head 1 predicts at position t+i
    teacher_NxBxPxD = jnp.stack([h1_BxTxD[:, np.minimum(anchors_P + i, T - 1)] for i in range(N)])

    def body(_, xs):
        hidden, teacher, tgt, mask = xs
        ce, correct = chunked_ce(hidden, scale, eps, unembed, tgt, mask, chunk)
        kl = _kl_sums(hidden, teacher, scale, eps, unembed, mask) if consistency else jnp.zeros((), jnp.float32)
        return None, (ce, correct, kl)

    per_head = (hidden_NxBxPxD, teacher_NxBxPxD, targets_NxBxP, mask_NxBxP)
    idx = _active_index(active, N)
    if idx is not None:
        per_head = tuple(x[idx] for x in per_head)
    _, (ce_A, correct_A, kl_A) = jax.lax.scan(body, None, per_head)
    count_A = per_head[3].sum((1, 2)).astype(jnp.float32)
    if idx is None:
        sum_ce_N, sum_correct_N, kl_N, count_N = ce_A, correct_A, kl_A, count_A
    else:
        sum_ce_N, sum_correct_N, kl_N, count_N = _to_all_heads(idx, N, ce_A, correct_A, kl_A, count_A)
    weights_N, normalizer_N = jnp.asarray(weights_N, jnp.float32), jnp.asarray(normalizer_N, jnp.float32)
    loss = jnp.sum(weights_N * (sum_ce_N + consistency * kl_N) / jnp.maximum(normalizer_N, 1.0))
    return loss, {"sum_ce": sum_ce_N, "sum_correct": sum_correct_N, "count": count_N}


def loss_scan(model, tokens_BxT, segment_ids_BxT, weights_N, normalizer_N, chunk: int = 128,
              targets: str = "data", active=None, train_unembed: bool = True, vocab_ids=None):
    """``active``: static 0-based indices of the heads to run (default: all); the others report
    zero sums and count. Only for training with zero loss weights on the rest (their gradients
    are zero anyway). ``vocab_ids`` (``loss.draft_vocab``; ``active`` must exclude head 1): the
    heads' cross-entropy over these token ids only, targets outside them masked."""
    spec = model.spec
    if vocab_ids is not None and (active is None or 0 in active):
        raise ValueError("a draft-vocabulary loss (loss.draft_vocab) is for heads 2..n only: head 1's loss"
                         " weight must be 0.")
    if head_kind(spec).sequential:
        return _loss_sequential(model, tokens_BxT, segment_ids_BxT, weights_N, normalizer_N, chunk, targets,
                                active, vocab_ids)
    h, src_N, positions_BxT, mask_Bx1xTxT = model.trunk_features(tokens_BxT, segment_ids_BxT)
    unembed, scale = model.unembed_DxV(), model.final_norm.scale[...]

    def greedy():  # head 1 reads the final trunk output (slot 0 of per-head sources)
        h1 = model.head_layer(0)(h if src_N is None else h[0], positions_BxT, mask_Bx1xTxT)
        return greedy_tokens(h1, scale, spec.norm_eps, unembed, chunk)

    targets_NxBxT, mask_NxBxT = loss_targets(targets, tokens_BxT, segment_ids_BxT, spec.n_future, greedy)
    if vocab_ids is not None:  # after greedy(): head 1's own tokens come from the whole vocabulary
        targets_NxBxT, mask_NxBxT, unembed = to_draft_vocab(targets_NxBxT, mask_NxBxT, unembed, vocab_ids)
    head_def, head_state = nnx.split(model.heads)
    heads = _memory_flat_heads(head_def, spec.norm_eps, chunk, sourced=src_N is not None,
                               train_unembed=train_unembed)
    src_N = jnp.zeros(spec.n_future, jnp.int32) if src_N is None else jnp.asarray(src_N, jnp.int32)
    per_head = (targets_NxBxT, mask_NxBxT, jnp.asarray(weights_N, jnp.float32),
                jnp.asarray(normalizer_N, jnp.float32), src_N)
    idx = _active_index(active, spec.n_future)
    if idx is not None:
        head_state = jax.tree.map(lambda a: a[idx], head_state)
        per_head = tuple(x[idx] for x in per_head)
    loss, sum_ce_N, sum_correct_N = heads(h, head_state, unembed, scale, positions_BxT, mask_Bx1xTxT, *per_head)
    count_N = mask_NxBxT.sum((1, 2)).astype(jnp.float32)
    if idx is not None:  # back to n_future slots; skipped heads report nothing
        sum_ce_N, sum_correct_N, count_N = _to_all_heads(idx, spec.n_future, sum_ce_N, sum_correct_N, count_N[idx])
    return loss, {"sum_ce": sum_ce_N, "sum_correct": sum_correct_N, "count": count_N}


def compute_loss(impl: str, model, tokens_BxT, segment_ids_BxT, weights_N, normalizer_N,
                 chunk: int = 128, targets: str = "data", active=None, train_unembed: bool = True,
                 vocab_ids=None, mask_anchors: int = 0, consistency: float = 0.0):
    """The per-head loss of ``impl``; ``targets``, ``active`` and ``train_unembed`` as in the module
    docstring (the last two only change what the 'scan' loss computes, never its result);
    ``vocab_ids``: the draft-vocabulary loss of heads 2..n ('scan' only, ``loss_scan``);
    ``mask_anchors`` / ``consistency``: ``head_type='mask'``'s loss (``_loss_masked``)."""
    if head_kind(model.spec).masked:
        return _loss_masked(model, tokens_BxT, segment_ids_BxT, weights_N, normalizer_N, chunk, targets, active,
                            vocab_ids, mask_anchors, consistency)
    if impl == "vmap":
        if vocab_ids is not None:
            raise ValueError("loss.draft_vocab needs loss.impl='scan'.")
        return loss_vmap(model, tokens_BxT, segment_ids_BxT, weights_N, normalizer_N, targets)
    if impl == "scan":
        return loss_scan(model, tokens_BxT, segment_ids_BxT, weights_N, normalizer_N, chunk, targets,
                         active, train_unembed, vocab_ids)
    raise ValueError(f"loss.impl={impl!r} is unknown; use one of {LOSS_IMPLS}.")
