"""Peak FLOP/s for MFU: from config (accelerators) or measured on this host (CPU matmul)."""

from __future__ import annotations

import functools
import time

import jax
import jax.numpy as jnp


@functools.cache
def measure_matmul_peak(n: int = 2048, repeats: int = 10, dtype: str = "float32") -> float:
    """Best achieved FLOP/s of an ``n x n @ n x n`` matmul on the default device (the best of
    ``repeats``: shared or frequency-scaled CPUs make single timings noisy)."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x: x @ x)
    f(a).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        f(a).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def peak_flops(perf_cfg, dtype: str = "float32") -> tuple[float, str]:
    """Peak FLOP/s of the whole job and where the number came from.

    ``perf.peak_flops_per_device`` (the vendor's number) wins when set. Otherwise the peak is a
    measured large matmul in the compute dtype: on CPU, simulated devices share the host's cores,
    so it is counted once per host; on accelerators once per device.
    """
    if perf_cfg.peak_flops_per_device > 0:
        return perf_cfg.peak_flops_per_device * jax.device_count(), "config"
    if jax.default_backend() == "cpu":
        return measure_matmul_peak(dtype=dtype) * jax.process_count(), "measured CPU matmul"
    n = 8192
    return measure_matmul_peak(n=n, dtype=dtype) * jax.device_count(), f"measured {n}^3 matmul"
