"""MTP output heads, stacked on a leading ``mtp_heads`` axis and applied with ``nnx.vmap``.

Head i (1-based) maps a hidden state at position t to a hidden state from which the shared norm +
unembedding predict token t+i (Gloeckle et al. 2024). ``'transformer'``: one transformer layer per
head (the paper's choice; LoRA adapters too when ``lora_rank > 0``, since head 1 is the pretrained
model's own last layer for imported models). ``'linear'``: ``x + x @ W`` with one D x D matrix per
head. ``'medusa'``: the Medusa ResBlock ``x + silu(x @ W + b)`` (Cai et al. 2024) with ``W = 0``,
``b = 0`` at init, so a new head starts as the identity (it predicts what head 1's input predicts
through the shared unembedding) and learns from there. ``'causal'``: sequential heads
(DeepSeek-V3's MTP modules): head 1 is a transformer layer on the trunk output; head k >= 2 reads
``[norm(h^{k-1}_t) ; norm(embed(x_{t+k-1}))] @ W_k`` (head k-1's output at t and the embedding of
the token before the one it predicts) through its own transformer layer; see ``MTPLM.causal_head_hidden``.
``'shared_causal'``: the same, with ONE layer, projection and norms shared by every depth k >= 2
(FastMTP, Megatron's repeated MTP layer): ``n_future`` is the depth trained, and decoding may draft
deeper (``HeadKind.max_heads``), each depth with its own KV cache.
``'mask'``: no head layers of its own (Samragh et al. 2025, "Your LLM Knows the Future"): n_future-1
mask tokens appended after position t run through the model's own layers, with LoRA adapters gated
to act on the mask tokens only, and a small sampler reads each mask's output with the token before
the one it predicts; head 1 (the model) is bitwise unchanged; see ``mtp.model.masked``.

Head 1 reads the trunk's final output; heads 2..n read the same, or (``model.branch_layer`` /
``model.hidden_mix``) an earlier layer's output or a learned mix of all layers (``MTPLM.trunk_features``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from mtp.config import HEAD_TYPES, LAYER_HEADS
from mtp.model.transformer import Block, dense, param, rms_norm, stacked_blocks, zeros_param


class LinearHead(nnx.Module):
    def __init__(self, spec, *, rngs: nnx.Rngs):
        self.dtype = jnp.dtype(spec.dtype)
        self.w = param(rngs, (spec.d_model, spec.d_model), ("embed", "embed_out"), spec.out_std(spec.d_model),
                       jnp.dtype(spec.param_dtype))

    def __call__(self, x_BxTxD, positions_BxT, mask_Bx1xTxT):
        del positions_BxT, mask_Bx1xTxT
        return x_BxTxD + dense(x_BxTxD, self.w[...].astype(self.dtype))


class MedusaHead(nnx.Module):
    """Medusa's ResBlock ``x + silu(x @ W + b)``; ``W``, ``b`` start at 0 (identity head)."""

    def __init__(self, spec, *, rngs: nnx.Rngs):
        del rngs
        D, pd = spec.d_model, jnp.dtype(spec.param_dtype)
        self.dtype = jnp.dtype(spec.dtype)
        self.w = zeros_param((D, D), ("embed", "embed_out"), pd)
        self.b = zeros_param((D,), ("embed_out",), pd)

    def __call__(self, x_BxTxD, positions_BxT, mask_Bx1xTxT):
        del positions_BxT, mask_Bx1xTxT
        dt = self.dtype
        return x_BxTxD + jax.nn.silu(dense(x_BxTxD, self.w[...].astype(dt)) + self.b[...].astype(dt))


def causal_combine(prev_xD, emb_xD, w_2DxD, h_norm_D, e_norm_D, eps: float) -> jax.Array:
    """A sequential head's input: ``[rms_norm(prev) ; rms_norm(emb)] @ W`` (DeepSeek-V3's MTP)."""
    x = jnp.concatenate([rms_norm(prev_xD, h_norm_D, eps), rms_norm(emb_xD, e_norm_D, eps)], axis=-1)
    return dense(x, w_2DxD.astype(prev_xD.dtype))


MAX_SHARED_DEPTH = 16  # shared_causal: the deepest draft chain decoding accepts (acceptance decays long before)


@dataclasses.dataclass(frozen=True)
class HeadKind:
    """What the rest of the code needs to know of a ``model.head_type`` (one place, instead of
    ``head_type ==`` tests spread over training, decoding, conversion and planning):

    - ``module``: the per-head module class (stacked ``n_future`` times on ``mtp_heads``);
    - ``layer``: each head is a transformer layer (a KV cache when decoding, LoRA adapters,
      attention FLOPs, a layer in converted checkpoints);
    - ``sequential``: head k reads head k-1's output and the token before the one it predicts
      (DeepSeek-V3's MTP), so it drafts one token after the other (chains only) and keeps head 1's
      outputs in the decode cache.
    """

    name: str
    module: type
    layer: bool
    sequential: bool = False
    bias: bool = False  # a simple head with a bias vector besides its D x D matrix (medusa)
    shared: bool = False  # sequential heads 2..n share ONE layer and combine (FastMTP / repeated MTP layer)
    masked: bool = False  # heads 2..n are mask tokens through the model itself (mtp.model.masked)

    def n_stacked(self, n_future: int) -> int:
        """How many head layers the model stores: ``n_future``, 2 for shared heads (head 1 and the
        one layer every depth >= 2 reuses), 1 for mask heads (head 1; the masks run through it)."""
        if self.masked:
            return 1
        return min(n_future, 2) if self.shared else n_future

    def max_heads(self, n_future: int) -> int:
        """The most heads decoding may use: ``n_future``, or ``MAX_SHARED_DEPTH`` for a shared head
        (it drafts as deep as asked: every depth reuses the one layer, with its own KV cache)."""
        return max(n_future, MAX_SHARED_DEPTH) if self.shared else n_future

    def param_index(self, k: int) -> int:
        """The stored head (0-based) that head ``k`` (0-based) runs: ``k``, or ``min(k, 1)`` if shared."""
        return min(k, 1) if self.shared else k

    @property
    def draft_trees(self) -> bool:
        """Whether the heads can draft a tree (independent heads: top-w of each at once)."""
        return not (self.sequential or self.masked)


HEAD_KINDS = {
    "transformer": HeadKind("transformer", Block, layer=True),
    "linear": HeadKind("linear", LinearHead, layer=False),
    "medusa": HeadKind("medusa", MedusaHead, layer=False, bias=True),
    "causal": HeadKind("causal", Block, layer=True, sequential=True),
    "shared_causal": HeadKind("shared_causal", Block, layer=True, sequential=True, shared=True),
    "mask": HeadKind("mask", Block, layer=True, masked=True),
}
assert tuple(HEAD_KINDS) == HEAD_TYPES and tuple(k for k, v in HEAD_KINDS.items() if v.layer) == LAYER_HEADS


def head_kind(spec_or_name) -> HeadKind:
    """The ``HeadKind`` of a spec (or a ``head_type`` string)."""
    name = spec_or_name if isinstance(spec_or_name, str) else spec_or_name.head_type
    if name not in HEAD_KINDS:
        raise ValueError(f"model.head_type={name!r} is unknown; use one of {HEAD_TYPES}.")
    return HEAD_KINDS[name]


def make_heads(spec, *, rngs: nnx.Rngs) -> nnx.Module:
    kind = head_kind(spec)
    if kind.layer:
        return stacked_blocks(spec, kind.n_stacked(spec.n_future), "mtp_heads", rngs=rngs, lora_rank=spec.lora_rank)

    @nnx.split_rngs(splits=spec.n_future)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "mtp_heads"})
    def create(rngs):
        return kind.module(spec, rngs=rngs)

    return create(rngs)


def apply_heads(heads: Block | LinearHead | MedusaHead, h_xBxTxD, positions_BxT, mask_Bx1xTxT,
                per_head: bool = False) -> jax.Array:
    """All heads at once: hidden states ``[n_future, B, T, D]``. The input is one ``[B, T, D]``
    shared by every head, or (``per_head``) one per head, ``[n_future, B, T, D]``."""

    @nnx.vmap(in_axes=(0, 0 if per_head else None), out_axes=0,
              transform_metadata={nnx.PARTITION_NAME: "mtp_heads"})
    def run(head, x_BxTxD):
        return head(x_BxTxD, positions_BxT, mask_Bx1xTxT)

    return run(heads, h_xBxTxD)
