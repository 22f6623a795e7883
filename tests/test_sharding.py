"""A train step on a simulated 8-device mesh (data=2, fsdp=2, tensor=2) equals one device;
gradient accumulation equals the full batch."""

import jax
import numpy as np
import pytest
from helpers import tiny_config

from mtp.config import head_weights, rules_from_config
from mtp.model.spec import ModelSpec
from mtp.sharding import batch_sharding, logical_to_spec, make_mesh
from mtp.train.optim import lr_schedule, make_optimizer
from mtp.train.state import make_layout
from mtp.train.step import make_train_step


def _run(cfg, devices, steps=2):
    spec = ModelSpec.from_config(cfg.model)
    mesh, rules = make_mesh(cfg.mesh, devices), rules_from_config(cfg.sharding.rules)
    tx, schedule = make_optimizer(cfg.optim, 10), lr_schedule(cfg.optim, 10)
    layout, init = make_layout(spec, tx, mesh, rules, seed=0)
    batch_sh = batch_sharding(mesh, rules)
    step = make_train_step(layout, tx, schedule, mesh, rules, cfg,
                           head_weights(cfg.loss, spec.n_future), batch_sh)
    state = init()
    rng = np.random.default_rng(0)
    losses = []
    for _ in range(steps):
        tokens = rng.integers(0, spec.vocab_size, (cfg.train.batch_size, cfg.train.seq_len), np.int32)
        seg = np.repeat(np.array([[1] * 10 + [2] * 6]), cfg.train.batch_size, 0).astype(np.int32)
        batch = {k: jax.device_put(v, batch_sh) for k, v in (("tokens", tokens), ("segment_ids", seg))}
        state, metrics = step(state, batch)
        losses.append(jax.device_get(metrics))
    return state, losses


def _assert_same_run(run_a, run_b):
    """Same metrics at every step and the same final parameters (float32 tolerance)."""
    (state_a, metrics_a), (state_b, metrics_b) = run_a, run_b
    for ma, mb in zip(metrics_a, metrics_b):
        for k in ma:
            np.testing.assert_allclose(ma[k], mb[k], rtol=2e-5, atol=1e-6, err_msg=k)
    leaves_a, leaves_b = jax.tree.leaves(state_a["params"]), jax.tree.leaves(state_b["params"])
    assert len(leaves_a) == len(leaves_b)
    for a, b in zip(leaves_a, leaves_b):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def cfg():
    c = tiny_config(vocab_size=96)
    c.optim.warmup_steps = 1
    return c


@pytest.fixture(scope="module")
def single(cfg):
    c = cfg.copy_and_resolve_references()
    c.mesh.data = 1
    return _run(c, jax.devices()[:1])


def test_eight_device_mesh_equals_one_device(cfg, single):
    assert jax.device_count() == 8
    c = cfg.copy_and_resolve_references()
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 2, 2, 2
    state8, metrics8 = _run(c, jax.devices())
    # the parameters really are split over the mesh
    wq = state8["params"]["trunk"]["attn"]["wq"][...]
    assert wq.sharding.spec[1:3] == ("fsdp", "tensor") and len(wq.sharding.device_set) == 8
    assert state8["params"]["embed"][...].sharding.spec == jax.P("tensor", "fsdp")
    _assert_same_run(single, (state8, metrics8))


def test_gradient_accumulation_equals_the_full_batch(cfg, single):
    c = cfg.copy_and_resolve_references()
    c.mesh.data, c.train.grad_accum = 1, 4
    _assert_same_run(single, _run(c, jax.devices()[:1]))


def test_indivisible_dimensions_are_replicated():
    mesh = make_mesh({"data": 1, "fsdp": 2, "tensor": 4}, jax.devices())
    rules = rules_from_config((("vocab", "tensor"), ("embed", "fsdp"), ("kv_heads", "tensor")))
    assert logical_to_spec(("vocab", "embed"), (97, 32), mesh, rules) == jax.P(None, "fsdp")
    assert logical_to_spec(("embed", "kv_heads"), (32, 2), mesh, rules) == jax.P("fsdp", None)
    assert logical_to_spec(("vocab", "embed"), (96, 32), mesh, rules) == jax.P("tensor", "fsdp")
