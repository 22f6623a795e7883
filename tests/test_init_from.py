"""Heads on a frozen model: start from another workdir, train only the new heads, and leave every
trunk parameter (and the source's own head) bitwise unchanged."""

import json

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import tiny_config

from mtp.config import ConfigError
from mtp.model import MTPLM
from mtp.model.spec import ModelSpec
from mtp.train.loop import train
from mtp.workdir import load_model, save_params


def _flat(model):
    return {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param)))}


@pytest.fixture(scope="module")
def source_and_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("init")
    src_cfg = tiny_config(n_future=1, vocab_size=512)
    src = root / "source"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(src_cfg.to_dict()))
    source_model = MTPLM(ModelSpec.from_config(src_cfg.model), rngs=nnx.Rngs(5))
    save_params(src, nnx.state(source_model, nnx.Param))

    cfg = tiny_config(n_future=3, vocab_size=512)
    cfg.workdir = str(root / "heads")
    cfg.init.workdir = str(src)
    cfg.train.trainable = "new_heads"
    cfg.train.steps, cfg.train.checkpoint_every, cfg.train.eval_batches = 6, 6, 2
    cfg.optim.weight_decay = 0.1  # decay must not touch frozen parameters either
    result = train(cfg)
    return source_model, load_model(cfg.workdir).model, result, src


def test_frozen_trunk_and_own_head_are_bitwise_unchanged(source_and_run):
    source, trained, _, _ = source_and_run
    before, after = _flat(source), _flat(trained)
    for key, value in after.items():
        if key.startswith("['heads']"):
            np.testing.assert_array_equal(value[0], before[key][0], err_msg=key)  # the source's head
            assert not np.array_equal(value[1], before[key][0]), key  # new heads trained from the copy
        else:
            np.testing.assert_array_equal(value, before[key], err_msg=key)


def test_new_heads_start_as_copies_and_learn(source_and_run):
    _, _, result, _ = source_and_run
    assert len(result["loss"]) == 3 and all(np.isfinite(result["loss"]))


def test_mismatched_source_is_rejected(tmp_path, source_and_run):
    cfg = tiny_config(n_future=3, vocab_size=512, d_model=64)
    cfg.workdir = str(tmp_path / "w")
    cfg.init.workdir = str(source_and_run[3])
    with pytest.raises(ConfigError, match="another shape.*d_model"):
        train(cfg)
    cfg.init.workdir = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="holds no checkpoint"):
        train(cfg)
    cfg.train.trainable = "new_heads"
    cfg.init.workdir = ""
    with pytest.raises(ConfigError, match="init.workdir"):
        train(cfg)
