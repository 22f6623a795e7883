"""Sparse draft trees calibrated on the model's own greedy output (Medusa's "optimized tree").

A cartesian tree (``3,2,1``) spends its nodes evenly; most of them are rarely accepted. Here the
model decodes greedily from prompts of the TRAINING split (never the benchmark's held-out ones),
one full forward over prompt + continuation gives, at every generated position t, the rank of the
greedy token t+d+1 under head d+1 (d = 1..k-1), and the node ``(r1, ..., rd)`` is counted when the
ranks of the first d tokens are exactly ``r1..rd``: the steps at which that node would be on the
accepted path. The ``n_nodes - 1`` most counted nodes form the tree (prefix-closed: a node is
never counted more often than its parent). Expected tokens per forward of a tree = 1 + the sum of
its nodes' frequencies, which ``mtp bench decode`` then measures for real.

``--tree auto`` / ``auto:N`` in ``mtp generate`` and ``mtp bench decode`` calibrates once per
workdir, checkpoint step, head count and size, and keeps the result in ``DIR/draft_trees.json``.
"""

from __future__ import annotations

import collections
import functools
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtp.data.prompts import heldout_prompts
from mtp.decode.generate import PAD_TO, DecodeConfig, generate
from mtp.decode.tree import format_nodes

DEFAULT_NODES = 16
TREES_FILE = "draft_trees.json"


def parse_auto(spec) -> int | None:
    """``'auto'`` -> DEFAULT_NODES, ``'auto:N'`` -> N, anything else -> None."""
    if not isinstance(spec, str) or not spec.startswith("auto"):
        return None
    if spec == "auto":
        return DEFAULT_NODES
    try:
        n = int(spec.split(":", 1)[1])
    except (IndexError, ValueError):
        raise ValueError(f"--tree {spec!r}: use 'auto' or 'auto:N' with N the number of tree nodes"
                         " (root included), e.g. auto:16.") from None
    if n < 2:
        raise ValueError(f"--tree {spec!r}: a tree needs at least 2 nodes (the root and one draft).")
    return n


@functools.partial(jax.jit, static_argnames=("graphdef", "k"))
def _head_ranks(graphdef, state, seq_1xT, *, k: int):
    """``[k-1, T]``: rank of token ``t + d + 1`` under head ``d + 1`` at position t (d = 1..k-1);
    positions past the end get a large rank."""
    model = nnx.merge(graphdef, state)
    logits_NxTxV = model(seq_1xT)[:k, 0].astype(jnp.float32)
    T = seq_1xT.shape[1]
    rows = []
    for d in range(1, k):
        tgt_T = jnp.concatenate([seq_1xT[0, d + 1:], jnp.zeros((d + 1,), seq_1xT.dtype)])
        tl_T = jnp.take_along_axis(logits_NxTxV[d], tgt_T[:, None], axis=1)[:, 0]
        r_T = jnp.sum(logits_NxTxV[d] > tl_T[:, None], axis=-1)
        rows.append(jnp.where(jnp.arange(T) + d + 1 < T, r_T, 1 << 20))
    return jnp.stack(rows)


def rank_counts(loaded, heads: int, *, n_prompts: int = 16, max_new_tokens: int = 128,
                log=None) -> tuple[collections.Counter, int]:
    """Counts of every rank-path prefix over greedy continuations of training-split prompts."""
    prompts = heldout_prompts(loaded.cfg.data, n=n_prompts, seed=1, split="train")
    max_new_tokens = min(max_new_tokens, loaded.spec.max_seq_len // 2)
    dc = DecodeConfig(mode="greedy", max_new_tokens=max_new_tokens)  # no EOS stop: every row runs to the end
    graphdef, state = nnx.split(loaded.model)
    keep = loaded.spec.max_seq_len - max_new_tokens
    prompt_ids = [loaded.tokenizer.encode(text)[-keep:] for text in prompts]  # snippets: never empty
    if log:
        log(f"  calibrating draft tree: greedy continuations of {len(prompts)} prompts (one batch)")
    outs = generate(loaded.model, prompt_ids, dc, pad_to=PAD_TO).tokens
    counts, positions = collections.Counter(), 0
    for ids, out in zip(prompt_ids, outs):
        seq = np.asarray(ids + out, np.int32)
        pad = -(-len(seq) // PAD_TO) * PAD_TO  # one compile per length bucket
        ranks = np.asarray(_head_ranks(graphdef, state, jnp.asarray(np.pad(seq, (0, pad - len(seq))))[None],
                                       k=heads))[:, :len(seq)]
        for t in range(len(ids) - 1, len(seq) - heads):  # head 1 at t emitted seq[t + 1]
            path = tuple(int(r) for r in ranks[:, t])
            for d in range(1, heads):
                counts[path[:d]] += 1
            positions += 1
    return counts, positions


def select_nodes(counts: collections.Counter, n_nodes: int) -> tuple[tuple[int, ...], ...]:
    """The ``n_nodes - 1`` most counted rank paths (the root is extra), kept prefix-closed."""
    order = sorted(counts.items(), key=lambda kv: (-kv[1], len(kv[0]), kv[0]))
    chosen: list[tuple[int, ...]] = []
    have = {()}
    for node, _ in order:
        if len(chosen) == n_nodes - 1:
            break
        if node[:-1] in have:
            chosen.append(node)
            have.add(node)
    if not chosen:  # nothing was ever accepted: a chain of rank-0 drafts, one deep
        chosen = [(0,)]
    return tuple(chosen)


def expected_tokens(counts: collections.Counter, positions: int, nodes) -> float:
    return 1.0 + sum(counts[n] for n in nodes) / max(positions, 1)


def calibrated_tree(loaded, workdir: str | Path, heads: int, n_nodes: int = DEFAULT_NODES, log=None):
    """The sparse tree for ``heads`` heads and ``n_nodes`` nodes: read from ``DIR/draft_trees.json``
    or calibrated now (and saved there). Returns the tuple of rank-path nodes."""
    if loaded.spec.head_type == "causal":
        raise ValueError("--tree auto: sequential (causal) heads draft one token after another; they"
                         " verify chains only (drop --tree).")
    if heads < 2:
        raise ValueError("--tree auto needs --heads 2 or more (heads 2..k draft).")
    path = Path(workdir) / TREES_FILE
    key = f"step={loaded.step},heads={heads},nodes={n_nodes}"
    saved = {}
    if path.exists():
        try:
            saved = json.loads(path.read_text())
        except json.JSONDecodeError:
            saved = {}  # a damaged cache is recomputed (it only holds derived data)
    if key in saved:
        return tuple(tuple(n) for n in saved[key]["nodes"])
    log = log or (lambda *a: print(*a, file=sys.stderr))
    log(f"Calibrating a {n_nodes}-node draft tree for {heads} heads on training-split prompts"
        f" (saved to {path})")
    counts, positions = rank_counts(loaded, heads, log=log)
    nodes = select_nodes(counts, n_nodes)
    saved[key] = {"nodes": [list(n) for n in nodes], "tree": format_nodes(nodes), "positions": positions,
                  "expected_tokens_per_forward": expected_tokens(counts, positions, nodes),
                  "expected_chain": expected_tokens(counts, positions, [(0,) * d for d in range(1, heads)])}
    path.write_text(json.dumps(saved, indent=1))
    log(f"  tree {format_nodes(nodes)}: expected {saved[key]['expected_tokens_per_forward']:.2f} tokens per"
        f" forward on the calibration prompts (chain: {saved[key]['expected_chain']:.2f})")
    return nodes
