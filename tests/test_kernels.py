"""The CPU decode kernel (mtp/kernels): products equal a float64 reference, each row's result does
not depend on how many rows share the call (what keeps speculative blocks exact), decoding through
it stays exact, and a failed build is reported, not hidden."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import constant_input_model, heads_like_head1, tiny_model

from mtp.config import DecodeSettings
from mtp.decode.generate import DecodeConfig, generate
from mtp.kernels import cpu, kernel_status, rows_matmul


@pytest.mark.parametrize("out_in", [True, False])
@pytest.mark.parametrize("M, n_in, n_out", [(1, 576, 1728), (4, 64, 300), (5, 37, 101), (9, 1536, 72),
                                             (32, 40, 33)])
def test_rows_matmul_matches_the_reference(out_in, M, n_in, n_out):
    assert kernel_status()["available"], kernel_status()["reason"]
    rng = np.random.default_rng(M * 1000 + n_in)
    x = rng.standard_normal((M, n_in), np.float32)
    w_OxI = rng.standard_normal((n_out, n_in), np.float32)
    w = w_OxI if out_in else np.ascontiguousarray(w_OxI.T)
    f = jax.jit(rows_matmul, static_argnames="w_out_in")
    y = np.asarray(f(x, w, w_out_in=out_in))
    ref = x.astype(np.float64) @ w_OxI.T.astype(np.float64)
    np.testing.assert_allclose(y, ref, atol=2e-4 * np.sqrt(n_in), rtol=1e-4)
    for m in {0, M // 2, M - 1}:  # a row alone gives bitwise the row computed inside the block
        alone = np.asarray(f(x[m:m + 1], w, w_out_in=out_in))[0]
        assert (alone == y[m]).all(), f"row {m} differs between M=1 and M={M}"


def test_speculative_decoding_through_the_kernel_is_exact():
    """Every matrix of a tiny model goes through the kernel (size threshold 0): speculative greedy
    (blocks of 4 and of a 3,2,1 tree) equals plain greedy, and the compiled decode really calls it."""
    every = DecodeSettings(kernel_min_bytes=0)
    prompts = [[5, 9, 11], [20, 21, 22, 23, 24, 25], [7]]
    noisy = heads_like_head1(tiny_model(seed=1, n_future=4), noise=0.5)
    right = constant_input_model(tiny_model(seed=1, n_future=4), same_heads=True)  # every draft right
    for model in (noisy, right):
        plain = generate(model, prompts, DecodeConfig("greedy", max_new_tokens=20, settings=every), pad_to=16)
        for tree in (None, (3, 2, 1)):
            spec = generate(model, prompts, DecodeConfig("speculative", 4, tree, max_new_tokens=20, settings=every),
                            pad_to=16)
            assert spec.tokens == plain.tokens
    assert spec.forwards < plain.forwards / 2  # whole blocks were accepted: they really ran
    from mtp.decode import weights as dw

    w = jnp.ones((64, 32), jnp.float32)
    assert "mtp_rows_matmul" in jax.jit(lambda x: dw.linear(x, w, every)).lower(jnp.ones((3, 32))).as_text()
    assert "mtp_rows_matmul" not in jax.jit(lambda x: dw.linear(x, w)).lower(jnp.ones((3, 32))).as_text()


def test_a_changed_decode_setting_compiles_a_new_program():
    """The settings are part of the static DecodeConfig: the same model and prompt decode through the
    kernels, then (backend 'xla', same process, no cache clearing) through XLA's operations only,
    with the same output."""
    from flax import nnx

    from mtp.decode import generate as gen
    from mtp.decode.backend import make_backend

    model = tiny_model(seed=1, n_future=2)
    graphdef, params = nnx.split(model)
    tokens, lengths = jnp.asarray([[5, 9, 11, 2]], jnp.int32), jnp.asarray([4], jnp.int32)
    outs = {}
    for backend in ("auto", "xla"):
        dc = DecodeConfig("speculative", 2, max_new_tokens=6, settings=DecodeSettings(backend, kernel_min_bytes=0))
        be = make_backend(dc.settings)
        args = (graphdef, params, be.weights(model), tokens, lengths, jax.random.key(0))
        hlo = gen._generate.lower(*args, dc=dc, be=be).as_text()
        assert ("mtp_rows_matmul" in hlo and "mtp_decode_attention" in hlo) == (backend == "auto"), backend
        outs[backend] = generate(model, [[5, 9, 11, 2]], dc).tokens
    assert outs["auto"] == outs["xla"]
    with pytest.raises(ValueError, match="backend='gpu': use one of auto, xla, cpu_kernels"):
        DecodeSettings(backend="gpu")


def test_the_kernel_thread_count_is_fixed_at_the_first_call():
    x, w = jnp.ones((2, 64)), jnp.ones((64, 64))
    jax.block_until_ready(rows_matmul(x, w, w_out_in=True))  # the kernels have run: the count is fixed
    in_effect = cpu.set_kernel_threads(0)
    with pytest.warns(UserWarning, match="kernel_threads=7 ignored"):
        assert cpu.set_kernel_threads(7) == in_effect
    assert cpu.set_kernel_threads(0) == in_effect


def test_small_products_one_row_and_prefill_blocks_stay_with_xla():
    from mtp.decode import weights as dw

    small = jnp.ones((64, 32), jnp.float32)  # 8 KiB, under KERNEL_MIN_BYTES
    assert "mtp_rows_matmul" not in jax.jit(lambda x: dw.linear(x, small)).lower(jnp.ones((3, 32))).as_text()
    big = jnp.ones((1024, 512), jnp.float32)  # 2 MiB: the kernel, except for a prefill-sized block
    assert "mtp_rows_matmul" in jax.jit(lambda x: dw.linear(x, big)).lower(jnp.ones((3, 512))).as_text()
    assert "mtp_rows_matmul" not in jax.jit(lambda x: dw.linear(x, big)).lower(jnp.ones((64, 512))).as_text()
    assert "mtp_rows_matmul" not in jax.jit(lambda x: dw.linear(x, big)).lower(jnp.ones((1, 512))).as_text()


def test_a_failed_build_names_the_command_and_the_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MTP_KERNEL_CACHE", str(tmp_path))
    with pytest.raises(RuntimeError, match="false.*failed"):
        cpu.build(compiler="false")
    assert not list(tmp_path.glob("*.so"))  # nothing half-written is left to be loaded later


def test_decode_attention_kernel_matches_xla_and_is_independent_of_the_block_size():
    """The batch-1 attention kernel against XLA's attention (``attend`` on backend 'xla'), and
    each token's output bitwise the same alone as inside a block of 2..5 (XLA's was a few ulps
    apart: what broke speculative == greedy with int8 activations)."""
    from mtp.decode import cache as dc
    from mtp.kernels.cpu import decode_attention

    rng = np.random.default_rng(3)
    T, N, K, S, H = 5, 6, 2, 40, 16
    q = rng.standard_normal((T, N, H)).astype(np.float32)
    k = rng.standard_normal((K, S, H)).astype(np.float32)
    v = rng.standard_normal((K, S, H)).astype(np.float32)
    mask = np.zeros((T, S), bool)
    mask[:, :20] = True  # a prefix of 20, then the block causally
    mask[:, 20:20 + T] = np.tril(np.ones((T, T), bool))
    f = jax.jit(decode_attention)
    out = np.asarray(f(q, k, v, mask))
    ref = np.asarray(dc.attend(q[None], k, v, mask[None, None], DecodeSettings(backend="xla"))).reshape(T, N, H)
    np.testing.assert_allclose(out, ref, atol=2e-6, rtol=1e-5)
    for t in range(T):
        alone = np.asarray(f(q[t:t + 1], k, v, mask[t:t + 1]))[0]
        assert (alone == out[t]).all(), f"token {t} differs alone"
    assert "mtp_decode_attention" in jax.jit(dc.attend).lower(q[None], k, v, mask[None, None]).as_text()
