"""The train state as a plain pytree ``{params, opt_state, step}``, created directly sharded.

The model's graph definition stays outside jit; inside, ``nnx.merge(graphdef, params)`` rebuilds
the module, so every jitted function works on pure pytrees with explicit shardings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mtp.model import MTPLM
from mtp.model import abstract_params as model_abstract_params
from mtp.model.spec import ModelSpec
from mtp.sharding import param_shardings


@dataclasses.dataclass
class StateLayout:
    """What the trainer needs to build, shard and rebuild the train state."""

    graphdef: nnx.GraphDef
    abstract: dict  # ShapeDtypeStructs of {params, opt_state, step}
    shardings: dict  # NamedShardings, same structure


def _opt_state_shardings(abstract_opt, params_treedef, params_shardings, replicated):
    """Each optimizer subtree shaped like the params (Adam's mu, nu) gets the params' shardings."""
    def is_params_like(x):
        return jax.tree.structure(x) == params_treedef
    return jax.tree.map(lambda x: params_shardings if is_params_like(x) else replicated,
                        abstract_opt, is_leaf=is_params_like)


def make_layout(spec: ModelSpec, tx, mesh: Mesh, rules, seed: int,
                model_abstract=None) -> tuple[StateLayout, Callable[[], dict]]:
    """Abstract state + shardings, and an ``init()`` that materializes it already sharded.
    ``model_abstract``: ``model.abstract_params(spec, seed)`` when the caller has it already."""
    graphdef, abstract_params = model_abstract or model_abstract_params(spec, seed)
    params_sh = param_shardings(abstract_params, mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_sh = _opt_state_shardings(abstract_opt, jax.tree.structure(abstract_params), params_sh,
                                  replicated)
    abstract = {"params": abstract_params, "opt_state": abstract_opt,
                "step": jax.ShapeDtypeStruct((), jnp.int32)}
    shardings = {"params": params_sh, "opt_state": opt_sh, "step": replicated}

    def init_fn(params=None):
        if params is None:
            params = nnx.state(MTPLM(spec, rngs=nnx.Rngs(seed)), nnx.Param)
        return {"params": params, "opt_state": tx.init(params), "step": jnp.zeros((), jnp.int32)}

    # init() draws every parameter; init(params) (e.g. a pretrained model's, already merged) only
    # builds the optimizer state around them, so nothing random is compiled.
    return StateLayout(graphdef, abstract, shardings), jax.jit(init_fn, out_shardings=shardings)


def fresh_params(spec: ModelSpec, seed: int, wanted) -> list:
    """The random init of the parameter leaves flagged in ``wanted`` (a list of bools in tree order):
    the same values ``init()`` draws for them, but only their random draws are compiled (XLA drops
    the rest), which matters when a pretrained model supplies everything else."""

    def draw():
        leaves = jax.tree.leaves(nnx.state(MTPLM(spec, rngs=nnx.Rngs(seed)), nnx.Param))
        return [x for x, w in zip(leaves, wanted, strict=True) if w]

    return jax.jit(draw)() if any(wanted) else []
