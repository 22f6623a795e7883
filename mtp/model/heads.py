"""MTP output heads, stacked on a leading ``mtp_heads`` axis and applied with ``nnx.vmap``.

Head i (1-based) maps the trunk's hidden state at position t to a hidden state from which the
shared norm + unembedding predict token t+i (Gloeckle et al. 2024). ``'transformer'``: one
transformer layer per head (the paper's choice). ``'linear'``: one D x D matrix per head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mtp.model.transformer import Block, dense, param, stacked_blocks


class LinearHead(nnx.Module):
    def __init__(self, spec, *, rngs: nnx.Rngs):
        self.dtype = jnp.dtype(spec.dtype)
        self.w = param(rngs, (spec.d_model, spec.d_model), ("embed", "embed_out"), spec.out_std(spec.d_model),
                       jnp.dtype(spec.param_dtype))

    def __call__(self, x_BxTxD, positions_BxT, mask_Bx1xTxT):
        del positions_BxT, mask_Bx1xTxT
        return x_BxTxD + dense(x_BxTxD, self.w[...].astype(self.dtype))


HEAD_TYPES = ("transformer", "linear")


def make_heads(spec, *, rngs: nnx.Rngs) -> nnx.Module:
    if spec.head_type == "transformer":
        return stacked_blocks(spec, spec.n_future, "mtp_heads", rngs=rngs)
    if spec.head_type == "linear":

        @nnx.split_rngs(splits=spec.n_future)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "mtp_heads"})
        def create(rngs):
            return LinearHead(spec, rngs=rngs)

        return create(rngs)
    raise ValueError(f"model.head_type={spec.head_type!r} is unknown; use one of {HEAD_TYPES}.")


def apply_heads(heads: Block | LinearHead, h_BxTxD, positions_BxT, mask_Bx1xTxT) -> jax.Array:
    """All heads at once: hidden states ``[n_future, B, T, D]``."""

    @nnx.vmap(in_axes=(0, None), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "mtp_heads"})
    def run(head, x_BxTxD):
        return head(x_BxTxD, positions_BxT, mask_Bx1xTxT)

    return run(heads, h_BxTxD)
