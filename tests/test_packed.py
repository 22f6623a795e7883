"""Packed decode weights (mtp/decode/packed.py): blocks recovered exactly from dequantized GGUF
tensors, the packed kernel's products match a float64 reference and do not depend on how many rows
share a call, and a model whose weights are GGUF blocks decodes from them with speculative output
identical to plain greedy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import tiny_model, with_params

from mtp.config import DecodeSettings
from mtp.decode import weights as dw
from mtp.decode.generate import DecodeConfig, generate
from mtp.decode.packed import PackedMatrix, pack_exact, quantize_s8
from mtp.kernels import kernel_status, packed_matmul


def q4_1_roundtrip(w_OxI: np.ndarray) -> np.ndarray:
    """ggml's quantize_row_q4_1_ref then gguf's dequantization (float16 d and min, 4-bit q)."""
    b = w_OxI.reshape(w_OxI.shape[0], -1, 32).astype(np.float32)
    lo, hi = b.min(-1, keepdims=True), b.max(-1, keepdims=True)
    d = (hi - lo) / np.float32(15)
    inv = np.where(d == 0, np.float32(0), np.float32(1) / np.where(d == 0, 1, d))
    q = np.minimum(15, np.trunc((b - lo) * inv + np.float32(0.5))).astype(np.float32)
    d16, m16 = d.astype(np.float16).astype(np.float32), lo.astype(np.float16).astype(np.float32)
    return ((d16 * q) + m16).reshape(w_OxI.shape)


def gguf_roundtrip(w_OxI: np.ndarray, kind: str) -> np.ndarray:
    import gguf.quants as gq

    if kind == "Q4_1":
        return q4_1_roundtrip(w_OxI)
    qt = getattr(gq.GGMLQuantizationType, kind)
    return np.asarray(gq.dequantize(gq.quantize(w_OxI, qt), qt), np.float32).reshape(w_OxI.shape)


@pytest.mark.parametrize("kind, packed_as", [("Q8_0", "s8"), ("Q4_0", "s8"), ("Q4_1", "u4")])
def test_gguf_blocks_are_recovered_exactly(kind, packed_as):
    w = gguf_roundtrip(np.random.default_rng(0).standard_normal((40, 96)).astype(np.float32), kind)
    p = pack_exact(w)
    assert p is not None and p.kind == packed_as
    assert np.array_equal(p.dequantize(), w)
    assert p.nbytes < w.nbytes / 3


def test_float_weights_and_odd_sizes_stay_float32():
    rng = np.random.default_rng(1)
    assert pack_exact(rng.standard_normal((8, 64)).astype(np.float32)) is None  # never quantized
    assert pack_exact(gguf_roundtrip(rng.standard_normal((8, 64)).astype(np.float32), "Q8_0")[:, :48]) is None
    w = gguf_roundtrip(rng.standard_normal((8, 64)).astype(np.float32), "Q4_1")
    w[5, 7] += 1e-3  # one weight off its block's grid: the matrix stays float32
    assert pack_exact(w) is None
    assert quantize_s8(rng.standard_normal((8, 40)).astype(np.float32)) is None


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_1"])
@pytest.mark.parametrize("M", [1, 3, 4, 9])
def test_packed_products_match_the_reference_and_rows_are_independent(kind, M):
    assert kernel_status()["available"], kernel_status()["reason"]
    rng = np.random.default_rng(M)
    w = gguf_roundtrip(rng.standard_normal((150, 320)).astype(np.float32), kind)
    p = jax.tree.map(jnp.asarray, pack_exact(w))
    x = rng.standard_normal((M, 320)).astype(np.float32)
    f = jax.jit(packed_matmul)
    y = np.asarray(f(x, p.q, p.d, p.m))
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    np.testing.assert_allclose(y, ref, atol=1e-4 * np.sqrt(320), rtol=1e-5)
    for m in {0, M - 1}:
        assert (np.asarray(f(x[m:m + 1], p.q, p.d, p.m))[0] == y[m]).all(), f"row {m} depends on M"


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_1"])
def test_int8_activations_compute_the_quantized_product_and_keep_rows_independent(kind):
    """``q8x``: each block of 32 of x rounded to int8 steps of amax/127 (llama.cpp's activations);
    the kernel's result is that product (u4's min term stays float), row by row."""
    rng = np.random.default_rng(7)
    w = gguf_roundtrip(rng.standard_normal((70, 160)).astype(np.float32), kind)
    p = pack_exact(w)
    x = rng.standard_normal((5, 160)).astype(np.float32)
    xb = x.reshape(5, -1, 32)
    amax = np.abs(xb).max(-1, keepdims=True)
    x_hat = (np.rint(xb * (127 / amax)) * (amax / 127)).reshape(x.shape).astype(np.float64)
    if p.m is None:
        ref = x_hat @ w.T.astype(np.float64)
    else:
        m_OxI = np.repeat(np.asarray(p.m, np.float64), 32, axis=1)
        ref = x_hat @ (w - m_OxI).T + x.astype(np.float64) @ m_OxI.T
    f = jax.jit(packed_matmul, static_argnames="q8x")
    args = [jnp.asarray(a) if a is not None else None for a in (p.q, p.d, p.m)]
    y = np.asarray(f(x, *args, q8x=True))
    np.testing.assert_allclose(y, ref, atol=1e-5 * np.abs(ref).max(), rtol=1e-5)
    assert np.abs(y - x.astype(np.float64) @ w.T).max() > 1e-4  # it really rounded x
    for i in (0, 4):
        assert (np.asarray(f(x[i:i + 1], *args, q8x=True))[0] == y[i]).all()


def gguf_like(model, kind: str):
    """The model with every matrix of the trunk, the heads and the embedding replaced by its GGUF
    ``kind`` round trip along the input axis (what ``mtp convert --gguf`` stores)."""
    pure = nnx.to_pure_dict(nnx.state(model))

    def quant(path, x):
        names = [str(getattr(k, "key", k)) for k in path]
        x = np.asarray(x, np.float32)
        if names[0] == "embed":  # [V, D]: blocks along D
            return jnp.asarray(gguf_roundtrip(x, kind))
        if x.ndim < 3 or names[0] not in ("trunk", "heads"):
            return x
        n_in_axes = 2 if names[-1] == "wo" else 1  # wo: [L, N, H, D]; others [L, I, ...]
        L, n_in = x.shape[0], int(np.prod(x.shape[1:1 + n_in_axes]))
        w_LxIxO = x.reshape(L, n_in, -1)
        out = np.stack([gguf_roundtrip(np.ascontiguousarray(w.T), kind).T for w in w_LxIxO])
        return jnp.asarray(out.reshape(x.shape))

    return with_params(model, jax.tree_util.tree_map_with_path(quant, pure))


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_1"])
def test_a_gguf_model_decodes_from_its_blocks_exactly(kind):
    model = gguf_like(tiny_model(seed=2, n_future=4), kind)
    prompts = [[5, 9, 11], [20, 21, 22, 23, 24, 25]]
    floats = DecodeSettings(packed_weights=False)
    plain32 = generate(model, prompts, DecodeConfig("greedy", max_new_tokens=16, settings=floats), pad_to=16)
    assert not dw.LAST_PACKING["exact"]
    plain = generate(model, prompts, DecodeConfig("greedy", max_new_tokens=16), pad_to=16)
    weights = dw.cached_decode_weights(model)
    assert dw.LAST_PACKING == {**dw.LAST_PACKING, "exact": 1 + 4 * (2 + 1), "drafts_s8": 4 * 3, "float32": 0}
    assert isinstance(weights["unembed"], PackedMatrix) and isinstance(weights["trunk"][0]["wgu"], PackedMatrix)
    assert isinstance(weights["heads"][2]["wdown"], PackedMatrix)  # drafting heads: lossy s8
    assert dw.step_bytes(weights) < 0.4 * sum(int(x.nbytes) for x in jax.tree.leaves(nnx.state(model)))
    assert plain.tokens == plain32.tokens  # the same weights: the same greedy output here
    for tree in (None, (2, 2, 1)):
        spec = generate(model, prompts, DecodeConfig("speculative", 4, tree, max_new_tokens=16), pad_to=16)
        assert spec.tokens == plain.tokens
    int8 = DecodeSettings(packed_activations="int8")  # llama.cpp's activations: still exact drafting
    plain8 = generate(model, prompts, DecodeConfig("greedy", max_new_tokens=16, settings=int8), pad_to=16)
    assert dw.LAST_PACKING["activations"] == "int8" and dw.cached_decode_weights(model, int8)["unembed"].q8x
    spec8 = generate(model, prompts, DecodeConfig("speculative", 4, None, max_new_tokens=16, settings=int8), pad_to=16)
    assert spec8.tokens == plain8.tokens
    assert not dw.cached_decode_weights(model)["unembed"].q8x  # the default settings: float activations again
    with pytest.raises(ValueError, match="packed_activations='int4': use one of float32, int8"):
        DecodeSettings(packed_activations="int4")


def test_a_draft_vocabulary_changes_drafts_not_the_output(tmp_path):
    """Heads 2..k drafting among a few token ids only: the output stays plain greedy's, drafts fall
    only on those ids, and bad id lists are refused before any work."""
    import types

    from mtp.decode import draft_vocab as dv

    model = tiny_model(seed=3, n_future=3)
    prompts = [[5, 9, 11], [20, 21, 22, 23]]
    plain = generate(model, prompts, DecodeConfig("greedy", max_new_tokens=12), pad_to=16)
    ids = tuple(range(0, 97, 3))
    for tree in (None, (2, 1)):
        spec = generate(model, prompts, DecodeConfig("speculative", 3, tree, max_new_tokens=12, draft_ids=ids),
                        pad_to=16)
        assert spec.tokens == plain.tokens
    from mtp.decode.backend import CpuKernelBackend, XlaBackend
    from mtp.decode.generate import _drafts
    from mtp.decode.tree import build_tree

    hidden = jax.random.normal(jax.random.key(0), (2, 1, 32))
    for be in (CpuKernelBackend(), XlaBackend()):  # both backends draft among the ids only
        weights = be.weights(model)
        cands = np.asarray(_drafts(be, model, weights, hidden, build_tree((3, 2)), be.draft_table(model, weights, ids)))
        assert set(cands.ravel()) <= set(ids)
    for bad in ((5, 3), (1, 200), (4,)):
        with pytest.raises(ValueError, match="draft_ids"):
            generate(model, prompts, DecodeConfig("speculative", 3, (2, 1), max_new_tokens=4, draft_ids=bad))
    # the workdir's frequency order picks the ids; small vocabularies draft over all of them
    order = np.arange(97)[::-1].astype(np.int32)
    np.save(tmp_path / dv.FILE, order)
    loaded = types.SimpleNamespace(workdir=str(tmp_path), spec=model.spec)
    assert dv.draft_ids(loaded, 4) == (93, 94, 95, 96)
    assert dv.draft_ids(loaded, None) is None and dv.draft_ids(loaded, 0) is None
    with pytest.raises(ValueError, match="draft_vocab=-1"):
        dv.draft_ids(loaded, -1)
    # decoding never counts tokens: without the file an explicit size names the command that makes it,
    # the default size (large vocabularies) drafts over every token
    (tmp_path / dv.FILE).unlink()
    with pytest.raises(ValueError, match=f"--draft-vocab 4 needs .*run `mtp calibrate --workdir {tmp_path}`"):
        dv.draft_ids(loaded, 4)
    big = types.SimpleNamespace(workdir=str(tmp_path), spec=types.SimpleNamespace(vocab_size=4 * dv.AUTO_SIZE))
    assert dv.resolve_size(big, None) == dv.AUTO_SIZE and dv.draft_ids(big, None) is None


def test_a_float_unembedding_stays_float_while_the_trunk_packs():
    """Some GGUFs keep the embedding in F16/F32: the layers still pack, the unembedding does not."""
    model = gguf_like(tiny_model(seed=5, n_future=2), "Q4_1")
    pure = nnx.to_pure_dict(nnx.state(model))
    pure["embed"] = pure["embed"] + 1e-3 * jax.random.normal(jax.random.key(1), pure["embed"].shape)
    model = with_params(model, pure)
    weights = dw.cached_decode_weights(model)
    assert isinstance(weights["trunk"][1]["wdown"], PackedMatrix)
    assert not isinstance(weights["unembed"], PackedMatrix) and dw.LAST_PACKING["float32"] == 1
    assert not isinstance(dw.cached_decode_weights(tiny_model(seed=5, n_future=2))["trunk"][0]["wgu"], PackedMatrix)
    assert dw.LAST_PACKING["exact"] == 0  # a float model: nothing packed


@pytest.mark.parametrize("kind", ["Q4_1", "Q8_0"])
def test_the_fused_decode_layer_matches_the_models_layer(kind):
    """Batch-1 packed layers run as two fused kernel calls (mtp/kernels/decode_layer.cc), an
    implementation of the model's own cached layer (``Block.cached``, what the 'xla' backend runs):
    head 1's hidden states and the trunk's and head 1's cache entries within float rounding, and so
    is the unfused decode layout (heads 2..n draft from s8-quantized copies: lossy by design)."""
    from mtp.decode.cache import forward_layered, unstack_cache
    from mtp.model.cached import cached_forward, init_cache

    model = gguf_like(tiny_model(seed=2, n_future=3), kind)
    weights = dw.cached_decode_weights(model)
    stacked = init_cache(model.spec, 1, 32, 3)
    stacked = {**stacked, "trunk_k": stacked["trunk_k"] + 0.1 * jax.random.normal(jax.random.key(0),
                                                                                   stacked["trunk_k"].shape)}
    args = (jnp.array([[5, 9, 11, 4]], jnp.int32), jnp.array([3], jnp.int32), jnp.arange(4),
            np.tril(np.ones((4, 4), bool)))  # 4 new tokens after a prefix of 3 to attend to
    hidden, new = cached_forward(model, stacked, *args, 3)
    want = [np.asarray(hidden[0]), *(np.asarray(new[n][i, 0]) for n in ("trunk_k", "trunk_v", "head_v")
                                     for i in range(2 if n.startswith("trunk") else 1))]
    for fused in (True, False):
        settings = DecodeSettings(fused_layers=fused)

        def fwd(c, t, lengths, depth, block, settings=settings):
            return forward_layered(model, weights, c, t, lengths, depth, block, 3, settings)

        cache = unstack_cache(stacked)
        hlo = jax.jit(fwd).lower(cache, *args).as_text()
        assert hlo.count("mtp_layer_rest") == (5 if fused else 0)  # 2 trunk layers + 3 heads
        hidden, new = jax.jit(fwd)(cache, *args)
        got = [np.asarray(hidden[0]), *(np.asarray(c).reshape(want[1].shape) for n in ("trunk_k", "trunk_v", "head_v")
                                        for c in new[n][:2 if n.startswith("trunk") else 1])]
        for g, w in zip(got, want, strict=True):
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_the_fused_layer_names_a_bad_operand():
    from mtp.kernels.cpu import layer_qkv

    w = PackedMatrix(jnp.zeros((40, 32), jnp.float32), jnp.ones((40, 1), jnp.float32))  # q must be int8/uint8
    cs = jnp.zeros((1, 4), jnp.float32)
    with pytest.raises(Exception, match="wqkv: q must be int8"):
        jax.block_until_ready(layer_qkv(jnp.ones((1, 32)), jnp.ones(32), w, cs, cs, n_heads=3, n_kv_heads=1, eps=1e-5))


def test_a_long_prompt_prefills_through_float32_layers_with_the_same_output():
    """Packed weights keep float32 layers beside them for prompts of PREFILL_FLOAT_MIN_ROWS rows or
    more (XLA's matrix products); decode steps stay packed, and speculative output equals greedy."""
    model = gguf_like(tiny_model(seed=2, n_future=3), "Q4_1")
    prompts = [list(range(3, 3 + dw.PREFILL_FLOAT_MIN_ROWS + 5))]
    outs = {}
    for keep in (False, True):
        settings = DecodeSettings(prefill_float=keep)
        outs[keep] = generate(model, prompts, DecodeConfig("greedy", max_new_tokens=12, settings=settings),
                              pad_to=16).tokens
        assert dw.LAST_PACKING["prefill"] == ("float32" if keep else "packed")
        weights = dw.cached_decode_weights(model, settings)
        assert ("prefill" in weights) == keep
        assert isinstance(weights["trunk"][0]["wqkv"], PackedMatrix)
    assert not isinstance(weights["prefill"]["trunk"][0]["wqkv"], PackedMatrix)
    assert dw.prefill_weights(weights, dw.PREFILL_FLOAT_MIN_ROWS)["trunk"] is weights["prefill"]["trunk"]
    assert dw.prefill_weights(weights, 8)["trunk"] is weights["trunk"]  # short prompts stay packed
    assert outs[True] == outs[False]  # the same weights; only the products' rounding differs
    spec = generate(model, prompts, DecodeConfig("speculative", 3, None, max_new_tokens=12), pad_to=16)
    assert spec.tokens == outs[True]


def test_the_float32_prefill_layers_respect_their_memory_budget():
    model = gguf_like(tiny_model(seed=4, n_future=2), "Q8_0")
    small = DecodeSettings(prefill_float_max_bytes=1000)  # smaller than the tiny model's layers
    assert "prefill" not in dw.cached_decode_weights(model, small) and dw.LAST_PACKING["prefill"] == "packed"
    assert "prefill" in dw.cached_decode_weights(model)  # the default budget holds them
    with pytest.raises(ValueError, match="prefill_float_max_bytes='lots': use a whole number"):
        DecodeSettings(prefill_float_max_bytes="lots")
