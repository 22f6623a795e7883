"""Generation, all on device: prefill + one ``jax.lax.while_loop`` inside one jitted function.

Every step runs ONE cached forward over a block of tokens ``[root, drafts...]``:

- plain decoding (``greedy`` / ``sample``): the block is the last token alone (k = 1 head used);
- self-speculative (``speculative`` greedy, ``speculative_sample``): the block is the last token
  plus the drafts heads 2..k made at the previous step (a chain, or a tree of top-w candidates).
  Head 1 verifies: greedy keeps the longest path whose every token equals head 1's argmax after
  its parent (so the output is plain greedy's, token for token); sampling accepts draft d with
  probability p(d) and on rejection samples from p with d removed and renormalized -- the
  rejection rule for deterministic drafts (Leviathan et al. 2023), so every emitted token is
  distributed exactly as in plain sampling. Then head 1's own token at the last accepted node is
  emitted too, heads 2..k at that node draft the next block, and the cache length moves to the
  accepted prefix (a rollback of the rejected drafts).

Prompts of different lengths are right-padded internally (``padding='left'`` inputs are
re-aligned); each row has its own cache length, output count and stop flag (EOS or
``max_new_tokens``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtp.config import DECODE_MODES, DEFAULT_DECODE_SETTINGS, DEFAULT_RULES, DecodeSettings, rules_from_config
from mtp.decode import mask_drafts
from mtp.decode.backend import make_backend
from mtp.decode.tree import DraftTree, build_tree, build_tree_nodes, is_node_list
from mtp.model.heads import head_kind
from mtp.sharding import activation_rules, param_shardings, rows_sharding

PAD_TO = 64  # prompts are padded to a multiple of this: one compilation per length bucket


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    mode: str = "greedy"
    heads: int = 1  # heads used: 1 for plain modes; k <= n_future for speculative modes
    tree: tuple | None = None  # widths per draft depth, or a sparse tree's rank tuples; None = chain
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    eos_id: int = -1  # -1: never stop early
    stream: bool = False  # call the ``generate(on_tokens=...)`` callback as row 0's tokens appear
    # heads 2..k draft among these token ids only (sorted; None = the whole vocabulary): their
    # unembedding shrinks by V / len(draft_ids); head 1 still checks every draft over the whole
    # vocabulary, so the output is unchanged (see mtp.decode.draft_vocab)
    draft_ids: tuple[int, ...] | None = None
    # how the decode program computes on this machine (backend, layout, packing, kernel threads;
    # mtp.config.DecodeSettings): part of this static config, so a changed setting recompiles
    settings: DecodeSettings = DEFAULT_DECODE_SETTINGS

    @property
    def speculative(self) -> bool:
        return self.mode.startswith("speculative")

    @property
    def greedy(self) -> bool:
        return self.mode in ("greedy", "speculative")

    def draft_tree(self) -> DraftTree:
        if not self.speculative:
            return build_tree(())
        if self.tree is not None and is_node_list(self.tree):
            return build_tree_nodes(self.tree)
        return build_tree(self.tree if self.tree is not None else (1,) * (self.heads - 1))


def check_decode_config(dc: DecodeConfig, spec) -> None:
    if dc.mode not in DECODE_MODES:
        raise ValueError(f"mode={dc.mode!r} is unknown; use one of {DECODE_MODES}.")
    if dc.speculative:
        if not 2 <= dc.heads <= spec.max_decode_heads:
            shared = " and a shared head drafts as deep as that" if spec.max_decode_heads > spec.n_future else ""
            raise ValueError(f"Speculative decoding uses heads 2..k to draft: --heads must be in"
                             f" 2..{spec.max_decode_heads} (this model has n_future={spec.n_future}{shared}).")
        sparse = dc.tree is not None and is_node_list(dc.tree)
        if dc.tree is not None and not sparse and len(dc.tree) != dc.heads - 1:
            raise ValueError(f"tree {dc.tree} has {len(dc.tree)} depths; with --heads {dc.heads} it"
                             f" needs {dc.heads - 1}.")
        tree = dc.draft_tree()
        if sparse and tree.max_depth > dc.heads - 1:
            raise ValueError(f"the sparse tree is {tree.max_depth} deep; with --heads {dc.heads} it may be"
                             f" at most {dc.heads - 1} deep.")
        if head_kind(spec).masked and dc.heads > 8:
            raise ValueError(f"--heads {dc.heads}: a mask-head block holds heads^2 tokens; use at most 8 heads.")
        if not head_kind(spec).draft_trees and dc.tree is not None and not tree.is_chain:
            raise ValueError(f"tree {dc.tree}: {spec.head_type} heads draft one token each, every"
                             " draft from the one before it; use a chain (no --tree).")
        if dc.tree is not None and not tree.is_chain and not dc.greedy:
            raise ValueError("Tree drafts are verified greedily; use --mode speculative (greedy) with"
                             " --tree, or a chain for speculative sampling.")
    if dc.draft_ids is not None:
        ids = np.asarray(dc.draft_ids)
        widest = max(dc.draft_tree().widths, default=1)
        if ids.ndim != 1 or len(ids) < widest or ids.min() < 0 or ids.max() >= spec.vocab_size \
                or (np.diff(ids) <= 0).any():
            raise ValueError(f"draft_ids: {len(ids)} ids; they must be sorted, distinct token ids in"
                             f" [0, {spec.vocab_size}) and at least {widest} (the widest draft depth).")
    if not dc.greedy and dc.temperature <= 0:
        raise ValueError(f"temperature={dc.temperature} must be > 0 for sampling (greedy is"
                         " --mode greedy).")
    if not 0 < dc.top_p <= 1:
        raise ValueError(f"top_p={dc.top_p} must be in (0, 1].")
    if dc.max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={dc.max_new_tokens} must be >= 1.")


def filtered_probs(logits_xV, dc: DecodeConfig):
    """Temperature, top-k and top-p (nucleus) applied: the distribution plain sampling draws from."""
    logits = logits_xV.astype(jnp.float32) / dc.temperature
    if dc.top_k > 0:
        kth = jax.lax.top_k(logits, dc.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    probs = jax.nn.softmax(logits, axis=-1)
    if dc.top_p < 1.0:
        sorted_p = jnp.sort(probs, axis=-1)[..., ::-1]
        before = jnp.cumsum(sorted_p, axis=-1) - sorted_p  # mass strictly above each sorted entry
        cutoff = jnp.min(jnp.where(before < dc.top_p, sorted_p, jnp.inf), axis=-1, keepdims=True)
        probs = jnp.where(probs >= cutoff, probs, 0.0)
        probs = probs / probs.sum(-1, keepdims=True)
    return probs


def _sample(key, probs_xV):
    return jax.random.categorical(key, jnp.log(probs_xV), axis=-1).astype(jnp.int32)


def right_align(tokens_BxP, lengths_B, padding: str):
    """Right-padded tokens from left- or right-padded input."""
    if padding == "right":
        return tokens_BxP
    if padding != "left":
        raise ValueError(f"padding={padding!r}: use 'left' or 'right'.")
    P = tokens_BxP.shape[1]
    idx_BxP = (jnp.arange(P)[None, :] + (P - lengths_B)[:, None]) % P
    return jnp.take_along_axis(tokens_BxP, idx_BxP, axis=1)


def _drafts(be, model, weights, hidden_HxBxD, tree: DraftTree, draft=None):
    """Candidate tokens ``[B, sum(widths)]``: head d+1's top-w_d at the chosen node, per depth;
    ``draft``: ``be.draft_table`` of a draft vocabulary ``(ids_N, table)`` to draft among it only."""
    if tree.max_depth == 0:
        return jnp.zeros((hidden_HxBxD.shape[1], 0), jnp.int32)
    if draft is None:
        logits_HxBxV = be.logits(model, weights, hidden_HxBxD)
        cands = [jax.lax.top_k(logits_HxBxV[d], w)[1] for d, w in enumerate(tree.widths)]
    else:
        ids_N, table = draft
        logits_HxBxN = be.draft_logits(model, weights, hidden_HxBxD, table)
        cands = [ids_N[jax.lax.top_k(logits_HxBxN[d], w)[1]] for d, w in enumerate(tree.widths)]
    return jnp.concatenate(cands, axis=-1).astype(jnp.int32)


def _block_tokens(root_B, cands_BxC, tree: DraftTree):
    offsets = np.concatenate([[0], np.cumsum(tree.widths)])[:-1] if tree.max_depth else np.zeros(0)
    idx = [int(offsets[d - 1] + r) for d, r in zip(tree.depth[1:], tree.rank[1:])]
    if not idx:
        return root_B[:, None]
    return jnp.concatenate([root_B[:, None], cands_BxC[:, np.asarray(idx)]], axis=1)


def _verify_greedy(logits1_BxTxV, block_BxT, tree: DraftTree):
    """Deepest node whose path agrees with head 1's argmax, and the tokens it emits."""
    g_BxT = jnp.argmax(logits1_BxTxV, axis=-1).astype(jnp.int32)
    parent = np.maximum(tree.parent, 0)
    match_BxT = (block_BxT == g_BxT[:, parent]).at[:, 0].set(True)
    anc_TxT = jnp.asarray(tree.mask)
    accepted_BxT = jnp.all(jnp.where(anc_TxT[None], match_BxT[:, None, :], True), axis=-1)
    score_BxT = jnp.where(accepted_BxT, jnp.asarray(tree.depth)[None], -1)
    best_B = jnp.argmax(score_BxT, axis=-1).astype(jnp.int32)
    n_acc_B = jnp.asarray(tree.depth)[best_B]
    path_BxD = jnp.asarray(tree.path)[best_B]  # [B, max_depth + 1]
    emitted_BxD = jnp.take_along_axis(block_BxT, path_BxD[:, 1:], axis=1)
    emitted_BxD = jnp.concatenate([emitted_BxD, jnp.zeros_like(best_B)[:, None]], axis=1)
    d_1xD = jnp.arange(tree.max_depth + 1)[None]
    last_B = jnp.take_along_axis(g_BxT, best_B[:, None], axis=1)[:, 0]
    emitted_BxD = jnp.where(d_1xD == n_acc_B[:, None], last_B[:, None], emitted_BxD)
    return best_B, n_acc_B, path_BxD, emitted_BxD


def _verify_sample(key, logits1_BxTxV, block_BxT, dc: DecodeConfig):
    """Chain verification with the rejection rule for deterministic drafts (exact sampling)."""
    B, T = block_BxT.shape
    probs_BxTxV = filtered_probs(logits1_BxTxV, dc)
    k_accept, k_final = jax.random.split(key)
    drafts_BxM = block_BxT[:, 1:]  # M = T - 1
    p_draft_BxM = jnp.take_along_axis(probs_BxTxV[:, :-1], drafts_BxM[..., None], axis=-1)[..., 0]
    u_BxM = jax.random.uniform(k_accept, p_draft_BxM.shape)
    ok_BxM = u_BxM < p_draft_BxM
    n_acc_B = jnp.sum(jnp.cumprod(ok_BxM.astype(jnp.int32), axis=1), axis=1).astype(jnp.int32)
    p_B1V = jnp.take_along_axis(probs_BxTxV, n_acc_B[:, None, None], axis=1)  # [B, 1, V]
    p_BxV = p_B1V[:, 0]
    rejected_B = n_acc_B < T - 1
    bad_B = jnp.take_along_axis(block_BxT, jnp.minimum(n_acc_B + 1, T - 1)[:, None], axis=1)[:, 0]
    residual_BxV = jnp.where(jnp.arange(p_BxV.shape[-1])[None] == bad_B[:, None], 0.0, p_BxV)
    total_B = residual_BxV.sum(-1, keepdims=True)
    residual_BxV = jnp.where(total_B > 0, residual_BxV / jnp.maximum(total_B, 1e-30), p_BxV)
    final_B = _sample(k_final, jnp.where(rejected_B[:, None], residual_BxV, p_BxV))
    emitted_BxD = jnp.concatenate([drafts_BxM, jnp.zeros((B, 1), jnp.int32)], axis=1)
    d_1xD = jnp.arange(T)[None]
    emitted_BxD = jnp.where(d_1xD == n_acc_B[:, None], final_B[:, None], emitted_BxD)
    path_BxD = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32)[None], (B, T))
    return n_acc_B, n_acc_B, path_BxD, emitted_BxD


BLOCK_ROOM = 64


def block_room(T: int) -> int:
    """Cache slots kept past ``prompt + max_new_tokens`` for a block of ``T`` tokens: ``T`` rounded
    up to a multiple of ``BLOCK_ROOM``. The cache length must not depend on the decoding mode:
    XLA:CPU's attention products and softmax sums over the cache come out a few ulps apart for
    another length, and int8 activations (``mtp.decode.packed``) turn such ulps into different
    tokens; with one length plain greedy and speculative decoding (blocks of up to 64 tokens)
    compute every token's logits bit for bit alike."""
    return -(-T // BLOCK_ROOM) * BLOCK_ROOM


_STREAM_SINK = []  # the on_tokens callback of the generate() call in progress (host side)


def _stream_emit(tokens_D, n_new):
    if _STREAM_SINK:
        _STREAM_SINK[-1](np.asarray(tokens_D)[:int(n_new)])


def verify_step(be, model, weights, cache, block_BxT, lengths_B, key, tree: DraftTree, dc: DecodeConfig,
                fwd_heads: int, layout: mask_drafts.MaskLayout | None = None):
    """One speculative step's forward and verification: the block ``[root, drafts...]`` through the
    model with the cache (head 1 checks every draft), the accepted path, and the cache compacted to
    it. ``layout``: mask heads' block (the chain, then mask tokens that are not verified).
    Returns ``(hidden_HxBxTxD, cache, best_B, n_acc_B, emitted_BxD)``."""
    depth, mask = (tree.depth, tree.mask) if layout is None else (layout.depth, layout.mask)
    hidden_HxBxTxD, cache = be.forward(model, weights, cache, block_BxT, lengths_B, depth, mask, fwd_heads)
    block_BxT = block_BxT[:, :tree.size]
    logits1_BxTxV = be.logits(model, weights, hidden_HxBxTxD[0, :, :tree.size])
    if dc.greedy:
        best_B, n_acc_B, path_BxD, emitted_BxD = _verify_greedy(logits1_BxTxV, block_BxT, tree)
    else:
        best_B, n_acc_B, path_BxD, emitted_BxD = _verify_sample(key, logits1_BxTxV, block_BxT, dc)
    if not tree.is_chain:
        cache = be.compact(cache, lengths_B, path_BxD)
    return hidden_HxBxTxD, cache, best_B, n_acc_B, emitted_BxD


def cache_len(P: int, dc: DecodeConfig, masked: bool = False) -> int:
    """Cache slots of a decode: prompt + new tokens + the room of the widest block (``block_room``;
    ``masked``: a mask-head block, the chain's size squared)."""
    size = dc.draft_tree().size
    return P + dc.max_new_tokens + 1 + block_room(size * size if masked and dc.speculative else size)


@functools.partial(jax.jit, static_argnames=("graphdef", "dc", "be", "mesh", "rules"))
def _generate(graphdef, params, weights, tokens_BxP, lengths_B, key, *, dc: DecodeConfig, be, mesh=None, rules=()):
    with activation_rules(mesh, rules) if mesh is not None else contextlib.nullcontext():
        return _generate_traced(graphdef, params, weights, tokens_BxP, lengths_B, key, dc, be)


def _generate_traced(graphdef, params, weights, tokens_BxP, lengths_B, key, dc: DecodeConfig, be):
    model = nnx.merge(graphdef, params)
    tree = dc.draft_tree()
    B, P = tokens_BxP.shape
    D = tree.max_depth + 1
    k_heads = tree.n_heads if dc.speculative else 1
    masked = head_kind(model.spec).masked
    S = cache_len(P, dc, masked)  # the same S for every block size up to 64
    M = dc.max_new_tokens + D
    cache = be.init_cache(model.spec, B, S, k_heads)
    # Sequential heads draft in their own pass (causal_drafts): the verify forward runs head 1 only.
    sequential = head_kind(model.spec).sequential and k_heads > 1
    layout = mask_drafts.mask_layout(k_heads - 1) if masked and k_heads > 1 else None  # mask heads
    fwd_heads = 1 if sequential or layout else k_heads
    window = 2 * k_heads - 1  # >= accepted + 1 new positions + the k-1 still waiting for their token
    b_B = jnp.arange(B)
    draft = be.draft_table(model, weights, dc.draft_ids) if dc.draft_ids and dc.speculative else None

    # Prefill: the prompt as one causal block at lengths 0.
    zeros_B = jnp.zeros((B,), jnp.int32)
    causal = np.tril(np.ones((P, P), bool))
    hidden_HxBxPxD, cache = be.forward(model, weights, cache, tokens_BxP, zeros_B, np.arange(P), causal, fwd_heads,
                                       prefill=True)
    last_HxBxD = jnp.take_along_axis(hidden_HxBxPxD, (lengths_B - 1)[None, :, None, None], axis=2)[:, :, 0]
    logits1_BxV = be.logits(model, weights, last_HxBxD[0])
    key, k0 = jax.random.split(key)
    root_B = (jnp.argmax(logits1_BxV, -1).astype(jnp.int32) if dc.greedy
              else _sample(k0, filtered_probs(logits1_BxV, dc)))
    seq_BxS = None  # sequential heads only: tokens by position (prompt, emitted, drafts)
    if sequential:  # heads 2..k over the whole prompt, then the drafts at its last position
        seq_BxS = jnp.zeros((B, S), jnp.int32).at[:, :P].set(tokens_BxP).at[b_B, lengths_B].set(root_B)
        cands_BxC, cache = be.causal_drafts(model, weights, cache, seq_BxS, lengths_B, k_heads, P)
    elif layout:  # masks after the prompt's last token: one more forward
        cands_BxC, cache = mask_drafts.first_drafts(be, model, weights, cache, lengths_B, root_B, layout.m, draft)
    else:
        cands_BxC = _drafts(be, model, weights, last_HxBxD[1:], tree, draft)

    if dc.stream:
        jax.debug.callback(_stream_emit, root_B[:1], 1, ordered=True)
    out_BxM = jnp.full((B, M), -1, jnp.int32).at[:, 0].set(root_B)
    n_out_B = jnp.ones((B,), jnp.int32)
    done_B = (root_B == dc.eos_id) | (n_out_B >= dc.max_new_tokens)
    stats = {"forwards": jnp.full((), 2 if layout else 1, jnp.int32), "steps_B": jnp.zeros((B,), jnp.int32),
             "accepted_BxD": jnp.zeros((B, D), jnp.int32)}

    def cond(carry):
        return jnp.any(~carry["done_B"])

    def body(c):
        # the loop body is its own trace, and nnx modules (and their Variables) live in one: rebuild
        model = nnx.merge(graphdef, jax.tree.map(lambda a: a, params))
        block_BxT = _block_tokens(c["root_B"], c["cands_BxC"], tree)
        if layout:
            block_BxT = mask_drafts.block_tokens(block_BxT, model.spec.vocab_size, layout.m)
        key, k_step = jax.random.split(c["key"])
        hidden_HxBxTxD, cache, best_B, n_acc_B, emitted_BxD = verify_step(
            be, model, weights, c["cache"], block_BxT, c["lengths_B"], k_step, tree, dc, fwd_heads, layout)
        root_B = jnp.take_along_axis(emitted_BxD, n_acc_B[:, None], axis=1)[:, 0]
        live_B = ~c["done_B"]
        d_1xD = jnp.arange(D)[None]
        lengths_B = jnp.where(live_B, c["lengths_B"] + n_acc_B + 1, c["lengths_B"])
        seq_BxS = c["seq_BxS"]
        # Drafts for the next block: heads 2..k at the last accepted node.
        if sequential:  # the emitted tokens join the sequence at positions old length + 1 + d
            in_BxD = (d_1xD <= n_acc_B[:, None]) & live_B[:, None]
            seq_pos_BxD = jnp.where(in_BxD, c["lengths_B"][:, None] + 1 + d_1xD, S)
            seq_BxS = seq_BxS.at[b_B[:, None], seq_pos_BxD].set(emitted_BxD, mode="drop")
            cands_BxC, cache = be.causal_drafts(model, weights, cache, seq_BxS, lengths_B, k_heads, window)
        elif layout:  # the masks after the last accepted node, with the token just emitted
            group_BxMxD = mask_drafts.group_rows(hidden_HxBxTxD[0], best_B, layout.m)
            cands_BxC = mask_drafts.sampler_drafts(be, model, weights, group_BxMxD, root_B, draft)
        else:
            node_HxBxD = jnp.take_along_axis(hidden_HxBxTxD[1:], best_B[None, :, None, None], axis=2)[:, :, 0]
            cands_BxC = _drafts(be, model, weights, node_HxBxD, tree, draft)
        # Outputs: tokens 0..n_acc of ``emitted``, cut at the first EOS, only for live rows.
        valid_BxD = (d_1xD <= n_acc_B[:, None]) & live_B[:, None]
        is_eos_BxD = valid_BxD & (emitted_BxD == dc.eos_id)
        has_eos_B = jnp.any(is_eos_BxD, axis=1)
        n_new_B = jnp.where(has_eos_B, jnp.argmax(is_eos_BxD, axis=1) + 1, n_acc_B + 1)
        n_new_B = jnp.where(live_B, jnp.minimum(n_new_B, dc.max_new_tokens - c["n_out_B"]), 0)  # never past the budget
        pos_BxD = jnp.where(d_1xD < n_new_B[:, None], c["n_out_B"][:, None] + d_1xD, M)
        out_BxM = c["out_BxM"].at[jnp.arange(B)[:, None], pos_BxD].set(emitted_BxD, mode="drop")
        n_out_B = c["n_out_B"] + n_new_B
        if dc.stream:
            jax.debug.callback(_stream_emit, emitted_BxD[0], n_new_B[0], ordered=True)
        done_B = c["done_B"] | has_eos_B | (n_out_B >= dc.max_new_tokens)
        st = c["stats"]
        stats = {"forwards": st["forwards"] + 1, "steps_B": st["steps_B"] + live_B,
                 "accepted_BxD": st["accepted_BxD"] + ((d_1xD <= n_acc_B[:, None]) & live_B[:, None])}
        return {"cache": cache, "lengths_B": lengths_B, "root_B": root_B, "cands_BxC": cands_BxC,
                "out_BxM": out_BxM, "n_out_B": n_out_B, "done_B": done_B, "key": key, "stats": stats,
                "seq_BxS": seq_BxS}

    carry = {"cache": cache, "lengths_B": lengths_B, "root_B": root_B, "cands_BxC": cands_BxC,
             "out_BxM": out_BxM, "n_out_B": n_out_B, "done_B": done_B, "key": key, "stats": stats,
             "seq_BxS": seq_BxS}
    carry = jax.lax.while_loop(cond, body, carry)
    return (carry["out_BxM"], carry["n_out_B"], carry["stats"], be.stacked(carry["cache"], model.spec),
            carry["lengths_B"])


@dataclasses.dataclass
class GenerateResult:
    tokens: list[list[int]]  # new tokens per prompt (EOS included when it stopped there)
    forwards: int  # model forwards of the batch, prefill included
    steps: np.ndarray  # decode steps per row (prefill excluded)
    accepted: np.ndarray  # [B, max_depth + 1]: steps in which depth d (0 = head 1's token) was emitted
    cache: dict | None = None
    lengths: np.ndarray | None = None


def prompt_bucket(P: int, pad_to: int) -> int:
    """The padded prompt length (one compilation per bucket): a multiple of ``pad_to / 4`` for
    short prompts and of an eighth of ``P``'s power of two for long ones, never more than the next
    multiple of ``pad_to`` below 256 tokens (``pad_to=64``: 14 -> 16, 35 -> 48, 66 -> 80, 200 ->
    208, 1000 -> 1024). The prefill computes every padded row: on SmolLM2 each costs about half a
    decode step, so rounding 66 up to 128 cost more than a third of a 128-token generation."""
    if pad_to <= 1:
        return P
    step = max(pad_to // 4, 1, (1 << (P.bit_length() - 1)) // 8)
    return -(-P // step) * step


def generate(model, prompts: list[list[int]] | np.ndarray, dc: DecodeConfig, *, lengths=None,
             padding: str = "right", seed: int = 0, pad_to: int = 1, return_cache: bool = False,
             on_tokens=None, mesh=None, rules=None):
    """Generate for a batch of token-id prompts (lists of different lengths, or a padded array with
    ``lengths`` and ``padding``). ``pad_to`` rounds the prompt length up (fewer recompiles;
    ``prompt_bucket``).
    ``on_tokens(ids)`` receives row 0's new tokens as they are accepted (set ``dc.stream``; on a
    mesh, all at once at the end: ordered host callbacks need one device).
    ``mesh``: decode on this device mesh (``mtp.sharding.make_mesh``): parameters and KV cache
    sharded by the logical-axis ``rules`` of training (``sharding.rules``; default the default rules:
    heads and MLP over ``tensor``, batch rows over ``data``); the output is the one-device output."""
    check_decode_config(dc, model.spec)
    n_devices = 1 if mesh is None else mesh.size
    be = make_backend(dc.settings, n_devices=n_devices, spec=model.spec)
    # ordered host callbacks (streaming) run on one device only: on a mesh the tokens come at the end
    stream_at_end = dc.stream and n_devices > 1
    dc = dataclasses.replace(dc, stream=False) if stream_at_end else dc
    if isinstance(prompts, np.ndarray | jax.Array):
        tokens_BxP = np.asarray(prompts, np.int32)
        lengths_B = np.full(len(tokens_BxP), tokens_BxP.shape[1], np.int32) if lengths is None \
            else np.asarray(lengths, np.int32)
    else:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("Every prompt needs at least one token (an empty prompt has nothing to"
                             " continue); add a BOS token or some text.")
        lengths_B = np.asarray([len(p) for p in prompts], np.int32)
        P = int(lengths_B.max())
        tokens_BxP = np.zeros((len(prompts), P), np.int32)
        for i, p in enumerate(prompts):
            tokens_BxP[i, :len(p)] = p
        padding = "right"
    if lengths_B.min() < 1 or lengths_B.max() > tokens_BxP.shape[1]:
        raise ValueError(f"prompt lengths {lengths_B.tolist()} must be in 1..{tokens_BxP.shape[1]}.")
    vocab = model.spec.vocab_size
    if tokens_BxP.min() < 0 or tokens_BxP.max() >= vocab:
        raise ValueError(f"Prompt token ids must be in [0, {vocab}) for this model; got"
                         f" [{tokens_BxP.min()}, {tokens_BxP.max()}]. Was it encoded with the"
                         " workdir's tokenizer?")
    tokens_BxP = np.asarray(right_align(jnp.asarray(tokens_BxP), jnp.asarray(lengths_B), padding))
    P = prompt_bucket(tokens_BxP.shape[1], pad_to)  # rounding up never pushes past max_seq_len
    P = max(tokens_BxP.shape[1], min(P, model.spec.max_seq_len - dc.max_new_tokens))
    tokens_BxP = np.pad(tokens_BxP, ((0, 0), (0, P - tokens_BxP.shape[1])))
    need = P + dc.max_new_tokens
    if need > model.spec.max_seq_len:
        raise ValueError(f"prompt ({P} tokens, padded) + max_new_tokens ({dc.max_new_tokens}) = {need}"
                         f" exceeds the model's max_seq_len={model.spec.max_seq_len}; shorten the prompt"
                         " or ask for fewer tokens.")
    graphdef, params = nnx.split(model)
    tokens_BxP, lengths_B = jnp.asarray(tokens_BxP), jnp.asarray(lengths_B)
    if mesh is not None:
        rules = rules_from_config(DEFAULT_RULES if rules is None else rules)
        params = jax.device_put(params, param_shardings(params, mesh, rules))
        tokens_BxP = jax.device_put(tokens_BxP, rows_sharding(tokens_BxP.shape, mesh, rules))
        lengths_B = jax.device_put(lengths_B, rows_sharding(lengths_B.shape, mesh, rules))
    _STREAM_SINK.append(on_tokens or (lambda ids: None))
    try:
        out, n_out, stats, cache, lens = _generate(graphdef, params, be.weights(model), tokens_BxP, lengths_B,
                                                   jax.random.key(seed), dc=dc, be=be, mesh=mesh,
                                                   rules=rules if mesh is not None else ())
        out = jax.block_until_ready(out)
    finally:
        _STREAM_SINK.pop()
    out, n_out = np.asarray(out), np.asarray(n_out)
    tokens = [out[i, :min(int(n_out[i]), dc.max_new_tokens)].tolist() for i in range(len(out))]
    if stream_at_end and on_tokens is not None:
        on_tokens(np.asarray(tokens[0], np.int32))
    return GenerateResult(tokens, int(stats["forwards"]), np.asarray(stats["steps_B"]),
                          np.asarray(stats["accepted_BxD"]),
                          cache if return_cache else None, np.asarray(lens) if return_cache else None)
