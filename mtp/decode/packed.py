"""Packed decode matrices: a model imported from a quantized GGUF decodes from the blocks it was
dequantized from, not from float32 copies.

``mtp convert --gguf`` stores float32 weights, each one exactly ``d * q`` (Q8_0, Q4_0) or
``d * q + m`` (Q4_1) for its block of 32. Batch-1 decoding reads every weight once per token, so
reading 8-bit or 4-bit blocks instead of float32 cuts the bytes 4-6x. ``pack_exact`` recovers the
blocks from the float32 matrix and keeps them only when dequantizing them gives back every weight
bitwise (``d * q`` then ``+ m``, in float32, as gguf's own code does). ``mtp.kernels.packed_matmul``
converts each block to float32 weights in registers (``q * d``: the imported weight bit for bit;
``fma(q, d, m)``: within one rounding of it) and multiplies, within float rounding of the float32
product and with every row independent of the block size, so decoding from packed weights keeps
the model's weights and speculative output equal to plain greedy.

Every trunk layer must pack for any packing to happen; the unembedding packs when it can (some
GGUFs keep it F16/F32). The drafting heads (2..n, trained here in
float32) are the one lossy exception: they are quantized like Q8_0 (``quantize_s8``) when the trunk
is packed, because they only propose tokens; the model's next-token head and the trunk check every
proposal, so the output stays the model's own greedy output (only acceptance can move).
``DecodeSettings.packed_weights=False`` (``--no-packed-weights``) turns packing off; it also needs the
CPU kernels (``mtp.kernels``).
"""

from __future__ import annotations

import jax
import numpy as np

from mtp.config import DecodeSettings
from mtp.kernels import rows_matmul_available

BLOCK = 32
S8_LEVELS = (127, 8)  # the largest |q| of a block: Q8_0 (d = amax / 127), Q4_0 (d = max / -8)
MATRICES = ("wqkv", "wo", "wgu", "wdown")


@jax.tree_util.register_pytree_node_class
class PackedMatrix:
    """``W [O, I]`` in blocks of 32 along ``I``: ``q`` int8 ``[O, I]`` with ``W = d * q`` (``m`` None),
    or ``q`` uint8 ``[O, I / 2]`` (two 4-bit values a byte) with ``W = d * q + m``; ``d``, ``m``
    float32 ``[O, I / 32]``. ``q8x``: multiply with int8-quantized activations (``packed_matmul``)."""

    def __init__(self, q, d, m=None, q8x: bool = False):
        self.q, self.d, self.m, self.q8x = q, d, m, q8x

    def tree_flatten(self):
        return (self.q, self.d, self.m), self.q8x

    @classmethod
    def tree_unflatten(cls, q8x, children):
        return cls(*children, q8x=q8x)

    @property
    def kind(self) -> str:
        return "s8" if self.m is None else "u4"

    @property
    def shape(self) -> tuple[int, int]:
        return self.d.shape[0], self.d.shape[1] * BLOCK

    @property
    def nbytes(self) -> int:
        return sum(int(a.size) * a.dtype.itemsize for a in (self.q, self.d, self.m) if a is not None)

    def dequantize(self) -> np.ndarray:
        """The float32 ``[O, I]`` matrix (numpy), by the kernel's operations."""
        q, d = np.asarray(self.q), np.asarray(self.d)[..., None]
        n_out = self.shape[0]
        if self.m is None:
            return (q.reshape(n_out, -1, BLOCK).astype(np.float32) * d).reshape(self.shape)
        nib = q.reshape(n_out, -1, BLOCK // 2)
        q32 = np.concatenate([nib & 15, nib >> 4], axis=-1).astype(np.float32)
        return (q32 * d + np.asarray(self.m)[..., None]).reshape(self.shape)


def _blocks(w_OxI: np.ndarray) -> np.ndarray | None:
    w = np.asarray(w_OxI)
    if w.ndim != 2 or w.dtype != np.float32 or w.shape[1] % BLOCK:
        return None
    return w.reshape(w.shape[0], -1, BLOCK)


def _s8(b: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    amax = np.abs(b).max(-1)
    for levels in S8_LEVELS:
        d = (amax / np.float32(levels)).astype(np.float32)
        q = np.rint(b / np.where(d == 0, np.float32(1), d)[..., None])
        if np.abs(q).max(initial=0) > 127:
            continue
        q8 = q.astype(np.int8)
        if np.array_equal(q8.astype(np.float32) * d[..., None], b):
            return q8, d
    return None


def _u4(b: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    m = b.min(-1)
    d_raw = ((b.max(-1) - m) / np.float32(15)).astype(np.float32)
    with np.errstate(over="ignore"):
        d_half = d_raw.astype(np.float16).astype(np.float32)  # GGUF stores d as float16
    for d in (d_half, d_raw):
        q = np.rint((b - m[..., None]) / np.where(d == 0, np.float32(1), d)[..., None])
        if not np.isfinite(q).all() or q.min(initial=0) < 0 or q.max(initial=0) > 15:
            continue
        q4 = q.astype(np.uint8)
        if np.array_equal(q4.astype(np.float32) * d[..., None] + m[..., None], b):
            return q4, d, m
    return None


def pack_exact(w_OxI) -> PackedMatrix | None:
    """``w`` as ``d * q`` (int8) or ``d * q + m`` (4-bit) blocks of 32 along its rows when that
    gives back every weight exactly, else None. The first row is tried alone first (cheap rejection
    of a matrix that was never quantized)."""
    b = _blocks(w_OxI)
    if b is None:
        return None
    for fit in (_s8, _u4):
        if fit(b[:1]) is None:
            continue
        got = fit(b)
        if got is None:
            continue
        if len(got) == 2:
            q, d = got
            return PackedMatrix(q.reshape(q.shape[0], -1), d)
        q, d, m = got
        nib = q[..., : BLOCK // 2] | (q[..., BLOCK // 2:] << 4)
        return PackedMatrix(nib.reshape(q.shape[0], -1), d, m)
    return None


def quantize_s8(w_OxI) -> PackedMatrix | None:
    """Lossy Q8_0-style blocks (``d = amax / 127`` rounded to float16, ``q = round(w / d)``); None
    when the input size is not a multiple of 32."""
    b = _blocks(w_OxI)
    if b is None:
        return None
    d = (np.abs(b).max(-1) / np.float32(127)).astype(np.float16).astype(np.float32)
    q = np.clip(np.rint(b / np.where(d == 0, np.float32(1), d)[..., None]), -127, 127).astype(np.int8)
    return PackedMatrix(q.reshape(q.shape[0], -1), d)


def activations_int8(settings: DecodeSettings) -> bool:
    """``settings.packed_activations == 'int8'``: packed products quantize activations to int8 blocks
    (like llama.cpp; ~2x faster products, outputs no longer those of the float model)."""
    return settings.packed_activations == "int8"


def packing_enabled(settings: DecodeSettings) -> bool:
    """Whether decode weights that are exactly GGUF blocks decode from the blocks: the setting is on
    and the CPU kernels run (``settings.backend``)."""
    if not settings.packed_weights or jax.default_backend() != "cpu":
        return False
    return rows_matmul_available(settings)


def _out_in(w) -> np.ndarray:
    """A decode matrix stored with ``out_in=True`` as ``[O, I]`` (square ones are kept ``[I, O]``)."""
    w = np.asarray(w)
    return np.ascontiguousarray(w.T) if w.shape[0] == w.shape[1] else w


def may_pack(model) -> bool:
    """A cheap first look (one row of the first layer's query matrix): could this model's weights
    be GGUF blocks? Saves building a second copy of a float model's decode weights."""
    wq = np.asarray(model.trunk.attn.wq[...][0], np.float32)  # [D, N, H]
    return pack_exact(np.ascontiguousarray(wq.reshape(wq.shape[0], -1)[:, :1].T)) is not None


def pack_decode_weights(weights: dict, q8x: bool = False) -> tuple[dict, dict]:
    """Decode weights (``out_in`` layout) with every exactly packable matrix packed (all trunk
    layers must pack; the unembedding packs when it can), and, when the trunk packed, the drafting
    heads' matrices quantized (``quantize_s8``). Returns the new weights and a report: matrices
    packed ``exact``, quantized for drafting (``drafts_s8``), left ``float32``, and the bytes of all
    of them before and after; when the trunk does not pack entirely, the weights come back
    unchanged (report 'exact' = 0). ``q8x``: every packed matrix multiplies with int8 activations
    (``activations_int8``)."""
    report = {"exact": 0, "drafts_s8": 0, "float32": 0, "bytes_before": 0, "bytes_after": 0}

    def exact_layers(layers):
        out = []
        for lw in layers:
            new = dict(lw)
            for key in MATRICES:
                p = pack_exact(_out_in(lw[key]))
                if p is None:
                    return None
                new[key] = p
            out.append(new)
        return out

    trunk = exact_layers(weights["trunk"])
    if trunk is None:
        return weights, report
    unembed = pack_exact(_out_in(weights["unembed"]))  # GGUFs may keep it in F16/F32: then it stays
    new = dict(weights, trunk=trunk, unembed=unembed if unembed is not None else weights["unembed"])
    heads = weights["heads"]
    if heads and all(isinstance(h, dict) and "wqkv" in h for h in heads):
        head1 = exact_layers(heads[:1])
        drafting = []
        for lw in heads[1:]:
            packed = {k: quantize_s8(_out_in(lw[k])) for k in MATRICES}
            drafting.append({**lw, **{k: v for k, v in packed.items() if v is not None}})
        if head1 is not None:
            new["heads"] = head1 + drafting
    for group in ("trunk", "heads"):
        for i, (before, after) in enumerate(zip(weights[group], new[group])):
            for key in MATRICES:
                if key in before:
                    report["bytes_before"] += int(np.asarray(before[key]).nbytes)
                    a = after[key]
                    packed = isinstance(a, PackedMatrix)
                    kind = "float32" if not packed else ("drafts_s8" if group == "heads" and i else "exact")
                    report[kind] += 1
                    report["bytes_after"] += a.nbytes if packed else int(np.asarray(a).nbytes)
    report["exact" if unembed is not None else "float32"] += 1
    report["bytes_before"] += int(np.asarray(weights["unembed"]).nbytes)
    report["bytes_after"] += unembed.nbytes if unembed is not None else int(np.asarray(weights["unembed"]).nbytes)
    report["activations"] = "int8" if q8x else "float32"
    if q8x:
        new = jax.tree.map(lambda a: PackedMatrix(a.q, a.d, a.m, q8x=True) if isinstance(a, PackedMatrix) else a, new,
                           is_leaf=lambda a: isinstance(a, PackedMatrix))
    return jax.tree.map(jax.numpy.asarray, new), report
