"""Llama-family weights -> our parameter tree, shared by the GGUF and the Hugging Face importers.

A Llama with ``L`` layers maps to ``ModelSpec(n_layers=L-1, n_future=1, head_type='transformer',
parameter_matched=False)``: HF layers ``0..L-2`` are stacked on the leading axis of
``model.trunk.*`` and layer ``L-1`` is the model's own next-token head ``model.heads[0]``. The
final norm, the embedding and the (untied) unembedding map one to one, so head 1's logits equal
the source model's.

Source tensors are described in Hugging Face orientation ([out, in] for matrices), which is also
the numpy orientation of a GGUF tensor (GGUF lists dims innermost first: ``ne = (in, out)``).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from mtp.config import DTYPES, base_config
from mtp.model import abstract_params
from mtp.model.spec import ModelSpec
from mtp.workdir import checkpoint_steps, save_params


class ConvertError(ValueError):
    """A source file that cannot be imported; the message names the tensor (or key) and what was
    expected. Raised before anything is written to the target workdir."""


class ExportError(ValueError):
    """A workdir that cannot be exported as asked (``mtp export``); the message names the parameter
    (or option) and the fix. Raised before anything is written to the output."""


# role (our parameter path below trunk/heads, or a top-level name) -> source name templates
LAYER_ROLES = ("attn_norm.scale", "attn.wq", "attn.wk", "attn.wv", "attn.wo",
               "mlp_norm.scale", "mlp.w_gate", "mlp.w_up", "mlp.w_down")
GLOBAL_ROLES = ("embed", "final_norm.scale", "unembed")

HF_NAMES = {
    "embed": "model.embed_tokens.weight",
    "final_norm.scale": "model.norm.weight",
    "unembed": "lm_head.weight",
    "attn_norm.scale": "model.layers.{i}.input_layernorm.weight",
    "attn.wq": "model.layers.{i}.self_attn.q_proj.weight",
    "attn.wk": "model.layers.{i}.self_attn.k_proj.weight",
    "attn.wv": "model.layers.{i}.self_attn.v_proj.weight",
    "attn.wo": "model.layers.{i}.self_attn.o_proj.weight",
    "mlp_norm.scale": "model.layers.{i}.post_attention_layernorm.weight",
    "mlp.w_gate": "model.layers.{i}.mlp.gate_proj.weight",
    "mlp.w_up": "model.layers.{i}.mlp.up_proj.weight",
    "mlp.w_down": "model.layers.{i}.mlp.down_proj.weight",
}

GGUF_NAMES = {
    "embed": "token_embd.weight",
    "final_norm.scale": "output_norm.weight",
    "unembed": "output.weight",
    "attn_norm.scale": "blk.{i}.attn_norm.weight",
    "attn.wq": "blk.{i}.attn_q.weight",
    "attn.wk": "blk.{i}.attn_k.weight",
    "attn.wv": "blk.{i}.attn_v.weight",
    "attn.wo": "blk.{i}.attn_output.weight",
    "mlp_norm.scale": "blk.{i}.ffn_norm.weight",
    "mlp.w_gate": "blk.{i}.ffn_gate.weight",
    "mlp.w_up": "blk.{i}.ffn_up.weight",
    "mlp.w_down": "blk.{i}.ffn_down.weight",
}


@dataclasses.dataclass(frozen=True)
class LlamaHParams:
    """The shape of a Llama-family model as its source describes it (``n_layers`` = all L layers)."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    rope_theta: float
    norm_eps: float
    max_seq_len: int
    tie_embeddings: bool

    def validate(self, source: str) -> None:
        for field in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
                      "max_seq_len"):
            if int(getattr(self, field)) <= 0:
                raise ConvertError(f"{source}: {field}={getattr(self, field)} must be positive.")
        if self.n_layers < 2:
            raise ConvertError(f"{source}: the model has {self.n_layers} layer(s); at least 2 are needed"
                               " (layers 0..L-2 become the trunk, layer L-1 the next-token head).")
        if self.n_heads % self.n_kv_heads:
            raise ConvertError(f"{source}: {self.n_heads} attention heads are not a multiple of"
                               f" {self.n_kv_heads} key/value heads (grouped-query attention needs it).")
        if self.head_dim % 2:
            raise ConvertError(f"{source}: head_dim={self.head_dim} is odd; RoPE needs an even head_dim.")
        if not (self.rope_theta > 0 and self.norm_eps > 0):
            raise ConvertError(f"{source}: rope_theta={self.rope_theta} and norm_eps={self.norm_eps}"
                               " must be positive.")


def source_shape(role: str, hp: LlamaHParams) -> tuple[int, ...]:
    """Expected shape of the source tensor for ``role`` in HF orientation ([out, in])."""
    V, D, F = hp.vocab_size, hp.d_model, hp.d_ff
    NH, KH = hp.n_heads * hp.head_dim, hp.n_kv_heads * hp.head_dim
    return {
        "embed": (V, D), "unembed": (V, D), "final_norm.scale": (D,),
        "attn_norm.scale": (D,), "mlp_norm.scale": (D,),
        "attn.wq": (NH, D), "attn.wk": (KH, D), "attn.wv": (KH, D), "attn.wo": (D, NH),
        "mlp.w_gate": (F, D), "mlp.w_up": (F, D), "mlp.w_down": (D, F),
    }[role]


@dataclasses.dataclass(frozen=True)
class SourceTensor:
    name: str
    role: str
    layer: int | None
    shape: tuple[int, ...]


def expected_tensors(hp: LlamaHParams, names: dict[str, str]) -> dict[str, SourceTensor]:
    """Every source tensor the model needs, by source name (``names``: HF_NAMES or GGUF_NAMES)."""
    out: dict[str, SourceTensor] = {}
    for role in GLOBAL_ROLES:
        if role == "unembed" and hp.tie_embeddings:
            continue
        out[names[role]] = SourceTensor(names[role], role, None, source_shape(role, hp))
    for i in range(hp.n_layers):
        for role in LAYER_ROLES:
            name = names[role].format(i=i)
            out[name] = SourceTensor(name, role, i, source_shape(role, hp))
    return out


def check_shape(name: str, shape, expected) -> None:
    if tuple(int(s) for s in shape) != tuple(expected):
        raise ConvertError(f"{name}: shape {tuple(int(s) for s in shape)}, expected {tuple(expected)}"
                           " (rows, cols as [out, in])")


# --- RoPE row order --------------------------------------------------------------------------------
def permute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF (split-halves RoPE) -> llama.cpp GGUF (interleaved pairs) row order of q/k projections,
    as llama.cpp's convert_hf_to_gguf.py ``permute`` does."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_rope_rows(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of :func:`permute_rope_rows`: GGUF q/k rows back to the HF order our RoPE uses."""
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# --- our side ---------------------------------------------------------------------------------------
def to_ours(role: str, w: np.ndarray, hp: LlamaHParams) -> np.ndarray:
    """One source tensor (HF orientation) -> the per-layer shape of our parameter."""
    D, N, K, H = hp.d_model, hp.n_heads, hp.n_kv_heads, hp.head_dim
    if role in ("embed", "final_norm.scale", "attn_norm.scale", "mlp_norm.scale"):
        return w
    if role == "unembed":
        return w.T  # [V, D] -> [D, V]
    if role == "attn.wq":
        return w.T.reshape(D, N, H)
    if role in ("attn.wk", "attn.wv"):
        return w.T.reshape(D, K, H)
    if role == "attn.wo":
        return w.T.reshape(N, H, D)  # o_proj [D, N*H] -> [N*H, D]
    if role in ("mlp.w_gate", "mlp.w_up", "mlp.w_down"):
        return w.T
    raise KeyError(role)


def spec_for(hp: LlamaHParams, dtype: str = "float32"):
    return ModelSpec(**model_section(hp, dtype))


def model_section(hp: LlamaHParams, dtype: str) -> dict:
    if dtype not in DTYPES:
        raise ConvertError(f"--dtype {dtype!r} is not one of {DTYPES}.")
    return dict(
        vocab_size=int(hp.vocab_size), d_model=int(hp.d_model), n_layers=int(hp.n_layers) - 1,
        n_heads=int(hp.n_heads), n_kv_heads=int(hp.n_kv_heads), head_dim=int(hp.head_dim),
        d_ff=int(hp.d_ff), max_seq_len=int(hp.max_seq_len), rope_theta=float(hp.rope_theta),
        norm_eps=float(hp.norm_eps), n_future=1, head_type="transformer",
        tie_embeddings=bool(hp.tie_embeddings), parameter_matched=False, dtype=dtype, param_dtype=dtype)


def config_for(hp: LlamaHParams, name: str, dtype: str, workdir: str | Path):
    """A full config (``base_config()`` schema) whose model section is this Llama."""
    cfg = base_config()
    cfg.name = name
    cfg.workdir = str(workdir)
    cfg.model.update(model_section(hp, dtype))
    cfg.data.vocab_size = cfg.model.vocab_size
    return cfg


def _path_names(path) -> list[str]:
    out = []
    for entry in path:
        for attr in ("key", "name", "idx"):
            if hasattr(entry, attr):
                out.append(str(getattr(entry, attr)))
                break
    return out


def build_params(hp: LlamaHParams, spec, load: Callable[[str, int | None], np.ndarray]):
    """Fill the model's abstract parameter State: ``load(role, layer)`` returns one source tensor
    (HF orientation, float32). Returns ``(graphdef, params)``."""
    graphdef, abstract = abstract_params(spec)
    leaves, treedef = jax.tree_util.tree_flatten_with_path({"params": abstract})
    L = hp.n_layers
    out = []
    for path, leaf in leaves:
        names = _path_names(path)  # ['params', top, ..., 'value']
        top = names[1]
        if top in ("trunk", "heads"):
            role = ".".join(names[2:-1])
            layers = range(L - 1) if top == "trunk" else range(L - 1, L)
            value = np.stack([to_ours(role, load(role, i), hp) for i in layers])
        else:
            role = ".".join(names[1:-1])
            value = to_ours(role, load(role, None), hp)
        if tuple(value.shape) != tuple(leaf.shape):  # a bug here, not in the source file
            raise AssertionError(f"{jax.tree_util.keystr(path)}: built {value.shape}, needs {leaf.shape}")
        out.append(jax.numpy.asarray(value, leaf.dtype))
    return graphdef, jax.tree_util.tree_unflatten(treedef, out)["params"]


# --- the workdir --------------------------------------------------------------------------------
def check_target(workdir: str | Path, force: bool) -> None:
    """Refuse to replace an existing workdir's checkpoints unless ``force``; called before any work."""
    d = Path(workdir)
    if d.exists() and not d.is_dir():
        raise ConvertError(f"--workdir {d} exists and is not a directory.")
    steps = checkpoint_steps(d)
    if steps and not force:
        raise ConvertError(f"--workdir {d} already holds checkpoints {steps}; pass --force to replace"
                           " them (and its config.json and tokenizer) or choose another --workdir.")


def write_workdir(workdir: str | Path, cfg, params, write_tokenizer: Callable[[Path], None],
                  provenance: dict, force: bool) -> Path:
    """Write config.json, the tokenizer, convert.json and checkpoints/0 into a staging directory
    next to ``workdir``, then move them in: a failure leaves ``workdir`` as it was."""
    d = Path(workdir).absolute()
    check_target(d, force)
    d.parent.mkdir(parents=True, exist_ok=True)
    staging = d.parent / f".{d.name}.convert-{os.getpid()}"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    try:
        (staging / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=True))
        write_tokenizer(staging)
        (staging / "convert.json").write_text(json.dumps(provenance, indent=2, sort_keys=True, default=str))
        save_params(staging, params, step=0, meta={"converted_from": provenance.get("source")})
        if not d.exists():
            staging.rename(d)
            return d
        for item in sorted(staging.iterdir()):
            target = d / item.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
            item.rename(target)
        staging.rmdir()
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return d


def progress(total: int, desc: str):
    """A tqdm bar on stderr (when stderr is a terminal)."""
    return tqdm(total=total, desc=desc, unit="tensor", disable=not sys.stderr.isatty(), file=sys.stderr)


def default_name(stem: str) -> str:
    """'SmolLM2-135M-Instruct.Q4_1' -> 'smollm2-135m-instruct' (a trailing tensor-type part goes)."""
    base, _, last = stem.rpartition(".")
    if not (base and re.fullmatch(r"(?i)(i?q\d\w*|[bf]?f\d+|fp\d+|gguf)", last)):
        base = stem
    return re.sub(r"[\s_]+", "-", base.strip()).lower() or "imported"
