"""Qwen3.5-MoE / Qwen3.6-MoE (Qwen3.5-35B-A3B): HF model_types "qwen3_5_moe_text" and
"qwen3_5_moe" (the vision-language wrapper; its vision tower is left out) — Qwen3.5's hybrid
layers (edgert.models.qwen3_5) with, on every layer, a softmax top-k router over routed
experts (weights renormalised to sum 1) plus a shared SwiGLU expert scaled by
sigmoid(shared_expert_gate(x)).

Package names: `mlp.gate.weight` (E, H) router, `mlp.switch_mlp.{gate,up,down}_proj.weight`
(E, out, in), `mlp.shared_expert.{gate,up,down}_proj.weight`, `mlp.shared_expert_gate.weight`
(1, H). Experts are stacked by the HF reader as for qwen3_moe (hf_stack / hf_fused).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from . import qwen3_5
from .base import GGUFSpec
from .qwen3_moe import hf_fused, hf_stack  # noqa: F401 (the same expert layouts)
from .switch import SwitchGLU, check_experts, topk_softmax

MODEL_TYPES = ("qwen3_5_moe", "qwen3_5_moe_text")


@dataclass
class ModelArgs(qwen3_5.ModelArgs):
    num_experts: int = 0
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 512
    shared_expert_intermediate_size: int = 512

    def validate(self) -> None:
        super().validate()
        check_experts(self.num_experts, self.num_experts_per_tok)


class SparseMoeBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim = args.hidden_size
        self.top_k = args.num_experts_per_tok
        self.norm_topk_prob = getattr(args, "norm_topk_prob", True)  # Qwen3-Next's is a setting
        self.gate = nn.Linear(dim, args.num_experts, bias=False)  # router
        self.switch_mlp = SwitchGLU(dim, args.moe_intermediate_size, args.num_experts)
        self.shared_expert = qwen3_5.MLP(dim, args.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(dim, 1, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        """(B, L, D) -> (B, L, D)."""
        inds, scores = topk_softmax(self.gate(x), self.top_k, self.norm_topk_prob)  # (B, L, k)
        y = self.switch_mlp(x, inds)  # (B, L, k, D)
        routed = (y * scores[..., None].astype(y.dtype)).sum(axis=-2)
        return routed + mx.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)


class DecoderLayer(qwen3_5.DecoderLayer):
    def __init__(self, args: ModelArgs, layer_type: str):
        super().__init__(args, layer_type)
        self.mlp = SparseMoeBlock(args)


class Model(qwen3_5.Model):
    def __init__(self, args: ModelArgs):
        super().__init__(args, DecoderLayer)


hf_name = qwen3_5.hf_name


def quant_policy(name: str, shape: tuple, config: dict):
    """Routers and shared-expert gates at 8 bits (as mlx-lm); otherwise Qwen3.5's policy."""
    if name.endswith((".mlp.gate.weight", ".shared_expert_gate.weight")):
        return {"bits": 8, "group_size": 64}
    return qwen3_5.quant_policy(name, shape, config)


# ------------------------------------------------------------------ GGUF (llama.cpp "qwen35moe")
#
# Qwen3.5's tensors and transforms (norm shift, ssm_a, conv layout, V-head reorder) plus the
# experts: ffn_gate_inp (E, H) router, ffn_{gate,up,down}_exps (E, out, in) (or
# ffn_gate_up_exps, gate rows then up rows), the shared expert *_shexp and its gate
# ffn_gate_inp_shexp (1, H). llama.cpp's qwen35moe always renormalises the top-k weights.

MOE_GGUF_TENSORS = {
    "ffn_gate_inp": "mlp.gate", "ffn_gate_exps": "mlp.switch_mlp.gate_proj",
    "ffn_up_exps": "mlp.switch_mlp.up_proj", "ffn_down_exps": "mlp.switch_mlp.down_proj",
    "ffn_gate_up_exps": ("mlp.switch_mlp.gate_proj", "mlp.switch_mlp.up_proj"),
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj", "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}


def gguf_config(meta, config: dict) -> dict:
    """Qwen3.5's keys plus the expert metadata (expert_count, expert_used_count, the routed
    and shared experts' widths)."""
    return {**qwen3_5.gguf_config(meta, config),
            "num_experts": int(meta.need("expert_count")),
            "num_experts_per_tok": int(meta.need("expert_used_count")),
            "moe_intermediate_size": int(meta.need("expert_feed_forward_length")),
            "shared_expert_intermediate_size":
                int(meta.need("expert_shared_feed_forward_length"))}


def gguf_transform(name: str, value, config: dict):
    """Qwen3.5's transforms; the shared-expert gate back to (1, H) (llama-quantize writes a
    (1, H) tensor as 1-D: ggml drops trailing dimensions of 1)."""
    if name.endswith(".shared_expert_gate.weight") and value.ndim == 1:
        return value[None, :]
    return qwen3_5.gguf_transform(name, value, config)


GGUF = GGUFSpec("qwen35moe", "Qwen3_5MoeForCausalLM",
                {k: v for k, v in qwen3_5.GGUF_TENSORS.items()
                 if not k.startswith(("ffn_gate", "ffn_up", "ffn_down"))} | MOE_GGUF_TENSORS,
                config=gguf_config, transform=gguf_transform, leaves=qwen3_5.GGUF_LEAVES)
