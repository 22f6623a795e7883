"""Drafting with mask-token heads (``model.head_type='mask'``, ``mtp.model.masked``).

A speculative step with ``m`` drafts forwards ONE block: the chain ``[root, d_1 .. d_m]`` at depths
``0 .. m`` followed by ``m`` mask tokens after every chain node ``i`` (at depths ``i+1 .. i+m``,
attending to chain nodes ``0 .. i`` and to the masks before them in their group). Head 1 verifies
the chain as usual; the masks after the last accepted node then give the next ``m`` drafts
through the sampler, each reading the token before it: the token just emitted for the first, the
previous draft for the others. Mask rows are never verified, no real token attends to them, and
their cache slots lie past the new length (the chain comes first in the block), so nothing is
compacted and the emitted tokens are plain decoding's.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from mtp.model.kv_cache import causal_block_mask
from mtp.model.masked import embed_ids, sampler


@dataclasses.dataclass(frozen=True)
class MaskLayout:
    """The block of a step with ``m`` drafts: ``(m + 1) * (m + 1)`` tokens."""

    m: int
    depth: np.ndarray  # [X] position offset of each block token from the cache length
    mask: np.ndarray  # [X, X] bool: who attends to whom inside the block

    @property
    def size(self) -> int:
        return len(self.depth)


def mask_layout(m: int) -> MaskLayout:
    C, X = m + 1, (m + 1) * (m + 1)
    depth = np.concatenate([np.arange(C), (np.arange(C)[:, None] + np.arange(1, m + 1)[None]).reshape(-1)])
    mask = np.zeros((X, X), bool)
    mask[:C, :C] = causal_block_mask(C)
    for i in range(C):
        rows = C + i * m + np.arange(m)
        mask[np.ix_(rows, np.arange(i + 1))] = True  # chain nodes 0..i
        mask[np.ix_(rows, rows)] = causal_block_mask(m)  # its own group, causally
    return MaskLayout(m, depth.astype(np.int32), mask)


def mask_ids(vocab_size: int, m: int) -> np.ndarray:
    """Token ids of masks 1..m (``V + j - 1``; ``mtp.model.masked.embed_ids``)."""
    return (vocab_size + np.arange(m)).astype(np.int32)


def block_tokens(chain_BxC, vocab_size: int, m: int):
    """The step's block: the chain, then the mask ids repeated for every chain node."""
    B = chain_BxC.shape[0]
    ids = jnp.asarray(np.tile(mask_ids(vocab_size, m), m + 1))
    return jnp.concatenate([chain_BxC, jnp.broadcast_to(ids, (B, ids.shape[0]))], axis=1)


def group_rows(hidden_BxXxD, best_B, m: int):
    """The masks' outputs after chain node ``best_b``: ``[B, m, D]``."""
    idx_BxM = (m + 1) + best_B[:, None] * m + jnp.arange(m)[None]
    return jnp.take_along_axis(hidden_BxXxD, idx_BxM[..., None], axis=1)


def sampler_drafts(be, model, weights, m_BxMxD, root_B, draft=None):
    """Draft tokens ``[B, m]``: mask j's output through the sampler with the token before it (the
    root for mask 1, then each draft), argmax (over the draft vocabulary ``draft`` if given)."""
    prev_B, out = root_B, []
    for j in range(m_BxMxD.shape[1]):
        h_BxD = sampler(model, m_BxMxD[:, j], embed_ids(model, prev_B))
        if draft is None:
            prev_B = jnp.argmax(be.logits(model, weights, h_BxD), -1).astype(jnp.int32)
        else:
            ids_N, table = draft
            prev_B = ids_N[jnp.argmax(be.draft_logits(model, weights, h_BxD, table), -1)].astype(jnp.int32)
        out.append(prev_B)
    return jnp.stack(out, axis=1)


def first_drafts(be, model, weights, cache, lengths_B, root_B, m: int, draft=None):
    """Drafts after the prompt: ``m`` masks after its last token (one forward; their cache slots are
    overwritten by the first step's block). Returns ``(drafts [B, m], cache)``."""
    B = lengths_B.shape[0]
    ids_BxM = jnp.broadcast_to(jnp.asarray(mask_ids(model.spec.vocab_size, m)), (B, m))
    hidden_1xBxMxD, cache = be.forward(model, weights, cache, ids_BxM, lengths_B, np.arange(m, dtype=np.int32),
                                       causal_block_mask(m), 1)
    return sampler_drafts(be, model, weights, hidden_1xBxMxD[0], root_B, draft), cache
