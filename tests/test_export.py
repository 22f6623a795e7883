"""mtp export: tiny MTP workdirs out as Hugging Face Llama directories (+ heads sidecar) and GGUF files,
checked in transformers, read back with gguf, and round-tripped through mtp convert (bitwise)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import VOCAB, tiny_bpe, tiny_config
from safetensors.numpy import load_file

from mtp.cli import main
from mtp.convert import convert_gguf, convert_hf
from mtp.convert import export as export_module
from mtp.convert.export import ENGINE_CONFIG, MEDUSA_TENSORS, export_hf, read_model
from mtp.convert.gguf_export import export_gguf, heads_path
from mtp.convert.layout import SIDECAR_CONFIG, SIDECAR_TENSORS, place
from mtp.convert.llama_map import ExportError, permute_rope_rows
from mtp.data.hf_tokenizer import write_tokenizer
from mtp.data.tokenizer import train_tokenizer
from mtp.model import MTPLM
from mtp.model.spec import ModelSpec
from mtp.workdir import load_model, restore_flat, save_params

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TOL = 1e-4
TOKENS = np.random.default_rng(0).integers(0, VOCAB, (2, 12))


def make_workdir(d: Path, tok, seed: int, zero_head1: bool = False, **model) -> Path:
    """A workdir holding a random tiny MTP model (norm scales and LoRA B factors random too, so a
    dropped norm or an unmerged adapter shows; ``zero_head1``: head 1 left at 0, the identity) and the
    tiny BPE tokenizer."""
    cfg = tiny_config(vocab_size=VOCAB, **model)
    cfg.name, cfg.workdir = d.name, str(d)
    spec = ModelSpec.from_config(cfg.model)
    _, params = nnx.split(MTPLM(spec, rngs=nnx.Rngs(seed)), nnx.Param)
    rng = np.random.default_rng(seed)

    def jitter(x):
        x = np.asarray(x)
        return jnp.asarray(x * rng.uniform(0.5, 1.5, x.shape) + (x == 0) * rng.normal(0, 0.05, x.shape), x.dtype)

    d.mkdir(parents=True)
    params = jax.tree.map(jitter, params)
    if zero_head1:
        params = jax.tree_util.tree_map_with_path(
            lambda path, x: x.at[0].set(0) if "'heads'" in jax.tree_util.keystr(path) else x, params)
    save_params(d, params, step=7)
    (d / "config.json").write_text(json.dumps(cfg.to_dict()))
    write_tokenizer(d, tok, {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0})
    return d


def params_of(workdir) -> dict[str, np.ndarray]:
    flat, _ = restore_flat(workdir)
    return {k: np.asarray(v) for k, v in flat.items() if k.startswith("['params']")}


def all_head_logits(workdir) -> np.ndarray:
    return np.asarray(load_model(workdir).model(jnp.asarray(TOKENS, jnp.int32)))


@pytest.fixture(scope="module")
def tok():
    return tiny_bpe()


@pytest.fixture(scope="module")
def lora_wd(tmp_path_factory, tok):
    """Tied embeddings, GQA (4 query / 2 kv heads), 3 transformer heads, LoRA rank 2 (merged on export)."""
    return make_workdir(tmp_path_factory.mktemp("lora") / "wd", tok, 0, lora_rank=2)


@pytest.fixture(scope="module")
def causal_wd(tmp_path_factory, tok):
    """Untied embeddings, 2 sequential ('causal') heads: head 2's combine projection and norms go to the
    sidecar."""
    return make_workdir(tmp_path_factory.mktemp("causal") / "wd", tok, 1, tie_embeddings=False,
                        head_type="causal", n_future=2)


def transformers_logits(out: Path) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits.numpy()


@pytest.mark.parametrize("case", ["lora", "causal"])
def test_hf_export_loads_in_transformers_with_our_logits_and_tokenizer(tmp_path, request, case):
    from transformers import AutoTokenizer

    wd = request.getfixturevalue(f"{case}_wd")
    out = export_hf(wd, tmp_path / "hf")
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            SIDECAR_CONFIG, SIDECAR_TENSORS} <= {p.name for p in out.iterdir()}
    ours = all_head_logits(wd)[0]  # head 1
    theirs = transformers_logits(out)
    assert ours.std() > 0.5
    diff = np.abs(ours - theirs).max()
    print(f"{case}: max abs logit diff vs transformers {diff:.2e}")
    assert diff <= TOL, diff
    side = json.loads((out / SIDECAR_CONFIG).read_text())
    spec = load_model(wd).spec
    assert side["llama_layers"] == spec.trunk_layers + 1 == json.loads((out / "config.json").read_text())[
        "num_hidden_layers"]
    if case == "lora":  # every LoRA factor listed as derived, and the tied head
        assert sum("_lora_" in k for k in side["derived"]) == 2 * 7 * 2 and "lm_head.weight" in side["derived"]
        assert side["model"]["lora_rank"] == 0
    else:
        assert "mtp.head.2.combine.weight" in side["tensors"] and side["tensors"]["mtp.head.2.combine.weight"][
            "shape"] == [32, 64]
    hf_tok = AutoTokenizer.from_pretrained(str(out))
    text = "def add(a, b):\n    return a + b  # 42"
    assert hf_tok.encode(text, add_special_tokens=False) == load_model(wd).tokenizer.encode(text)
    assert (hf_tok.bos_token_id, hf_tok.eos_token_id, hf_tok.pad_token_id) == (1, 2, 0)


def test_hf_round_trip_is_bitwise(tmp_path, causal_wd):
    """export -> mtp convert --hf restores every parameter bit for bit (heads from the sidecar), so
    every head's logits (and so any decoding) are the same."""
    out = export_hf(causal_wd, tmp_path / "hf")
    back = convert_hf(out, tmp_path / "wd2")
    a, b = params_of(causal_wd), params_of(back)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and np.array_equal(a[key], b[key]), key
    assert load_model(back).spec == load_model(causal_wd).spec
    np.testing.assert_array_equal(all_head_logits(back), all_head_logits(causal_wd))


def test_gguf_export_reads_back_and_round_trips(tmp_path, causal_wd, lora_wd):
    out = export_gguf(causal_wd, tmp_path / "m.gguf")
    main_file, heads_file = gguf.GGUFReader(str(out)), gguf.GGUFReader(str(heads_path(out)))
    names = {t.name for t in main_file.tensors}
    assert "output.weight" in names and "blk.2.attn_q.weight" in names and len(names) == 3 + 3 * 9
    assert not any(n.startswith("mtp.") for n in names)  # llama.cpp refuses tensors it does not create
    assert {t.name for t in heads_file.tensors} >= {"mtp.head.2.attn_q.weight", "mtp.head.2.combine.weight"}
    md = main_file.fields["tokenizer.ggml.tokens"]
    assert len(md.data) == VOCAB
    p = params_of(causal_wd)
    head1_q = p["['params']['heads']['attn']['wq'].value"][0].reshape(32, -1).T
    q = next(t for t in main_file.tensors if t.name == "blk.2.attn_q.weight")
    np.testing.assert_array_equal(np.asarray(q.data), permute_rope_rows(head1_q, 4))
    back = params_of(convert_gguf(out, tmp_path / "wd2"))
    assert sorted(back) == sorted(p) and all(np.array_equal(back[k], p[k]) for k in p)
    # q8_0: matrices quantized, norms f32; the model reads back close to the original
    q8 = export_gguf(lora_wd, tmp_path / "q8.gguf", qtype="q8_0")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(q8)).tensors}
    assert types["blk.0.ffn_up.weight"] == "Q8_0" and types["blk.0.attn_norm.weight"] == "F32"
    merged = read_model(lora_wd).flat
    approx = params_of(convert_gguf(q8, tmp_path / "wd3"))
    key = "['params']['trunk']['mlp']['w_up'].value"
    assert 0 < np.abs(approx[key] - merged[key]).max() < 0.02


def test_sentencepiece_and_byte_tokenizers_load_in_transformers(tmp_path, causal_wd):
    from transformers import AutoTokenizer

    from mtp.data.byte_tokenizer import ByteTokenizer
    from mtp.data.tokenizer import Tokenizer

    text = "def add(a, b):\n    return a + b\n" * 40 + "x = [1, 2, 3]  # ok\n" * 20
    sp = train_tokenizer([text], tmp_path / "sp.model", 290)
    for kind, ours in (("sentencepiece", sp), ("bytes", ByteTokenizer())):
        wd = tmp_path / kind
        shutil.copytree(causal_wd, wd)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (wd / name).unlink()
        if kind == "bytes":
            (wd / "tokenizer.bytes").touch()
        else:
            shutil.copy(sp.path, wd / "tokenizer.model")
        out = export_hf(wd, tmp_path / f"hf_{kind}")
        hf_tok = AutoTokenizer.from_pretrained(str(out))
        for s in ("def add(a, b):\n    return a + b", "  x = [1, 2]\tnaïve ☃"):
            assert hf_tok.encode(s, add_special_tokens=False) == ours.encode(s), (kind, s)
            assert hf_tok.decode(ours.encode(s)) == ours.decode(ours.encode(s))
        back = convert_hf(out, tmp_path / f"wd_{kind}")
        assert isinstance(load_model(back).tokenizer, Tokenizer if kind == "sentencepiece" else ByteTokenizer)


def test_export_that_misses_a_tensor_fails_naming_it(tmp_path, causal_wd, lora_wd, monkeypatch):
    def lossy(spec, shapes):
        placements, unplaced = place(spec, shapes)
        return [p for p in placements if "['trunk']['mlp']['w_up']" not in p.key], unplaced

    with pytest.raises(ExportError, match=r"parameter \['params'\]\['trunk'\]\['mlp'\]\['w_up'\]\.value slot"):
        read_model(causal_wd, place_fn=lossy)

    def unknown(spec, shapes):
        return place(spec, shapes | {"['params']['heads']['attn']['q_norm'].value": (2, 8)})

    with pytest.raises(ExportError, match=r"no place in the export for parameter\(s\) \['params'\]\['heads'\]"
                                          r"\['attn'\]\['q_norm'\]\.value"):
        read_model(causal_wd, place_fn=unknown)
    real = export_module.restore_flat
    monkeypatch.setattr(export_module, "restore_flat", lambda w, s=None: (
        real(w, s)[0] | {"['params']['unembed'].value": np.zeros((32, VOCAB))}, 7))
    with pytest.raises(SystemExit) as e:  # the CLI: exit 2 and the message, nothing written
        main(["export", "--workdir", str(lora_wd), "--format", "hf", "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and "['params']['unembed'].value" in str(e.value)
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.export-*"))


LAYER_SUFFIXES = {"input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
                  "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight",
                  "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight"}


def test_heads_format_deepseek_mtp_and_medusa_layouts(tmp_path, causal_wd, lora_wd, tok):
    """--heads-format: the documented engine layouts, names, shapes and values (copies included)."""
    # deepseek_mtp: causal head 2 -> model.layers.3 (2 trunk layers + head 1) in model.safetensors
    out = export_hf(causal_wd, tmp_path / "ds", heads_format="deepseek_mtp")
    assert not (out / SIDECAR_TENSORS).exists() and not (out / SIDECAR_CONFIG).exists()
    t, p, D = load_file(str(out / "model.safetensors")), params_of(causal_wd), 32
    mtp_names = {n for n in t if n.startswith("model.layers.3.")}
    assert mtp_names == {f"model.layers.3.{s}" for s in LAYER_SUFFIXES | {
        "enorm.weight", "hnorm.weight", "eh_proj.weight", "embed_tokens.weight", "shared_head.norm.weight",
        "shared_head.head.weight"}}
    assert len(t) == len(mtp_names) + 3 + 3 * 9 and not any(n.startswith("model.layers.4.") for n in t)
    w = p["['params']['causal_proj'].value"][0]  # [2D, D]: rows :D multiply hnorm(h), D: enorm(embed)
    ds = lambda s: t[f"model.layers.3.{s}"]  # noqa: E731
    assert ds("eh_proj.weight").shape == (D, 2 * D)
    np.testing.assert_array_equal(ds("eh_proj.weight")[:, :D], w[D:].T)  # embedding half first
    np.testing.assert_array_equal(ds("eh_proj.weight")[:, D:], w[:D].T)
    np.testing.assert_array_equal(ds("enorm.weight"), p["['params']['causal_e_norm'].value"][0])
    np.testing.assert_array_equal(ds("hnorm.weight"), p["['params']['causal_h_norm'].value"][0])
    np.testing.assert_array_equal(ds("self_attn.v_proj.weight"),
                                  p["['params']['heads']['attn']['wv'].value"][1].reshape(D, -1).T)
    np.testing.assert_array_equal(ds("mlp.down_proj.weight"), p["['params']['heads']['mlp']['w_down'].value"][1].T)
    np.testing.assert_array_equal(ds("shared_head.head.weight"), p["['params']['unembed'].value"].T)
    np.testing.assert_array_equal(ds("shared_head.norm.weight"), t["model.norm.weight"])
    np.testing.assert_array_equal(ds("embed_tokens.weight"), t["model.embed_tokens.weight"])
    assert json.loads((out / "config.json").read_text())["num_nextn_predict_layers"] == 1
    side = json.loads((out / ENGINE_CONFIG).read_text())
    assert side["heads_format"] == "deepseek_mtp" and set(side["tensors"]) == mtp_names
    assert "swapped" in side["tensors"]["model.layers.3.eh_proj.weight"]["param"]
    assert "model.layers.3.shared_head.head.weight" in side["derived"]

    # medusa: heads 2, 3 -> Medusa heads 0, 1: ResBlock linear (torch [out, in]) + a copy of the (tied) lm_head
    wd = make_workdir(tmp_path / "medusa_wd", tok, 2, zero_head1=True, head_type="medusa")
    out = export_hf(wd, tmp_path / "medusa", heads_format="medusa")
    m, p, llama = load_file(str(out / MEDUSA_TENSORS)), params_of(wd), load_file(str(out / "model.safetensors"))
    assert {n: m[n].shape for n in m} == {n: s for i in (0, 1) for n, s in (
        (f"{i}.0.linear.weight", (D, D)), (f"{i}.0.linear.bias", (D,)), (f"{i}.1.weight", (VOCAB, D)))}
    for i in (0, 1):
        np.testing.assert_array_equal(m[f"{i}.0.linear.weight"], p["['params']['heads']['w'].value"][i + 1].T)
        np.testing.assert_array_equal(m[f"{i}.0.linear.bias"], p["['params']['heads']['b'].value"][i + 1])
        np.testing.assert_array_equal(m[f"{i}.1.weight"], llama["model.embed_tokens.weight"])
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["medusa_num_heads"], cfg["medusa_num_layers"], cfg["base_model_name_or_path"]) == (2, 1, str(out))
    side = json.loads((out / ENGINE_CONFIG).read_text())
    assert "['params']['heads']['w'].value[0]" in side["derived"] and "1.1.weight" in side["derived"]

    # a head type with no such layout is refused, naming it and the valid formats
    with pytest.raises(ExportError, match=r"head_type 'medusa', but this model's head_type is 'causal'.*mtp,"
                                          r" deepseek_mtp"):
        export_hf(causal_wd, tmp_path / "x", heads_format="medusa")
    with pytest.raises(ExportError, match=r"head_type is 'transformer'; valid --heads-format .*: mtp\."):
        export_hf(lora_wd, tmp_path / "x", heads_format="deepseek_mtp")
    assert not (tmp_path / "x").exists()
