"""The CPU decode kernel (mtp/kernels): products equal a float64 reference, each row's result does
not depend on how many rows share the call (what keeps speculative blocks exact), decoding through
it stays exact, and a failed build is reported, not hidden."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import constant_input_model, heads_like_head1, tiny_model

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


def test_speculative_decoding_through_the_kernel_is_exact(monkeypatch):
    """Every matrix of a tiny model goes through the kernel (size threshold 0): speculative greedy
    (blocks of 4 and of a 3,2,1 tree) equals plain greedy, and the compiled decode really calls it."""
    monkeypatch.setenv("MTP_KERNEL_MIN_BYTES", "0")
    jax.clear_caches()
    try:
        prompts = [[5, 9, 11], [20, 21, 22, 23, 24, 25], [7]]
        noisy = heads_like_head1(tiny_model(seed=1, n_future=4), noise=0.5)
        right = constant_input_model(tiny_model(seed=1, n_future=4), same_heads=True)  # every draft right
        for model in (noisy, right):
            plain = generate(model, prompts, DecodeConfig("greedy", max_new_tokens=20), pad_to=16)
            for tree in (None, (3, 2, 1)):
                spec = generate(model, prompts, DecodeConfig("speculative", 4, tree, max_new_tokens=20), pad_to=16)
                assert spec.tokens == plain.tokens
        assert spec.forwards < plain.forwards / 2  # whole blocks were accepted: they really ran
        from mtp.decode import weights as dw

        w = jnp.ones((64, 32), jnp.float32)
        hlo = jax.jit(lambda x: dw.linear(x, w)).lower(jnp.ones((3, 32))).as_text()
        assert "mtp_rows_matmul" in hlo
    finally:
        jax.clear_caches()


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


def test_decode_attention_kernel_matches_xla_and_is_independent_of_the_block_size(monkeypatch):
    """The batch-1 attention kernel against XLA's attention (``attend`` with the kernel off), and
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
    monkeypatch.setattr(dc, "use_attention_kernel", lambda *a: False)
    ref = np.asarray(dc.attend(q[None], k, v, mask[None, None])).reshape(T, N, H)
    np.testing.assert_allclose(out, ref, atol=2e-6, rtol=1e-5)
    for t in range(T):
        alone = np.asarray(f(q[t:t + 1], k, v, mask[t:t + 1]))[0]
        assert (alone == out[t]).all(), f"token {t} differs alone"
    monkeypatch.undo()
    assert "mtp_decode_attention" in jax.jit(dc.attend).lower(q[None], k, v, mask[None, None]).as_text()
