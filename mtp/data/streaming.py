"""Streaming ``jsonl:`` / ``parquet:`` sources (``data.streaming=True``): documents are read by position
and tokenized inside the Grain pipeline (in ``data.workers`` worker processes), with no token cache.

Opening a split scans its inputs once for positions only (nothing is parsed or tokenized): a plain
``.jsonl`` file's byte offset of every non-blank line, a Parquet file's row numbers from its metadata.
A document is kept in a split by the same stable hash of its id (``file:line``, ``file:row``) as the
cached path (mtp/data/sources.py), so both give the same documents per split. The index is a
``MapDataset`` source, so the iterator state is tiny and resume is exact.

Order: documents come in blocks (1024 consecutive lines of one file, or one Parquet row group); each epoch
shuffles the blocks and the documents within each block (seeded), so a worker reads one row group (or a
few pages of a file) at a time instead of one per document. Memory is the index (16 bytes a document)
plus one decoded row group per worker.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Sequence

import grain
import ml_collections
import numpy as np

from mtp.data.corpus import split_of
from mtp.data.errors import DataError
from mtp.data.sources import SKIP_HINT, _glob, _parquet_file, source_kind, source_target

STREAMING_KINDS = ("jsonl", "parquet")
_JSONL_BLOCK = 1024  # lines of one file per shuffle block


class StreamedDocuments(Sequence[dict]):
    """The documents of one split of a ``jsonl:``/``parquet:`` source: item i is ``{'text': str}`` (``''``
    for a bad record under data.bad_records='skip', or an empty text: both are dropped by the pipeline)."""

    def __init__(self, data_cfg: ml_collections.ConfigDict, source: str, split: str):
        self.source, self.split, self.kind = source, split, source_kind(source)
        if self.kind not in STREAMING_KINDS:
            raise DataError(f"data.streaming reads jsonl: and parquet: sources; {source!r} is not one. Fix: set"
                            " data.streaming=False for it.")
        self.field, self.bad_records = str(data_cfg.text_field), str(data_cfg.bad_records)
        root, files = _glob(source, source_target(source), int(data_cfg.max_files))
        self.files = tuple(str(p) for p in files)
        val_fraction = float(data_cfg.val_fraction)
        file_of, keys, sizes, starts = [], [], [], [0]
        for f, path in enumerate(files):
            rel = path.relative_to(root).as_posix()
            if self.kind == "jsonl":
                kept = self._scan_jsonl(path, rel, val_fraction, split)
                blocks = [kept[i: i + _JSONL_BLOCK] for i in range(0, len(kept), _JSONL_BLOCK)]
            else:
                blocks = [[(row, 0) for row in rows] for rows in self._scan_parquet(path, rel, val_fraction, split)]
            for block in blocks:
                if len(block):
                    file_of += [f] * len(block)
                    keys += [key for key, _ in block]
                    sizes += [size for _, size in block]
                    starts.append(starts[-1] + len(block))
        self.file_of = np.asarray(file_of, np.int32)
        self.keys = np.asarray(keys, np.int64)  # jsonl: byte offset of the line; parquet: row in the file
        self.sizes = np.asarray(sizes, np.int32)  # jsonl: bytes of the line
        self.block_starts = np.asarray(starts, np.int64)
        self._open: dict = {}

    @staticmethod
    def _scan_jsonl(path: pathlib.Path, rel: str, val_fraction: float, split: str) -> list[tuple[int, int]]:
        if path.suffix in (".gz", ".zst"):
            raise DataError(f"{path}: data.streaming reads plain .jsonl files by position; a compressed file cannot"
                            " be. Fix: decompress it, or set data.streaming=False (tokenized once into the cache).")
        kept, offset = [], 0
        with open(path, "rb") as f:
            for number, line in enumerate(f, start=1):
                if line.strip() and split_of(f"{rel}:{number}", val_fraction) == split:
                    kept.append((offset, len(line)))
                offset += len(line)
        return kept

    def _scan_parquet(self, path: pathlib.Path, rel: str, val_fraction: float, split: str) -> list[list[int]]:
        metadata = _parquet_file(path, self.field).metadata
        blocks, row = [], 0
        for group in range(metadata.num_row_groups):
            rows = metadata.row_group(group).num_rows
            blocks.append([r for r in range(row, row + rows) if split_of(f"{rel}:row{r}", val_fraction) == split])
            row += rows
        return blocks

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def num_blocks(self) -> int:
        return len(self.block_starts) - 1

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"document {index} of {len(self)}")
        index = int(index) % len(self)
        file, key = int(self.file_of[index]), int(self.keys[index])
        text, problem = (self._jsonl(file, key, int(self.sizes[index])) if self.kind == "jsonl"
                         else self._parquet(file, key))
        if problem:
            if self.bad_records != "skip":
                raise DataError(f"{problem}, {SKIP_HINT}.")
            text = ""
        return {"text": text}

    def _jsonl(self, file: int, offset: int, size: int) -> tuple[str, str]:
        # os.pread: Grain's reader threads share the descriptor without seeking it
        fd = self._open.get(file)
        if fd is None:
            opened = os.open(self.files[file], os.O_RDONLY)
            fd = self._open.setdefault(file, opened)  # two reader threads may race: one descriptor is kept
            if fd != opened:
                os.close(opened)
        line = os.pread(fd, size, offset)
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return "", (f"{self.files[file]} at byte {offset}: not valid JSON ({getattr(e, 'msg', e)}). Fix: repair"
                        " or remove the line")
        text = obj.get(self.field) if isinstance(obj, dict) else None
        if not isinstance(text, str):
            keys = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
            return "", (f"{self.files[file]} at byte {offset}: no string field {self.field!r} (has {keys}). Fix:"
                        " set data.text_field to the field holding the text")
        return text, ""

    def _parquet(self, file: int, row: int) -> tuple[str, str]:
        cached = self._open.get("group")
        if cached is None or cached[0] != file or not cached[1] <= row < cached[1] + len(cached[2]):
            parquet = _parquet_file(pathlib.Path(self.files[file]), self.field)
            first = 0
            for group in range(parquet.num_row_groups):
                rows = parquet.metadata.row_group(group).num_rows
                if row < first + rows:
                    column = parquet.read_row_group(group, columns=[self.field]).column(self.field).to_pylist()
                    cached = self._open["group"] = (file, first, column)  # one decoded row group per worker
                    break
                first += rows
        value = cached[2][row - cached[1]]
        if isinstance(value, str):
            return value, ""
        return "", (f"{self.files[file]}: row {row}: {self.field!r} is {type(value).__name__}, not a string. Fix:"
                    " fill or drop the row")

    def share_blocks(self, process_index: int, process_count: int) -> StreamedDocuments:
        """Blocks ``process_index::process_count`` (for ``shard_by='documents'``; training shards by rows)."""
        if self.num_blocks < process_count:
            raise DataError(f"{self.source}: the {self.split!r} split has {self.num_blocks} block(s) of documents for"
                            f" {process_count} processes. Fix: use more input files or fewer processes.")
        mine = np.arange(self.num_blocks)[process_index::process_count]
        out = object.__new__(StreamedDocuments)
        out.__dict__.update({k: v for k, v in self.__dict__.items()})
        take = np.concatenate([np.arange(self.block_starts[b], self.block_starts[b + 1]) for b in mine])
        sizes = np.diff(self.block_starts)[mine]
        out.file_of, out.keys, out.sizes = self.file_of[take], self.keys[take], self.sizes[take]
        out.block_starts, out._open = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64), {}
        return out

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": {}}

    def __del__(self) -> None:
        for key, fd in list(getattr(self, "_open", {}).items()):
            if isinstance(key, int):
                os.close(fd)


class BlockShuffle(grain.MapDataset):
    """Documents of a ``StreamedDocuments`` in a seeded order that changes every epoch (index // len): the
    blocks shuffled, then the documents within each block."""

    def __init__(self, parent: grain.MapDataset, block_starts: np.ndarray, seed: int):
        super().__init__(parent)
        self._block_starts, self._seed, self._cached = np.asarray(block_starts), int(seed), (None, None)

    def __len__(self) -> int:
        return len(self._parent)

    def _order(self, epoch: int) -> np.ndarray:
        if self._cached[0] != epoch:
            rng = np.random.default_rng([self._seed, epoch])
            starts = self._block_starts
            blocks = rng.permutation(len(starts) - 1)
            order = [starts[b] + rng.permutation(starts[b + 1] - starts[b]) for b in blocks]
            self._cached = (epoch, np.concatenate(order) if order else np.zeros(0, np.int64))
        return self._cached[1]

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        epoch, i = divmod(int(index), len(self))
        return self._parent[int(self._order(epoch)[i])]

    def __str__(self) -> str:
        return f"BlockShuffle(seed={self._seed})"


def has_text(document: dict) -> bool:
    return bool(document["text"])


def streamed(documents: StreamedDocuments, seed: int) -> grain.MapDataset:
    """The split's documents in this seed's block-shuffled order, empty ones dropped (None, skipped)."""
    return BlockShuffle(grain.MapDataset.source(documents), documents.block_starts, seed).filter(has_text)
