"""Bring-your-own corpora: every source kind, mixtures (proportions, exact resume), token shards
(`mtp data tokenize`, resume after a kill, per-process shares), and the errors bad input gets. Tiny
files and the byte tokenizer throughout, so nothing here trains a tokenizer or a model."""

from __future__ import annotations

import gzip
import json
import pathlib
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import tensorflow_datasets as tfds
import zstandard
from array_record.python.array_record_module import ArrayRecordWriter

from mtp import cli
from mtp.config import ConfigError, base_config, check_data_config
from mtp.data.errors import DataError
from mtp.data.pipeline import make_dataset
from mtp.data.prepare import prepare_data, tokenize_corpus
from mtp.data.shards import open_tokens, read_index
from mtp.train.loop import SourceTokensHook, StepInfo
from mtp.train.metrics import MetricWriter

N_DOCS = 120  # per input file


def _text(tag: str, i: int) -> str:
    return f"{tag} document {i}: " + "word " * (i % 7 + 1)


class TinyText(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A TFDS dataset with its own validation split, prepared locally (read back by name from data_dir)."""

    VERSION = tfds.core.Version("1.0.0")
    code_path = None

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text()}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(60, "t"), "validation": self._generate_examples(12, "v")}

    def _generate_examples(self, n, tag):
        for i in range(n):
            yield f"{tag}{i}", {"text": _text(tag, i)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> pathlib.Path:
    root = tmp_path_factory.mktemp("byo")
    (root / "jsonl").mkdir()
    for f in range(2):
        (root / "jsonl" / f"part{f}.jsonl").write_text(
            "".join(json.dumps({"text": _text(f"j{f}", i), "id": i}) + "\n" for i in range(N_DOCS)))
    lines = "".join(json.dumps({"text": _text("g", i)}) + "\n" for i in range(N_DOCS)).encode()
    (root / "gz").mkdir()
    (root / "gz" / "a.jsonl.gz").write_bytes(gzip.compress(lines))
    (root / "zst").mkdir()
    (root / "zst" / "a.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    (root / "pq").mkdir()
    pq.write_table(pa.table({"content": [_text("p", i) for i in range(N_DOCS)]}), root / "pq" / "a.parquet",
                   row_group_size=50)
    (root / "ar").mkdir()
    writer = ArrayRecordWriter(str(root / "ar" / "text.arrayrecord"), "group_size:1")
    for i in range(N_DOCS):
        writer.write(_text("a", i).encode())
    writer.close()
    (root / "art").mkdir()
    writer = ArrayRecordWriter(str(root / "art" / "ids.arrayrecord"), "group_size:1")
    for i in range(N_DOCS):
        writer.write(np.arange(5, 5 + i % 9 + 3, dtype=np.int32).tobytes())
    writer.close()
    TinyText(data_dir=str(root / "tfds")).download_and_prepare(
        file_format="array_record",
        download_config=tfds.download.DownloadConfig(compute_stats=tfds.download.ComputeStatsMode.SKIP))
    return root


def _data(corpus: pathlib.Path, source: str = "", **overrides):
    d = base_config().data
    d.source, d.tokenizer, d.vocab_size, d.cache_dir, d.val_fraction = source, "bytes", 260, str(corpus / "cache"), 0.1
    for key, value in overrides.items():
        d[key] = value
    return d


def _tokens(data, split: str) -> list[np.ndarray]:
    documents = data.tokens[split]
    return [documents[i] for i in range(len(documents))]


@pytest.mark.parametrize("source, overrides, docs, tag", [
    ("jsonl:{root}/jsonl/*.jsonl", {}, 2 * N_DOCS, "j0 document"),
    ("jsonl:{root}/gz/*.jsonl.gz", {}, N_DOCS, "g document"),
    ("jsonl:{root}/zst/*.zst", {}, N_DOCS, "g document"),
    ("parquet:{root}/pq/*.parquet", {"text_field": "content"}, N_DOCS, "p document"),
    ("arrayrecord:{root}/ar/*", {}, N_DOCS, "a document"),
    ("arrayrecord:{root}/art/*", {"record_format": "tokens"}, N_DOCS, None),
    ("tfds:tiny_text", {"tfds_data_dir": "{root}/tfds"}, 72, "t document"),
])
def test_every_source_kind(corpus, source, overrides, docs, tag):
    overrides = {k: v.format(root=corpus) if isinstance(v, str) else v for k, v in overrides.items()}
    data = prepare_data(_data(corpus, source.format(root=corpus), **overrides))
    train, validation = _tokens(data, "train"), _tokens(data, "validation")
    assert len(train) + len(validation) == docs and train and validation
    assert all(doc[-1] == data.tokenizer.eos_id for doc in train)
    if tag is None:  # pre-tokenized: the ids pass through, eos appended
        assert list(train[0][:3]) == [5, 6, 7]
    else:
        assert any(data.tokenizer.decode(doc).startswith(tag) for doc in train)
    if source.startswith("tfds"):  # the dataset's own validation split, not a hash fraction
        assert len(validation) == 12
        assert all(data.tokenizer.decode(doc).startswith("v document") for doc in validation)
    batch = next(iter(make_dataset(data_cfg=None, split="train", tokenizer=data.tokenizer, seq_len=32, batch_size=2,
                                   seed=0, source=data.tokens["train"])))
    assert batch["tokens"].shape == (2, 32)


def _mixture(corpus):
    return _data(corpus, mixture=((f"jsonl:{corpus}/jsonl/part0.jsonl", 3.0), (f"parquet:{corpus}/pq/*", 1.0)),
                 text_field="text")


def test_mixture_proportions_and_exact_resume(corpus):
    d = _mixture(corpus)
    d.text_field = "text"
    with pytest.raises(DataError, match="no column 'text'"):  # one field for both: the parquet lacks it
        prepare_data(d)
    (corpus / "pq2").mkdir(exist_ok=True)
    pq.write_table(pa.table({"text": [_text("p", i) for i in range(N_DOCS)]}), corpus / "pq2" / "a.parquet")
    d.mixture = ((f"jsonl:{corpus}/jsonl/part0.jsonl", 3.0), (f"parquet:{corpus}/pq2/*", 1.0))
    data = prepare_data(d)
    make = lambda: iter(make_dataset(d, "train", data.tokenizer, seq_len=64, batch_size=32, seed=3,  # noqa: E731
                                     source=data.tokens["train"]))
    it, counts = make(), np.zeros(2)
    for _ in range(60):  # ~4,000 documents (pieces), each its own segment
        batch = next(it)
        starts = np.diff(batch["segment_ids"], axis=1, prepend=0) != 0
        starts &= batch["segment_ids"] > 0
        counts += np.bincount(batch["source_ids"][starts], minlength=2)
    share, n = counts[0] / counts.sum(), counts.sum()
    assert n > 3000 and abs(share - 0.75) < 4 * np.sqrt(0.75 * 0.25 / n), (share, n)

    it = make()
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # what the checkpoint stores
    expected = [next(it) for _ in range(5)]
    resumed = make()
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        assert all(np.array_equal(got[k], want[k]) for k in want)


def test_source_tokens_metric(tmp_path):
    writer = MetricWriter(tmp_path, tensorboard=False)
    hook = SourceTokensHook(("a", "b"), writer)
    batch = {"segment_ids": np.array([[1, 1, 2, 0]]), "source_ids": np.array([[0, 0, 1, 0]])}
    info = StepInfo(step=1, state={}, metrics={}, batch=batch, last=True)
    hook.every_step(info)
    hook.log(info)
    writer.close()
    line = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert line["data/tokens/a"] == 2 and line["data/tokens/b"] == 1


@pytest.fixture(scope="module")
def token_dir(corpus) -> pathlib.Path:
    out = corpus / "tokens"
    overrides = ["--config.data.tokenizer=bytes", "--config.data.vocab_size=260", "--config.model.vocab_size=260",
                 f"--config.data.source=jsonl:{corpus}/jsonl/*.jsonl", f"--config.data.cache_dir={corpus}/cache",
                 "--config.data.val_fraction=0.1"]
    assert cli.main(["data", "tokenize", "--config", "tiny", "--out", str(out), "--shard-mb", "0.002",
                     *overrides]) == 0
    return out


def test_tokenize_resumes_and_trains_from_tokens(corpus, token_dir):
    index = read_index(token_dir)
    assert len(index["splits"]["train"]["shards"]) >= 4 and index["tokenizer"]["fingerprint"] == "bytes-v260"
    assert index["splits"]["train"]["documents"] + index["splits"]["validation"]["documents"] == 2 * N_DOCS
    # a kill after the first chunks: the rest (and the index) are gone; a rerun writes the same files
    resumed = corpus / "tokens_resumed"
    shutil.copytree(token_dir, resumed)
    (resumed / "index.json").unlink()
    for marker in sorted((resumed / "parts").glob("u00001*")):
        marker.unlink()
    for name in ("u00000-c0001", "u00000-c0002"):
        (resumed / "parts" / f"{name}.json").unlink(missing_ok=True)
    (resumed / "parts" / "u00000.done").unlink()
    d = _data(corpus, f"jsonl:{corpus}/jsonl/*.jsonl")
    again = tokenize_corpus(d, resumed, shard_bytes=int(0.002 * 2**20))
    assert again["splits"] == index["splits"]
    for shard in index["splits"]["train"]["shards"]:
        assert (resumed / shard["file"]).read_bytes() == (token_dir / shard["file"]).read_bytes()

    data = prepare_data(_data(corpus, f"tokens:{token_dir}"))
    assert data.stats["train"]["tokens"] == index["splits"]["train"]["tokens"]
    direct = prepare_data(d)  # the same source read directly: the same documents
    assert sorted(map(bytes, _tokens(data, "train"))) == sorted(map(bytes, _tokens(direct, "train")))


def test_processes_read_disjoint_covering_shares(corpus, token_dir):
    documents = open_tokens(token_dir, "train")
    shares = [documents.share(i, 2) for i in range(2)]
    assert not set(shares[0].files) & set(shares[1].files)
    assert set(shares[0].files) | set(shares[1].files) == set(documents.files)
    everything = sorted(bytes(documents[i]) for i in range(len(documents)))
    assert sorted(bytes(s[i]) for s in shares for i in range(len(s))) == everything
    d = _data(corpus, f"tokens:{token_dir}")
    batches = [next(iter(make_dataset(d, "train", prepare_data(d).tokenizer, seq_len=16, batch_size=2, seed=0,
                                      process_index=i, process_count=2, shard_by="documents", source=documents)))
               for i in range(2)]
    assert not np.array_equal(batches[0]["tokens"], batches[1]["tokens"])
    with pytest.raises(DataError, match="shard file"):
        make_dataset(d, "train", prepare_data(d).tokenizer, seq_len=16, batch_size=2, seed=0,
                     process_index=0, process_count=len(documents.files) + 1, source=documents)


def _bad_jsonl(corpus, name: str, bad_line: str) -> str:
    folder = corpus / name
    folder.mkdir(exist_ok=True)
    lines = [json.dumps({"text": _text("b", i)}) for i in range(40)]
    lines[6] = bad_line
    (folder / "x.jsonl").write_text("\n".join(lines) + "\n")
    return f"jsonl:{folder}/*.jsonl"


def test_bad_inputs_fail_before_any_step(corpus, token_dir):
    with pytest.raises(DataError, match="matches no files"):
        prepare_data(_data(corpus, f"jsonl:{corpus}/nothing/*.jsonl"))
    source = _bad_jsonl(corpus, "badjson", '{"text": "unterminated')
    with pytest.raises(DataError, match=r"x\.jsonl:7: not valid JSON.*bad_records='skip'"):
        prepare_data(_data(corpus, source))
    skipped = prepare_data(_data(corpus, source, bad_records="skip"))
    assert skipped.skipped["bad_records"] == 1
    assert len(skipped.tokens["train"]) + len(skipped.tokens["validation"]) == 39
    with pytest.raises(DataError, match=r"x\.jsonl:7: no string field 'text'.*data\.text_field"):
        prepare_data(_data(corpus, _bad_jsonl(corpus, "nofield", '{"body": "x"}')))
    with pytest.raises(DataError, match=r"a\.parquet has no column 'text'"):
        prepare_data(_data(corpus, f"parquet:{corpus}/pq/*.parquet"))
    other = corpus / "tokens_other"  # shards of another tokenizer
    shutil.copytree(token_dir, other)
    index = json.loads((other / "index.json").read_text())
    index["tokenizer"].update(kind="sentencepiece", fingerprint="0123456789abcdef", vocab_size=4096)
    (other / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match="another tokenizer"):
        prepare_data(_data(corpus, f"tokens:{other}"))
    with pytest.raises(DataError, match="does not exist"):
        prepare_data(_data(corpus, f"tokens:{corpus}/no_such_dir"))
    with pytest.raises(DataError, match="no prepared TFDS dataset"):
        prepare_data(_data(corpus, "tfds:not_there", tfds_data_dir=str(corpus / "tfds")))


def test_config_checks():
    d = base_config().data
    d.mixture = (("stdlib", 1.0),)
    with pytest.raises(ConfigError, match="not both"):
        check_data_config(d)
    d.source = ""
    check_data_config(d)
    d.mixture = (("stdlib", 0.0),)
    with pytest.raises(ConfigError, match="positive weight"):
        check_data_config(d)
    d.mixture, d.source, d.bad_records = (), "stdlib", "ignore"
    with pytest.raises(ConfigError, match="data.bad_records"):
        check_data_config(d)
