"""Model: causality of every head, n_future=1 is a plain LM, packing positions/masks, axes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import random_tokens, tiny_model, tiny_spec

from mtp.model.transformer import attention_mask, positions_from_segments


@pytest.mark.parametrize("head_type, extra", [("transformer", {}), ("linear", {}),
                                               ("transformer", dict(branch_layer=1, lora_rank=2))])
def test_every_head_is_causal(head_type, extra):
    model = tiny_model(head_type=head_type, **extra)
    tokens = random_tokens(0, (2, 16))
    t = 9
    changed = tokens.at[:, t + 1:].set((tokens[:, t + 1:] + 13) % 97)
    logits, logits_changed = model(tokens), model(changed)
    assert logits.shape == (3, 2, 16, 97)
    np.testing.assert_allclose(logits[:, :, : t + 1], logits_changed[:, :, : t + 1], atol=1e-6)
    # ... and the change is visible after t, so the comparison above has teeth.
    assert float(jnp.max(jnp.abs(logits[:, :, t + 1:] - logits_changed[:, :, t + 1:]))) > 1e-3


def _plain_lm_logits(model, tokens):
    """A reference next-token LM written out layer by layer: embed, L+1 blocks, norm, unembed."""
    spec = model.spec
    x = model.embed[...][tokens]
    seg = jnp.ones_like(tokens)
    pos, mask = positions_from_segments(seg), attention_mask(seg)
    graphdef, trunk_state = nnx.split(model.trunk)
    for i in range(spec.trunk_layers):
        layer = nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], trunk_state))
        x = layer(x, pos, mask)
    hdef, head_state = nnx.split(model.heads)
    x = nnx.merge(hdef, jax.tree.map(lambda a: a[0], head_state))(x, pos, mask)
    return model.final_norm(x) @ model.embed[...].T


def test_n_future_1_is_a_plain_next_token_lm():
    model = tiny_model(n_future=1)
    tokens = random_tokens(1, (2, 12))
    logits = model(tokens)
    assert logits.shape == (1, 2, 12, 97)
    np.testing.assert_allclose(logits[0], _plain_lm_logits(model, tokens), atol=1e-5)


def test_untied_embeddings_have_their_own_unembedding():
    model = tiny_model(tie_embeddings=False)
    assert model.unembed.shape == (32, 97)
    assert not np.allclose(model.unembed_DxV(), model.embed[...].T)


def test_parameter_matched_removes_n_future_minus_1_trunk_layers():
    spec = tiny_spec(n_layers=5, n_future=4, parameter_matched=True)
    assert spec.trunk_layers == 2
    model = tiny_model(n_layers=5, n_future=4, parameter_matched=True)
    assert model.trunk.attn.wq.shape[0] == 2 and model.heads.attn.wq.shape[0] == 4
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n_params == spec.param_count()


def test_packing_restarts_positions_and_blocks_cross_document_attention():
    seg = jnp.array([[1, 1, 1, 2, 2, 3, 0, 0]])
    np.testing.assert_array_equal(positions_from_segments(seg)[0], [0, 1, 2, 0, 1, 0, 0, 1])
    mask = attention_mask(seg)[0, 0]
    assert bool(mask[4, 3]) and not bool(mask[3, 2]) and not bool(mask[2, 3])


def test_packed_document_matches_the_same_document_alone():
    model = tiny_model()
    doc = random_tokens(2, (1, 6))
    other = random_tokens(3, (1, 5))
    packed = jnp.concatenate([other, doc], axis=1)
    seg = jnp.array([[1] * 5 + [2] * 6])
    np.testing.assert_allclose(model(packed, seg)[:, :, 5:], model(doc), atol=1e-5)


def test_every_parameter_has_logical_axes():
    state = nnx.state(tiny_model(), nnx.Param)
    for path, v in jax.tree_util.tree_leaves_with_path(
            state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        axes = v.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == v.ndim, (path, axes, v.shape)
    assert state["heads"]["attn"]["wq"].get_metadata()["out_sharding"][0] == "mtp_heads"
    assert state["trunk"]["mlp"]["w_up"].get_metadata()["out_sharding"][0] == "layers"


def test_bfloat16_compute_keeps_float32_params():
    model = tiny_model(dtype="bfloat16")
    assert model.embed[...].dtype == jnp.float32
    logits = model(random_tokens(4, (1, 8)))
    assert logits.dtype == jnp.bfloat16
    ref = tiny_model()(random_tokens(4, (1, 8)))
    np.testing.assert_allclose(np.asarray(logits, np.float32), ref, atol=0.1)
