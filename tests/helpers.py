"""Small shared builders for tests: a tiny model spec and config that compile in seconds."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mtp.config import base_config
from mtp.model import MTPLM
from mtp.model.spec import ModelSpec


def tiny_spec(**overrides) -> ModelSpec:
    kw = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, n_future=3,
              max_seq_len=64)
    kw.update(overrides)
    return ModelSpec(**kw)


def tiny_model(seed: int = 0, **overrides) -> MTPLM:
    return MTPLM(tiny_spec(**overrides), rngs=nnx.Rngs(seed))


def tiny_config(**model_overrides):
    c = base_config()
    c.model.update(dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                        n_future=3, max_seq_len=64))
    c.model.update(model_overrides)
    c.data.vocab_size = c.model.vocab_size
    c.train.batch_size, c.train.seq_len = 8, 16
    c.loss.chunk_size = 4
    return c


def random_tokens(key: int, shape, vocab: int = 97):
    return jax.random.randint(jax.random.key(key), shape, 0, vocab)


def with_params(model, pure: dict):
    graphdef, state = nnx.split(model)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state)


def heads_like_head1(model, noise=0.0, seed=0):
    """Copy head 1's layer into every head (+ optional noise): drafts then track head 1."""
    pure = nnx.to_pure_dict(nnx.state(model))
    key = jax.random.key(seed)
    for i, (path, x) in enumerate(jax.tree_util.tree_leaves_with_path(pure["heads"])):
        noisy = jnp.broadcast_to(x[:1], x.shape)
        if noise:
            noisy = noisy + noise * jnp.std(x) * jax.random.normal(jax.random.fold_in(key, i), x.shape)
        pure["heads"] = jax.tree_util.tree_map_with_path(
            lambda p, y, path=path, noisy=noisy: noisy if p == path else y, pure["heads"])
    return with_params(model, pure)
