"""Qwen3-Next: HF model_type "qwen3_next" (Qwen3NextForCausalLM), dense layers only.

The Qwen3.5 hybrid (edgert.models.qwen3_5) with the linear-attention projections fused:
in_proj_qkvz holds, per key head, [q (Dk), k (Dk), v (r*Dv), z (r*Dv)] rows and in_proj_ba
[b (r), a (r)], r = value heads per key head. Mixture-of-experts layers (the published
checkpoints' MLPs) are not supported here: a config must put every layer in mlp_only_layers
(or have num_experts 0).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from ..errors import UnsupportedError
from . import qwen3_5
from .qwen3_5 import hf_name, quant_policy  # noqa: F401 (the same HF reader hooks)

MODEL_TYPES = ("qwen3_next",)


@dataclass
class ModelArgs(qwen3_5.ModelArgs):
    num_experts: int = 0
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)

    def validate(self) -> None:
        super().validate()
        moe = [i for i in range(self.num_hidden_layers) if self.num_experts > 0
               and i not in self.mlp_only_layers and (i + 1) % self.decoder_sparse_step == 0]
        if moe:
            raise UnsupportedError(f"qwen3_next: mixture-of-experts layers {moe} are not "
                                   "supported (only dense layers: mlp_only_layers)")


class GatedDeltaNet(qwen3_5.GatedDeltaNet):
    """Qwen3NextGatedDeltaNet: the fused projections, un-interleaved per key head."""

    def make_projections(self, dim: int) -> None:
        self.in_proj_qkvz = nn.Linear(dim, 2 * self.key_dim + 2 * self.value_dim, bias=False)
        self.in_proj_ba = nn.Linear(dim, 2 * self.n_v, bias=False)

    def project(self, x: mx.array):
        B, L, _ = x.shape
        r = self.n_v // self.n_k
        qkvz = self.in_proj_qkvz(x).reshape(B, L, self.n_k, -1)  # per key head
        q, k, v, z = mx.split(qkvz, [self.dk, 2 * self.dk, 2 * self.dk + r * self.dv], axis=-1)
        b, a = mx.split(self.in_proj_ba(x).reshape(B, L, self.n_k, 2 * r), [r], axis=-1)
        qkv = mx.concatenate([t.reshape(B, L, -1) for t in (q, k, v)], axis=-1)
        return (qkv, z.reshape(B, L, self.n_v, self.dv), b.reshape(B, L, self.n_v),
                a.reshape(B, L, self.n_v))


class DecoderLayer(qwen3_5.DecoderLayer):
    linear_cls = GatedDeltaNet


class Model(qwen3_5.Model):
    def __init__(self, args: ModelArgs):
        super().__init__(args, DecoderLayer)
