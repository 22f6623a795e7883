"""Grain pipeline: documents -> tokens -> packed rows with segment ids -> host-local batches.

Order of operations (per process): tokenized documents (+ eos, from the per-split token cache, or
encoded up front for a text `source`) -> pieces of at most `seq_len` tokens (`DocumentPieces`) ->
shard pieces -> shuffle (reseeded each epoch) -> repeat -> concat-then-split packing into
`seq_len` rows -> batch. Everything up to the
packing is index-based (a `MapDataset`), so the iterator state is tiny and `set_state` resumes
exactly; the packer records where its current row started and replays from there.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import ml_collections
import numpy as np
from absl import flags as absl_flags

from mtp.data.errors import DataError
from mtp.data.prepare import Mixture, tokenized_documents
from mtp.data.streaming import StreamedDocuments, streamed
from mtp.data.tokenizer import Tokenizer


def _tokenize_document(tokenizer: Tokenizer, document: np.ndarray | Mapping[str, Any]) -> dict[str, np.ndarray]:
    if isinstance(document, np.ndarray):  # Already tokenized, eos included.
        return {"tokens": document}
    text = document["text"]
    text = text.decode("utf-8") if isinstance(text, bytes) else text
    return {"tokens": np.asarray([*tokenizer.encode(text), tokenizer.eos_id], np.int32)}


def _tokenize(tokenizer: Tokenizer):
    # a partial, not a closure: it is pickled into the worker processes (data.workers)
    return functools.partial(_tokenize_document, tokenizer)


def _rename_packed(row: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    # ConcatThenSplit emits `tokens_segment_ids` (1, 2, ... per piece of a document within the
    # row, 0 where the final row is padded) and `tokens_positions`, which the model recomputes.
    packed = {"tokens": row["tokens"], "segment_ids": row["tokens_segment_ids"]}
    if "source_ids" in row:  # a mixture: which source each token came from (tokens seen per source)
        packed["source_ids"] = row["source_ids"]
    return packed


def _tag_document(index: int, piece: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {**piece, "source_ids": np.full(len(piece["tokens"]), index, np.int32)}


def _tag_source(index: int):
    return functools.partial(_tag_document, index)


def _lists_to_tuples(tree: Any) -> Any:
    if isinstance(tree, dict):  # the packer's parent (the document stream: mp_prefetch's state has lists) as is
        return {key: value if key == "parent_state" else _lists_to_tuples(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return tuple(_lists_to_tuples(value) for value in tree)
    return tree


class DocumentPieces(Sequence[np.ndarray]):
    """Every tokenized document cut into consecutive pieces of at most ``seq_len`` tokens.

    Shuffling pieces rather than whole documents mixes many files into every batch: source files
    run to thousands of tokens, so packing whole shuffled documents would fill a batch's rows from
    one or two files and make each step's gradient a sample of very few documents.
    """

    def __init__(self, documents: Sequence[np.ndarray], seq_len: int):
        self.documents, self.seq_len = documents, seq_len
        offsets = getattr(documents, "offsets", None)
        lengths = getattr(documents, "lengths", None)  # token shards know their documents' lengths
        if offsets is not None:
            lengths = np.diff(offsets)
        elif lengths is None:
            lengths = np.asarray([len(d) for d in documents], np.int64)
        counts = -(-lengths // seq_len)  # ceil
        self.doc_index = np.repeat(np.arange(len(lengths)), counts)
        first_piece = np.repeat(np.cumsum(counts) - counts, counts)
        self.start = (np.arange(len(self.doc_index)) - first_piece) * seq_len

    def __len__(self) -> int:
        return len(self.doc_index)

    def __getitem__(self, index: int) -> np.ndarray:
        doc, start = int(self.doc_index[index]), int(self.start[index])
        offsets = getattr(self.documents, "offsets", None)
        if offsets is not None:  # slice the memory-mapped token cache directly
            begin = int(offsets[doc]) + start
            return np.asarray(self.documents.tokens[begin: min(begin + self.seq_len,
                                                                int(offsets[doc + 1]))], np.int32)
        return np.asarray(self.documents[doc][start: start + self.seq_len], np.int32)


class _JsonStateIterator(grain.DatasetIterator):
    """Passes elements through; `set_state` accepts a state that went through JSON.

    Grain's ConcatThenSplit keeps `(start, stop)` slices in its state and tests "no remainder" with
    `slice != (-1, -1)`; after `json.dumps`/`loads` (what Orbax and `DatasetIterator.save` do) the
    slice is the list `[-1, -1]`, which compares unequal, and resume silently replays a stale
    document. Turning lists back into tuples restores the exact state.
    """

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._parent)

    def get_state(self) -> dict[str, Any]:
        return self._parent.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(_lists_to_tuples(state))


class _JsonStateIterDataset(grain.IterDataset):
    def __iter__(self) -> _JsonStateIterator:
        return _JsonStateIterator(self._parent.__iter__())


def make_dataset(
    data_cfg: ml_collections.ConfigDict,
    split: str,
    tokenizer: Tokenizer,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
    shard_by: str = "documents",
    num_epochs: int | None = None,
    source: Sequence[Mapping[str, Any]] | Sequence[np.ndarray] | None = None,
) -> grain.IterDataset:
    """Batches `{'tokens', 'segment_ids'}` int32 [batch_size, seq_len] of this process's documents.

    Args:
      data_cfg: the `data` config; without `source`, documents come from the split's token cache
        (built, or reused, for this corpus and tokenizer).
      split: 'train' or 'validation'.
      tokenizer: the tokenizer of the documents; its eos id ends every document.
      seq_len, batch_size: row length T and rows per host batch B (the last partial batch is
        dropped; a finite pass pads only the very last row with pad=0 / segment 0).
      seed: document shuffle seed; each epoch gets a different, deterministic order.
      process_index, process_count: which share of the data this process gets (see `shard_by`).
      shard_by: 'documents': this process reads pieces process_index::process_count and packs its
        own batches (each host reads 1/process_count of the data, but the global batch depends on
        the process count). 'rows': every process runs the same pipeline with global batches of
        batch_size * process_count rows and keeps rows [process_index * batch_size, +batch_size),
        so the global batch (and the iterator state) is identical for any process count.
      num_epochs: None repeats forever; an int gives a finite pass (e.g. 1 for validation).
      source: optional random-access documents instead: `{'text': str | bytes}` mappings
        (tokenized here, e.g. `prepared.sources[split]`) or int32 token arrays ending with eos
        (e.g. `prepared.tokens[split]`).

    Returns:
      A `grain.IterDataset`; `iter(ds)` is a `grain.DatasetIterator` with `get_state()` /
      `set_state()` for exact resume.
    """
    if seq_len < 1 or batch_size < 1:
        raise ValueError(
            f"seq_len={seq_len} and batch_size={batch_size} must both be >= 1. "
            "Fix: set positive values in the config."
        )
    if not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index={process_index} is outside [0, process_count={process_count}). "
            "Fix: pass jax.process_index() and jax.process_count()."
        )
    if shard_by not in ("documents", "rows"):
        raise ValueError(f"shard_by={shard_by!r} is not 'documents' or 'rows'. Fix: pick one of those.")
    if source is None:
        source = tokenized_documents(data_cfg, split, tokenizer)
    by_rows = shard_by == "rows"
    parts = source.parts if isinstance(source, Mixture) else (source,)
    if not by_rows:  # token shards: each process reads its own files
        parts = tuple(p.share(process_index, process_count) if hasattr(p, "share") else p for p in parts)
    # data.streaming: a jsonl:/parquet: source's documents are read by position and tokenized in the
    # pipeline's map (in data.workers processes), whole documents in block-shuffled order (streaming.py)
    shuffled = [streamed(p if by_rows else p.share_blocks(process_index, process_count), seed + i)
                if isinstance(p, StreamedDocuments) else
                _pieces(p, split, tokenizer, seq_len, process_index, process_count, by_rows).shuffle(seed=seed + i)
                for i, p in enumerate(parts)]
    if isinstance(source, Mixture):
        # Each source shuffled (its own seed) and repeated on its own, then interleaved by weight:
        # index-based all the way, so the iterator state stays tiny and resume is exact.
        documents = grain.MapDataset.mix(
            [p.repeat(num_epochs).map(_tokenize(tokenizer)).map(_tag_source(i))
             for i, p in enumerate(shuffled)], weights=list(source.weights))
        lengths = {"tokens": seq_len, "source_ids": seq_len}
    else:
        documents = shuffled[0].repeat(num_epochs).map(_tokenize(tokenizer))
        lengths = {"tokens": seq_len}
    threads = min(8, os.cpu_count() or 1)
    documents = documents.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=64))
    workers = int(data_cfg.get("workers", 0)) if data_cfg is not None else 0
    if workers > 0 and any(isinstance(p, StreamedDocuments) for p in parts):
        if not absl_flags.FLAGS.is_parsed():  # Grain's worker processes read absl flags (their defaults here)
            absl_flags.FLAGS.mark_as_parsed()
        documents = documents.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    rows = grain.experimental.ConcatThenSplitIterDataset(documents, length_struct=lengths).map(_rename_packed)
    if not by_rows:
        return _JsonStateIterDataset(rows.batch(batch_size, drop_remainder=True))
    first = process_index * batch_size
    batches = rows.batch(batch_size * process_count, drop_remainder=True).map(
        lambda batch: {key: value[first: first + batch_size] for key, value in batch.items()})
    return _JsonStateIterDataset(batches)


def _pieces(source, split: str, tokenizer: Tokenizer, seq_len: int, process_index: int, process_count: int,
            by_rows: bool) -> grain.MapDataset:
    """This process's pieces of one source's documents (all of them when sharding by rows)."""
    sharded = by_rows or hasattr(source, "share")
    if not sharded and len(source) < process_count:
        raise DataError(
            f"The {split!r} split has {len(source)} documents, fewer than "
            f"process_count={process_count}, so some process would get none. Fix: use a larger "
            "corpus (data.max_files=0, data.val_fraction) or fewer processes."
        )
    if len(source) and not isinstance(source[0], np.ndarray):  # text: tokenize up front
        tokenize = _tokenize(tokenizer)
        source = [tokenize(document)["tokens"] for document in source]
    pieces = grain.MapDataset.source(DocumentPieces(source, seq_len))
    if not sharded:
        pieces = pieces[process_index::process_count]
    return pieces

