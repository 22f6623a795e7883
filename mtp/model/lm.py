"""MTPLM: embed -> trunk (scanned layers) -> n_future heads -> shared final norm + unembedding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mtp.model.heads import apply_heads, make_heads
from mtp.model.spec import ModelSpec
from mtp.model.transformer import (
    RMSNorm,
    attention_mask,
    dense,
    param,
    positions_from_segments,
    scan_blocks,
    stacked_blocks,
)
from mtp.sharding import constrain


class MTPLM(nnx.Module):
    """Multi-token prediction LM (Gloeckle et al. 2024). ``n_future=1`` is a plain next-token LM."""

    def __init__(self, spec: ModelSpec, *, rngs: nnx.Rngs):
        pd = jnp.dtype(spec.param_dtype)
        self.spec = spec
        # std 1/sqrt(D): tied logits norm(h) @ embed.T start at unit scale.
        self.embed = param(rngs, (spec.vocab_size, spec.d_model), ("vocab", "embed"),
                           spec.std(spec.d_model), pd)
        self.trunk = stacked_blocks(spec, spec.trunk_layers, "layers", rngs=rngs)
        self.heads = make_heads(spec, rngs=rngs)
        self.final_norm = RMSNorm(spec.d_model, spec.norm_eps, param_dtype=pd)
        if not spec.tie_embeddings:
            self.unembed = param(rngs, (spec.d_model, spec.vocab_size), ("embed", "vocab"),
                                 spec.std(spec.d_model), pd)

    # --- pieces, used separately by the memory-flat loss ---------------------------------------
    def trunk_hidden(self, tokens_BxT: jax.Array, segment_ids_BxT: jax.Array | None = None):
        """Trunk output ``h_BxTxD`` plus the positions and mask every head layer reuses."""
        if segment_ids_BxT is None:
            segment_ids_BxT = jnp.ones_like(tokens_BxT)
        positions_BxT = positions_from_segments(segment_ids_BxT)
        mask_Bx1xTxT = attention_mask(segment_ids_BxT)
        x_BxTxD = self.embed[...].astype(self.spec.dtype)[tokens_BxT]
        x_BxTxD = constrain(x_BxTxD, ("batch", "seq", None))
        h_BxTxD = scan_blocks(self.trunk, x_BxTxD, positions_BxT, mask_Bx1xTxT, self.spec.remat)
        return h_BxTxD, positions_BxT, mask_Bx1xTxT

    def unembed_DxV(self) -> jax.Array:
        w = self.embed[...].T if self.spec.tie_embeddings else self.unembed[...]
        return w.astype(self.spec.dtype)

    def project(self, hidden_xD: jax.Array) -> jax.Array:
        """Shared final norm + unembedding: ``[..., D] -> [..., V]`` logits."""
        return dense(self.final_norm(hidden_xD), self.unembed_DxV())

    def head_hidden(self, h_BxTxD, positions_BxT, mask_Bx1xTxT) -> jax.Array:
        return apply_heads(self.heads, h_BxTxD, positions_BxT, mask_Bx1xTxT)

    def __call__(self, tokens_BxT: jax.Array, segment_ids_BxT: jax.Array | None = None):
        """Logits of every head: ``[n_future, B, T, V]``; head i predicts token t+i."""
        h_BxTxD, positions_BxT, mask_Bx1xTxT = self.trunk_hidden(tokens_BxT, segment_ids_BxT)
        hidden_NxBxTxD = self.head_hidden(h_BxTxD, positions_BxT, mask_Bx1xTxT)
        return self.project(hidden_NxBxTxD)
