"""Evaluations: per-head loss/accuracy/acceptance (``heads_eval``), the HumanEval harness
(``humaneval``) with its sandbox (``sandbox``) and the unbiased pass@k estimator (``passk``).
The CLI parts (``mtp eval``, ``mtp humaneval``) are in ``cli``."""

from mtp.evals.passk import estimate_pass_at_k, mean_pass_at_k, pass_at_k

__all__ = ["estimate_pass_at_k", "mean_pass_at_k", "pass_at_k"]
