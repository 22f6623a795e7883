"""``mtp bench data``: tokens/s the input pipeline delivers (the config's data: text files, KIND:...
sources, tokens:DIR, mixtures) beside the train step's tokens/s on random batches of the same shape
(``bench_one`` of ``mtp bench train``). The pipeline should outrun the step by a wide margin, or the
accelerator waits on the host.
"""

from __future__ import annotations

import json
import sys
import time

import jax

from mtp.bench.train_bench import bench_one
from mtp.config import validate
from mtp.data.pipeline import make_dataset
from mtp.data.prepare import prepare_data


def pipeline_tokens_per_s(cfg, data, seconds: float = 5.0, warmup: int = 3) -> dict:
    """Batches of the train split pulled for ``seconds`` (after ``warmup`` batches) on this process."""
    t = cfg.train
    batch_size = t.batch_size // jax.process_count()
    it = iter(make_dataset(cfg.data, "train", data.tokenizer, seq_len=t.seq_len, batch_size=batch_size,
                           seed=cfg.seed, source=data.tokens["train"]))
    for _ in range(warmup):
        next(it)
    batches, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        next(it)
        batches += 1
    return {"batches": batches, "seconds": elapsed, "tokens_per_s": batches * batch_size * t.seq_len / elapsed}


def run_data_bench(cfg, seconds: float = 5.0, steps: int = 5, as_json: bool = False) -> dict:
    validate(cfg, jax.device_count(), jax.process_count())
    data = prepare_data(cfg.data)
    source = cfg.data.source or f"mixture of {len(cfg.data.mixture)}"
    pipeline = pipeline_tokens_per_s(cfg, data, seconds)
    print(f"[bench] data {source}: {pipeline['tokens_per_s']:,.0f} tokens/s ({pipeline['batches']} batches of"
          f" {cfg.train.batch_size}x{cfg.train.seq_len} in {pipeline['seconds']:.1f} s)", file=sys.stderr)
    step = bench_one(cfg, steps)
    ratio = pipeline["tokens_per_s"] / step["tokens_per_s"]
    print(f"[bench] train step: {step['tokens_per_s']:,.0f} tokens/s; the pipeline delivers {ratio:.1f}x that",
          file=sys.stderr)
    result = {"source": source, "pipeline": pipeline, "train_step_tokens_per_s": step["tokens_per_s"],
              "ratio": ratio, "batch": [cfg.train.batch_size, cfg.train.seq_len], "backend": jax.default_backend()}
    if as_json:
        print(json.dumps(result, indent=1))
    return result
