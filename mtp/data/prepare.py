"""The data entry point for the trainer: validate `data.*`, build or reuse corpus + tokenizer.

Each split is also tokenized once and cached as flat token arrays (`.npy`, documents end with
eos). The Grain pipeline reads these instead of running the tokenizer in its loop: on 2 cores
that is ~10x more tokens/s, and the same pass yields the per-split token counts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
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
from mtp.data.synthetic import is_synthetic, synthetic_corpus
from mtp.data.tokenizer import Tokenizer, load_or_train_tokenizer
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
    if tokenizer.path is None:  # the byte tokenizer: nothing on disk, its name is its identity
        digest = f"bytes-v{tokenizer.vocab_size}"
    else:
        digest = hashlib.sha1(pathlib.Path(tokenizer.path).read_bytes()).hexdigest()[:16]
    directory = cache_dir / "tokens" / corpus_name / digest
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
