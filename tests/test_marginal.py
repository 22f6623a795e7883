"""Marginalization p(x_{t+k} | x_{<=t}) from head 1: exact against brute force, truncations, eval."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import tiny_spec

from mtp.decode.marginal import format_table, marginal_eval, marginal_probs
from mtp.model import MTPLM

V = 13
CTX = [3, 1, 4, 1, 5]


@pytest.fixture(scope="module")
def model():
    """A tiny random NTP model (n_future = 1). Its parameters are drawn here with numpy (norm scales
    1, every matrix N(0, 0.4^2): peaked but not degenerate distributions, so truncation visibly
    matters) instead of the model's own init, whose vmapped RNG compiles slowly on a busy CPU."""
    abstract = nnx.eval_shape(lambda: MTPLM(tiny_spec(vocab_size=V, n_future=1), rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    rng = np.random.default_rng(3)
    pure = jax.tree_util.tree_map_with_path(
        lambda path, x: np.ones(x.shape, np.float32) if "scale" in jax.tree_util.keystr(path)
        else rng.normal(0, 0.4, x.shape).astype(np.float32), nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, pure))
    return nnx.merge(graphdef, state)


@nnx.jit
def _full_probs(model, tokens_BxL):
    return jax.nn.softmax(model(tokens_BxL)[0].astype(jnp.float32), axis=-1)


def step_probs(model, ctx, paths):
    """Full (uncached) forwards over ctx + path for every path: [N, J+1, V] with
    out[n, j] = p(. | ctx, path_n[:j]). Inputs are right-padded to [16 * n, 16] (causal: the
    padding changes nothing before it) so a handful of shapes are compiled."""
    seqs = [list(ctx) + list(p) for p in paths]
    L, N = len(seqs[0]), len(seqs)
    assert L <= 16
    padded = np.zeros((-(-N // 16) * 16, 16), np.int32)
    padded[:N, :L] = seqs
    probs = _full_probs(model, jnp.asarray(padded))
    return np.asarray(probs, np.float64)[:N, len(ctx) - 1:L]


def brute_force(model, ctx, k, keep=lambda j, probs, v: True):
    """sum over every intermediate path (optionally only those ``keep`` allows) of the product."""
    if k == 1:
        return step_probs(model, ctx, [[]])[0, 0]
    paths = list(itertools.product(range(V), repeat=k - 1))
    probs = step_probs(model, ctx, paths)
    out = np.zeros(V)
    for n, path in enumerate(paths):
        if not all(keep(j, probs[n, j], path[j]) for j in range(k - 1)):
            continue
        w = np.prod([probs[n, j, path[j]] for j in range(k - 1)])
        out += w * probs[n, k - 1]
    return out


def greedy_chain(model, ctx, n):
    seq = list(ctx)
    for _ in range(n):
        seq.append(int(np.argmax(step_probs(model, seq, [[]])[0, 0])))
    return seq[len(ctx):]


@pytest.mark.parametrize("k", [2, 3])
def test_exact_equals_brute_force_and_sums_to_one(model, k):
    ref = brute_force(model, CTX, k)
    for m in (V, None, 100):
        p = marginal_probs(model, CTX, k, m)
        np.testing.assert_allclose(p, ref, atol=1e-5)
        assert abs(p.sum() - 1) < 1e-5
    # the marginal is not just head 1's next-token distribution
    assert np.abs(ref - brute_force(model, CTX, 1)).max() > 1e-2


def test_per_step_truncation_is_top_m_of_each_intermediate_distribution(model):
    """m = 3, k = 3 against brute force restricted to paths whose every token is in the top-3 of
    its step's distribution (Mehra et al.'s truncation), not renormalized."""
    def top3(j, probs_V, v):
        return v in np.argsort(-probs_V, kind="stable")[:3]

    ref = brute_force(model, CTX, 3, keep=top3)
    p = marginal_probs(model, CTX, 3, 3)
    np.testing.assert_allclose(p, ref, atol=1e-5)
    assert ref.sum() < 1 - 1e-3


def test_sub_distribution_monotone_in_m(model):
    for k in (2, 3, 4):
        ps = [marginal_probs(model, CTX, k, m) for m in (1, 2, 4, 8, V)]
        sums = [p.sum() for p in ps]
        assert all(s <= 1 + 1e-6 for s in sums), sums
        assert sums[-2] < 1 - 1e-4, sums  # m < V leaves some mass out
        for a, b in zip(ps, ps[1:]):
            assert (b >= a - 1e-7).all()  # nested path sets: every entry grows with m
        assert all(b > a for a, b in zip(sums, sums[1:])), sums
        assert abs(sums[-1] - 1) < 1e-5


@pytest.mark.parametrize("k", [2, 3, 4])
def test_m1_is_the_greedy_chain(model, k):
    g = greedy_chain(model, CTX, k)
    p = marginal_probs(model, CTX, k, 1)
    assert int(np.argmax(p)) == g[k - 1]
    # value: p(g_1..g_{k-1}) * p(. | g_1..g_{k-1})
    probs = step_probs(model, CTX, [g[:k - 1]])[0]
    w = np.prod([probs[j, g[j]] for j in range(k - 1)])
    np.testing.assert_allclose(p, w * probs[k - 1], atol=1e-6)
    np.testing.assert_allclose(marginal_probs(model, CTX, k, 1, truncation="beam"), p, atol=1e-7)


def test_chunking_does_not_change_the_result(model):
    """chunk=8 splits the 13^2 depth-2 paths into many padded trie blocks."""
    for k, m in ((3, V), (4, 5)):
        a = marginal_probs(model, CTX, k, m, chunk=512)
        b = marginal_probs(model, CTX, k, m, chunk=8)
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_beam_truncation(model):
    np.testing.assert_allclose(marginal_probs(model, CTX, 2, V, truncation="beam"), brute_force(model, CTX, 2),
                               atol=1e-5)
    # k = 3, m = 4: the 4 best depth-1 tokens, then the 4 best 2-token paths among their children
    m = 4
    p1 = step_probs(model, CTX, [[]])[0, 0]
    beam1 = np.argsort(-p1, kind="stable")[:m]
    probs = step_probs(model, CTX, [[int(v)] for v in beam1])  # [m, 2, V]
    joint = p1[beam1][:, None] * probs[:, 1]
    best = np.argsort(-joint, axis=None, kind="stable")[:m]
    ref = np.zeros(V)
    for b in best:
        i, v = np.unravel_index(b, joint.shape)
        ref += joint[i, v] * step_probs(model, CTX, [[int(beam1[i]), int(v)]])[0, 2]
    p = marginal_probs(model, CTX, 3, m, truncation="beam")
    np.testing.assert_allclose(p, ref, atol=1e-5)
    exact = brute_force(model, CTX, 3)
    assert p.sum() < 1 and (p <= exact + 1e-6).all()
    sums = [marginal_probs(model, CTX, 4, mm, truncation="beam").sum() for mm in (1, 3, 9)]
    assert sums[0] < sums[1] < sums[2] <= 1 + 1e-6


def test_eval_matches_per_position_marginals(model):
    rng = np.random.default_rng(0)
    seqs = [rng.integers(0, V, n).tolist() for n in (9, 12)]
    res = marginal_eval(model, seqs, ks=(2, 3), ms=(1, 3, V), positions_per_seq=100, seed=0, progress=False)
    assert res["positions"] == (9 - 3) + (12 - 3)  # every valid position: t + 3 must exist
    rows = {(r["k"], r["m"]): r for r in res["rows"]}
    assert rows[(2, V)]["exact"] and rows[(3, V)]["exact"] and not rows[(3, 3)]["exact"]
    for k in (2, 3):
        assert rows[(k, 1)]["agree_greedy"] == 1.0  # m = 1 is the greedy chain
        assert abs(rows[(k, V)]["mass"] - 1) < 1e-5 and rows[(k, 3)]["mass"] < 1
    # the shared per-sequence prefill (lengths = t + 1) gives what a fresh context would
    for k, m in ((2, V), (3, 3)):
        top1 = top5 = 0
        for seq in seqs:
            for t in range(len(seq) - 3):
                p = marginal_probs(model, seq[:t + 1], k, m)
                order = np.argsort(-p, kind="stable")
                top1 += order[0] == seq[t + k]
                top5 += seq[t + k] in order[:5]
        assert rows[(k, m)]["top1"] == pytest.approx(top1 / res["positions"])
        assert rows[(k, m)]["top5"] == pytest.approx(top5 / res["positions"])
    assert "greedy-chain" in format_table(res)


def test_eval_on_the_models_own_greedy_text(model):
    """On text the model itself wrote greedily, the greedy chain and m = 1 are always right."""
    seq = [3] + greedy_chain(model, [3], 9)  # every position after t = 0 is the model's own
    res = marginal_eval(model, [seq], ks=(2, 4), ms=(1, 2), positions_per_seq=5, seed=1, progress=False,
                        truncation="beam")
    assert res["positions"] == 5
    assert res["greedy"] == {2: 1.0, 4: 1.0}
    for r in res["rows"]:
        if r["m"] == 1:
            assert r["top1"] == 1.0 and r["agree_greedy"] == 1.0


def test_bad_requests(model):
    with pytest.raises(ValueError, match="k must be >= 1"):
        marginal_probs(model, CTX, 0, 2)
    with pytest.raises(ValueError, match="truncation"):
        marginal_probs(model, CTX, 2, 2, truncation="nope")
    with pytest.raises(ValueError, match=r"\[0, 13\)"):
        marginal_probs(model, [99], 2, 2)
    with pytest.raises(ValueError, match="at least one token"):
        marginal_probs(model, [], 2, 2)
