"""Per-head evaluation of a trained MTP model on held-out data: loss, top-1/top-5 accuracy and the
offline acceptance rate of each head's drafts.

Definitions (positions ``t`` of held-out rows; head ``k`` at ``t`` predicts token ``t+k``; a position
counts for head ``k`` where its target is valid: ``t+k`` inside the row and the same document,
``mtp.losses.head_targets``):

- ``loss``: mean cross-entropy of head ``k`` (nats); ``top1`` / ``top5``: the target is the
  argmax / among the 5 highest logits (ties count for the target, as in training's accuracy).
- greedy continuation: ``g_1(t) = argmax head_1(t)`` and ``g_j(t)`` = the argmax of head 1 after
  the TRUE prefix ``x_0..x_t`` (its own document only) followed by ``g_1(t), ..., g_{j-1}(t)``:
  the tokens the model itself would generate greedily ``j-1`` steps after ``t``.
- ``acceptance`` of head ``k >= 2``: ``P_t[argmax head_k(t) == g_k(t)]``: how often head ``k``'s
  draft is what the model would generate ``k-1`` steps later. Head 1 has none (it is ``g_1``).
- ``chain`` of head ``k``: ``P_t[heads 2..k all accepted at t]``: in greedy self-speculative
  (blockwise parallel) decoding, draft ``k`` is kept exactly when drafts ``2..k`` all agree with the
  greedy continuation, so ``tokens_per_forward = 1 + sum_{k>=2} chain_k`` is the expected number
  of tokens each verify forward yields (over true-data prefixes, not the model's own text).

Sequential heads (``head_type='causal'``): head ``k``'s draft here comes from the teacher-forced
forward, whose input at ``t`` is the TRUE token ``x_{t+k-1}`` where decoding feeds the drafts before
it; their acceptance and tokens per forward are therefore optimistic estimates (``mtp bench decode``
measures the real ones).

The greedy continuations are exact, for every position at once: forward ``j`` (``j = 1..n-1``)
runs the model over ``[x, g_1, ..., g_j]`` (``(j+1)*T`` tokens) with a tree attention mask — the
copy of ``g_i(t)`` sits at RoPE position ``pos(t)+i`` and attends to ``x``'s prefix up to ``t`` in
its document plus ``g_1(t)..g_i(t)`` — and reads head 1's argmax on the last block. So ``n-1``
extra batched forwards, no per-position loop.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mtp.data.corpus import build_corpus
from mtp.data.pipeline import make_dataset
from mtp.losses import head_targets
from mtp.model.transformer import attention_mask, positions_from_segments, scan_blocks

TOPK = 5


def _tree_mask(segment_ids_BxT: jax.Array, levels: int) -> jax.Array:
    """Attention mask ``[B, 1, L, L]`` over ``levels`` blocks of T tokens (block 0 = the row,
    block i = the i-th greedy token after every position); see the module docstring."""
    T = segment_ids_BxT.shape[1]
    lvl_L = np.repeat(np.arange(levels), T)
    t_L = np.tile(np.arange(T), levels)
    base_BxTxT = attention_mask(segment_ids_BxT)[:, 0]
    to_row_BxLxL = base_BxTxT[:, t_L][:, :, t_L]
    to_chain_LxL = (t_L[:, None] == t_L[None, :]) & (lvl_L[None, :] <= lvl_L[:, None])
    mask = jnp.where(jnp.asarray(lvl_L == 0)[None, None, :], to_row_BxLxL, jnp.asarray(to_chain_LxL)[None])
    return mask[:, None]


def greedy_continuations(model, tokens_BxT, segment_ids_BxT, depth: int,
                         g1_BxT: jax.Array | None = None) -> jax.Array:
    """``g_1..g_depth`` for every position: ``[depth, B, T]`` (see the module docstring);
    ``g1_BxT``, head 1's argmax, when the caller has it already."""
    spec = model.spec
    B, T = tokens_BxT.shape
    pos_BxT = positions_from_segments(segment_ids_BxT)
    embed = model.embed[...].astype(spec.dtype)
    head1 = model.head_layer(0)
    if g1_BxT is None:
        h_BxTxD, positions_BxT, mask = model.trunk_hidden(tokens_BxT, segment_ids_BxT)
        g1_BxT = jnp.argmax(model.project(head1(h_BxTxD, positions_BxT, mask)), -1)
    g = [g1_BxT.astype(tokens_BxT.dtype)]
    for j in range(1, depth):
        tokens_BxL = jnp.concatenate([tokens_BxT, *g], axis=1)
        positions_BxL = jnp.concatenate([pos_BxT + i for i in range(j + 1)], axis=1)
        mask_Bx1xLxL = _tree_mask(segment_ids_BxT, j + 1)
        h_BxLxD = scan_blocks(model.trunk, embed[tokens_BxL], positions_BxL, mask_Bx1xLxL, spec.remat)
        hidden_BxLxD = head1(h_BxLxD, positions_BxL, mask_Bx1xLxL)
        logits_BxTxV = model.project(hidden_BxLxD[:, j * T:])
        g.append(jnp.argmax(logits_BxTxV, -1).astype(tokens_BxT.dtype))
    return jnp.stack(g)


def batch_sums(model, tokens_BxT, segment_ids_BxT) -> dict:
    """Per-head sums over one batch: ce, top1, top5, accepted, chain, count (each ``[N]``)."""
    n = model.spec.n_future
    targets_NxBxT, mask_NxBxT = head_targets(tokens_BxT, segment_ids_BxT, n)
    maskf = mask_NxBxT.astype(jnp.float32)
    logits = model(tokens_BxT, segment_ids_BxT).astype(jnp.float32)  # [N, B, T, V]
    lse = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets_NxBxT[..., None], axis=-1)[..., 0]
    rank = jnp.sum(logits > target_logit[..., None], axis=-1)  # logits strictly above the target
    draft_NxBxT = jnp.argmax(logits, -1)
    del logits
    g_NxBxT = greedy_continuations(model, tokens_BxT, segment_ids_BxT, n, draft_NxBxT[0])
    accepted = (draft_NxBxT == g_NxBxT).astype(jnp.float32)  # head 1: 1 by definition
    chain = jnp.cumprod(accepted, axis=0)
    return {
        "ce": jnp.sum((lse - target_logit) * maskf, (1, 2)),
        "top1": jnp.sum((rank == 0) * maskf, (1, 2)),
        "top5": jnp.sum((rank < TOPK) * maskf, (1, 2)),
        "accepted": jnp.sum(accepted * maskf, (1, 2)),
        "chain": jnp.sum(chain * maskf, (1, 2)),
        "count": jnp.sum(maskf, (1, 2)),
    }


@functools.partial(jax.jit, static_argnums=0)
def _batch_sums_jit(graphdef, state, tokens_BxT, segment_ids_BxT):
    return batch_sums(nnx.merge(graphdef, state), tokens_BxT, segment_ids_BxT)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _greedy_jit(graphdef, state, tokens_BxT, segment_ids_BxT, depth):
    return greedy_continuations(nnx.merge(graphdef, state), tokens_BxT, segment_ids_BxT, depth)


def batch_sums_jit(model, tokens_BxT, segment_ids_BxT) -> dict:
    """``batch_sums`` compiled (once per model structure and batch shape)."""
    graphdef, state = nnx.split(model)
    return _batch_sums_jit(graphdef, state, jnp.asarray(tokens_BxT, jnp.int32),
                           jnp.asarray(segment_ids_BxT, jnp.int32))


def greedy_continuations_jit(model, tokens_BxT, segment_ids_BxT, depth: int) -> jax.Array:
    """``greedy_continuations`` compiled."""
    graphdef, state = nnx.split(model)
    return _greedy_jit(graphdef, state, jnp.asarray(tokens_BxT, jnp.int32),
                       jnp.asarray(segment_ids_BxT, jnp.int32), int(depth))


def summarize(total: dict, n_future: int) -> dict:
    """Rates from summed counts (``batch_sums`` added up)."""
    count = np.maximum(np.asarray(total["count"], np.float64), 1.0)
    rate = {k: np.asarray(total[k], np.float64) / count for k in ("ce", "top1", "top5", "accepted", "chain")}
    heads = []
    for i in range(n_future):
        heads.append({
            "head": i + 1, "loss": float(rate["ce"][i]), "ppl": float(math.exp(min(rate["ce"][i], 700))),
            "top1": float(rate["top1"][i]), "top5": float(rate["top5"][i]),
            "acceptance": None if i == 0 else float(rate["accepted"][i]),
            "chain": None if i == 0 else float(rate["chain"][i]),
            "tokens": int(total["count"][i]),
        })
    return {
        "heads": heads,
        "loss": [h["loss"] for h in heads], "top1": [h["top1"] for h in heads],
        "top5": [h["top5"] for h in heads], "acceptance": [h["acceptance"] for h in heads],
        "chain": [h["chain"] for h in heads], "tokens": [h["tokens"] for h in heads],
        "tokens_per_forward": float(1.0 + sum(rate["chain"][1:])),
    }


def rows_per_call(spec, batch_rows: int, seq_len: int, budget_bytes: int = 2**30) -> int:
    """The largest divisor of ``batch_rows`` whose ``[n_future, rows, T, V]`` float32 logits fit
    in ``budget_bytes`` (at least 1): big batches are evaluated a slice of rows at a time."""
    per_row = spec.n_future * seq_len * spec.vocab_size * 4
    fit = max(1, budget_bytes // max(per_row, 1))
    return max(d for d in range(1, batch_rows + 1) if batch_rows % d == 0 and d <= fit)


def evaluate_batches(model, batches, budget_bytes: int = 2**30) -> dict:
    """``summarize`` over an iterable of ``{'tokens', 'segment_ids'}`` host batches."""
    total = None
    n_batches = 0
    for batch in batches:
        tokens, seg = np.asarray(batch["tokens"]), np.asarray(batch["segment_ids"])
        rows = rows_per_call(model.spec, tokens.shape[0], tokens.shape[1], budget_bytes)
        for r in range(0, tokens.shape[0], rows):
            sums = jax.device_get(batch_sums_jit(model, tokens[r:r + rows], seg[r:r + rows]))
            total = sums if total is None else jax.tree.map(np.add, total, sums)
        n_batches += 1
    if total is None:
        raise ValueError("No evaluation batches: the held-out split gave none.")
    out = summarize(total, model.spec.n_future)
    out["batches"] = n_batches
    return out


def validation_batches(loaded, data_cfg=None, *, batches: int, seq_len: int, batch_size: int,
                       seed: int = 1234):
    """The first ``batches`` held-out batches, as ``mtp train``'s final evaluation reads them
    (validation split, shuffle seed 1234, row sharding of one process), tokenized with the
    workdir's own tokenizer. Returns a list of numpy batches."""
    data_cfg = data_cfg if data_cfg is not None else loaded.cfg.data
    tok = loaded.tokenizer
    source = None  # the split's token cache, keyed by the tokenizer file (built if missing)
    if not Path(str(getattr(tok, "path", ""))).is_file():
        source = build_corpus(data_cfg).as_data_source("validation")  # text, tokenized here
    it = iter(make_dataset(data_cfg, "validation", tok, seq_len=seq_len, batch_size=batch_size,
                           seed=seed, process_index=0, process_count=1, shard_by="rows",
                           source=source))
    return [next(it) for _ in range(batches)]


def _data_cfg(loaded, override):
    if override is None:
        return loaded.cfg.data
    cfg = loaded.cfg.data.copy_and_resolve_references()
    cfg.unlock()
    cfg.update(dict(override))
    return cfg


def evaluate_heads(loaded, data_cfg_override=None, batches: int | None = None,
                   seq_len: int | None = None, batch_size: int | None = None) -> dict:
    """Per-head loss, top-1/top-5 and acceptance of a loaded workdir (``mtp.workdir.load_model``)
    on its held-out split. Defaults: the run's ``train.eval_batches``, ``train.seq_len`` and
    ``train.batch_size``; ``data_cfg_override`` (a dict of ``data.*`` keys) evaluates other data."""
    t = loaded.cfg.train
    batches = int(batches or t.eval_batches or 16)
    seq_len = int(seq_len or t.seq_len)
    batch_size = int(batch_size or t.batch_size)
    data_cfg = _data_cfg(loaded, data_cfg_override)
    data = validation_batches(loaded, data_cfg, batches=batches, seq_len=seq_len,
                              batch_size=batch_size)
    result = evaluate_batches(loaded.model, data)
    result.update(step=loaded.step, n_future=loaded.spec.n_future, split="validation",
                  data_source=str(data_cfg.source), seq_len=seq_len, batch_size=batch_size)
    return result


def format_heads_table(result: dict) -> str:
    rows = ["head  predicts  loss     ppl       top1    top5    accept  chain   tokens",
            "----  --------  -------  --------  ------  ------  ------  ------  -------"]
    for h in result["heads"]:
        acc = "     -" if h["acceptance"] is None else f"{h['acceptance']:6.4f}"
        chain = "     -" if h["chain"] is None else f"{h['chain']:6.4f}"
        rows.append(f"{h['head']:<4}  t+{h['head']:<6}  {h['loss']:7.4f}  {h['ppl']:8.2f}  "
                    f"{h['top1']:6.4f}  {h['top5']:6.4f}  {acc}  {chain}  {h['tokens']:7d}")
    rows.append(f"predicted tokens per forward (greedy self-speculative, all heads): "
                f"{result['tokens_per_forward']:.3f}")
    return "\n".join(rows)


def write_result(workdir: str | Path, result: dict) -> Path:
    path = Path(workdir) / "eval_heads.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(path)
    return path
