"""Retrofitting heads (Mehra et al. 2025): branch layers, weighted hidden states, Medusa heads,
LoRA joint fine-tuning (train.trainable='lora'), loading sources that predate these parameters."""

from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from helpers import random_tokens, tiny_config, tiny_model, with_params

from mtp.config import ConfigError, validate
from mtp.losses import compute_loss, head_targets
from mtp.train import init_from
from mtp.train.optim import make_optimizer
from mtp.train.state import fresh_params


def pure(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model))


def overlay(dst: dict, src: dict) -> dict:
    """``dst`` with every entry ``src`` has replaced by ``src``'s (nested dicts)."""
    out = dict(dst)
    for k, v in src.items():
        out[k] = overlay(dst[k], v) if isinstance(v, dict) else v
    return out


@pytest.fixture(scope="module")
def base():
    return tiny_model(n_layers=3)


@pytest.fixture(scope="module")
def tokens():
    return random_tokens(0, (2, 8))


def test_lora_starts_as_an_exact_no_op(base, tokens):
    lora = tiny_model(n_layers=3, lora_rank=4)
    lora = with_params(lora, overlay(pure(lora), pure(base)))
    assert lora.trunk.attn.wq_lora_a.shape == (3, 32, 4) and lora.trunk.mlp.w_down_lora_b.shape == (3, 4, 32)
    ref = base(tokens)
    np.testing.assert_array_equal(lora(tokens), ref)  # bitwise
    p = pure(lora)
    p["trunk"]["attn"]["wq_lora_b"] = 0.1 * jnp.ones_like(p["trunk"]["attn"]["wq_lora_b"])
    changed = with_params(lora, p)(tokens)
    assert float(jnp.abs(changed - ref).max()) > 1e-3


@pytest.mark.parametrize("layer", [1, 2])
def test_one_hot_hidden_mix_equals_branching_at_that_layer(base, tokens, layer):
    branch = with_params(tiny_model(n_layers=3, branch_layer=layer), pure(base))
    mix = tiny_model(n_layers=3, hidden_mix="weighted")
    p = overlay(pure(mix), pure(base))
    p["mix_logits"] = jnp.full((3, 4), -1e9).at[:, layer].set(0.0)  # state `layer` = after trunk layer `layer`
    np.testing.assert_array_equal(with_params(mix, p)(tokens), branch(tokens))  # every head, bitwise


def test_branch_layer_changes_heads_2_to_n_but_not_head_1(base, tokens):
    branch = with_params(tiny_model(n_layers=3, branch_layer=1), pure(base))
    ref, out = base(tokens), branch(tokens)
    np.testing.assert_array_equal(out[0], ref[0])
    for i in (1, 2):
        assert float(jnp.abs(out[i] - ref[i]).max()) > 1e-2, i


def test_hidden_mix_starts_mostly_on_the_final_state():
    model = tiny_model(n_layers=3, hidden_mix="weighted")
    w = jax.nn.softmax(model.mix_logits[...], axis=-1)
    np.testing.assert_allclose(w[:, -1], 0.9, rtol=1e-5)
    np.testing.assert_allclose(w[:, :-1], 0.1 / 3, rtol=1e-5)


def test_medusa_heads_start_as_the_identity(tokens):
    model = tiny_model(head_type="medusa")
    h, pos, mask = model.trunk_hidden(tokens)
    out = model.head_hidden(h, pos, mask)
    np.testing.assert_array_equal(out, jnp.broadcast_to(h, out.shape))
    logits = model(tokens)
    np.testing.assert_array_equal(logits[2], logits[0])
    # ... yet W gets a gradient (silu'(0) = 1/2), so the heads do learn
    graphdef, params = nnx.split(model, nnx.Param)
    seg = jnp.ones_like(tokens)
    _, m = head_targets(tokens, seg, 3)
    grads = jax.jit(jax.grad(lambda p: compute_loss("scan", nnx.merge(graphdef, p), tokens, seg, jnp.ones(3),
                                            m.sum((1, 2)).astype(jnp.float32), 4)[0]))(params)
    assert float(jnp.abs(grads["heads"]["w"][...][1:]).max()) > 1e-4


def _train(model, trainable, n_source_heads, steps=2, backbone_scale=1.0):
    graphdef, params = nnx.split(model, nnx.Param)
    train, scale = init_from.trainable_masks(params, trainable, n_source_heads, model.spec.n_future,
                                             backbone_scale)
    optim = ml_collections.ConfigDict(dict(lr=1e-2, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.1,
                                           b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0))
    tx = make_optimizer(optim, 10, train, scale)
    opt_state = tx.init(params)
    tokens = random_tokens(1, (2, 12))
    seg = jnp.ones_like(tokens)
    _, m = head_targets(tokens, seg, model.spec.n_future)

    def loss(p):
        return compute_loss("scan", nnx.merge(graphdef, p), tokens, seg, jnp.ones(3),
                            m.sum((1, 2)).astype(jnp.float32), 4)[0]

    @jax.jit
    def step(p, opt_state):
        updates, opt_state = tx.update(jax.grad(loss)(p), opt_state, p)
        return jax.tree.map(lambda a, u: a + u, p, updates), opt_state

    new = params
    for _ in range(steps):
        new, opt_state = step(new, opt_state)
    return nnx.to_pure_dict(params), nnx.to_pure_dict(new)


def test_backbone_lr_scale_scales_only_the_backbone_updates():
    model = tiny_model()
    before, full = _train(model, "all", n_source_heads=0, steps=1)
    _, slow = _train(tiny_model(), "all", n_source_heads=0, steps=1, backbone_scale=0.1)
    delta = lambda a, b: np.asarray(b, np.float64) - np.asarray(a, np.float64)
    wq0 = before["trunk"]["attn"]["wq"]
    np.testing.assert_allclose(delta(wq0, slow["trunk"]["attn"]["wq"]), 0.1 * delta(wq0, full["trunk"]["attn"]["wq"]),
                               rtol=1e-3, atol=1e-7)
    assert np.abs(delta(wq0, full["trunk"]["attn"]["wq"])).max() > 1e-4
    np.testing.assert_allclose(slow["heads"]["attn"]["wq"], full["heads"]["attn"]["wq"], rtol=1e-6, atol=1e-7)


def test_trainable_lora_freezes_the_base_weights():
    model = tiny_model(lora_rank=2, hidden_mix="weighted")
    before, after = _train(model, "lora", n_source_heads=2)
    same = lambda a, b: np.array_equal(np.asarray(a), np.asarray(b))
    for name in ("wq", "wk", "wv", "wo"):
        assert same(before["trunk"]["attn"][name], after["trunk"]["attn"][name]), name
        assert not same(before["trunk"]["attn"][f"{name}_lora_b"], after["trunk"]["attn"][f"{name}_lora_b"])
    for name in ("w_gate", "w_up", "w_down"):
        assert same(before["trunk"]["mlp"][name], after["trunk"]["mlp"][name]), name
        assert not same(before["trunk"]["mlp"][f"{name}_lora_b"], after["trunk"]["mlp"][f"{name}_lora_b"])
    assert same(before["embed"], after["embed"]) and same(before["final_norm"]["scale"], after["final_norm"]["scale"])
    assert same(before["trunk"]["attn_norm"]["scale"], after["trunk"]["attn_norm"]["scale"])
    # source heads 1-2: base frozen, LoRA trains; new head 3 trains in full; the mix trains
    wq0, wq1 = before["heads"]["attn"]["wq"], after["heads"]["attn"]["wq"]
    assert same(wq0[:2], wq1[:2]) and not same(wq0[2], wq1[2])
    assert not same(before["heads"]["attn"]["wq_lora_b"][0], after["heads"]["attn"]["wq_lora_b"][0])
    assert not same(before["mix_logits"][2], after["mix_logits"][2])
    assert same(before["mix_logits"][0], after["mix_logits"][0])  # head 1 ignores the mix; no weight decay


def test_init_from_a_source_without_lora_or_mix_and_folding_lora_back(monkeypatch, tokens):
    def flat_of(model):
        return {jax.tree_util.keystr(p): np.asarray(x) for p, x in
                jax.tree_util.tree_leaves_with_path({"params": nnx.state(model, nnx.Param)})}

    src = tiny_model(n_future=2)
    monkeypatch.setattr(init_from, "restore_flat", lambda path: (flat_of(src), 7))
    target = tiny_model(seed=1, lora_rank=2, hidden_mix="weighted")
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: target), nnx.Param)
    loaded = init_from.init_params(Path("src"), abstract, "copy_last")
    fresh = nnx.state(target, nnx.Param)
    wanted = init_from.needs_fresh(loaded)
    drawn = fresh_params(target.spec, 1, wanted)  # only the missing leaves' random draws
    assert len(drawn) == sum(wanted) > 0
    for got, want in zip(drawn, [x for x, w in zip(jax.tree.leaves(fresh), wanted) if w]):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)  # a full init draws them (to an ulp)
    params = init_from.merge_fresh(loaded, drawn)
    np.testing.assert_array_equal(params["mix_logits"][...], fresh["mix_logits"][...])
    np.testing.assert_allclose(params["trunk"]["attn"]["wq_lora_a"][...], fresh["trunk"]["attn"]["wq_lora_a"][...],
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(params["trunk"]["attn"]["wq"][...], src.trunk.attn.wq[...])
    np.testing.assert_array_equal(params["heads"]["attn"]["wq"][...][2], src.heads.attn.wq[...][1])  # copy_last

    # a LoRA-trained source into a model without LoRA: the adapters are folded into the base weights
    lora_src = tiny_model(n_future=2, lora_rank=2, lora_alpha=8.0)
    p = pure(lora_src)
    for mod, names in (("attn", ("wq", "wk", "wv", "wo")), ("mlp", ("w_gate", "w_up", "w_down"))):
        for n in names:
            b = p["trunk"][mod][f"{n}_lora_b"]
            p["trunk"][mod][f"{n}_lora_b"] = 0.05 * jax.random.normal(jax.random.key(len(n)), b.shape)
    lora_src = with_params(lora_src, p)
    monkeypatch.setattr(init_from, "restore_flat", lambda path: (flat_of(lora_src), 7))
    monkeypatch.setattr(init_from, "load_config_json",
                        lambda path: ml_collections.ConfigDict({"model": {"lora_alpha": 8.0}}))
    plain = tiny_model(n_future=2)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: plain), nnx.Param)
    folded = nnx.merge(graphdef, init_from.init_params(Path("src"), abstract, "copy_last"))
    ref = lora_src(tokens)
    assert float(jnp.abs(ref - tiny_model(n_future=2)(tokens)).max()) > 1e-2
    np.testing.assert_allclose(folded(tokens), ref, atol=1e-4, rtol=1e-4)


def test_every_new_parameter_has_logical_axes_and_is_counted():
    model = tiny_model(lora_rank=2, hidden_mix="weighted")
    state = nnx.state(model, nnx.Param)
    assert sum(x.size for x in jax.tree.leaves(state)) == model.spec.param_count()
    for path, v in jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        axes = v.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == v.ndim, (path, axes, v.shape)
    assert state["mix_logits"].get_metadata()["out_sharding"] == ("mtp_heads", None)
    medusa_model = tiny_model(head_type="medusa")
    medusa = nnx.state(medusa_model, nnx.Param)
    assert sum(x.size for x in jax.tree.leaves(medusa)) == medusa_model.spec.param_count()
    assert medusa["heads"]["b"].get_metadata()["out_sharding"] == ("mtp_heads", "embed_out")


@pytest.mark.parametrize("overrides, message", [
    (dict(branch_layer=2), r"model.branch_layer=2 is invalid: use 0 .* 1..1"),
    (dict(branch_layer=1, hidden_mix="weighted"), r"model.branch_layer=1 is invalid: model.hidden_mix='weighted'"),
    (dict(hidden_mix="learned"), r"model.hidden_mix='learned' is invalid: use one of \('none', 'weighted'\)"),
    (dict(n_future=1, hidden_mix="weighted"), r"model.n_future=1 is invalid"),
    (dict(lora_rank=-1), r"model.lora_rank=-1 is invalid"),
    (dict(lora_rank=4, lora_alpha=0.0), r"model.lora_alpha=0.0 is invalid"),
    (dict(head_type="resblock"), r"model.head_type='resblock' is invalid: .*'medusa'"),
    (dict(trainable="lora"), r"train.trainable='lora' is invalid: 'lora' trains LoRA adapters"),
    (dict(backbone_lr_scale=0.0), r"optim.backbone_lr_scale=0.0 is invalid"),
    (dict(backbone_lr_scale=0.1, trainable="heads"), r"optim.backbone_lr_scale=0.1 is invalid: .*'heads'"),
])
def test_config_validation(overrides, message):
    trainable = overrides.pop("trainable", None)
    bb = overrides.pop("backbone_lr_scale", None)
    cfg = tiny_config(**overrides)
    if trainable:
        cfg.train.trainable = trainable
    if bb is not None:
        cfg.optim.backbone_lr_scale = bb
    with pytest.raises(ConfigError, match=message):
        validate(cfg, 1)


def test_valid_retrofit_configs_pass():
    for overrides in (dict(branch_layer=1), dict(hidden_mix="weighted"), dict(head_type="medusa"),
                      dict(lora_rank=8)):
        cfg = tiny_config(**overrides)
        cfg.train.trainable = "lora" if "lora_rank" in overrides else "all"
        validate(cfg, 1)
