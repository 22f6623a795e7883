"""``ModelSpec``: the resolved, immutable model shape built from ``config.model``."""

from __future__ import annotations

import dataclasses
import math

from mtp.config import ModelConfig
from mtp.model.heads import head_kind
from mtp.model.masked import mask_anchors as anchor_positions


@dataclasses.dataclass(frozen=True)
class ModelSpec(ModelConfig):
    """``config.model`` as an immutable value (the fields and defaults are ``ModelConfig``'s), with the
    sizes derived from it."""

    @classmethod
    def from_config(cls, model_cfg) -> ModelSpec:
        """Keys the schema lacks are dropped; keys an older run's config.json lacks take their defaults."""
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in dict(model_cfg).items() if k in fields})

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def resolved_d_ff(self) -> int:
        return self.d_ff or 64 * math.ceil(8 * self.d_model / 3 / 64)

    @property
    def trunk_layers(self) -> int:
        """Paper's parameter matching: n_future-1 transformer heads replace n_future-1 trunk layers."""
        return self.n_layers - (self.n_future - 1) if self.parameter_matched else self.n_layers

    def std(self, fan_in: int) -> float:
        """Init std of a matrix with this fan-in: 1/sqrt(fan_in) keeps activations and logits at
        unit scale for any width (a fixed 0.02 suits d~1000 but starves small models)."""
        return self.init_std or 1.0 / math.sqrt(fan_in)

    def out_std(self, fan_in: int) -> float:
        """Projections that write into the residual stream shrink with depth (GPT-2 style)."""
        return self.std(fan_in) / math.sqrt(2 * (self.trunk_layers + 1))

    # --- analytic sizes -------------------------------------------------------------------
    def layer_params(self) -> int:
        D, H, F = self.d_model, self.resolved_head_dim, self.resolved_d_ff
        attn = D * H * (2 * self.n_heads + 2 * self.n_kv_heads)
        return attn + 3 * D * F + 2 * D

    def lora_layer_params(self) -> int:
        """LoRA factors of one transformer layer: r * (fan_in + fan_out) per projection."""
        D, H, F = self.d_model, self.resolved_head_dim, self.resolved_d_ff
        NH, KH = self.n_heads * H, self.n_kv_heads * H
        per_rank = (D + NH) + 2 * (D + KH) + (NH + D) + 2 * (D + F) + (F + D)
        return self.lora_rank * per_rank

    def head_params(self) -> int:
        if head_kind(self).layer:
            per = self.layer_params() + self.lora_layer_params()
        else:
            per = self.d_model ** 2 + (self.d_model if head_kind(self).bias else 0)
        stored = head_kind(self).n_stacked(self.n_future) if head_kind(self).layer else self.n_future
        return stored * per + self.causal_params() + self.mask_params()

    def mask_params(self) -> int:
        """head_type='mask': the mask embeddings and the sampler (``mtp.model.masked``)."""
        D = self.d_model
        return (self.n_future - 1) * D + 3 * D * D + 2 * D if head_kind(self).masked else 0

    def causal_params(self) -> int:
        """Sequential heads 2..n: a [2D, D] combining projection and two norms each (one if shared)."""
        D, kind = self.d_model, head_kind(self)
        return (kind.n_stacked(self.n_future) - 1) * (2 * D * D + 2 * D) if kind.sequential else 0

    @property
    def max_decode_heads(self) -> int:
        """The most heads speculative decoding may use (``HeadKind.max_heads``)."""
        return head_kind(self).max_heads(self.n_future)

    def mix_params(self) -> int:
        return self.n_future * (self.trunk_layers + 1) if self.hidden_mix == "weighted" else 0

    def param_count(self) -> int:
        embed = self.vocab_size * self.d_model
        unembed = 0 if self.tie_embeddings else embed
        trunk = self.trunk_layers * (self.layer_params() + self.lora_layer_params())
        return embed + unembed + trunk + self.head_params() + self.mix_params() + self.d_model

    def flops_per_token(self, seq_len: int, mask_anchors: int = 0) -> float:
        """Training FLOPs per token (forward + backward = 3x forward) of trunk, heads and the
        n_future unembeddings; attention scores counted with the causal half. ``head_type='mask'``:
        the tokens' pass through every layer and one unembedding, plus the ``P * (n_future - 1)``
        mask rows per row of ``seq_len`` tokens (``P`` from ``loss.mask_anchors``), each through
        every layer, the sampler and the unembedding."""
        D, H = self.d_model, self.resolved_head_dim
        kind = head_kind(self)
        layer_mm = self.layer_params() - 2 * D + self.lora_layer_params()
        attn_scores = 2 * 2 * self.n_heads * H * seq_len / 2  # QK^T and AV, causal half
        layer = 2 * layer_mm + attn_scores
        unembed = 2 * D * self.vocab_size
        if kind.masked:
            rows_per_token = len(anchor_positions(seq_len, mask_anchors)) * (self.n_future - 1) / seq_len
            layers = self.trunk_layers + kind.n_stacked(self.n_future)
            one_row = layers * layer + unembed
            return 3.0 * (one_row + rows_per_token * (one_row + 2 * 3 * D * D))  # sampler: [2D, D] + [D, D]
        head = layer if kind.layer else 2 * D * D
        forward = self.trunk_layers * layer + self.n_future * (head + unembed)
        forward += (self.n_future - 1) * 2 * 2 * D * D if kind.sequential else 0
        return 3.0 * forward
