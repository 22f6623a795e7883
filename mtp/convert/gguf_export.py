"""``mtp export --format gguf``: the trunk and head 1 as a llama.cpp Llama GGUF, heads 2..n beside it.

llama.cpp refuses a file holding tensors its architecture does not create ("done_getting_tensors:
wrong number of tensors"), so the MTP heads cannot ride along in the Llama file: they go to a
sibling ``NAME.mtp-heads.gguf`` (architecture ``mtp-heads``), named ``mtp.head.{k}.attn_q.weight``
etc. (llama.cpp's layer suffixes, q/k rows in llama.cpp's interleaved RoPE order, like the trunk's),
with the export description (``mtp_config.json``'s content) in the metadata key ``mtp.config`` of
both files. ``mtp convert --gguf FILE`` reads the sibling back when it is there.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import gguf
import numpy as np
import sentencepiece as spm
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize

from mtp.convert.export import ExportModel, byte_tokenizer_json, check_head1, read_model, sidecar_config
from mtp.convert.layout import Placement, llama_layers
from mtp.convert.llama_map import ExportError, permute_rope_rows

GGUF_TYPES = {"f32": Q.F32, "f16": Q.F16, "q8_0": Q.Q8_0}
FILE_TYPES = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
HEADS_ARCH = "mtp-heads"
_LLAMA3_SPLIT_START = "(?i:'s|'t|'re|'ve|'m|'ll|'d)"


def heads_path(out: Path) -> Path:
    """``model.gguf`` -> ``model.mtp-heads.gguf``."""
    return out.with_name(out.name.removesuffix(".gguf") + ".mtp-heads.gguf")


def gguf_tensor(model: ExportModel, p: Placement) -> np.ndarray:
    """One placement as llama.cpp stores it: [out, in] float32, q/k rows permuted for llama.cpp's RoPE."""
    w = p.to_file(np.asarray(model.slot(p), np.float32))
    if p.role == "attn.wq":
        w = permute_rope_rows(w, model.spec.n_heads)
    elif p.role == "attn.wk":
        w = permute_rope_rows(w, model.spec.n_kv_heads)
    return np.ascontiguousarray(w)


def add_tensor(writer: gguf.GGUFWriter, name: str, w: np.ndarray, qtype: str) -> None:
    """Matrices in ``qtype`` (Q8_0 needs rows of a multiple of 32 values, else F16), vectors in F32."""
    t = GGUF_TYPES[qtype]
    if w.ndim < 2 or t == Q.F32:
        writer.add_tensor(name, w.astype(np.float32))
    elif t == Q.Q8_0 and w.shape[-1] % gguf.GGML_QUANT_SIZES[Q.Q8_0][0] == 0:
        writer.add_tensor(name, quantize(w, Q.Q8_0), raw_dtype=Q.Q8_0)
    else:
        writer.add_tensor(name, w.astype(np.float16))


# --- tokenizer metadata ---------------------------------------------------------------------------
def _pre_name(tok_json: dict, config: dict) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level BPE's pre-tokenizer."""
    if config.get("pre_tokenizer"):  # kept by `mtp convert --gguf`
        return config["pre_tokenizer"]
    pre = tok_json.get("pre_tokenizer") or {}
    kinds = [p.get("type") for p in pre.get("pretokenizers", [pre])]
    if kinds == ["Digits", "ByteLevel"]:
        return "smollm"
    if kinds == ["ByteLevel"]:
        return "gpt2"
    if kinds[:1] == ["Split"] and _LLAMA3_SPLIT_START in json.dumps(pre):
        return "llama-bpe"
    print(f"mtp export: warning: pre-tokenizer {kinds} has no llama.cpp name here; writing 'gpt2'"
          " (check encodings in llama.cpp).", file=sys.stderr)
    return "gpt2"


def add_bpe_tokenizer(writer: gguf.GGUFWriter, model: ExportModel) -> None:
    if model.tokenizer_kind == "bytes":
        tok, config = byte_tokenizer_json(), {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
                                              "unk_token_id": 3}
    else:
        tok, config = model.tokenizer._tok, dict(model.tokenizer.config)
        for name in ("bos", "eos", "pad", "unk"):
            config[f"{name}_token_id"] = getattr(model.tokenizer, f"{name}_id", -1)
        if not isinstance(model.tokenizer.config.get("pad_token_id"), int):
            config["pad_token_id"] = -1
    tok_json = json.loads(tok.to_str())
    if tok_json["model"].get("type") != "BPE":
        raise ExportError(f"the tokenizer of {model.workdir} is a {tok_json['model'].get('type')} model; a GGUF"
                          " export writes byte-level BPE ('gpt2') or SentencePiece tokenizers only.")
    vocab = tok.get_vocab(with_added_tokens=True)
    by_id = {i: t for t, i in vocab.items()}
    added = {a.content: a for a in tok.get_added_tokens_decoder().values()}
    tokens, types = [], []
    for i in range(model.spec.vocab_size):  # llama.cpp wants one token per embedding row
        t = by_id.get(i, f"[PAD{i}]")
        tokens.append(t)
        types.append(5 if i not in by_id else 3 if t in added and added[t].special else 4 if t in added else 1)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok_json["model"].get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_name(tok_json, config))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    _add_specials(writer, config)
    if config.get("chat_template"):
        writer.add_chat_template(config["chat_template"])


def add_spm_tokenizer(writer: gguf.GGUFWriter, model: ExportModel) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(model.workdir / "tokenizer.model"))
    n = sp.get_piece_size()
    tokens = [sp.id_to_piece(i) if i < n else f"[PAD{i}]" for i in range(model.spec.vocab_size)]
    scores = [sp.get_score(i) if i < n else -1e4 for i in range(model.spec.vocab_size)]

    def kind(i: int) -> int:  # llama.cpp: normal 1, unknown 2, control 3, unused 5, byte 6
        if i >= n or sp.is_unused(i):
            return 5
        return 2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1

    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types([kind(i) for i in range(model.spec.vocab_size)])
    writer.add_add_space_prefix(False)  # trained with add_dummy_prefix=False (mtp.data.tokenizer)
    _add_specials(writer, {"bos_token_id": sp.bos_id(), "eos_token_id": sp.eos_id(), "pad_token_id": sp.pad_id(),
                           "unk_token_id": sp.unk_id()})


def _add_specials(writer: gguf.GGUFWriter, config: dict) -> None:
    for key, add in (("bos_token_id", writer.add_bos_token_id), ("eos_token_id", writer.add_eos_token_id),
                     ("pad_token_id", writer.add_pad_token_id), ("unk_token_id", writer.add_unk_token_id)):
        if isinstance(config.get(key), int) and config[key] >= 0:
            add(config[key])
    writer.add_add_bos_token(bool(config.get("add_bos_token", False)))
    writer.add_add_eos_token(bool(config.get("add_eos_token", False)))


# --- the files --------------------------------------------------------------------------------------
def add_hparams(writer: gguf.GGUFWriter, model: ExportModel, qtype: str) -> None:
    spec = model.spec
    writer.add_name(model.name)
    writer.add_block_count(llama_layers(spec))
    writer.add_context_length(spec.max_seq_len)
    writer.add_embedding_length(spec.d_model)
    writer.add_feed_forward_length(spec.resolved_d_ff)
    writer.add_head_count(spec.n_heads)
    writer.add_head_count_kv(spec.n_kv_heads)
    writer.add_key_length(spec.resolved_head_dim)
    writer.add_value_length(spec.resolved_head_dim)
    writer.add_rope_dimension_count(spec.resolved_head_dim)
    writer.add_rope_freq_base(spec.rope_theta)
    writer.add_layer_norm_rms_eps(spec.norm_eps)
    writer.add_vocab_size(spec.vocab_size)
    writer.add_file_type(FILE_TYPES[qtype])


def _write(path: Path, arch: str, model: ExportModel, placements: list[Placement], qtype: str, meta) -> None:
    writer = gguf.GGUFWriter(str(path), arch)
    meta(writer)
    for p in placements:
        add_tensor(writer, p.gguf_name, gguf_tensor(model, p), qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def export_gguf(workdir: str | Path, out: str | Path, *, step: int | None = None, qtype: str = "f32",
                force: bool = False) -> Path:
    """Write ``workdir``'s model as the GGUF ``out`` (+ ``heads_path(out)`` when it has heads 2..n)."""
    if qtype not in GGUF_TYPES:
        raise ExportError(f"--type {qtype!r} is not one of {tuple(GGUF_TYPES)}.")
    out = Path(out).absolute()
    side_out = heads_path(out)
    for path in (out, side_out):
        if path.exists() and not force:
            raise ExportError(f"{path} already exists; pass --force to replace it.")
        if path.is_dir():
            raise ExportError(f"{path} is a directory; --out names the .gguf file to write.")
    model = read_model(workdir, step)
    check_head1(model)
    heads = [p for p in model.placements if p.file == "heads"]
    side = sidecar_config(model, qtype, side_out.name if heads else None, names=lambda p: p.gguf_name)
    description = json.dumps(side)

    def llama_meta(writer):
        add_hparams(writer, model, qtype)
        (add_spm_tokenizer if model.tokenizer_kind == "sentencepiece" else add_bpe_tokenizer)(writer, model)
        writer.add_string("mtp.config", description)

    def heads_meta(writer):
        writer.add_name(f"{model.name} MTP heads 2..{model.spec.n_future}")
        writer.add_string("mtp.config", description)

    out.parent.mkdir(parents=True, exist_ok=True)
    temp = [path.with_name(f".{path.name}.export-{os.getpid()}") for path in (out, side_out)]
    try:
        _write(temp[0], "llama", model, [p for p in model.placements if p.file == "llama"], qtype, llama_meta)
        if heads:
            _write(temp[1], HEADS_ARCH, model, heads, qtype, heads_meta)
            temp[1].replace(side_out)
        elif side_out.exists():
            side_out.unlink()  # a stale sibling from an earlier export (--force)
        temp[0].replace(out)
    finally:
        for path in temp:
            path.unlink(missing_ok=True)
    return out
