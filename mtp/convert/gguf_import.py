"""``mtp convert --gguf FILE``: a llama.cpp GGUF file -> an mtp workdir.

The header is parsed here (not with ``gguf.GGUFReader``) so that every problem is reported with
the tensor or key it concerns: a truncated file, a tensor type the installed ``gguf`` cannot
dequantize, a missing or unexpected tensor, a wrong shape. All of that is checked before a single
tensor is dequantized or anything is written. Tensor data is dequantized with
``gguf.quants.dequantize`` (every type the installed gguf supports: F32, F16, BF16, Q4_0/1,
Q5_0/1, Q8_0, the K-quants, IQ*, TQ*, MXFP4, ...). llama.cpp stores the q/k projection rows of
Llama in the interleaved-pairs RoPE order; they are permuted back to the split-halves order our
RoPE (and Hugging Face's) uses. The tokenizer is rebuilt from the metadata as a byte-level BPE
``tokenizers`` file, with its special tokens and chat template.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import json
import struct
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.pre_tokenizers import ByteLevel

from mtp.convert.layout import assemble_params, check_heads_tensors, placements_of, sidecar_spec
from mtp.convert.llama_map import (
    GGUF_NAMES,
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
    unpermute_rope_rows,
    write_workdir,
)
from mtp.data.hf_tokenizer import write_tokenizer

GGUF_MAGIC = b"GGUF"
SUPPORTED_ARCHS = ("llama",)
MAX_DIMS = 4  # GGML_MAX_DIMS

# GGUFValueType -> struct code of the scalar types
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_STRING, _ARRAY = 8, 9


def gguf_version() -> str:
    try:
        return importlib.metadata.version("gguf")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return "?"


@functools.lru_cache(maxsize=1)
def supported_types() -> dict[int, str]:
    """Tensor types the installed ``gguf`` package can dequantize: ``{type id: name}``."""
    out = {}
    for qtype in GGMLQuantizationType:
        if qtype not in GGML_QUANT_SIZES:
            continue
        block, size = GGML_QUANT_SIZES[qtype]
        try:
            with np.errstate(all="ignore"):
                probe = np.asarray(dequantize(np.zeros((1, size), np.uint8), qtype))
        except Exception:  # noqa: BLE001 -- NotImplementedError and friends: not supported
            continue
        if probe.shape[-1] == block:
            out[int(qtype)] = qtype.name
    return out


def _type_name(type_id: int) -> str:
    try:
        return GGMLQuantizationType(type_id).name
    except ValueError:
        return "unknown"


@dataclasses.dataclass
class GGUFTensor:
    name: str
    type_id: int
    shape: tuple[int, ...]  # numpy order (GGUF dims reversed): [out, in] for matrices
    offset: int  # relative to the start of the data section
    start: int = 0  # absolute byte range in the file
    end: int = 0

    @property
    def type_name(self) -> str:
        return _type_name(self.type_id)


@dataclasses.dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict
    tensors: dict[str, GGUFTensor]
    data_start: int
    file_size: int
    data: np.memmap


class _Cursor:
    def __init__(self, buf, size: int):
        self.buf, self.size, self.pos = buf, size, 0

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise ConvertError(f"file truncated: {what} needs bytes {self.pos}..{self.pos + n} but the"
                               f" file has {self.size} bytes")

    def unpack(self, code: str, what: str):
        n = struct.calcsize("<" + code)
        self.need(n, what)
        value = struct.unpack_from("<" + code, self.buf, self.pos)[0]
        self.pos += n
        return value

    def string(self, what: str) -> str:
        n = self.unpack("Q", what)
        self.need(n, what)
        raw = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return raw.decode("utf-8", errors="replace")

    def value(self, type_id: int, what: str):
        if type_id in _SCALARS:
            return self.unpack(_SCALARS[type_id], what)
        if type_id == _STRING:
            return self.string(what)
        if type_id == _ARRAY:
            item_type = self.unpack("I", what)
            count = self.unpack("Q", what)
            if item_type in _SCALARS:
                code = _SCALARS[item_type]
                size = struct.calcsize(code)
                self.need(count * size, what)
                arr = np.frombuffer(self.buf, np.dtype("<" + code), count, self.pos)
                self.pos += count * size
                return arr.tolist()
            return [self.value(item_type, what) for _ in range(count)]
        raise ConvertError(f"{what}: unknown metadata value type {type_id}; the file is corrupt or"
                           f" newer than gguf {gguf_version()} understands.")


def read_gguf(path: str | Path) -> GGUFFile:
    """Parse the header of a GGUF file (metadata and tensor table); tensor data stays on disk.
    Does NOT check tensor types or truncation of tensor data: see :func:`check_tensors`."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"--gguf {path}: no such file.")
    size = path.stat().st_size
    if size < 24:
        raise ConvertError(f"file truncated: the GGUF header needs bytes 0..24 but the file has {size} bytes")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    cur = _Cursor(data, size)
    if bytes(data[:4]) != GGUF_MAGIC:
        raise ConvertError(f"{path} is not a GGUF file (magic {bytes(data[:4])!r}, expected {GGUF_MAGIC!r}).")
    cur.pos = 4
    version = cur.unpack("I", "the version field")
    if version not in (2, 3):
        hint = " (a big-endian file?)" if version & 0xFFFF == 0 else ""
        raise ConvertError(f"{path}: GGUF version {version}{hint} is not supported; expected 2 or 3.")
    n_tensors = cur.unpack("Q", "the tensor count")
    n_kv = cur.unpack("Q", "the metadata count")
    metadata: dict = {}
    key = None
    for i in range(n_kv):
        key = cur.string(f"metadata key #{i}" + (f" (after {key})" if key else ""))
        type_id = cur.unpack("I", f"the type of metadata {key}")
        metadata[key] = cur.value(type_id, f"metadata {key}")
    tensors: dict[str, GGUFTensor] = {}
    for i in range(n_tensors):
        name = cur.string(f"the name of tensor #{i}")
        n_dims = cur.unpack("I", f"the header of tensor {name}")
        if not 1 <= n_dims <= MAX_DIMS:
            raise ConvertError(f"{name}: {n_dims} dimensions in the tensor table, expected 1..{MAX_DIMS}"
                               " (corrupt header?)")
        dims = [cur.unpack("Q", f"the header of tensor {name}") for _ in range(n_dims)]
        type_id = cur.unpack("I", f"the header of tensor {name}")
        offset = cur.unpack("Q", f"the header of tensor {name}")
        if name in tensors:
            raise ConvertError(f"tensor {name} appears twice in the tensor table.")
        tensors[name] = GGUFTensor(name, type_id, tuple(reversed(dims)), offset)
    alignment = metadata.get("general.alignment", 32)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise ConvertError(f"metadata general.alignment={alignment!r}, expected a power of two.")
    data_start = -(-cur.pos // alignment) * alignment
    return GGUFFile(path, version, metadata, tensors, data_start, size, data)


def check_tensors(g: GGUFFile, expected: dict) -> None:
    """Every expected tensor present, no unexpected one, each of a supported type, of the expected
    shape, and wholly inside the file; raises ConvertError naming the first offending tensor."""
    for name in expected:
        if name not in g.tensors:
            raise ConvertError(f"missing tensor {name} (shape {expected[name].shape} [out, in]) in {g.path}")
    for name in g.tensors:
        if name not in expected:
            extra = " (Llama-3.1 RoPE scaling is not supported)" if name == "rope_freqs.weight" else ""
            raise ConvertError(f"unexpected tensor {name} in {g.path}: our Llama trunk has no place for it{extra}")
    supported = supported_types()
    for t in g.tensors.values():
        if t.type_id not in supported:
            raise ConvertError(
                f"tensor type {t.type_id} ({t.type_name}) of {t.name} is not supported by gguf"
                f" {gguf_version()}; supported: {', '.join(supported.values())}")
        check_shape(t.name, t.shape, expected[t.name].shape)
        block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(t.type_id)]
        if t.shape[-1] % block:
            raise ConvertError(f"{t.name}: rows of {t.shape[-1]} values are not a multiple of the"
                               f" {t.type_name} block size {block}")
        n_bytes = int(np.prod(t.shape)) // block * type_size
        t.start = g.data_start + t.offset
        t.end = t.start + n_bytes
        if t.end > g.file_size:
            raise ConvertError(f"file truncated: tensor {t.name} needs bytes {t.start}..{t.end} but the file"
                               f" has {g.file_size} bytes")


def dequantize_tensor(g: GGUFFile, t: GGUFTensor) -> np.ndarray:
    """One tensor as float32 in numpy order (after :func:`check_tensors`)."""
    qtype = GGMLQuantizationType(t.type_id)
    block, type_size = GGML_QUANT_SIZES[qtype]
    raw = np.asarray(g.data[t.start:t.end]).reshape(*t.shape[:-1], t.shape[-1] // block * type_size)
    out = np.asarray(dequantize(raw, qtype), dtype=np.float32).reshape(t.shape)
    if not np.isfinite(out).all():
        raise ConvertError(f"{t.name}: dequantized {t.type_name} data holds NaN or Inf (corrupt data?)")
    return out


# --- metadata -> hyperparameters ---------------------------------------------------------------
def _meta(md: dict, key: str, default=None, *, required: bool = False):
    if key in md:
        value = md[key]
        if isinstance(value, list):
            raise ConvertError(f"metadata {key} is a per-layer list {value[:4]}...; only uniform layers"
                               " are supported.")
        return value
    if required:
        raise ConvertError(f"missing metadata key {key} (needed to build the model)")
    return default


def hparams_from_metadata(g: GGUFFile) -> LlamaHParams:
    md = g.metadata
    arch = md.get("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise ConvertError(f"general.architecture={arch!r} is not supported; supported: {SUPPORTED_ARCHS}.")
    a = arch
    d_model = int(_meta(md, f"{a}.embedding_length", required=True))
    n_heads = int(_meta(md, f"{a}.attention.head_count", required=True))
    head_dim = int(_meta(md, f"{a}.attention.key_length", 0) or (d_model // max(n_heads, 1)))
    rope_dims = _meta(md, f"{a}.rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != head_dim:
        raise ConvertError(f"metadata {a}.rope.dimension_count={rope_dims} differs from head_dim={head_dim}:"
                           " partial rotary embeddings are not supported.")
    value_dim = _meta(md, f"{a}.attention.value_length")
    if value_dim is not None and int(value_dim) != head_dim:
        raise ConvertError(f"metadata {a}.attention.value_length={value_dim} differs from the key length"
                           f" {head_dim}; not supported.")
    scaling = _meta(md, f"{a}.rope.scaling.type", "none")
    if scaling not in ("none", None, ""):
        raise ConvertError(f"metadata {a}.rope.scaling.type={scaling!r}: RoPE scaling is not supported.")
    tokens = md.get("tokenizer.ggml.tokens")
    embd = g.tensors.get(GGUF_NAMES["embed"])
    vocab = _meta(md, f"{a}.vocab_size") or (len(tokens) if tokens else None) or (embd.shape[0] if embd else 0)
    return LlamaHParams(
        vocab_size=int(vocab),
        d_model=d_model,
        n_layers=int(_meta(md, f"{a}.block_count", required=True)),
        n_heads=n_heads,
        n_kv_heads=int(_meta(md, f"{a}.attention.head_count_kv", n_heads)),
        head_dim=head_dim,
        d_ff=int(_meta(md, f"{a}.feed_forward_length", required=True)),
        rope_theta=float(_meta(md, f"{a}.rope.freq_base", 10_000.0)),
        norm_eps=float(_meta(md, f"{a}.attention.layer_norm_rms_epsilon", required=True)),
        max_seq_len=int(_meta(md, f"{a}.context_length", 2048)),
        tie_embeddings=GGUF_NAMES["unembed"] not in g.tensors,
    )


# --- tokenizer ----------------------------------------------------------------------------------
# tokenizer.ggml.pre -> pre-tokenizer. 'smollm' = SmolLM2's own tokenizer.json (single digits, then
# GPT-2 byte-level regex), which is also llama.cpp's smollm rule (\p{N}, then the GPT-2 regex).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(pre: str | None):
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("smollm", "starcoder", "refact"):
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]), True
    if pre in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe", "falcon3", "dbrx"):
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]), True
    return byte_level, pre in (None, "", "default", "gpt2", "gpt-2")


def tokenizer_from_metadata(md: dict):
    """``(tokenizers.Tokenizer, sidecar config dict)`` from the GGUF tokenizer metadata."""
    model = md.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise ConvertError(f"metadata tokenizer.ggml.model={model!r}: only byte-level BPE ('gpt2', as in"
                           " SmolLM2 and Llama 3) is supported.")
    tokens = md.get("tokenizer.ggml.tokens")
    merges = md.get("tokenizer.ggml.merges")
    if not tokens:
        raise ConvertError("missing metadata key tokenizer.ggml.tokens (needed to build the tokenizer)")
    if merges is None:
        raise ConvertError("missing metadata key tokenizer.ggml.merges (needed to build the tokenizer)")
    types = md.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    if len(types) != len(tokens):
        raise ConvertError(f"metadata tokenizer.ggml.token_type has {len(types)} entries, expected"
                           f" {len(tokens)} (one per token)")
    alphabet = set(ByteLevel.alphabet())
    byte_spelling = _bytes_to_unicode()
    vocab = {}
    for i, token in enumerate(tokens):
        spelled = token if set(token) <= alphabet else "".join(byte_spelling[b] for b in token.encode("utf-8"))
        vocab.setdefault(spelled, i)
    pairs = []
    for i, merge in enumerate(merges):
        parts = merge.split(" ")
        if len(parts) != 2:
            raise ConvertError(f"metadata tokenizer.ggml.merges[{i}]={merge!r}, expected two tokens"
                               " separated by one space")
        pairs.append((parts[0], parts[1]))
    tok = Tokenizer(BPE(vocab=vocab, merges=pairs, fuse_unk=False, continuing_subword_prefix="",
                        end_of_word_suffix=""))
    pre = md.get("tokenizer.ggml.pre")
    tok.pre_tokenizer, known = _pre_tokenizer(pre)
    if not known:
        print(f"mtp convert: warning: tokenizer.ggml.pre={pre!r} is not known here; using the GPT-2"
              " byte-level split (check encodings against the original tokenizer).", file=sys.stderr)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    control = [AddedToken(t, normalized=False, special=True)
               for t, kind in zip(tokens, types) if kind == 3 and set(t) <= alphabet]
    user = [AddedToken(t, normalized=False, special=False)
            for t, kind in zip(tokens, types) if kind == 4 and set(t) <= alphabet]
    if control:
        tok.add_special_tokens(control)
    if user:
        tok.add_tokens(user)

    def special(key):
        value = md.get(f"tokenizer.ggml.{key}")
        return int(value) if isinstance(value, int) and 0 <= value < len(tokens) else None

    config = {
        "bos_token_id": special("bos_token_id"),
        "eos_token_id": special("eos_token_id"),
        "pad_token_id": special("padding_token_id"),
        "unk_token_id": special("unknown_token_id"),
        "chat_template": md.get("tokenizer.chat_template"),
        "add_bos_token": bool(md.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(md.get("tokenizer.ggml.add_eos_token", False)),
        "pre_tokenizer": pre,
        "source": "gguf",
    }
    return tok, config


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the byte-level BPE alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def mtp_export_params(g: GGUFFile, side: dict, spec):
    """The whole MTP model of an ``mtp export --format gguf``: the Llama part from ``g``, the rest
    from the sibling heads file ``mtp.config`` names (checked like the Llama file)."""
    placements = placements_of(spec, f"{g.path} (mtp.config)")
    heads = None
    if side.get("heads_file"):
        heads_file = g.path.with_name(side["heads_file"])
        if not heads_file.exists():
            raise ConvertError(f"{g.path} is an mtp export with MTP heads in {heads_file.name}, which is missing"
                               f" from {g.path.parent}")
        heads = read_gguf(heads_file)
        shapes = {n: t.shape for n, t in heads.tensors.items()}
        check_heads_tensors(placements, shapes, heads_file.name, lambda p: p.gguf_name)
        check_tensors(heads, {p.gguf_name: _Expected(p.file_shape) for p in placements if p.file == "heads"})
    n_heads = {"attn.wq": spec.n_heads, "attn.wk": spec.n_kv_heads}

    def load(p):
        f = g if p.file == "llama" else heads
        w = dequantize_tensor(f, f.tensors[p.gguf_name])
        return unpermute_rope_rows(w, n_heads[p.role]) if p.role in n_heads else w

    return assemble_params(spec, placements, load)


@dataclasses.dataclass(frozen=True)
class _Expected:  # what check_tensors reads of an expected tensor
    shape: tuple


# --- the command --------------------------------------------------------------------------------
def load_gguf(path: str | Path) -> tuple[GGUFFile, LlamaHParams]:
    """Parse and fully check a GGUF file (nothing dequantized yet)."""
    g = read_gguf(path)
    hp = hparams_from_metadata(g)
    hp.validate(str(path))
    check_tensors(g, expected_tensors(hp, GGUF_NAMES))
    return g, hp


def convert_gguf(path: str | Path, workdir: str | Path, *, dtype: str = "float32", force: bool = False,
                 name: str | None = None) -> Path:
    """Convert a GGUF file into ``workdir``; everything is checked before anything is written."""
    started = time.time()
    check_target(workdir, force)
    g, hp = load_gguf(path)
    tokenizer, tok_config = tokenizer_from_metadata(g.metadata)
    n_tok = tokenizer.get_vocab_size(with_added_tokens=True)
    if n_tok > hp.vocab_size:
        raise ConvertError(f"the tokenizer has {n_tok} tokens but token_embd.weight has only"
                           f" {hp.vocab_size} rows")
    side = json.loads(g.metadata["mtp.config"]) if "mtp.config" in g.metadata else None
    if side:  # an `mtp export`: heads 2..n in the sibling file it names (mtp/convert/gguf_export.py)
        spec = dataclasses.replace(sidecar_spec(side, hp, f"{path} (mtp.config)"), dtype=dtype, param_dtype=dtype)
        params = mtp_export_params(g, side, spec)
    else:
        spec = spec_for(hp, dtype)
        names = {(s.role, s.layer): s.name for s in expected_tensors(hp, GGUF_NAMES).values()}
        bar = progress(len(names), f"dequantizing {Path(path).name}")

        def load(role: str, layer: int | None) -> np.ndarray:
            t = g.tensors[names[(role, layer)]]
            w = dequantize_tensor(g, t)
            if role == "attn.wq":
                w = unpermute_rope_rows(w, hp.n_heads)
            elif role == "attn.wk":
                w = unpermute_rope_rows(w, hp.n_kv_heads)
            bar.update(1)
            return w

        try:
            _, params = build_params(hp, spec, load)
        finally:
            bar.close()
    cfg = config_for(hp, name or default_name(Path(path).stem), dtype, workdir)
    if side:
        cfg.model.update({f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)})
    provenance = {
        "source": str(Path(path).absolute()), "format": "gguf", "gguf_version": g.version,
        "gguf_package": gguf_version(), "file_bytes": g.file_size,
        "tensor_types": dict(Counter(t.type_name for t in g.tensors.values())),
        "general": {k: v for k, v in g.metadata.items() if k.startswith("general.")},
        "hf_layers": hp.n_layers, "trunk_layers": hp.n_layers - 1, "head_layer": hp.n_layers - 1,
        "dtype": dtype, "seconds": round(time.time() - started, 2),
        "mtp_export": side.get("source") if side else None,
    }
    return write_workdir(workdir, cfg, params, lambda d: write_tokenizer(d, tokenizer, tok_config),
                         provenance, force)
