"""Sequential (``head_type='causal'``, DeepSeek-V3-style) heads: no look-ahead in training, drafts
that match a full forward over the drafted continuation, and exact speculative decoding."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import argmax_zero_model, random_tokens, tiny_config, tiny_model

from mtp.config import ConfigError, validate
from mtp.decode.cache import causal_drafts, forward_cached
from mtp.decode.generate import DecodeConfig, generate
from mtp.model.cached import init_cache

K = 4  # heads


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=3, head_type="causal", n_future=K, max_seq_len=128)


def test_head_k_sees_tokens_up_to_t_plus_k_minus_1_only(model):
    logits_fn = _jitted(model)[0]
    tokens = random_tokens(0, (2, 14))
    changed = tokens.at[:, 9].set((tokens[:, 9] + 1) % 97)
    a, b = np.asarray(logits_fn(tokens)), np.asarray(logits_fn(changed))
    for k in range(1, K + 1):  # head k at t predicts t+k from tokens <= t+k-1
        moved = np.abs(a[k - 1] - b[k - 1]).max(-1).max(0) > 1e-6
        assert not moved[: 9 - (k - 1)].any() and moved[9 - (k - 1)], (k, moved)


def _jitted(model):
    graphdef, state = nnx.split(model)

    @jax.jit
    def logits(state, tokens):
        return nnx.merge(graphdef, state)(tokens)

    @functools.partial(jax.jit, static_argnames="n")
    def forward(state, cache, block, length, n):
        return forward_cached(nnx.merge(graphdef, state), cache, block, length, np.arange(n),
                              np.tril(np.ones((n, n), bool)), 1)

    @functools.partial(jax.jit, static_argnames="window")
    def drafts(state, cache, seq, length, window):
        return causal_drafts(nnx.merge(graphdef, state), cache, seq, length, K, window)

    return (functools.partial(logits, state), functools.partial(forward, state),
            functools.partial(drafts, state))


def _reference_drafts(logits_fn, seq, n_heads, width=64):
    """Draft k = argmax of head k at the last known position of a full forward over the
    sequence extended by the drafts so far (teacher forcing on the drafted continuation)."""
    seq, last, drafts = list(seq), len(seq) - 2, []
    for k in range(2, n_heads + 1):
        logits = logits_fn(jnp.asarray([seq + [0] * (width - len(seq))]))  # the padding is never read
        d = int(jnp.argmax(logits[k - 1, 0, last]))
        drafts.append(d)
        seq.append(d)
    return drafts


def test_windowed_drafts_equal_a_full_forward_over_the_drafted_continuation(model):
    logits_fn, forward, drafts_fn = _jitted(model)
    rng = np.random.default_rng(0)
    text = rng.integers(0, 97, size=40).tolist()
    P, S = 9, 64
    cache = init_cache(model.spec, 1, S, K)
    _, cache = forward(cache, jnp.asarray([text[:P]]), jnp.zeros(1, jnp.int32), P)
    seq = jnp.zeros((1, S), jnp.int32).at[0, : P + 1].set(jnp.asarray(text[: P + 1]))
    drafts, cache = drafts_fn(cache, seq, jnp.asarray([P]), P)
    assert drafts[0].tolist() == _reference_drafts(logits_fn, text[: P + 1], K)
    length = P
    for step, accepted in enumerate([0, 3, 1, 2, 3, 0]):  # tokens accepted per step, then one more
        n = accepted + 1
        _, cache = forward(cache, jnp.asarray([text[length: length + n]]), jnp.asarray([length]), n)
        length += n
        seq = seq.at[0, : length + 1].set(jnp.asarray(text[: length + 1]))
        drafts, cache = drafts_fn(cache, seq, jnp.asarray([length]), 2 * K - 1)
        assert drafts[0].tolist() == _reference_drafts(logits_fn, text[: length + 1], K), step


@pytest.mark.parametrize("heads", [2, K])
def test_speculative_greedy_equals_greedy(model, heads):
    prompts = [[1, 5, 7, 9, 11], [3, 4], [8, 8, 8, 2, 2, 2, 9, 10, 11]]
    plain = generate(model, prompts, DecodeConfig(mode="greedy", max_new_tokens=24))
    spec = generate(model, prompts, DecodeConfig(mode="speculative", heads=heads, max_new_tokens=24))
    assert spec.tokens == plain.tokens


def test_drafts_that_are_always_right_are_all_accepted(model):
    out = generate(argmax_zero_model(model), [[5, 6, 7]],
                   DecodeConfig(mode="speculative", heads=K, max_new_tokens=1 + 4 * K))
    assert out.tokens[0] == [0] * (1 + 4 * K)
    assert out.forwards == 1 + 4 and out.accepted[0].tolist() == [4] * K  # K tokens per forward


def test_trees_and_inputs_other_than_the_trunk_are_refused(model):
    with pytest.raises(ValueError, match="chain"):
        generate(model, [[1, 2]], DecodeConfig(mode="speculative", heads=3, tree=(2, 1), max_new_tokens=4))
    for extra, match in ((dict(n_future=1), "n_future >= 2"), (dict(branch_layer=1), "branch_layer=0")):
        cfg = tiny_config(head_type="causal", **{"n_future": 3, **extra})
        with pytest.raises(ConfigError, match=match):
            validate(cfg, n_devices=1)
