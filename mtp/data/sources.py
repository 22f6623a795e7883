"""Bring-your-own corpora: ``data.source`` strings of the form ``KIND:WHERE``, read as streams of records.

    jsonl:GLOB                  one JSON object per line (plain, .gz, .zst); text in data.text_field
    parquet:GLOB                column data.text_field, one row group at a time
    arrayrecord:GLOB            records of UTF-8 text, or int32 token ids (data.record_format='tokens')
    tfds:NAME[/CONFIG][:SPLIT]  a TFDS dataset already prepared under data.tfds_data_dir (nothing downloads)
    tokens:DIR                  token shards written by `mtp data tokenize` (read by mtp/data/shards.py)

A source is a list of ``Unit``s (an input file, or a TFDS split); a unit yields ``Record``s in a fixed
order, each with a stable id (``file:line``, ``file:row``, ``file:record``, ``split:index``). The
validation split is the source's own where it has one (TFDS), else the ids whose sha1 bucket falls under
data.val_fraction (as for text files), so the split never changes between runs or machines. A record that
cannot be read raises ``DataError`` naming the file and line/row and the fix, or is counted and skipped
with data.bad_records='skip'.
"""

from __future__ import annotations

import dataclasses
import glob as globlib
import gzip
import hashlib
import io
import json
import os
import pathlib
import re
from collections.abc import Callable, Iterator

import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from array_record.python.array_record_module import ArrayRecordReader

from mtp.config import SOURCE_KINDS, SYNTHETIC_SOURCES
from mtp.data.corpus import list_files, read_text, split_of
from mtp.data.errors import DataError
from mtp.extras import MissingExtra

SKIP_HINT = "or set data.bad_records='skip' to skip such records (counted and reported)"
_READ_BLOCK = 1024  # arrayrecord records read per call
_FILES_PER_UNIT = 256  # text files: files per unit (`mtp data tokenize` of a directory, stdlib)


def source_kind(source: str) -> str:
    """'jsonl' | 'parquet' | 'arrayrecord' | 'tfds' | 'tokens' for ``KIND:...``; 'files' for a directory,
    a glob of text files or 'stdlib'; 'synthetic' for a generated task."""
    kind, sep, _ = str(source).partition(":")
    if sep and kind in SOURCE_KINDS:
        return kind
    return "synthetic" if source in SYNTHETIC_SOURCES else "files"


def source_target(source: str) -> str:
    """What follows ``KIND:``."""
    return str(source).partition(":")[2]


def components(data_cfg: ml_collections.ConfigDict) -> list[tuple[str, float]]:
    """``[(source, weight)]``: the mixture's entries, or ``[(data.source, 1.0)]``."""
    if data_cfg.mixture:
        return [(str(source), float(weight)) for source, weight in data_cfg.mixture]
    return [(str(data_cfg.source), 1.0)]


def uses_records(data_cfg: ml_collections.ConfigDict) -> bool:
    """True when the data goes through this module (a KIND: source or a mixture), False for the text-file
    corpus and the synthetic tasks (mtp/data/corpus.py, synthetic.py), whose paths are unchanged."""
    return bool(data_cfg.mixture) or source_kind(data_cfg.source) in SOURCE_KINDS


@dataclasses.dataclass(frozen=True)
class Record:
    """One document: ``payload`` is its text, its int32 token ids, or ``None`` when it could not be read
    (``problem`` says why, naming the file and line/row)."""

    doc_id: str
    payload: str | np.ndarray | None
    split: str | None = None  # the source's own split (TFDS); None: decided by the id's hash
    problem: str = ""
    size: int = 0  # bytes this record took in its input (progress)


@dataclasses.dataclass(frozen=True)
class Unit:
    """A piece of a source read in one pass: ``records(start)`` yields records ``start, start+1, ...``
    (skipping the first ``start`` cheaply: resuming `mtp data tokenize`)."""

    name: str
    size: int  # bytes on disk (progress)
    records: Callable[[int], Iterator[Record]]
    fingerprint: dict


@dataclasses.dataclass(frozen=True)
class RecordSource:
    """A parsed ``KIND:...`` source: its units and a name that changes whenever its inputs change."""

    source: str
    kind: str
    units: tuple[Unit, ...]
    name: str  # '<kind>_<slug>-<fingerprint>' (cache keys)
    own_splits: bool  # records carry their split (TFDS with a validation split)

    @property
    def size(self) -> int:
        return sum(unit.size for unit in self.units)


def split_for(record: Record, val_fraction: float) -> str:
    return record.split or split_of(record.doc_id, val_fraction)


# --- finding files ------------------------------------------------------------------------------
def _glob(source: str, pattern: str, max_files: int) -> tuple[pathlib.Path, list[pathlib.Path]]:
    expanded = os.path.expanduser(pattern)
    if os.path.isdir(expanded):
        expanded = os.path.join(expanded, "**", "*")
    matches = sorted(pathlib.Path(os.path.abspath(p)) for p in globlib.glob(expanded, recursive=True))
    files = [p for p in matches if p.is_file()]
    if max_files > 0:
        files = files[:max_files]
    if not files:
        raise DataError(f"data.source={source!r}: the glob {pattern!r} matches no files. Fix: check the path"
                        " (a glob such as '/data/web/*.jsonl.gz'; '**' matches subdirectories).")
    root = pathlib.Path(os.path.commonpath([str(p.parent) for p in files]))
    return root, files


def _file_fingerprint(path: pathlib.Path, root: pathlib.Path) -> dict:
    stat = path.stat()
    return {"path": path.relative_to(root).as_posix(), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def _name(kind: str, slug: str, parts: object) -> str:
    digest = hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]
    slug = re.sub(r"[^\w]+", "_", slug).strip("_") or "data"
    return f"{kind}_{slug}-{digest}"


# --- jsonl --------------------------------------------------------------------------------------
def _open_text_lines(path: pathlib.Path) -> tuple[io.BufferedReader, io.RawIOBase]:
    """(decompressed binary stream, raw file) for .gz / .zst / plain files; raw.tell() is the progress."""
    raw = open(path, "rb")  # noqa: SIM115 -- closed by the caller
    if path.suffix == ".gz":
        return gzip.GzipFile(fileobj=raw), raw
    if path.suffix == ".zst":
        try:
            import zstandard  # optional extra 'data'
        except ImportError:
            raw.close()
            raise MissingExtra(f"reading {path.name} (zstd)", "zstandard", "data") from None
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw)), raw
    return raw, raw


def _jsonl_records(path: pathlib.Path, rel: str, field: str, start: int) -> Iterator[Record]:
    stream, raw = _open_text_lines(path)
    with raw, stream:
        for index, line in enumerate(stream):
            if index < start:
                continue
            where = f"{path}:{index + 1}"
            if not line.strip():  # blank lines are not records
                yield Record(f"{rel}:{index + 1}", "", size=len(line))
                continue
            try:
                obj = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                yield Record(f"{rel}:{index + 1}", None, size=len(line),
                             problem=f"{where}: not valid JSON ({getattr(e, 'msg', e)}). Fix: repair or remove"
                                     " the line")
                continue
            text = obj.get(field) if isinstance(obj, dict) else None
            if not isinstance(text, str):
                keys = sorted(obj)[:8] if isinstance(obj, dict) else type(obj).__name__
                yield Record(f"{rel}:{index + 1}", None, size=len(line),
                             problem=f"{where}: no string field {field!r} (has {keys}). Fix: set data.text_field"
                                     " to the field holding the text")
                continue
            yield Record(f"{rel}:{index + 1}", text, size=len(line))


# --- parquet ------------------------------------------------------------------------------------
def _parquet_file(path: pathlib.Path, field: str):
    try:
        import pyarrow.parquet as pq  # a dependency of parquet sources only
    except ImportError:
        raise MissingExtra(f"reading {path.name} (Parquet)", "pyarrow", "data") from None
    parquet = pq.ParquetFile(path)
    if field not in parquet.schema_arrow.names:
        raise DataError(f"{path} has no column {field!r} (columns: {parquet.schema_arrow.names[:12]}). Fix: set"
                        " data.text_field to the column holding the text.")
    return parquet


def _parquet_records(path: pathlib.Path, rel: str, field: str, start: int) -> Iterator[Record]:
    parquet = _parquet_file(path, field)
    size = path.stat().st_size / max(parquet.metadata.num_rows, 1)
    row = 0
    for group in range(parquet.num_row_groups):
        rows = parquet.metadata.row_group(group).num_rows
        if row + rows <= start:
            row += rows
            continue
        column = parquet.read_row_group(group, columns=[field]).column(field).to_pylist()
        for value in column:
            if row >= start:
                if isinstance(value, str):
                    yield Record(f"{rel}:row{row}", value, size=int(size))
                else:
                    yield Record(f"{rel}:row{row}", None, size=int(size),
                                 problem=f"{path}: row {row} (row group {group}): {field!r} is"
                                         f" {type(value).__name__}, not a string. Fix: fill or drop the row")
            row += 1


# --- arrayrecord --------------------------------------------------------------------------------
def _arrayrecord_records(path: pathlib.Path, rel: str, as_tokens: bool, start: int) -> Iterator[Record]:
    reader = ArrayRecordReader(str(path))
    try:
        total = reader.num_records()
        size = path.stat().st_size / max(total, 1)
        for begin in range(start, total, _READ_BLOCK):
            for offset, data in enumerate(reader.read(begin, min(begin + _READ_BLOCK, total))):
                index = begin + offset
                if as_tokens:
                    if len(data) % 4:
                        yield Record(f"{rel}:{index}", None, size=int(size),
                                     problem=f"{path}: record {index} has {len(data)} bytes, not a whole number"
                                             " of int32 ids. Fix: write np.int32 arrays' bytes, or set"
                                             " data.record_format='text'")
                    else:
                        yield Record(f"{rel}:{index}", np.frombuffer(data, np.int32), size=int(size))
                    continue
                try:
                    yield Record(f"{rel}:{index}", data.decode("utf-8"), size=int(size))
                except UnicodeDecodeError as e:
                    yield Record(f"{rel}:{index}", None, size=int(size),
                                 problem=f"{path}: record {index} is not UTF-8 text ({e.reason} at byte {e.start})."
                                         " Fix: set data.record_format='tokens' if it holds int32 token ids")
    finally:
        reader.close()


# --- tfds ---------------------------------------------------------------------------------------
def _tfds_records(source, split: str, own: str | None, field: str, label: str, start: int) -> Iterator[Record]:
    for index in range(start, len(source)):
        value = source[index].get(field) if isinstance(source[index], dict) else None
        if isinstance(value, bytes):
            try:
                value = value.decode("utf-8")
            except UnicodeDecodeError:
                value = None
        if isinstance(value, str):
            yield Record(f"{split}:{index}", value, split=own)
        else:
            yield Record(f"{split}:{index}", None, split=own,
                         problem=f"{label} split {split!r} example {index}: no UTF-8 text in feature {field!r}")


def _tfds_source(data_cfg: ml_collections.ConfigDict, source: str) -> RecordSource:
    target = source_target(source)
    name, _, split = target.partition(":")
    split = split or "train"
    data_dir = os.path.expanduser(str(data_cfg.tfds_data_dir)) or None
    try:
        builder = tfds.builder(name, data_dir=data_dir)
        if not builder.is_prepared():
            raise FileNotFoundError(builder.data_dir)
    except Exception as e:  # noqa: BLE001 -- TFDS raises many kinds; all mean "not there"
        raise DataError(f"data.source={source!r}: no prepared TFDS dataset {name!r} under data.tfds_data_dir="
                        f"{data_cfg.tfds_data_dir!r} ({type(e).__name__}: {e}). Nothing is downloaded here."
                        " Fix: prepare it first (tfds build, or builder.download_and_prepare()) into that"
                        " directory and set data.tfds_data_dir.") from None
    splits = list(builder.info.splits)
    if split not in splits:
        raise DataError(f"data.source={source!r}: {name!r} has no split {split!r} (it has {splits}).")
    features = builder.info.features
    if hasattr(features, "keys") and data_cfg.text_field not in features.keys():
        raise DataError(f"data.source={source!r}: {name!r} has no feature {data_cfg.text_field!r} (features:"
                        f" {sorted(features.keys())}). Fix: set data.text_field.")
    own = next((s for s in ("validation", "test") if s in splits and s != split), None)
    label = f"tfds {name}"
    units = []
    for s, tag in ((split, "train" if own else None), (own, "validation")):
        if s is None:
            continue
        records = builder.as_data_source(s)
        units.append(Unit(name=f"{s}", size=builder.info.splits[s].num_bytes or len(records),
                          records=lambda start, r=records, s=s, tag=tag: _tfds_records(
                              r, s, tag, str(data_cfg.text_field), label, start),
                          fingerprint={"split": s, "examples": len(records)}))
    parts = [source, str(builder.data_dir), data_cfg.text_field, data_cfg.val_fraction,
             [u.fingerprint for u in units]]
    return RecordSource(source, "tfds", tuple(units), _name("tfds", name, parts), own_splits=own is not None)


# --- text files (stdlib, a directory, a glob) ----------------------------------------------------
def _file_records(root: pathlib.Path, paths: tuple[str, ...], start: int) -> Iterator[Record]:
    for rel in paths[start:]:
        # the corpus leaves empty and non-UTF-8 files out; so does this ("" is skipped silently)
        yield Record(rel, read_text(root / rel) or "", size=(root / rel).stat().st_size)


def _files_source(data_cfg: ml_collections.ConfigDict, source: str) -> RecordSource:
    """The text-file corpus as records (one per file, split by the path's hash as in corpus.py)."""
    cfg = ml_collections.ConfigDict(data_cfg.to_dict())
    cfg.source = source
    files = list_files(cfg)
    units = []
    for begin in range(0, len(files.relative_paths), _FILES_PER_UNIT):
        paths = files.relative_paths[begin: begin + _FILES_PER_UNIT]
        size = sum((files.root / rel).stat().st_size for rel in paths)
        units.append(Unit(f"files[{begin}:{begin + len(paths)}]", size,
                          lambda start, p=paths: _file_records(files.root, p, start),
                          {"files": [begin, begin + len(paths)], "bytes": size}))
    return RecordSource(source, "files", tuple(units), files.name, own_splits=False)


# --- any source ---------------------------------------------------------------------------------
def open_source(data_cfg: ml_collections.ConfigDict, source: str) -> RecordSource:
    """The units of a source (not ``tokens:``, which holds no records to tokenize)."""
    kind = source_kind(source)
    if kind == "tfds":
        return _tfds_source(data_cfg, source)
    if kind == "files":
        return _files_source(data_cfg, source)
    if kind not in ("jsonl", "parquet", "arrayrecord"):
        raise ValueError(f"open_source: {source!r} is not a jsonl/parquet/arrayrecord/tfds source")
    root, files = _glob(source, source_target(source), int(data_cfg.max_files))
    field, as_tokens = str(data_cfg.text_field), data_cfg.record_format == "tokens"
    units = []
    for path in files:
        rel = path.relative_to(root).as_posix()
        if kind == "jsonl":
            read = (lambda start, p=path, r=rel: _jsonl_records(p, r, field, start))
        elif kind == "parquet":
            _parquet_file(path, field)  # a missing column fails here, before anything is read
            read = (lambda start, p=path, r=rel: _parquet_records(p, r, field, start))
        else:
            read = (lambda start, p=path, r=rel: _arrayrecord_records(p, r, as_tokens, start))
        units.append(Unit(rel, path.stat().st_size, read, _file_fingerprint(path, root)))
    parts = [source, str(root), field if kind != "arrayrecord" else data_cfg.record_format, data_cfg.val_fraction,
             [u.fingerprint for u in units]]
    return RecordSource(source, kind, tuple(units), _name(kind, root.name, parts), own_splits=False)


class BadRecords:
    """data.bad_records: 'stop' raises on the first unreadable record; 'skip' counts them (the first few
    are kept as examples for the report)."""

    def __init__(self, mode: str):
        self.mode, self.count, self.examples = mode, 0, []

    def check(self, record: Record) -> bool:
        """True for a usable record; False (counted) for a bad one when skipping; raises when stopping."""
        if record.payload is not None:
            return True
        if self.mode != "skip":
            raise DataError(f"{record.problem}, {SKIP_HINT}.")
        self.count += 1
        if len(self.examples) < 3:
            self.examples.append(record.problem)
        return False
