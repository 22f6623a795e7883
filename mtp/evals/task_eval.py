"""Task accuracy of a model trained on a synthetic task (induction, polynomial arithmetic).

``mtp eval --workdir DIR --task [--examples N] [--step S] [--mode greedy|speculative]`` decodes
the first ``N`` held-out examples of the run's own task (``data.source``) and scores them with the
task's evaluator (``mtp.data.synthetic.evaluate_task``): induction = the fraction of the pattern
copied correctly, polynomial = exact match of the answer. ``--step`` evaluates an older checkpoint
(learning curves of the task itself, not just of the loss).
"""

from __future__ import annotations

import time

from mtp.data import synthetic as syn
from mtp.decode.api import generate_texts


def evaluate_task_accuracy(loaded, n_examples: int = 200, split: str = "validation", mode: str = "greedy",
                           heads: int | None = None, batch_size: int = 32) -> dict:
    """``{'task', 'accuracy', 'n', 'step', 'seconds'}`` of a loaded synthetic-task workdir."""
    task = str(loaded.cfg.data.source)
    if not syn.is_synthetic(task):
        raise ValueError(f"{task!r} is not a synthetic task (data.source is one of"
                         f" {tuple(syn.SCORERS)} for those); --task evaluates runs of configs/induction.py or"
                         " configs/polynomial.py. For other runs use mtp eval without --task.")
    examples = syn.task_examples(loaded.cfg.data, split)[:n_examples]
    if not examples:
        raise ValueError(f"the {split} split of {task!r} has no examples; raise data.synthetic_val_examples.")
    longest = max(len(loaded.tokenizer.encode(e.answer)) for e in examples)

    def generate_fn(prompts: list[str]) -> list[str]:
        return generate_texts(loaded, prompts, mode=mode, heads=heads, max_new_tokens=longest + 2,
                              batch_size=batch_size)

    start = time.perf_counter()
    result = syn.evaluate_task(task, generate_fn, examples)
    return {"task": task, **result, "step": loaded.step, "split": split, "mode": mode,
            "seconds": time.perf_counter() - start}
