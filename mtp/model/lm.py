"""MTPLM: embed -> trunk (scanned layers) -> n_future heads -> shared final norm + unembedding.

Head 1 (next token) always reads the trunk's final output. Heads 2..n read it too by default, or
(Mehra et al. 2025, for heads retrofitted onto a pretrained model whose late layers specialize in
next-token prediction):

- ``branch_layer = l`` (1..trunk_layers-1): the hidden state after trunk layer ``l``;
- ``hidden_mix = 'weighted'``: ``sum_j softmax(mix_logits[i])_j * h_j`` over the trunk states
  ``h_0`` (embedding output) .. ``h_L`` (final), a learned logit vector per head. Init: logit
  ``ln(9 L)`` on ``h_L`` and 0 elsewhere, i.e. 90% of the mass on the final state (what a head
  copied from the last layer expects) and 10% spread evenly over the rest (so every state has a
  gradient from the first step). Row 0 (head 1) exists for a simple stacked shape and is unused.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtp.model import masked
from mtp.model.heads import apply_heads, causal_combine, head_kind, make_heads
from mtp.model.spec import ModelSpec
from mtp.model.transformer import (
    RMSNorm,
    attention_mask,
    dense,
    model_attention,
    param,
    positions_from_segments,
    scan_blocks,
    slice_blocks,
    stacked_blocks,
)
from mtp.sharding import constrain


def mix_logits_init(spec: ModelSpec):
    L = spec.trunk_layers

    def init(key, shape, dtype):
        del key
        return jnp.zeros(shape, dtype).at[:, -1].set(math.log(9 * L))

    return init


class MTPLM(nnx.Module):
    """Multi-token prediction LM (Gloeckle et al. 2024). ``n_future=1`` is a plain next-token LM."""

    def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
        pd = jnp.dtype(spec.param_dtype)
        self.spec = spec
        # std 1/sqrt(D): tied logits norm(h) @ embed.T start at unit scale.
        self.embed = param(rngs, (spec.vocab_size, spec.d_model), ("vocab", "embed"),
                           spec.std(spec.d_model), pd)
        self.trunk = stacked_blocks(spec, spec.trunk_layers, "layers", rngs=rngs, lora_rank=spec.lora_rank)
        self.heads = make_heads(spec, rngs=rngs)
        self.final_norm = RMSNorm(spec.d_model, spec.norm_eps, param_dtype=pd)
        if not spec.tie_embeddings:
            self.unembed = param(rngs, (spec.d_model, spec.vocab_size), ("embed", "vocab"),
                                 spec.std(spec.d_model), pd)
        if spec.hidden_mix == "weighted":
            init = nnx.with_partitioning(mix_logits_init(spec), ("mtp_heads", None))
            self.mix_logits = nnx.Param(init(None, (spec.n_future, spec.trunk_layers + 1), jnp.float32))
        if head_kind(spec).sequential:  # heads 2..n: [norm(h); norm(embed)] @ W, W: [2D, D] (one if shared)
            K, D = head_kind(spec).n_stacked(spec.n_future) - 1, spec.d_model
            self.causal_proj = param(rngs, (K, 2 * D, D), ("mtp_heads", None, "embed_out"), spec.std(2 * D), pd)
            ones = nnx.with_partitioning(nnx.initializers.ones, ("mtp_heads", "norm"))
            self.causal_h_norm = nnx.Param(ones(None, (K, D), pd))
            self.causal_e_norm = nnx.Param(ones(None, (K, D), pd))
        if head_kind(spec).masked:  # mask embeddings + the sampler (mtp.model.masked)
            masked.init_mask_params(self, spec, rngs)

    # --- pieces, used separately by the memory-flat loss and the cached decoder --------------------
    def embed_tokens(self, tokens_BxT: jax.Array, segment_ids_BxT: jax.Array | None = None):
        """Embedding output ``x_BxTxD`` plus the positions and mask every layer reuses. With an attention
        kernel (model.attention) the "mask" is the segment ids ``[B, T]``: no ``[B, 1, T, T]`` tensor."""
        if segment_ids_BxT is None:
            segment_ids_BxT = jnp.ones_like(tokens_BxT)
        positions_BxT = positions_from_segments(segment_ids_BxT)
        kernel = model_attention(self.spec) != "xla"
        mask_Bx1xTxT = segment_ids_BxT if kernel else attention_mask(segment_ids_BxT)
        x_BxTxD = self.embed[...].astype(self.spec.dtype)[tokens_BxT]
        return constrain(x_BxTxD, ("batch", "seq", None)), positions_BxT, mask_Bx1xTxT

    def trunk_hidden(self, tokens_BxT: jax.Array, segment_ids_BxT: jax.Array | None = None):
        """Trunk output ``h_BxTxD`` (head 1's input) plus the positions and mask every head layer reuses."""
        x_BxTxD, positions_BxT, mask_Bx1xTxT = self.embed_tokens(tokens_BxT, segment_ids_BxT)
        h_BxTxD = scan_blocks(self.trunk, x_BxTxD, positions_BxT, mask_Bx1xTxT, self.spec.remat)
        return h_BxTxD, positions_BxT, mask_Bx1xTxT

    @property
    def shared_head_input(self) -> bool:
        return self.spec.branch_layer == 0 and self.spec.hidden_mix == "none"

    def head_sources(self, x_BxTxD, states_LxBxTxD):
        """Per-head inputs from the embedding output and every trunk layer's output (the last is the
        final state): ``(sources_SxBxTxD, src_N)``, head i reads ``sources[src_N[i]]``."""
        spec, final_BxTxD = self.spec, states_LxBxTxD[-1]
        if spec.hidden_mix == "weighted":
            return self.mix_sources(jnp.concatenate([x_BxTxD[None], states_LxBxTxD]))
        return (jnp.stack([final_BxTxD, states_LxBxTxD[spec.branch_layer - 1]]),
                np.minimum(np.arange(spec.n_future), 1))

    def mix_sources(self, all_SxBxTxD):
        """``hidden_mix='weighted'``: head 1 reads the final state, head i > 1 the softmax(mix_logits[i])
        weighted sum of the ``L+1`` states; ``([n_future, B, T, D], arange(n_future))``."""
        w_NxS = jax.nn.softmax(self.mix_logits[...].astype(jnp.float32), axis=-1)[1:]
        S, rest = all_SxBxTxD.shape[0], all_SxBxTxD.shape[1:]
        mixed = jnp.dot(w_NxS, all_SxBxTxD.reshape(S, -1).astype(jnp.float32))
        mixed_NxBxTxD = mixed.astype(all_SxBxTxD.dtype).reshape(-1, *rest)
        return jnp.concatenate([all_SxBxTxD[-1:], mixed_NxBxTxD]), np.arange(self.spec.n_future)

    def trunk_features(self, tokens_BxT: jax.Array, segment_ids_BxT: jax.Array | None = None):
        """What the heads read: ``(h, src_N, positions, mask)``. Default: ``h`` is the final trunk
        output ``[B, T, D]`` shared by every head and ``src_N`` is None. With ``branch_layer`` or
        ``hidden_mix``: ``h`` is ``[S, B, T, D]`` and head i reads ``h[src_N[i]]`` (``src_N`` a
        static numpy int array; head 1 always reads the final output)."""
        spec = self.spec
        if self.shared_head_input:
            h_BxTxD, positions_BxT, mask_Bx1xTxT = self.trunk_hidden(tokens_BxT, segment_ids_BxT)
            return h_BxTxD, None, positions_BxT, mask_Bx1xTxT
        x_BxTxD, positions_BxT, mask_Bx1xTxT = self.embed_tokens(tokens_BxT, segment_ids_BxT)
        if spec.hidden_mix == "weighted":
            _, states_LxBxTxD = scan_blocks(self.trunk, x_BxTxD, positions_BxT, mask_Bx1xTxT, spec.remat,
                                            return_states=True)
            sources, src_N = self.head_sources(x_BxTxD, states_LxBxTxD)
        else:  # branch: two scans, so only the branch state is kept besides the final one
            b, L = spec.branch_layer, spec.trunk_layers
            h_b = scan_blocks(slice_blocks(self.trunk, 0, b), x_BxTxD, positions_BxT, mask_Bx1xTxT, spec.remat)
            h_L = scan_blocks(slice_blocks(self.trunk, b, L), h_b, positions_BxT, mask_Bx1xTxT, spec.remat)
            sources, src_N = jnp.stack([h_L, h_b]), np.minimum(np.arange(spec.n_future), 1)
        return sources, src_N, positions_BxT, mask_Bx1xTxT

    def unembed_DxV(self) -> jax.Array:
        w = self.embed[...].T if self.spec.tie_embeddings else self.unembed[...]
        return w.astype(self.spec.dtype)

    def project(self, hidden_xD: jax.Array) -> jax.Array:
        """Shared final norm + unembedding: ``[..., D] -> [..., V]`` logits."""
        return dense(self.final_norm(hidden_xD), self.unembed_DxV())

    def head_hidden(self, h_xBxTxD, positions_BxT, mask_Bx1xTxT, src_N=None) -> jax.Array:
        """Every head's output ``[n_future, B, T, D]`` from ``trunk_features``' ``h`` and ``src_N``."""
        if src_N is None:
            return apply_heads(self.heads, h_xBxTxD, positions_BxT, mask_Bx1xTxT)
        per_head = h_xBxTxD if len(src_N) == h_xBxTxD.shape[0] and (src_N == np.arange(len(src_N))).all() \
            else h_xBxTxD[src_N]
        return apply_heads(self.heads, per_head, positions_BxT, mask_Bx1xTxT, per_head=True)

    def head_layer(self, i: int):
        """Head ``i`` (0-based) alone: the stacked heads sliced at ``i`` (a view, for running heads
        one at a time with plain 2-D matmuls). Shared heads (``shared_causal``): every ``i >= 1`` is
        the one stored MTP layer."""
        head_def, head_state = nnx.split(self.heads)
        j = head_kind(self.spec).param_index(i)
        return nnx.merge(head_def, jax.tree.map(lambda a: a[j], head_state))

    def combine_params(self, k: int):
        """Sequential head ``k``'s (1-based, ``k >= 2``) combining projection ``[2D, D]`` and its two
        norms: ``(W, h_norm, e_norm)``; the same ones for every depth when shared."""
        j = head_kind(self.spec).param_index(k - 1) - 1
        return self.causal_proj[j], self.causal_h_norm[j], self.causal_e_norm[j]

    def causal_head_hidden(self, h_BxTxD, tokens_BxT, positions_BxT, mask_Bx1xTxT) -> jax.Array:
        """``head_type='causal'`` (sequential heads, DeepSeek-V3's MTP modules): every head's output
        ``[n_future, B, T, D]``. Head 1 is a transformer layer on the trunk output; head k >= 2 at
        position t reads ``[norm(h^{k-1}_t) ; norm(embed(x_{t+k-1}))] @ W_k`` (teacher forcing: the
        true token before the one it predicts; 0 past the end, where its targets are masked anyway)
        through its own transformer layer. A ``lax.scan`` over heads 2..n carries ``h^{k-1}``.
        ``shared_causal``: the same layer, projection and norms at every depth >= 2 (FastMTP)."""
        spec, N = self.spec, self.spec.n_future
        h1_BxTxD = self.head_layer(0)(h_BxTxD, positions_BxT, mask_Bx1xTxT)
        if N == 1:
            return h1_BxTxD[None]
        head_def, head_state = nnx.split(self.heads)
        embed = self.embed[...].astype(spec.dtype)
        e_KxBxTxD = jnp.stack([embed[jnp.pad(tokens_BxT[:, k:], ((0, 0), (0, k)))] for k in range(1, N)])
        rest = jax.tree.map(lambda a: a[1:], head_state)
        combine = (self.causal_proj[...], self.causal_h_norm[...], self.causal_e_norm[...])

        def body(prev_BxTxD, xs):
            state, w, hn, en, e_BxTxD = xs
            x_BxTxD = causal_combine(prev_BxTxD, e_BxTxD, w, hn, en, spec.norm_eps)
            out = nnx.merge(head_def, state)(x_BxTxD, positions_BxT, mask_Bx1xTxT)
            return out, out

        if head_kind(spec).shared:  # one stored layer for every depth: a closure, not a scanned input
            shared = jax.tree.map(lambda a: a[0], (rest, *combine))
            _, rest_KxBxTxD = jax.lax.scan(lambda prev, e: body(prev, (*shared, e)), h1_BxTxD, e_KxBxTxD)
        else:
            _, rest_KxBxTxD = jax.lax.scan(body, h1_BxTxD, (rest, *combine, e_KxBxTxD))
        return jnp.concatenate([h1_BxTxD[None], rest_KxBxTxD])

    def all_head_hidden(self, tokens_BxT: jax.Array, segment_ids_BxT: jax.Array | None = None) -> jax.Array:
        """Every head's output ``[n_future, B, T, D]`` (before the shared norm + unembedding)."""
        if head_kind(self.spec).masked:
            return masked.mask_head_hidden(self, tokens_BxT, segment_ids_BxT)[0]
        h, src_N, positions_BxT, mask_Bx1xTxT = self.trunk_features(tokens_BxT, segment_ids_BxT)
        if head_kind(self.spec).sequential:
            return self.causal_head_hidden(h, tokens_BxT, positions_BxT, mask_Bx1xTxT)
        return self.head_hidden(h, positions_BxT, mask_Bx1xTxT, src_N)

    def __call__(self, tokens_BxT: jax.Array, segment_ids_BxT: jax.Array | None = None):
        """Logits of every head: ``[n_future, B, T, V]``; head i predicts token t+i."""
        return self.project(self.all_head_hidden(tokens_BxT, segment_ids_BxT))


def abstract_params(spec: ModelSpec, seed: int = 0) -> tuple[nnx.GraphDef, nnx.State]:
    """The model's graph definition and its parameters as ShapeDtypeStructs (nothing allocated)."""
    abstract_model = nnx.eval_shape(lambda: MTPLM(spec, rngs=nnx.Rngs(seed)))
    return nnx.split(abstract_model, nnx.Param)
