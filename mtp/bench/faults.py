"""``mtp bench faults``: kill a training run with SIGKILL at random moments (during steps and
during asynchronous checkpoint writes), resume it each time, and check it ends exactly where an
uninterrupted run ends: the same parameters bit for bit, and every step fed the same batch.

Prints ``{kills, kills_during_checkpoint_write, resumed, final_params_equal, steps_lost,
data_repeated, data_mismatched_steps}``. ``steps_lost`` counts steps that ran but were discarded
because the process died before their checkpoint; ``data_repeated`` is true when any step's
effective batch differs from the uninterrupted run's (a repeated or skipped batch shifts them).
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BASE_OVERRIDES = ["--config.train.log_data_hashes=True", "--config.train.tensorboard=False",
                  "--config.train.log_every=1", "--config.train.eval_batches=1",
                  "--config.train.calibrate=False"]  # the runs compare parameters, never decode


def _command(config: str, workdir: Path, steps: int, checkpoint_every: int) -> list[str]:
    return [sys.executable, "-m", "mtp.cli", "train", "--config", config, "--workdir", str(workdir),
            f"--config.train.steps={steps}", f"--config.train.checkpoint_every={checkpoint_every}",
            *BASE_OVERRIDES]


def _env() -> dict:
    """This environment on one device: a simulated device count in XLA_FLAGS is dropped, other flags kept."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags)
    return env


def _data_log(workdir: Path) -> list[dict]:
    rows = []
    path = workdir / "data_log.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:  # a line cut by SIGKILL
                pass
    return rows


def _run_to_end(cmd: list[str], log) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=1800)
    log.write(proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"training failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def run_faults_bench(kills: int, config: str = "tiny", steps: int = 40, checkpoint_every: int = 2,
                     seed: int = 0, workdir: str | None = None) -> dict:
    rng = random.Random(seed)
    root = Path(workdir or tempfile.mkdtemp(prefix="mtp-faults-"))
    root.mkdir(parents=True, exist_ok=True)
    log = (root / "bench_faults.log").open("w")
    say = lambda msg: print(f"[faults] {msg}", file=sys.stderr, flush=True)  # noqa: E731

    say(f"uninterrupted reference run ({steps} steps) in {root / 'reference'}")
    _run_to_end(_command(config, root / "reference", steps, checkpoint_every), log)
    reference = json.loads((root / "reference" / "eval.json").read_text())
    ref_hashes = {r["step"]: r["tokens_sha1"] for r in _data_log(root / "reference")}

    faulty = root / "faulty"
    cmd = _command(config, faulty, steps, checkpoint_every)
    done_kills = during_write = resumed = 0
    while done_kills < kills:
        # Let this process get past imports and compilation and run a random number of steps.
        target = len(_data_log(faulty)) + rng.randint(2, 2 * checkpoint_every + 2)
        proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=log)
        deadline = time.time() + 600
        while len(_data_log(faulty)) < target and proc.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        if proc.poll() is not None:
            say("the run finished before it could be killed; lower --kills or raise --steps")
            break
        time.sleep(rng.uniform(0.0, 0.3))  # anywhere inside a step or a checkpoint write
        writing = any(".orbax-checkpoint-tmp" in p.name for p in (faulty / "checkpoints").glob("*"))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        done_kills += 1
        during_write += writing
        last = max((r["step"] for r in _data_log(faulty)), default=0)
        say(f"kill {done_kills}/{kills} at step ~{last}{' during a checkpoint write' if writing else ''}")
    say("final resume to the end")
    final = _run_to_end(cmd, log)
    log.close()
    resumed = sum(1 for line in (root / "bench_faults.log").read_text().splitlines()
                  if "Resumed from" in line)
    result = json.loads((faulty / "eval.json").read_text())
    rows = _data_log(faulty)
    effective = {}
    for r in rows:  # a step re-run after a kill must see the same batch as before; keep the last
        effective[r["step"]] = r["tokens_sha1"]
    mismatched = sorted(s for s in ref_hashes if effective.get(s) != ref_hashes[s])
    inconsistent = sorted({r["step"] for r in rows if r["tokens_sha1"] != ref_hashes.get(r["step"])})
    del final
    return {
        "kills": done_kills,
        "kills_during_checkpoint_write": during_write,
        "resumed": resumed,
        "final_params_equal": result.get("params_sha1") == reference.get("params_sha1"),
        "steps_lost": len(rows) - steps,
        "data_repeated": bool(mismatched or inconsistent),
        "data_mismatched_steps": sorted(set(mismatched) | set(inconsistent)),
        "workdir": str(root),
    }
