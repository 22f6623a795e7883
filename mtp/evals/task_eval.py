"""Task accuracy of a model trained on a synthetic task (induction, polynomial arithmetic).

``mtp eval --workdir DIR --task-scores [--step S]`` prints ``task_scores`` (teacher forced, what
``mtp sweep`` reports). ``mtp eval --workdir DIR --task [--examples N] [--step S] [--mode greedy|speculative]`` decodes
the first ``N`` held-out examples of the run's own task (``data.source``) and scores them with the
task's evaluator (``mtp.data.synthetic.evaluate_task``): induction = the fraction of the pattern
copied correctly, polynomial = exact match of the answer. ``--step`` evaluates an older checkpoint
(learning curves of the task itself, not just of the loss).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

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


# --- teacher-forced task scores (no decoding) -------------------------------------------------------
# The paper's induction score is the accuracy of the next-token head on given positions of the true
# text; polynomial exact match needs every answer token and the closing eos right. Both are read off
# ONE forward pass over the true text: greedy decoding reproduces an answer exactly iff head 1's argmax
# is right at every answer token (and at eos) after the true prefix, so the teacher-forced exact match
# equals `evaluate_task_accuracy`'s greedy one (up to argmax ties), at the cost of one forward.
@functools.partial(jax.jit, static_argnums=0)
def _argmax_head1(graphdef, state, tokens_BxT, segment_ids_BxT):
    model = nnx.merge(graphdef, state)
    return jnp.argmax(model(tokens_BxT, segment_ids_BxT)[0], axis=-1).astype(jnp.int32)


def teacher_forced_correct(loaded, texts: Sequence[str], offsets: Sequence[Sequence[int]],
                           batch_size: int = 64, argmax_fn=None) -> list[np.ndarray]:
    """Per text, whether head 1's argmax is the true token at each character offset of ``offsets``
    (offset ``len(text)`` = the eos that ends the document), given the true text before it
    (``teacher_forced_argmax``)."""
    return [pred == true for pred, true in teacher_forced_argmax(loaded, texts, offsets, batch_size, argmax_fn)]


def teacher_forced_argmax(loaded, texts: Sequence[str], offsets: Sequence[Sequence[int]],
                          batch_size: int = 64, argmax_fn=None) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per text, ``(predicted, true)`` token ids at each character offset of ``offsets`` (offset
    ``len(text)`` = the eos that ends the document): head 1's argmax given the true text before it.

    Each text is one document, ``tokens + [eos]``, as the training pipeline builds it. A character
    offset maps to the token that starts there (``len(encode(text[:offset]))``: exact for the byte
    tokenizer, where the synthetic tasks live). ``argmax_fn(tokens_BxT, segment_ids_BxT) -> [B, T]``
    replaces the model's head-1 argmax (tests)."""
    tok = loaded.tokenizer
    rows, index = [], []
    for text, offs in zip(texts, offsets):
        ids = [*tok.encode(text), tok.eos_id]
        idx = [len(ids) - 1 if o >= len(text) else len(tok.encode(text[:o])) for o in offs]
        if any(i < 1 for i in idx):
            raise ValueError("a scored offset is the document's first token, which nothing predicts")
        rows.append(ids)
        index.append(np.asarray(idx, np.int64))
    T = max(len(r) for r in rows)
    T = -(-T // 32) * 32
    if T > loaded.spec.max_seq_len:
        raise ValueError(f"a document of {max(len(r) for r in rows)} tokens exceeds model.max_seq_len="
                         f"{loaded.spec.max_seq_len}")
    if argmax_fn is None:
        graphdef, state = nnx.split(loaded.model)

        def argmax_fn(tokens, segments):
            return _argmax_head1(graphdef, state, jnp.asarray(tokens), jnp.asarray(segments))
    out: list[tuple[np.ndarray, np.ndarray]] = []
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        tokens = np.zeros((batch_size, T), np.int32)
        segments = np.zeros((batch_size, T), np.int32)
        for b, r in enumerate(chunk):
            tokens[b, :len(r)], segments[b, :len(r)] = r, 1
        pred = np.asarray(argmax_fn(tokens, segments))
        for b in range(len(chunk)):
            idx = index[start + b]
            out.append((pred[b, idx - 1], tokens[b, idx]))
    return out


def names_copied(stories, later, first) -> list[bool]:
    """Per later occurrence of a name (``teacher_forced_argmax`` at the stories' ``targets``, and
    ``first`` at their ``controls``), whether the prediction is the second token of any name whose
    first occurrence came before it."""
    out = []
    for e, (pred, _), (_, true_first) in zip(stories, later, first):
        for offset, p in zip(e.targets, pred):
            out.append(any(p == t for c, t in zip(e.controls, true_first) if c < offset))
    return out


def fresh_poly_examples(data_cfg, n: int) -> list:
    """``n`` in-distribution polynomial examples (ops ``data.poly_train_ops``) from a stream that
    neither split uses (short 1-op expressions can still coincide with training ones)."""
    return syn.polynomial_examples(n, ops=tuple(data_cfg.poly_train_ops),
                                   seed=[int(data_cfg.synthetic_seed), 1, 2])


SCORES_VERSION = 2  # raised when task_scores gains or changes a score: cached scores of older versions are redone


def task_scores(loaded, n_examples: int = 1000, n_stories: int = 500) -> dict:
    """Teacher-forced task scores of a synthetic-task workdir (floats in [0, 1]):

    - induction stories (the first ``n_stories`` validation stories, ~7.4 targets each):
      ``induction`` = accuracy on the second token of every later occurrence of a
      name (the paper's score), ``induction_control`` = the same token at first occurrences (copying
      cannot help there: chance is 1/26), ``induction_any_name`` = how often head 1 predicts, at
      those later occurrences, the second token of some name introduced before (the right one or
      another character's): copying without binding the letter to the name's initial reaches it,
      but only ``induction`` of it;
    - induction patterns: ``copy`` = accuracy on the copied pattern's tokens;
    - polynomial: ``exact_id`` / ``exact_ood`` = exact match (answer + eos) on fresh examples with the
      training op counts / on the validation split (``data.poly_test_ops``), ``token_id`` /
      ``token_ood`` = accuracy over the answer tokens.
    """
    cfg = loaded.cfg.data
    task = str(cfg.source)
    if not syn.is_synthetic(task):
        raise ValueError(f"{task!r} is not a synthetic task")
    val = syn.task_examples(cfg, "validation")[:n_examples]
    start = time.perf_counter()
    if task == syn.INDUCTION and str(cfg.induction_format) == syn.STORIES:
        val = val[:n_stories]
        both = teacher_forced_argmax(loaded, [e.text for e in val], [(*e.targets, *e.controls) for e in val])
        split = [len(e.targets) for e in val]  # one forward per story scores targets and controls
        later = [(p[:k], t[:k]) for (p, t), k in zip(both, split)]
        first = [(p[k:], t[k:]) for (p, t), k in zip(both, split)]
        out = {"induction": float(np.concatenate([p == t for p, t in later]).mean()),
               "induction_control": float(np.concatenate([p == t for p, t in first]).mean()),
               "induction_any_name": float(np.mean(names_copied(val, later, first))),
               "n_targets": int(sum(len(p) for p, _ in later))}
    elif task == syn.INDUCTION:
        offs = [range(len(e.prompt), len(e.text)) for e in val]
        out = {"copy": float(np.concatenate(teacher_forced_correct(loaded, [e.text for e in val], offs)).mean())}
    else:
        out = {}
        for name, examples in (("id", fresh_poly_examples(cfg, n_examples)), ("ood", val)):
            offs = [range(len(e.prompt), len(e.text) + 1) for e in examples]
            hits = teacher_forced_correct(loaded, [e.text for e in examples], offs)
            out[f"exact_{name}"] = float(np.mean([h.all() for h in hits]))
            out[f"token_{name}"] = float(np.concatenate(hits).mean())
        out["n"] = len(val)
    out.update(step=loaded.step, seconds=time.perf_counter() - start, version=SCORES_VERSION)
    return out
