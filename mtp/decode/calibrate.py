"""Sparse draft trees calibrated on the model's own greedy output (Medusa's "optimized tree").

A cartesian tree (``3,2,1``) spends its nodes evenly; most of them are rarely accepted. Here the
model decodes greedily from prompts of the TRAINING split (never the benchmark's held-out ones),
one full forward over prompt + continuation gives, at every generated position t, the rank of the
greedy token t+d+1 under head d+1 (d = 1..k-1), and the node ``(r1, ..., rd)`` is counted when the
ranks of the first d tokens are exactly ``r1..rd``: the steps at which that node would be on the
accepted path. The ``n_nodes - 1`` most counted nodes form the tree (prefix-closed: a node is
never counted more often than its parent). Expected tokens per forward of a tree = 1 + the sum of
its nodes' frequencies, which ``mtp bench decode`` then measures for real.

The calibration is an artifact of the workdir, made by ``mtp calibrate --workdir DIR`` (and at
the end of ``mtp train`` for models with 2+ heads, ``train.calibrate``): ``DIR/draft_trees.json``
holds a tree per checkpoint step, head count and size, and ``DIR/draft_vocab.npy`` the token
frequency order (``mtp.decode.draft_vocab``). ``--tree auto`` / ``auto:N`` in ``mtp generate`` and
``mtp bench decode`` only read the file: decoding never runs the model on a corpus.
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
from mtp.decode import draft_vocab
from mtp.decode.generate import PAD_TO, DecodeConfig, generate
from mtp.decode.tree import format_nodes
from mtp.model.heads import head_kind

DEFAULT_NODES = 16
TREES_FILE = "draft_trees.json"


def calibrate_command(workdir, heads: int | None = None, n_nodes: int | None = None) -> str:
    """The ``mtp calibrate`` command line that makes the artifacts for these heads and tree size."""
    extra = (f" --heads {heads}" if heads else "") + (f" --tree-nodes {n_nodes}" if n_nodes else "")
    return f"mtp calibrate --workdir {workdir}{extra}"


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


def _tree_key(step: int, heads: int, n_nodes: int) -> str:
    return f"step={step},heads={heads},nodes={n_nodes}"


def _check_tree_heads(loaded, heads: int) -> None:
    if not head_kind(loaded.spec).draft_trees:
        raise ValueError(f"--tree auto: {loaded.spec.head_type} heads draft one token after another; they"
                         " verify chains only (drop --tree).")
    if heads < 2:
        raise ValueError("--tree auto needs --heads 2 or more (heads 2..k draft).")


def _read_trees(path: Path) -> dict:
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError:
        return {}  # a damaged file holds nothing usable (calibrate writes it again)


def calibrated_tree(loaded, workdir: str | Path, heads: int, n_nodes: int = DEFAULT_NODES):
    """The sparse tree for ``heads`` heads and ``n_nodes`` nodes, read from ``DIR/draft_trees.json``
    (``mtp calibrate`` writes it); a ``ValueError`` naming the command when it is not there."""
    _check_tree_heads(loaded, heads)
    path = Path(workdir) / TREES_FILE
    saved = _read_trees(path)
    key = _tree_key(loaded.step, heads, n_nodes)
    if key not in saved:
        have = f" (it has: {', '.join(saved)})" if saved else ""
        where = f"{path}{have}" if path.exists() else f"{path} does not exist"
        raise ValueError(f"--tree auto:{n_nodes} with {heads} heads needs a draft tree calibrated on this model"
                         f" (step {loaded.step}): {where}. Run `{calibrate_command(workdir, heads, n_nodes)}`"
                         " first (it decodes training-split prompts once and saves the tree).")
    return tuple(tuple(n) for n in saved[key]["nodes"])


def calibrate_trees(loaded, workdir: str | Path, heads: int, node_counts=(DEFAULT_NODES,), log=None) -> dict:
    """Calibrates sparse trees of each size in ``node_counts`` for ``heads`` heads (one set of greedy
    continuations for all sizes) and saves them to ``DIR/draft_trees.json``. Returns ``{n_nodes: nodes}``."""
    _check_tree_heads(loaded, heads)
    log = log or (lambda *a: print(*a, file=sys.stderr))
    path = Path(workdir) / TREES_FILE
    log(f"Calibrating draft trees ({', '.join(map(str, node_counts))} nodes) for {heads} heads on training-split"
        f" prompts -> {path}")
    counts, positions = rank_counts(loaded, heads, log=log)
    saved, out = _read_trees(path), {}
    chain = expected_tokens(counts, positions, [(0,) * d for d in range(1, heads)])
    for n_nodes in node_counts:
        nodes = out[n_nodes] = select_nodes(counts, n_nodes)
        expected = expected_tokens(counts, positions, nodes)
        saved[_tree_key(loaded.step, heads, n_nodes)] = {
            "nodes": [list(n) for n in nodes], "tree": format_nodes(nodes), "positions": positions,
            "expected_tokens_per_forward": expected, "expected_chain": chain}
        log(f"  {n_nodes} nodes: tree {format_nodes(nodes)}: expected {expected:.2f} tokens per forward on the"
            f" calibration prompts (chain: {chain:.2f})")
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(saved, indent=1))
    tmp.replace(path)
    return out


def calibrate_workdir(loaded, workdir: str | Path, heads=None, node_counts=(DEFAULT_NODES,), vocab: bool = True,
                      log=None) -> None:
    """Every decode artifact of a workdir: the draft vocabulary (``draft_vocab.npy``) and sparse draft
    trees (``draft_trees.json``) for each head count in ``heads`` (default: all heads)."""
    log = log or (lambda *a: print(*a, file=sys.stderr))
    n_future = loaded.spec.n_future
    if n_future < 2:
        log(f"{workdir}: one head (n_future=1) drafts nothing; there is nothing to calibrate.")
        return
    for k in heads or (n_future,):
        if not 2 <= k <= n_future:
            raise ValueError(f"--heads {k}: this model has {n_future} heads; use 2..{n_future}.")
    if vocab:
        draft_vocab.write_order(loaded, log=log)
    if not head_kind(loaded.spec).draft_trees:
        log(f"{loaded.spec.head_type} heads verify chains only: no draft trees to calibrate.")
        return
    for k in heads or (n_future,):
        calibrate_trees(loaded, workdir, k, node_counts, log=log)
