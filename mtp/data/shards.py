"""Pre-tokenized corpora: sharded ArrayRecord files of int32 token ids, one record per document (eos
last), written by ``mtp data tokenize`` and read by ``data.source='tokens:DIR'``.

    DIR/index.json                        tokenizer fingerprint, sources' fingerprints, per-shard counts
    DIR/manifest.json                     what is being written (a resumed run must match it)
    DIR/tokenizer.model | tokenizer.json  the tokenizer the ids belong to (none for 'bytes')
    DIR/{split}-u{U}-c{C}.arrayrecord     documents of input unit U (a file), chunk C
    DIR/{split}-u{U}-c{C}.lengths.npy     their token counts (the pipeline cuts pieces without reading them)
    DIR/parts/u{U}-c{C}.json              written last: the chunk is complete (a killed run skips it)

Each input unit is cut into chunks of about ``shard_bytes`` of input; a chunk is written to temporary
names and renamed, then marked done, so a run killed at any moment resumes at the first unfinished chunk
(skipping the records before it without tokenizing them) and writes the same files.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import pathlib
import shutil
import time
from collections.abc import Sequence
from typing import Any

import grain
import ml_collections
import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from mtp.data.byte_tokenizer import ByteTokenizer
from mtp.data.errors import DataError
from mtp.data.hf_tokenizer import HFTokenizer
from mtp.data.sources import BadRecords, RecordSource, open_source, split_for
from mtp.data.tokenizer import Tokenizer
from mtp.log import log

FORMAT = "mtp-tokens-v1"
SPLITS = ("train", "validation")
SHARD_BYTES = 64 << 20  # input bytes per chunk (~16M tokens of English or code)
_ENCODE_BATCH = 256
_WRITER_OPTIONS = "group_size:1,uncompressed"  # one record per chunk: cheap random access
_PROGRESS_EVERY_S = 2.0


def tokenizer_fingerprint(tokenizer) -> str:
    """sha1 of the tokenizer's file (16 hex digits); 'bytes-v260' for the byte tokenizer."""
    if tokenizer.path is None:
        return f"bytes-v{tokenizer.vocab_size}"
    return hashlib.sha1(pathlib.Path(tokenizer.path).read_bytes()).hexdigest()[:16]


def tokenizer_info(tokenizer) -> dict:
    kind = "bytes" if isinstance(tokenizer, ByteTokenizer) else (
        "pretrained" if isinstance(tokenizer, HFTokenizer) else "sentencepiece")
    file = {"sentencepiece": "tokenizer.model", "pretrained": "tokenizer.json"}.get(kind)
    return {"kind": kind, "fingerprint": tokenizer_fingerprint(tokenizer), "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id, "file": file}


def load_tokenizer(info: dict, directory: pathlib.Path):
    """The tokenizer stored with the shards."""
    if info["kind"] == "bytes":
        return ByteTokenizer()
    path = directory / info["file"]
    return Tokenizer(path) if info["kind"] == "sentencepiece" else HFTokenizer(path)


# --- writing ------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Counters:
    """Shared between worker processes (multiprocessing Values) or plain ints in one process."""

    documents: Any
    tokens: Any
    bytes: Any

    @classmethod
    def shared(cls, context) -> _Counters:
        return cls(*(context.Value("q", 0) for _ in range(3)))

    def add(self, documents: int, tokens: int, size: int) -> None:
        for value, n in ((self.documents, documents), (self.tokens, tokens), (self.bytes, size)):
            with value.get_lock():
                value.value += n


class _Progress:
    def __init__(self, counters: _Counters, total_bytes: int, enabled: bool):
        self.counters, self.total, self.enabled = counters, max(total_bytes, 1), enabled
        self.start = self.last = time.perf_counter()
        self.done_before = 0  # bytes of chunks finished by an earlier (killed) run

    def line(self) -> str:
        c = self.counters
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        done = c.bytes.value + self.done_before
        rate = c.bytes.value / elapsed
        left = (self.total - done) / rate if rate > 0 else float("nan")
        return (f"{c.documents.value:,} documents, {c.tokens.value / 1e6:.2f}M tokens, {done / 1e6:,.1f} of"
                f" {self.total / 1e6:,.1f} MB of input ({rate / 1e6:.1f} MB/s), ~{max(left, 0):.0f} s left")

    def maybe_print(self, force: bool = False) -> None:
        now = time.perf_counter()
        if self.enabled and (force or now - self.last >= _PROGRESS_EVERY_S):
            self.last = now
            log(f"tokenize: {self.line()}", prefix="mtp.data")


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    batch = getattr(tokenizer, "encode_batch", None)
    return batch(texts) if batch else [tokenizer.encode(text) for text in texts]


class ShardChunk:
    """One chunk's writers (per split, temporary names until `finish`): the shared writer of `mtp data
    tokenize` and `mtp distill` (mtp/train/distill.py)."""

    def __init__(self, out: pathlib.Path, unit: int, chunk: int, first: int):
        self.out, self.stem, self.first = out, f"u{unit:05d}-c{chunk:04d}", first
        self.writers: dict[str, ArrayRecordWriter] = {}
        self.lengths: dict[str, list[int]] = {split: [] for split in SPLITS}
        self.bytes = 0

    def _tmp(self, split: str) -> pathlib.Path:
        return self.out / f".{split}-{self.stem}.arrayrecord.tmp"

    def write(self, split: str, ids: np.ndarray) -> None:
        if split not in self.writers:
            self.writers[split] = ArrayRecordWriter(str(self._tmp(split)), _WRITER_OPTIONS)
        self.writers[split].write(np.ascontiguousarray(ids, np.int32).tobytes())
        self.lengths[split].append(len(ids))

    def finish(self, end: int, skipped: int, examples: list[str]) -> dict:
        marker = {"chunk": self.stem, "first_record": self.first, "end_record": end, "skipped": skipped,
                  "skipped_examples": examples, "bytes": self.bytes, "splits": {}}
        for split, writer in self.writers.items():
            writer.close()
            name = f"{split}-{self.stem}"
            np.save(self.out / f".{name}.lengths.tmp.npy", np.asarray(self.lengths[split], np.int32))
            os.replace(self.out / f".{name}.lengths.tmp.npy", self.out / f"{name}.lengths.npy")
            os.replace(self._tmp(split), self.out / f"{name}.arrayrecord")
            marker["splits"][split] = {"file": f"{name}.arrayrecord", "documents": len(self.lengths[split]),
                                       "tokens": int(sum(self.lengths[split]))}
        write_json(self.out / "parts" / f"{self.stem}.json", marker)
        return marker


def write_json(path: pathlib.Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(obj, indent=1))
    os.replace(partial, path)


def done_chunks(out: pathlib.Path, unit: int) -> list[dict]:
    """This unit's finished chunks, in order, up to the first gap."""
    done = []
    while (path := out / "parts" / f"u{unit:05d}-c{len(done):04d}.json").exists():
        done.append(json.loads(path.read_text()))
    return done


def _tokenize_unit(source: RecordSource, unit_index: int, tokenizer, out: pathlib.Path, *, val_fraction: float,
                   bad_records: str, shard_bytes: int, counters: _Counters, progress: _Progress | None) -> None:
    """Writes the unit's remaining chunks; the chunks before the first unfinished one are skipped."""
    if (out / "parts" / f"u{unit_index:05d}.done").exists():
        return
    unit = source.units[unit_index]
    done = done_chunks(out, unit_index)
    position = done[-1]["end_record"] if done else 0
    chunk = ShardChunk(out, unit_index, len(done), position)
    bad = BadRecords(bad_records)
    pending: list[tuple[str, str]] = []
    eos = tokenizer.eos_id

    def flush() -> None:
        if not pending:
            return
        ids = _encode(tokenizer, [text for _, text in pending])
        tokens = 0
        for (split, _), doc in zip(pending, ids):
            chunk.write(split, np.asarray([*doc, eos], np.int32))
            tokens += len(doc) + 1
        counters.add(len(pending), tokens, 0)
        pending.clear()

    for record in unit.records(position):
        position += 1
        chunk.bytes += record.size
        counters.add(0, 0, record.size)
        if bad.check(record):
            split = split_for(record, val_fraction)
            if isinstance(record.payload, np.ndarray):
                ids = record.payload if len(record.payload) and record.payload[-1] == eos else \
                    np.append(record.payload, np.int32(eos))
                chunk.write(split, ids)
                counters.add(1, len(ids), 0)
            elif record.payload:
                pending.append((split, record.payload))
                if len(pending) >= _ENCODE_BATCH:
                    flush()
        if chunk.bytes >= shard_bytes:
            flush()
            chunk.finish(position, bad.count, bad.examples)
            bad = BadRecords(bad_records)
            chunk = ShardChunk(out, unit_index, int(chunk.stem[-4:]) + 1, position)
        if progress is not None:
            progress.maybe_print()
    flush()
    if chunk.bytes or not done:
        chunk.finish(position, bad.count, bad.examples)
    (out / "parts" / f"u{unit_index:05d}.done").write_text("")


_worker: dict = {}


def _worker_init(data_cfg: dict, source: str, tokenizer_dir: str, info: dict, counters: _Counters) -> None:
    _worker.update(source=open_source(ml_collections.ConfigDict(data_cfg), source),
                   tokenizer=load_tokenizer(info, pathlib.Path(tokenizer_dir)), counters=counters,
                   val_fraction=data_cfg["val_fraction"], bad_records=data_cfg["bad_records"])


def _worker_run(args: tuple[int, str, int]) -> int:
    unit_index, out, shard_bytes = args
    _tokenize_unit(_worker["source"], unit_index, _worker["tokenizer"], pathlib.Path(out),
                   val_fraction=_worker["val_fraction"], bad_records=_worker["bad_records"],
                   shard_bytes=shard_bytes, counters=_worker["counters"], progress=None)
    return unit_index


def open_shard_dir(out: pathlib.Path, manifest: dict, tokenizer, new_dir_fix: str) -> dict | None:
    """Starts or resumes writing ``manifest``'s shards in ``out``: the finished index when ``out`` already
    holds them, else None (the manifest and the tokenizer file are in place). A directory written for
    another manifest, or one that is not a shard directory, is an error (nothing is deleted);
    ``new_dir_fix`` says how to pick another directory."""
    manifest_path = out / "manifest.json"
    if manifest_path.exists():
        old = json.loads(manifest_path.read_text())
        if old != manifest:
            differ = sorted(k for k in manifest if old.get(k) != manifest[k])
            raise DataError(f"{out} holds token shards of another run (different {', '.join(differ)}; see"
                            f" {manifest_path}). Fix: {new_dir_fix}, or delete that directory to start over.")
        if (out / "index.json").exists():
            return json.loads((out / "index.json").read_text())
    elif out.exists() and any(out.iterdir()):
        raise DataError(f"{out} exists and is not a token-shard directory (no manifest.json). Fix: {new_dir_fix}"
                        " (a new or empty directory).")
    out.mkdir(parents=True, exist_ok=True)
    write_json(manifest_path, manifest)
    info = manifest["tokenizer"]
    if info["file"] and not (out / info["file"]).exists():
        shutil.copyfile(tokenizer.path, out / info["file"])
        config = pathlib.Path(tokenizer.path).with_name("tokenizer_config.json")
        if info["kind"] == "pretrained" and config.exists():
            shutil.copyfile(config, out / config.name)
    return None


def write_shards(data_cfg: ml_collections.ConfigDict, source: RecordSource, tokenizer, out: pathlib.Path, *,
                 workers: int = 1, shard_bytes: int = SHARD_BYTES, progress: bool = True) -> dict:
    """Tokenizes every record of ``source`` into shards under ``out`` and returns the index. Resumes a
    killed run (finished chunks are kept); refuses a directory written for another tokenizer or corpus."""
    out = pathlib.Path(out)
    manifest = {"format": FORMAT, "tokenizer": tokenizer_info(tokenizer), "val_fraction": data_cfg.val_fraction,
                "shard_bytes": shard_bytes,  # not bad_records: a chunk written under 'stop' is valid under 'skip'
                "sources": [{"source": source.source, "name": source.name,
                             "inputs": [u.fingerprint for u in source.units]}]}
    finished = open_shard_dir(out, manifest, tokenizer, "pass a new --out")
    if finished is not None:
        return finished
    info = manifest["tokenizer"]
    pending = [u for u in range(len(source.units)) if not (out / "parts" / f"u{u:05d}.done").exists()]
    before = sum(c["bytes"] for u in pending for c in done_chunks(out, u))
    before += sum(source.units[u].size for u in range(len(source.units)) if u not in pending)
    start = time.perf_counter()
    context = multiprocessing.get_context("spawn")
    counters = _Counters.shared(context)
    bar = _Progress(counters, source.size, progress)
    bar.done_before = before
    if pending:
        log(f"tokenize: {source.source}: {len(pending)} of {len(source.units)} input(s) to do, {workers} worker(s)"
            f" -> {out}", prefix="mtp.data")
    if workers <= 1 or len(pending) <= 1:
        for u in pending:
            _tokenize_unit(source, u, tokenizer, out, val_fraction=float(data_cfg.val_fraction),
                           bad_records=str(data_cfg.bad_records), shard_bytes=shard_bytes, counters=counters,
                           progress=bar)
    else:
        with context.Pool(min(workers, len(pending)), initializer=_worker_init,
                          initargs=(data_cfg.to_dict(), source.source, str(out), info, counters)) as pool:
            result = pool.map_async(_worker_run, [(u, str(out), shard_bytes) for u in pending], chunksize=1)
            while not result.ready():
                result.wait(_PROGRESS_EVERY_S)
                bar.maybe_print()
            result.get()  # re-raises a worker's DataError
    index = write_index(out, len(source.units), source.source, manifest)
    elapsed = time.perf_counter() - start
    bar.maybe_print(force=True)
    totals = {s: index["splits"][s]["tokens"] for s in SPLITS}
    log(f"tokenize: done in {elapsed:.1f} s: {totals} tokens, {len(index['splits']['train']['shards'])} train"
        f" shard(s), {index['skipped']} bad record(s) skipped -> {out / 'index.json'}", prefix="mtp.data")
    return index


def write_index(out: pathlib.Path, n_units: int, name: str, manifest: dict) -> dict:
    """``index.json`` (written last: the directory is complete) from the finished chunks of units
    0..n_units-1; ``name`` is what errors call the input."""
    splits = {s: {"documents": 0, "tokens": 0, "shards": []} for s in SPLITS}
    skipped, examples = 0, []
    for u in range(n_units):
        for chunk in done_chunks(out, u):
            skipped += chunk["skipped"]
            examples += chunk["skipped_examples"][: 3 - len(examples)]
            for split, entry in chunk["splits"].items():
                splits[split]["shards"].append(entry)
                splits[split]["documents"] += entry["documents"]
                splits[split]["tokens"] += entry["tokens"]
    for split, entry in splits.items():
        if not entry["documents"]:
            counts = {s: splits[s]["documents"] for s in SPLITS}
            raise DataError(f"{name}: no document fell into the {split!r} split ({counts})."
                            " Fix: add documents, or raise data.val_fraction for a tiny corpus.")
    index = {**manifest, "splits": splits, "skipped": skipped, "skipped_examples": examples}
    write_json(out / "index.json", index)
    return index


# --- reading ------------------------------------------------------------------------------------
def read_index(directory: str | os.PathLike, source: str = "") -> dict:
    directory = pathlib.Path(os.path.expanduser(str(directory)))
    path = directory / "index.json"
    if not path.exists():
        partial = (directory / "manifest.json").exists()
        raise DataError(f"data.source={source or str(directory)!r}: {path} does not exist"
                        + (" (tokenizing did not finish: rerun `mtp data tokenize` with the same --out to resume)."
                           if partial else ". Fix: write it with `mtp data tokenize --config C --out DIR`."))
    index = json.loads(path.read_text())
    if index.get("format") != FORMAT:
        raise DataError(f"{path} is format {index.get('format')!r}, not {FORMAT!r}. Fix: rerun mtp data tokenize.")
    return index


def check_tokenizer(index: dict, tokenizer, directory: pathlib.Path) -> None:
    """Refuses to train on ids of another tokenizer."""
    want, have = index["tokenizer"], tokenizer_info(tokenizer)
    if want["fingerprint"] != have["fingerprint"]:
        raise DataError(f"{directory} holds token ids of another tokenizer ({want['kind']}, fingerprint"
                        f" {want['fingerprint']}, vocab {want['vocab_size']}) than this config's ({have['kind']},"
                        f" {have['fingerprint']}, vocab {have['vocab_size']}). Fix: leave data.tokenizer_path empty"
                        f" with data.tokenizer={want['kind']!r} to use the one stored in {directory}, or"
                        " re-tokenize with this tokenizer (mtp data tokenize).")


class TokenShards(Sequence[np.ndarray]):
    """Random access to the documents (int32, eos last) of some shard files; ``lengths`` lets the pipeline
    cut pieces without reading them."""

    def __init__(self, directory: pathlib.Path, files: Sequence[str]):
        self.directory, self.files = pathlib.Path(directory), tuple(files)
        self.file_lengths = [np.load(self.directory / f.replace(".arrayrecord", ".lengths.npy")) for f in self.files]
        self.lengths = (np.concatenate(self.file_lengths).astype(np.int64) if self.files
                        else np.zeros(0, np.int64))
        self._source = (grain.sources.ArrayRecordDataSource([str(self.directory / f) for f in self.files])
                        if self.files else None)

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, index: int) -> np.ndarray:
        if not -len(self) <= index < len(self):
            raise IndexError(f"document {index} of {len(self)}")
        return np.frombuffer(self._source[int(index) % len(self)], np.int32)

    def share(self, process_index: int, process_count: int) -> TokenShards:
        """Files ``process_index::process_count``: the processes of a run read disjoint files."""
        if len(self.files) < process_count:
            raise DataError(f"{self.directory} has {len(self.files)} shard file(s) of this split for {process_count}"
                            " processes: some process would read nothing. Fix: re-tokenize with smaller shards"
                            " (mtp data tokenize --shard-mb) or more input files, or use fewer processes.")
        return TokenShards(self.directory, self.files[process_index::process_count])

    def __getstate__(self) -> dict:
        return {"directory": self.directory, "files": self.files}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["directory"], state["files"])


def open_tokens(directory: str | os.PathLike, split: str, index: dict | None = None) -> TokenShards:
    directory = pathlib.Path(os.path.expanduser(str(directory)))
    index = index or read_index(directory)
    return TokenShards(directory, [s["file"] for s in index["splits"][split]["shards"]])
