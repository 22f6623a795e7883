"""Llama-style building blocks: RMSNorm, RoPE, grouped-query attention, SwiGLU, Block.

Shapes: B batch, T sequence, D d_model, N query heads, K kv heads, H head_dim, F d_ff, V vocab.
Every parameter carries logical axis names (``out_sharding`` metadata) that ``mtp.sharding``
maps to mesh axes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from mtp.config import KERNEL_BLOCK
from mtp.model.attention import attention, attention_mask, cache_attention, model_attention  # noqa: F401 (re-export)
from mtp.model.kv_cache import CacheStep, write_kv
from mtp.sharding import constrain


def param(rngs: nnx.Rngs, shape, axes, std: float, dtype) -> nnx.Param:
    init = nnx.with_partitioning(nnx.initializers.normal(std), axes)
    return nnx.Param(init(rngs.params(), shape, dtype))


def zeros_param(shape, axes, dtype) -> nnx.Param:
    return nnx.Param(nnx.with_partitioning(nnx.initializers.zeros, axes)(None, shape, dtype))


def rms_norm(x_xD: jax.Array, scale_D: jax.Array, eps: float) -> jax.Array:
    x32 = x_xD.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * scale_D.astype(jnp.float32)).astype(x_xD.dtype)


def dense(x_xI: jax.Array, w_IxO: jax.Array) -> jax.Array:
    """``x @ w`` over the last axis as ONE 2-D matmul (XLA:CPU runs [M,I]x[I,O] much faster
    than the equivalent batched einsum)."""
    out = x_xI.reshape(-1, w_IxO.shape[0]) @ w_IxO
    return out.reshape(*x_xI.shape[:-1], w_IxO.shape[1])


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32):
        self.eps = eps
        self.scale = nnx.Param(nnx.with_partitioning(nnx.initializers.ones, ("norm",))(
            None, (dim,), param_dtype))

    def __call__(self, x_xD: jax.Array) -> jax.Array:
        return rms_norm(x_xD, self.scale[...], self.eps)


def positions_from_segments(segment_ids_BxT: jax.Array) -> jax.Array:
    """Position of each token inside its own document (packing restarts positions at 0)."""
    T = segment_ids_BxT.shape[1]
    t_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), segment_ids_BxT.shape)
    prev = jnp.pad(segment_ids_BxT[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
    start_BxT = jnp.where(segment_ids_BxT != prev, t_BxT, 0)
    return t_BxT - jax.lax.cummax(start_BxT, axis=1)


def rope_angles(positions_xT: jax.Array, H: int, theta: float) -> jax.Array:
    """RoPE's angles ``[..., T, H / 2]``: position times ``theta ** (-2i / H)``, float32."""
    freq_H2 = theta ** (-jnp.arange(0, H, 2, dtype=jnp.float32) / H)
    return positions_xT[..., None].astype(jnp.float32) * freq_H2


def rope(x_BxTxNxH: jax.Array, positions_BxT: jax.Array, theta: float) -> jax.Array:
    H = x_BxTxNxH.shape[-1]
    angle_BxTxH2 = rope_angles(positions_BxT, H, theta)
    sin, cos = jnp.sin(angle_BxTxH2)[:, :, None], jnp.cos(angle_BxTxH2)[:, :, None]
    x1, x2 = jnp.split(x_BxTxNxH.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BxTxNxH.dtype)


class LoRA:
    """Low-rank adapters (Hu et al. 2021) on a module's projections: ``W + (alpha/r) * A @ B``,
    computed as ``x @ W + ((x @ A) * alpha/r) @ B`` (no merged ``[I, O]`` weight, so a frozen base
    weight gets no weight gradient). ``A`` ``[*in, r]`` ~ normal(1/sqrt(fan_in)), ``B`` ``[r, *out]``
    = 0: the adapted layer starts as an exact no-op. Base weights keep their names and shapes (so
    checkpoints and converters still load); the factors are ``{name}_lora_a`` / ``{name}_lora_b``.

    Gated LoRA (``head_type='mask'``, Samragh et al. 2025): with ``gate_xT`` (bool, x's shape without
    the last axis) the adapter term is added only where the gate is set, so every other row is
    ``x @ W`` bit for bit: the base model's next-token outputs stay unchanged."""

    def add_lora(self, rngs, name: str, in_shape, out_shape, in_axes, out_axes, cfg, pd):
        fan_in = math.prod(in_shape)
        setattr(self, f"{name}_lora_a", param(rngs, (*in_shape, self.lora_rank), (*in_axes, None),
                                              cfg.std(fan_in), pd))
        setattr(self, f"{name}_lora_b", zeros_param((self.lora_rank, *out_shape), (None, *out_axes), pd))

    def proj(self, x_xI: jax.Array, name: str, gate_xT: jax.Array | None = None) -> jax.Array:
        """``x @ W`` for weight ``name`` flattened to ``[I, O]`` (``I`` = x's last axis), plus the
        LoRA term when the module has adapters (where ``gate_xT`` is set, if given)."""
        dt, n_in = self.dtype, x_xI.shape[-1]
        y = dense(x_xI, getattr(self, name)[...].astype(dt).reshape(n_in, -1))
        if not self.lora_rank:
            return y
        a_IxR = getattr(self, f"{name}_lora_a")[...].astype(dt).reshape(n_in, -1)
        b_RxO = getattr(self, f"{name}_lora_b")[...].astype(dt).reshape(self.lora_rank, -1)
        lora = dense(dense(x_xI, a_IxR) * jnp.asarray(self.lora_scale, dt), b_RxO)
        return y + lora if gate_xT is None else jnp.where(gate_xT[..., None], y + lora, y)


class Attention(nnx.Module, LoRA):
    def __init__(self, cfg, *, rngs: nnx.Rngs, lora_rank: int = 0):
        D, N, K, H = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.resolved_head_dim
        pd = jnp.dtype(cfg.param_dtype)
        self.n_heads, self.n_kv_heads, self.theta = N, K, cfg.rope_theta
        self.dtype = jnp.dtype(cfg.dtype)
        self.attention, self.interpret = model_attention(cfg), bool(cfg.attention_interpret)
        self.wq = param(rngs, (D, N, H), ("embed", "q_heads", "head_dim"), cfg.std(D), pd)
        self.wk = param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), cfg.std(D), pd)
        self.wv = param(rngs, (D, K, H), ("embed", "kv_heads", "head_dim"), cfg.std(D), pd)
        self.wo = param(rngs, (N, H, D), ("q_heads", "head_dim", "embed"), cfg.out_std(N * H), pd)
        self.lora_rank = lora_rank
        if lora_rank:
            self.lora_scale = float(cfg.lora_alpha) / lora_rank
            for name, kv in (("wq", N), ("wk", K), ("wv", K)):
                self.add_lora(rngs, name, (D,), (kv, H), ("embed",),
                              ("q_heads" if name == "wq" else "kv_heads", "head_dim"), cfg, pd)
            self.add_lora(rngs, "wo", (N, H), (D,), ("q_heads", "head_dim"), ("embed",), cfg, pd)

    def qkv(self, x_BxTxD, positions_BxT, gate_BxT=None):
        """Rotated queries ``[B,T,N,H]`` and keys ``[B,T,K,H]``, and values ``[B,T,K,H]``."""
        B, T, _ = x_BxTxD.shape
        N, K = self.n_heads, self.n_kv_heads
        q_BxTxNxH = self.proj(x_BxTxD, "wq", gate_BxT).reshape(B, T, N, -1)
        k_BxTxKxH = self.proj(x_BxTxD, "wk", gate_BxT).reshape(B, T, K, -1)
        v_BxTxKxH = self.proj(x_BxTxD, "wv", gate_BxT).reshape(B, T, K, -1)
        q_BxTxNxH = rope(q_BxTxNxH, positions_BxT, self.theta)
        return q_BxTxNxH, rope(k_BxTxKxH, positions_BxT, self.theta), v_BxTxKxH

    def out(self, out_BxTxNxH, gate_BxT=None):
        B, T = out_BxTxNxH.shape[:2]
        return self.proj(out_BxTxNxH.reshape(B, T, -1), "wo", gate_BxT)

    def __call__(self, x_BxTxD, positions_BxT, mask_Bx1xTxT, gate_BxT=None):
        """``mask_Bx1xTxT``: the bool mask (model.attention='xla'), or segment ids ``[B, T]`` (a kernel;
        see mtp/model/attention.py). ``gate_BxT``: gated LoRA (``LoRA.proj``)."""
        q_BxTxNxH, k_BxTxKxH, v_BxTxKxH = self.qkv(x_BxTxD, positions_BxT, gate_BxT)
        out_BxTxNxH = attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, mask_Bx1xTxT, impl=self.attention,
                                interpret=self.interpret)
        return self.out(out_BxTxNxH, gate_BxT)

    def cached(self, x_BxTxD, positions_BxT, k_BxKxSxH, v_BxKxSxH, step: CacheStep, gate_BxT=None):
        """The same layer over ``T`` new tokens with a KV cache (``mtp.model.kv_cache``): their keys
        and values are written at ``step.slots_BxT`` and they attend to what ``step.mask_Bx1xTxS``
        allows. A prefill (empty cache) runs the training attention on the new tokens alone:
        ``model.attention``'s kernel where the length tiles it (a multiple of 128 tokens), else XLA.
        Returns ``(out_BxTxD, k_cache, v_cache)``."""
        q_BxTxNxH, k_BxTxKxH, v_BxTxKxH = self.qkv(x_BxTxD, positions_BxT, gate_BxT)
        k_BxKxSxH = write_kv(k_BxKxSxH, k_BxTxKxH, step)
        v_BxKxSxH = write_kv(v_BxKxSxH, v_BxTxKxH, step)
        if step.prefill:
            segments_BxT = step.segment_ids_BxT
            if segments_BxT is None:
                segments_BxT = jnp.ones(q_BxTxNxH.shape[:2], jnp.int32)
            kernel = self.attention != "xla" and q_BxTxNxH.shape[1] % KERNEL_BLOCK == 0
            out_BxTxNxH = attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH,
                                    segments_BxT if kernel else attention_mask(segments_BxT),
                                    impl=self.attention if kernel else "xla", interpret=self.interpret)
        else:
            out_BxTxNxH = cache_attention(q_BxTxNxH, k_BxKxSxH, v_BxKxSxH, step.mask_Bx1xTxS)
        return self.out(out_BxTxNxH, gate_BxT), k_BxKxSxH, v_BxKxSxH


class SwiGLU(nnx.Module, LoRA):
    def __init__(self, cfg, *, rngs: nnx.Rngs, lora_rank: int = 0):
        D, F = cfg.d_model, cfg.resolved_d_ff
        pd = jnp.dtype(cfg.param_dtype)
        self.dtype = jnp.dtype(cfg.dtype)
        self.w_gate = param(rngs, (D, F), ("embed", "mlp"), cfg.std(D), pd)
        self.w_up = param(rngs, (D, F), ("embed", "mlp"), cfg.std(D), pd)
        self.w_down = param(rngs, (F, D), ("mlp", "embed"), cfg.out_std(F), pd)
        self.lora_rank = lora_rank
        if lora_rank:
            self.lora_scale = float(cfg.lora_alpha) / lora_rank
            self.add_lora(rngs, "w_gate", (D,), (F,), ("embed",), ("mlp",), cfg, pd)
            self.add_lora(rngs, "w_up", (D,), (F,), ("embed",), ("mlp",), cfg, pd)
            self.add_lora(rngs, "w_down", (F,), (D,), ("mlp",), ("embed",), cfg, pd)

    def __call__(self, x_BxTxD, gate_BxT=None):
        gate_BxTxF = self.proj(x_BxTxD, "w_gate", gate_BxT)
        up_BxTxF = self.proj(x_BxTxD, "w_up", gate_BxT)
        h_BxTxF = constrain(jax.nn.silu(gate_BxTxF) * up_BxTxF, ("batch", "seq", "mlp"))
        return self.proj(h_BxTxF, "w_down", gate_BxT)


class Block(nnx.Module):
    """Pre-norm transformer layer: x + attn(norm(x)), then x + mlp(norm(x)). ``lora_rank > 0``
    adds LoRA adapters to every attention and MLP projection; ``gate_BxT`` (bool, optional) applies
    them only to the rows where it is set (gated LoRA, ``LoRA.proj``)."""

    def __init__(self, cfg, *, rngs: nnx.Rngs, lora_rank: int = 0):
        pd = jnp.dtype(cfg.param_dtype)
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps, param_dtype=pd)
        self.attn = Attention(cfg, rngs=rngs, lora_rank=lora_rank)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps, param_dtype=pd)
        self.mlp = SwiGLU(cfg, rngs=rngs, lora_rank=lora_rank)

    def __call__(self, x_BxTxD, positions_BxT, mask_Bx1xTxT, gate_BxT=None):
        x_BxTxD = x_BxTxD + self.attn(self.attn_norm(x_BxTxD), positions_BxT, mask_Bx1xTxT, gate_BxT)
        x_BxTxD = x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD), gate_BxT)
        return constrain(x_BxTxD, ("batch", "seq", None))

    def cached(self, x_BxTxD, positions_BxT, k_BxKxSxH, v_BxKxSxH, step: CacheStep, gate_BxT=None):
        """This layer for decoding (prefill, one-token step, a draft chain or tree): ``__call__``'s
        computation with the attention over a KV cache (``Attention.cached``). Returns
        ``(x_BxTxD, k_cache, v_cache)``."""
        a_BxTxD, k_BxKxSxH, v_BxKxSxH = self.attn.cached(self.attn_norm(x_BxTxD), positions_BxT, k_BxKxSxH,
                                                         v_BxKxSxH, step, gate_BxT)
        x_BxTxD = x_BxTxD + a_BxTxD
        x_BxTxD = x_BxTxD + self.mlp(self.mlp_norm(x_BxTxD), gate_BxT)
        return constrain(x_BxTxD, ("batch", "seq", None)), k_BxKxSxH, v_BxKxSxH


REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def stacked_blocks(cfg, n: int, axis_name: str, *, rngs: nnx.Rngs, lora_rank: int = 0) -> Block:
    """``n`` Blocks whose parameters are stacked on a leading axis named ``axis_name``."""

    @nnx.split_rngs(splits=n)
    @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: axis_name})
    def create(rngs: nnx.Rngs) -> Block:
        return Block(cfg, rngs=rngs, lora_rank=lora_rank)

    return create(rngs)


def scan_blocks(blocks: Block, x_BxTxD, positions_BxT, mask_Bx1xTxT, remat: str, *,
                return_states: bool = False):
    """Apply stacked ``blocks`` in sequence with ``nnx.scan`` (one compiled layer body).
    ``return_states``: also every layer's output, ``[L, B, T, D]`` (the scan's ys)."""

    def body(x, block):
        x = block(x, positions_BxT, mask_Bx1xTxT)
        return (x, x) if return_states else x

    if remat != "none":
        body = nnx.remat(body, policy=REMAT_POLICIES[remat], prevent_cse=False)
    out_axes = (nnx.Carry, 0) if return_states else nnx.Carry
    scanned = nnx.scan(body, in_axes=(nnx.Carry, 0), out_axes=out_axes,
                       transform_metadata={nnx.PARTITION_NAME: "layers"})
    return scanned(x_BxTxD, blocks)


def scan_cached_blocks(blocks: Block, x_BxTxD, positions_BxT, k_LxBxKxSxH, v_LxBxKxSxH, step: CacheStep, *,
                       return_states: bool = False, gate_BxT=None):
    """``Block.cached`` of stacked ``blocks`` in sequence (``nnx.scan``: one compiled layer body),
    each layer with its slice of the stacked cache. Returns ``(x, k_cache, v_cache)``, and with
    ``return_states`` also every layer's output ``[L, B, T, D]``. ``gate_BxT``: gated LoRA."""

    def body(x, block, k_BxKxSxH, v_BxKxSxH):
        x, k_BxKxSxH, v_BxKxSxH = block.cached(x, positions_BxT, k_BxKxSxH, v_BxKxSxH, step, gate_BxT)
        return x, ((k_BxKxSxH, v_BxKxSxH, x) if return_states else (k_BxKxSxH, v_BxKxSxH))

    scanned = nnx.scan(body, in_axes=(nnx.Carry, 0, 0, 0), out_axes=(nnx.Carry, 0),
                       transform_metadata={nnx.PARTITION_NAME: "layers"})
    x_BxTxD, ys = scanned(x_BxTxD, blocks, k_LxBxKxSxH, v_LxBxKxSxH)
    return (x_BxTxD, *ys)


def slice_blocks(blocks: Block, start: int, stop: int) -> Block:
    """Layers ``start:stop`` of stacked ``blocks`` (a view for running part of the stack)."""
    graphdef, state = nnx.split(blocks)
    return nnx.merge(graphdef, jax.tree.map(lambda a: a[start:stop], state))
