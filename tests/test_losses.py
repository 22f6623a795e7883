"""Losses: targets/masks on hand-made packed sequences, weights, 'vmap' == 'scan' (loss+grads),
gradient accumulation equals the full batch."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from helpers import random_tokens, tiny_model

from mtp.losses import compute_loss, head_targets, head_weights


def test_targets_and_masks_on_a_packed_sequence():
    tokens = jnp.array([[10, 11, 12, 20, 21, 22, 23, 0]])
    seg = jnp.array([[1, 1, 1, 2, 2, 2, 2, 0]])
    targets, mask = head_targets(tokens, seg, 3)
    # head 1: t -> t+1 inside a document; the last token of doc 1 and of doc 2 have no target
    np.testing.assert_array_equal(targets[0, 0, :6], [11, 12, 20, 21, 22, 23])
    np.testing.assert_array_equal(mask[0, 0], [1, 1, 0, 1, 1, 1, 0, 0])
    # head 2: t -> t+2
    np.testing.assert_array_equal(mask[1, 0], [1, 0, 0, 1, 1, 0, 0, 0])
    assert int(targets[1, 0, 0]) == 12 and int(targets[1, 0, 3]) == 22
    # head 3: only doc 2's first token sees t+3 inside its document
    np.testing.assert_array_equal(mask[2, 0], [0, 0, 0, 1, 0, 0, 0, 0])
    assert int(targets[2, 0, 3]) == 23


def test_targets_past_the_end_are_masked():
    tokens = jnp.arange(6)[None]
    _, mask = head_targets(tokens, jnp.ones_like(tokens), 4)
    assert mask.sum(axis=(1, 2)).tolist() == [5, 4, 3, 2]


def _loss_cfg(**kw):
    c = ml_collections.ConfigDict(dict(weighting="uniform", geometric_r=0.5, head_weights=()))
    c.update(kw)
    return c


def test_head_weights():
    np.testing.assert_allclose(head_weights(_loss_cfg(), 3), [1, 1, 1])
    np.testing.assert_allclose(head_weights(_loss_cfg(weighting="geometric", geometric_r=0.5), 4),
                               [1, 0.5, 0.25, 0.125])
    np.testing.assert_allclose(head_weights(_loss_cfg(head_weights=(1.0, 0.2, 0.1)), 3), [1, 0.2, 0.1])
    with pytest.raises(ValueError, match="loss.head_weights has 2 entries"):
        head_weights(_loss_cfg(head_weights=(1.0, 0.5)), 3)


def _loss_and_grads(impl, model, tokens, seg, weights, chunk=4):
    graphdef, params = nnx.split(model, nnx.Param)
    _, mask = head_targets(tokens, seg, model.spec.n_future)
    normalizer = mask.sum((1, 2)).astype(jnp.float32)

    def f(p):
        return compute_loss(impl, nnx.merge(graphdef, p), tokens, seg, weights, normalizer, chunk)

    return jax.value_and_grad(f, has_aux=True)(params)


@pytest.mark.parametrize("head_type, chunk, extra", [
    ("transformer", 4, {}), ("transformer", 0, {}), ("linear", 4, {}),
    # heads 2..n read another input: per-head sources in the memory-flat loss
    ("transformer", 4, dict(branch_layer=1)), ("transformer", 4, dict(hidden_mix="weighted", lora_rank=2)),
    ("causal", 4, {}),  # sequential heads: the scan path runs them in order under plain autodiff
])
def test_vmap_and_scan_give_the_same_loss_and_gradients(head_type, chunk, extra):
    model = tiny_model(head_type=head_type, n_future=4, **extra)
    tokens = random_tokens(5, (2, 16))
    seg = jnp.array([[1] * 7 + [2] * 9, [1] * 13 + [0] * 3])
    weights = jnp.array([1.0, 0.5, 0.25, 0.125])
    (l_v, aux_v), g_v = _loss_and_grads("vmap", model, tokens, seg, weights)
    (l_s, aux_s), g_s = _loss_and_grads("scan", model, tokens, seg, weights, chunk)
    np.testing.assert_allclose(l_v, l_s, rtol=1e-5)
    for k in aux_v:
        np.testing.assert_allclose(aux_v[k], aux_s[k], rtol=1e-5)
    leaves_v, leaves_s = jax.tree.leaves(g_v), jax.tree.leaves(g_s)
    assert len(leaves_v) == len(leaves_s)
    for a, b in zip(leaves_v, leaves_s):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
    assert max(float(jnp.abs(a).max()) for a in leaves_v) > 1e-3  # gradients are not trivially 0


def test_per_head_loss_is_the_mean_cross_entropy():
    model = tiny_model()
    tokens = random_tokens(6, (2, 10))
    seg = jnp.ones_like(tokens)
    (loss, aux), _ = _loss_and_grads("scan", model, tokens, seg, jnp.ones(3))
    logits = model(tokens)
    for i in range(3):
        logp = jax.nn.log_softmax(logits[i, :, : 10 - (i + 1)], axis=-1)
        tgt = tokens[:, i + 1:]
        ce = -jnp.take_along_axis(logp, tgt[..., None], -1).mean()
        np.testing.assert_allclose(aux["sum_ce"][i] / aux["count"][i], ce, rtol=1e-5)
        acc = (jnp.argmax(logp, -1) == tgt).mean()
        np.testing.assert_allclose(aux["sum_correct"][i] / aux["count"][i], acc, atol=1e-6)
    np.testing.assert_allclose(loss, (aux["sum_ce"] / aux["count"]).sum(), rtol=1e-5)


def test_an_unknown_loss_impl_is_rejected():
    with pytest.raises(ValueError, match="loss.impl='fast' is unknown"):
        compute_loss("fast", tiny_model(), random_tokens(0, (1, 4)), jnp.ones((1, 4), jnp.int32),
                     jnp.ones(3), jnp.ones(3))
