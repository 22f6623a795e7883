"""A draft vocabulary: the drafting heads pick among the N most frequent tokens only.

With a large vocabulary and a small model, the drafting heads' unembedding costs as much as the
trunk: SmolLM2-135M's is 49152 x 576 (28M weights) per head against 106M in all 30 layers, so 3
drafting heads read it 3 times per speculative step. Drafts only propose tokens: head 1 checks each
one over the whole vocabulary, so drafting among the N most frequent tokens of the training data
changes the output not at all, and acceptance only where the right token is a rare one (the idea of
frequency-ranked drafting, as in FR-Spec, Zhao et al. 2025).

The token order is counted once on the train split of the workdir's data config and kept in the
workdir (``draft_vocab.npy``: every token id, most frequent first) by ``mtp calibrate`` (and at the
end of ``mtp train``); decoding only reads it. Without the file a default-sized draft vocabulary
falls back to the whole vocabulary (the same output, a little slower; one note says so), and an
explicit ``--draft-vocab N`` is an error naming the command.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

from mtp.data.prepare import prepare_data

FILE = "draft_vocab.npy"
AUTO_SIZE = 8192  # the default draft vocabulary for models whose vocabulary is >= 4x larger
AUTO_MIN_RATIO = 4


MAX_COUNTED = 50_000_000  # tokens counted at most (documents in order): plenty for a frequency ranking


def split_order(split_tokens, vocab_size: int) -> np.ndarray:
    """Every token id, most frequent in ``split_tokens`` (a prepared split: one flat token array, or
    a sequence of documents, e.g. ``tokens:`` shards) first; ties: lower id first."""
    if hasattr(split_tokens, "tokens"):
        tokens = np.asarray(split_tokens.tokens)[:MAX_COUNTED]
        counts = np.bincount(tokens, minlength=vocab_size) if tokens.size else np.zeros(0, np.int64)
        top = int(tokens.max()) if tokens.size else -1
    else:
        counts, seen, top = np.zeros(vocab_size, np.int64), 0, -1
        for doc in split_tokens:
            doc = np.asarray(doc)
            if doc.size:
                top = max(top, int(doc.max()))
                if top < vocab_size:
                    counts += np.bincount(doc, minlength=vocab_size)
            seen += doc.size
            if seen >= MAX_COUNTED or top >= vocab_size:
                break
    if top < 0:
        raise ValueError("the train split has no tokens to count; a draft vocabulary needs data.")
    if top >= vocab_size:
        raise ValueError(f"the data's token ids reach {top}, beyond the model's vocabulary"
                         f" ({vocab_size}): the data config's tokenizer is not the model's.")
    return np.argsort(-counts, kind="stable").astype(np.int32)


def frequency_order(data_cfg, vocab_size: int) -> np.ndarray:
    """Every token id, most frequent on the train split of ``data_cfg`` first (ties: lower id first)."""
    return split_order(prepare_data(data_cfg).tokens["train"], vocab_size)


def save_order(workdir, order: np.ndarray) -> Path:
    """``order`` as the workdir's ``FILE`` (atomically)."""
    path = Path(workdir) / FILE
    tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, np.asarray(order, np.int32))
    os.replace(tmp, path)
    return path


def write_order(loaded, log=None) -> Path:
    """Counts the workdir's token frequencies on the train split and saves them (``FILE``). A model
    whose heads trained over a draft vocabulary (``loss.draft_vocab``) keeps the order training wrote:
    decoding must draft among exactly the tokens the heads learned."""
    _need_workdir(loaded)
    log = log or (lambda *a: print(*a, file=sys.stderr))
    path = Path(loaded.workdir) / FILE
    if int(loaded.cfg.loss.get("draft_vocab", 0)) and load_order(loaded) is not None:
        log(f"Draft vocabulary: keeping {path} (the heads trained over its first"
            f" {int(loaded.cfg.loss.draft_vocab)} tokens, loss.draft_vocab)")
        return path
    log(f"Counting token frequencies on the train split for the draft vocabulary -> {path}")
    return save_order(loaded.workdir, frequency_order(loaded.cfg.data, loaded.spec.vocab_size))


def _need_workdir(loaded) -> None:
    if loaded.workdir is None:
        raise ValueError("a draft vocabulary needs a model loaded from a workdir (it keeps the token"
                         " counts there); pass draft_vocab=0 to draft over the whole vocabulary.")


def load_order(loaded) -> np.ndarray | None:
    """The workdir's token frequency order (``mtp calibrate`` writes it), or None when there is none
    for this vocabulary."""
    _need_workdir(loaded)
    path = Path(loaded.workdir) / FILE
    if not path.is_file():
        return None
    order = np.load(path)
    return order if order.shape == (loaded.spec.vocab_size,) else None


_NOTED: set = set()  # workdirs whose missing draft vocabulary was already noted


def resolve_size(loaded, size: int | None) -> int:
    """``size`` None: ``AUTO_SIZE`` when the vocabulary is at least ``AUTO_MIN_RATIO`` times larger
    and the model has a workdir, else 0 (the whole vocabulary)."""
    V = loaded.spec.vocab_size
    if size is None:
        return AUTO_SIZE if V >= AUTO_MIN_RATIO * AUTO_SIZE and loaded.workdir is not None else 0
    if size < 0:
        raise ValueError(f"draft_vocab={size}: use 0 (the whole vocabulary) or a number of tokens.")
    return 0 if size >= V else size


def draft_ids(loaded, size: int | None) -> tuple[int, ...] | None:
    """The sorted ids of the ``size`` most frequent tokens (``resolve_size``), or None for all. Without
    the workdir's ``FILE``: None (with one note) for the default size, an error for an explicit one."""
    n = resolve_size(loaded, size)
    if not n:
        return None
    order = load_order(loaded)
    if order is None:
        path = Path(loaded.workdir) / FILE
        fix = f"run `mtp calibrate --workdir {loaded.workdir}` first (it counts the train split's tokens)"
        if size is not None:
            raise ValueError(f"--draft-vocab {size} needs the workdir's token frequencies ({path}, missing or"
                             f" for another vocabulary): {fix}, or pass --draft-vocab 0.")
        if str(path) not in _NOTED:
            _NOTED.add(str(path))
            print(f"[mtp] note: no draft vocabulary in {loaded.workdir} ({FILE}): heads 2..k draft over the whole"
                  f" vocabulary (the same output, slower drafting); {fix}.", file=sys.stderr)
        return None
    return tuple(int(i) for i in np.sort(order[:n]))
