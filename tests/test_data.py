"""Data layer: corpus split + cache, tokenizer round trips, packing, sharding, resume.

Most tests share one tiny synthetic corpus (~40 files, vocab 400) built once per module; every
cache lives under pytest's tmp dirs.
"""

from __future__ import annotations

import hashlib
import json
import pathlib

import numpy as np
import pytest

from mtp.config import base_config, check_data_config
from mtp.data import corpus, make_dataset, prepare_data
from mtp.data.pipeline import DocumentPieces
from mtp.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID, train_tokenizer

VOCAB = 400
WORDS = "alpha beta gamma delta value index count total result buffer token batch path".split()
TRICKY = [
    "def f(x):\n\treturn x  \n\n\n    # trailing spaces   \n",
    "\n\nleading newlines and a final one\n",
    "  two leading spaces, no newline",
    "x = 'ünïcödé ✓ 日本語 🙂'\r\nwindows line\r\n",
    "\t\t\tdeep tabs\n        deep spaces\n\x0b\x0cform feed",
    "digits 1234567890 and 3.14159e-10\n",
]


def make_config(source: str | pathlib.Path, cache_dir: pathlib.Path, **overrides):
    cfg = base_config().data
    cfg.update(dict(source=str(source), glob="**/*.py", val_fraction=0.2, vocab_size=VOCAB,
                    cache_dir=str(cache_dir), tokenizer_max_chars=200_000, max_files=0))
    cfg.update(overrides)
    return cfg


def _code_file(index: int, rng: np.random.Generator, n_functions: int) -> str:
    """Python-like text: indentation, tabs, blank lines, unicode, digits; unique per file."""
    lines = [f'"""Module number {index}: ünïcode ✓ café."""', "", "import os", ""]
    for j in range(n_functions):
        a, b = rng.choice(WORDS, 2)
        lines += [
            f"def {a}_{b}_{index}_{j}({a}, {b}={int(rng.integers(100))}):",
            f'    """Return the {a} of {b}."""',
            f"    if {a} > {b}:",
            f"        return {a} * {int(rng.integers(10_000))}",
            "\telse:  # a tab",
            f"        return [{', '.join(rng.choice(WORDS, 3))}]",
            "",
        ]
    return "\n".join(lines) + "\n"


def write_corpus(root: pathlib.Path) -> list[str]:
    """Writes the tiny corpus; returns the relative paths of files that should be kept."""
    rng = np.random.default_rng(0)
    kept = []
    for index in range(40):
        relative = f"pkg{index % 3}/sub{index % 2}/mod_{index}.py" if index % 4 else f"m{index}.py"
        n_functions = 40 if index == 7 else int(rng.integers(2, 6))  # file 7 spans many rows
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(_code_file(index, rng, n_functions), encoding="utf-8")
        kept.append(relative)
    (root / "empty.py").write_text("")
    (root / "latin1.py").write_bytes("x = 'caf\xe9'\n".encode("latin-1"))
    (root / "notes.txt").write_text("not matched by **/*.py\n")
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "cached.py").write_text("x = 1\n")
    return sorted(kept)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    kept = write_corpus(root)
    cfg = make_config(root, tmp_path_factory.mktemp("cache"))
    return cfg, kept, prepare_data(cfg)


def documents(source) -> dict[str, str]:
    return {doc["path"].decode(): doc["text"].decode() for doc in source}


def unpack(batches: list[dict[str, np.ndarray]]) -> list[list[int]]:
    """Token stream of all rows (padding dropped), cut after each eos into documents."""
    stream = np.concatenate([b["tokens"][b["segment_ids"] > 0] for b in batches]).tolist()
    docs, current = [], []
    for token in stream:
        current.append(token)
        if token == EOS_ID:
            docs.append(current)
            current = []
    assert current == [], "stream must end with eos"
    return docs


# ----------------------------------------------------------------------------- corpus


def test_split_is_sha1_of_path_and_independent_of_other_files():
    paths = [f"dir{i % 7}/file_{i}.py" for i in range(2000)]
    for path in paths:
        bucket = int.from_bytes(hashlib.sha1(path.encode()).digest()[:8], "big") % 10_000
        assert corpus.split_of(path, 0.05) == ("validation" if bucket < 500 else "train")
    splits = corpus.assign_splits(paths, 0.05)
    assert 60 < len(splits["validation"]) < 140  # ~5% of 2000
    more = corpus.assign_splits([*paths, "new/file.py", "other.py"], 0.05)
    assert set(splits["validation"]) <= set(more["validation"])
    assert set(splits["train"]) <= set(more["train"])


def test_validation_never_empty_for_tiny_corpora():
    splits = corpus.assign_splits(["a.py", "b.py", "c.py"], 0.0001)
    assert len(splits["validation"]) == 1 and len(splits["train"]) == 2


def test_built_splits_follow_paths_and_skip_bad_files(tiny):
    cfg, kept, data = tiny
    train, validation = documents(data.sources["train"]), documents(data.sources["validation"])
    assert not set(train) & set(validation)
    assert sorted([*train, *validation]) == kept  # no empty / latin-1 / .txt / __pycache__ file
    assert all(corpus.split_of(p, cfg.val_fraction) == "train" for p in train)
    assert all(corpus.split_of(p, cfg.val_fraction) == "validation" for p in validation)
    assert data.skipped == {"empty": 1, "not_utf8": 1}
    root = pathlib.Path(cfg.source)
    assert all(text == (root / path).read_text(encoding="utf-8") for path, text in train.items())


def test_token_cache_and_stats_match_the_documents(tiny):
    _, _, data = tiny
    for split, source in data.sources.items():
        texts = [doc["text"].decode() for doc in source]
        encoded = [[*data.tokenizer.encode(t), EOS_ID] for t in texts]
        cached = data.tokens[split]
        assert len(cached) == len(texts)
        assert all(
            cached[i].dtype == np.int32 and cached[i].tolist() == encoded[i]
            for i in range(len(texts))
        )
        assert cached[-1].tolist() == encoded[-1]
        with pytest.raises(IndexError):
            cached[len(texts)]
        expected_tokens = sum(map(len, encoded))
        assert data.stats[split] == {
            "files": len(texts),
            "bytes": sum(len(t.encode()) for t in texts),
            "tokens": expected_tokens,
        }


def test_rebuild_reuses_cache_and_new_settings_rebuild(tiny, capsys):
    cfg, _, data = tiny
    records = sorted((data.cache_dir / "tfds").rglob("*.array_record*"))
    records += sorted((data.cache_dir / "tokens").rglob("*.npy"))
    assert len(records) == 6  # 2 ArrayRecord shards + tokens/offsets for 2 splits
    mtimes = [p.stat().st_mtime_ns for p in records]
    model_mtime = data.tokenizer.path.stat().st_mtime_ns
    capsys.readouterr()
    again = prepare_data(cfg)
    err = capsys.readouterr().err
    assert "corpus" in err and "tokenizer: reusing" in err and "building" not in err
    assert again.corpus_name == data.corpus_name and again.tokenizer.path == data.tokenizer.path
    assert [p.stat().st_mtime_ns for p in records] == mtimes
    assert data.tokenizer.path.stat().st_mtime_ns == model_mtime
    assert again.skipped == data.skipped  # restored from the cached dataset metadata

    other_split = corpus.list_files(make_config(cfg.source, cfg.cache_dir, val_fraction=0.3))
    assert other_split.name != data.corpus_name
    bigger_vocab = prepare_data(make_config(cfg.source, cfg.cache_dir, vocab_size=VOCAB + 50))
    assert bigger_vocab.corpus_name == data.corpus_name
    assert bigger_vocab.tokenizer.path != data.tokenizer.path
    assert bigger_vocab.tokenizer.vocab_size == VOCAB + 50


def test_glob_source_finds_the_same_files(tiny):
    cfg, kept, data = tiny
    by_glob = corpus.list_files(make_config(f"{cfg.source}/**/*.py", cfg.cache_dir))
    by_dir = corpus.list_files(cfg)
    assert by_glob.relative_paths == by_dir.relative_paths
    assert set(kept) < set(by_dir.relative_paths)  # + empty.py and latin1.py, skipped later
    assert (
        corpus.list_files(make_config(cfg.source, cfg.cache_dir, max_files=5)).relative_paths
        == (by_dir.relative_paths[:5])
    )


@pytest.mark.parametrize("kind", ["empty_dir", "missing_dir", "glob"])
def test_empty_corpus_raises_before_any_work(tmp_path, kind):
    source = {
        "empty_dir": tmp_path / "empty",
        "missing_dir": tmp_path / "missing",
        "glob": tmp_path / "empty" / "**" / "*.rs",
    }[kind]
    (tmp_path / "empty").mkdir()
    cache = tmp_path / "cache"
    with pytest.raises(ValueError) as error:
        prepare_data(make_config(source, cache))
    message = str(error.value)
    assert "data.source" in message and "data.glob" in message and "Fix" in message
    assert str(source) in message
    assert not cache.exists()


def test_config_errors_name_the_key(tmp_path):
    cfg = make_config(tmp_path, tmp_path, val_fraction=1.5)
    with pytest.raises(ValueError, match=r"data\.val_fraction=1\.5"):
        check_data_config(cfg)
    del cfg["max_files"]
    with pytest.raises(ValueError, match=r"data\.max_files"):
        check_data_config(cfg)


# -------------------------------------------------------------------------- tokenizer


def test_tokenizer_ids_and_exact_round_trip(tiny):
    _, _, data = tiny
    tokenizer = data.tokenizer
    assert (tokenizer.pad_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    assert (PAD_ID, BOS_ID, EOS_ID, UNK_ID) == (0, 1, 2, 3)
    assert tokenizer.vocab_size == VOCAB
    assert tokenizer.path.parent.parent == data.cache_dir / "tokenizers"
    for text in TRICKY:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        assert tokenizer.decode(np.asarray(ids, np.int32)) == text
        assert UNK_ID not in ids and all(0 <= i < VOCAB for i in ids)
    newline = tokenizer.encode("\n")
    assert len(newline) == 1 and newline[0] > UNK_ID  # its own piece, not a byte fallback
    assert tokenizer.decode([BOS_ID, *tokenizer.encode("a\nb"), EOS_ID, PAD_ID]) == "a\nb"


def test_tokenizer_training_is_deterministic(tiny, tmp_path):
    _, _, data = tiny
    texts = [doc["text"].decode() for doc in data.sources["train"]]
    first = train_tokenizer(texts, tmp_path / "a.model", VOCAB)
    second = train_tokenizer(texts, tmp_path / "b.model", VOCAB)
    assert first.path.read_bytes() == second.path.read_bytes()
    assert [first.encode(t) for t in TRICKY] == [second.encode(t) for t in TRICKY]


def test_tokenizer_round_trips_real_stdlib_files(tmp_path):
    cfg = make_config("stdlib", tmp_path, vocab_size=500, max_files=25, val_fraction=0.1)
    data = prepare_data(cfg)
    texts = [*documents(data.sources["train"]).values()]
    texts += documents(data.sources["validation"]).values()
    assert len(texts) + sum(data.skipped.values()) == 25
    assert sum(map(len, texts)) > 50_000
    for text in texts:
        assert data.tokenizer.decode(data.tokenizer.encode(text)) == text


# ---------------------------------------------------------------------------- pipeline


def test_packing_keeps_every_piece_of_every_document(tiny):
    cfg, _, data = tiny
    seq_len = 32
    source = data.sources["train"]
    batches = list(
        make_dataset(
            cfg,
            "train",
            data.tokenizer,
            seq_len=seq_len,
            batch_size=1,
            seed=0,
            num_epochs=1,
            source=source,
        )
    )
    expected = [[*data.tokenizer.encode(doc["text"].decode()), EOS_ID] for doc in source]
    assert max(map(len, expected)) > 4 * seq_len  # long documents are cut into pieces, not dropped
    pieces = {tuple(doc[i : i + seq_len]) for doc in expected for i in range(0, len(doc), seq_len)}
    for index, batch in enumerate(batches):
        tokens, segments = batch["tokens"][0], batch["segment_ids"][0]
        assert batch["tokens"].shape == batch["segment_ids"].shape == (1, seq_len)
        assert batch["tokens"].dtype == batch["segment_ids"].dtype == np.int32
        used = segments[segments > 0]
        assert segments[0] == 1 and np.all(np.diff(used) >= 0)
        assert set(np.unique(used)) == set(range(1, used.max() + 1))  # 1, 2, 3... no gaps
        if index < len(batches) - 1:
            assert np.all(segments > 0)  # only the final row of a finite pass is padded
        else:
            assert np.all(segments[len(used) :] == 0) and np.all(tokens[len(used) :] == PAD_ID)
        for segment in np.unique(used):  # every segment is (part of) one piece of one document
            run = tuple(tokens[segments == segment].tolist())
            assert any(run == p[: len(run)] or run == p[-len(run) :] for p in pieces), run
    stream = np.concatenate([b["tokens"][b["segment_ids"] > 0] for b in batches])
    # every token of every document arrives exactly once
    assert sorted(stream.tolist()) == sorted(t for doc in expected for t in doc)
    assert int(np.sum(stream == EOS_ID)) == len(expected)


def test_token_cache_path_gives_the_same_batches_as_text(tiny):
    cfg, _, data = tiny

    def first_batches(source):
        ds = make_dataset(
            cfg, "train", data.tokenizer, seq_len=40, batch_size=2, seed=9, source=source
        )
        return _first_batches(iter(ds), 30)

    from_cache = first_batches(None)
    assert _same(from_cache, first_batches(data.sources["train"]))
    assert _same(from_cache, first_batches(data.tokens["train"]))


def test_batches_have_fixed_shape(tiny):
    cfg, _, data = tiny
    it = iter(make_dataset(cfg, "train", data.tokenizer, seq_len=48, batch_size=3, seed=5))
    for _ in range(20):
        batch = next(it)
        assert set(batch) == {"tokens", "segment_ids"}
        for array in batch.values():
            assert array.shape == (3, 48) and array.dtype == np.int32
        assert np.all(batch["segment_ids"] >= 1)  # an endless stream is never padded


def _stream(batches) -> list[int]:
    return np.concatenate([b["tokens"][b["segment_ids"] > 0] for b in batches]).tolist()


def test_processes_read_disjoint_pieces_covering_the_split(tiny):
    cfg, _, data = tiny
    docs = [[*data.tokenizer.encode(doc["text"].decode()), EOS_ID] for doc in data.sources["train"]]
    pieces = DocumentPieces([np.asarray(d, np.int32) for d in docs], 64)
    total = 0
    for process_index in range(3):
        ds = make_dataset(
            cfg,
            "train",
            data.tokenizer,
            seq_len=64,
            batch_size=1,
            seed=0,
            num_epochs=1,
            process_index=process_index,
            process_count=3,
            source=data.sources["train"],
        )
        stream = _stream(list(ds))
        mine = [t for i in range(process_index, len(pieces), 3) for t in pieces[i].tolist()]
        assert sorted(stream) == sorted(mine)  # exactly this process's pieces (pieces i::3)
        assert 0.2 < len(stream) / sum(map(len, docs)) < 0.5
        total += len(stream)
    assert total == sum(map(len, docs))


def test_each_epoch_has_a_new_order_and_seeds_matter(tiny):
    cfg, _, data = tiny

    def stream(seed):
        ds = make_dataset(
            cfg,
            "validation",
            data.tokenizer,
            seq_len=64,
            batch_size=1,
            seed=seed,
            num_epochs=2,
            source=data.sources["validation"],
        )
        return _stream(list(ds))

    order = stream(0)
    n = len(order) // 2
    assert len(order) == 2 * n and n > 4 * 64
    assert sorted(order[:n]) == sorted(order[n:]) and order[:n] != order[n:]
    assert stream(0) == order
    assert stream(1) != order


def _first_batches(iterator, n):
    return [next(iterator) for _ in range(n)]


def _same(a, b):
    return all(
        np.array_equal(x["tokens"], y["tokens"])
        and np.array_equal(x["segment_ids"], y["segment_ids"])
        for x, y in zip(a, b, strict=True)
    )


def test_same_seed_same_batches_other_seed_different(tiny):
    cfg, _, data = tiny

    def batches(seed):
        return _first_batches(
            iter(make_dataset(cfg, "train", data.tokenizer, seq_len=32, batch_size=2, seed=seed)), 4
        )

    assert _same(batches(3), batches(3))
    assert not _same(batches(3), batches(4))


@pytest.mark.parametrize("steps", [0, 1, 6, 25])
def test_iterator_state_resumes_exactly_through_json(tiny, steps):
    cfg, _, data = tiny
    ds = make_dataset(cfg, "train", data.tokenizer, seq_len=32, batch_size=2, seed=1)
    iterator = iter(ds)
    _first_batches(iterator, steps)
    state = iterator.get_state()
    expected = _first_batches(iterator, 5)

    restored = iter(ds)
    _first_batches(restored, 3)  # move it elsewhere first
    restored.set_state(json.loads(json.dumps(state)))  # what Orbax does to the state
    assert _same(_first_batches(restored, 5), expected)
