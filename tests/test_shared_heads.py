"""Shared repeated heads (``head_type='shared_causal'``, FastMTP / Megatron's repeated MTP layer):
one MTP layer, projection and norms for every depth >= 2; decoding drafts deeper than the depth
trained, exactly; a next-token model's checkpoint initializes them with only the new parts training."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import argmax_zero_model, random_tokens, tiny_model, with_params

from mtp.decode.generate import DecodeConfig, generate
from mtp.model.lm import MTPLM, abstract_params
from mtp.train.init_from import trainable_masks

TRAINED = 2  # n_future: the depth trained
DEEP = 5  # heads decoding uses: deeper than trained, with the same parameters


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=4, head_type="shared_causal", n_future=TRAINED, max_seq_len=128)


def deeper(model, n_future: int) -> MTPLM:
    """The same parameters under a spec that trains ``n_future`` depths (the stored shapes do not change)."""
    spec = dataclasses.replace(model.spec, n_future=n_future)
    out = MTPLM(spec, rngs=nnx.Rngs(0))
    return with_params(out, nnx.to_pure_dict(nnx.state(model)))


def test_one_stored_mtp_layer_serves_every_depth(model):
    assert jax.tree.leaves(nnx.state(model.heads))[0].shape[0] == 2  # head 1 + the shared layer
    assert model.causal_proj.shape[0] == 1
    n_params = sum(int(np.size(x)) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n_params == model.spec.param_count()
    deep = deeper(model, DEEP)
    assert deep.spec.param_count() == model.spec.param_count()
    tokens = random_tokens(0, (2, 12))
    a, b = np.asarray(model(tokens)), np.asarray(deep(tokens))
    np.testing.assert_allclose(b[:TRAINED], a, atol=1e-5)  # the trained depths do not depend on n_future
    # depth 3 = the shared layer applied to depth 2's output and the next token: not a copy of depth 2
    assert np.abs(b[2] - b[1]).max() > 1e-3


def test_speculative_greedy_deeper_than_trained_equals_greedy(model):
    prompts = [[1, 5, 7, 9, 11], [3, 4], [8, 8, 8, 2, 2, 2, 9, 10, 11]]
    plain = generate(model, prompts, DecodeConfig(mode="speculative", heads=2, max_new_tokens=20))
    greedy = generate(model, prompts, DecodeConfig(mode="greedy", max_new_tokens=20))
    deep = generate(model, prompts, DecodeConfig(mode="speculative", heads=DEEP, max_new_tokens=20))
    assert deep.tokens == greedy.tokens == plain.tokens
    with pytest.raises(ValueError, match="2..16"):
        generate(model, prompts, DecodeConfig(mode="speculative", heads=17, max_new_tokens=4))


def test_always_right_drafts_are_all_accepted_at_every_depth(model):
    out = generate(argmax_zero_model(model), [[5, 6, 7]],
                   DecodeConfig(mode="speculative", heads=DEEP, max_new_tokens=1 + 2 * DEEP))
    assert out.tokens[0] == [0] * (1 + 2 * DEEP)
    assert out.forwards == 1 + 2 and out.accepted[0].tolist() == [2] * DEEP  # DEEP tokens a forward


def test_from_a_next_token_model_only_the_new_parts_train(model):
    _, abstract = abstract_params(model.spec)
    trainable, scale = trainable_masks(abstract, "new_heads", n_source_heads=1, n_future=TRAINED)
    flat_t = {jax.tree_util.keystr(p): t for p, t in jax.tree_util.tree_leaves_with_path(trainable)}
    flat_s = {jax.tree_util.keystr(p): np.asarray(s) for p, s in jax.tree_util.tree_leaves_with_path(scale)}
    for key in flat_t:
        if key.startswith(("['causal_proj']", "['causal_h_norm']", "['causal_e_norm']")):
            assert flat_t[key] and (flat_s[key] == 1).all(), key  # the combine trains
        elif key.startswith("['heads']"):
            assert flat_t[key] and flat_s[key].ravel()[:2].tolist() in ([0, 1], [0.0, 1.0]), key
        else:
            assert not flat_t[key], key  # trunk, embeddings, final norm frozen
