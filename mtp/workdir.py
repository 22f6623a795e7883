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
from pathlib import Path

import jax
import ml_collections
from flax import nnx

from mtp.model import MTPLM
from mtp.model.spec import ModelSpec

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
    from mtp.config import base_config

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
        from mtp.data.hf_tokenizer import HFTokenizer

        return HFTokenizer(d / "tokenizer.json")
    if (d / "tokenizer.model").exists():
        from mtp.data.tokenizer import Tokenizer

        return Tokenizer(d / "tokenizer.model")
    if (d / "tokenizer.bytes").exists():
        from mtp.data.byte_tokenizer import ByteTokenizer

        return ByteTokenizer()
    raise WorkdirError(f"{d} has no tokenizer (tokenizer.json, tokenizer.model or tokenizer.bytes);"
                       " it was not written by `mtp train` or `mtp convert`.")


def checkpoint_steps(workdir: str | Path) -> list[int]:
    d = Path(workdir) / "checkpoints"
    return sorted(int(p.name) for p in d.glob("*") if p.name.isdigit()) if d.exists() else []


def restore_flat(workdir: str | Path, step: int | None = None) -> tuple[dict, int]:
    """The saved flat state dict of ``step`` (default: newest) as host arrays."""
    import orbax.checkpoint as ocp

    steps = checkpoint_steps(workdir)
    if not steps:
        raise WorkdirError(f"{workdir}/checkpoints holds no checkpoint: train first"
                           f" (`mtp train --workdir {workdir}`) or convert a model into it.")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise WorkdirError(f"{workdir} has no checkpoint at step {step}; it has {steps}.")
    mgr = ocp.CheckpointManager(Path(workdir).absolute() / "checkpoints", item_names=("state",))
    out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
    mgr.close()
    return dict(out["state"]), step


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


def abstract_params(spec: ModelSpec):
    abstract_model = nnx.eval_shape(lambda: MTPLM(spec, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(abstract_model, nnx.Param)
    return graphdef, params


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
    from mtp.train.checkpoint import Checkpointer

    ckpt = Checkpointer(Path(workdir) / "checkpoints", keep=1, async_save=False)
    ckpt.save(step, {"params": params, "step": jax.numpy.asarray(step, jax.numpy.int32)},
              meta=meta or {}, force=True)
    ckpt.close()
