"""A workdir is what every command reads and writes:

    DIR/config.json            the full config (``cfg.to_dict()``); ``model`` builds the ModelSpec
    DIR/tokenizer.model        SentencePiece model (trained here), or
    DIR/tokenizer.json         Hugging Face ``tokenizers`` file (imported models), or
    DIR/tokenizer.bytes        byte-level tokenizer marker (no file needed to encode)
    DIR/checkpoints/<step>/    Orbax: item ``state`` = flat ``{"['params'][...].value": array, ...}``

``mtp train`` writes all of it; ``mtp convert`` writes a checkpoint holding only ``params`` (step 0).
``load_model(DIR)`` gives back the config, the model with its parameters and the tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import jax
import ml_collections
from flax import nnx

from mtp.config import base_config
from mtp.data.byte_tokenizer import ByteTokenizer
from mtp.data.hf_tokenizer import HFTokenizer
from mtp.data.tokenizer import Tokenizer
from mtp.model import MTPLM, abstract_params
from mtp.model.spec import ModelSpec
from mtp.train.checkpoint import Checkpointer, save_json

PARAMS_PREFIX = "['params']"


class WorkdirError(ValueError):
    """A workdir that cannot be used; the message names what is missing and how to make it."""


@dataclasses.dataclass
class LoadedModel:
    cfg: ml_collections.ConfigDict
    spec: ModelSpec
    model: MTPLM
    tokenizer: object  # encode(text)->ids, decode(ids)->text, vocab_size, bos_id, eos_id, pad_id
    step: int
    workdir: Path | None = None  # where it was loaded from (derived caches such as draft trees go there)


def load_config_json(workdir: str | Path) -> ml_collections.ConfigDict:
    path = Path(workdir) / "config.json"
    if not path.exists():
        raise WorkdirError(f"{workdir} has no config.json: it is not an mtp workdir. Create one with"
                           " `mtp train --workdir DIR` or `mtp convert --gguf FILE --workdir DIR`.")
    cfg = base_config()
    saved = json.loads(path.read_text())
    cfg.unlock()
    for section, values in saved.items():
        if isinstance(values, dict) and section in cfg:
            for k, v in values.items():
                cfg[section][k] = tuple(v) if isinstance(v, list) else v
        else:
            cfg[section] = values
    return cfg


def load_tokenizer(workdir: str | Path):
    d = Path(workdir)
    if (d / "tokenizer.json").exists():
        return HFTokenizer(d / "tokenizer.json")
    if (d / "tokenizer.model").exists():
        return Tokenizer(d / "tokenizer.model")
    if (d / "tokenizer.bytes").exists():
        return ByteTokenizer()
    raise WorkdirError(f"{d} has no tokenizer (tokenizer.json, tokenizer.model or tokenizer.bytes);"
                       " it was not written by `mtp train` or `mtp convert`.")


def checkpoint_steps(workdir: str | Path) -> list[int]:
    d = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.glob("*") if p.name.isdigit()) if d.exists() else []


def restore_flat(workdir: str | Path, step: int | None = None) -> tuple[dict, int]:
    """The saved flat state dict of ``step`` (default: the newest readable one) as host arrays,
    through the one checkpoint reader (damaged checkpoints are skipped with a warning, left in place)."""
    steps = checkpoint_steps(workdir)
    if not steps:
        raise WorkdirError(f"{workdir}/checkpoints holds no checkpoint: train first"
                           f" (`mtp train --workdir {workdir}`) or convert a model into it.")
    if step is not None and step not in steps:
        raise WorkdirError(f"{workdir} has no checkpoint at step {step}; it has {steps}.")
    ckpt = Checkpointer(Path(workdir).absolute() / "checkpoints", async_save=False, create=False)
    try:
        return ckpt.read_newest_flat(step)
    finally:
        ckpt.close()


# --- a training run's files -------------------------------------------------------------------
# Keys that may differ when a run resumes: where and how often it reports, how long it runs, and
# the mesh it runs on (checkpoints restore onto any mesh). Everything else shapes the state, the
# data order or the optimization, and must match the run that wrote the checkpoints.
RESUMABLE_KEYS = ("name", "workdir", "train.steps", "train.log_every", "train.eval_every",
                  "train.eval_batches", "train.checkpoint_every", "train.keep_checkpoints",
                  "train.tensorboard", "train.log_data_hashes", "train.calibrate", "data.cache_dir", "mesh.",
                  "sharding.", "perf.")


def resolve_workdir(cfg) -> Path:
    return Path(cfg.workdir or f"runs/{cfg.name}").absolute()


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_resumable(workdir: Path, cfg) -> None:
    """Refuse (naming the keys) to continue a workdir's run with a config that differs where it
    matters; nothing is read or written beyond ``config.json``."""
    path = Path(workdir) / "config.json"
    if not path.exists():
        return
    try:
        saved = _flat(json.loads(path.read_text()))
    except (OSError, ValueError) as e:
        raise WorkdirError(f"{path} cannot be read ({e}); restore it from the run's first config or use a new"
                           " --workdir.") from None
    now = _flat(json.loads(json.dumps(cfg.to_dict(), default=str)))
    # keys the saved run did not have yet (added to the schema later) keep their defaults
    diff = {k: (saved[k], v) for k, v in now.items()
            if k in saved and saved[k] != v and not any(k == r or (r.endswith(".") and k.startswith(r))
                                                        for r in RESUMABLE_KEYS)}
    if diff:
        keys = ", ".join(f"{k} (saved {a!r}, now {b!r})" for k, (a, b) in sorted(diff.items()))
        raise WorkdirError(
            f"{workdir} holds a run with a different config: {keys}. Nothing was changed. Resume with the"
            f" saved values (see {path}), or pass a new --workdir for a run with these settings.")


def check_writable(workdir: Path) -> None:
    """Create the workdir (an empty directory blocks nothing) and prove a file can be written there,
    before any data is prepared."""
    probe = Path(workdir) / ".mtp-write-test"
    try:
        Path(workdir).mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise WorkdirError(f"Cannot write to the workdir {workdir} ({e.strerror or e}). Fix: pass a --workdir"
                           " on a writable file system, or fix its permissions.") from None


def ever_checkpointed(workdir: Path) -> bool:
    """Whether the workdir's run got as far as a checkpoint (readable or moved aside as damaged)."""
    d = Path(workdir) / "checkpoints"
    return d.exists() and any(p.name.isdigit() or ".damaged-" in p.name or ".unreadable-" in p.name
                              for p in d.iterdir())


def write_run_files(workdir: Path, cfg, tokenizer) -> None:
    """``config.json`` and the tokenizer, written by process 0 once a run has started."""
    if jax.process_index() != 0:
        return
    workdir.mkdir(parents=True, exist_ok=True)
    save_json(workdir / "config.json", cfg.to_dict())
    if tokenizer.path is None:  # the byte tokenizer: an empty marker file names it
        (workdir / "tokenizer.bytes").touch()
    elif tokenizer.path.name == "tokenizer.json":  # an imported model's tokenizer + sidecar
        for name in ("tokenizer.json", "tokenizer_config.json"):
            if (tokenizer.path.parent / name).exists():
                shutil.copy(tokenizer.path.parent / name, workdir / name)
    else:
        shutil.copy(tokenizer.path, workdir / "tokenizer.model")


def params_from_flat(flat: dict, abstract_params) -> nnx.State:
    """Fill ``abstract_params`` (an nnx.State of ShapeDtypeStructs) from a flat checkpoint dict;
    a missing key or a wrong shape is an error that names the parameter."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path({"params": abstract_params})
    out = []
    for path, abstract in leaves:
        key = jax.tree_util.keystr(path)
        if key not in flat:
            raise WorkdirError(f"The checkpoint lacks parameter {key}: it was written for another"
                               " model config than config.json describes.")
        value = flat[key]
        if tuple(value.shape) != tuple(abstract.shape):
            raise WorkdirError(f"Parameter {key} has shape {tuple(value.shape)} in the checkpoint but"
                               f" the config needs {tuple(abstract.shape)}.")
        out.append(jax.numpy.asarray(value, abstract.dtype))
    return jax.tree_util.tree_unflatten(treedef, out)["params"]


def load_model(workdir: str | Path, step: int | None = None) -> LoadedModel:
    """Config, model (parameters from the newest or given checkpoint) and tokenizer of a workdir."""
    cfg = load_config_json(workdir)
    spec = ModelSpec.from_config(cfg.model)
    tokenizer = load_tokenizer(workdir)
    flat, step = restore_flat(workdir, step)
    graphdef, abstract = abstract_params(spec)
    params = params_from_flat(flat, abstract)
    return LoadedModel(cfg, spec, nnx.merge(graphdef, params), tokenizer, step, Path(workdir))


def save_params(workdir: str | Path, params: nnx.State, step: int = 0, meta: dict | None = None) -> None:
    """Write ``params`` as checkpoint ``step`` in the layout ``load_model`` reads (``mtp convert``)."""
    ckpt = Checkpointer(Path(workdir) / "checkpoints", keep=1, async_save=False)
    ckpt.save(step, {"params": params, "step": jax.numpy.asarray(step, jax.numpy.int32)},
              meta=meta or {}, force=True)
    ckpt.close()
