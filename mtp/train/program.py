"""The train program: everything a train step is built from, assembled in one place.

``build_program(cfg)`` turns a validated config into the model spec, mesh, logical-axis rules,
optimizer (with its frozen groups), sharded state layout and the jitted train and eval steps.
``mtp train``, ``mtp bench train`` and ``mtp plan`` all call it and add only what they need (a
data pipeline and checkpoints; random batches and a timer; abstract inputs and a compiler), so what
is trained, benchmarked and planned is the same program.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import Mesh

from mtp.config import check_kernel_seq_len, head_weights, rules_from_config
from mtp.model import abstract_params
from mtp.model.attention import resolve_attention
from mtp.model.spec import ModelSpec
from mtp.sharding import batch_sharding, make_mesh
from mtp.train.init_from import trainable_masks
from mtp.train.optim import lr_schedule, make_optimizer
from mtp.train.state import StateLayout, make_layout
from mtp.train.step import make_eval_step, make_train_step


@dataclasses.dataclass
class TrainProgram:
    """A config's train step and what it is made of (one object, shared by train/bench/plan)."""

    cfg: object  # the ml_collections config it was built from
    spec: ModelSpec
    mesh: Mesh  # a concrete Mesh, or an AbstractMesh for planning
    rules: tuple
    tx: object  # optax GradientTransformation
    schedule: Callable
    layout: StateLayout
    init: Callable  # init() -> fresh sharded state; init(params) -> state around given params
    batch_sharding: object
    head_weights_N: np.ndarray
    trainable: object  # bool pytree like the params (None: everything trains)
    update_scale: object  # per-leaf update scale pytree, or None
    train_step: Callable  # jitted (state, batch) -> (state, metrics)
    eval_step: Callable  # jitted (params, batch) -> per-head sums

    def abstract_batch(self) -> dict:
        """ShapeDtypeStructs of one global batch (for lowering without data)."""
        t = self.cfg.train
        x = jax.ShapeDtypeStruct((t.batch_size, t.seq_len), np.int32, sharding=self.batch_sharding)
        return {"tokens": x, "segment_ids": x}

    def lower(self, **kwargs):
        """The train step lowered on abstract state and batch (``kwargs`` go to ``trace().lower``)."""
        return self.train_step.trace(self.layout.abstract, self.abstract_batch()).lower(**kwargs)


def build_program(cfg, mesh: Mesh | None = None, *, n_source_heads: int = 0,
                  lower_for: str | None = None, token_order=None) -> TrainProgram:
    """The train program of ``cfg`` (already validated) on ``mesh`` (default: ``cfg.mesh`` over
    this process's devices). ``n_source_heads``: heads the init.workdir model already has, which
    ``train.trainable='new_heads'`` keeps frozen. ``lower_for``: a platform ('tpu', 'cuda') the
    program is only lowered for: ``model.attention`` is resolved for it instead of this backend
    (a choice the platform cannot run is refused here, before anything compiles). ``token_order``:
    the train split's token ids, most frequent first (``loss.draft_vocab`` takes its first N; without
    it, as for benchmarks and plans, the first N ids: the same cost)."""
    spec = ModelSpec.from_config(cfg.model)
    attention = resolve_attention(spec.attention, lower_for, interpret=spec.attention_interpret,
                                  lowering=lower_for is not None)
    check_kernel_seq_len(attention, cfg.train.seq_len)
    spec = dataclasses.replace(spec, attention=attention)
    mesh = make_mesh(cfg.mesh) if mesh is None else mesh
    rules = rules_from_config(cfg.sharding.rules)
    t = cfg.train
    model_abstract = abstract_params(spec, cfg.seed)
    trainable, update_scale = trainable_masks(model_abstract[1], t.trainable, n_source_heads,
                                              spec.n_future, cfg.optim.backbone_lr_scale)
    tx = make_optimizer(cfg.optim, t.steps, trainable, update_scale)
    schedule = lr_schedule(cfg.optim, t.steps)
    layout, init = make_layout(spec, tx, mesh, rules, cfg.seed, model_abstract)
    batch_sh = batch_sharding(mesh, rules)
    weights_N = head_weights(cfg.loss, spec.n_future)
    vocab_ids = None
    if cfg.loss.draft_vocab and cfg.loss.draft_vocab < spec.vocab_size:
        order = np.arange(spec.vocab_size) if token_order is None else np.asarray(token_order)
        vocab_ids = np.sort(order[: cfg.loss.draft_vocab]).astype(np.int32)
    train_step = make_train_step(layout, tx, schedule, mesh, rules, cfg, weights_N, batch_sh, trainable,
                                 vocab_ids)
    eval_step = make_eval_step(layout, mesh, rules, cfg, batch_sh)
    return TrainProgram(cfg, spec, mesh, rules, tx, schedule, layout, init, batch_sh, np.asarray(weights_N),
                        trainable, update_scale, train_step, eval_step)
