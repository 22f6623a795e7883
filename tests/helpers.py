"""Small shared builders for tests: a tiny model spec and config that compile in seconds."""

from __future__ import annotations

import jax
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
