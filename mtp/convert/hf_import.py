"""``mtp convert --hf DIR``: a Hugging Face Llama checkpoint (config.json, *.safetensors,
tokenizer.json) -> an mtp workdir.

Safetensors headers are parsed here (a JSON table of names, dtypes, shapes and byte ranges), so
that bfloat16 weights need neither torch nor a numpy bfloat16 type and every problem names the
tensor: a truncated file, an unsupported dtype, a missing tensor, a wrong shape. All of it is
checked before anything is written.
"""

from __future__ import annotations

import dataclasses
import json
import struct
import time
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from mtp.convert.layout import (
    SIDECAR_CONFIG,
    SIDECAR_TENSORS,
    assemble_params,
    check_heads_tensors,
    placements_of,
    sidecar_spec,
)
from mtp.convert.llama_map import (
    HF_NAMES,
    ConvertError,
    LlamaHParams,
    build_params,
    check_shape,
    check_target,
    config_for,
    default_name,
    expected_tensors,
    progress,
    spec_for,
    write_workdir,
)
from mtp.data.hf_tokenizer import write_tokenizer
from mtp.model.heads import head_kind
from mtp.model.spec import ModelSpec

SUPPORTED_MODEL_TYPES = ("llama",)
_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "F64": np.dtype("<f8")}
_IGNORED = ("rotary_emb.inv_freq",)  # buffers some old checkpoints saved


class SafeTensor:
    def __init__(self, name: str, path: Path, dtype: str, shape, start: int, end: int):
        self.name, self.path, self.dtype, self.shape = name, path, dtype, tuple(int(s) for s in shape)
        self.start, self.end = start, end

    def read(self) -> np.ndarray:
        with open(self.path, "rb") as f:
            f.seek(self.start)
            raw = f.read(self.end - self.start)
        arr = np.frombuffer(raw, _DTYPES[self.dtype])
        if self.dtype == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        return arr.astype(np.float32).reshape(self.shape)


def read_safetensors_header(path: Path) -> dict[str, SafeTensor]:
    size = path.stat().st_size
    if size < 8:
        raise ConvertError(f"file truncated: {path.name} needs bytes 0..8 for its header length but the file"
                           f" has {size} bytes")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if 8 + n > size:
            raise ConvertError(f"file truncated: the header of {path.name} needs bytes 8..{8 + n} but the"
                               f" file has {size} bytes")
        try:
            header = json.loads(f.read(n))
        except ValueError as e:
            raise ConvertError(f"{path.name}: the safetensors header is not valid JSON ({e})") from None
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in _DTYPES:
            raise ConvertError(f"{name} in {path.name} has dtype {dtype}; supported: {', '.join(_DTYPES)}")
        t = SafeTensor(name, path, dtype, shape, 8 + n + begin, 8 + n + end)
        need = int(np.prod(t.shape)) * _DTYPES[dtype].itemsize
        if end - begin != need:
            raise ConvertError(f"{name} in {path.name}: {end - begin} bytes for shape {t.shape} {dtype},"
                               f" expected {need}")
        if t.end > size:
            raise ConvertError(f"file truncated: tensor {name} needs bytes {t.start}..{t.end} but"
                               f" {path.name} has {size} bytes")
        out[name] = t
    return out


def read_tensor_table(src: Path) -> dict[str, SafeTensor]:
    index = src / "model.safetensors.index.json"
    if index.exists():
        files = sorted({src / f for f in json.loads(index.read_text())["weight_map"].values()})
    else:
        files = sorted(p for p in src.glob("*.safetensors") if p.name != SIDECAR_TENSORS)
    if not files:
        raise ConvertError(f"--hf {src} holds no *.safetensors file (PyTorch .bin checkpoints are not read;"
                           " re-save with save_pretrained(safe_serialization=True)).")
    table: dict[str, SafeTensor] = {}
    for f in files:
        if not f.exists():
            raise ConvertError(f"{index.name} names {f.name}, which is missing from {src}")
        for name, t in read_safetensors_header(f).items():
            if name in table:
                raise ConvertError(f"tensor {name} appears in both {table[name].path.name} and {f.name}")
            table[name] = t
    return table


def hparams_from_config(cfg: dict, src: Path) -> LlamaHParams:
    where = f"{src}/config.json"
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConvertError(f"{where}: model_type={model_type!r} is not supported; supported:"
                           f" {SUPPORTED_MODEL_TYPES}.")

    def need(key):
        if cfg.get(key) is None:
            raise ConvertError(f"{where}: missing key {key} (needed to build the model)")
        return cfg[key]

    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise ConvertError(f"{where}: {key}=true; our trunk has no biases.")
    if cfg.get("hidden_act", "silu") != "silu":
        raise ConvertError(f"{where}: hidden_act={cfg['hidden_act']!r}; only 'silu' (SwiGLU) is supported.")
    rope = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    rope_type = scaling.get("rope_type", scaling.get("type")) or rope.get("rope_type", "default")
    if rope_type != "default":
        raise ConvertError(f"{where}: rope type {rope_type!r}: RoPE scaling is not supported.")
    theta = cfg.get("rope_theta", rope.get("rope_theta", 10_000.0))
    d_model, n_heads = int(need("hidden_size")), int(need("num_attention_heads"))
    return LlamaHParams(
        vocab_size=int(need("vocab_size")), d_model=d_model, n_layers=int(need("num_hidden_layers")),
        n_heads=n_heads, n_kv_heads=int(cfg.get("num_key_value_heads") or n_heads),
        head_dim=int(cfg.get("head_dim") or d_model // n_heads), d_ff=int(need("intermediate_size")),
        rope_theta=float(theta), norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_seq_len=int(cfg.get("max_position_embeddings", 2048)),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))


def check_tensors(table: dict[str, SafeTensor], expected: dict, hp: LlamaHParams) -> None:
    for name in expected:
        if name not in table:
            raise ConvertError(f"missing tensor {name} (shape {expected[name].shape} [out, in])")
    for name, t in table.items():
        if name in expected:
            check_shape(name, t.shape, expected[name].shape)
        elif name == HF_NAMES["unembed"] and hp.tie_embeddings:
            continue  # a tied lm_head saved anyway: it is the embedding
        elif not name.endswith(_IGNORED):
            raise ConvertError(f"unexpected tensor {name} in {t.path.name}: our Llama trunk has no place for it")


def _token_id(tokenizer, value) -> int | None:
    if isinstance(value, list):
        value = value[0] if value else None
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        value = value.get("content")
    return tokenizer.token_to_id(value) if isinstance(value, str) else None


def tokenizer_from_dir(src: Path, model_cfg: dict):
    """``(tokenizers.Tokenizer, sidecar config)`` from DIR/tokenizer.json (+ tokenizer_config.json)."""
    path = src / "tokenizer.json"
    if not path.exists():
        raise ConvertError(f"--hf {src} has no tokenizer.json (a Hugging Face 'fast' tokenizer file);"
                           " save it with tokenizer.save_pretrained(DIR).")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # noqa: BLE001 -- any parse failure: say which file
        raise ConvertError(f"{path}: not a readable tokenizers file ({e})") from None
    tcfg_path = src / "tokenizer_config.json"
    tcfg = json.loads(tcfg_path.read_text()) if tcfg_path.exists() else {}
    template = tcfg.get("chat_template")
    if (src / "chat_template.jinja").exists():
        template = (src / "chat_template.jinja").read_text()
    config = {"source": "hf", "chat_template": template,
              "add_bos_token": bool(tcfg.get("add_bos_token", False)),
              "add_eos_token": bool(tcfg.get("add_eos_token", False))}
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "pad_token_id"),
                      ("unk", "unk_token_id")):
        token_id = _token_id(tok, model_cfg.get(key))
        if token_id is None:
            token_id = _token_id(tok, tcfg.get(f"{name}_token"))
        config[f"{name}_token_id"] = token_id
    return tok, config


# --- an `mtp export` directory: heads 2..n from the sidecar (mtp/convert/layout.py) -----------------



def read_sidecar(src: Path, hp: LlamaHParams) -> tuple[dict, ModelSpec]:
    """``mtp_config.json`` and the spec of its model section, checked against config.json's Llama."""
    path = src / SIDECAR_CONFIG
    try:
        side = json.loads(path.read_text())
    except ValueError as e:
        raise ConvertError(f"{path} is not valid JSON ({e})") from None
    return side, sidecar_spec(side, hp, str(path))


def sidecar_params(src: Path, side: dict, spec: ModelSpec, table: dict[str, SafeTensor]):
    """Every parameter of ``spec``: the Llama part from ``table``, heads 2..n (and head 1 of
    'linear'/'medusa' heads, mix logits, causal projections) from the sidecar tensors."""
    heads: dict[str, SafeTensor] = {}
    if side.get("heads_file"):
        heads_path = src / side["heads_file"]
        if not heads_path.exists():
            raise ConvertError(f"{SIDECAR_CONFIG} names {side['heads_file']}, which is missing from {src}")
        heads = read_safetensors_header(heads_path)
    placements = placements_of(spec, str(src / SIDECAR_CONFIG))
    check_heads_tensors(placements, {n: t.shape for n, t in heads.items()}, side.get("heads_file"),
                        lambda p: p.name)
    bar = progress(len(placements), f"reading {src.name}")

    def load(p):
        bar.update(1)
        return (table if p.file == "llama" else heads)[p.name].read()

    try:
        return assemble_params(spec, placements, load)
    finally:
        bar.close()


def sidecar_tokenizer(src: Path, kind: str):
    """The writer of a tokenizer an export stored as its own kind ('sentencepiece', 'bytes'), or None."""
    if kind == "sentencepiece":
        if not (src / "tokenizer.model").exists():
            raise ConvertError(f"{src / SIDECAR_CONFIG} says tokenizer 'sentencepiece' but {src} has no"
                               " tokenizer.model")
        return lambda d: (d / "tokenizer.model").write_bytes((src / "tokenizer.model").read_bytes())
    if kind == "bytes":
        return lambda d: (d / "tokenizer.bytes").touch()
    return None


def convert_hf(src: str | Path, workdir: str | Path, *, dtype: str = "float32", force: bool = False,
               name: str | None = None) -> Path:
    """Convert a Hugging Face Llama directory into ``workdir``; all checks come before any write."""
    started = time.time()
    src = Path(src)
    check_target(workdir, force)
    if not (src / "config.json").exists():
        raise ConvertError(f"--hf {src} has no config.json: expected a Hugging Face model directory.")
    model_cfg = json.loads((src / "config.json").read_text())
    hp = hparams_from_config(model_cfg, src)
    hp.validate(f"{src}/config.json")
    side, side_spec = read_sidecar(src, hp) if (src / SIDECAR_CONFIG).exists() else (None, None)
    expected = expected_tensors(hp, HF_NAMES)
    table = read_tensor_table(src)
    check_tensors(table, expected, hp)
    write_tok = sidecar_tokenizer(src, side.get("tokenizer")) if side else None
    if write_tok is None:
        tokenizer, tok_config = tokenizer_from_dir(src, model_cfg)
        n_tok = tokenizer.get_vocab_size(with_added_tokens=True)
        if n_tok > hp.vocab_size:
            raise ConvertError(f"the tokenizer has {n_tok} tokens but the model's vocab_size is {hp.vocab_size}")
        write_tok = lambda d: write_tokenizer(d, tokenizer, tok_config)  # noqa: E731
    cfg = config_for(hp, name or default_name(src.absolute().name), dtype, workdir)
    if side:
        spec = dataclasses.replace(side_spec, dtype=dtype, param_dtype=dtype)
        params = sidecar_params(src, side, spec, table)
        cfg.model.update({f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)})
    else:
        spec = spec_for(hp, dtype)
        names = {(s.role, s.layer): s.name for s in expected.values()}
        bar = progress(len(names), f"reading {src.name}")

        def load(role: str, layer: int | None) -> np.ndarray:
            w = table[names[(role, layer)]].read()
            bar.update(1)
            return w

        try:
            _, params = build_params(hp, spec, load)
        finally:
            bar.close()
    provenance = {"source": str(src.absolute()), "format": "hf-safetensors" + ("+mtp-heads" if side else ""),
                  "files": sorted({t.path.name for t in table.values()}),
                  "hf_layers": hp.n_layers, "trunk_layers": spec.trunk_layers, "n_future": spec.n_future,
                  "head_layer": hp.n_layers - 1 if head_kind(spec).layer else None,
                  "dtype": dtype, "seconds": round(time.time() - started, 2)}
    if side:
        provenance["mtp_export"] = side.get("source")
    return write_workdir(workdir, cfg, params, write_tok, provenance, force)
