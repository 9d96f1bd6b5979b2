"""BitNet b1.58: HF model_type "bitnet" — Llama with an RMSNorm before o_proj and down_proj
and a squared-ReLU gated MLP. Its projections become edgert.layers.BitLinear when the package
carries `weight_scale` tensors (edgert.layers.swap_layers)."""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from . import llama

MODEL_TYPES = ("bitnet",)


@dataclass
class ModelArgs(llama.ModelArgs):
    rms_norm_eps: float = 1e-5
    rope_theta: float = 500000.0
    tie_word_embeddings: bool = False


class Attention(llama.Attention):
    def __init__(self, args: ModelArgs):
        super().__init__(args)
        self.attn_sub_norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def output(self, out: mx.array) -> mx.array:
        return self.o_proj(self.attn_sub_norm(out))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, hidden, bias = args.hidden_size, args.intermediate_size, args.mlp_bias
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)
        self.ffn_sub_norm = nn.RMSNorm(hidden, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.ffn_sub_norm(nn.relu2(self.gate_proj(x)) * self.up_proj(x)))


class Model(llama.Model):
    def __init__(self, args: ModelArgs):
        super().__init__(args, attention_cls=Attention)
        for layer in self.model.layers:
            layer.mlp = MLP(args)
