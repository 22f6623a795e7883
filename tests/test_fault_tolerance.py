"""Fault tolerance: corrupted/partial checkpoints, restore onto another mesh, SIGKILL resume is
bitwise exact, SIGTERM leaves a restorable checkpoint."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import one_device_env, tiny_config

from mtp.bench.faults import _data_log, run_faults_bench
from mtp.config import rules_from_config
from mtp.model.spec import ModelSpec
from mtp.sharding import batch_sharding, make_mesh
from mtp.train.checkpoint import Checkpointer
from mtp.train.optim import make_optimizer
from mtp.train.state import make_layout
from mtp.train.step import make_eval_step

REPO = Path(__file__).resolve().parent.parent


def _toy_state(value: float):
    return {"params": {"w": jnp.full((4, 3), value)}, "step": jnp.asarray(int(value), jnp.int32)}


def _abstract(state):
    return (jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state),
            jax.tree.map(lambda x: x.sharding, state))


def test_corrupted_latest_checkpoint_falls_back_to_the_previous(tmp_path, capsys):
    ckpt = Checkpointer(tmp_path / "ckpt", keep=3)
    for step in (1, 2):
        ckpt.save(step, _toy_state(step), {"pos": step})
    ckpt.wait()
    for f in (tmp_path / "ckpt" / "2" / "state").rglob("*"):  # wipe step 2's array data
        if f.is_file():
            f.write_bytes(b"garbage")
    ckpt = Checkpointer(tmp_path / "ckpt", keep=3)
    step, state, data_state, _ = ckpt.restore_latest(*_abstract(_toy_state(0)))
    assert step == 1 and float(state["params"]["w"][0, 0]) == 1.0 and data_state == {"pos": 1}
    assert "is damaged" in capsys.readouterr().err
    assert list((tmp_path / "ckpt").glob("2.damaged-*"))  # moved aside, not deleted


def test_partial_checkpoint_is_never_restored(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt", keep=3)
    ckpt.save(1, _toy_state(1))
    ckpt.wait()
    partial = tmp_path / "ckpt" / "2.orbax-checkpoint-tmp-1234"  # what a kill mid-write leaves
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "half").write_bytes(b"\0" * 10)
    step, state, _, _ = Checkpointer(tmp_path / "ckpt", keep=3).restore_latest(*_abstract(_toy_state(0)))
    assert step == 1 and float(state["params"]["w"][0, 0]) == 1.0


def test_all_checkpoints_unreadable_is_an_error_not_a_fresh_start(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt", keep=3)
    ckpt.save(1, _toy_state(1))
    ckpt.wait()
    for f in (tmp_path / "ckpt" / "1" / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    with pytest.raises(RuntimeError, match="No checkpoint .* could be read"):
        Checkpointer(tmp_path / "ckpt", keep=3).restore_latest(*_abstract(_toy_state(0)))


def _layout(cfg, devices):
    spec = ModelSpec.from_config(cfg.model)
    mesh, rules = make_mesh(cfg.mesh, devices), rules_from_config(cfg.sharding.rules)
    tx = make_optimizer(cfg.optim, 10)
    layout, init = make_layout(spec, tx, mesh, rules, seed=0)
    return layout, init, mesh, rules


def test_restore_onto_a_different_mesh_gives_the_same_loss(tmp_path):
    cfg1 = tiny_config(vocab_size=96)
    cfg1.mesh.data = 1
    layout1, init1, mesh1, rules = _layout(cfg1, jax.devices()[:1])
    state = init1()
    ckpt = Checkpointer(tmp_path / "ckpt")
    ckpt.save(5, state)
    ckpt.close()

    cfg8 = tiny_config(vocab_size=96)
    cfg8.mesh.data, cfg8.mesh.fsdp, cfg8.mesh.tensor = 2, 2, 2
    layout8, _, mesh8, _ = _layout(cfg8, jax.devices())
    step, state8, _, _ = Checkpointer(tmp_path / "ckpt").restore_latest(layout8.abstract, layout8.shardings)
    assert step == 5
    assert len(state8["params"]["trunk"]["attn"]["wq"][...].sharding.device_set) == 8

    tokens = np.random.default_rng(0).integers(0, 96, (8, 16), np.int32)
    batch = {"tokens": tokens, "segment_ids": np.ones_like(tokens)}
    losses = []
    for cfg, layout, mesh, st in ((cfg1, layout1, mesh1, state), (cfg8, layout8, mesh8, state8)):
        sh = batch_sharding(mesh, rules)
        aux = make_eval_step(layout, mesh, rules, cfg, sh)(
            st["params"], {k: jax.device_put(v, sh) for k, v in batch.items()})
        losses.append(np.asarray(aux["sum_ce"]))
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)


def test_sigkill_mid_run_resumes_to_the_same_parameters_bit_for_bit(tmp_path, monkeypatch):
    monkeypatch.setenv("MTP_CACHE_DIR", str(tmp_path / "cache"))
    result = run_faults_bench(kills=1, config=str(REPO / "configs" / "tiny.py"), steps=12,
                              checkpoint_every=2, seed=1, workdir=str(tmp_path / "faults"))
    assert result["kills"] == 1
    assert result["final_params_equal"], result
    assert not result["data_repeated"], result
    assert result["steps_lost"] >= 0


def test_sigterm_leaves_a_restorable_checkpoint_at_the_step_it_stopped(tmp_path):
    env = one_device_env()
    env["MTP_CACHE_DIR"] = str(tmp_path / "cache")
    w = tmp_path / "w"
    cmd = [sys.executable, "-m", "mtp.cli", "train", "--config", "tiny", "--workdir", str(w),
           "--config.train.steps=400", "--config.train.checkpoint_every=1000",
           "--config.train.log_data_hashes=True", "--config.train.tensorboard=False"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 300
    while len(_data_log(w)) < 5 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-2000:]
    assert "SIGTERM: saved a checkpoint at step" in err
    saved = [int(p.name) for p in (w / "checkpoints").iterdir() if p.name.isdigit()]
    assert len(saved) == 1 and 5 <= saved[0] < 400  # not a periodic save: the preemption one
    stopped = saved[0]
    resume = subprocess.run([*cmd[:8], f"--config.train.steps={stopped + 2}",
                             "--config.train.tensorboard=False"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=300)
    assert resume.returncode == 0, resume.stderr[-2000:]
    assert f"(step {stopped})" in resume.stderr
    assert json.loads((w / "eval.json").read_text())["step"] == stopped + 2
