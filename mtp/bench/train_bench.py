"""``mtp bench train``: one row per (n_future, loss_impl) with step time, throughput, achieved
FLOP/s, MFU and the compiled step's memory.

Batches are random tokens of the config's shape (throughput does not depend on the text), so the
benchmark needs no corpus. ``peak_bytes`` is the compiled train step's temporary memory
(activations, logits, gradients and XLA workspace) from ``memory_analysis()``; the train state
(parameters + optimizer moments, donated and updated in place) is reported separately as
``state_bytes``.
"""

from __future__ import annotations

import copy
import json
import sys
import time

import jax
import numpy as np

from mtp.config import validate
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
    flops_per_s = tokens_per_s * spec.flops_per_token(t.seq_len)
    peak, _ = peak_flops(cfg.perf, cfg.model.dtype)
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    return {
        "n_future": spec.n_future, "loss_impl": cfg.loss.impl, "step_time_s": step_time,
        "tokens_per_s": tokens_per_s, "flops_per_s": flops_per_s, "mfu": flops_per_s / peak,
        "peak_bytes": int(mem.temp_size_in_bytes) if mem is not None else None,
        "state_bytes": int(state_bytes), "param_count": spec.param_count(),
    }


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
            print(f"[bench] n={n} {impl:4s} step {row['step_time_s'] * 1e3:8.1f} ms"
                  f"  {row['tokens_per_s']:9.0f} tok/s  {row['flops_per_s'] / 1e9:7.1f} GFLOP/s"
                  f"  MFU {row['mfu']:.1%}  temp {row['peak_bytes'] / 2**20:8.1f} MiB", file=sys.stderr)
    if as_json:
        print(json.dumps(rows, indent=1))
    return rows
