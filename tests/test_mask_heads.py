"""Mask-token heads (``head_type='mask'``, "Your LLM Knows the Future"): gated LoRA leaves the
model's next-token logits bit for bit unchanged, masks see only what they may, training and decoding
compute the same mask outputs, speculative decoding with them is exact, and only the new parts train."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from helpers import argmax_zero_model, random_tokens, tiny_config, tiny_model, with_params

from mtp.config import ConfigError, validate
from mtp.convert.export import ExportError, read_model
from mtp.decode import mask_drafts
from mtp.decode.backend import XlaBackend, make_backend
from mtp.decode.generate import DecodeConfig, generate
from mtp.losses import compute_loss, loss_normalizer
from mtp.model import masked
from mtp.model.cached import init_cache
from mtp.model.lm import abstract_params
from mtp.model.spec import ModelSpec
from mtp.train import init_from
from mtp.train.optim import make_optimizer

N = 4  # n_future: head 1 + 3 masks


@nnx.jit
def logits(model, tokens, seg):
    return model(tokens, seg)


@functools.partial(nnx.jit, static_argnums=(3,))
def heads_at(model, tokens, seg, anchors: tuple):
    """Every head's output at ``anchors`` (``masked.mask_head_hidden``), jitted: eager is slow."""
    return masked.mask_head_hidden(model, tokens, seg, np.asarray(anchors))[0]


def randomized(model, seed=1, scale=0.3):
    """The model with every LoRA B factor and the sampler's output matrix random (both start at 0,
    where the masks would be an untrained no-op)."""
    pure = nnx.to_pure_dict(nnx.state(model))
    key = jax.random.key(seed)

    def rnd(path, x):
        name = jax.tree_util.keystr(path)
        if "_lora_b" in name or "sampler_out" in name:
            return scale * jax.random.normal(jax.random.fold_in(key, len(name) * 7 + x.size), x.shape)
        return x

    return with_params(model, jax.tree_util.tree_map_with_path(rnd, pure))


@pytest.fixture(scope="module")
def base():
    return tiny_model(seed=3, head_type="mask", n_future=N, lora_rank=4, max_seq_len=128)


@pytest.fixture(scope="module")
def model(base):
    return randomized(base)


def test_params_shapes_and_logical_axes(model):
    state = nnx.state(model, nnx.Param)
    assert sum(x.size for x in jax.tree.leaves(state)) == model.spec.param_count()
    assert jax.tree.leaves(nnx.state(model.heads))[0].shape[0] == 1  # head 1 only: the masks reuse the model
    assert model.mask_embed.shape == (N - 1, model.spec.d_model)
    for path, v in jax.tree_util.tree_leaves_with_path(state, is_leaf=lambda x: isinstance(x, nnx.Variable)):
        axes = v.get_metadata().get("out_sharding")
        assert axes is not None and len(axes) == v.ndim, (path, axes, v.shape)
    tokens = random_tokens(0, (2, 12))
    assert logits(model, tokens, jnp.ones_like(tokens)).shape == (N, 2, 12, model.spec.vocab_size)


def test_gated_lora_leaves_next_token_logits_bitwise_equal(base, model):
    tokens = random_tokens(1, (2, 16))
    seg = jnp.asarray(np.repeat([[1] * 9 + [2] * 7], 2, axis=0))
    a, b = np.asarray(logits(base, tokens, seg)), np.asarray(logits(model, tokens, seg))
    assert np.array_equal(a[0], b[0])  # head 1: the base model's, bit for bit
    assert np.abs(a[1:] - b[1:]).max() > 1e-3  # the masks: changed by the LoRA and the sampler


def test_masks_see_only_the_tokens_up_to_their_anchor(model):
    tokens = random_tokens(2, (1, 16))
    anchors, ones = (5, 11), jnp.ones_like(tokens)
    ref = heads_at(model, tokens, ones, anchors)
    # heads j+1 at anchor t read tokens <= t and (the sampler) x_{t+j}: past t + N - 1 nothing matters
    later = tokens.at[:, 5 + N:].set((tokens[:, 5 + N:] + 1) % 97)
    out = heads_at(model, later, ones, anchors)
    assert np.array_equal(np.asarray(out[:, :, 0]), np.asarray(ref[:, :, 0]))
    assert np.abs(np.asarray(out[:, :, 1] - ref[:, :, 1])).max() > 1e-4  # anchor 11 saw the change
    # a new document starting after the anchor hides everything before it
    seg = jnp.asarray([[1] * 8 + [2] * 8])
    other = tokens.at[:, :8].set((tokens[:, :8] + 3) % 97)
    a, b = heads_at(model, tokens, seg, anchors), heads_at(model, other, seg, anchors)
    np.testing.assert_allclose(np.asarray(a[:, :, 1]), np.asarray(b[:, :, 1]), atol=1e-5)


def test_training_and_decoding_compute_the_same_masks(model):
    """Masks after a prompt's last token: the two-pass training forward and the decode path's cached
    forward (prefill, then the masks) give the same outputs."""
    L, m = 10, N - 1
    tokens = random_tokens(3, (1, L))
    masks_KxBxPxD = nnx.jit(lambda m, t: masked.mask_forward(m, t, jnp.ones_like(t), np.asarray([L - 1]))[1])(
        model, tokens)
    be = XlaBackend()

    @nnx.jit
    def decode_masks(model, tokens):
        cache = init_cache(model.spec, 1, 64, 1)
        _, cache = be.forward(model, {}, cache, tokens, jnp.zeros((1,), jnp.int32), np.arange(L),
                              np.tril(np.ones((L, L), bool)), 1, prefill=True)
        ids = jnp.asarray(mask_drafts.mask_ids(model.spec.vocab_size, m))[None]
        return be.forward(model, {}, cache, ids, jnp.asarray([L], jnp.int32), np.arange(m),
                          np.tril(np.ones((m, m), bool)), 1)[0]

    hidden = decode_masks(model, tokens)
    np.testing.assert_allclose(np.asarray(hidden[0, 0]), np.asarray(masks_KxBxPxD[:, 0, 0]), rtol=2e-4, atol=2e-4)


def test_mask_layout_of_a_step():
    lay = mask_drafts.mask_layout(2)  # chain of 3, then 2 masks after each chain node
    assert lay.size == 9 and lay.depth.tolist() == [0, 1, 2, 1, 2, 2, 3, 3, 4]
    assert lay.mask[:3, 3:].sum() == 0  # no chain token sees a mask
    assert lay.mask[5].tolist() == [1, 1, 0, 0, 0, 1, 0, 0, 0]  # group 1's first mask: nodes 0-1, itself
    assert lay.mask[8].tolist() == [1, 1, 1, 0, 0, 0, 0, 1, 1]


def test_speculative_decoding_with_masks_equals_plain_decoding(model):
    prompts = [[1, 5, 7, 9, 11], [3, 4], [8, 8, 8, 2, 2, 2, 9, 10, 11]]
    greedy = generate(model, prompts, DecodeConfig(mode="greedy", max_new_tokens=20))
    spec = generate(model, prompts, DecodeConfig(mode="speculative", heads=N, max_new_tokens=20))
    assert spec.tokens == greedy.tokens
    sample = generate(model, prompts, DecodeConfig(mode="sample", max_new_tokens=12), seed=3)
    spec_sample = generate(model, prompts, DecodeConfig(mode="speculative_sample", heads=N, max_new_tokens=12),
                           seed=3)
    assert all(len(t) == 12 for t in spec_sample.tokens) and len(sample.tokens) == 3
    with pytest.raises(ValueError, match="chain"):
        generate(model, prompts, DecodeConfig(mode="speculative", heads=3, tree=(2, 1), max_new_tokens=4))
    with pytest.raises(ValueError, match="decode-backend xla"):
        make_backend(DecodeConfig().settings.__class__(backend="cpu_kernels"), spec=model.spec)


def test_always_right_mask_drafts_are_all_accepted(model):
    out = generate(argmax_zero_model(model), [[5, 6, 7]], DecodeConfig(mode="speculative", heads=N, max_new_tokens=9))
    assert out.tokens[0] == [0] * 9
    assert out.forwards == 2 + 2 and out.accepted[0].tolist() == [2] * N  # prefill, first masks, 2 steps


def test_loss_at_every_anchor_is_the_per_head_cross_entropy(model):
    tokens = random_tokens(4, (2, 12))
    seg = jnp.ones_like(tokens)
    full = np.asarray(logits(model, tokens, seg), np.float64)

    @functools.partial(nnx.jit, static_argnums=(2, 3))
    def loss_of(m, norm, anchors, consistency):
        return compute_loss("scan", m, tokens, seg, jnp.ones(N), norm, 4, mask_anchors=anchors,
                            consistency=consistency)[0]

    loss = loss_of(model, loss_normalizer(model.spec, tokens, seg, 0), 0, 0.0)
    want = 0.0
    for i in range(N):
        lp = full[i, :, :12 - i - 1] - np.log(np.exp(full[i, :, :12 - i - 1]).sum(-1, keepdims=True))
        tgt = np.asarray(tokens)[:, i + 1:]
        want += -np.take_along_axis(lp, tgt[..., None], -1).mean()
    np.testing.assert_allclose(float(loss), want, rtol=1e-4)
    # anchors: 3 of 12 positions; the consistency KL adds a positive term
    norm3 = loss_normalizer(model.spec, tokens, seg, 3)
    assert norm3.tolist() == [4.0] * N  # anchors 3, 7, 11 of 2 rows: 11 has no target for any head
    l0, l1 = loss_of(model, norm3, 3, 0.0), loss_of(model, norm3, 3, 1.0)
    assert float(l1) > float(l0) > 0


def test_lora_training_moves_only_the_adapters_masks_and_sampler(base):
    graphdef, params = nnx.split(base, nnx.Param)
    train, scale = init_from.trainable_masks(params, "lora", 1, N)
    optim = ml_collections.ConfigDict(dict(lr=1e-2, warmup_steps=0, min_lr_ratio=1.0, weight_decay=0.1,
                                           b1=0.9, b2=0.95, eps=1e-8, clip_norm=1.0))
    tx = make_optimizer(optim, 10, train, scale)
    tokens = random_tokens(5, (2, 16))
    seg = jnp.ones_like(tokens)
    norm = loss_normalizer(base.spec, tokens, seg, 4)
    weights = jnp.asarray([0.0] + [1.0] * (N - 1))

    @jax.jit
    def step(p, opt_state):
        grads = jax.grad(lambda q: compute_loss("scan", nnx.merge(graphdef, q), tokens, seg, weights, norm, 4,
                                                active=(1, 2, 3), mask_anchors=4, consistency=1.0)[0])(p)
        updates, opt_state = tx.update(grads, opt_state, p)
        return jax.tree.map(lambda a, u: a + u, p, updates), opt_state

    new, opt_state = params, tx.init(params)
    for _ in range(2):
        new, opt_state = step(new, opt_state)
    before = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(params)}
    after = {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(new)}
    moved = {k for k in before if not np.array_equal(before[k], after[k])}
    new_parts = ("_lora_b", "_lora_a", "mask_embed", "sampler_")
    assert all(any(n in k for n in new_parts) for k in moved), sorted(moved)
    assert any("trunk" in k and "_lora_b" in k for k in moved) and any("sampler_out" in k for k in moved)
    assert any("mask_embed" in k for k in moved)
    trained = nnx.merge(graphdef, new)
    assert np.array_equal(np.asarray(logits(trained, tokens, seg)[0]), np.asarray(logits(base, tokens, seg)[0]))
    _, abstract = abstract_params(base.spec)
    assert init_from.trainable_masks(abstract, "lora", 1, N)[0] is not None


@pytest.mark.parametrize("overrides, message", [
    (dict(head_type="mask", n_future=4), r"model.lora_rank=0 is invalid: head_type='mask'"),
    (dict(head_type="mask", n_future=1, lora_rank=4), r"model.n_future=1 is invalid: head_type='mask'"),
    (dict(head_type="mask", lora_rank=4, branch_layer=1), r"model.head_type='mask' is invalid"),
])
def test_config_validation(overrides, message):
    cfg = tiny_config(**overrides)
    with pytest.raises(ConfigError, match=message):
        validate(cfg, 1)
    cfg = tiny_config(head_type="mask", lora_rank=4)
    cfg.train.trainable = "lora"
    validate(cfg, 1)


def test_export_refuses_mask_heads_before_reading_weights(tmp_path):
    cfg = tiny_config(head_type="mask", lora_rank=4)
    (tmp_path / "config.json").write_text(cfg.to_json())
    with pytest.raises(ExportError, match="mask-token heads"):
        read_model(tmp_path)


def test_train_and_decode_steps_lower_for_tpu_and_cuda_on_a_mesh(tmp_path):
    """`mtp plan --lower-for tpu,cuda` of a mask-head model on 8 simulated devices: the train step
    (two-pass mask loss) and the speculative step (the chain + mask block, sampler drafts) lower,
    sharded, with the attention kernel of each platform for the train step's token pass."""
    from mtp.plan import plan

    cfg = tiny_config(head_type="mask", lora_rank=4, n_future=N, max_seq_len=256)
    cfg.train.trainable, cfg.train.seq_len = "lora", 128
    r = plan(cfg, {"data": 2, "fsdp": 2, "tensor": 2}, lower_for=("tpu", "cuda"), lower_dir=str(tmp_path))
    for platform in ("tpu", "cuda"):
        dec = r["lowered"][platform]["decode_step"]
        assert dec["lowered"] and dec["sharded"], dec
        text = (tmp_path / f"decode_step.{platform}.mlir").read_text()
        assert f"tensor<1x{N * N}xi32>" in text  # the block: a chain of N, then N-1 masks after each node
        assert (tmp_path / f"train_step.{platform}.mlir").exists()
    assert r["lowered"]["tpu"]["kernel_calls"]["tpu_custom_call"] > 0  # the token pass: splash attention
    assert r["lowered"]["cuda"]["kernel_calls"]["__gpu$xla.gpu.triton"] > 0


def test_self_targets_with_a_training_next_token_model_are_refused():
    cfg = tiny_config(lora_rank=4)
    cfg.init.workdir, cfg.loss.targets, cfg.train.trainable = "runs/base", "self_onpolicy", "lora"
    with pytest.raises(ConfigError, match=r"loss.targets='self_onpolicy' is invalid: .*collapses"):
        validate(cfg, 1)
    cfg.model.head_type = "mask"  # the gated LoRA leaves the next-token model as it is
    validate(cfg, 1)


def test_flops_per_token_counts_every_mask_row():
    """A mask row costs what a token does (every layer and the unembedding) plus the sampler; the
    logged MFU of mask runs depends on it."""
    spec = ModelSpec.from_config(tiny_config(head_type="mask", n_future=N, lora_rank=4).model)
    ntp = ModelSpec.from_config(tiny_config(head_type="transformer", n_future=1, lora_rank=4).model)
    T, D = 64, spec.d_model
    for P in (8, 64, 0, 100):
        rows = min(P or T, T) * (N - 1) / T
        want = ntp.flops_per_token(T) * (1 + rows) + rows * 3 * 2 * 3 * D * D
        assert spec.flops_per_token(T, P) == pytest.approx(want)
