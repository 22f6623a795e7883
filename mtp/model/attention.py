"""Training attention: ONE function, ``attention``, with an XLA path and three fused kernels.

Every layer that trains (trunk, transformer heads, causal heads, both ``loss.impl`` values) calls
``attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segments_or_mask, impl=...)`` (GQA when K < N). The
fourth argument is what the model threads through its layers:

- a bool mask ``[B, 1, T, T]`` (``impl='xla'``, built once per forward by ``attention_mask``; also
  any custom mask, e.g. the tree masks of ``mtp eval``): plain ``jax.nn.dot_product_attention``,
  the path every model trained with before kernels existed (bitwise the same numbers);
- int segment ids ``[B, T]`` (the kernels): causal attention within each packed document. No
  ``[B, *, T, T]`` mask or score tensor exists outside the kernel.

``impl`` (``model.attention``; docs/attention.md):

- ``'splash'``: Pallas TPU splash attention (Mosaic ``tpu_custom_call``), causal mask + ``SegmentIds``,
  GQA natively (its MHA kernel takes ``K`` kv heads for ``N = G*K`` query heads).
- ``'pallas_gpu'``: Pallas Triton flash attention (``pallas.ops.gpu.attention.mha``) with
  ``segment_ids`` and ``causal``; GQA by repeating the kv heads (their gradients sum back).
- ``'cudnn'``: cuDNN flash attention via JAX's cuDNN SDPA in its packed (ragged) layout: each row's
  documents become per-row segment offsets and lengths ``[B, T+1]`` / ``[B, T]`` (at most T
  documents a row), with the padding-causal mask, so no ``T x T`` bias or mask exists. Needs a GPU
  at trace time and cuDNN >= 9 (JAX checks).
- ``'auto'``: ``resolve_attention`` picks per platform: splash on TPU, cudnn on GPU (pallas_gpu
  when lowering for CUDA from a machine without one), xla on CPU.

Kernels tile the sequence in blocks of ``KERNEL_BLOCK`` (128) tokens, so ``T`` must be a multiple
of it. Inside a sharded program (``mtp.sharding.activation_rules``) a kernel runs under
``shard_map``: batch over the batch mesh axes, heads over ``q_heads``/``kv_heads``, the sequence
whole. ``interpret=True`` runs the Pallas kernels as plain JAX (any platform; for CPU tests).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp

from mtp.config import ATTENTIONS, KERNEL_BLOCK, ConfigError
from mtp.sharding import current_activation_rules, logical_to_spec

KERNELS = ("splash", "cudnn", "pallas_gpu")
_PLATFORM_KIND = {"cuda": "gpu", "rocm": "gpu", "gpu": "gpu", "tpu": "tpu", "cpu": "cpu"}
_RUNS_ON = {"xla": ("cpu", "gpu", "tpu"), "splash": ("tpu",), "cudnn": ("gpu",), "pallas_gpu": ("gpu",)}


def resolve_attention(choice: str, platform: str | None = None, *, interpret: bool = False,
                      lowering: bool = False) -> str:
    """``model.attention`` as the implementation that runs on ``platform`` (default: this process's
    backend; ``'tpu'``, ``'cuda'``/``'gpu'``, ``'cpu'``). ``lowering``: the program is only lowered
    for ``platform`` (it need not be here), so 'auto' on CUDA picks pallas_gpu (cuDNN needs a GPU at
    trace time). A choice the platform cannot run raises ConfigError, unless ``interpret`` (Pallas
    kernels then run as plain JAX anywhere)."""
    platform = platform or jax.default_backend()
    kind = _PLATFORM_KIND.get(platform, platform)
    if choice not in ATTENTIONS:
        raise ConfigError(f"model.attention={choice!r} is invalid: use one of {ATTENTIONS}.")
    if choice == "auto":
        if interpret and kind == "cpu":
            return "xla"
        return {"tpu": "splash", "gpu": "pallas_gpu" if lowering and jax.default_backend() != "gpu" else "cudnn"
                }.get(kind, "xla")
    runnable = [c for c in ATTENTIONS if c == "auto" or kind in _RUNS_ON[c]]
    if interpret and choice in ("splash", "pallas_gpu"):
        return choice
    if kind not in _RUNS_ON[choice]:
        raise ConfigError(f"model.attention={choice!r} cannot run on the {platform!r} backend: use one of"
                          f" {tuple(runnable)} there (or model.attention_interpret=True to run a Pallas kernel"
                          " in interpret mode, for tests).")
    if choice == "cudnn" and lowering and jax.default_backend() != "gpu":
        raise ConfigError(f"model.attention='cudnn' needs a GPU at trace time and this process has"
                          f" {jax.default_backend()!r}: lower for CUDA with model.attention='pallas_gpu' (or 'auto').")
    return choice


def model_attention(spec) -> str:
    """The implementation a model built from ``spec`` runs: ``spec.attention`` when concrete (the
    train program resolves it per target platform), 'auto' resolved for this process's backend."""
    if spec.attention != "auto":
        return spec.attention
    return resolve_attention("auto", interpret=spec.attention_interpret)


def attention_mask(segment_ids_BxT: jax.Array) -> jax.Array:
    """Causal mask that also blocks attention across documents: bool [B, 1, T, T] (the 'xla' path)."""
    T = segment_ids_BxT.shape[1]
    causal_TxT = jnp.tril(jnp.ones((T, T), dtype=bool))
    same_BxTxT = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
    return (causal_TxT[None] & same_BxTxT)[:, None]


def attention(q_BxTxNxH: jax.Array, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array, segments_or_mask: jax.Array,
              *, impl: str = "xla", interpret: bool = False) -> jax.Array:
    """Causal self-attention within packed documents, ``[B, T, N, H]``; scale ``1/sqrt(H)``.
    ``segments_or_mask``: segment ids ``[B, T]``, or a bool mask ``[B, 1, T, T]`` (then 'xla' runs,
    whatever ``impl`` says: only it takes an arbitrary mask)."""
    if segments_or_mask.ndim == 4 or impl == "xla":
        mask = segments_or_mask if segments_or_mask.ndim == 4 else attention_mask(segments_or_mask)
        return jax.nn.dot_product_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask=mask, implementation="xla")
    if impl not in KERNELS:
        raise ValueError(f"attention impl={impl!r} is unknown; use 'xla' or one of {KERNELS}.")
    T = q_BxTxNxH.shape[1]
    if T % KERNEL_BLOCK:
        raise ValueError(f"attention impl={impl!r} needs a sequence length that is a multiple of {KERNEL_BLOCK};"
                         f" got T={T}. Use model.attention='xla' for this shape.")
    kernel = {"splash": _splash, "pallas_gpu": _pallas_gpu, "cudnn": _cudnn}[impl]
    return _sharded(functools.partial(kernel, interpret=interpret), q_BxTxNxH, k_BxTxKxH, v_BxTxKxH,
                    segments_or_mask.astype(jnp.int32))


# --- sharding: kernels are opaque to the partitioner, so each device runs its own shard --------
def _sharded(kernel, q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT):
    context = current_activation_rules()
    if context is None:
        return kernel(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT)
    mesh, rules = context
    q_spec = logical_to_spec(("batch", None, "q_heads", None), q_BxTxNxH.shape, mesh, rules)
    kv_spec = logical_to_spec(("batch", None, "kv_heads", None), k_BxTxKxH.shape, mesh, rules)
    if q_spec[2] != kv_spec[2]:  # heads split unevenly (e.g. 2 kv heads on tensor=4): keep them whole
        q_spec = jax.sharding.PartitionSpec(*q_spec[:2], None, None)
        kv_spec = jax.sharding.PartitionSpec(*kv_spec[:2], None, None)
    seg_spec = jax.sharding.PartitionSpec(q_spec[0], None)
    if all(s is None for s in (*q_spec, *kv_spec)):
        return kernel(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT)
    return jax.shard_map(kernel, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec,
                         check_vma=False)(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT)


# --- the kernels ---------------------------------------------------------------------------------
def _block(T: int) -> int:
    """The largest of 512/256/128 tokens that tiles ``T``."""
    return next(b for b in (512, 256, KERNEL_BLOCK) if T % b == 0)


@functools.cache
def _splash_kernel(T: int, N: int, interpret: bool):
    from jax.experimental.pallas.ops.tpu import splash_attention as sa

    b = _block(T)
    sizes = sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b, block_kv_dkv=b,
                          block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
    mask = sa.MultiHeadMask([sa.CausalMask((T, T))] * N)
    with jax.ensure_compile_time_eval():  # the block tables are constants, not values of the trace that asks first
        return sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)


def _splash(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, *, interpret: bool):
    from jax.experimental.pallas.ops.tpu.splash_attention import SegmentIds

    B, T, N, H = q_BxTxNxH.shape
    kernel = _splash_kernel(T, N, interpret)
    scale = jnp.asarray(1.0 / math.sqrt(H), q_BxTxNxH.dtype)  # splash does not scale the logits
    q_BxNxTxH = jnp.swapaxes(q_BxTxNxH * scale, 1, 2)
    k_BxKxTxH, v_BxKxTxH = jnp.swapaxes(k_BxTxKxH, 1, 2), jnp.swapaxes(v_BxTxKxH, 1, 2)

    def one(q_NxTxH, k_KxTxH, v_KxTxH, seg_T):
        return kernel(q_NxTxH, k_KxTxH, v_KxTxH, segment_ids=SegmentIds(q=seg_T, kv=seg_T))

    return jnp.swapaxes(jax.vmap(one)(q_BxNxTxH, k_BxKxTxH, v_BxKxTxH, segment_ids_BxT), 1, 2)


def _pallas_gpu(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, *, interpret: bool):
    from jax.experimental.pallas.ops.gpu import attention as triton

    G = q_BxTxNxH.shape[2] // k_BxTxKxH.shape[2]
    if G > 1:  # GQA: kv head j serves query heads j*G .. j*G+G-1 (jax.nn.dot_product_attention's grouping)
        k_BxTxKxH, v_BxTxKxH = jnp.repeat(k_BxTxKxH, G, axis=2), jnp.repeat(v_BxTxKxH, G, axis=2)
    sizes = triton.BlockSizes(block_q=KERNEL_BLOCK, block_k=KERNEL_BLOCK, block_q_dkv=32, block_kv_dkv=32,
                              block_q_dq=32, block_kv_dq=32)
    return triton.mha(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, sm_scale=1.0 / math.sqrt(q_BxTxNxH.shape[-1]),
                      causal=True, block_sizes=sizes, interpret=interpret)


def segment_offsets(segment_ids_BxT: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Each row's documents as cuDNN's packed layout wants them: start offsets ``[B, T+1]`` and lengths
    ``[B, T]``, padded with -1 (a row holds at most T documents). Documents are contiguous runs of
    equal segment ids."""
    B, T = segment_ids_BxT.shape
    t_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    prev = jnp.pad(segment_ids_BxT[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    starts_BxT = jnp.sort(jnp.where(segment_ids_BxT != prev, t_BxT, T), axis=1)  # run starts first, then T
    ends_BxT = jnp.concatenate([starts_BxT[:, 1:], jnp.full((B, 1), T, jnp.int32)], axis=1)
    valid_BxT = starts_BxT < T
    lengths_BxT = jnp.where(valid_BxT, ends_BxT - starts_BxT, -1)
    offsets_BxT1 = jnp.pad(jnp.where(valid_BxT, starts_BxT, -1), ((0, 0), (0, 1)), constant_values=-1)
    return offsets_BxT1, lengths_BxT


def _cudnn(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT, *, interpret: bool):
    del interpret  # cuDNN has no interpret mode
    from jax._src.cudnn.fused_attention_stablehlo import MaskType
    from jax._src.cudnn.fused_attention_stablehlo import dot_product_attention as cudnn_sdpa

    offsets_BxT1, lengths_BxT = segment_offsets(segment_ids_BxT)
    return cudnn_sdpa(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, q_seqlen=lengths_BxT, kv_seqlen=lengths_BxT,
                      q_offsets=offsets_BxT1, kv_offsets=offsets_BxT1, scale=1.0 / math.sqrt(q_BxTxNxH.shape[-1]),
                      mask_type=MaskType.PADDING_CAUSAL, qkv_layout="BTNH")



# --- decoding: new tokens over a KV cache ----------------------------------------------------------
def cache_attention(q_BxTxNxH: jax.Array, k_BxKxSxH: jax.Array, v_BxKxSxH: jax.Array,
                    mask_Bx1xTxS: jax.Array) -> jax.Array:
    """Grouped-query attention of ``T`` new tokens over a layer's KV cache (already holding their own
    keys and values), ``[B, T, N, H]``: query head n reads kv head ``n // (N / K)`` (the grouping of
    ``jax.nn.dot_product_attention``), scale ``1/sqrt(H)``, float32 scores and softmax. The cache
    stays in its ``[B, K, S, H]`` layout (no copy or transpose of it per step); under a mesh the
    batch and kv-head axes stay sharded."""
    B, T, N, H = q_BxTxNxH.shape
    K = k_BxKxSxH.shape[1]
    q_BxKxGxTxH = q_BxTxNxH.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)
    s_BxKxGxTxS = jnp.einsum("bkgth,bksh->bkgts", q_BxKxGxTxH, k_BxKxSxH,
                             preferred_element_type=jnp.float32) * (H ** -0.5)
    s_BxKxGxTxS = jnp.where(mask_Bx1xTxS[:, :, None], s_BxKxGxTxS, jnp.finfo(jnp.float32).min)
    p_BxKxGxTxS = jax.nn.softmax(s_BxKxGxTxS, axis=-1)
    o_BxKxGxTxH = jnp.einsum("bkgts,bksh->bkgth", p_BxKxGxTxS.astype(v_BxKxSxH.dtype), v_BxKxSxH)
    return o_BxKxGxTxH.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)
