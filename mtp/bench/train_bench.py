"""``mtp bench train``: one row per (n_future, loss_impl) with step time, throughput, achieved
FLOP/s, MFU and the compiled step's memory.

Batches are random tokens of the config's shape (throughput does not depend on the text), so the
benchmark needs no corpus. ``peak_bytes`` is the compiled train step's temporary memory
(activations, logits, gradients and XLA workspace) from ``memory_analysis()``; the train state
(parameters + optimizer moments, donated and updated in place) is reported separately as
``state_bytes``.

``--parameter-matched`` times the paper's comparison in one run: n heads on n_layers-(n-1) trunk
layers (``model.parameter_matched``, the same parameter count) against one head on n_layers, and
reports the step-time ratio.
"""

from __future__ import annotations

import copy
import json
import sys
import time

import jax
import numpy as np

from mtp.config import LAYER_HEADS, ConfigError, validate
from mtp.perf import peak_flops
from mtp.train.program import build_program


def bench_one(cfg, steps: int) -> dict:
    validate(cfg, jax.device_count(), jax.process_count())
    program = build_program(cfg)
    spec, t = program.spec, cfg.train
    step_fn, batch_sh = program.train_step, program.batch_sharding
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, spec.vocab_size, (t.batch_size, t.seq_len), dtype=np.int32)
    batch = {"tokens": jax.device_put(tokens, batch_sh),
             "segment_ids": jax.device_put(np.ones_like(tokens), batch_sh)}
    state = program.init()
    compiled = step_fn.lower(state, batch).compile()
    mem = compiled.memory_analysis()
    state, metrics = compiled(state, batch)  # warm-up
    jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    step_time = float(np.median(times))
    tokens_per_s = t.batch_size * t.seq_len / step_time
    flops_per_s = tokens_per_s * spec.flops_per_token(t.seq_len, cfg.loss.get("mask_anchors", 0))
    peak, _ = peak_flops(cfg.perf, cfg.model.dtype)
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    return {
        "n_future": spec.n_future, "loss_impl": cfg.loss.impl, "step_time_s": step_time,
        "tokens_per_s": tokens_per_s, "flops_per_s": flops_per_s, "mfu": flops_per_s / peak,
        "peak_bytes": int(mem.temp_size_in_bytes) if mem is not None else None,
        "state_bytes": int(state_bytes), "param_count": spec.param_count(), "trunk_layers": spec.trunk_layers,
    }


def _print_row(row: dict) -> None:
    print(f"[bench] n={row['n_future']} {row['loss_impl']:4s} trunk {row['trunk_layers']}"
          f"  step {row['step_time_s'] * 1e3:8.1f} ms  {row['tokens_per_s']:9.0f} tok/s"
          f"  {row['flops_per_s'] / 1e9:7.1f} GFLOP/s  MFU {row['mfu']:.1%}"
          f"  temp {row['peak_bytes'] / 2**20:8.1f} MiB", file=sys.stderr)


def run_train_bench(cfg, heads: list[int], impls: list[str], steps: int = 5, as_json: bool = False):
    peak, source = peak_flops(cfg.perf, cfg.model.dtype)
    print(f"[bench] {jax.device_count()} {jax.default_backend()} device(s); peak {peak / 1e9:.1f}"
          f" GFLOP/s ({source}); batch {cfg.train.batch_size}x{cfg.train.seq_len}", file=sys.stderr)
    rows = []
    for n in heads:
        for impl in impls:
            c = copy.deepcopy(cfg)
            c.model.n_future, c.loss.impl, c.loss.head_weights = n, impl, ()
            row = bench_one(c, steps)
            row["peak_flops"] = peak
            rows.append(row)
            _print_row(row)
    if as_json:
        print(json.dumps(rows, indent=1))
    return rows


def parameter_matched_configs(cfg, n: int, impl: str):
    """The pair ``--parameter-matched`` times: one head on ``n_layers`` trunk layers, and ``n`` heads
    on ``n_layers - (n-1)`` (the paper's matching: each extra head is a transformer layer taken from
    the trunk, so both have the same parameters). Both are validated before anything is timed."""
    m = cfg.model
    if n < 2:
        raise ConfigError(f"parameter matching compares n >= 2 heads against one; got n={n}.")
    if m.head_type not in LAYER_HEADS:
        raise ConfigError(f"model.head_type={m.head_type!r} is invalid for --parameter-matched: it trades"
                          f" trunk layers for heads that are transformer layers; use one of {LAYER_HEADS}.")
    pair = []
    for n_future, matched in ((1, False), (n, True)):
        c = copy.deepcopy(cfg)
        c.model.n_future, c.model.parameter_matched = n_future, matched
        c.loss.impl, c.loss.head_weights = impl, ()
        if n_future == 1 and m.head_type == "causal":
            c.model.head_type = "transformer"  # one causal head is a transformer head (causal needs n >= 2)
        validate(c, jax.device_count(), jax.process_count())
        pair.append(c)
    return pair


def run_parameter_matched_bench(cfg, n: int = 4, impl: str = "scan", steps: int = 5, as_json: bool = False):
    """Times n heads parameter-matched against one head; returns ``{"rows", "parameter_matched"}``
    where ``step_time_ratio`` = the n-head row's step time / the one-head row's."""
    configs = parameter_matched_configs(cfg, n, impl)
    peak, source = peak_flops(cfg.perf, cfg.model.dtype)
    print(f"[bench] {jax.device_count()} {jax.default_backend()} device(s); peak {peak / 1e9:.1f}"
          f" GFLOP/s ({source}); batch {cfg.train.batch_size}x{cfg.train.seq_len}; parameter-matched"
          f" n={n} vs n=1", file=sys.stderr)
    rows = []
    for c in configs:
        row = bench_one(c, steps)
        row["peak_flops"] = peak
        rows.append(row)
        _print_row(row)
    one, many = rows
    summary = {
        "n_future": [one["n_future"], many["n_future"]],
        "trunk_layers": [one["trunk_layers"], many["trunk_layers"]],
        "param_count": [one["param_count"], many["param_count"]],
        "loss_impl": impl,
        "step_time_ratio": many["step_time_s"] / one["step_time_s"],
    }
    print(f"[bench] parameter-matched: n={n} on {many['trunk_layers']} trunk layer(s) takes"
          f" {summary['step_time_ratio']:.2f}x the step time of n=1 on {one['trunk_layers']}"
          f" ({many['param_count']:,} vs {one['param_count']:,} parameters)", file=sys.stderr)
    result = {"rows": rows, "parameter_matched": summary}
    if as_json:
        print(json.dumps(result, indent=1))
    return result
