"""``mtp train``: prepare (validate, data, the train program) -> restore or init -> steps with hooks
-> the per-head evaluation table on the held-out split -> (2+ heads, ``train.calibrate``) the decode
artifacts of ``mtp calibrate`` (draft vocabulary, a calibrated draft tree) in the workdir.

The loop itself only feeds batches to the train step; everything a run does around the steps
(progress bar and metrics, evaluation, checkpoints, the data-hash log) is a hook registered with
``every=N``, in the spirit of Levanter's ``add_hook``. ``train()`` returns a ``TrainResult``
(finished or preempted) and never exits the process; the CLI turns it into an exit code.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import jax
import numpy as np
from jax.experimental import multihost_utils
from tqdm import tqdm

from mtp.config import ConfigError, validate
from mtp.data.pipeline import make_dataset
from mtp.data.prepare import PreparedData, prepare_data
from mtp.decode.calibrate import calibrate_workdir
from mtp.decode.draft_vocab import save_order, split_order
from mtp.distributed import process_zero_first
from mtp.log import log
from mtp.perf import peak_flops
from mtp.train.checkpoint import Checkpointer, NoUsableCheckpoint, save_json
from mtp.train.distill import distill_data_config, distill_dir, ensure_distilled
from mtp.train.init_from import (
    check_source_model,
    ensure_source,
    init_params,
    merge_fresh,
    needs_fresh,
    trainable_count,
)
from mtp.train.metrics import MetricWriter
from mtp.train.program import TrainProgram, build_program
from mtp.train.state import fresh_params
from mtp.workdir import (
    check_resumable,
    check_writable,
    ever_checkpointed,
    load_model,
    resolve_workdir,
    write_run_files,
)


@dataclasses.dataclass
class TrainResult:
    """What ``train()`` ends with: the last step, whether a preemption stopped it early, and the
    held-out evaluation (None when preempted)."""

    step: int
    preempted: bool
    workdir: Path
    evaluation: dict | None = None


@dataclasses.dataclass
class StepInfo:
    """What a hook sees after a step was dispatched."""

    step: int  # steps done, this one included
    state: dict
    metrics: dict  # device arrays; fetch with jax.device_get
    batch: dict  # this process's rows of the batch (host arrays)
    last: bool  # the final step of the run


class Hooks:
    """Callbacks run after every ``every``-th step (and after the last one when ``at_end``)."""

    def __init__(self):
        self._hooks: list[tuple[Callable[[StepInfo], None], int, bool]] = []

    def add(self, fn: Callable[[StepInfo], None], every: int = 1, at_end: bool = True) -> None:
        if every > 0:
            self._hooks.append((fn, every, at_end))

    def run(self, info: StepInfo) -> None:
        for fn, every, at_end in self._hooks:
            if info.step % every == 0 or (at_end and info.last):
                fn(info)


@dataclasses.dataclass
class Run:
    """A prepared run: config, workdir, data, the train program and the source model (if any)."""

    cfg: object
    workdir: Path
    data: PreparedData
    program: TrainProgram
    source: Path | None
    token_order: np.ndarray | None = None  # loss.draft_vocab: train token ids, most frequent first

    def dataset(self, split: str, seed: int) -> Iterator[dict]:
        # Every process builds the same global batches and keeps its own rows: the run is the same
        # for any process count, and the data-iterator state (saved by process 0) is every process's.
        # Token shards (tokens:DIR) are the exception: in training each process reads its own files
        # (sharded_by_files), and the checkpoint keeps every process's iterator state (data_state).
        t = self.cfg.train
        return iter(make_dataset(self.cfg.data, split, self.data.tokenizer, seed=seed, seq_len=t.seq_len,
                                 batch_size=t.batch_size // jax.process_count(),
                                 process_index=jax.process_index(), process_count=jax.process_count(),
                                 shard_by="documents" if self.sharded_by_files(split) else "rows",
                                 source=self.data.tokens[split]))

    def sharded_by_files(self, split: str) -> bool:
        source = self.data.tokens[split]
        parts = getattr(source, "parts", (source,))
        return split == "train" and jax.process_count() > 1 and all(hasattr(p, "share") for p in parts)

    def global_batch(self, local: dict) -> dict:
        sharding = self.program.batch_sharding
        return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v, np.int32))
                for k, v in local.items() if k != "source_ids"}

    def evaluate(self, params) -> dict:
        """Token-weighted per-head loss and top-1 accuracy over ``train.eval_batches`` held-out batches."""
        it = self.dataset("validation", seed=1234)
        total = None
        for _ in range(self.cfg.train.eval_batches):
            aux = jax.device_get(self.program.eval_step(params, self.global_batch(next(it))))
            total = aux if total is None else jax.tree.map(np.add, total, aux)
        count = np.maximum(total["count"], 1.0)
        return {"loss": (total["sum_ce"] / count).tolist(), "acc": (total["sum_correct"] / count).tolist(),
                "tokens": total["count"].tolist()}


# --- prepare -------------------------------------------------------------------------------------
def prepare(cfg) -> Run:
    """Everything that can fail on bad input, before any state exists or any file is written:
    validation, the workdir's compatibility, the source model, data, and the train program."""
    validate(cfg, jax.device_count(), jax.process_count())
    workdir = resolve_workdir(cfg)
    check_resumable(workdir, cfg)
    if jax.process_index() == 0:
        check_writable(workdir)
    source = ensure_source(cfg.init)  # init.workdir (converted first when init.gguf/init.hf say so)
    n_source_heads = check_source_model(source, cfg.model) if source else 0
    with process_zero_first("prepare_data"):  # process 0 builds the shared cache; the rest reuse it
        data = prepare_data(cfg.data)
    if cfg.distill.enabled:  # train on the model's own continuations (mtp/train/distill.py), generated first
        ensure_distilled(cfg, data=data)
        data = prepare_data(distill_data_config(cfg.data, distill_dir(cfg)))
    if data.tokenizer.vocab_size != cfg.model.vocab_size:
        raise ConfigError(f"The tokenizer has {data.tokenizer.vocab_size} tokens but model.vocab_size="
                          f"{cfg.model.vocab_size}. Set model.vocab_size={data.tokenizer.vocab_size}.")
    _check_corpus_size(cfg, data)
    order = None
    if cfg.loss.draft_vocab:  # heads 2..n learn over the N most frequent train tokens (draft_vocab.npy)
        order = split_order(data.tokens["train"], cfg.model.vocab_size)
    program = build_program(cfg, n_source_heads=n_source_heads, token_order=order)
    return Run(cfg, workdir, data, program, source, order)


def _check_corpus_size(cfg, data: PreparedData) -> None:
    t = cfg.train
    need = t.batch_size * t.seq_len
    have = int((data.stats or {}).get("train", {}).get("tokens", need))
    if have < need:
        raise ConfigError(
            f"The train split of data.source={cfg.data.source!r} holds {have} tokens, fewer than one batch"
            f" (train.batch_size={t.batch_size} x train.seq_len={t.seq_len} = {need}): every step would"
            " repeat the same few tokens. Use a larger corpus, or lower train.batch_size / train.seq_len.")


def restore_or_init(run: Run, restart: bool = False) -> tuple[int, dict, dict | None, Checkpointer]:
    """``(start step, state, data-iterator state, checkpointer)``: the newest readable checkpoint,
    else a fresh state (from the source model's weights when ``init.workdir`` is set). A workdir
    that ever held a checkpoint does not start over unless ``restart``."""
    p, t = run.program, run.cfg.train
    ckpt = Checkpointer(run.workdir / "checkpoints", keep=t.keep_checkpoints)
    try:
        restored = ckpt.restore_latest(p.layout.abstract, p.layout.shardings)
    except NoUsableCheckpoint:
        if not restart:
            ckpt.close()
            raise
        restored = None
    if restored is not None:
        start, state, data_state, _ = restored
        if restart:
            ckpt.close()
            raise ConfigError(f"--restart: {ckpt.directory}/{start} is a readable checkpoint, and the run"
                              " resumes from it without --restart. To start over, use a new --workdir.")
        log(f"Resumed from {ckpt.directory}/{start} (step {int(state['step'])}).")
        return start, state, data_state, ckpt
    if ever_checkpointed(run.workdir) and not restart:
        ckpt.close()
        raise ConfigError(
            f"{run.workdir} held checkpoints before, but none is there now (damaged ones are kept as"
            f" {ckpt.directory}/*.damaged-*): refusing to start over from step 0. Restore the checkpoints,"
            " or start over explicitly with `mtp train --restart` (or use a new --workdir).")
    if run.source is None:
        return 0, p.init(), None, ckpt
    # The source's values; only the leaves it lacks (new heads, LoRA, mix) are drawn.
    loaded = init_params(run.source, p.layout.abstract["params"], run.cfg.init.new_heads)
    params = merge_fresh(loaded, fresh_params(p.spec, run.cfg.seed, needs_fresh(loaded)))
    return 0, p.init(jax.device_put(params, p.layout.shardings["params"])), None, ckpt


# --- hooks ---------------------------------------------------------------------------------------
class ProgressHook:
    """Progress bar, throughput and metrics (``metrics.jsonl``, TensorBoard) every ``log_every`` steps."""

    def __init__(self, run: Run, writer: MetricWriter, start: int):
        self.run, self.writer = run, writer
        t, spec = run.cfg.train, run.program.spec
        self.tokens_per_step = t.batch_size * t.seq_len
        self.flops_per_token = spec.flops_per_token(t.seq_len, run.cfg.loss.get("mask_anchors", 0))
        self.peak, _ = peak_flops(run.cfg.perf, run.cfg.model.dtype)
        self.bar = tqdm(total=t.steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
                        disable=jax.process_index() != 0, file=sys.stderr)
        self.window_start, self.window_steps = None, 0

    def every_step(self, info: StepInfo) -> None:
        self.window_steps += 1
        self.bar.update(1)
        if self.window_start is None:  # the first step compiles; time from the second on
            jax.block_until_ready(info.metrics)
            self.window_start, self.window_steps = time.perf_counter(), 0

    def log(self, info: StepInfo) -> None:
        metrics = jax.device_get(info.metrics)
        if self.window_steps:
            elapsed = time.perf_counter() - self.window_start
            tps = self.window_steps * self.tokens_per_step / elapsed
            metrics.update({"perf/tokens_per_s": tps, "perf/step_time_s": elapsed / self.window_steps,
                            "perf/flops_per_s": tps * self.flops_per_token,
                            "perf/mfu": tps * self.flops_per_token / self.peak})
            self.window_start, self.window_steps = time.perf_counter(), 0
        self.writer.write(info.step, metrics)
        heads = " ".join(f"h{i + 1}={metrics[f'loss/head_{i + 1}']:.3f}"
                         for i in range(self.run.program.spec.n_future) if f"loss/head_{i + 1}" in metrics)
        self.bar.set_postfix_str(f"loss={metrics['loss/total']:.3f} {heads}", refresh=False)

    def close(self) -> None:
        self.bar.close()


class DataHashHook:
    """``WORKDIR/data_log.jsonl``: a hash of each step's batch, so ``mtp bench faults`` can check that
    a resumed run saw exactly the batches of an uninterrupted one."""

    def __init__(self, workdir: Path):
        self.file = (workdir / "data_log.jsonl").open("a") if jax.process_index() == 0 else None

    def __call__(self, info: StepInfo) -> None:
        if self.file is not None:
            digest = hashlib.sha1(np.ascontiguousarray(info.batch["tokens"]).tobytes()).hexdigest()[:16]
            self.file.write(json.dumps({"step": info.step, "tokens_sha1": digest}) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


class SourceTokensHook:
    """A mixture's tokens seen per source since this process started (``data/tokens/<source>``, summed
    over processes), written to the metrics every ``log_every`` steps."""

    def __init__(self, names: tuple[str, ...], writer: MetricWriter):
        self.names, self.writer, self.counts = names, writer, np.zeros(len(names), np.int64)

    def every_step(self, info: StepInfo) -> None:
        real = np.asarray(info.batch["segment_ids"]) > 0
        self.counts += np.bincount(np.asarray(info.batch["source_ids"])[real], minlength=len(self.names))

    def log(self, info: StepInfo) -> None:
        counts = self.counts
        if jax.process_count() > 1:
            counts = multihost_utils.process_allgather(counts).sum(0)
        self.writer.write(info.step, {f"data/tokens/{name}": n for name, n in zip(self.names, counts)})


def iterator_state(iterator, per_process: bool) -> dict:
    """The iterator state to checkpoint: every process's when each reads its own files."""
    state = iterator.get_state()
    if not per_process:
        return state
    encoded = np.frombuffer(json.dumps(state).encode(), np.uint8)
    size = int(multihost_utils.process_allgather(np.asarray(len(encoded))).max())
    gathered = multihost_utils.process_allgather(np.pad(encoded, (0, size - len(encoded)), constant_values=32))
    return {"per_process": [json.loads(bytes(row).decode()) for row in gathered]}


class Preemption:
    """SIGTERM (a preemption notice) asks the loop to checkpoint at the next step and stop. Installed
    for the duration of a ``with`` block; the previous handler is restored after it."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> Preemption:
        with contextlib.suppress(ValueError):  # not the main thread (e.g. a test runner): nothing to install
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, *_):
        self.requested = True

    def should_stop(self, step: int, log_every: int) -> bool:
        if jax.process_count() == 1:
            return self.requested
        # A notice that reached some processes must stop them all (ckpt.save is collective); agreeing
        # costs a host sync, so it happens at logging steps only.
        if step % log_every:
            return False
        return bool(np.any(multihost_utils.process_allgather(np.asarray(self.requested))))


# --- train ---------------------------------------------------------------------------------------
def train(cfg, restart: bool = False) -> TrainResult:
    """Run (or resume) training for ``cfg``; returns where it stopped and the held-out evaluation."""
    run = prepare(cfg)
    p, t, spec = run.program, cfg.train, run.program.spec
    start, state, data_state, ckpt = restore_or_init(run, restart)
    train_iter = run.dataset("train", seed=cfg.seed)
    per_process = run.sharded_by_files("train")
    if data_state:
        train_iter.set_state(data_state["per_process"][jax.process_index()] if per_process else data_state)
    write_run_files(run.workdir, cfg, run.data.tokenizer)  # only now: a failed start leaves nothing behind
    if run.token_order is not None and jax.process_index() == 0:  # what decoding drafts among
        log(f"loss.draft_vocab: heads 2..n learn over the {cfg.loss.draft_vocab} most frequent train tokens"
            f" ({save_order(run.workdir, run.token_order)})")

    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    log(f"Model: {n_params / 1e6:.2f}M parameters, n_future={spec.n_future} ({spec.head_type} heads),"
        f" trunk {spec.trunk_layers} layers; mesh {dict(p.mesh.shape)}; workdir {run.workdir}")
    if p.trainable is not None:
        n_train = trainable_count(p.layout.abstract["params"], p.trainable, p.update_scale)
        log(f"Trainable ({t.trainable}): {n_train / 1e6:.2f}M parameters; the rest stay frozen.")

    writer = MetricWriter(run.workdir, tensorboard=t.tensorboard)
    progress = ProgressHook(run, writer, start)
    hooks = Hooks()
    closers = [progress.close]
    if t.log_data_hashes:
        data_hashes = DataHashHook(run.workdir)
        hooks.add(data_hashes)
        closers.append(data_hashes.close)
    hooks.add(progress.every_step)
    hooks.add(progress.log, every=t.log_every)
    mixture = getattr(run.data.tokens["train"], "names", None)
    if mixture:
        source_tokens = SourceTokensHook(mixture, writer)
        hooks.add(source_tokens.every_step)
        hooks.add(source_tokens.log, every=t.log_every)

    def evaluate(info: StepInfo) -> None:
        if not info.last:  # the final evaluation comes after the loop
            writer.write(info.step, _eval_scalars(run.evaluate(info.state["params"])), split="validation")

    hooks.add(evaluate, every=t.eval_every, at_end=False)
    hooks.add(lambda i: ckpt.save(i.step, i.state, iterator_state(train_iter, per_process), {"step": i.step},
                                        force=True),
              every=t.checkpoint_every)

    step, preempted = start, False
    try:
        with Preemption() as preemption:
            while step < t.steps:
                local = next(train_iter)
                state, metrics = p.train_step(state, run.global_batch(local))
                step += 1
                hooks.run(StepInfo(step, state, metrics, local, last=step == t.steps))
                if preemption.should_stop(step, t.log_every):
                    if step % t.checkpoint_every and step != t.steps:
                        ckpt.save(step, state, iterator_state(train_iter, per_process), {"step": step}, force=True)
                    preempted = True
                    break
    except BaseException:
        writer.close()
        raise
    finally:
        for close in closers:
            close()
        ckpt.close()
    if preempted:
        writer.close()
        log(f"SIGTERM: saved a checkpoint at step {step}; stopping. Rerun the same command to resume.")
        return TrainResult(step, True, run.workdir)

    result = run.evaluate(state["params"])
    writer.write(step, _eval_scalars(result), split="validation")
    writer.close()
    peak, peak_src = peak_flops(cfg.perf, cfg.model.dtype)
    result.update(step=step, peak_flops=peak, peak_source=peak_src)
    if t.log_data_hashes:  # a bitwise fingerprint of the final parameters (resume checks)
        result["params_sha1"] = params_digest(state["params"])
    if jax.process_index() == 0:
        save_json(run.workdir / "eval.json", result)
        source = f"tokens:{distill_dir(cfg)}" if cfg.distill.enabled else cfg.data.source
        print(f"\nHeld-out split ({source}, validation), step {step}:\n{format_table(result)}")
    if t.calibrate and spec.n_future >= 2:
        calibrate_after_training(run.workdir)
    return TrainResult(step, False, run.workdir, result)


def calibrate_after_training(workdir: Path) -> None:
    """``mtp calibrate`` on the trained model (its newest checkpoint: the final step), so decoding
    finds the draft vocabulary and a calibrated tree; a multi-process run leaves it to the command."""
    if jax.process_count() > 1:
        log(f"train.calibrate: not in a multi-process run; run `mtp calibrate --workdir {workdir}` on one host.")
        return
    t = time.perf_counter()
    try:
        calibrate_workdir(load_model(workdir), workdir, log=log)
    except Exception as e:  # noqa: BLE001 - the trained model is saved; the artifacts can be made later
        log(f"train.calibrate: the decode artifacts could not be made ({type(e).__name__}: {e}). The trained model"
            f" is saved; fix that and run `mtp calibrate --workdir {workdir}`, or set train.calibrate=False.")
        return
    log(f"Decode artifacts written in {time.perf_counter() - t:.1f} s (train.calibrate=False skips this;"
        f" `mtp calibrate --workdir {workdir}` redoes it).")


def format_table(result: dict) -> str:
    rows = ["head  predicts  loss     ppl       top1-acc  tokens",
            "----  --------  -------  --------  --------  -------"]
    for i, (loss, acc, n) in enumerate(zip(result["loss"], result["acc"], result["tokens"])):
        rows.append(f"{i + 1:<4}  t+{i + 1:<6}  {loss:7.4f}  {np.exp(loss):8.2f}  {acc:8.4f}  {int(n):7d}")
    return "\n".join(rows)


def params_digest(params) -> str:
    """SHA-1 over every parameter's bytes in tree order: equal digests = bitwise-equal models."""
    h = hashlib.sha1()
    for leaf in jax.tree.leaves(params):
        if not leaf.is_fully_addressable:  # multi-process: gather the global array first
            leaf = multihost_utils.process_allgather(leaf, tiled=True)
        h.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())
    return h.hexdigest()


def _eval_scalars(result: dict) -> dict:
    out = {}
    for i, (loss, acc) in enumerate(zip(result["loss"], result["acc"])):
        out[f"loss/head_{i + 1}"], out[f"acc/head_{i + 1}"] = loss, acc
    return out
