"""End to end: ``mtp train --config configs/tiny.py`` lowers every head's loss, writes metrics,
TensorBoard logs, checkpoints and the held-out table, and resumes on a second call."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _mtp(*args, cache, timeout=600):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, like a user
    env["MTP_CACHE_DIR"] = str(cache)
    return subprocess.run([sys.executable, "-m", "mtp.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    proc = _mtp("train", "--config", "configs/tiny.py", "--workdir", str(root / "w"),
                cache=root / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root, proc


def _records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_training_lowers_every_heads_loss(tiny_run):
    root, proc = tiny_run
    records = _records(root / "w")
    train = [r for r in records if r["split"] == "train"]
    final = [r for r in records if r["split"] == "validation"][-1]
    first = train[0]
    n_future = 3
    for i in range(1, n_future + 1):
        assert f"loss/head_{i}" in first and f"acc/head_{i}" in final
        # an untrained model sits near ln(512) = 6.24 nats; training must bring every head well below
        assert final[f"loss/head_{i}"] < first[f"loss/head_{i}"] - 0.3, (i, first, final)
        assert final[f"loss/head_{i}"] < 5.6
    for key in ("loss/total", "grad_norm", "lr", "perf/tokens_per_s", "perf/mfu"):
        assert key in train[-1]
    assert train[-1]["perf/tokens_per_s"] > 0 and 0 < train[-1]["perf/mfu"] < 1


def test_outputs_and_held_out_table(tiny_run):
    root, proc = tiny_run
    w = root / "w"
    assert sorted(p.name for p in (w / "checkpoints").iterdir() if p.name.isdigit()) == ["20", "40"]
    assert list((w / "tensorboard").glob("events.out.tfevents.*"))
    assert (w / "tokenizer.model").exists() and json.loads((w / "config.json").read_text())["name"] == "tiny"
    result = json.loads((w / "eval.json").read_text())
    assert len(result["loss"]) == 3 and result["step"] == 40
    assert "Held-out split" in proc.stdout and "t+3" in proc.stdout


def test_rerun_resumes_from_the_last_checkpoint(tiny_run):
    root, _ = tiny_run
    w = root / "w"
    proc = _mtp("train", "--config", "configs/tiny.py", "--workdir", str(w),
                "--config.train.steps=45", cache=root / "cache")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Resumed from" in proc.stderr and "(step 40)" in proc.stderr
    steps = [r["step"] for r in _records(w) if r["split"] == "train"]
    assert steps == list(range(5, 50, 5))  # 5..40 from the first run, then 45; nothing repeated


def test_resuming_with_another_model_is_refused(tiny_run):
    root, _ = tiny_run
    proc = _mtp("train", "--config", "configs/tiny.py", "--workdir", str(root / "w"),
                "--config.model.d_model=96", cache=root / "cache")
    assert proc.returncode != 0
    assert "different model config" in proc.stderr and "d_model" in proc.stderr


def test_bad_override_is_a_clean_error(tmp_path):
    proc = _mtp("train", "--config", "tiny", "--config.model.n_future=0", "--workdir",
                str(tmp_path / "w"), cache=tmp_path / "cache")
    assert proc.returncode != 0
    assert "model.n_future=0 is invalid" in proc.stderr and "Traceback" not in proc.stderr
