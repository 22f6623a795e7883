"""``mtp export --format hf``: a workdir's model as a Hugging Face Llama directory, MTP heads included.

The trunk plus head 1 is a plain ``LlamaForCausalLM`` (``model.safetensors``, ``config.json``,
``generation_config.json``, tokenizer files) that transformers loads as it is; heads 2..n go to the
sidecar ``mtp_heads.safetensors``, described by ``mtp_config.json`` (``mtp.convert.layout``).
``mtp convert --hf DIR`` reads both back into the same MTP model.

``heads_format`` 'medusa' / 'deepseek_mtp' write heads 2..n in a serving engine's layout instead of
the sidecar (``engine_heads``): Medusa v1's ``medusa_lm_head.safetensors`` (head_type 'medusa') or
DeepSeek-V3 MTP layers appended to ``model.safetensors`` (head_type 'causal'); the description goes
to ``mtp_export.json`` (not read back by ``mtp convert``).

Strict accounting: every parameter of the checkpoint is written (each slot of a stacked parameter
to exactly one tensor) or listed in ``mtp_config.json["derived"]`` (LoRA factors merged into their
base weights, ``W + (alpha/r) A @ B``); anything else stops the export, naming the parameters,
before a file is written.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import sentencepiece as spm
from safetensors.numpy import save_file
from tokenizers import AddedToken, Tokenizer, decoders, pre_tokenizers
from tokenizers.models import BPE

from mtp.convert.gguf_import import _bytes_to_unicode
from mtp.convert.layout import (
    SIDECAR_CONFIG,
    SIDECAR_FORMAT,
    SIDECAR_TENSORS,
    SIDECAR_VERSION,
    Placement,
    head1_in_llama,
    llama_layers,
    place,
)
from mtp.convert.llama_map import ExportError
from mtp.data.byte_tokenizer import BYTE_OFFSET
from mtp.model import abstract_params
from mtp.model.heads import head_kind
from mtp.model.spec import ModelSpec
from mtp.train.init_from import fold_lora
from mtp.workdir import PARAMS_PREFIX, load_config_json, load_tokenizer, restore_flat

EXPORT_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
HEADS_FORMATS = {"mtp": None, "medusa": ("medusa",), "deepseek_mtp": ("causal", "shared_causal")}  # -> head_types
MEDUSA_TENSORS = "medusa_lm_head.safetensors"
ENGINE_CONFIG = "mtp_export.json"  # the description of a --heads-format medusa|deepseek_mtp export
BYTE_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3 of mtp.data.byte_tokenizer


@dataclasses.dataclass
class ExportModel:
    """A workdir's parameters ready to export: LoRA merged, every parameter placed."""

    workdir: Path
    name: str
    spec: ModelSpec  # lora_rank=0 once LoRA is merged
    step: int
    flat: dict[str, np.ndarray]  # our flat keys -> host arrays (parameters only)
    placements: list[Placement]
    derived: dict[str, str]  # parameter or tensor -> why it is not written as itself
    tokenizer: object
    tokenizer_kind: str  # 'hf' (tokenizer.json), 'sentencepiece' (tokenizer.model) or 'bytes'

    def slot(self, p: Placement) -> np.ndarray:
        w = self.flat[p.key]
        return w if p.slot is None else w[p.slot]

    def tensors(self, file: str, dtype=np.float32, name: Callable[[Placement], str] = lambda p: p.name):
        """``{tensor name: array}`` of ``file`` ('llama' or 'heads') in the stored orientation."""
        return {name(p): p.to_file(np.asarray(self.slot(p), np.float32)).astype(dtype)
                for p in self.placements if p.file == file}


def tokenizer_kind(workdir: Path) -> str:
    for name, kind in (("tokenizer.json", "hf"), ("tokenizer.model", "sentencepiece"),
                       ("tokenizer.bytes", "bytes")):
        if (workdir / name).exists():
            return kind
    raise ExportError(f"{workdir} has no tokenizer (tokenizer.json, tokenizer.model or tokenizer.bytes).")


def read_model(workdir: str | Path, step: int | None = None, *,
               place_fn: Callable = place) -> ExportModel:
    """The parameters of ``workdir`` (newest checkpoint or ``step``), LoRA merged, each placed;
    raises ExportError naming any parameter that has no place (nothing is written)."""
    workdir = Path(workdir)
    cfg = load_config_json(workdir)
    spec = ModelSpec.from_config(cfg.model)
    if head_kind(spec).masked:
        raise ExportError(f"{workdir} has mask-token heads (head_type='mask'): their LoRA adapters act on the"
                          " mask tokens only, so merging them into the weights would change the next-token"
                          " model, and no export format has a place for mask tokens. Decode it with mtp"
                          " (mtp generate, mtp bench decode); nothing was written.")
    flat, step = restore_flat(workdir, step)
    flat = {k: np.asarray(v) for k, v in flat.items() if k.startswith(PARAMS_PREFIX)}
    derived: dict[str, str] = {}
    if spec.lora_rank:
        merged = fold_lora(flat, float(spec.lora_alpha), wanted=())
        for key in sorted(set(flat) - set(merged)):
            base = key.replace("_lora_a']", "']").replace("_lora_b']", "']")
            derived[key] = f"LoRA factor merged into {base} (W + {spec.lora_alpha}/{spec.lora_rank} * A @ B)"
        flat, spec = merged, dataclasses.replace(spec, lora_rank=0)
    if spec.tie_embeddings:
        derived["lm_head.weight"] = "tied to model.embed_tokens.weight (tie_word_embeddings=true)"
    placements, unplaced = place_fn(spec, {k: v.shape for k, v in flat.items()})
    if unplaced:
        raise ExportError(f"no place in the export for parameter(s) {', '.join(unplaced)} of {workdir}"
                          f" (head_type={spec.head_type!r}); nothing was written. The exporter must learn"
                          " where these go (mtp/convert/layout.py).")
    _, abstract = abstract_params(spec)
    leaves = jax.tree_util.tree_flatten_with_path({"params": abstract})[0]
    expected = {jax.tree_util.keystr(path): tuple(leaf.shape) for path, leaf in leaves}
    extra = sorted(set(flat) - set(expected))
    missing = sorted(set(expected) - set(flat))
    if extra or missing:
        raise ExportError(f"the checkpoint at step {step} of {workdir} does not match its config.json: extra"
                          f" parameter(s) {extra}, missing {missing}; nothing was written.")
    for key, shape in expected.items():
        if tuple(flat[key].shape) != shape:
            raise ExportError(f"parameter {key} is {tuple(flat[key].shape)} in the checkpoint but config.json"
                              f" needs {shape}; nothing was written.")
    written = {(p.key, p.slot) for p in placements}
    for key, value in flat.items():  # every slot of every parameter exactly once
        slots = [None] if (key, None) in written else list(range(value.shape[0]))
        lost = [s for s in slots if (key, s) not in written]
        if lost:
            raise ExportError(f"parameter {key} slot(s) {lost} are not written by the export; nothing was"
                              " written.")
    return ExportModel(workdir, str(cfg.name), spec, step, flat, placements, derived, load_tokenizer(workdir),
                       tokenizer_kind(workdir))


def check_head1(model: ExportModel) -> None:
    """The Llama part must compute head 1: true for transformer-layer heads; for 'linear' / 'medusa'
    heads only when head 1 is the identity (its weights all 0), as a fresh Medusa head is."""
    if head1_in_llama(model.spec):
        return
    nonzero = [p.key for p in model.placements if p.slot == 0 and p.key.startswith("['params']['heads']")
               and np.any(model.slot(p))]
    if nonzero:
        raise ExportError(f"head 1 of this head_type={model.spec.head_type!r} model is not the identity"
                          f" ({', '.join(nonzero)} [0] != 0): a Llama checkpoint has no place for it, so the"
                          " exported model would not be this model's next-token predictor. Export a model with"
                          " head_type 'transformer' or 'causal', or keep head 1 frozen at its zero init.")


# --- mtp_config.json --------------------------------------------------------------------------------
def sidecar_config(model: ExportModel, dtype: str, tensors_file: str | None, names=lambda p: p.name) -> dict:
    spec = model.spec
    llama = {names(p): _where(p) for p in model.placements if p.file == "llama"}
    heads = {names(p): {"shape": list(p.file_shape), "param": _where(p)}
             for p in model.placements if p.file == "heads"}
    return {
        "format": SIDECAR_FORMAT, "version": SIDECAR_VERSION,
        "n_future": spec.n_future, "head_type": spec.head_type, "branch_layer": spec.branch_layer,
        "hidden_mix": spec.hidden_mix, "trunk_layers": spec.trunk_layers, "llama_layers": llama_layers(spec),
        "head_1": (f"model.layers.{spec.trunk_layers}" if head1_in_llama(spec)
                   else "the identity (its zero weights are mtp.head.1.* in the heads file)"),
        "heads_file": tensors_file, "dtype": dtype, "tensors": heads, "llama_tensors": llama,
        "derived": model.derived, "tokenizer": model.tokenizer_kind,
        "model": dataclasses.asdict(spec),
        "source": {"workdir": str(model.workdir.absolute()), "step": model.step, "name": model.name},
    }


def _where(p: Placement) -> str:
    return p.key if p.slot is None else f"{p.key}[{p.slot}]"


# --- tokenizers -------------------------------------------------------------------------------------
def special_ids(tokenizer) -> dict[str, int | None]:
    def ok(i):
        return int(i) if i is not None and int(i) >= 0 else None

    return {"bos_token_id": ok(tokenizer.bos_id), "eos_token_id": ok(tokenizer.eos_id),
            "pad_token_id": ok(tokenizer.pad_id)}


def byte_tokenizer_json() -> Tokenizer:
    """``mtp.data.byte_tokenizer`` as a ``tokenizers`` file: a byte-level BPE with no merges, specials
    at ids 0..3 and byte b at b + 4 (same ids for any text; the special strings themselves are
    matched as specials here, while the byte tokenizer spells them out)."""
    spelling = _bytes_to_unicode()
    vocab = {t: i for i, t in enumerate(BYTE_SPECIALS)} | {spelling[b]: b + BYTE_OFFSET for b in range(256)}
    tok = Tokenizer(BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in BYTE_SPECIALS])
    return tok


def write_hf_tokenizer(model: ExportModel, out: Path) -> None:
    """Tokenizer files ``AutoTokenizer.from_pretrained(out)`` loads (offline) with our ids."""
    tok, kind = model.tokenizer, model.tokenizer_kind
    base = {"model_max_length": model.spec.max_seq_len, "clean_up_tokenization_spaces": False,
            "add_bos_token": False, "add_eos_token": False}
    if kind == "sentencepiece":
        shutil.copy(model.workdir / "tokenizer.model", out / "tokenizer.model")
        sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
        names = {f"{n}_token": sp.id_to_piece(i) for n, i in (("bos", sp.bos_id()), ("eos", sp.eos_id()),
                                                             ("pad", sp.pad_id()), ("unk", sp.unk_id())) if i >= 0}
        config = base | names | {"tokenizer_class": "LlamaTokenizer", "legacy": False, "add_prefix_space": False}
    else:
        if kind == "bytes":
            byte_tokenizer_json().save(str(out / "tokenizer.json"))
            names = dict(zip(("pad_token", "bos_token", "eos_token", "unk_token"), BYTE_SPECIALS))
            ours = {}
        else:
            shutil.copy(model.workdir / "tokenizer.json", out / "tokenizer.json")
            ours = tok.config
            names = {f"{n}_token": tok.token_text(i) for n, i in (("bos", tok.bos_id), ("eos", tok.eos_id),
                                                                 ("unk", tok.unk_id)) if i >= 0}
            if isinstance(ours.get("pad_token_id"), int):
                names["pad_token"] = tok.token_text(ours["pad_token_id"])
        config = base | names | {"tokenizer_class": "PreTrainedTokenizerFast"}
        for key in ("add_bos_token", "add_eos_token", "chat_template"):
            if ours.get(key) is not None:
                config[key] = ours[key]
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))


# --- the directory --------------------------------------------------------------------------------
def hf_config(spec: ModelSpec, ids: dict, dtype: str) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": spec.vocab_size,
        "hidden_size": spec.d_model, "intermediate_size": spec.resolved_d_ff,
        "num_hidden_layers": llama_layers(spec), "num_attention_heads": spec.n_heads,
        "num_key_value_heads": spec.n_kv_heads, "head_dim": spec.resolved_head_dim, "hidden_act": "silu",
        "max_position_embeddings": spec.max_seq_len, "rms_norm_eps": spec.norm_eps,
        "rope_theta": spec.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": spec.rope_theta},
        "tie_word_embeddings": bool(spec.tie_embeddings), "attention_bias": False, "mlp_bias": False,
        "attention_dropout": 0.0, "initializer_range": 0.02, "use_cache": True, "dtype": dtype, **ids,
    }


def check_out(out: Path, force: bool) -> None:
    if out.exists() and not (out.is_dir() and not any(out.iterdir())) and not force:
        raise ExportError(f"--out {out} already exists and is not empty; pass --force to replace it.")


def staged(out: Path, write: Callable[[Path], None], force: bool) -> Path:
    """Run ``write(staging)`` into a directory next to ``out``, then move it in (a failure leaves
    ``out`` as it was)."""
    out = out.absolute()
    check_out(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.export-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        write(staging)
        if out.is_dir():
            shutil.rmtree(out)
        elif out.exists():
            out.unlink()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


# --- heads in a serving engine's layout (--heads-format medusa|deepseek_mtp) ---------------------
def check_heads_format(spec: ModelSpec, heads_format: str) -> None:
    if heads_format not in HEADS_FORMATS:
        raise ExportError(f"--heads-format {heads_format!r} is not one of {tuple(HEADS_FORMATS)}.")
    want = HEADS_FORMATS[heads_format]
    if want is None:
        return
    valid = ["mtp"] + [f for f, t in HEADS_FORMATS.items() if t and spec.head_type in t]
    if spec.head_type not in want:
        raise ExportError(f"--heads-format {heads_format} needs head_type {' or '.join(map(repr, want))}, but this"
                          f" model's head_type is"
                          f" {spec.head_type!r}; valid --heads-format for head_type {spec.head_type!r}:"
                          f" {', '.join(valid)}.")
    if spec.branch_layer or spec.hidden_mix != "none":
        raise ExportError(f"--heads-format {heads_format}: the engine's heads read the last hidden state, but this"
                          f" model's heads 2..n read branch_layer={spec.branch_layer} / hidden_mix="
                          f"{spec.hidden_mix!r}; use --heads-format mtp.")


def _head_of(p: Placement) -> tuple[int, str]:
    """``mtp.head.{k}.{suffix}`` -> ``(k, suffix)``."""
    _, _, k, suffix = p.name.split(".", 3)
    return int(k), suffix


def engine_heads(model: ExportModel, heads_format: str, llama: dict[str, np.ndarray]):
    """Heads 2..n of ``model`` in ``heads_format``'s layout, from the sidecar placements: ``(tensors,
    params, derived, config)``: the tensors, what each holds (a parameter slot, or a copy of a Llama
    tensor), what is not written as itself (and why), and the ``config.json`` fields the engine reads."""
    spec = model.spec
    tied = "lm_head.weight" not in llama
    head_src = "model.embed_tokens.weight (tied lm_head)" if tied else "lm_head.weight"
    head = llama["model.embed_tokens.weight" if tied else "lm_head.weight"]
    tensors: dict[str, np.ndarray] = {}
    params: dict[str, str] = {}
    derived: dict[str, str] = {}
    side = [p for p in model.placements if p.file == "heads"]

    def stored(p: Placement) -> np.ndarray:
        return p.to_file(np.asarray(model.slot(p), np.float32)).astype(head.dtype)

    if heads_format == "medusa":  # Medusa v1: medusa_head[i] = Sequential(ResBlock, Linear(D, V, bias=False))
        for p in side:
            k, suffix = _head_of(p)
            if k == 1:
                derived[_where(p)] = ("head 1 is the identity (all zeros, checked): the base Llama's own lm_head"
                                      " is the next-token head")
                continue
            name = f"{k - 2}.0.linear.{suffix.split('.')[1]}"  # proj.weight / proj.bias
            tensors[name], params[name] = stored(p), _where(p)
        for i in range(spec.n_future - 1):
            tensors[f"{i}.1.weight"] = head
            params[f"{i}.1.weight"] = derived[f"{i}.1.weight"] = (
                f"copy of {head_src}: our heads share the unembedding, each Medusa head has its own lm_head")
        return tensors, params, derived, {"medusa_num_heads": spec.n_future - 1, "medusa_num_layers": 1}
    # deepseek_mtp: head k >= 2 -> model.layers.{N + k - 2}, N = num_hidden_layers (trunk + head 1)
    n_layers, D = llama_layers(spec), spec.d_model
    for p in side:
        k, suffix = _head_of(p)
        name, w, what = f"model.layers.{n_layers + k - 2}.{suffix}", stored(p), _where(p)
        if suffix == "combine.weight":  # ours: [W_h | W_e] on [hnorm(h) ; enorm(e)]; eh_proj: on [e ; h]
            name = name.replace("combine.weight", "eh_proj.weight")
            w = np.ascontiguousarray(np.concatenate([w[:, D:], w[:, :D]], axis=1))
            what += " with its column halves swapped (embedding half first)"
        tensors[name], params[name] = w, what
    n_stored = head_kind(spec).n_stacked(spec.n_future)  # shared_causal: its one MTP layer (DeepSeek-V3's one)
    for k in range(2, n_stored + 1):
        prefix = f"model.layers.{n_layers + k - 2}."
        for suffix, src in (("embed_tokens.weight", "model.embed_tokens.weight"),
                            ("shared_head.norm.weight", "model.norm.weight"), ("shared_head.head.weight", None)):
            tensors[prefix + suffix] = llama[src] if src else head
            params[prefix + suffix] = derived[prefix + suffix] = (
                f"copy of {src or head_src} (a DeepSeek-V3 MTP layer carries the shared tensors)")
    return tensors, params, derived, {"num_nextn_predict_layers": n_stored - 1}


def export_hf(workdir: str | Path, out: str | Path, *, step: int | None = None, dtype: str = "float32",
              force: bool = False, heads_format: str = "mtp") -> Path:
    """Write ``workdir``'s model into the Hugging Face directory ``out`` (see the module docstring)."""
    if dtype not in EXPORT_DTYPES:
        raise ExportError(f"--dtype {dtype!r} is not one of {tuple(EXPORT_DTYPES)}.")
    check_out(Path(out), force)
    check_heads_format(ModelSpec.from_config(load_config_json(Path(workdir)).model), heads_format)
    model = read_model(workdir, step)
    check_head1(model)
    np_dtype = EXPORT_DTYPES[dtype]
    llama, heads = model.tensors("llama", np_dtype), model.tensors("heads", np_dtype)
    ids = special_ids(model.tokenizer)
    if heads_format != "mtp":
        final = Path(out).absolute()
        return staged(final, lambda d: write_engine(d, final, model, heads_format, dtype, llama, ids), force)

    def write(d: Path) -> None:
        save_file(llama, str(d / "model.safetensors"), metadata={"format": "pt"})
        if heads:
            save_file(heads, str(d / SIDECAR_TENSORS), metadata={"format": SIDECAR_FORMAT})
        side = sidecar_config(model, dtype, SIDECAR_TENSORS if heads else None)
        (d / SIDECAR_CONFIG).write_text(json.dumps(side, indent=2))
        (d / "config.json").write_text(json.dumps(hf_config(model.spec, ids, dtype), indent=2))
        gen = {k: v for k, v in ids.items() if v is not None}
        (d / "generation_config.json").write_text(json.dumps(gen, indent=2))
        write_hf_tokenizer(model, d)

    return staged(Path(out), write, force)


def write_engine(d: Path, out: Path, model: ExportModel, heads_format: str, dtype: str, llama: dict,
                 ids: dict) -> None:
    """The ``--heads-format medusa|deepseek_mtp`` directory into ``d`` (moved to ``out`` after)."""
    tensors, params, derived, extra = engine_heads(model, heads_format, llama)
    held = {v.split(" with ")[0] for v in params.values()} | set(derived)
    lost = [_where(p) for p in model.placements if p.file == "heads" and _where(p) not in held]
    if lost:  # strict accounting: every sidecar slot under an engine name or listed derived
        raise ExportError(f"--heads-format {heads_format} has no place for {', '.join(lost)}; nothing was written.")
    config = hf_config(model.spec, ids, dtype) | extra
    if heads_format == "medusa":
        config["base_model_name_or_path"] = str(out)
        save_file(tensors, str(d / MEDUSA_TENSORS), metadata={"format": "pt"})
        save_file(llama, str(d / "model.safetensors"), metadata={"format": "pt"})
    else:
        save_file(llama | tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    side = sidecar_config(model, dtype, MEDUSA_TENSORS if heads_format == "medusa" else "model.safetensors")
    side["heads_format"] = heads_format
    side["tensors"] = {n: {"shape": list(t.shape), "param": params[n]} for n, t in tensors.items()}
    side["derived"] = model.derived | derived
    (d / ENGINE_CONFIG).write_text(json.dumps(side, indent=2))
    (d / "config.json").write_text(json.dumps(config, indent=2))
    gen = {k: v for k, v in ids.items() if v is not None}
    (d / "generation_config.json").write_text(json.dumps(gen, indent=2))
    write_hf_tokenizer(model, d)
