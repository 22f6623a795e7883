"""Decoding with the model's own layers (the 'xla' decode backend) and on device meshes: the
output equals the one-device output token for token, and the cache after rollback equals a cache
built from scratch (conftest gives every test 8 simulated CPU devices)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import heads_like_head1, tiny_model

from mtp.config import DecodeSettings
from mtp.decode.backend import XlaBackend, make_backend
from mtp.decode.generate import DecodeConfig, generate
from mtp.model.cached import cached_forward
from mtp.sharding import make_mesh

XLA = DecodeSettings(backend="xla")
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17, 18], [19]]  # 4 prompts, different lengths


def mesh(data: int, tensor: int):
    return make_mesh({"data": data, "fsdp": 1, "tensor": tensor}, jax.devices()[:data * tensor])


@pytest.fixture(scope="module")
def model():
    # 8 query heads and 4 kv heads: tensor=4 shards both, tensor=8 keeps the kv heads whole
    return heads_like_head1(tiny_model(seed=1, n_future=3, n_layers=1, d_model=64, n_heads=8, n_kv_heads=4),
                            noise=0.5)


@pytest.mark.parametrize("mode,tree,shape", [
    ("greedy", None, (2, 4)),
    ("sample", None, (1, 8)),  # a fixed key
    ("speculative", None, (1, 8)),
    ("speculative", (2, 2), (2, 4)),
])
def test_mesh_decode_equals_one_device(model, mode, tree, shape):
    heads = 1 if mode in ("greedy", "sample") else 3
    dc = DecodeConfig(mode, heads, tree, max_new_tokens=10, temperature=0.9, settings=XLA)
    one = generate(model, PROMPTS, dc, seed=7, return_cache=True)
    sharded = generate(model, PROMPTS, dc, seed=7, mesh=mesh(*shape), return_cache=True)
    assert sharded.tokens == one.tokens
    assert sharded.forwards == one.forwards
    if shape == (2, 4):  # batch rows over data, the 4 kv heads over tensor
        assert sharded.cache["trunk_k"].sharding.spec[1:3] == ("data", "tensor")
    for name in one.cache:
        np.testing.assert_allclose(np.asarray(sharded.cache[name]), np.asarray(one.cache[name]), atol=2e-5)


def test_xla_backend_equals_cpu_kernels_backend(model):
    """The model's layers and the CPU kernels' decode layout decode the same tokens (the kernels
    are an implementation of the same layer)."""
    dc = DecodeConfig("speculative", 3, (2, 1), max_new_tokens=12)
    kernels = generate(model, PROMPTS[:1], dc)
    layers = generate(model, PROMPTS[:1], DecodeConfig("speculative", 3, (2, 1), max_new_tokens=12, settings=XLA))
    assert layers.tokens == kernels.tokens  # (speculative == plain greedy: tests/test_decode.py)


def test_cache_after_rollback_on_a_mesh_equals_cache_from_scratch(model):
    dc = DecodeConfig("speculative", 3, (2, 2), max_new_tokens=12, settings=XLA)
    res = generate(model, PROMPTS, dc, mesh=mesh(2, 4), return_cache=True)
    assert res.accepted[:, 1:].sum() > 0 and (res.accepted[:, 1:].sum() < res.steps.sum() * 2)  # some rolled back
    seqs = [(p + out)[:int(n)] for p, out, n in zip(PROMPTS, res.tokens, res.lengths)]  # cached tokens
    width = max(map(len, seqs))
    tokens_BxW = jnp.asarray([s + [0] * (width - len(s)) for s in seqs])  # right padding: no effect before it
    graphdef, state = nnx.split(model)

    @jax.jit
    def from_scratch(state, tokens_BxW):
        fresh = XlaBackend().init_cache(model.spec, len(seqs), res.cache["trunk_k"].shape[3], 3)
        return cached_forward(nnx.merge(graphdef, state), fresh, tokens_BxW, jnp.zeros(len(seqs), jnp.int32),
                              np.arange(width), np.tril(np.ones((width, width), bool)), 3, prefill=True)[1]

    fresh = from_scratch(state, tokens_BxW)
    for b, seq in enumerate(seqs):
        for name in ("trunk_k", "trunk_v", "head_k", "head_v"):
            np.testing.assert_allclose(np.asarray(res.cache[name])[:, b, :, :len(seq)],
                                       np.asarray(fresh[name])[:, b, :, :len(seq)], atol=2e-5, rtol=1e-5)


def test_backend_choice():
    assert make_backend(XLA).name == "xla"
    assert make_backend(DecodeSettings(), n_devices=8).name == "xla"  # the kernels run on one device
    with pytest.raises(ValueError, match="one device"):
        make_backend(DecodeSettings(backend="cpu_kernels"), n_devices=8)
