"""A draft vocabulary: the drafting heads pick among the N most frequent tokens only.

With a large vocabulary and a small model, the drafting heads' unembedding costs as much as the
trunk: SmolLM2-135M's is 49152 x 576 (28M weights) per head against 106M in all 30 layers, so 3
drafting heads read it 3 times per speculative step. Drafts only propose tokens: head 1 checks each
one over the whole vocabulary, so drafting among the N most frequent tokens of the training data
changes the output not at all, and acceptance only where the right token is a rare one (the idea of
frequency-ranked drafting, as in FR-Spec, Zhao et al. 2025).

The token order is counted once on the train split of the workdir's data config and kept in the
workdir (``draft_vocab.npy``: every token id, most frequent first).
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


def frequency_order(data_cfg, vocab_size: int) -> np.ndarray:
    """Every token id, most frequent on the train split first (ties: lower id first)."""
    data = prepare_data(data_cfg)
    tokens = np.asarray(data.tokens["train"].tokens)
    if tokens.size == 0:
        raise ValueError("the train split has no tokens to count; a draft vocabulary needs data.")
    if tokens.max() >= vocab_size:
        raise ValueError(f"the data's token ids reach {tokens.max()}, beyond the model's vocabulary"
                         f" ({vocab_size}): the data config's tokenizer is not the model's.")
    counts = np.bincount(tokens, minlength=vocab_size)
    return np.argsort(-counts, kind="stable").astype(np.int32)


def load_order(loaded) -> np.ndarray:
    """The workdir's token frequency order, counted (and saved) on first use."""
    if loaded.workdir is None:
        raise ValueError("a draft vocabulary needs a model loaded from a workdir (it keeps the token"
                         " counts there); pass draft_vocab=0 to draft over the whole vocabulary.")
    path = Path(loaded.workdir) / FILE
    V = loaded.spec.vocab_size
    if path.is_file():
        order = np.load(path)
        if order.shape == (V,):
            return order
        print(f"[mtp] {path} has {order.shape} ids, not ({V},): counting again.", file=sys.stderr)
    print(f"[mtp] counting token frequencies on the train split for the draft vocabulary -> {path}",
          file=sys.stderr, flush=True)
    order = frequency_order(loaded.cfg.data, V)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
    np.save(tmp, order)
    os.replace(tmp, path)
    return order


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
    """The sorted ids of the ``size`` most frequent tokens (``resolve_size``), or None for all."""
    n = resolve_size(loaded, size)
    if not n:
        return None
    return tuple(int(i) for i in np.sort(load_order(loaded)[:n]))
