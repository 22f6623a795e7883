"""Self-distillation data (Medusa-2): corpus prefixes continued by the pretrained model itself, written
as a ``tokens:`` directory that heads then train on (``distill.*``; docs/retrofitting.md).

    DIR = distill.dir, or <workdir>/distill when it is ''
    DIR/manifest.json    the fingerprint: model parameters (sha1), distill.* settings, tokenizer, corpus
    DIR/index.json       written last (the format of ``mtp data tokenize``, mtp/data/shards.py)
    DIR/train-u00000-c{C}.arrayrecord (+ .lengths.npy)       train rows, chunk C = distill.batch_size rows
    DIR/validation-u00001-c{C}.arrayrecord (+ .lengths.npy)  validation rows (prefixes of held-out text)
    DIR/parts/u{U}-c{C}.json                                 a chunk is finished (a rerun skips it)

A row is one document: ``distill.prefix_len`` tokens of a corpus document (a random document of the
split and a random offset, drawn from ``distill.seed``; documents shorter than the prefix are skipped)
followed by the model's ``distill.new_tokens`` next tokens (greedy, or sampled at ``distill.temperature``),
ending at the model's eos when it writes one (then eos is the row's last token; a row cut at
``new_tokens`` has none, so no target teaches an end the model did not write). Only head 1 of the model
at ``init.workdir`` generates (``mtp.decode.generate``, batched, the XLA backend).

A finished directory whose manifest matches is reused as is; one written for another model, settings or
corpus is an error naming what differs (nothing is deleted). A killed run resumes at the first
unfinished chunk.
"""

from __future__ import annotations

import contextlib
import copy
import fcntl
import hashlib
import json
import pathlib
import time

import jax
import ml_collections
import numpy as np
from flax import nnx

from mtp.config import ConfigError, DecodeSettings
from mtp.data.errors import DataError
from mtp.data.prepare import PreparedData, prepare_data
from mtp.data.shards import (
    FORMAT,
    ShardChunk,
    done_chunks,
    open_shard_dir,
    read_index,
    tokenizer_fingerprint,
    tokenizer_info,
    write_index,
)
from mtp.decode.api import decode_config
from mtp.decode.generate import generate
from mtp.log import log
from mtp.train.init_from import ensure_source
from mtp.workdir import LoadedModel, load_model, resolve_workdir

UNITS = {"train": 0, "validation": 1}  # distill's two inputs: unit 0 = train rows, unit 1 = validation rows
SETTINGS = ("prefixes", "val_prefixes", "prefix_len", "new_tokens", "temperature", "seed", "batch_size")
BACKEND = "xla"  # batched rows: the CPU kernels decode one row at a time


def distill_dir(cfg) -> pathlib.Path:
    """``distill.dir``, or ``<workdir>/distill``."""
    if cfg.distill.dir:
        return pathlib.Path(cfg.distill.dir).expanduser().absolute()
    return resolve_workdir(cfg) / "distill"


def distill_data_config(data_cfg: ml_collections.ConfigDict, directory: pathlib.Path) -> ml_collections.ConfigDict:
    """``data.*`` reading the generated rows (``tokens:DIR``) instead of the corpus; the tokenizer stays."""
    out = copy.deepcopy(data_cfg)
    out.source, out.mixture, out.streaming = f"tokens:{directory}", (), False
    return out


# --- prefixes --------------------------------------------------------------------------------------
def _lengths(part) -> np.ndarray:
    """Token counts (eos included) of a split's documents without reading them where the store knows them."""
    if hasattr(part, "lengths"):
        return np.asarray(part.lengths, np.int64)
    if hasattr(part, "offsets"):
        return np.diff(np.asarray(part.offsets, np.int64))
    return np.asarray([len(part[i]) for i in range(len(part))], np.int64)


def select_prefixes(documents, n: int, prefix_len: int, seed: int, split: str) -> list[np.ndarray]:
    """``n`` prefixes of ``prefix_len`` tokens: random documents (uniform over documents, every part of a
    mixture alike; drawn with replacement only when fewer than ``n`` are long enough) at random offsets."""
    parts = tuple(getattr(documents, "parts", (documents,)))
    lengths = [_lengths(p) for p in parts]
    text = np.concatenate(lengths) - 1 if lengths else np.zeros(0, np.int64)  # tokens before the eos
    eligible = np.flatnonzero(text >= prefix_len)
    if not len(eligible):
        longest = int(text.max()) if len(text) else 0
        raise DataError(f"distill.prefix_len={prefix_len}: no document of the {split!r} split is that long (the"
                        f" longest has {longest} tokens). Fix: lower distill.prefix_len, or use a corpus of longer"
                        " documents.")
    rng = np.random.default_rng([seed, UNITS[split]])
    picks = rng.choice(eligible, size=n, replace=len(eligible) < n)
    offsets = rng.integers(0, text[picks] - prefix_len + 1)
    starts = np.cumsum([0] + [len(x) for x in lengths])
    rows = []
    for doc, offset in zip(picks.tolist(), offsets.tolist()):
        part = int(np.searchsorted(starts, doc, side="right")) - 1
        tokens = np.asarray(parts[part][doc - int(starts[part])], np.int32)
        rows.append(tokens[offset:offset + prefix_len])
    return rows


def row_document(prefix, new_tokens: list[int], eos_id: int) -> np.ndarray:
    """One row: the prefix and the new tokens up to and including the first eos (the rest dropped)."""
    new = list(new_tokens)
    if eos_id >= 0 and eos_id in new:
        new = new[:new.index(eos_id) + 1]
    return np.asarray([*np.asarray(prefix).tolist(), *new], np.int32)


# --- fingerprint -----------------------------------------------------------------------------------
def params_sha1(model) -> str:
    """sha1 of every parameter (path, dtype, shape, bytes) of ``model``."""
    digest = hashlib.sha1()
    for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(model, nnx.Param))):
        value = np.asarray(leaf)
        digest.update(f"{jax.tree_util.keystr(path)}|{value.dtype}|{value.shape}".encode())
        digest.update(np.ascontiguousarray(value).tobytes())
    return digest.hexdigest()[:16]


def _manifest(cfg, loaded: LoadedModel, data: PreparedData) -> dict:
    d = cfg.data
    manifest = {
        "format": FORMAT,
        "tokenizer": tokenizer_info(data.tokenizer),
        "distill": {key: cfg.distill[key] for key in SETTINGS},
        "model": {"params_sha1": params_sha1(loaded.model), "config": loaded.cfg.model.to_dict(),
                  "decode": {"backend": BACKEND, "mode": _mode(cfg.distill)}},
        "corpus": {"source": str(d.source), "mixture": [list(e) for e in d.mixture], "name": data.corpus_name,
                   "documents": {s: len(data.tokens[s]) for s in UNITS}},
    }
    return json.loads(json.dumps(manifest, default=str))  # as it reads back from manifest.json


def _mode(ds) -> str:
    return "greedy" if ds.temperature == 0 else "sample"


# --- generation ------------------------------------------------------------------------------------
def _chunk_seed(seed: int, split: str, chunk: int) -> int:
    return int(np.random.SeedSequence([seed, UNITS[split], chunk]).generate_state(1)[0] >> 1)


class _Progress:
    def __init__(self, total_rows: int, done_rows: int, new_tokens: int):
        self.total, self.done, self.new_tokens = total_rows, done_rows, new_tokens
        self.start, self.rows, self.tokens = time.perf_counter(), 0, 0

    def add(self, split: str, rows: int, tokens: int, seconds: float) -> None:
        self.rows, self.tokens, self.done = self.rows + rows, self.tokens + tokens, self.done + rows
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        left = (self.total - self.done) * elapsed / self.rows
        log(f"distill: {self.done}/{self.total} rows ({split}), this chunk {rows} rows x <= {self.new_tokens} tokens"
            f" in {seconds:.1f} s ({tokens / max(seconds, 1e-9):,.0f} new tokens/s); overall"
            f" {self.tokens / elapsed:,.0f} new tokens/s, ~{left:,.0f} s left", prefix="mtp.distill")


def _generate_split(out: pathlib.Path, loaded: LoadedModel, dc, split: str, prefixes: list[np.ndarray],
                    ds, progress: _Progress) -> None:
    unit, batch = UNITS[split], int(ds.batch_size)
    first_chunk = len(done_chunks(out, unit))
    for c in range(first_chunk, -(-len(prefixes) // batch)):
        rows = prefixes[c * batch:(c + 1) * batch]
        start = time.perf_counter()
        result = generate(loaded.model, [r.tolist() for r in rows], dc, seed=_chunk_seed(ds.seed, split, c))
        chunk = ShardChunk(out, unit, c, c * batch)
        new = 0
        for prefix, tokens in zip(rows, result.tokens):
            document = row_document(prefix, tokens, dc.eos_id)
            new += len(document) - len(prefix)
            chunk.write(split, document)
        chunk.finish(c * batch + len(rows), 0, [])
        progress.add(split, len(rows), new, time.perf_counter() - start)


@contextlib.contextmanager
def _locked(out: pathlib.Path):
    """One writer per directory (a sweep's runs sharing distill.dir): the next waits, then reuses. The lock
    file lies beside the directory (.NAME.lock), so a directory that is not ours stays as it was."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def load_generator(cfg) -> LoadedModel:
    """The model being retrofitted (init.workdir, converted first when init.gguf / init.hf say so)."""
    if not cfg.init.workdir:
        raise ConfigError("init.workdir='' is invalid: the distilled continuations come from the pretrained"
                          " model there; set init.workdir to it.")
    return load_model(ensure_source(cfg.init))


def ensure_distilled(cfg, *, loaded: LoadedModel | None = None, data: PreparedData | None = None) -> dict:
    """Generates the rows of ``distill.*`` into ``distill_dir(cfg)`` (or reuses / resumes what is there) and
    returns its index. ``loaded`` / ``data``: the generating model and the prepared corpus, when at hand."""
    ds, out = cfg.distill, distill_dir(cfg)
    loaded = loaded or load_generator(cfg)
    need = ds.prefix_len + ds.new_tokens
    if need > loaded.spec.max_seq_len:
        raise ConfigError(f"distill.new_tokens={ds.new_tokens} is invalid: distill.prefix_len ({ds.prefix_len}) +"
                          f" distill.new_tokens = {need} exceeds the model's max_seq_len={loaded.spec.max_seq_len};"
                          " lower one of them.")
    data = data or prepare_data(cfg.data)
    if tokenizer_fingerprint(data.tokenizer) != tokenizer_fingerprint(loaded.tokenizer):
        raise ConfigError(f"data.tokenizer={cfg.data.tokenizer!r} is invalid: the run's tokenizer"
                          f" ({tokenizer_info(data.tokenizer)['fingerprint']}) is not the one of the model at"
                          f" init.workdir={cfg.init.workdir!r} ({tokenizer_info(loaded.tokenizer)['fingerprint']}), so"
                          " its prefixes would be other ids. Fix: data.tokenizer='pretrained' with"
                          " data.tokenizer_path=init.workdir (or that model's own tokenizer).")
    manifest = _manifest(cfg, loaded, data)
    fix = "set distill.dir to a new directory (or restore the settings it was written with)"
    if jax.process_count() > 1:  # no writing: every process checks a finished directory, or stops
        if not (out / "index.json").exists():
            raise DataError(f"{out} holds no finished distilled rows, and a multi-process run does not generate"
                            " them. Fix: run `mtp distill` with this config on one process first (same distill.*,"
                            " init.workdir and data.*), then train.")
        index = read_index(out, f"tokens:{out}")
        old = json.loads((out / "manifest.json").read_text())
        if old != manifest:
            raise DataError(f"{out} holds distilled rows of another model, settings or corpus"
                            f" ({', '.join(sorted(k for k in manifest if old.get(k) != manifest[k]))}). Fix: {fix}.")
        return index
    with _locked(out):
        finished = open_shard_dir(out, manifest, data.tokenizer, fix)
        if finished is not None:
            log(f"distill: reusing {out} ({finished['splits']['train']['documents']} train +"
                f" {finished['splits']['validation']['documents']} validation rows)", prefix="mtp.distill")
            return finished
        dc = decode_config(loaded, mode=_mode(ds), max_new_tokens=int(ds.new_tokens),
                           temperature=float(ds.temperature) or 1.0, settings=DecodeSettings(backend=BACKEND))
        counts = {"train": int(ds.prefixes), "validation": int(ds.val_prefixes)}
        done = sum(min(len(done_chunks(out, UNITS[s])) * ds.batch_size, n) for s, n in counts.items())
        progress = _Progress(sum(counts.values()), done, int(ds.new_tokens))
        log(f"distill: {sum(counts.values()) - done} of {sum(counts.values())} rows to generate ({_mode(ds)},"
            f" {ds.prefix_len} + {ds.new_tokens} tokens, batches of {ds.batch_size}) with {loaded.workdir}"
            f" -> {out}", prefix="mtp.distill")
        for split, n in counts.items():
            prefixes = select_prefixes(data.tokens[split], n, int(ds.prefix_len), int(ds.seed), split)
            _generate_split(out, loaded, dc, split, prefixes, ds, progress)
        index = write_index(out, len(UNITS), f"distill ({out})", manifest)
        log(f"distill: done: {index['splits']['train']['tokens']:,} train + {index['splits']['validation']['tokens']:,}"
            f" validation tokens -> {out / 'index.json'}", prefix="mtp.distill")
        return index
