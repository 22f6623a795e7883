"""Attention kernels (mtp/model/attention.py) in Pallas interpret mode against the XLA path: outputs
and q/k/v gradients on packed rows with GQA, the whole model and a few train steps on the kernel,
and the choices each backend refuses."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tiny_config

from mtp.config import ConfigError, validate
from mtp.model.attention import attention, attention_mask, resolve_attention, segment_offsets
from mtp.sharding import make_mesh
from mtp.train.program import build_program

B, T, N, K = 2, 128, 4, 2  # T: one 128-token kernel block; GQA: 2 query heads per kv head
TOL = {jnp.float32: 2e-5, jnp.bfloat16: 3e-2}  # max |kernel - xla|, relative to max |xla|


def packed_segments() -> jax.Array:
    """Row 0: three documents (40, 50, 38 tokens); row 1: one document then padding (id 0)."""
    seg = np.ones((B, T), np.int32)
    seg[0, 40:], seg[0, 90:] = 2, 3
    seg[1, 100:] = 0
    return jnp.asarray(seg)


def qkv(dtype, H: int):
    keys = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(keys[0], (B, T, N, H), jnp.float32)
    k, v = (jax.random.normal(key, (B, T, K, H), jnp.float32) for key in keys[1:3])
    cot = jax.random.normal(keys[3], (B, T, N, H), jnp.float32)
    return tuple(x.astype(dtype) for x in (q, k, v, cot))


def value_and_grads(impl: str, q, k, v, cot, seg):
    def f(q, k, v):
        out = attention(q, k, v, seg if impl != "xla" else attention_mask(seg), impl=impl, interpret=True)
        return jnp.sum(out.astype(jnp.float32) * cot.astype(jnp.float32)), out

    (_, out), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)
    return out, grads


def close(got, want, dtype) -> float:
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("impl,dtype,H", [("splash", jnp.float32, 64), ("splash", jnp.bfloat16, 64),
                                          ("pallas_gpu", jnp.float32, 64), ("pallas_gpu", jnp.bfloat16, 64),
                                          ("splash", jnp.float32, 128)])
def test_kernel_matches_xla_outputs_and_grads(impl, dtype, H):
    q, k, v, cot = qkv(dtype, H)
    seg = packed_segments()
    out, grads = value_and_grads(impl, q, k, v, cot, seg)
    want_out, want_grads = value_and_grads("xla", q, k, v, cot, seg)
    assert out.dtype == dtype and out.shape == (B, T, N, H)
    assert close(out, want_out, dtype) < TOL[dtype]
    for name, g, w in zip("qkv", grads, want_grads):
        assert g.shape == w.shape, name
        assert close(g, w, dtype) < TOL[dtype], name


def test_segment_offsets_describe_each_document():
    offsets, lengths = segment_offsets(packed_segments())
    assert offsets.shape == (B, T + 1) and lengths.shape == (B, T)
    np.testing.assert_array_equal(offsets[0, :4], [0, 40, 90, -1])
    np.testing.assert_array_equal(lengths[0, :4], [40, 50, 38, -1])
    np.testing.assert_array_equal(offsets[1, :3], [0, 100, -1])
    np.testing.assert_array_equal(lengths[1, :3], [100, 28, -1])


def test_backend_refuses_what_it_cannot_run():
    assert resolve_attention("auto", "cpu") == "xla"
    assert resolve_attention("auto", "tpu", lowering=True) == "splash"
    assert resolve_attention("auto", "cuda", lowering=True) == "pallas_gpu"  # no GPU here: cuDNN cannot trace
    assert resolve_attention("splash", "cpu", interpret=True) == "splash"
    with pytest.raises(ConfigError, match="'splash' cannot run on the 'cpu' backend.*'xla'"):
        resolve_attention("splash", "cpu")
    with pytest.raises(ConfigError, match="'pallas_gpu' cannot run on the 'tpu' backend"):
        resolve_attention("pallas_gpu", "tpu", lowering=True)
    with pytest.raises(ConfigError, match="needs a GPU at trace time"):
        resolve_attention("cudnn", "cuda", lowering=True)
    cfg = tiny_config(attention="splash")
    with pytest.raises(ConfigError, match="train.seq_len=16 .* blocks of 128"):
        validate(cfg, 1)
    cfg.train.seq_len = cfg.model.max_seq_len = 128
    validate(cfg, 1)
    with pytest.raises(ConfigError, match="cannot run on the 'cpu' backend"):
        build_program(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))


def losses(attention_impl: str, loss_impl: str, head_type: str, steps: int = 3) -> list[float]:
    cfg = tiny_config(attention=attention_impl, attention_interpret=True, max_seq_len=128, head_type=head_type,
                      n_layers=1, n_future=2)
    cfg.train.seq_len, cfg.train.batch_size, cfg.loss.impl, cfg.loss.chunk_size = 128, 2, loss_impl, 64
    cfg.optim.warmup_steps, cfg.optim.lr = 0, 3e-3
    validate(cfg, 1)
    program = build_program(cfg, make_mesh(cfg.mesh, jax.devices()[:1]))
    state, out = program.init(), []
    batch = {"tokens": jax.random.randint(jax.random.key(1), (2, 128), 0, 97), "segment_ids": packed_segments()}
    for _ in range(steps):
        state, metrics = program.train_step(state, batch)
        out.append(float(metrics["loss/total"]))
    return out


@pytest.mark.parametrize("loss_impl,head_type", [("scan", "transformer"), ("vmap", "causal")])
def test_training_on_the_tpu_kernel_follows_xla(loss_impl, head_type):
    """Three AdamW steps (lr 3e-3, no warmup) on one packed batch: the splash kernel's loss curve stays
    within 1e-4 (relative) of the XLA path's, through the trunk and every head layer (one trunk layer,
    two heads: the kernel runs in the trunk's scan, the vmapped or sequential heads, and the loss)."""
    want = losses("xla", loss_impl, head_type)
    got = losses("splash", loss_impl, head_type)
    assert want[-1] < want[0]  # it trains
    np.testing.assert_allclose(got, want, rtol=1e-4)


def test_train_step_lowers_for_tpu_and_cuda_with_kernels_and_no_seq_squared_tensor(tmp_path):
    """`mtp plan --lower-for tpu,cuda` on 8 simulated devices (data 2 x fsdp 2 x tensor 2): 'auto'
    resolves to splash (Mosaic tpu_custom_call) and pallas_gpu (Triton), written as StableHLO, and no
    tensor in either module has two axes of T=1024; the XLA path's module does (the check can fail)."""
    from mtp.plan import plan

    cfg = tiny_config(max_seq_len=1024)
    cfg.train.seq_len = 1024
    mesh = {"data": 2, "fsdp": 2, "tensor": 2}
    r = plan(cfg, mesh, lower_for=("tpu", "cuda"), lower_dir=str(tmp_path))
    tpu, cuda = r["lowered"]["tpu"], r["lowered"]["cuda"]
    assert (tpu["attention"], cuda["attention"]) == ("splash", "pallas_gpu")
    assert tpu["kernel_calls"]["tpu_custom_call"] > 0 and cuda["kernel_calls"]["__gpu$xla.gpu.triton"] > 0
    assert tpu["seq_len_squared_tensors"] == cuda["seq_len_squared_tensors"] == []
    assert "tpu_custom_call" in (tmp_path / "train_step.tpu.mlir").read_text()
    for platform in ("tpu", "cuda"):  # the speculative verify step, batch 1 and 8, a 1024-slot KV cache
        dec = r["lowered"][platform]["decode_step"]
        assert dec["lowered"] and dec["sharded"], dec
        assert dec["kv_cache_sharding"] == {1: "P(None, None, 'tensor', None, None)",  # 1 row: whole
                                            8: "P(None, ('data', 'fsdp'), 'tensor', None, None)"}
        text = (tmp_path / f"decode_step.{platform}.mlir").read_text()
        assert text.count("// decode_step batch=") == 2 and "x1024x8xf32>" in text  # [L, B, K, 1024, H]
    cfg.model.attention = "xla"
    xla = plan(cfg, mesh, lower_for=("tpu",), lower_dir=str(tmp_path / "xla"))
    assert any(t.endswith("x1024x1024xf32") for t in xla["lowered"]["tpu"]["seq_len_squared_tensors"])  # scores
    assert not xla["lowered"]["tpu"]["kernel_found"]
    # the estimate follows: XLA's layer holds f32 scores + probabilities and the bool mask, the kernel
    # an f32 log-sum-exp row and int32 segment ids (B = 8 / (data*fsdp) = 2, Nq = 4 / tensor = 2, T = 1024)
    B, Nq, T = 2, 2, 1024
    assert xla["activation_parts"]["layer"] - r["activation_parts"]["layer"] == \
        B * Nq * T * T * (4 + 4) + B * T * T - (B * Nq * T * 4 + B * T * 4)
