"""The speculative verify step of a model, lowered (not run) for an accelerator mesh.

``mtp plan ... --lower-for tpu,cuda --lower-dir DIR`` writes ``DIR/decode_step.<platform>.mlir``:
one step of self-speculative decoding with every head drafting (a chain of ``n_future - 1``
drafts): the block ``[root, drafts...]`` through the model's own layers over a KV cache of
``model.max_seq_len`` slots (``mtp.model.cached``, the 'xla' decode backend; mask heads: the chain
then the mask tokens, ``mtp.decode.mask_drafts``), head 1's greedy
verification, the accepted path and the next drafts; parameters and cache sharded on the mesh by
the training rules, the cache donated (updated in place). Nothing is allocated: the inputs are
``jax.ShapeDtypeStruct``s.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from mtp.config import DecodeSettings
from mtp.decode import mask_drafts
from mtp.decode.backend import XlaBackend
from mtp.decode.generate import DecodeConfig, _drafts, verify_step
from mtp.model.heads import head_kind
from mtp.model.kv_cache import CACHE_AXES, H1_AXES
from mtp.model.lm import abstract_params
from mtp.sharding import activation_rules, logical_to_spec, param_shardings, rows_sharding


def decode_step_program(spec, mesh, rules, batch: int):
    """``(jitted step, abstract inputs)`` of the speculative verify step for ``batch`` rows."""
    be = XlaBackend(DecodeSettings(backend="xla"))
    dc = DecodeConfig("speculative", heads=spec.n_future, max_new_tokens=1, settings=be.settings)
    tree = dc.draft_tree()
    sequential = head_kind(spec).sequential
    layout = mask_drafts.mask_layout(spec.n_future - 1) if head_kind(spec).masked else None
    fwd_heads = 1 if sequential or layout else spec.n_future
    graphdef, params = abstract_params(spec)
    S, T = spec.max_seq_len, tree.size if layout is None else layout.size
    cache = jax.eval_shape(lambda: be.init_cache(spec, batch, S, spec.n_future))

    def cache_sharding(name, x):
        axes = H1_AXES if name == "h1" else CACHE_AXES
        return NamedSharding(mesh, logical_to_spec(axes, x.shape, mesh, rules))

    def rows(*shape):
        return rows_sharding(shape, mesh, rules)

    rows_1, rows_2, rows_T, rows_S = rows(batch), rows(batch, tree.size - 1), rows(batch, T), rows(batch, S)
    cache_sh = {name: cache_sharding(name, x) for name, x in cache.items()}

    def step(params, cache, block_BxT, lengths_B, seq_BxS):
        with activation_rules(mesh, rules):
            model = nnx.merge(graphdef, params)
            hidden_HxBxTxD, cache, best_B, n_acc_B, emitted_BxD = verify_step(
                be, model, {}, cache, block_BxT, lengths_B, None, tree, dc, fwd_heads, layout)
            lengths_B = lengths_B + n_acc_B + 1
            if layout:  # mask heads: the masks after the accepted node, through the sampler
                root_B = jnp.take_along_axis(emitted_BxD, n_acc_B[:, None], axis=1)[:, 0]
                group_BxMxD = mask_drafts.group_rows(hidden_HxBxTxD[0], best_B, layout.m)
                drafts_BxC = mask_drafts.sampler_drafts(be, model, {}, group_BxMxD, root_B)
            elif sequential:
                drafts_BxC, cache = be.causal_drafts(model, {}, cache, seq_BxS, lengths_B, spec.n_future,
                                                     2 * spec.n_future - 1)
            else:
                node_HxBxD = jnp.take_along_axis(hidden_HxBxTxD[1:], best_B[None, :, None, None], axis=2)[:, :, 0]
                drafts_BxC = _drafts(be, model, {}, node_HxBxD, tree)
            return emitted_BxD, n_acc_B, drafts_BxC, lengths_B, cache

    rows_D = rows(batch, tree.size)
    jitted = jax.jit(step, in_shardings=(param_shardings(params, mesh, rules), cache_sh, rows_T, rows_1, rows_S),
                     out_shardings=(rows_D, rows_1, rows_2, rows_1, cache_sh), donate_argnums=(1,))
    inputs = (params, cache, jax.ShapeDtypeStruct((batch, T), jnp.int32), jax.ShapeDtypeStruct((batch,), jnp.int32),
              jax.ShapeDtypeStruct((batch, S), jnp.int32))
    return jitted, inputs


def lower_decode_step(spec, mesh, rules, platform: str, batches=(1, 8)) -> tuple[str, dict]:
    """StableHLO text of the speculative verify step for ``platform``, one module per batch size,
    concatenated (each headed by a comment line naming its batch), and ``{batch: the trunk KV
    cache's PartitionSpec}``."""
    texts, cache_specs = [], {}
    for batch in batches:
        jitted, inputs = decode_step_program(spec, mesh, rules, batch)
        text = jitted.trace(*inputs).lower(lowering_platforms=(platform,)).as_text()
        texts.append(f"// decode_step batch={batch} cache_slots={spec.max_seq_len} heads={spec.n_future}\n{text}")
        cache_specs[batch] = str(logical_to_spec(CACHE_AXES, inputs[1]["trunk_k"].shape, mesh, rules))
    return "\n".join(texts), cache_specs
