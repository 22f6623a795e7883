"""Heads on a frozen model: start from another workdir, train only the new heads, and leave every
trunk parameter (and the source's own head) bitwise unchanged."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import tiny_config

from mtp.config import ConfigError
from mtp.model import MTPLM
from mtp.model.spec import ModelSpec
from mtp.train.init_from import init_params
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
    cfg.train.steps, cfg.train.checkpoint_every, cfg.train.eval_batches = 12, 12, 2
    cfg.optim.lr, cfg.optim.warmup_steps = 1e-2, 1  # the new heads learn measurably in 12 steps
    cfg.optim.weight_decay = 0.1  # decay must not touch frozen parameters either
    result = train(cfg).evaluation
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


def _head_losses(model, tokens_BxT: np.ndarray) -> list[float]:
    """Mean cross-entropy of head i (predicting token t+i) on one batch, computed here from the logits."""
    logits = np.asarray(model(jax.numpy.asarray(tokens_BxT)), np.float64)  # [n_future, B, T, V]
    losses = []
    for i in range(logits.shape[0]):
        lg, target = logits[i][:, : tokens_BxT.shape[1] - 1 - i], tokens_BxT[:, 1 + i:]
        logp = lg - lg.max(-1, keepdims=True)
        logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
        losses.append(float(-np.take_along_axis(logp, target[..., None], -1).mean()))
    return losses


def test_new_heads_start_as_copies_and_learn(source_and_run):
    source, trained, result, src = source_and_run
    spec = ModelSpec.from_config(tiny_config(n_future=3, vocab_size=512).model)
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: MTPLM(spec, rngs=nnx.Rngs(0))), nnx.Param)
    start_state = init_params(src, abstract, "copy_last")
    start = {jax.tree_util.keystr(p): np.asarray(x)
             for p, x in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(start_state))}
    before = _flat(source)
    assert start.keys() == before.keys()
    for key, value in start.items():
        if key.startswith("['heads']"):  # the source's one head, then two bitwise copies of it
            assert value.shape[0] == 3, key
            for i in range(3):
                np.testing.assert_array_equal(value[i], before[key][0], err_msg=f"{key}[{i}]")
        else:
            np.testing.assert_array_equal(value, before[key], err_msg=key)

    # On text of the training kind (Python source), the trained new heads predict better than the
    # copies they started as; head 1 is frozen, so its loss is exactly the same.
    tokenizer = load_model(src.parent / "heads").tokenizer
    ids = tokenizer.encode(Path(json.__file__).read_text())[: 8 * 48]
    tokens = np.asarray(ids, np.int32).reshape(8, 48)
    initial = _head_losses(nnx.merge(graphdef, start_state), tokens)
    final = _head_losses(trained, tokens)
    assert final[0] == initial[0], (initial, final)
    for h in (1, 2):  # heads 2 and 3
        assert final[h] < initial[h] - 0.05, (initial, final)
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
