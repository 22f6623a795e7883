"""KV-cached generation and self-speculative decoding: exactness against plain decoding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import constant_input_model, heads_like_head1, tiny_model, with_params
from scipy import stats

from mtp.decode.cache import forward_cached
from mtp.decode.generate import DecodeConfig, filtered_probs, generate
from mtp.decode.tree import build_tree, parse_tree
from mtp.model.cached import init_cache


def full_forward_greedy(model, prompt, n, width=32):
    """Reference: greedy decoding with a full (uncached) forward per token (one jitted forward over
    a fixed-width causal window; positions after the last token cannot affect it)."""
    graphdef, state = nnx.split(model)
    logits_fn = jax.jit(lambda s, x: nnx.merge(graphdef, s)(x)[0, 0])
    seq = list(prompt)
    for _ in range(n):
        padded = jnp.asarray([seq + [0] * (width - len(seq))])
        seq.append(int(jnp.argmax(logits_fn(state, padded)[len(seq) - 1])))
    return seq[len(prompt):]


def prompts_of(seed, n, vocab=97, lo=1, hi=12):
    rng = np.random.default_rng(seed)
    return [rng.integers(4, vocab, rng.integers(lo, hi)).tolist() for _ in range(n)]


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=1, n_future=4)


def test_cached_greedy_equals_full_forward(model):
    prompts = prompts_of(0, 3)
    result = generate(model, prompts, DecodeConfig("greedy", max_new_tokens=8), pad_to=16)
    for p, out in zip(prompts, result.tokens):
        assert out == full_forward_greedy(model, p, 8)
    assert result.forwards == 8  # prefill + 7 steps, one token each


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("heads,tree", [(2, None), (4, None), (4, (3, 2, 1)),
                                        (4, ((0,), (1,), (0, 0), (1, 0), (0, 1), (0, 0, 0))),  # sparse
                                        (4, ((0,), (1,), (2,)))])  # sparse, shallower than the heads
def test_speculative_greedy_equals_plain_greedy(batch, heads, tree):
    model = heads_like_head1(tiny_model(seed=1, n_future=4), noise=0.5)
    prompts = prompts_of(batch, batch)
    plain = generate(model, prompts, DecodeConfig("greedy", max_new_tokens=24), pad_to=16)
    spec = generate(model, prompts, DecodeConfig("speculative", heads, tree, max_new_tokens=24), pad_to=16)
    assert spec.tokens == plain.tokens
    assert spec.forwards <= plain.forwards


@pytest.mark.parametrize("extra", [dict(branch_layer=1), dict(hidden_mix="weighted")])
def test_branch_layer_and_hidden_mix_decode_exactly(extra):
    """The cached forward feeds heads 2..n the same inputs as the full forward (branch layer or
    mix), so every head's logits agree and speculative decoding stays exact."""
    model = heads_like_head1(tiny_model(seed=1, n_future=3, **extra), noise=0.5)
    seq = prompts_of(21, 1, lo=9, hi=10)[0]
    T = len(seq)
    hidden, _ = forward_cached(model, init_cache(model.spec, 1, 64, 3), jnp.asarray([seq]), jnp.zeros(1, jnp.int32),
                               np.arange(T), np.tril(np.ones((T, T), bool)), 3)
    np.testing.assert_allclose(model.project(hidden), model(jnp.asarray([seq])), atol=1e-4, rtol=1e-4)
    prompts = prompts_of(22, 2)
    plain = generate(model, prompts, DecodeConfig("greedy", max_new_tokens=12), pad_to=16)
    spec = generate(model, prompts, DecodeConfig("speculative", 3, max_new_tokens=12), pad_to=16)
    assert spec.tokens == plain.tokens


@pytest.mark.parametrize("same_heads", [True, False])
def test_drafts_all_right_and_all_wrong(same_heads):
    m = constant_input_model(tiny_model(seed=1, n_future=4, tie_embeddings=False), same_heads)
    prompts = prompts_of(5, 2)
    plain = generate(m, prompts, DecodeConfig("greedy", max_new_tokens=17), pad_to=16)
    spec = generate(m, prompts, DecodeConfig("speculative", 4, max_new_tokens=17), pad_to=16)
    assert spec.tokens == plain.tokens
    steps = spec.steps.sum()
    if same_heads:  # every draft accepted: 4 tokens per step (1 from prefill + 4 steps = 17)
        assert spec.forwards == 5 and (spec.accepted == spec.steps[:, None]).all()
    else:  # no draft accepted: one token per step, like plain decoding
        assert spec.forwards == plain.forwards
        assert spec.accepted[:, 1:].sum() == 0 and spec.accepted[:, 0].sum() == steps


def test_padding_sides_and_batching_agree(model):
    prompts = prompts_of(7, 4)
    dc = DecodeConfig("speculative", 3, max_new_tokens=10)
    batched = generate(model, prompts, dc, pad_to=16).tokens
    single = [generate(model, [p], dc, pad_to=16).tokens[0] for p in prompts]
    assert batched == single
    P = max(len(p) for p in prompts)
    left = np.zeros((4, P), np.int32)
    for i, p in enumerate(prompts):
        left[i, P - len(p):] = p
    lefted = generate(model, left, dc, lengths=[len(p) for p in prompts], padding="left", pad_to=16)
    assert lefted.tokens == batched


def test_stops_at_eos(model):
    prompt = prompts_of(3, 1)
    free = generate(model, prompt, DecodeConfig("greedy", max_new_tokens=12)).tokens[0]
    eos = free[4]
    first = free.index(eos)
    for mode, heads in [("greedy", 1), ("speculative", 4)]:
        out = generate(model, prompt, DecodeConfig(mode, heads, max_new_tokens=12, eos_id=eos)).tokens[0]
        assert out == free[:first + 1]


@pytest.mark.parametrize("tree", [None, (2, 2, 2)])
def test_cache_after_rollback_equals_cache_from_scratch(tree):
    model = heads_like_head1(tiny_model(seed=1, n_future=4), noise=0.5)
    prompts = prompts_of(11, 3)
    dc = DecodeConfig("speculative", 4, tree, max_new_tokens=20)
    res = generate(model, prompts, dc, pad_to=16, return_cache=True)
    assert res.accepted[:, 1:].sum() > 0  # some drafts were accepted and some rolled back
    for b, (p, out) in enumerate(zip(prompts, res.tokens)):
        # the cache holds the prompt and every emitted token except the last (the next root)
        # (the last step may accept past max_new_tokens: those cached tokens are cut from the output)
        length = int(res.lengths[b])
        assert length >= len(p) + len(out) - 1
        seq = (p + out)[:length]
        length = len(seq)
        fresh = init_cache(model.spec, 1, 64, 4)
        _, fresh = forward_cached(model, fresh, jnp.asarray([seq]), jnp.zeros(1, jnp.int32),
                                  np.arange(length), np.tril(np.ones((length, length), bool)), 4)
        for name in ("trunk_k", "trunk_v", "head_k", "head_v"):
            np.testing.assert_allclose(np.asarray(res.cache[name])[:, b, :, :length],  # [L, B, K, S, H]
                                       np.asarray(fresh[name])[:, 0, :, :length], atol=2e-5, rtol=1e-5)


def test_tree_accepts_at_least_as_much_as_chain():
    model = heads_like_head1(tiny_model(seed=1, n_future=4), noise=1.0, seed=3)
    prompts = prompts_of(13, 8)
    chain = generate(model, prompts, DecodeConfig("speculative", 4, max_new_tokens=32), pad_to=16)
    tree = generate(model, prompts, DecodeConfig("speculative", 4, (4, 2, 1), max_new_tokens=32), pad_to=16)
    assert tree.tokens == chain.tokens
    per_step = lambda r: (r.accepted.sum() / r.steps.sum())
    assert per_step(tree) >= per_step(chain)
    assert chain.accepted[:, 1:].sum() > 0


def test_tree_structure():
    t = parse_tree("3,2,1", 4)
    assert t.size == 1 + 3 + 6 + 6 and t.max_depth == 3
    assert (t.parent[1:4] == 0).all() and t.mask[t.size - 1].sum() == 4  # a leaf sees 3 ancestors
    assert parse_tree(None, 3).is_chain and parse_tree(None, 3).size == 3
    with pytest.raises(ValueError, match="widths"):
        parse_tree("3,2", 4)
    assert (build_tree((2,)).path == np.asarray([[0, 0], [0, 1], [0, 2]])).all()


def test_sparse_tree_structure():
    t = parse_tree("0;1;0.0;1.0;0.0.0", 4)
    assert t.size == 6 and t.widths == (2, 1, 1) and not t.is_chain
    assert t.parent.tolist() == [-1, 0, 0, 1, 2, 3] and t.rank.tolist() == [0, 0, 1, 0, 0, 0]
    assert t.path[5].tolist() == [0, 1, 3, 5] and t.mask[5].sum() == 4
    assert parse_tree("0;0.0", 4).is_chain and parse_tree("0;0.0", 4).n_heads == 3
    assert build_tree((3, 2, 1)).nodes == parse_tree(";".join(".".join(map(str, n)) for n in
                                                              build_tree((3, 2, 1)).nodes), 4).nodes
    with pytest.raises(ValueError, match="no parent 1"):
        parse_tree("0;1.0", 4)
    with pytest.raises(ValueError, match="3 deep"):
        parse_tree("0;0.0;0.0.0", 3)
    with pytest.raises(ValueError, match="rank paths"):
        parse_tree("0;a.b", 4)


def test_calibrated_node_selection():
    """The most often accepted rank paths win, the tree stays prefix-closed, and its expected
    tokens per forward is 1 + the summed node frequencies."""
    import collections

    from mtp.decode.calibrate import expected_tokens, parse_auto, select_nodes

    counts = collections.Counter({(0,): 50, (1,): 20, (2,): 5, (0, 0): 30, (0, 3): 25, (1, 0): 19,
                                  (0, 0, 0): 28, (5, 0): 40})  # (5, 0) without (5,): never chosen
    nodes = select_nodes(counts, 5)
    assert nodes == ((0,), (0, 0), (0, 0, 0), (0, 3))
    assert expected_tokens(counts, 100, nodes) == pytest.approx(1 + (50 + 30 + 28 + 25) / 100)
    assert select_nodes(collections.Counter(), 8) == ((0,),)
    assert parse_auto("auto") == 16 and parse_auto("auto:7") == 7 and parse_auto("3,2,1") is None
    with pytest.raises(ValueError, match="auto:N"):
        parse_auto("auto:x")


def test_filtered_probs_top_k_top_p():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    p = filtered_probs(logits, DecodeConfig("sample", top_k=2))
    np.testing.assert_allclose(p[0], [0.625, 0.375, 0, 0], atol=1e-6)
    p = filtered_probs(logits, DecodeConfig("sample", top_p=0.7))  # smallest set with mass >= 0.7
    np.testing.assert_allclose(p[0], [0.625, 0.375, 0, 0], atol=1e-6)
    p = filtered_probs(logits, DecodeConfig("sample", temperature=0.5))
    np.testing.assert_allclose(p[0], np.asarray([0.25, 0.09, 0.0225, 0.0025]) / 0.365, atol=1e-6)


def test_bad_requests_are_rejected(model):
    with pytest.raises(ValueError, match="heads must be in 2..4"):
        generate(model, [[5]], DecodeConfig("speculative", 5))
    with pytest.raises(ValueError, match=r"\[0, 97\)"):
        generate(model, [[500]], DecodeConfig("greedy"))
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, [[5] * 10], DecodeConfig("greedy", max_new_tokens=60))
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[]], DecodeConfig("greedy"))


def exact_two_token_probs(model, prompt, dc):
    """p(x1, x2 | prompt) under plain sampling with ``dc``'s filtering, from full forwards."""
    V = model.spec.vocab_size
    p1 = np.asarray(filtered_probs(model(jnp.asarray([prompt]))[0, 0, -1], dc))
    seqs = jnp.asarray([prompt + [v] for v in range(V)])
    p2 = np.asarray(filtered_probs(model(seqs)[0, :, -1], dc))
    return p1[:, None] * p2


@pytest.mark.parametrize("mode,constant", [("sample", False), ("speculative_sample", False),
                                           ("speculative_sample", True)])
def test_sampling_is_exact(mode, constant):
    """Chi-square: 6000 two-token samples against the exact plain-sampling distribution. The
    constant-input variant makes drafts right ~half the time, so the accept/residual rule carries
    most of the samples."""
    model = heads_like_head1(tiny_model(seed=2, vocab_size=8, n_future=3, init_std=0.5,
                                        tie_embeddings=not constant), noise=0.3)
    if constant:
        model = constant_input_model(model, same_heads=True)
    prompt = [3, 1, 4]
    dc = DecodeConfig(mode, 1 if mode == "sample" else 3, max_new_tokens=2, temperature=1.0)
    n = 6000
    res = generate(model, np.asarray([prompt] * n, np.int32), dc, seed=17)
    if mode == "speculative_sample":
        assert res.accepted[:, 1].sum() > (n // 5 if constant else n // 100)  # the accept path is exercised
    joint = exact_two_token_probs(model, prompt, dc).ravel()
    counts = np.bincount([a * 8 + b for a, b in res.tokens], minlength=64)
    keep = joint * n >= 5
    observed = np.append(counts[keep], counts[~keep].sum())
    expected = np.append(joint[keep] * n, joint[~keep].sum() * n)
    expected = expected.astype(np.float64) * observed.sum() / expected.astype(np.float64).sum()
    _, pvalue = stats.chisquare(observed.astype(np.float64), expected)
    assert pvalue > 1e-3, (pvalue, observed, expected)


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_decode_layouts_match_the_model(layout):
    """Both decode weight layouts (``[out, in]`` for large models, ``[in, out]`` for small) give the
    model's own logits, LoRA adapters merged; the cached conversion follows a layout change."""
    from mtp.config import DecodeSettings
    from mtp.decode.weights import cached_decode_weights, weights_out_in

    settings = DecodeSettings(layout=layout)
    model = heads_like_head1(tiny_model(seed=2, n_future=3, lora_rank=4), noise=0.5)
    pure = nnx.to_pure_dict(nnx.state(model))
    pure = jax.tree_util.tree_map_with_path(  # nonzero LoRA B factors, so the merge matters
        lambda p, a: a + 0.05 if "lora_b" in jax.tree_util.keystr(p) else a, pure)
    model = with_params(model, pure)
    assert weights_out_in(model.spec, settings) == (layout == "out_in")
    weights = cached_decode_weights(model, settings)
    assert weights["trunk"][0]["wgu"].shape[0] == (2 * model.spec.resolved_d_ff if layout == "out_in"
                                                  else model.spec.d_model)
    seq = prompts_of(23, 1, lo=9, hi=10)[0]
    T = len(seq)
    hidden, _ = forward_cached(model, init_cache(model.spec, 1, 32, 3), jnp.asarray([seq]), jnp.zeros(1, jnp.int32),
                               np.arange(T), np.tril(np.ones((T, T), bool)), 3, weights)
    np.testing.assert_allclose(model.project(hidden), model(jnp.asarray([seq])), atol=1e-4, rtol=1e-4)
