"""A corpus of local text files as a TFDS dataset (ArrayRecord, random access, no TensorFlow).

One example per file: `{'path': relative path, 'text': file contents}`. Files go to `train` or
`validation` by a stable hash of their relative path, so a file never changes split between runs or
machines. The TFDS config name carries a fingerprint of the source, glob, split fraction and file
listing, so a different corpus never reuses a stale cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
import functools
import glob as globlib
import hashlib
import logging
import os
import pathlib
import re
import sys
import sysconfig
import time
from collections.abc import Iterator
from typing import ClassVar

import ml_collections
import tensorflow_datasets as tfds

from mtp.data.errors import DataError
from mtp.log import log

STDLIB = "stdlib"
SPLITS = ("train", "validation")
_HASH_BUCKETS = 10_000
_EXCLUDED_DIRS = frozenset({"__pycache__"})
_STDLIB_EXCLUDED_DIRS = _EXCLUDED_DIRS | {"site-packages", "dist-packages"}
_GLOB_CHARS = re.compile(r"[*?\[]")


def resolve_cache_dir(data_cfg: ml_collections.ConfigDict) -> pathlib.Path:
    """`data.cache_dir`, else `$MTP_CACHE_DIR/data`, else `~/.cache/mtp/data`."""
    if data_cfg.cache_dir:
        return pathlib.Path(data_cfg.cache_dir).expanduser().resolve()
    root = os.environ.get("MTP_CACHE_DIR") or "~/.cache/mtp"
    return (pathlib.Path(root).expanduser() / "data").resolve()


def path_bucket(relative_path: str) -> int:
    """Stable bucket in [0, 10_000) of a path (sha1, never Python's salted `hash`)."""
    digest = hashlib.sha1(relative_path.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") % _HASH_BUCKETS


def split_of(relative_path: str, val_fraction: float) -> str:
    """'validation' for the val_fraction of paths with the lowest buckets, else 'train'."""
    return "validation" if path_bucket(relative_path) < val_fraction * _HASH_BUCKETS else "train"


def assign_splits(relative_paths: list[str], val_fraction: float) -> dict[str, list[str]]:
    """Splits paths by `split_of`; if validation would be empty, the lowest-bucket path moves there.

    The fallback keeps tiny corpora (e.g. `data.max_files=5`) usable: TFDS refuses empty splits.
    """
    splits = {name: [] for name in SPLITS}
    for path in relative_paths:
        splits[split_of(path, val_fraction)].append(path)
    if not splits["validation"] and splits["train"]:
        moved = min(splits["train"], key=lambda p: (path_bucket(p), p))
        splits["train"].remove(moved)
        splits["validation"].append(moved)
    return splits


@dataclasses.dataclass(frozen=True)
class CorpusFiles:
    """The files a data config selects, found without reading them.

    Attributes:
        root: directory that `relative_paths` are relative to.
        relative_paths: sorted POSIX paths (after `data.max_files`).
        total_bytes: sum of file sizes on disk.
        val_fraction: share of paths (by hash) that go to validation.
        name: TFDS config name, `<slug>-<fingerprint>`; changes whenever the selection changes.
    """

    root: pathlib.Path
    relative_paths: tuple[str, ...] = dataclasses.field(repr=False)
    total_bytes: int
    val_fraction: float
    name: str


def _stdlib_root() -> pathlib.Path:
    return pathlib.Path(sysconfig.get_paths()["stdlib"]).resolve()


@functools.lru_cache(maxsize=8)
def _stdlib_files(pattern: str) -> tuple[pathlib.Path, tuple[pathlib.Path, ...]]:
    """The stdlib's files matching `pattern`, once per process (the running stdlib does not change).

    ``**/NAME_GLOB`` walks the tree pruning site-packages (installed packages would otherwise be
    walked only to be dropped); other patterns fall back to ``Path.glob``.
    """
    root = _stdlib_root()
    simple = re.fullmatch(r"\*\*/([^/]+)", pattern)
    if not simple:
        return root, tuple(root.glob(pattern))
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _STDLIB_EXCLUDED_DIRS]
        files.extend(pathlib.Path(dirpath, f) for f in filenames if fnmatch.fnmatchcase(f, simple.group(1)))
    return root, tuple(files)


def _candidate_files(source: str, pattern: str) -> tuple[pathlib.Path, list[pathlib.Path]]:
    """(root, files) for a source that is 'stdlib', a directory, or a glob."""
    if source == STDLIB:
        root, files = _stdlib_files(pattern)
        return root, list(files)
    if _GLOB_CHARS.search(source):
        expanded = os.path.expanduser(source)
        prefix = _GLOB_CHARS.split(expanded, maxsplit=1)[0]
        # abspath, not resolve: a symlinked file must stay under the root it was found in.
        root = pathlib.Path(os.path.abspath(os.path.dirname(prefix) or "."))
        matches = globlib.glob(expanded, recursive=True)
        return root, [pathlib.Path(os.path.abspath(p)) for p in matches]
    root = pathlib.Path(os.path.abspath(os.path.expanduser(source)))
    return root, (list(root.glob(pattern)) if root.is_dir() else [])


def list_files(data_cfg: ml_collections.ConfigDict) -> CorpusFiles:
    """Finds the corpus files of `data.source`/`data.glob`; raises if there are none."""
    source, pattern = str(data_cfg.source), str(data_cfg.glob)
    root, candidates = _candidate_files(source, pattern)
    excluded = _STDLIB_EXCLUDED_DIRS if source == STDLIB else _EXCLUDED_DIRS
    relative_paths, sizes = [], {}
    for path in candidates:
        relative = path.relative_to(root).as_posix()
        if excluded.intersection(relative.split("/")) or not path.is_file():
            continue
        relative_paths.append(relative)
    relative_paths.sort()
    if data_cfg.max_files > 0:
        relative_paths = relative_paths[: data_cfg.max_files]
    if not relative_paths:
        where = (
            f"the glob {source!r}"
            if _GLOB_CHARS.search(source)
            else f"{pattern!r} under {str(root)!r}"
        )
        raise DataError(
            f"data.source={source!r} with data.glob={pattern!r} matched no files ({where}). "
            "Fix: point data.source at a directory of text files (or 'stdlib', or a glob such as "
            "'/path/**/*.txt') and set data.glob to a pattern that matches files inside it."
        )
    fingerprint = hashlib.sha1()
    fingerprint.update(repr((source, str(root), pattern, data_cfg.val_fraction)).encode())
    for relative in relative_paths:
        stat = (root / relative).stat()
        sizes[relative] = stat.st_size
        fingerprint.update(f"{relative}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    slug = STDLIB if source == STDLIB else re.sub(r"[^\w]+", "_", root.name).strip("_") or "files"
    return CorpusFiles(
        root=root,
        relative_paths=tuple(relative_paths),
        total_bytes=sum(sizes.values()),
        val_fraction=float(data_cfg.val_fraction),
        name=f"{slug}-{fingerprint.hexdigest()[:16]}",
    )


def read_text(path: pathlib.Path) -> str | None:
    """File contents as text, or None when the file is empty or not valid UTF-8."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        return None
    return text or None


class TextFiles(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """TFDS builder over the files of a `CorpusFiles`; one example per readable file."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "path + text per file; split by sha1 of the relative path."
    }
    # TFDS looks for download checksums next to the builder's source file, and that lookup needs
    # the `importlib_resources` backport, which is not installed. Nothing is downloaded here.
    code_path: ClassVar[None] = None

    def __init__(self, *, corpus: CorpusFiles, **kwargs):
        self._corpus = corpus
        config = tfds.core.BuilderConfig(
            name=corpus.name, version=self.VERSION, description=f"text files under {corpus.root}"
        )
        super().__init__(config=config, **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Local text files, one example per file.",
            features=tfds.features.FeaturesDict(
                {"path": tfds.features.Text(), "text": tfds.features.Text()}
            ),
            metadata=tfds.core.MetadataDict(),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # Nothing to download: the files are local.
        readable, skipped = [], {"empty": 0, "not_utf8": 0}
        for relative in self._corpus.relative_paths:
            path = self._corpus.root / relative
            if path.stat().st_size == 0:
                skipped["empty"] += 1
            elif read_text(path) is None:
                skipped["not_utf8"] += 1
            else:
                readable.append(relative)
        self.info.metadata["skipped"] = skipped
        splits = assign_splits(readable, self._corpus.val_fraction)
        if not splits["train"]:
            raise DataError(
                f"Only {len(readable)} readable (non-empty UTF-8) file(s) under "
                f"{self._corpus.root}: need at least 2, one for train and one for validation. "
                "Fix: add files, raise data.max_files, or widen data.glob."
            )
        return {name: self._generate_examples(paths) for name, paths in splits.items()}

    def _generate_examples(self, relative_paths: list[str]) -> Iterator[tuple[str, dict[str, str]]]:
        for relative in relative_paths:
            yield relative, {"path": relative, "text": read_text(self._corpus.root / relative)}


@contextlib.contextmanager
def _quiet_tfds() -> Iterator[None]:
    """Hides TFDS progress bars and absl chatter; TFDS's own prints go to stderr, not stdout."""
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.ERROR)
    tfds.disable_progress_bar()
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        tfds.enable_progress_bar()
        absl_logger.setLevel(level)


def build_corpus(data_cfg: ml_collections.ConfigDict) -> TextFiles:
    """Builds the corpus as ArrayRecord under the cache dir, or reuses an existing build.

    Read it back with `builder.as_data_source(split)`: a random-access sequence of
    `{'path': bytes, 'text': bytes}` (UTF-8).
    """
    corpus = list_files(data_cfg)
    data_dir = resolve_cache_dir(data_cfg) / "tfds"
    with _quiet_tfds():
        builder = TextFiles(corpus=corpus, data_dir=data_dir)
        if (builder.data_path / "dataset_info.json").exists():
            log(f"corpus {corpus.name}: reusing {builder.data_dir}", prefix="mtp.data")
            return builder
        log(
            f"corpus {corpus.name}: {len(corpus.relative_paths)} files, "
            f"{corpus.total_bytes / 1e6:.1f} MB under {corpus.root}; "
            f"building ArrayRecord in {builder.data_dir}", prefix="mtp.data"
        )
        start = time.perf_counter()
        builder.download_and_prepare(
            file_format="array_record",
            download_dir=data_dir / "downloads",
            download_config=tfds.download.DownloadConfig(
                compute_stats=tfds.download.ComputeStatsMode.SKIP
            ),
        )
    counts = ", ".join(f"{s} {builder.info.splits[s].num_examples}" for s in SPLITS)
    skipped = builder.info.metadata.get("skipped", {})
    log(
        f"corpus {corpus.name}: built in {time.perf_counter() - start:.1f} s ({counts} files; "
        f"skipped {skipped.get('empty', 0)} empty, {skipped.get('not_utf8', 0)} not UTF-8)", prefix="mtp.data"
    )
    return builder
