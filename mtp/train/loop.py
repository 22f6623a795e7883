"""``mtp train``: validate -> data -> mesh + sharded state (fresh or resumed) -> jitted steps with
a progress bar, metrics, checkpoints -> per-head evaluation table on the held-out split."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import sys
import time
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from mtp.config import ConfigError, head_weights, rules_from_config, validate
from mtp.model.spec import ModelSpec
from mtp.perf import peak_flops
from mtp.sharding import batch_sharding, make_mesh
from mtp.train.checkpoint import Checkpointer, save_json
from mtp.train.init_from import (
    check_source_model,
    ensure_source,
    init_params,
    merge_fresh,
    needs_fresh,
    trainable_count,
    trainable_masks,
)
from mtp.train.metrics import MetricWriter
from mtp.train.optim import lr_schedule, make_optimizer
from mtp.train.state import fresh_params, make_layout
from mtp.train.step import make_eval_step, make_train_step


def log(msg: str) -> None:
    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)


def resolve_workdir(cfg) -> Path:
    return Path(cfg.workdir or f"runs/{cfg.name}").absolute()


def _check_same_model(workdir: Path, cfg) -> None:
    """Resuming with a different model/data shape would fail deep inside Orbax; say it plainly."""
    path = workdir / "config.json"
    if not path.exists():
        return
    old = json.loads(path.read_text())
    ignored = {"cache_dir"}  # where the cache lives does not change the run
    for section in ("model", "data"):
        saved = old.get(section, {})
        now = {k: list(v) if isinstance(v, tuple) else v for k, v in cfg[section].to_dict().items()}
        # keys the saved run did not have yet (added to the schema later) keep their defaults
        diff = {k: (saved[k], v) for k, v in now.items() if k not in ignored and k in saved and saved[k] != v}
        if diff:
            raise ConfigError(
                f"{workdir} holds a run with a different {section} config (key: (saved, now)):"
                f" {diff}. Resume with the same config, or pass a new --workdir.")


def global_batch(local: dict, sharding) -> dict:
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v, np.int32))
            for k, v in local.items()}


def evaluate(eval_step, params, batches, sharding, n_future: int) -> dict:
    """Token-weighted per-head loss and top-1 accuracy over ``batches``."""
    total = None
    for local in batches:
        aux = jax.device_get(eval_step(params, global_batch(local, sharding)))
        total = aux if total is None else jax.tree.map(np.add, total, aux)
    count = np.maximum(total["count"], 1.0)
    return {"loss": (total["sum_ce"] / count).tolist(), "acc": (total["sum_correct"] / count).tolist(),
            "tokens": total["count"].tolist()}


def format_table(result: dict) -> str:
    rows = ["head  predicts  loss     ppl       top1-acc  tokens",
            "----  --------  -------  --------  --------  -------"]
    for i, (loss, acc, n) in enumerate(zip(result["loss"], result["acc"], result["tokens"])):
        rows.append(f"{i + 1:<4}  t+{i + 1:<6}  {loss:7.4f}  {np.exp(loss):8.2f}  {acc:8.4f}  {int(n):7d}")
    return "\n".join(rows)


class _Preemption:
    """SIGTERM (a preemption notice) asks the loop to checkpoint at the next step and exit."""

    def __init__(self):
        self.requested = False
        try:
            signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. a test runner); nothing to install
            pass

    def _handle(self, *_):
        self.requested = True

    def agreed(self) -> bool:
        """True on every process when any process got the signal (``ckpt.save`` is collective)."""
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.asarray(self.requested))))


def train(cfg) -> dict:
    """Run (or resume) training for ``cfg``; returns the final held-out evaluation."""
    from mtp.data.pipeline import make_dataset
    from mtp.data.prepare import prepare_data

    validate(cfg, jax.device_count(), jax.process_count())
    workdir = resolve_workdir(cfg)
    workdir.mkdir(parents=True, exist_ok=True)
    _check_same_model(workdir, cfg)

    from mtp.distributed import process_zero_first

    source = ensure_source(cfg.init)  # init.workdir (converted first when init.gguf/init.hf say so)
    with process_zero_first("prepare_data"):  # process 0 builds the shared cache; the rest reuse it
        data = prepare_data(cfg.data)
    if data.tokenizer.vocab_size != cfg.model.vocab_size:
        raise ConfigError(f"The tokenizer has {data.tokenizer.vocab_size} tokens but model.vocab_size="
                          f"{cfg.model.vocab_size}. Set model.vocab_size={data.tokenizer.vocab_size}.")
    if jax.process_index() == 0:
        save_json(workdir / "config.json", cfg.to_dict())
        if data.tokenizer.path is None:  # the byte tokenizer: an empty marker file names it
            (workdir / "tokenizer.bytes").touch()
        elif data.tokenizer.path.name == "tokenizer.json":  # an imported model's tokenizer + sidecar
            for name in ("tokenizer.json", "tokenizer_config.json"):
                if (data.tokenizer.path.parent / name).exists():
                    shutil.copy(data.tokenizer.path.parent / name, workdir / name)
        else:
            shutil.copy(data.tokenizer.path, workdir / "tokenizer.model")

    spec = ModelSpec.from_config(cfg.model)
    mesh = make_mesh(cfg.mesh)
    rules = rules_from_config(cfg.sharding.rules)
    t = cfg.train
    n_source_heads = check_source_model(source, cfg.model) if source else 0
    from mtp.workdir import abstract_params

    trainable, update_scale = trainable_masks(abstract_params(spec)[1], t.trainable, n_source_heads,
                                              spec.n_future, cfg.optim.backbone_lr_scale)
    tx = make_optimizer(cfg.optim, t.steps, trainable, update_scale)
    schedule = lr_schedule(cfg.optim, t.steps)
    layout, init = make_layout(spec, tx, mesh, rules, cfg.seed)
    batch_sh = batch_sharding(mesh, rules)
    weights = head_weights(cfg.loss, spec.n_future)
    train_step = make_train_step(layout, tx, schedule, mesh, rules, cfg, weights, batch_sh, trainable)
    eval_step = make_eval_step(layout, mesh, rules, cfg, batch_sh)

    local_batch = t.batch_size // jax.process_count()
    # Every process builds the same global batches and keeps its own rows: the run is the same
    # for any process count, and the data-iterator state (saved by process 0) is every process's.
    common = dict(seq_len=t.seq_len, batch_size=local_batch, process_index=jax.process_index(),
                  process_count=jax.process_count(), shard_by="rows")
    train_iter = iter(make_dataset(cfg.data, "train", data.tokenizer, seed=cfg.seed,
                                   source=data.tokens["train"], **common))

    ckpt = Checkpointer(workdir / "checkpoints", keep=t.keep_checkpoints)
    restored = ckpt.restore_latest(layout.abstract, layout.shardings)
    if restored is not None:
        start, state, data_state, _ = restored
        if data_state:
            train_iter.set_state(data_state)
        log(f"Resumed from {ckpt.directory}/{start} (step {int(state['step'])}).")
    else:
        start = 0
        if source is None:
            state = init()
        else:  # the source's values; only the leaves it lacks (new heads, LoRA, mix) are drawn
            loaded = init_params(source, layout.abstract["params"], cfg.init.new_heads)
            params = merge_fresh(loaded, fresh_params(spec, cfg.seed, needs_fresh(loaded)))
            state = init(jax.device_put(params, layout.shardings["params"]))
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    log(f"Model: {n_params / 1e6:.2f}M parameters, n_future={spec.n_future} ({spec.head_type} heads),"
        f" trunk {spec.trunk_layers} layers; mesh {dict(mesh.shape)}; workdir {workdir}")
    if trainable is not None:
        n_train = trainable_count(layout.abstract["params"], trainable, update_scale)
        log(f"Trainable ({t.trainable}): {n_train / 1e6:.2f}M parameters; the rest stay frozen.")

    peak, peak_src = peak_flops(cfg.perf, cfg.model.dtype)
    flops_per_token = spec.flops_per_token(t.seq_len)
    writer = MetricWriter(workdir, tensorboard=t.tensorboard)
    preempt = _Preemption()
    tokens_per_step = t.batch_size * t.seq_len
    bar = tqdm(total=t.steps, initial=start, desc="train", unit="step", dynamic_ncols=True,
               disable=jax.process_index() != 0, file=sys.stderr)
    window_start, window_steps, step = None, 0, start
    data_log = None
    if t.log_data_hashes and jax.process_index() == 0:
        data_log = (workdir / "data_log.jsonl").open("a")
    try:
        while step < t.steps:
            local = next(train_iter)
            if data_log is not None:  # which data each step saw: checks exact resume (mtp bench faults)
                digest = hashlib.sha1(np.ascontiguousarray(local["tokens"]).tobytes()).hexdigest()[:16]
                data_log.write(json.dumps({"step": step + 1, "tokens_sha1": digest}) + "\n")
                data_log.flush()
            state, metrics = train_step(state, global_batch(local, batch_sh))
            step += 1
            window_steps += 1
            bar.update(1)
            if window_start is None:  # the first step compiles; time from the second on
                jax.block_until_ready(metrics)
                window_start, window_steps = time.perf_counter(), 0
            if step % t.log_every == 0 or step == t.steps:
                metrics = jax.device_get(metrics)
                if window_steps:
                    elapsed = time.perf_counter() - window_start
                    tps = window_steps * tokens_per_step / elapsed
                    metrics.update({"perf/tokens_per_s": tps, "perf/step_time_s": elapsed / window_steps,
                                    "perf/flops_per_s": tps * flops_per_token,
                                    "perf/mfu": tps * flops_per_token / peak})
                    window_start, window_steps = time.perf_counter(), 0
                writer.write(step, metrics)
                heads = " ".join(f"h{i + 1}={metrics[f'loss/head_{i + 1}']:.3f}"
                                 for i in range(spec.n_future) if f"loss/head_{i + 1}" in metrics)
                bar.set_postfix_str(f"loss={metrics['loss/total']:.3f} {heads}", refresh=False)
            if t.eval_every and step % t.eval_every == 0 and step < t.steps:
                result = evaluate(eval_step, state["params"], _eval_batches(cfg, data, common),
                                  batch_sh, spec.n_future)
                writer.write(step, _eval_scalars(result), split="validation")
            stop = preempt.requested
            if jax.process_count() > 1:
                # A notice that reached some processes must stop them all (ckpt.save is
                # collective); agreeing costs a host sync, so it happens at logging steps only.
                stop = step % t.log_every == 0 and preempt.agreed()
            if step % t.checkpoint_every == 0 or step == t.steps or stop:
                ckpt.save(step, state, train_iter.get_state(), {"step": step}, force=True)
            if stop:
                log(f"SIGTERM: saved a checkpoint at step {step}; exiting. Rerun the same command to resume.")
                ckpt.close()
                sys.exit(0)
    finally:
        bar.close()
        if data_log is not None:
            data_log.close()
    ckpt.close()

    result = evaluate(eval_step, state["params"], _eval_batches(cfg, data, common), batch_sh,
                      spec.n_future)
    writer.write(step, _eval_scalars(result), split="validation")
    writer.close()
    result.update(step=step, peak_flops=peak, peak_source=peak_src)
    if t.log_data_hashes:  # a bitwise fingerprint of the final parameters (resume checks)
        result["params_sha1"] = params_digest(state["params"])
    if jax.process_index() == 0:
        save_json(workdir / "eval.json", result)
        print(f"\nHeld-out split ({cfg.data.source}, validation), step {step}:\n{format_table(result)}")
    return result


def params_digest(params) -> str:
    """SHA-1 over every parameter's bytes in tree order: equal digests = bitwise-equal models."""
    h = hashlib.sha1()
    from jax.experimental import multihost_utils

    for leaf in jax.tree.leaves(params):
        if not leaf.is_fully_addressable:  # multi-process: gather the global array first
            leaf = multihost_utils.process_allgather(leaf, tiled=True)
        h.update(np.ascontiguousarray(jax.device_get(leaf)).tobytes())
    return h.hexdigest()


def _eval_batches(cfg, data, common):
    from mtp.data.pipeline import make_dataset

    it = iter(make_dataset(cfg.data, "validation", data.tokenizer, seed=1234,
                           source=data.tokens["validation"], **common))
    return (next(it) for _ in range(cfg.train.eval_batches))


def _eval_scalars(result: dict) -> dict:
    out = {}
    for i, (loss, acc) in enumerate(zip(result["loss"], result["acc"])):
        out[f"loss/head_{i + 1}"], out[f"acc/head_{i + 1}"] = loss, acc
    return out
