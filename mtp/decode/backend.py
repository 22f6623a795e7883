"""Decode backends: how the decode loop (``mtp.decode.generate``) runs the model's layers.

- ``'xla'``: the model's own modules (``mtp.model.cached``: ``Block.cached``, the trunk scanned,
  heads by ``head_kind``), the stacked KV cache of ``mtp.model.kv_cache``. Runs on every platform
  and on device meshes (parameters, activations and cache follow the training rules); on GPU and TPU
  this is the path, with ``model.attention``'s kernel for prompt prefills.
- ``'cpu_kernels'``: the same layers computed by the hand-written CPU kernels (``mtp/kernels``) on
  the batch-1 decode layout of ``mtp.decode.weights`` (fused and ``[out, in]`` matrices, GGUF blocks,
  per-layer caches; ``mtp.decode.cache``), tested equal to the model's layers. One device only.

``DecodeSettings.backend='auto'`` picks ``cpu_kernels`` on a single-device CPU run where the kernels
build, else ``xla``. Both backends present the same interface and hand back the cache in the
stacked layout, so the decode loop is written once.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mtp.config import DecodeSettings
from mtp.decode import cache as layered
from mtp.decode.weights import cached_decode_weights, draft_unembed, linear, prefill_weights, project
from mtp.kernels.cpu import kernel_status, kernels_built
from mtp.model import cached, kv_cache
from mtp.model.heads import head_kind
from mtp.model.transformer import rms_norm


def resolve_backend(settings: DecodeSettings, *, n_devices: int = 1, spec=None) -> str:
    """``settings.backend`` as the backend that runs: 'auto' -> 'cpu_kernels' on a one-device CPU
    run where the kernels build, else 'xla'. 'cpu_kernels' where it cannot run raises ValueError.
    A ``spec`` with mask heads (``head_type='mask'``: gated LoRA, which the CPU kernels' merged
    decode layout cannot express) always runs the model's own layers: 'xla'."""
    on_cpu = jax.default_backend() == "cpu"
    masked = spec is not None and head_kind(spec).masked
    if masked and settings.backend == "cpu_kernels":
        raise ValueError("head_type='mask' decodes with the model's own layers (its LoRA adapters act on"
                         " the mask tokens only): use --decode-backend xla (or auto).")
    if settings.backend == "xla" or masked:
        return "xla"
    if settings.backend == "auto":
        return "cpu_kernels" if on_cpu and n_devices == 1 and kernels_built() else "xla"
    if not on_cpu:
        raise ValueError(f"decode backend 'cpu_kernels' runs on the CPU; this process's backend is"
                         f" {jax.default_backend()!r}: use --decode-backend xla (or auto).")
    if n_devices > 1:
        raise ValueError(f"decode backend 'cpu_kernels' runs on one device; this decode is on a mesh of"
                         f" {n_devices}: use --decode-backend xla (or auto).")
    if not kernels_built():
        raise ValueError(f"decode backend 'cpu_kernels' is unavailable here: {kernel_status()['reason']}."
                         " Use --decode-backend xla (or auto).")
    return "cpu_kernels"


@dataclasses.dataclass(frozen=True)
class XlaBackend:
    """The model's own layers (``mtp.model.cached``) on the stacked cache."""

    name = "xla"
    settings: DecodeSettings = DecodeSettings()

    def weights(self, model) -> dict:
        return {}  # the model's parameters are the weights

    def init_cache(self, spec, batch: int, max_len: int, n_heads: int) -> dict:
        return cached.init_cache(spec, batch, max_len, n_heads)

    def forward(self, model, weights, cache, tokens_BxT, lengths_B, depth_T, block_mask_TxT, n_heads: int, *,
                prefill: bool = False):
        return cached.cached_forward(model, cache, tokens_BxT, lengths_B, depth_T, block_mask_TxT, n_heads,
                                     prefill=prefill)

    def causal_drafts(self, model, weights, cache, seq_BxS, lengths_B, n_heads: int, window: int):
        return cached.cached_causal_drafts(model, cache, seq_BxS, lengths_B, n_heads, window)

    def logits(self, model, weights, hidden_xD):
        return model.project(hidden_xD)

    def draft_table(self, model, weights, ids):
        """``(ids_N, what draft_logits needs)`` for a draft vocabulary ``ids`` (sorted token ids)."""
        ids_N = jnp.asarray(ids, jnp.int32)
        return ids_N, ids_N

    def draft_logits(self, model, weights, hidden_xD, table):
        """Logits ``[..., N]`` over the draft vocabulary only."""
        return cached.draft_logits(model, hidden_xD, table)

    def compact(self, cache, lengths_B, path_BxD):
        return kv_cache.compact(cache, lengths_B, path_BxD)

    def stacked(self, cache, spec):
        """The cache in the stacked layout of ``mtp.model.kv_cache``."""
        return cache


@dataclasses.dataclass(frozen=True)
class CpuKernelBackend:
    """The CPU kernels on the batch-1 decode layout (``mtp.decode.weights`` / ``mtp.decode.cache``)."""

    name = "cpu_kernels"
    settings: DecodeSettings = DecodeSettings()

    def weights(self, model) -> dict:
        return cached_decode_weights(model, self.settings)

    def init_cache(self, spec, batch: int, max_len: int, n_heads: int) -> dict:
        return layered.unstack_cache(XlaBackend().init_cache(spec, batch, max_len, n_heads))

    def forward(self, model, weights, cache, tokens_BxT, lengths_B, depth_T, block_mask_TxT, n_heads: int, *,
                prefill: bool = False):
        w = prefill_weights(weights, tokens_BxT.size) if prefill else weights
        return layered.forward_layered(model, w, cache, tokens_BxT, lengths_B, depth_T, block_mask_TxT, n_heads,
                                       self.settings)

    def causal_drafts(self, model, weights, cache, seq_BxS, lengths_B, n_heads: int, window: int):
        return layered.causal_drafts_layered(model, weights, cache, seq_BxS, lengths_B, n_heads, window,
                                             self.settings)

    def logits(self, model, weights, hidden_xD):
        return project(weights, hidden_xD, model.spec.norm_eps, self.settings)

    def draft_table(self, model, weights, ids):
        return draft_unembed(weights, ids)

    def draft_logits(self, model, weights, hidden_xD, unembed):
        return linear(rms_norm(hidden_xD, weights["final_norm"], model.spec.norm_eps), unembed, self.settings)

    def compact(self, cache, lengths_B, path_BxD):
        return layered.compact_cache(cache, lengths_B, path_BxD)

    def stacked(self, cache, spec):
        """The per-layer caches (``[B*K, S, H]`` each) in the stacked layout of ``mtp.model.kv_cache``."""
        C, S, _ = cache["trunk_k"][0].shape
        like = cached.init_cache(spec, C // spec.n_kv_heads, S, max(len(cache["head_k"]), 1))
        return layered.stack_cache(cache, like)


def make_backend(settings: DecodeSettings, *, n_devices: int = 1, spec=None):
    """The backend ``resolve_backend`` names, for a model of ``spec`` (optional)."""
    name = resolve_backend(settings, n_devices=n_devices, spec=spec)
    return (CpuKernelBackend if name == "cpu_kernels" else XlaBackend)(settings)
