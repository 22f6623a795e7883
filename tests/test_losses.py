"""Losses: targets/masks on hand-made packed sequences, weights, 'vmap' == 'scan' (loss+grads),
gradient accumulation equals the full batch."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from helpers import random_tokens, tiny_model

from mtp.config import head_weights
from mtp.losses import compute_loss, head_targets, on_policy_mask, self_tokens


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


def _grads_with(model, tokens, seg, weights, active=None, train_unembed=True, chunk=4):
    """'scan' loss and gradients with the embedding and final norm frozen (stop_gradient, as the
    train step does for a frozen trunk)."""
    graphdef, params = nnx.split(model, nnx.Param)
    _, mask = head_targets(tokens, seg, model.spec.n_future)
    normalizer = mask.sum((1, 2)).astype(jnp.float32)

    def f(p):
        p = dict(p)
        for k in ("embed", "final_norm"):
            p[k] = jax.tree.map(jax.lax.stop_gradient, p[k])
        return compute_loss("scan", nnx.merge(graphdef, nnx.State(p)), tokens, seg, weights, normalizer, chunk,
                            "data", active, train_unembed)

    return jax.value_and_grad(f, has_aux=True)(params)


def test_self_targets_are_the_models_own_greedy_tokens():
    """targets='self': head i at t learns head 1's argmax at t+i-1. So head 1 agrees with its own
    targets everywhere, the other heads' targets are head 1's shifted argmax, and vmap == scan."""
    model = tiny_model(n_future=3)
    tokens = random_tokens(7, (2, 12))
    seg = jnp.array([[1] * 5 + [2] * 7, [1] * 10 + [0] * 2])
    weights = jnp.ones(3)
    _, mask = head_targets(tokens, seg, 3)
    norm = mask.sum((1, 2)).astype(jnp.float32)
    l_v, aux_v = compute_loss("vmap", model, tokens, seg, weights, norm, 4, "self")
    l_s, aux_s = compute_loss("scan", model, tokens, seg, weights, norm, 4, "self")
    np.testing.assert_allclose(l_v, l_s, rtol=1e-5)
    np.testing.assert_allclose(aux_v["sum_correct"], aux_s["sum_correct"])
    np.testing.assert_allclose(aux_s["sum_correct"][0], aux_s["count"][0])  # head 1 = its own teacher
    logits = model(tokens, seg)
    greedy = jnp.argmax(logits[0], -1)
    for i in range(1, 3):  # head i+1's hits against greedy[t+i] by hand
        hits = (jnp.argmax(logits[i, :, :-i], -1) == greedy[:, i:]) & mask[i, :, :-i]
        np.testing.assert_allclose(aux_s["sum_correct"][i], hits.sum())
    l_d, _ = compute_loss("scan", model, tokens, seg, weights, norm, 4)
    assert abs(float(l_d) - float(l_s)) > 1e-3  # the targets really changed


def test_on_policy_mask_by_hand():
    """Head i at t counts only when tokens t+1 .. t+i-1 are the model's own (own[s] == tokens[s])."""
    tokens = jnp.array([[5, 1, 2, 3, 4, 6]])
    own = jnp.array([[5, 1, 9, 3, 4, 6]])  # the model would not have written token 2
    mask = np.asarray(on_policy_mask(tokens, own, 3))
    assert mask[0].all()
    np.testing.assert_array_equal(mask[1, 0], [1, 0, 1, 1, 1, 0])  # t+1 == 2 disagrees; past the end
    np.testing.assert_array_equal(mask[2, 0], [0, 0, 1, 1, 0, 0])


def test_on_policy_self_targets_count_only_the_models_own_prefixes():
    """targets='self_onpolicy': the 'self' targets, masked to positions whose intermediate corpus
    tokens the model would have written itself (built here by writing its greedy token in)."""
    model = tiny_model(n_future=3)
    tokens = np.array(random_tokens(9, (1, 12)))
    for t in (1, 2, 3, 6, 7):  # make token t+1 the model's own choice after tokens[:t+1]
        tokens[0, t + 1] = int(jnp.argmax(model(jnp.asarray(tokens), jnp.ones((1, 12), jnp.int32))[0, 0, t]))
    tokens = jnp.asarray(tokens)
    seg = jnp.ones_like(tokens)
    _, mask = head_targets(tokens, seg, 3)
    norm = mask.sum((1, 2)).astype(jnp.float32)
    _, aux = compute_loss("scan", model, tokens, seg, jnp.ones(3), norm, 4, "self_onpolicy")
    own = self_tokens(tokens, jnp.argmax(model(tokens, seg)[0], -1))
    want = (mask & on_policy_mask(tokens, own, 3)).sum((1, 2))
    np.testing.assert_array_equal(aux["count"], want)
    assert 0 < int(want[2]) < int(want[1]) < int(want[0])  # some prefixes are the model's, not all


def test_sequential_heads_skip_the_zero_weight_heads_cross_entropy():
    """Sequential heads: head 1 still runs (head 2 reads it) but its loss is not computed when its
    weight is 0; the loss and every head's gradient are unchanged."""
    model = tiny_model(n_future=3, head_type="shared_causal")
    tokens = random_tokens(9, (2, 16))
    seg = jnp.ones_like(tokens)
    weights = jnp.array([0.0, 1.0, 0.5])
    (l_full, aux_full), g_full = _grads_with(model, tokens, seg, weights)
    (l_fast, aux_fast), g_fast = _grads_with(model, tokens, seg, weights, active=(1, 2))
    np.testing.assert_allclose(l_full, l_fast, rtol=1e-6)
    np.testing.assert_allclose(aux_full["sum_ce"][1:], aux_fast["sum_ce"][1:], rtol=1e-6)
    assert float(aux_fast["count"][0]) == 0.0 < float(aux_full["count"][0])
    for a, b in zip(jax.tree.leaves(g_full), jax.tree.leaves(g_fast)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_skipping_zero_weight_heads_and_the_frozen_unembedding_keeps_the_gradients():
    """Training a frozen model's new heads: running only the heads with nonzero weight and not
    computing the (frozen) unembedding's gradient give the same loss and head gradients."""
    model = tiny_model(n_future=4)
    tokens = random_tokens(8, (2, 16))
    seg = jnp.ones_like(tokens)
    weights = jnp.array([0.0, 1.0, 0.5, 0.25])
    (l_full, aux_full), g_full = _grads_with(model, tokens, seg, weights)
    (l_fast, aux_fast), g_fast = _grads_with(model, tokens, seg, weights, active=(1, 2, 3), train_unembed=False)
    np.testing.assert_allclose(l_full, l_fast, rtol=1e-6)
    np.testing.assert_allclose(aux_full["sum_ce"][1:], aux_fast["sum_ce"][1:], rtol=1e-6)
    assert float(aux_fast["count"][0]) == 0.0  # the skipped head reports nothing
    for a, b in zip(jax.tree.leaves(g_full["heads"]), jax.tree.leaves(g_fast["heads"])):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)
    assert max(float(jnp.abs(a[1:]).max()) for a in jax.tree.leaves(g_fast["heads"])) > 1e-3
    assert all(float(jnp.abs(a[0]).max()) == 0.0 for a in jax.tree.leaves(g_fast["heads"]))


@pytest.mark.parametrize("head_type", ["transformer", "shared_causal"])
def test_draft_vocab_loss_is_the_cross_entropy_over_those_tokens(head_type):
    """loss.draft_vocab: heads 2..n's cross-entropy over the given token ids only (logits restricted
    to them, targets outside masked), the same as restricting the full logits by hand."""
    model = tiny_model(n_future=3, head_type=head_type)
    tokens = random_tokens(11, (2, 16), vocab=30)  # ids < 30: some targets inside the draft vocabulary
    seg = jnp.ones_like(tokens)
    ids = np.sort(np.random.default_rng(0).choice(97, 40, replace=False)).astype(np.int32)
    weights = jnp.array([0.0, 1.0, 0.5])
    targets, mask = head_targets(tokens, seg, 3)
    normalizer = mask.sum((1, 2)).astype(jnp.float32)
    loss, aux = compute_loss("scan", model, tokens, seg, weights, normalizer, 4, "data", (1, 2), True, ids)
    logits = model(tokens, seg)[:, :, :, ids].astype(jnp.float32)
    inside = np.isin(np.asarray(targets), ids) & np.asarray(mask)
    sub = np.searchsorted(ids, np.clip(np.asarray(targets), 0, None))
    sub = np.where(inside, sub, 0)
    ce = jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, jnp.asarray(sub)[..., None], -1)[..., 0]
    want = (np.asarray(ce) * inside).sum((1, 2))
    np.testing.assert_allclose(np.asarray(aux["sum_ce"])[1:], want[1:], rtol=2e-5)
    np.testing.assert_array_equal(np.asarray(aux["count"])[1:], inside.sum((1, 2))[1:])
    assert 0 < inside[1].sum() < np.asarray(mask[1]).sum()  # some targets inside, some masked
    np.testing.assert_allclose(float(loss), float((weights[1:] * want[1:] / normalizer[1:]).sum()), rtol=2e-5)
    with pytest.raises(ValueError, match="head 1's loss weight must be 0"):
        compute_loss("scan", model, tokens, seg, weights, normalizer, 4, "data", None, True, ids)
