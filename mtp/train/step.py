"""The jitted train and eval steps: explicit in/out shardings, donated state, grad accumulation."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from mtp.losses import compute_loss, loss_normalizer
from mtp.model.spec import ModelSpec
from mtp.sharding import activation_rules, constrain


def _to_micro(x_BxT: jax.Array, n_micro: int) -> jax.Array:
    """[B, T] -> [n_micro, B/n_micro, T]; micro-batch a takes rows a, a+n, ... so every
    micro-batch is spread over all batch shards."""
    B = x_BxT.shape[0]
    return jnp.swapaxes(x_BxT.reshape(B // n_micro, n_micro, *x_BxT.shape[1:]), 0, 1)


def _per_head_metrics(prefix_sums: dict, n_future: int, heads=None) -> dict:
    count_N = jnp.maximum(prefix_sums["count"], 1.0)
    loss_N, acc_N = prefix_sums["sum_ce"] / count_N, prefix_sums["sum_correct"] / count_N
    out = {}
    for i in range(n_future) if heads is None else heads:
        out[f"loss/head_{i + 1}"] = loss_N[i]
        out[f"acc/head_{i + 1}"] = acc_N[i]
    return out


def unembed_trains(trainable) -> bool:
    """Whether any of the shared unembedding's inputs (embedding table, untied unembedding, final
    norm) is trainable under ``trainable`` (None: everything trains)."""
    if trainable is None:
        return True
    leaves = jax.tree_util.tree_leaves_with_path(trainable)
    return any(t and str(getattr(p[0], "key", p[0])) in ("embed", "unembed", "final_norm") for p, t in leaves)


def mask_loss_args(cfg) -> dict:
    """``head_type='mask'``'s loss settings (``mtp.losses._loss_masked``)."""
    return {"mask_anchors": int(cfg.loss.get("mask_anchors", 0)),
            "consistency": float(cfg.loss.get("consistency", 0.0))}


def make_train_step(layout, tx, schedule, mesh, rules, cfg, weights_N, batch_sharding, trainable=None,
                    vocab_ids=None):
    """Returns ``step(state, batch) -> (state, metrics)``, jitted over the mesh. ``trainable``
    (bool pytree like the params): frozen leaves are wrapped in stop_gradient, so nothing is
    back-propagated into a frozen trunk (its activations are computed once, forward only); a
    frozen unembedding gets no gradient computed, and heads with loss weight 0 are not run (no
    metrics are logged for them). ``vocab_ids``: heads 2..n learn over these tokens only
    (``loss.draft_vocab``; ``mtp.losses.loss_scan``)."""
    graphdef, n_future = layout.graphdef, cfg.model.n_future
    impl, chunk, n_micro = cfg.loss.impl, cfg.loss.chunk_size, cfg.train.grad_accum
    targets = cfg.loss.targets
    active = tuple(int(i) for i in np.flatnonzero(np.asarray(weights_N) != 0)) or None  # None: all
    train_unembed = unembed_trains(trainable)
    weights_N = jnp.asarray(weights_N)
    spec, mask_args = ModelSpec.from_config(cfg.model), mask_loss_args(cfg)

    def loss_fn(params, tokens_BxT, segment_ids_BxT, normalizer_N):
        if trainable is not None:
            params = jax.tree.map(lambda t, p: p if t else jax.lax.stop_gradient(p), trainable, params)
        model = nnx.merge(graphdef, params)
        return compute_loss(impl, model, tokens_BxT, segment_ids_BxT, weights_N, normalizer_N, chunk,
                            targets, active, train_unembed, vocab_ids, **mask_args)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state, batch):
        with activation_rules(mesh, rules):
            tokens_BxT, segment_ids_BxT = batch["tokens"], batch["segment_ids"]
            normalizer_N = loss_normalizer(spec, tokens_BxT, segment_ids_BxT, mask_args["mask_anchors"])
            params = state["params"]
            if n_micro == 1:
                (loss, aux), grads = grad_fn(params, tokens_BxT, segment_ids_BxT, normalizer_N)
            else:
                def micro(grads_acc, mb):
                    tok = constrain(mb[0], ("batch", "seq"))
                    seg = constrain(mb[1], ("batch", "seq"))
                    (loss, aux), g = grad_fn(params, tok, seg, normalizer_N)
                    return jax.tree.map(jnp.add, grads_acc, g), (loss, aux)

                zeros = jax.tree.map(jnp.zeros_like, params)
                grads, (losses, auxs) = jax.lax.scan(
                    micro, zeros, (_to_micro(tokens_BxT, n_micro), _to_micro(segment_ids_BxT, n_micro)))
                loss, aux = losses.sum(), jax.tree.map(lambda x: x.sum(0), auxs)
            grad_norm = optax.tree.norm(grads)
            updates, opt_state = tx.update(grads, state["opt_state"], params)
            new_state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state,
                         "step": state["step"] + 1}
            metrics = {"loss/total": loss, "grad_norm": grad_norm, "lr": schedule(state["step"]),
                       **_per_head_metrics(aux, n_future, active)}
            return new_state, metrics

    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sh = {"tokens": batch_sharding, "segment_ids": batch_sharding}
    return jax.jit(step, in_shardings=(layout.shardings, batch_sh),
                   out_shardings=(layout.shardings, replicated), donate_argnums=(0,))


def make_eval_step(layout, mesh, rules, cfg, batch_sharding):
    """Returns ``eval_step(params, batch) -> per-head sums`` (sum_ce, sum_correct, count)."""
    graphdef, n_future = layout.graphdef, cfg.model.n_future
    weights_N = jnp.ones((n_future,), jnp.float32)

    def eval_step(params, batch):
        with activation_rules(mesh, rules):
            model = nnx.merge(graphdef, params)
            _, aux = compute_loss(cfg.loss.impl, model, batch["tokens"], batch["segment_ids"],
                                  weights_N, jnp.ones((n_future,)), cfg.loss.chunk_size,
                                  cfg.loss.targets, **mask_loss_args(cfg))
            return aux

    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sh = {"tokens": batch_sharding, "segment_ids": batch_sharding}
    return jax.jit(eval_step, in_shardings=(layout.shardings["params"], batch_sh),
                   out_shardings=replicated)
