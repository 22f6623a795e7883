"""Multi-process training: 2 processes x 4 simulated CPU devices (``launch/local.sh``, gloo
collectives) give the same losses and final parameters as 1 process x 8 devices, same global batch."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from helpers import one_device_env

from mtp.data.pipeline import make_dataset

REPO = Path(__file__).resolve().parent.parent
STEPS = 6
OVERRIDES = [f"--config.train.steps={STEPS}", "--config.train.log_every=1",
             f"--config.train.checkpoint_every={STEPS}", "--config.train.tensorboard=False",
             "--config.train.eval_batches=1", "--config.perf.peak_flops_per_device=1e12",
             "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
             "--config.train.calibrate=False"]


def test_row_sharding_gives_every_process_its_rows_of_the_same_global_batch():
    rng = np.random.default_rng(0)
    docs = [rng.integers(3, 300, size=n).astype(np.int32) for n in rng.integers(5, 200, size=40)]
    kw = dict(seq_len=16, seed=3, source=docs, shard_by="rows")
    single = iter(make_dataset(None, "train", None, batch_size=6, **kw))
    parts = [iter(make_dataset(None, "train", None, batch_size=3, process_index=i, process_count=2, **kw))
             for i in range(2)]
    for _ in range(5):
        whole = next(single)
        halves = [next(p) for p in parts]
        for key in ("tokens", "segment_ids"):
            np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), whole[key])
    assert parts[0].get_state() == parts[1].get_state() == single.get_state()  # one resumable state


MESH_CHECK = """
from mtp.distributed import initialize, process_zero_first
initialize()
import time, jax, numpy as np
from mtp.config import base_config
from mtp.sharding import make_mesh
c = base_config()
c.mesh.data, c.mesh.fsdp, c.mesh.dcn_data = 4, 2, 2
owners = np.vectorize(lambda d: d.process_index)(make_mesh(c.mesh).devices)
assert owners[:2].max() == 0 and owners[2:].min() == 1, owners  # one slice (process) per data half
with process_zero_first("check"):
    if jax.process_index() == 0:
        time.sleep(1)
    print("entered", jax.process_index(), time.time(), flush=True)
"""


def test_local_launcher_joins_processes_and_lays_slices_along_data(tmp_path):
    env = _env(tmp_path, devices=None)
    env["MTP_LOCAL_DEVICES"] = "4"
    proc = subprocess.run(["bash", "launch/local.sh", "2", sys.executable, "-c", MESH_CHECK], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    entered = dict(line.split()[2:4] for line in proc.stdout.splitlines() if " entered " in line)
    assert float(entered["0"]) < float(entered["1"])  # process 0 first, the other after the barrier


def test_local_launcher_stops_the_others_and_propagates_a_failure(tmp_path):
    failing = "import os, sys, time; time.sleep(60) if os.environ['MTP_PROCESS_ID'] == '0' else sys.exit(3)"
    start = time.monotonic()
    proc = subprocess.run(["bash", "launch/local.sh", "2", sys.executable, "-c", failing], cwd=REPO,
                          env=_env(tmp_path, devices=None), capture_output=True, text=True, timeout=60)
    assert proc.returncode == 3 and time.monotonic() - start < 30, proc.stderr


def test_cluster_launchers_dry_run():
    tpu = subprocess.run(["bash", "launch/tpu_pod.sh", "--dry-run", "--tpu", "pod", "--zone", "z", "--",
                          "mtp", "train", "--config", "default"], cwd=REPO, capture_output=True, text=True)
    assert tpu.returncode == 0 and "--worker=all" in tpu.stdout and "MTP_DISTRIBUTED=auto" in tpu.stdout
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    slurm = subprocess.run(["bash", "launch/slurm_gpu.sbatch", "--dry-run", "mtp", "train"], cwd=REPO,
                           env=env, capture_output=True, text=True)
    assert slurm.returncode == 0 and slurm.stdout.startswith("srun ") and "SLURM_PROCID" in slurm.stdout


def _env(cache: Path, devices: int | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS" and not k.startswith("MTP_")}
    env.update(MTP_CACHE_DIR=str(cache), JAX_PLATFORMS="cpu")
    if devices:
        env["XLA_FLAGS"] = f"{one_device_env()['XLA_FLAGS']} --xla_force_host_platform_device_count={devices}"
    return env


def _run(cmd: list[str], env: dict) -> None:
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout[-2000:], proc.stderr[-4000:])


def _metrics(workdir: Path) -> list[dict]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time" and not k.startswith("perf/")} for r in records]


def _final_params(workdir: Path) -> dict:
    import jax
    import orbax.checkpoint as ocp

    path = workdir / "checkpoints" / str(STEPS) / "state"
    checkpointer = ocp.StandardCheckpointer()
    meta = checkpointer.metadata(path)
    meta = getattr(meta, "item_metadata", meta)
    on_one_device = jax.sharding.SingleDeviceSharding(jax.devices()[0])  # whatever mesh saved it
    target = {k: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=on_one_device)
              for k, m in dict(meta).items()}
    return {k: np.asarray(v) for k, v in checkpointer.restore(path, target).items()}


def test_two_processes_match_one_process(tmp_path):
    train = [sys.executable, "-m", "mtp.cli", "train", "--config", "configs/tiny.py", *OVERRIDES]
    # One process first: it builds the data cache the two-process run then reuses.
    _run([*train, "--workdir", str(tmp_path / "w1")], _env(tmp_path / "cache", devices=8))
    local = _env(tmp_path / "cache", devices=None)
    local["MTP_LOCAL_DEVICES"] = "4"
    _run(["bash", "launch/local.sh", "2", *train, "--workdir", str(tmp_path / "w2")], local)

    one, two = _metrics(tmp_path / "w1"), _metrics(tmp_path / "w2")
    assert [(r["step"], r["split"]) for r in one] == [(r["step"], r["split"]) for r in two]
    assert [r["step"] for r in one if r["split"] == "train"] == list(range(1, STEPS + 1))
    for a, b in zip(one, two):
        assert a.keys() == b.keys()
        for key in a:
            if key not in ("step", "split"):
                np.testing.assert_allclose(b[key], a[key], rtol=1e-5, atol=1e-5, err_msg=f"{key} {a['step']}")

    params_one, params_two = _final_params(tmp_path / "w1"), _final_params(tmp_path / "w2")
    assert params_one.keys() == params_two.keys() and len(params_one) > 10
    for key in params_one:
        np.testing.assert_allclose(params_two[key], params_one[key], rtol=1e-5, atol=1e-5, err_msg=key)
    assert any(np.abs(v).sum() > 0 for k, v in params_one.items() if "params" in k)
