"""Qwen3-Next (Qwen3-Next-80B-A3B): HF model_type "qwen3_next" (Qwen3NextForCausalLM).

The Qwen3.5 hybrid (edgert.models.qwen3_5) with the linear-attention projections fused:
in_proj_qkvz holds, per key head, [q (Dk), k (Dk), v (r*Dv), z (r*Dv)] rows and in_proj_ba
[b (r), a (r)], r = value heads per key head. On every `decoder_sparse_step`-th layer not in
`mlp_only_layers`, Qwen3.5-MoE's block: a softmax top-k router (renormalised if
`norm_topk_prob`) over routed experts plus a shared expert scaled by
sigmoid(shared_expert_gate(x)); the other layers keep a dense MLP. Package names as
qwen3_5_moe's (mlx-lm's): `mlp.gate`, `mlp.switch_mlp.*`, `mlp.shared_expert.*`,
`mlp.shared_expert_gate`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from . import qwen3_5, qwen3_5_moe
from .base import GGUFSpec
from .qwen3_5 import hf_name  # noqa: F401 (the same HF reader hooks)
from .qwen3_5_moe import quant_policy  # noqa: F401 (routers, shared gates at 8 bits)
from .qwen3_moe import hf_fused, hf_stack  # noqa: F401 (the same expert layouts)
from .switch import check_experts

MODEL_TYPES = ("qwen3_next",)


@dataclass
class ModelArgs(qwen3_5.ModelArgs):
    num_experts: int = 0
    num_experts_per_tok: int = 10
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 512
    norm_topk_prob: bool = True
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)

    def validate(self) -> None:
        super().validate()
        if any(self.is_sparse(i) for i in range(self.num_hidden_layers)):
            check_experts(self.num_experts, self.num_experts_per_tok)

    def is_sparse(self, layer: int) -> bool:
        """Whether layer `layer` routes to experts (else it has a dense MLP)."""
        return (self.num_experts > 0 and layer not in self.mlp_only_layers
                and (layer + 1) % self.decoder_sparse_step == 0)


class GatedDeltaNet(qwen3_5.GatedDeltaNet):
    """Qwen3NextGatedDeltaNet: the fused projections, un-interleaved per key head. A package
    converted from llama.cpp's GGUF holds qkv and z apart (in_proj_qkv, in_proj_z: as Qwen3.5;
    their types may differ, e.g. Q8_0 and Q4_K): `split_projections` takes that layout."""

    def make_projections(self, dim: int) -> None:
        self.in_proj_qkvz = nn.Linear(dim, 2 * self.key_dim + 2 * self.value_dim, bias=False)
        self.in_proj_ba = nn.Linear(dim, 2 * self.n_v, bias=False)

    def split_projections(self) -> None:
        dim = self.in_proj_qkvz.weight.shape[1]
        del self.in_proj_qkvz
        self.in_proj_qkv = nn.Linear(dim, self.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(dim, self.value_dim, bias=False)

    def project(self, x: mx.array):
        B, L, _ = x.shape
        r = self.n_v // self.n_k
        b, a = mx.split(self.in_proj_ba(x).reshape(B, L, self.n_k, 2 * r), [r], axis=-1)
        b, a = b.reshape(B, L, self.n_v), a.reshape(B, L, self.n_v)
        if "in_proj_qkvz" not in self:  # split layout
            return self.in_proj_qkv(x), self.in_proj_z(x).reshape(B, L, self.n_v, self.dv), b, a
        qkvz = self.in_proj_qkvz(x).reshape(B, L, self.n_k, -1)  # per key head
        q, k, v, z = mx.split(qkvz, [self.dk, 2 * self.dk, 2 * self.dk + r * self.dv], axis=-1)
        qkv = mx.concatenate([t.reshape(B, L, -1) for t in (q, k, v)], axis=-1)
        return qkv, z.reshape(B, L, self.n_v, self.dv), b, a


class DecoderLayer(qwen3_5.DecoderLayer):
    linear_cls = GatedDeltaNet


class Model(qwen3_5.Model):
    def __init__(self, args: ModelArgs):
        super().__init__(args, DecoderLayer)
        for i, layer in enumerate(self.layers):
            if args.is_sparse(i):
                layer.mlp = qwen3_5_moe.SparseMoeBlock(args)

    def sanitize(self, weights: dict) -> dict:
        """Qwen3.5's; linear layers whose package holds in_proj_qkv / in_proj_z apart (from a
        GGUF) take the split layout."""
        weights = super().sanitize(weights)
        for i, layer in enumerate(self.layers):
            if f"model.layers.{i}.linear_attn.in_proj_qkv.weight" in weights:
                layer.linear_attn.split_projections()
        return weights


# ------------------------------------------------------------------ GGUF (llama.cpp "qwen3next")
#
# llama.cpp's converter (conversion/qwen.py, Qwen3NextModel) splits in_proj_qkvz into attn_qkv
# [q, k, v] and attn_gate (z), keeps in_proj_ba as ssm_ba, and changes the values as for
# Qwen3.5 (norms 1 + w, ssm_a = -exp(A_log), conv1d (C, K)) but without reordering value heads.
# Its qwen3next routes every layer and renormalises the top-k weights.

GGUF_TENSORS = ({k: v for k, v in qwen3_5.GGUF_TENSORS.items()
                 if k not in ("ssm_beta", "ssm_alpha")}
                | {"ssm_ba": "linear_attn.in_proj_ba"} | qwen3_5_moe.MOE_GGUF_TENSORS)


def gguf_config(meta, config: dict) -> dict:
    return {**qwen3_5_moe.gguf_config(meta, config), "norm_topk_prob": True,
            "decoder_sparse_step": 1, "mlp_only_layers": []}


def gguf_transform(name: str, value, config: dict):
    """A GGUF tensor (float32 array or QuantTensor) in HF's convention (see above)."""
    import numpy as np

    from ..errors import EdgertError
    from ..quant import QuantTensor

    if name.endswith(".shared_expert_gate.weight") and value.ndim == 1:
        return value[None, :]  # llama-quantize writes (1, H) as 1-D
    if name.endswith(qwen3_5.ZERO_CENTRED_NORMS):
        return value - 1.0
    if name.endswith("linear_attn.A_log"):
        return np.log(-value)
    if name.endswith("conv1d.weight"):
        if isinstance(value, QuantTensor):
            raise EdgertError(f"{name}: a quantized conv1d kernel is not supported")
        return value[:, None, :]  # (C, K) -> HF (C, 1, K)
    return value


GGUF = GGUFSpec("qwen3next", "Qwen3NextForCausalLM", GGUF_TENSORS, config=gguf_config,
                transform=gguf_transform, leaves=qwen3_5.GGUF_LEAVES)
