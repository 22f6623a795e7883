"""The data entry point for the trainer: validate `data.*`, build or reuse corpus + tokenizer."""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import ml_collections

from mtp.data.corpus import SPLITS, build_corpus, log, resolve_cache_dir
from mtp.data.tokenizer import Tokenizer, load_or_train_tokenizer

REQUIRED_KEYS = (
    "source",
    "glob",
    "val_fraction",
    "vocab_size",
    "cache_dir",
    "tokenizer_max_chars",
    "max_files",
)
_STATS_BATCH = 256  # documents per `encode_batch` call when counting tokens


@dataclasses.dataclass(frozen=True)
class PreparedData:
    """A ready corpus and tokenizer.

    Attributes:
      tokenizer: trained on the train split; `tokenizer.vocab_size == data.vocab_size`.
      sources: split -> random-access documents `{'path': bytes, 'text': bytes}` (UTF-8).
      stats: split -> {'files', 'bytes' (UTF-8 text), 'tokens' (including one eos per file)}.
      skipped: files left out of the corpus: {'empty': n, 'not_utf8': m}.
      cache_dir: where the corpus and tokenizer live.
      corpus_name: TFDS config name (`<slug>-<fingerprint>`).
    """

    tokenizer: Tokenizer
    sources: Mapping[str, Sequence[Mapping[str, Any]]]
    stats: Mapping[str, Mapping[str, int]]
    skipped: Mapping[str, int]
    cache_dir: pathlib.Path
    corpus_name: str


def check_data_config(data_cfg: ml_collections.ConfigDict) -> None:
    """Raises ValueError naming the `data.*` key that is missing or out of range."""
    missing = [key for key in REQUIRED_KEYS if key not in data_cfg]
    if missing:
        raise ValueError(
            f"data config lacks {', '.join('data.' + k for k in missing)}. "
            f"Fix: define all of {', '.join(REQUIRED_KEYS)} in the config's `data` block."
        )
    checks = [
        ("val_fraction", 0 < data_cfg.val_fraction < 1, "a fraction in (0, 1), e.g. 0.05"),
        ("vocab_size", int(data_cfg.vocab_size) >= 300, "an int >= 300 (bytes + specials)"),
        ("tokenizer_max_chars", int(data_cfg.tokenizer_max_chars) > 0, "a positive int"),
        ("max_files", int(data_cfg.max_files) >= 0, "0 (all files) or a positive int"),
        ("source", bool(str(data_cfg.source)), "'stdlib', a directory or a glob"),
    ]
    for key, ok, expected in checks:
        if not ok:
            raise ValueError(f"data.{key}={data_cfg[key]!r} is invalid. Fix: set it to {expected}.")


def _documents(source: Sequence[Mapping[str, Any]]) -> Iterator[tuple[str, str]]:
    for document in source:
        yield document["path"].decode("utf-8"), document["text"].decode("utf-8")


def _count_split(source: Sequence[Mapping[str, Any]], tokenizer: Tokenizer) -> dict[str, int]:
    files = text_bytes = tokens = 0
    batch: list[str] = []
    for index, (_, text) in enumerate(_documents(source)):
        files += 1
        text_bytes += len(text.encode("utf-8"))
        batch.append(text)
        if len(batch) == _STATS_BATCH or index == len(source) - 1:
            tokens += sum(len(ids) + 1 for ids in tokenizer.encode_batch(batch))
            batch = []
    return {"files": files, "bytes": text_bytes, "tokens": tokens}


def _load_or_count(sources, tokenizer: Tokenizer) -> dict[str, dict[str, int]]:
    """Per-split stats, cached next to the tokenizer (counting tokens encodes the whole corpus)."""
    path = tokenizer.path.with_suffix(".stats.json")
    if path.exists():
        return json.loads(path.read_text())
    start = time.perf_counter()
    stats = {split: _count_split(source, tokenizer) for split, source in sources.items()}
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(stats, indent=1))
    os.replace(partial, path)
    log(f"stats: counted tokens in {time.perf_counter() - start:.1f} s: {stats}")
    return stats


def prepare_data(data_cfg: ml_collections.ConfigDict) -> PreparedData:
    """Builds (or reuses) the corpus, the tokenizer trained on its train split, and its stats."""
    check_data_config(data_cfg)
    builder = build_corpus(data_cfg)
    sources = {split: builder.as_data_source(split) for split in SPLITS}
    cache_dir = resolve_cache_dir(data_cfg)
    tokenizer = load_or_train_tokenizer(
        _documents(sources["train"]),
        cache_dir=cache_dir,
        corpus_name=builder.builder_config.name,
        vocab_size=int(data_cfg.vocab_size),
        max_chars=int(data_cfg.tokenizer_max_chars),
    )
    return PreparedData(
        tokenizer=tokenizer,
        sources=sources,
        stats=_load_or_count(sources, tokenizer),
        skipped=dict(builder.info.metadata.get("skipped", {})),
        cache_dir=cache_dir,
        corpus_name=builder.builder_config.name,
    )
