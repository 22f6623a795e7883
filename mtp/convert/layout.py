"""Where each parameter of an MTP model lives in an export: one table, read both ways.

``mtp export`` writes every placement and ``mtp convert --hf`` (a directory holding
``mtp_config.json``) reads every placement back, so the two directions cannot disagree.

- The Llama checkpoint (``file='llama'``, Hugging Face names): the embedding, trunk layer ``i`` as
  ``model.layers.{i}``, head 1's transformer layer (head types 'transformer' and 'causal') as
  ``model.layers.{trunk_layers}``, the shared final norm and the untied ``lm_head``. This is the
  inverse of ``mtp.convert.llama_map``, which makes a Llama's last layer head 1.
- The sidecar (``file='heads'``, ``mtp_heads.safetensors``): head ``k`` (1-based, k >= 2; head k
  predicts token t+k) as ``mtp.head.{k}.`` + the Llama layer suffix (``self_attn.q_proj.weight``,
  ...); 'causal' heads add ``mtp.head.{k}.combine.weight`` ``[D, 2D]`` (input: ``[hnorm(h) ;
  enorm(e)]``), ``hnorm.weight`` and ``enorm.weight``; 'linear' / 'medusa' heads (every head,
  head 1 included) are ``mtp.head.{k}.proj.weight`` ``[D, D]`` (+ ``proj.bias``); a learned hidden
  mix is ``mtp.mix_logits`` ``[n_future, trunk_layers + 1]``.

Matrices are stored as Hugging Face / torch ``Linear`` weights, ``[out, in]``; vectors as they are.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections import defaultdict
from collections.abc import Callable

import jax
import numpy as np

from mtp.convert.llama_map import GGUF_NAMES, HF_NAMES, LAYER_ROLES, ConvertError, LlamaHParams, check_shape
from mtp.model import abstract_params
from mtp.model.heads import head_kind
from mtp.model.spec import ModelSpec

SIDECAR_TENSORS = "mtp_heads.safetensors"
SIDECAR_CONFIG = "mtp_config.json"
SIDECAR_FORMAT = "mtp-heads"
SIDECAR_VERSION = 1

# roles stored as they are (no transpose): embeddings, norm scales, biases, mix logits
_AS_IS = ("embed", "final_norm.scale", "attn_norm.scale", "mlp_norm.scale", "b", "causal_h_norm",
          "causal_e_norm", "mix_logits")
_CAUSAL = {"causal_proj": "combine.weight", "causal_h_norm": "hnorm.weight", "causal_e_norm": "enorm.weight"}
_SIMPLE = {"w": "proj.weight", "b": "proj.bias"}


@dataclasses.dataclass(frozen=True)
class Placement:
    """One slot of one parameter and the tensor that holds it."""

    key: str  # our flat checkpoint key, e.g. "['params']['trunk']['attn']['wq'].value"
    slot: int | None  # index on the stacked leading axis (trunk layer / head); None: the whole array
    file: str  # 'llama' (the Llama checkpoint) or 'heads' (the sidecar)
    name: str  # Hugging Face-style tensor name in that file
    role: str  # a LAYER_ROLES / GLOBAL_ROLES name, or a sidecar role ('w', 'causal_proj', ...)
    shape: tuple[int, ...]  # our shape of this slot

    @property
    def in_dims(self) -> int:
        """Leading axes of our array that are the matmul input (0: stored as it is)."""
        return 0 if self.role in _AS_IS else 2 if self.role == "attn.wo" else 1

    @property
    def file_shape(self) -> tuple[int, ...]:
        if not self.in_dims:
            return self.shape
        return (math.prod(self.shape[self.in_dims:]), math.prod(self.shape[:self.in_dims]))

    def to_file(self, w: np.ndarray) -> np.ndarray:
        """Our slot -> the stored tensor ([out, in] for matrices)."""
        if not self.in_dims:
            return np.ascontiguousarray(w)
        return np.ascontiguousarray(w.reshape(math.prod(self.shape[:self.in_dims]), -1).T)

    def from_file(self, w: np.ndarray) -> np.ndarray:
        """The stored tensor -> our slot (exact: transposes and reshapes only)."""
        return w if not self.in_dims else w.T.reshape(self.shape)

    @property
    def gguf_name(self) -> str:
        """The GGUF name: llama.cpp's for the Llama part (``blk.{i}.attn_q.weight``), the same suffix
        for the sidecar's layers (``mtp.head.{k}.attn_q.weight``), other sidecar names unchanged."""
        if self.role in LAYER_ROLES:
            index = self.name.split(".")[2]  # model.layers.{i}.* / mtp.head.{k}.*
            name = GGUF_NAMES[self.role].format(i=index)
            return name if self.file == "llama" else f"mtp.head.{index}.{name.split('.', 2)[2]}"
        return GGUF_NAMES[self.role] if self.file == "llama" else self.name


def key_parts(key: str) -> list[str]:
    """``"['params']['trunk']['attn']['wq'].value"`` -> ``['trunk', 'attn', 'wq']``."""
    parts = re.findall(r"\['([^']+)'\]", key)
    return parts[1:] if parts[:1] == ["params"] else parts


def head1_in_llama(spec) -> bool:
    """Head 1 is a transformer layer (exported as the Llama's last layer) for these head types."""
    return head_kind(spec).layer


def llama_layers(spec) -> int:
    return spec.trunk_layers + int(head1_in_llama(spec))


def _layer_suffix(role: str) -> str:
    return HF_NAMES[role].split("}.", 1)[1]  # 'model.layers.{i}.self_attn.q_proj.weight' -> 'self_attn...'


def place(spec, shapes: dict[str, tuple[int, ...]]) -> tuple[list[Placement], list[str]]:
    """Placements of the parameters ``shapes`` (flat key -> shape) of a model of ``spec``, and the
    keys this table has no place for (an export must refuse those rather than drop them)."""
    out: list[Placement] = []
    unplaced: list[str] = []
    for key, shape in shapes.items():
        shape = tuple(int(s) for s in shape)
        parts = key_parts(key)
        top, rest = parts[0], ".".join(parts[1:])
        n = shape[0] if shape else 0
        if top == "trunk" and rest in LAYER_ROLES:
            out += [Placement(key, i, "llama", HF_NAMES[rest].format(i=i), rest, shape[1:]) for i in range(n)]
        elif top == "heads" and head_kind(spec).layer and rest in LAYER_ROLES:
            out.append(Placement(key, 0, "llama", HF_NAMES[rest].format(i=spec.trunk_layers), rest, shape[1:]))
            out += [Placement(key, j, "heads", f"mtp.head.{j + 1}.{_layer_suffix(rest)}", rest, shape[1:])
                    for j in range(1, n)]
        elif top == "heads" and not head_kind(spec).layer and rest in _SIMPLE:
            out += [Placement(key, j, "heads", f"mtp.head.{j + 1}.{_SIMPLE[rest]}", rest, shape[1:])
                    for j in range(n)]
        elif len(parts) == 1 and top in _CAUSAL:
            out += [Placement(key, j, "heads", f"mtp.head.{j + 2}.{_CAUSAL[top]}", top, shape[1:])
                    for j in range(n)]
        elif len(parts) == 1 and top == "mix_logits":
            out.append(Placement(key, None, "heads", "mtp.mix_logits", "mix_logits", shape))
        elif ".".join(parts) in ("embed", "final_norm.scale", "unembed"):
            out.append(Placement(key, None, "llama", HF_NAMES[".".join(parts)], ".".join(parts), shape))
        else:
            unplaced.append(key)
    return out, unplaced


# --- reading an export back (mtp convert --hf / --gguf) --------------------------------------------
def sidecar_spec(side: dict, hp: LlamaHParams, where: str) -> ModelSpec:
    """The model an export describes (``mtp_config.json`` / GGUF ``mtp.config``), checked against the
    Llama part's hyperparameters ``hp``."""
    if side.get("format") != SIDECAR_FORMAT or int(side.get("version", 0)) > SIDECAR_VERSION:
        raise ConvertError(f"{where}: format {side.get('format')!r} version {side.get('version')!r}; this mtp"
                           f" reads {SIDECAR_FORMAT!r} up to version {SIDECAR_VERSION}.")
    try:
        spec = ModelSpec.from_config(dict(side.get("model") or {}))
    except TypeError as e:
        raise ConvertError(f"{where}: the model section is not an mtp model config ({e})") from None
    ours = {"vocab_size": spec.vocab_size, "d_model": spec.d_model, "n_heads": spec.n_heads,
            "n_kv_heads": spec.n_kv_heads, "d_ff": spec.resolved_d_ff, "max_seq_len": spec.max_seq_len,
            "rope_theta": spec.rope_theta, "norm_eps": spec.norm_eps, "tie_embeddings": spec.tie_embeddings,
            "head_dim": spec.resolved_head_dim, "n_layers": llama_layers(spec)}
    # GGUF stores theta and eps as float32: compare at that precision (the spec keeps the exact values)
    same = lambda a, b: np.float32(a) == np.float32(b) if isinstance(b, float) else a == b  # noqa: E731
    diff = {k: (getattr(hp, k), v) for k, v in ours.items() if not same(getattr(hp, k), v)}
    if diff:
        raise ConvertError(f"{where} describes another model than the Llama beside it (key: (Llama, MTP"
                           f" description)): {diff}")
    return spec


def _abstract_leaves(spec: ModelSpec):
    _, abstract = abstract_params(spec)
    return jax.tree_util.tree_flatten_with_path({"params": abstract})


def placements_of(spec: ModelSpec, where: str) -> list[Placement]:
    leaves, _ = _abstract_leaves(spec)
    placements, unplaced = place(spec, {jax.tree_util.keystr(p): leaf.shape for p, leaf in leaves})
    if unplaced:
        raise ConvertError(f"{where}: no tensor of an export holds parameter(s) {unplaced}")
    return placements


def check_heads_tensors(placements: list[Placement], shapes: dict[str, tuple], file: str | None,
                        name: Callable[[Placement], str]) -> None:
    """The heads file holds exactly the sidecar placements' tensors, each of its shape ([out, in])."""
    want = {name(p): p for p in placements if p.file == "heads"}
    for n, p in want.items():
        if n not in shapes:
            raise ConvertError(f"missing tensor {n} (shape {p.file_shape}) in the MTP heads file {file}")
        check_shape(n, shapes[n], p.file_shape)
    for n in shapes:
        if n not in want:
            raise ConvertError(f"unexpected tensor {n} in the MTP heads file {file}: the model it describes has"
                               " no place for it")


def assemble_params(spec: ModelSpec, placements: list[Placement], load: Callable[[Placement], np.ndarray]):
    """The model's parameter State from ``load(placement)`` (the stored tensor, float32)."""
    leaves, treedef = _abstract_leaves(spec)
    by_key = defaultdict(list)
    for p in placements:
        by_key[p.key].append(p)
    values = []
    for path, leaf in leaves:
        parts = sorted(by_key[jax.tree_util.keystr(path)], key=lambda p: -1 if p.slot is None else p.slot)
        slots = [p.from_file(load(p)) for p in parts]
        value = slots[0] if parts[0].slot is None else np.stack(slots)
        values.append(jax.numpy.asarray(value, leaf.dtype))
    return jax.tree_util.tree_unflatten(treedef, values)["params"]
