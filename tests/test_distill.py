"""Self-distillation rows (distill.*, mtp/train/distill.py): corpus prefixes continued by the pretrained
model itself, written as a tokens: directory; reused, resumed, refused on another fingerprint, and
trained on by `mtp train` with distill.enabled."""

import json
import pathlib
import shutil

import numpy as np
import pytest
from flax import nnx
from helpers import tiny_config

from mtp.cli import main
from mtp.config import ConfigError, DecodeSettings, validate
from mtp.data.errors import DataError
from mtp.data.prepare import prepare_data
from mtp.data.shards import open_tokens, read_index
from mtp.decode.api import decode_config
from mtp.decode.generate import GenerateResult, generate
from mtp.model import MTPLM
from mtp.model.spec import ModelSpec
from mtp.train import distill as distill_mod
from mtp.train import loop as loop_mod
from mtp.train.distill import (
    distill_data_config,
    distill_dir,
    ensure_distilled,
    load_generator,
    row_document,
    select_prefixes,
)
from mtp.train.loop import train
from mtp.workdir import load_model, save_params

PREFIX, NEW = 8, 12


def _config(root: pathlib.Path, src: pathlib.Path, **distill):
    cfg = tiny_config(n_future=2, vocab_size=260, max_seq_len=32)
    d = cfg.data
    d.source, d.tokenizer, d.val_fraction, d.cache_dir = f"jsonl:{root}/corpus.jsonl", "bytes", 0.3, str(root / "cache")
    cfg.workdir = str(root / "heads")
    cfg.init.workdir = str(src)
    cfg.train.trainable = "new_heads"
    cfg.distill.update(dict(prefixes=8, val_prefixes=4, prefix_len=PREFIX, new_tokens=NEW, batch_size=4))
    cfg.distill.update(distill)
    return cfg


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A byte-level corpus, a random tiny 'pretrained' model (n_future=1) as init.workdir, and the rows
    generated once."""
    root = tmp_path_factory.mktemp("distill")
    rng = np.random.default_rng(0)
    words = ["alpha", "beta", "gamma", "delta", "def", "return", "x", "(", ")", ":"]
    with open(root / "corpus.jsonl", "w") as f:
        for i in range(40):
            text = "x" if i % 5 == 0 else " ".join(rng.choice(words, int(rng.integers(4, 12))))
            f.write(json.dumps({"text": text}) + "\n")  # every fifth document is shorter than a prefix
    src = root / "source"
    src.mkdir()
    src_cfg = tiny_config(n_future=1, vocab_size=260, max_seq_len=32)
    src_cfg.data.tokenizer = "bytes"
    (src / "config.json").write_text(json.dumps(src_cfg.to_dict()))
    (src / "tokenizer.bytes").touch()
    save_params(src, nnx.state(MTPLM(ModelSpec.from_config(src_cfg.model), rngs=nnx.Rngs(3)), nnx.Param))
    cfg = _config(root, src)
    index = ensure_distilled(cfg)
    return root, src, cfg, index


def _docs(directory, split):
    docs = open_tokens(directory, split)
    return [np.asarray(docs[i]).tolist() for i in range(len(docs))]


def test_rows_are_the_models_own_greedy_continuations(setup):
    root, src, cfg, index = setup
    out = distill_dir(cfg)
    assert out == pathlib.Path(cfg.workdir) / "distill"
    assert index["splits"]["train"]["documents"] == 8 and index["splits"]["validation"]["documents"] == 4
    loaded = load_model(src)
    dc = decode_config(loaded, mode="greedy", max_new_tokens=NEW, settings=DecodeSettings(backend="xla"))
    corpus = prepare_data(cfg.data)
    for split in ("train", "validation"):
        rows = _docs(out, split)
        originals = [np.asarray(corpus.tokens[split][i]).tolist() for i in range(len(corpus.tokens[split]))]
        assert all(len(row) > PREFIX for row in rows)
        for row in rows[:2] + rows[-1:]:  # the first and the last chunk
            prefix, continuation = row[:PREFIX], row[PREFIX:]
            # the prefix is a slice of a document of this split
            assert any(prefix == doc[j:j + PREFIX] for doc in originals for j in range(len(doc) - PREFIX)), split
            alone = generate(loaded.model, [prefix], dc).tokens[0]  # batch 1, independently
            assert continuation == alone, (split, prefix)
            assert len(continuation) == NEW or continuation[-1] == loaded.tokenizer.eos_id
    # deterministic given distill.seed; another seed draws other prefixes
    again = select_prefixes(corpus.tokens["train"], 8, PREFIX, 0, "train")
    assert [p.tolist() for p in again] == [r[:PREFIX] for r in _docs(out, "train")]
    other = select_prefixes(corpus.tokens["train"], 8, PREFIX, 1, "train")
    assert [p.tolist() for p in other] != [p.tolist() for p in again]


def test_rows_stop_at_eos(setup, tmp_path, monkeypatch):
    assert row_document([5, 6], [7, 2, 9, 2], eos_id=2).tolist() == [5, 6, 7, 2]
    assert row_document([5, 6], [7, 8], eos_id=2).tolist() == [5, 6, 7, 8]  # cut at new_tokens: no eos added
    # through the writer: a model that writes eos after its third token in every other row
    root, src, _, _ = setup
    eos = load_model(src).tokenizer.eos_id

    def fake(model, prompts, dc, **kw):
        assert dc.eos_id == eos and dc.max_new_tokens == NEW
        rows = [[40, 41, 42, eos] if i % 2 else [43] * NEW for i in range(len(prompts))]
        return GenerateResult(rows, 0, np.zeros(len(prompts)), np.zeros((len(prompts), 1)))

    monkeypatch.setattr(distill_mod, "generate", fake)
    ensure_distilled(_config(root, src, dir=str(tmp_path / "eos")))
    rows = _docs(tmp_path / "eos", "train")
    assert [r[PREFIX:] for r in rows] == [[43] * NEW, [40, 41, 42, eos]] * 4
    assert open_tokens(tmp_path / "eos", "train").lengths.tolist() == [PREFIX + NEW, PREFIX + 4] * 4


def test_reads_back_through_the_data_pipeline(setup):
    _, _, cfg, index = setup
    data_cfg = distill_data_config(cfg.data, distill_dir(cfg))
    assert data_cfg.source == f"tokens:{distill_dir(cfg)}" and cfg.data.source.startswith("jsonl:")
    data = prepare_data(data_cfg)
    for split in ("train", "validation"):
        docs = data.tokens[split]
        rows = _docs(distill_dir(cfg), split)
        assert len(docs) == len(rows) == index["splits"][split]["documents"]
        assert docs.lengths.tolist() == [len(r) for r in rows]
        assert all(PREFIX < n <= PREFIX + NEW for n in docs.lengths)
        assert data.stats[split]["tokens"] == sum(len(r) for r in rows)


def test_rerun_reuses_and_a_killed_run_resumes(setup, monkeypatch):
    root, src, cfg, index = setup
    out = distill_dir(cfg)
    before = {s: _docs(out, s) for s in ("train", "validation")}
    calls = []
    real = distill_mod.generate

    def counting(model, prompts, dc, **kw):
        calls.append(len(prompts))
        return real(model, prompts, dc, **kw)

    monkeypatch.setattr(distill_mod, "generate", counting)
    assert ensure_distilled(cfg) == index and calls == []  # finished: reused, nothing generated
    # a run killed after the first train chunk: the second chunk and the validation rows are missing
    copy = root / "killed"
    shutil.copytree(out, copy)
    (copy / "index.json").unlink()
    for name in ("parts/u00000-c0001.json", "parts/u00001-c0000.json", "train-u00000-c0001.arrayrecord",
                 "validation-u00001-c0000.arrayrecord"):
        (copy / name).unlink()
    resumed = ensure_distilled(_config(root, src, dir=str(copy)))
    assert calls == [4, 4]  # train chunk 1 and validation chunk 0 only
    assert resumed["splits"] == json.loads(json.dumps(index["splits"]))
    assert {s: _docs(copy, s) for s in ("train", "validation")} == before


def test_bad_settings_are_named(setup, tmp_path):
    root, src, cfg, _ = setup
    for key, value, match in (("prefixes", 0, "distill.prefixes"), ("val_prefixes", 0, "distill.val_prefixes"),
                              ("new_tokens", 0, "distill.new_tokens"), ("temperature", -1.0, "distill.temperature"),
                              ("batch_size", 0, "distill.batch_size")):
        bad = _config(root, src, **{key: value})
        with pytest.raises(ConfigError, match=match):
            validate(bad, 1)
    bad = _config(root, src, enabled=True)
    bad.init.workdir = ""
    bad.train.trainable = "heads"
    with pytest.raises(ConfigError, match="distill.enabled=True is invalid.*init.workdir"):
        validate(bad, 1)
    with pytest.raises(ConfigError, match="init.workdir"):
        load_generator(bad)
    too_long = _config(root, src, new_tokens=30, dir=str(tmp_path / "a"))
    validate(too_long, 1)  # the generating model's max_seq_len is checked where it is loaded
    with pytest.raises(ConfigError, match="distill.new_tokens=30 is invalid.*max_seq_len=32"):
        ensure_distilled(too_long)
    with pytest.raises(DataError, match="distill.prefix_len=500: no document of the 'validation' split"):
        select_prefixes(prepare_data(cfg.data).tokens["validation"], 4, 500, 0, "validation")
    assert not (tmp_path / "a").exists()


def test_another_fingerprint_is_refused_and_kept(setup, tmp_path):
    root, src, cfg, index = setup
    out = distill_dir(cfg)
    files = sorted(p.name for p in out.iterdir())
    with pytest.raises(DataError, match=r"different distill.*Fix: set distill.dir to a new directory"):
        ensure_distilled(_config(root, src, new_tokens=NEW - 1))
    # the same settings with another model (other parameters) are refused too
    other = tmp_path / "other_model"
    shutil.copytree(src, other)
    shutil.rmtree(other / "checkpoints")
    spec = ModelSpec.from_config(load_model(src).cfg.model)
    save_params(other, nnx.state(MTPLM(spec, rngs=nnx.Rngs(4)), nnx.Param))
    moved = _config(root, other)
    with pytest.raises(DataError, match="different model"):
        ensure_distilled(moved)
    assert sorted(p.name for p in out.iterdir()) == files and read_index(out)["splits"] == index["splits"]
    # a directory that is not a distill directory is not written into
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(DataError, match="not a token-shard directory.*distill.dir"):
        ensure_distilled(_config(root, src, dir=str(tmp_path / "mine")))
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["notes.txt"]


def test_sampled_rows_follow_the_seed(setup, tmp_path):
    root, src, cfg, _ = setup
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        ensure_distilled(_config(root, src, temperature=1.5, seed=seed, dir=str(tmp_path / name)))
        runs[name] = _docs(tmp_path / name, "train")
    assert runs["a"] == runs["b"]
    greedy = _docs(distill_dir(cfg), "train")
    assert [r[:PREFIX] for r in runs["a"]] == [r[:PREFIX] for r in greedy]  # the same prefixes ...
    assert any(a[PREFIX:] != g[PREFIX:] for a, g in zip(runs["a"], greedy))  # ... continued by sampling
    assert runs["c"] != runs["a"]


def test_cli_and_train_use_the_rows(setup, tmp_path, capsys, monkeypatch):
    root, src, cfg, index = setup
    shared = tmp_path / "shared"
    overrides = [f"--config.{k}={v!r}" if isinstance(v, str) else f"--config.{k}={v}" for k, v in (
        ("model.vocab_size", 260), ("data.vocab_size", 260), ("model.d_model", 32), ("model.n_heads", 4),
        ("model.n_kv_heads", 2), ("model.n_layers", 2), ("model.n_future", 2), ("model.max_seq_len", 32),
        ("data.source", cfg.data.source), ("data.tokenizer", "bytes"), ("data.val_fraction", 0.3),
        ("data.cache_dir", cfg.data.cache_dir), ("init.workdir", str(src)), ("train.trainable", "new_heads"),
        ("train.seq_len", 16), ("distill.prefixes", 8), ("distill.val_prefixes", 4), ("distill.prefix_len", PREFIX),
        ("distill.new_tokens", NEW), ("distill.batch_size", 4), ("distill.dir", str(shared)))]
    assert main(["distill", "--config", "tiny", "--workdir", str(tmp_path / "w"), *overrides]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["dir"] == str(shared) and printed["train"]["documents"] == 8
    assert _docs(shared, "train") == _docs(distill_dir(cfg), "train")  # the same rows as the library call
    # mtp train with distill.enabled: generated on first use into WORKDIR/distill, then trained on
    run = _config(root, src, enabled=True)
    run.workdir = str(tmp_path / "run")
    run.train.steps, run.train.checkpoint_every, run.train.eval_batches = 2, 2, 1
    sources = []
    real = loop_mod.prepare_data
    monkeypatch.setattr(loop_mod, "prepare_data", lambda data_cfg: sources.append(data_cfg.source) or real(data_cfg))
    result = train(run)
    assert sources == [cfg.data.source, f"tokens:{tmp_path / 'run' / 'distill'}"]  # the batches are the rows
    assert (tmp_path / "run" / "distill" / "index.json").exists()
    assert _docs(tmp_path / "run" / "distill", "validation") == _docs(distill_dir(cfg), "validation")
    assert result.step == 2 and len(result.evaluation["loss"]) == 2
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"]["source"] == cfg.data.source


def test_multi_process_runs_only_reuse(setup, tmp_path, monkeypatch):
    root, src, cfg, index = setup
    loaded, data = load_generator(cfg), prepare_data(cfg.data)
    monkeypatch.setattr(distill_mod.jax, "process_count", lambda: 2)
    assert ensure_distilled(cfg, loaded=loaded, data=data)["splits"] == index["splits"]  # finished: read
    with pytest.raises(DataError, match="run `mtp distill` with this config on one process first"):
        ensure_distilled(_config(root, src, dir=str(tmp_path / "none")), loaded=loaded, data=data)
    with pytest.raises(DataError, match=r"another model, settings or corpus \(distill\)"):
        ensure_distilled(_config(root, src, seed=5), loaded=loaded, data=data)
    assert not (tmp_path / "none").exists()
