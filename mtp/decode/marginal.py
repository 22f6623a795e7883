"""Marginalization (Mehra et al. 2025): an NTP model's own prediction of ``x_{t+k}``.

Head 1 gives ``p(x_{t+1} | x_{<=t})``. Summing over the ``k-1`` intermediate tokens

    p(x_{t+k} | x_{<=t}) = sum_{v_1..v_{k-1}} prod_j p(v_j | x_{<=t}, v_<j) * p(x_{t+k} | x_{<=t}, v_1..v_{k-1})

is exact over all ``V^(k-1)`` paths. Two truncations:

- ``truncation="per_step"`` (Mehra et al.'s: at every intermediate step keep the top-m tokens of the
  current path's distribution): the paths form the cartesian tree of ``m^j`` nodes at depth j; the
  sum runs over its ``m^(k-1)`` leaves with their true joint weights, NOT renormalized, so the result
  is a sub-distribution whose mass (``sum_x``) is the joint probability the kept paths cover. The
  path sets are nested in m (top-m is inside top-(m+1)), so every entry grows with m; ``m >= V`` is
  the exact marginal and ``m = 1`` is the greedy chain (``p(g_1..g_{k-1}) p(x | g_1..g_{k-1})``,
  whose argmax is greedy's k-th token).
- ``truncation="beam"``: keep the m paths of highest joint probability at each depth (beam search):
  ``m`` nodes per depth instead of ``m^j``, so k = 4 stays affordable for m = 64; also not
  renormalized; ``m = 1`` is again the greedy chain, but ``m = V`` is exact only for k = 2.

How it runs (all from ONE prefill): the context is prefilled once into a single KV-cache row with
the decode backend's cached forward (head 1 only); every depth's new nodes are then evaluated as tree blocks on top of
that row -- a chunk of paths is laid out as its trie (shared prefixes once, ancestor-only attention
mask, exactly like ``tree.DraftTree``), one cached forward per chunk at ``lengths = len(ctx)``.
The returned cache is dropped, so the prefix cache is reused unchanged by every chunk (no copies of
it per path). A chunk holds at most ``chunk`` block tokens, which caps memory; a trie recomputes a
path's ancestors only once per chunk. The marginal sums are accumulated on device per chunk, so no
``[paths, V]`` array is ever kept. For ``marginal_eval`` each sequence is prefilled once and every
sampled position t reuses that cache with ``lengths = t + 1`` (slots > t are never attended to).
"""

from __future__ import annotations

import functools
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from mtp.config import DEFAULT_DECODE_SETTINGS, DecodeSettings
from mtp.decode.backend import make_backend

TRUNCATIONS = ("per_step", "beam")
PAD_TO = 64  # contexts are padded to a multiple of this: one compilation per length bucket


# --- device functions ------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnames=("graphdef", "S", "be"))
def _prefill(graphdef, params, weights, tokens_1xP, *, S: int, be):
    """Cache row holding the (padded) context, and head 1's hidden state at every position."""
    model = nnx.merge(graphdef, params)
    P = tokens_1xP.shape[1]
    cache = be.init_cache(model.spec, 1, S, 1)
    hidden_1x1xPxD, cache = be.forward(model, weights, cache, tokens_1xP, jnp.zeros((1,), jnp.int32), np.arange(P),
                                       np.tril(np.ones((P, P), bool)), 1, prefill=True)
    return cache, hidden_1x1xPxD[0, 0]


@functools.partial(jax.jit, static_argnames=("graphdef", "topm"))
def _root(graphdef, params, h_D, *, topm: int):
    """Top-m tokens and log-probs of ``p(x_{t+1} | x_{<=t})`` and the full distribution."""
    model = nnx.merge(graphdef, params)
    logp_V = jax.nn.log_softmax(model.project(h_D).astype(jnp.float32))
    top_logp, top_tok = jax.lax.top_k(logp_V, topm)
    return top_tok, top_logp, jnp.exp(logp_V)


@functools.partial(jax.jit, static_argnames=("graphdef", "topm", "be"))
def _chunk(graphdef, params, weights, cache, length_1, tokens_1xT, depth_T, mask_TxT, leaf_C, logw_C, member_CxM, *,
           topm: int, be):
    """One tree block on top of the prefix row: for each leaf c (a path), the top-m continuations
    of ``p(. | ctx, path_c)`` and ``acc[i] = sum_c member[c, i] exp(logw_c) p(. | ctx, path_c)``."""
    model = nnx.merge(graphdef, params)
    hidden_1x1xTxD, _ = be.forward(model, weights, cache, tokens_1xT, length_1, depth_T, mask_TxT, 1)
    h_CxD = hidden_1x1xTxD[0, 0][leaf_C]
    logp_CxV = jax.nn.log_softmax(model.project(h_CxD).astype(jnp.float32), axis=-1)
    top_logp, top_tok = jax.lax.top_k(logp_CxV, topm)
    w_CxM = jnp.where(member_CxM, jnp.exp(logw_C)[:, None], 0.0)
    acc_MxV = jnp.einsum("cm,cv->mv", w_CxM, jnp.exp(logp_CxV), precision=jax.lax.Precision.HIGHEST)
    return top_tok, top_logp, acc_MxV


# --- host side: tries over path chunks -------------------------------------------------------------
def _bucket(n: int, cap: int) -> int:
    """Power of two >= n (at least 8), at most ``max(cap, n)``: few distinct compiled shapes."""
    b = 8
    while b < n:
        b *= 2
    return min(b, max(cap, n))


def _trie_chunks(paths_NxJ: np.ndarray, chunk: int):
    """Split the paths (rows of tokens, all of depth J) into groups whose tries hold <= ``chunk``
    nodes. Yields ``(first, last, tokens_T, depth_T, parent_T, leaf_C)``; consecutive paths share
    prefixes, so a trie is ~``C (1 + 1/m + ...)`` nodes for C paths."""
    N, J = paths_NxJ.shape
    start, nodes, tokens, depth, parent, leaves = 0, {}, [], [], [], []
    for n in range(N):
        row = tuple(int(x) for x in paths_NxJ[n])
        new = sum(1 for d in range(1, J + 1) if row[:d] not in nodes)
        if leaves and len(tokens) + new > chunk:
            yield start, n, tokens, depth, parent, leaves
            start, nodes, tokens, depth, parent, leaves = n, {}, [], [], [], []
        for d in range(1, J + 1):
            key = row[:d]
            if key not in nodes:
                nodes[key] = len(tokens)
                tokens.append(row[d - 1])
                depth.append(d - 1)
                parent.append(nodes[key[:-1]] if d > 1 else -1)
        leaves.append(nodes[row])
    if leaves:
        yield start, N, tokens, depth, parent, leaves


class _Runner:
    """A model split once, plus the chunked tree evaluation on top of one prefix cache row."""

    def __init__(self, model, chunk: int, settings: DecodeSettings = DEFAULT_DECODE_SETTINGS):
        if chunk < 8:
            raise ValueError(f"chunk={chunk} must be >= 8 block tokens.")
        self.graphdef, self.params = nnx.split(model)
        self.be = make_backend(settings)  # the CPU kernels' decode layout on a CPU, the model's layers elsewhere
        self.weights = self.be.weights(model)
        self.V = model.spec.vocab_size
        self.chunk = chunk
        self.forwards = 0  # tree-block forwards (prefills excluded)
        self.block_tokens = 0  # real (unpadded) block tokens evaluated

    def prefill(self, tokens: list[int], extra: int):
        P = len(tokens)
        P_pad = -(-P // PAD_TO) * PAD_TO
        padded = np.zeros((1, P_pad), np.int32)
        padded[0, :P] = tokens
        return _prefill(self.graphdef, self.params, self.weights, jnp.asarray(padded),
                        S=P_pad + max(self.chunk, extra), be=self.be)

    def topk(self, topm: int) -> int:
        return min(self.V, _bucket(topm, self.V))  # compiled top-k width; results are cut to topm

    def root(self, h_D, topm: int):
        tok, logp, p = _root(self.graphdef, self.params, h_D, topm=self.topk(topm))
        return np.asarray(tok)[:topm], np.asarray(logp, np.float64)[:topm], np.asarray(p, np.float64)

    def evaluate(self, cache, length: int, paths_NxJ, logw_N, member_NxM, topm: int):
        """Top-m continuations ``[N, topm]`` of every path and ``sum_n member * w_n p(.|path_n)``
        ``[M, V]``, in trie chunks."""
        N, M = member_NxM.shape
        top_tok = np.zeros((N, topm), np.int32)
        top_logp = np.zeros((N, topm), np.float64)
        acc = np.zeros((M, self.V), np.float64)
        length_1 = jnp.asarray([length], jnp.int32)
        for first, last, tokens, depth, parent, leaves in _trie_chunks(paths_NxJ, self.chunk):
            T, C = len(tokens), len(leaves)
            Tb = _bucket(T, self.chunk)
            tok_T = np.zeros(Tb, np.int32)
            tok_T[:T] = tokens
            depth_T = np.zeros(Tb, np.int32)
            depth_T[:T] = depth
            mask = np.eye(Tb, dtype=bool)  # padding nodes attend to themselves only
            for i, p in enumerate(parent):
                if p >= 0:
                    mask[i] |= mask[p]
            leaf = np.zeros(Tb, np.int32)
            leaf[:C] = leaves
            logw = np.full(Tb, -np.inf, np.float32)
            logw[:C] = logw_N[first:last]
            member = np.zeros((Tb, -(-M // 4) * 4), bool)  # columns padded: fewer compiled shapes
            member[:C, :M] = member_NxM[first:last]
            t, lp, a = _chunk(self.graphdef, self.params, self.weights, cache, length_1, jnp.asarray(tok_T[None]),
                              jnp.asarray(depth_T), jnp.asarray(mask), jnp.asarray(leaf), jnp.asarray(logw),
                              jnp.asarray(member), topm=self.topk(topm), be=self.be)
            top_tok[first:last] = np.asarray(t)[:C, :topm]
            top_logp[first:last] = np.asarray(lp)[:C, :topm]
            acc += np.asarray(a, np.float64)[:M]
            self.forwards += 1
            self.block_tokens += T
        return top_tok, top_logp, acc


# --- the two truncations ---------------------------------------------------------------------------
def _per_step(runner: _Runner, cache, length: int, h_D, kmax: int, ms: tuple[int, ...]):
    """Every (k, m) for k = 2..kmax, m in ms from ONE cartesian tree of width max(ms): a node belongs
    to the m-truncation when every token on its path is within the top-m of its parent.
    Returns ``({(k, m): p [V]}, greedy tokens g_1..g_kmax)``."""
    mmax = max(ms)
    ms_arr = np.asarray(ms)
    tok, logp, p1 = runner.root(h_D, mmax)
    greedy = [int(tok[0])]
    out = {(1, m): p1 for m in ms}
    paths = tok[:, None].astype(np.int32)  # [N, 1]: depth-1 nodes, in rank order
    logw = logp.astype(np.float32)
    maxrank = np.arange(mmax)
    for j in range(1, kmax):
        member = maxrank[:, None] < ms_arr[None, :]
        ctok, clogp, acc = runner.evaluate(cache, length, paths, logw, member, mmax if j < kmax - 1 else 1)
        for i, m in enumerate(ms):
            out[(j + 1, m)] = acc[i]
        greedy.append(int(ctok[0, 0]))  # node 0 is the all-rank-0 path: the greedy chain
        if j == kmax - 1:
            break
        N = len(paths)
        # children in (parent, rank) order, so node 0 stays the greedy path and tries share prefixes
        paths = np.concatenate([np.repeat(paths, mmax, axis=0), ctok.reshape(-1, 1)], axis=1)
        logw = (np.repeat(logw, mmax).astype(np.float64) + clogp.reshape(-1)).astype(np.float32)
        maxrank = np.maximum(np.repeat(maxrank, mmax), np.tile(np.arange(mmax), N))
    return out, greedy


def _beam(runner: _Runner, cache, length: int, h_D, kmax: int, m: int):
    """Top-m joint-probability paths at each depth. Returns ``{k: p [V]}`` for k = 1..kmax."""
    tok, logp, p1 = runner.root(h_D, m)
    out = {1: p1}
    paths = tok[:, None].astype(np.int32)
    logw = logp.astype(np.float32)
    for j in range(1, kmax):
        member = np.ones((len(paths), 1), bool)
        ctok, clogp, acc = runner.evaluate(cache, length, paths, logw, member, m)
        out[j + 1] = acc[0]
        if j == kmax - 1:
            break
        # the global top-m children lie within every parent's own top-m children
        cand = logw[:, None].astype(np.float64) + clogp  # [N, m]
        best = np.argsort(-cand, axis=None, kind="stable")[:m]
        parent, rank = np.unravel_index(best, cand.shape)
        order = np.lexsort((rank, parent))  # keep parents grouped: tries share prefixes
        parent, rank = parent[order], rank[order]
        paths = np.concatenate([paths[parent], ctok[parent, rank][:, None]], axis=1)
        logw = cand[parent, rank].astype(np.float32)
    return out


def _check(model, k_values, m_values, truncation: str):
    V = model.spec.vocab_size
    if truncation not in TRUNCATIONS:
        raise ValueError(f"truncation={truncation!r}: use one of {TRUNCATIONS}.")
    if any(k < 1 for k in k_values):
        raise ValueError(f"k={k_values}: every k must be >= 1 (k = 1 is head 1 itself).")
    if any(m is not None and m < 1 for m in m_values):
        raise ValueError(f"m={m_values}: every m must be >= 1 (or None for the exact sum over the vocab).")
    return tuple(V if m is None else min(int(m), V) for m in m_values)


def marginal_probs(model, context_ids, k: int, m: int | None = None, *, truncation: str = "per_step",
                   chunk: int = 512) -> np.ndarray:
    """``p(x_{t+k} | context)`` ``[V]`` (float64) from head 1, summed over the intermediate paths kept
    by ``truncation`` with width ``m`` (``None`` or ``>= V``: all of them, the exact marginal for
    ``per_step``). Not renormalized: its sum is the covered path mass (1 when exact)."""
    (m,) = _check(model, (k,), (m,), truncation)
    ctx = [int(x) for x in np.asarray(context_ids).reshape(-1)]
    if not ctx:
        raise ValueError("The context needs at least one token.")
    V = model.spec.vocab_size
    if min(ctx) < 0 or max(ctx) >= V:
        raise ValueError(f"Context token ids must be in [0, {V}) for this model.")
    runner = _Runner(model, chunk)
    cache, hidden_PxD = runner.prefill(ctx, extra=k)
    h_D = hidden_PxD[len(ctx) - 1]
    if truncation == "per_step":
        out, _ = _per_step(runner, cache, len(ctx), h_D, k, (m,))
        return out[(k, m)]
    return _beam(runner, cache, len(ctx), h_D, k, m)[k]


def marginal_eval(model, sequences, ks=(2, 3, 4), ms=(1, 8, 64), positions_per_seq: int = 16, seed: int = 0, *,
                  truncation: str = "per_step", chunk: int = 512, progress: bool = True) -> dict:
    """Argmax accuracy of the marginal ``p(x_{t+k} | x_{<=t})`` at random positions t of each sequence.

    For every (k, m): ``top1`` / ``top5`` (the true ``x_{t+k}`` is the argmax / in the top 5),
    ``agree_greedy`` (the argmax is the token greedy decoding from ``x_{<=t}`` emits k-1 steps later)
    and ``mass`` (mean ``sum_x p``: the path probability the truncation covers; 1 when exact).
    ``greedy`` gives the greedy chain's own top-1 accuracy at each k, for comparison.
    Positions t are drawn without replacement from ``0 .. len - 1 - max(ks)`` (so ``x_{t+k}`` exists)."""
    ks = tuple(sorted({int(k) for k in ks}))
    ms = tuple(sorted(set(_check(model, ks, tuple(ms), truncation))))
    kmax = max(ks)
    rng = np.random.default_rng(seed)
    runner = _Runner(model, chunk)
    jobs = []
    for s, seq in enumerate(sequences):
        n_valid = len(seq) - kmax
        if n_valid <= 0:
            continue
        picks = rng.choice(n_valid, size=min(positions_per_seq, n_valid), replace=False)
        jobs += [(s, int(t)) for t in sorted(picks)]
    hits = {(k, m): np.zeros(3) for k in ks for m in ms}  # top1, top5, agree_greedy
    mass = {(k, m): 0.0 for k in ks for m in ms}
    greedy_hits = dict.fromkeys(ks, 0)
    prefilled = (None, None)
    bar = tqdm(jobs, desc=f"marginal k<={kmax} m<={max(ms)}", file=sys.stderr, disable=not progress)
    for s, t in bar:
        if prefilled[0] != s:
            seq = [int(x) for x in sequences[s]]
            prefilled = (s, runner.prefill(seq, extra=kmax))
        cache, hidden_PxD = prefilled[1]
        seq = sequences[s]
        h_D = hidden_PxD[t]
        if truncation == "per_step":
            out, greedy = _per_step(runner, cache, t + 1, h_D, kmax, ms)
        else:
            out, greedy = _per_step(runner, cache, t + 1, h_D, kmax, (1,))
            out = {(k, m): p for m in ms for k, p in _beam(runner, cache, t + 1, h_D, kmax, m).items()}
        for k in ks:
            true = int(seq[t + k])
            greedy_hits[k] += greedy[k - 1] == true
            for m in ms:
                p = out[(k, m)]
                top5 = np.argsort(-p, kind="stable")[:5]
                hits[(k, m)] += (top5[0] == true, true in top5, top5[0] == greedy[k - 1])
                mass[(k, m)] += float(p.sum())
    n = len(jobs)
    rows = []
    for k in ks:
        for m in ms:
            h = hits[(k, m)] / max(n, 1)
            rows.append({"k": k, "m": m, "exact": m >= runner.V and (truncation == "per_step" or k <= 2),
                         "top1": float(h[0]), "top5": float(h[1]), "agree_greedy": float(h[2]),
                         "mass": mass[(k, m)] / max(n, 1)})
    return {"positions": n, "truncation": truncation, "vocab_size": runner.V, "rows": rows,
            "greedy": {k: greedy_hits[k] / max(n, 1) for k in ks},
            "forwards": runner.forwards, "block_tokens": runner.block_tokens}


def format_table(result: dict) -> str:
    """The ``marginal_eval`` result as a plain-text table."""
    lines = [f"positions={result['positions']} truncation={result['truncation']} V={result['vocab_size']}",
             f"{'k':>2} {'m':>6} {'top1':>6} {'top5':>6} {'=greedy':>8} {'mass':>6}  greedy-chain top1"]
    for r in result["rows"]:
        m = f"{r['m']}{'*' if r['exact'] else ''}"
        lines.append(f"{r['k']:>2} {m:>6} {r['top1']:6.3f} {r['top5']:6.3f} {r['agree_greedy']:8.3f}"
                     f" {r['mass']:6.3f}  {result['greedy'][r['k']]:.3f}")
    lines.append("(* = exact marginal)")
    return "\n".join(lines)
