"""AdamW with linear warmup + cosine decay, global-norm clipping, optional frozen parameters."""

from __future__ import annotations

import jax
import optax


def lr_schedule(optim_cfg, total_steps: int) -> optax.Schedule:
    warmup = min(optim_cfg.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=optim_cfg.lr, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1), end_value=optim_cfg.lr * optim_cfg.min_lr_ratio)


def _decay_mask(params):
    """Weight decay on matrices only: not on norm scales, biases (Medusa heads' ``b``) or the hidden
    mix logits (decay would pull the mix toward uniform)."""
    def keep(path, _):
        names = [str(getattr(k, "key", k)) for k in path]
        return not any("norm" in n or n in ("b", "mix_logits") for n in names)
    return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(optim_cfg, total_steps: int, trainable=None, update_scale=None) -> optax.GradientTransformation:
    """``trainable``: optional bool pytree (like params); False leaves are frozen (no update).
    ``update_scale``: optional pytree of arrays broadcast against each parameter that multiply its
    final update (0 freezes a slice, e.g. one head of the stacked heads, weight decay included)."""
    tx = optax.chain(
        optax.clip_by_global_norm(optim_cfg.clip_norm),
        optax.adamw(lr_schedule(optim_cfg, total_steps), b1=optim_cfg.b1, b2=optim_cfg.b2,
                    eps=optim_cfg.eps, weight_decay=optim_cfg.weight_decay, mask=_decay_mask,
                    mu_dtype=optim_cfg.get("mu_dtype") or None),
    )
    if trainable is not None:
        labels = jax.tree.map(lambda t: "train" if t else "freeze", trainable)
        tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
    if update_scale is not None:
        scale = optax.stateless(lambda updates, params=None: jax.tree.map(lambda u, s: u * s, updates,
                                                                          update_scale))
        tx = optax.chain(tx, scale)
    return tx
