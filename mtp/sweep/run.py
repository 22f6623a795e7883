"""Run the points of a sweep one after another, skip finished ones, and collect one row per point.

A point is *finished* when ``W/<point>/eval.json`` exists with ``step == train.steps`` (``train()``
writes it last). Anything else runs (again): ``train()`` resumes from the point's own newest
checkpoint, so an interrupted sweep, rerun with the same command, redoes only unfinished work.

Runners (``runner(point, cfg, point_dir)``; raise ``PointFailed`` to record a failure):

- ``SubprocessRunner`` (the default): ``python -m mtp.cli train --config PATH --workdir DIR
  --config.k=v ...`` per point, output appended to ``DIR/train.log``. Each point gets a fresh
  process (no JAX compile caches or device memory carried from point to point), and a crash, OOM
  or ``SystemExit`` fails that point only. An optional launcher prefix (``launch/local.sh 2``,
  ``srun ...``) runs the point as a multi-process job; it must block until the job ends.
- ``InProcessRunner``: ``mtp.train.loop.train(cfg)`` in this process; no interpreter start or JAX
  import per point (faster for tiny points and tests), but compile caches accumulate and a hard
  crash ends the sweep.

Each attempt (start time, wall seconds, status, error tail) is appended to ``DIR/sweep_point.json``;
the wall time column of the results sums them.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from mtp.data.prompts import heldout_prompts, read_prompts
from mtp.data.synthetic import is_synthetic
from mtp.decode.api import PAD_TO, tokens_per_forward
from mtp.evals.task_eval import SCORES_VERSION, task_scores
from mtp.log import log
from mtp.model.spec import ModelSpec
from mtp.sweep.grid import Point, point_config
from mtp.train.loop import train
from mtp.workdir import load_model

POINT_FILE = "sweep_point.json"
SWEEP_FILE = "sweep.json"
TPF_FILE = "sweep_tokens_per_forward.json"
TASK_FILE = "sweep_task.json"
TAIL_CHARS = 3000


class SweepPreempted(Exception):
    """A preemption notice (SIGTERM) stopped an in-process point after its checkpoint was saved."""


class PointFailed(RuntimeError):
    """A point's training did not finish; ``tail`` is the end of its output or traceback."""

    def __init__(self, message: str, tail: str = ""):
        super().__init__(message)
        self.tail = tail


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def write_json(path: Path, obj) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    tmp.replace(path)


def is_finished(point_dir: Path, steps: int) -> bool:
    """True when the point's final evaluation exists for ``steps`` training steps."""
    result = read_json(Path(point_dir) / "eval.json")
    return isinstance(result, dict) and result.get("step") == steps


# --- runners --------------------------------------------------------------------------------
def train_command(config_path: str | Path, point: Point, point_dir: Path, executable: list[str]) -> list[str]:
    return [*executable, "train", "--config", str(config_path), "--workdir", str(point_dir),
            *point.train_args()]


class SubprocessRunner:
    """One ``mtp train`` process per point (optionally behind a blocking launcher prefix)."""

    def __init__(self, config_path: str | Path, launcher: str | list[str] = ()):
        self.config_path = config_path
        self.launcher = shlex.split(launcher) if isinstance(launcher, str) else list(launcher)

    def command(self, point: Point, point_dir: Path) -> list[str]:
        return self.launcher + train_command(self.config_path, point, point_dir,
                                             [sys.executable, "-m", "mtp.cli"])

    def __call__(self, point: Point, cfg, point_dir: Path) -> None:
        point_dir.mkdir(parents=True, exist_ok=True)
        log_path = point_dir / "train.log"
        cmd = self.command(point, point_dir)
        with log_path.open("ab") as f:
            f.write(f"\n$ {shlex.join(cmd)}\n".encode())
            f.flush()
            start = f.tell()
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL).returncode
        if rc != 0:
            with log_path.open("rb") as f:
                f.seek(max(start, log_path.stat().st_size - TAIL_CHARS))
                tail = f.read().decode(errors="replace")
            raise PointFailed(f"`mtp train` exited with status {rc} (log: {log_path})", tail)


class InProcessRunner:
    """``train(cfg)`` in this process."""

    def __call__(self, point: Point, cfg, point_dir: Path) -> None:
        try:
            result = train(cfg)
        except KeyboardInterrupt:
            raise
        except Exception as e:
            raise PointFailed(f"{type(e).__name__}: {e}", traceback.format_exc()[-TAIL_CHARS:]) from None
        if result.preempted:  # train() saved a checkpoint after SIGTERM: stop the sweep too
            raise SweepPreempted(f"{point.name} was preempted at step {result.step}; rerun the same"
                                 " command to resume the sweep.")


# --- the sweep ------------------------------------------------------------------------------
@dataclasses.dataclass
class SweepOutcome:
    ran: list[str] = dataclasses.field(default_factory=list)  # trained to the end in this call
    skipped: list[str] = dataclasses.field(default_factory=list)  # finished before this call
    failed: dict[str, str] = dataclasses.field(default_factory=dict)  # name -> error message


def _record_attempt(point: Point, point_dir: Path, attempt: dict) -> None:
    path = point_dir / POINT_FILE
    state = read_json(path) or {}
    state.update(name=point.name, label=point.label, assignment=dict(point.assignment),
                 overrides=list(point.overrides))
    state.setdefault("attempts", []).append(attempt)
    write_json(path, state)


def run_points(config_path: str | Path, points: list[Point], root: str | Path,
               runner: Callable[[Point, object, Path], None], only: list[str] | None = None) -> SweepOutcome:
    """Run every unfinished point of ``points`` in order (or only those named in ``only``)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    outcome = SweepOutcome()
    t0 = time.perf_counter()
    todo = [p for p in points if only is None or p.name in only]
    n = len(todo)
    log(f"[sweep] {n} point(s) in {root}")
    for i, point in enumerate(todo, 1):
        cfg = point_config(config_path, point, root)
        point_dir = point.workdir(root)
        tag = f"[sweep {i}/{n}] {point.name}"
        if is_finished(point_dir, cfg.train.steps):
            outcome.skipped.append(point.name)
            log(f"{tag}: finished earlier (eval.json at step {cfg.train.steps}); skipped")
            continue
        resuming = (point_dir / "checkpoints").exists()
        log(f"{tag}: {'resuming' if resuming else 'running'} -> {point_dir}"
            f" (elapsed {time.perf_counter() - t0:.1f} s)")
        point_dir.mkdir(parents=True, exist_ok=True)
        start_wall, start = time.time(), time.perf_counter()
        attempt = {"start": start_wall, "resumed": resuming}
        try:
            runner(point, cfg, point_dir)
            if not is_finished(point_dir, cfg.train.steps):
                raise PointFailed(f"training returned but {point_dir}/eval.json is missing or not at"
                                  f" step {cfg.train.steps}")
        except PointFailed as e:
            attempt.update(wall_s=time.perf_counter() - start, status="failed", error=str(e), tail=e.tail)
            _record_attempt(point, point_dir, attempt)
            outcome.failed[point.name] = str(e)
            last = [line for line in e.tail.strip().splitlines() if line.strip()][-1:] or [""]
            log(f"{tag}: FAILED after {attempt['wall_s']:.1f} s: {e}\n    {last[0][-300:]}")
            continue
        except BaseException:
            attempt.update(wall_s=time.perf_counter() - start, status="interrupted")
            _record_attempt(point, point_dir, attempt)
            log(f"{tag}: interrupted; rerun the same command to resume")
            raise
        attempt.update(wall_s=time.perf_counter() - start, status="finished")
        _record_attempt(point, point_dir, attempt)
        outcome.ran.append(point.name)
        log(f"{tag}: done in {attempt['wall_s']:.1f} s (elapsed {time.perf_counter() - t0:.1f} s)")
    log(f"[sweep] {len(outcome.ran)} ran, {len(outcome.skipped)} skipped (finished earlier),"
        f" {len(outcome.failed)} failed; {time.perf_counter() - t0:.1f} s")
    return outcome


# --- collecting results ---------------------------------------------------------------------
def read_metrics(point_dir: Path) -> list[dict]:
    """``metrics.jsonl`` records; where a resumed run rewrote a step, the later record wins."""
    path = Path(point_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    latest: dict[tuple[str, int], dict] = {}
    for line in path.read_text().splitlines():
        try:
            r = json.loads(line)
        except ValueError:  # a line cut short by a kill
            continue
        latest[(r.get("split", "train"), r.get("step", 0))] = r
    return sorted(latest.values(), key=lambda r: (r.get("split", "train"), r.get("step", 0)))


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


@dataclasses.dataclass
class TPFOptions:
    enabled: bool = True
    prompts_file: str | None = None
    n_prompts: int = 4
    max_new_tokens: int = 64


def fit_prompts(loaded, prompts: list[str], max_new_tokens: int, pad_to: int = 1) -> tuple[list[str], int]:
    """Prompts cut (keeping their beginning) and ``max_new_tokens`` lowered so that each padded
    prompt plus the new tokens fits the model's ``max_seq_len``; at most half the context is
    generated."""
    length = loaded.spec.max_seq_len
    pad_to = max(1, int(pad_to))
    max_new = min(max_new_tokens, max(1, length // 2))
    budget = (length - max_new) // pad_to * pad_to
    if budget < 1:  # the prompt bucket is more than half the context
        budget = min(pad_to, length - 1)
        max_new = length - budget
    out = []
    for text in prompts:
        if len(loaded.tokenizer.encode(text)) > budget:
            lo, hi = 0, len(text)  # the longest prefix that fits
            while lo < hi:
                mid = (lo + hi + 1) // 2
                lo, hi = (mid, hi) if len(loaded.tokenizer.encode(text[:mid])) <= budget else (lo, mid - 1)
            text = text[:lo]
        if text.strip():
            out.append(text)
    return out, max_new


class TokensPerForward:
    """``mtp.decode.api.tokens_per_forward`` per finished point, cached in
    ``DIR/sweep_tokens_per_forward.json``; ``note`` says why values are missing (``--no-tpf``)."""

    def __init__(self, options: TPFOptions):
        self.options = options
        self.note: str | None = None if options.enabled else "tokens/forward not measured (--no-tpf)."
        self._prompts: dict[str, list[str]] = {}

    def _prompts_for(self, cfg) -> list[str]:
        if self.options.prompts_file:
            key = "file"
            if key not in self._prompts:
                self._prompts[key] = read_prompts(self.options.prompts_file)
        else:
            key = json.dumps(cfg.data.to_dict(), sort_keys=True, default=str)
            if key not in self._prompts:
                self._prompts[key] = heldout_prompts(cfg.data, self.options.n_prompts)
        return self._prompts[key]

    def __call__(self, cfg, point_dir: Path) -> tuple[float | None, str | None]:
        n = cfg.model.n_future
        if n < 2:
            return 1.0, None
        if not self.options.enabled:
            return None, None
        cache = read_json(point_dir / TPF_FILE)
        try:
            prompts = self._prompts_for(cfg)
        except Exception as e:
            return None, f"prompts: {type(e).__name__}: {e}"
        key = {"eval_step": (read_json(point_dir / "eval.json") or {}).get("step"), "heads": n,
               "max_new_tokens": self.options.max_new_tokens, "prompts": prompts}
        if isinstance(cache, dict) and cache.get("key") == key:
            return cache["value"], None
        try:
            loaded = load_model(point_dir)
            fitted, max_new = fit_prompts(loaded, prompts, self.options.max_new_tokens, PAD_TO)
            if not fitted:
                return None, "no non-empty prompt fits the model's context"
            value = float(tokens_per_forward(loaded, fitted, heads=n, max_new_tokens=max_new))
        except Exception as e:
            return None, f"{type(e).__name__}: {e}"
        write_json(point_dir / TPF_FILE, {"key": key, "value": value, "prompts_used": fitted,
                                          "max_new_tokens_used": max_new})
        return value, None


def point_task_scores(cfg, point_dir: Path) -> tuple[dict | None, str | None]:
    """``mtp.evals.task_eval.task_scores`` of a finished synthetic-task point (induction score,
    polynomial exact match in/out of distribution), cached in ``DIR/sweep_task.json`` per eval step
    and ``task_eval.SCORES_VERSION``;
    ``(None, None)`` for other data."""
    if not is_synthetic(str(cfg.data.source)):
        return None, None
    step = (read_json(point_dir / "eval.json") or {}).get("step")
    cache = read_json(point_dir / TASK_FILE)
    if isinstance(cache, dict) and cache.get("step") == step and cache.get("version") == SCORES_VERSION:
        return cache, None
    try:
        scores = task_scores(load_model(point_dir))
    except Exception as e:
        return None, f"{type(e).__name__}: {e}"
    write_json(point_dir / TASK_FILE, scores)
    return scores, None


def collect(config_path: str | Path, points: list[Point], root: str | Path,
            outcome: SweepOutcome | None = None, tpf: TokensPerForward | None = None) -> list[dict]:
    """One results row per point, from its config, eval.json, metrics.jsonl and sweep_point.json."""
    root = Path(root)
    outcome = outcome or SweepOutcome()
    rows = []
    for point in points:
        cfg = point_config(config_path, point, root)
        d = point.workdir(root)
        spec = ModelSpec.from_config(cfg.model)
        result = read_json(d / "eval.json") or {}
        finished = is_finished(d, cfg.train.steps)
        state = read_json(d / POINT_FILE) or {}
        attempts = state.get("attempts", [])
        if finished:
            status = "finished"
        elif point.name in outcome.failed or (attempts and attempts[-1].get("status") == "failed"):
            status = "failed"
        else:
            status = "pending"
        train = [r for r in read_metrics(d) if r.get("split") == "train"]
        step_time = _mean(r.get("perf/step_time_s") for r in train)
        walls = [a["wall_s"] for a in attempts if a.get("wall_s") is not None]
        row = {
            "point": point.name,
            "label": point.label,
            "overrides": dict(point.assignment),
            "n_future": cfg.model.n_future,
            "parameter_matched": bool(cfg.model.parameter_matched),
            "params": spec.param_count(),
            "trunk_layers": spec.trunk_layers,
            "status": status,
            "steps": cfg.train.steps,
            "step": result.get("step"),
            "val_loss": result.get("loss") if finished else None,
            "val_acc": result.get("acc") if finished else None,
            "step_time_s": step_time,
            "tokens_per_s": _mean(r.get("perf/tokens_per_s") for r in train),
            "train_time_s": step_time * cfg.train.steps if step_time is not None else None,
            "wall_s": sum(walls) if walls else None,
            "tokens_per_forward": None,
            "tokens_per_forward_error": None,
            "task": None,
            "task_error": None,
            "error": None,
            "workdir": str(d),
        }
        if finished and tpf is not None:
            row["tokens_per_forward"], row["tokens_per_forward_error"] = tpf(cfg, d)
        if finished:
            row["task"], row["task_error"] = point_task_scores(cfg, d)
        if status == "failed":
            last = next((a for a in reversed(attempts) if a.get("status") == "failed"), {})
            row["error"] = outcome.failed.get(point.name) or last.get("error")
            row["error_tail"] = last.get("tail", "")
        rows.append(row)
    return rows


def write_sweep_file(root: Path, meta: dict) -> None:
    write_json(Path(root) / SWEEP_FILE, meta)
