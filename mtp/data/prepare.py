"""The data entry point for the trainer: validate `data.*`, build or reuse corpus + tokenizer.

Each split is also tokenized once and cached as flat token arrays (`.npy`, documents end with
eos). The Grain pipeline reads these instead of running the tokenizer in its loop: on 2 cores
that is ~10x more tokens/s, and the same pass yields the per-split token counts.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import hashlib
import heapq
import json
import os
import pathlib
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import ml_collections
import numpy as np

from mtp.config import check_data_config
from mtp.data.byte_tokenizer import ByteTokenizer
from mtp.data.corpus import SPLITS, build_corpus, list_files, resolve_cache_dir
from mtp.data.errors import DataError
from mtp.data.hf_tokenizer import HFTokenizer
from mtp.data.shards import (
    check_tokenizer,
    load_tokenizer,
    open_tokens,
    read_index,
    tokenizer_fingerprint,
    write_shards,
)
from mtp.data.sources import components, open_source, source_kind, source_target, split_for, uses_records
from mtp.data.streaming import STREAMING_KINDS, StreamedDocuments
from mtp.data.synthetic import is_synthetic, synthetic_corpus
from mtp.data.tokenizer import Tokenizer, _sample_key, load_or_train_tokenizer
from mtp.log import log

_ENCODE_BATCH = 256  # documents per `encode_batch` call while tokenizing a split


class TokenizedDocuments(Sequence[np.ndarray]):
    """Random access to the tokenized documents of one split: item i is int32 [len_i], eos last.

    Backed by `<split>.tokens.npy` (all documents back to back, memory-mapped) and
    `<split>.offsets.npy` (document i is tokens[offsets[i]:offsets[i + 1]]).
    """

    def __init__(self, directory: pathlib.Path, split: str):
        self.tokens = np.load(directory / f"{split}.tokens.npy", mmap_mode="r")
        self.offsets = np.load(directory / f"{split}.offsets.npy")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, index: int) -> np.ndarray:
        if not -len(self) <= index < len(self):
            raise IndexError(f"document {index} of {len(self)}")
        index %= len(self)
        return np.asarray(self.tokens[self.offsets[index] : self.offsets[index + 1]], np.int32)


@dataclasses.dataclass(frozen=True)
class PreparedData:
    """A ready corpus and tokenizer.

    Attributes:
      tokenizer: trained on the train split; `tokenizer.vocab_size == data.vocab_size`.
      sources: split -> random-access documents `{'path': bytes, 'text': bytes}` (UTF-8).
      tokens: split -> the same documents tokenized (int32 arrays ending with eos).
      stats: split -> {'files', 'bytes' (UTF-8 text), 'tokens' (including one eos per file)}.
      skipped: files left out of the corpus: {'empty': n, 'not_utf8': m}.
      cache_dir: where the corpus, tokenizer and token arrays live.
      corpus_name: TFDS config name (`<slug>-<fingerprint>`).
    """

    tokenizer: Tokenizer
    sources: Mapping[str, Sequence[Mapping[str, Any]]]
    tokens: Mapping[str, TokenizedDocuments]
    stats: Mapping[str, Mapping[str, int]]
    skipped: Mapping[str, int]
    cache_dir: pathlib.Path
    corpus_name: str


def _corpus(data_cfg: ml_collections.ConfigDict):
    """(corpus name, split -> documents, skipped): a synthetic task, else the TFDS text corpus."""
    if is_synthetic(data_cfg.source):
        name, sources = synthetic_corpus(data_cfg)
        return name, sources, {}
    builder = build_corpus(data_cfg)
    sources = {split: builder.as_data_source(split) for split in SPLITS}
    return builder.builder_config.name, sources, dict(builder.info.metadata.get("skipped", {}))


def pretrained_tokenizer(data_cfg: ml_collections.ConfigDict):
    """The Hugging Face tokenizer of an imported model: ``data.tokenizer_path`` is its
    ``tokenizer.json`` or a workdir holding one (``mtp convert`` writes it)."""
    path = pathlib.Path(data_cfg.tokenizer_path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.is_file():
        raise DataError(f"data.tokenizer='pretrained' needs data.tokenizer_path = a tokenizer.json or a workdir"
                         f" with one; {str(path)!r} does not exist. Convert the model first (mtp convert).")
    tokenizer = HFTokenizer(path)
    if tokenizer.eos_id < 0:
        raise DataError(f"{path} defines no eos token; documents need one to end with.")
    if tokenizer.vocab_size != int(data_cfg.vocab_size):
        raise DataError(f"{path} has {tokenizer.vocab_size} tokens but data.vocab_size={data_cfg.vocab_size};"
                         f" set data.vocab_size and model.vocab_size to {tokenizer.vocab_size}.")
    return tokenizer


def _documents(source: Sequence[Mapping[str, Any]]) -> Iterator[tuple[str, str]]:
    for document in source:
        yield document["path"].decode("utf-8"), document["text"].decode("utf-8")


def _atomic_save(path: pathlib.Path, array: np.ndarray) -> None:
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp.npy")
    np.save(partial, array)
    os.replace(partial, path)


def _tokenize_split(
    source: Sequence[Mapping[str, Any]], tokenizer: Tokenizer, directory: pathlib.Path, split: str
) -> dict[str, int]:
    """Writes `<split>.tokens.npy` / `.offsets.npy` / `.stats.json` (last = completion marker)."""
    encode_batch = getattr(tokenizer, "encode_batch", None) or (
        lambda texts: [tokenizer.encode(text) for text in texts]
    )
    dtype = np.uint16 if tokenizer.vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32
    pieces, lengths, text_bytes, batch = [], [], 0, []
    for index, (_, text) in enumerate(_documents(source)):
        text_bytes += len(text.encode("utf-8"))
        batch.append(text)
        if len(batch) == _ENCODE_BATCH or index == len(source) - 1:
            for ids in encode_batch(batch):
                pieces.append(np.asarray([*ids, tokenizer.eos_id], dtype))
                lengths.append(len(ids) + 1)
            batch = []
    directory.mkdir(parents=True, exist_ok=True)
    _atomic_save(directory / f"{split}.tokens.npy", np.concatenate(pieces))
    _atomic_save(directory / f"{split}.offsets.npy", np.cumsum([0, *lengths], dtype=np.int64))
    stats = {"files": len(lengths), "bytes": text_bytes, "tokens": int(sum(lengths))}
    partial = directory / f"{split}.stats.json.{os.getpid()}.tmp"
    partial.write_text(json.dumps(stats))
    os.replace(partial, directory / f"{split}.stats.json")
    return stats


def load_or_tokenize(
    source: Sequence[Mapping[str, Any]],
    tokenizer: Tokenizer,
    *,
    cache_dir: pathlib.Path,
    corpus_name: str,
    split: str,
) -> tuple[TokenizedDocuments, dict[str, int]]:
    """The split's cached token arrays and stats, keyed by corpus + tokenizer file contents."""
    directory = cache_dir / "tokens" / corpus_name / tokenizer_fingerprint(tokenizer)
    stats_path = directory / f"{split}.stats.json"
    if stats_path.exists():
        stats = json.loads(stats_path.read_text())
    else:
        start = time.perf_counter()
        stats = _tokenize_split(source, tokenizer, directory, split)
        log(f"tokens: {split} tokenized in {time.perf_counter() - start:.1f} s: {stats}", prefix="mtp.data")
    return TokenizedDocuments(directory, split), stats


def tokenized_documents(
    data_cfg: ml_collections.ConfigDict, split: str, tokenizer: Tokenizer
) -> TokenizedDocuments:
    """The tokenized documents of `split` for `tokenizer`, building whatever is not cached."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r} is not one of {SPLITS}. Fix: pick one of those.")
    check_data_config(data_cfg)
    if uses_records(data_cfg):
        return _component_tokens(data_cfg, tokenizer)[0][split]
    corpus_name, sources, _ = _corpus(data_cfg)
    documents, _ = load_or_tokenize(
        sources[split],
        tokenizer,
        cache_dir=resolve_cache_dir(data_cfg),
        corpus_name=corpus_name,
        split=split,
    )
    return documents


@contextlib.contextmanager
def _cache_lock(cache_dir: pathlib.Path):
    """One builder at a time per cache directory, across independent processes (parallel test
    workers, two jobs started together): the second waits, then reuses what the first built."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / ".prepare.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare_data(data_cfg: ml_collections.ConfigDict) -> PreparedData:
    """Builds (or reuses) the corpus, its tokenizer (trained on train), token arrays and stats."""
    check_data_config(data_cfg)
    if uses_records(data_cfg):
        with _cache_lock(resolve_cache_dir(data_cfg)):
            return _prepare_records(data_cfg)
    if not is_synthetic(data_cfg.source):
        list_files(data_cfg)  # an empty or missing corpus fails here, before anything is written
    with _cache_lock(resolve_cache_dir(data_cfg)):
        return _prepare_data(data_cfg)


def _prepare_data(data_cfg: ml_collections.ConfigDict) -> PreparedData:
    corpus_name, sources, skipped = _corpus(data_cfg)
    cache_dir = resolve_cache_dir(data_cfg)
    if data_cfg.tokenizer == "bytes":
        tokenizer = ByteTokenizer()
    elif data_cfg.tokenizer == "pretrained":
        tokenizer = pretrained_tokenizer(data_cfg)
    else:
        tokenizer = load_or_train_tokenizer(
            _documents(sources["train"]),
            cache_dir=cache_dir,
            corpus_name=corpus_name,
            vocab_size=int(data_cfg.vocab_size),
            max_chars=int(data_cfg.tokenizer_max_chars),
        )
    tokens, stats = {}, {}
    for split, source in sources.items():
        tokens[split], stats[split] = load_or_tokenize(
            source, tokenizer, cache_dir=cache_dir, corpus_name=corpus_name, split=split
        )
    return PreparedData(
        tokenizer=tokenizer,
        sources=sources,
        tokens=tokens,
        stats=stats,
        skipped=skipped,
        cache_dir=cache_dir,
        corpus_name=corpus_name,
    )


# --- KIND:... sources and mixtures (mtp/data/sources.py, shards.py; docs/data.md) -----------------
@dataclasses.dataclass(frozen=True)
class Mixture:
    """The documents of several sources, drawn by weight (``make_dataset`` mixes them with Grain)."""

    names: tuple[str, ...]
    weights: tuple[float, ...]
    parts: tuple[Sequence[np.ndarray], ...]

    def __len__(self) -> int:
        return sum(len(part) for part in self.parts)


def _component_cfg(data_cfg: ml_collections.ConfigDict, source: str) -> ml_collections.ConfigDict:
    cfg = copy.deepcopy(data_cfg)
    cfg.source, cfg.mixture = source, ()
    return cfg


def _open_components(data_cfg: ml_collections.ConfigDict) -> dict[str, Any]:
    """source -> an opened RecordSource ('jsonl', ...), a token index ('tokens'), or a TFDS text corpus
    builder ('files': stdlib, a directory, a glob). Every missing input fails here, before any writing."""
    opened = {}
    for source, _ in components(data_cfg):
        kind, cfg = source_kind(source), _component_cfg(data_cfg, source)
        if kind == "tokens":
            opened[source] = read_index(source_target(source), source)
        elif kind == "files":
            opened[source] = list_files(cfg)  # the TFDS corpus is built under the lock
        else:
            opened[source] = open_source(cfg, source)
    return opened


def _sampled_documents(data_cfg, opened: dict) -> Iterator[tuple[str, str]]:
    """The tokenizer's training documents: the train split's documents with the smallest sample keys
    until data.tokenizer_max_chars (what ``training_sample`` takes), kept in a bounded heap."""
    max_chars, heap, total = int(data_cfg.tokenizer_max_chars), [], 0
    for source, item in opened.items():
        if source_kind(source) == "tokens":
            continue
        if source_kind(source) == "files":
            documents = _documents(build_corpus(_component_cfg(data_cfg, source)).as_data_source("train"))
        else:
            documents = ((f"{source}|{r.doc_id}", r.payload) for unit in item.units for r in unit.records(0)
                         if isinstance(r.payload, str) and r.payload
                         and split_for(r, data_cfg.val_fraction) == "train")
        for doc_id, text in documents:
            key = _sample_key(doc_id)
            heapq.heappush(heap, (tuple(-b for b in key), doc_id, text))
            total += len(text)
            while heap and total - len(heap[0][2]) >= max_chars:
                total -= len(heapq.heappop(heap)[2])
    yield from ((doc_id, text) for _, doc_id, text in heap)


def _records_tokenizer(data_cfg: ml_collections.ConfigDict, opened: dict, corpus_name: str, cache_dir):
    """bytes / pretrained as configured; a SentencePiece model from data.tokenizer_path, else the one
    stored with the first tokens: source, else trained on the text sources' train splits."""
    if data_cfg.tokenizer == "bytes":
        return ByteTokenizer()
    if data_cfg.tokenizer == "pretrained":
        return pretrained_tokenizer(data_cfg)
    if data_cfg.tokenizer_path:
        return Tokenizer(pathlib.Path(data_cfg.tokenizer_path).expanduser())
    for source, item in opened.items():
        if source_kind(source) == "tokens":
            return load_tokenizer(item["tokenizer"], pathlib.Path(source_target(source)).expanduser())
    if all(source_kind(s) == "arrayrecord" and data_cfg.record_format == "tokens" for s in opened):
        raise DataError("data.record_format='tokens' holds no text to train a SentencePiece tokenizer on. Fix: set"
                        " data.tokenizer_path to the tokenizer the ids came from (or data.tokenizer='bytes').")
    return load_or_train_tokenizer(_sampled_documents(data_cfg, opened), cache_dir=cache_dir,
                                   corpus_name=corpus_name, vocab_size=int(data_cfg.vocab_size),
                                   max_chars=int(data_cfg.tokenizer_max_chars))


def _corpus_name(data_cfg: ml_collections.ConfigDict, opened: dict) -> str:
    if not data_cfg.mixture:
        source, item = next(iter(opened.items()))
        if source_kind(source) != "tokens":
            return item.name
    parts = [(s, w, getattr(opened[s], "name", None) or source_target(s)) for s, w in components(data_cfg)]
    if data_cfg.tokenizer == "sentencepiece" and not data_cfg.tokenizer_path:  # trained on the text sources
        parts.append((data_cfg.vocab_size, data_cfg.tokenizer_max_chars))
    return "mix-" + hashlib.sha1(json.dumps(parts).encode()).hexdigest()[:16]


def _component_tokens(data_cfg: ml_collections.ConfigDict, tokenizer, opened: dict | None = None):
    """(split -> documents or Mixture, split -> stats, skipped) for a KIND:... source or a mixture."""
    opened = opened if opened is not None else _open_components(data_cfg)
    cache_dir = resolve_cache_dir(data_cfg)
    parts, stats, skipped = {s: [] for s in SPLITS}, {s: {"documents": 0, "tokens": 0} for s in SPLITS}, 0
    for source, item in opened.items():
        cfg = _component_cfg(data_cfg, source)
        if source_kind(source) == "files":
            name, sources, _ = _corpus(cfg)
            for split in SPLITS:
                docs, split_stats = load_or_tokenize(sources[split], tokenizer, cache_dir=cache_dir,
                                                     corpus_name=name, split=split)
                parts[split].append(docs)
                stats[split]["documents"] += len(docs)
                if "tokens" in stats[split]:
                    stats[split]["tokens"] += split_stats["tokens"]
            continue
        if data_cfg.get("streaming", False) and source_kind(source) in STREAMING_KINDS:  # tokenized by the pipeline
            for split in SPLITS:
                docs = StreamedDocuments(cfg, source, split)
                if not len(docs):
                    raise DataError(f"{source}: no document fell into the {split!r} split. Fix: add documents, or"
                                    " raise data.val_fraction for a tiny corpus.")
                parts[split].append(docs)
                stats[split]["documents"] += len(docs)
                stats[split].pop("tokens", None)  # not known before the documents are tokenized
            continue
        if source_kind(source) == "tokens":
            directory, index = pathlib.Path(source_target(source)).expanduser(), item
            check_tokenizer(index, tokenizer, directory)
        else:
            directory = cache_dir / "tokens" / item.name / tokenizer_fingerprint(tokenizer)
            index = write_shards(cfg, item, tokenizer, directory)
        skipped += index.get("skipped", 0)
        if index.get("skipped"):
            log(f"{source}: skipped {index['skipped']} bad record(s) (data.bad_records='skip'), e.g."
                f" {index.get('skipped_examples', [])[:1]}", prefix="mtp.data")
        for split in SPLITS:
            parts[split].append(open_tokens(directory, split, index))
            stats[split]["documents"] += index["splits"][split]["documents"]
            if "tokens" in stats[split]:
                stats[split]["tokens"] += index["splits"][split]["tokens"]
    if not data_cfg.mixture:
        return {s: parts[s][0] for s in SPLITS}, stats, skipped
    names = tuple(s for s, _ in components(data_cfg))
    weights = tuple(w for _, w in components(data_cfg))
    return {s: Mixture(names, weights, tuple(parts[s])) for s in SPLITS}, stats, skipped


def _prepare_records(data_cfg: ml_collections.ConfigDict) -> PreparedData:
    opened = _open_components(data_cfg)
    cache_dir = resolve_cache_dir(data_cfg)
    corpus_name = _corpus_name(data_cfg, opened)
    tokenizer = _records_tokenizer(data_cfg, opened, corpus_name, cache_dir)
    if tokenizer.vocab_size != int(data_cfg.vocab_size):
        raise DataError(f"The tokenizer ({getattr(tokenizer, 'path', None) or 'bytes'}) has {tokenizer.vocab_size}"
                        f" ids but data.vocab_size={data_cfg.vocab_size}; set data.vocab_size and model.vocab_size"
                        f" to {tokenizer.vocab_size}.")
    tokens, stats, skipped = _component_tokens(data_cfg, tokenizer, opened)
    return PreparedData(tokenizer=tokenizer, sources={}, tokens=tokens, stats=stats,
                        skipped={"bad_records": skipped}, cache_dir=cache_dir, corpus_name=corpus_name)


def tokenize_corpus(data_cfg: ml_collections.ConfigDict, out: str | os.PathLike, *, workers: int = 1,
                    shard_bytes: int | None = None) -> dict:
    """``mtp data tokenize``: the config's source (its tokenizer prepared as training would) written as
    token shards under ``out``; returns the index. Resumes a killed run."""
    check_data_config(data_cfg)
    source = str(data_cfg.source)
    kind = source_kind(source)
    if data_cfg.mixture or kind in ("tokens", "synthetic"):
        raise DataError(f"mtp data tokenize writes one source; data.source={source!r}"
                        f"{' with a mixture' if data_cfg.mixture else ''} is not one it can read. Fix: tokenize"
                        " each text source into its own --out and mix the tokens:DIR sources in data.mixture.")
    opened = _open_components(data_cfg)
    cache_dir = resolve_cache_dir(data_cfg)
    with _cache_lock(cache_dir):
        tokenizer = _records_tokenizer(data_cfg, opened, _corpus_name(data_cfg, opened), cache_dir)
    record_source = opened[source] if kind != "files" else open_source(data_cfg, source)
    extra = {"shard_bytes": shard_bytes} if shard_bytes else {}
    return write_shards(data_cfg, record_source, tokenizer, pathlib.Path(out), workers=workers, **extra)
