"""Qwen3-MoE (Qwen3-30B-A3B, Qwen3-235B-A22B): HF model_type "qwen3_moe" — Qwen3 attention,
and on every `decoder_sparse_step`-th layer not in `mlp_only_layers` a softmax top-k router
over `num_experts` SwiGLU experts (the other layers keep a dense MLP).

Package names are mlx-lm's: `mlp.gate.weight` (E, H) router, `mlp.switch_mlp.{gate,up,down}_proj
.weight` (E, out, in) experts. HF checkpoints store each expert apart
(`mlp.experts.{e}.gate_proj.weight`) or fused (`mlp.experts.gate_up_proj` (E, 2I, H),
`mlp.experts.down_proj` (E, H, I)); the HF reader stacks them through `hf_stack` / `hf_fused`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from . import llama
from .base import LLAMA_GGUF_TENSORS, GGUFSpec
from .switch import SwitchGLU, check_experts, fused_gate_up, topk_softmax

MODEL_TYPES = ("qwen3_moe",)


@dataclass
class ModelArgs(llama.ModelArgs):
    rope_theta: float = 1000000.0
    tie_word_embeddings: bool = False
    num_experts: int | None = None
    num_local_experts: int | None = None  # transformers >= 5 names num_experts so
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    norm_topk_prob: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.num_experts is None:
            self.num_experts = self.num_local_experts or 0
        check_experts(self.num_experts, self.num_experts_per_tok)

    def is_sparse(self, layer: int) -> bool:
        """Whether layer `layer` routes to experts (else it has a dense MLP)."""
        return (layer not in self.mlp_only_layers and self.num_experts > 0
                and (layer + 1) % self.decoder_sparse_step == 0)


class SparseMoeBlock(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k, self.norm_topk_prob = args.num_experts_per_tok, args.norm_topk_prob
        self.gate = nn.Linear(args.hidden_size, args.num_experts, bias=False)  # router
        self.switch_mlp = SwitchGLU(args.hidden_size, args.moe_intermediate_size,
                                    args.num_experts)

    def __call__(self, x: mx.array) -> mx.array:
        """(B, L, D) -> (B, L, D): the routing-weighted sum of the top-k experts' outputs."""
        inds, scores = topk_softmax(self.gate(x), self.top_k, self.norm_topk_prob)  # (B, L, k)
        y = self.switch_mlp(x, inds)  # (B, L, k, D)
        return (y * scores[..., None].astype(y.dtype)).sum(axis=-2)


class Model(llama.Model):
    def __init__(self, args: ModelArgs):
        super().__init__(args, qk_norm=True)
        for i, layer in enumerate(self.model.layers):
            if args.is_sparse(i):
                layer.mlp = SparseMoeBlock(args)

    def sanitize(self, weights: dict) -> dict:
        """Stack per-expert tensors (a package written by another tool) into switch_mlp."""
        weights = super().sanitize(weights)
        for key in [k for k in weights if k.endswith(".mlp.experts.0.up_proj.weight")]:
            prefix = key.removesuffix(".experts.0.up_proj.weight")
            for proj in ("gate_proj", "up_proj", "down_proj"):
                for leaf in ("weight", "scales", "biases"):
                    parts = [weights.pop(f"{prefix}.experts.{e}.{proj}.{leaf}", None)
                             for e in range(self.args.num_experts)]
                    if parts[0] is not None:
                        weights[f"{prefix}.switch_mlp.{proj}.{leaf}"] = mx.stack(parts)
        return weights


# ------------------------------------------------------------------ for the HF reader

_PER_EXPERT = re.compile(r"(.+\.mlp)\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
_FUSED = re.compile(r"(.+\.mlp)\.experts\.(gate_up_proj|down_proj)")


def hf_config(config: dict) -> dict:
    """The package config: mlx-lm's names (num_experts, rope_theta) beside transformers 5's."""
    config = dict(config)
    if "num_experts" not in config and "num_local_experts" in config:
        config["num_experts"] = config["num_local_experts"]
    if "rope_theta" not in config and "rope_theta" in (config.get("rope_parameters") or {}):
        config["rope_theta"] = config["rope_parameters"]["rope_theta"]
    return config


def hf_stack(name: str, config: dict) -> tuple[str, int] | None:
    """`model.layers.N.mlp.experts.E.up_proj.weight` -> (`...mlp.switch_mlp.up_proj.weight`, E)."""
    m = _PER_EXPERT.fullmatch(name)
    return (f"{m[1]}.switch_mlp.{m[3]}.weight", int(m[2])) if m else None


def hf_fused(name: str, config: dict):
    """transformers' fused experts: gate_up_proj (E, 2I, H) is gate then up along the output
    axis; down_proj (E, H, I) is already (E, out, in). -> ([package names], split) or None."""
    m = _FUSED.fullmatch(name)
    if m is None:
        return None
    return fused_gate_up(f"{m[1]}.switch_mlp", m[2])


def quant_policy(name: str, shape: tuple, config: dict):
    """Routers stay at 8 bits (as mlx-lm's quant_predicate)."""
    if name.endswith(".mlp.gate.weight"):
        return {"bits": 8, "group_size": 64}
    return None


# ------------------------------------------------------------------ GGUF (llama.cpp "qwen3moe")


def gguf_config(meta, config: dict) -> dict:
    """llama.cpp's expert metadata; its qwen3moe routes every layer and always renormalises
    the top-k weights (src/models/qwen3moe.cpp: build_moe_ffn(..., norm_w = true, ...))."""
    return {**config, "num_experts": int(meta.need("expert_count")),
            "num_experts_per_tok": int(meta.need("expert_used_count")),
            "moe_intermediate_size": int(meta.need("expert_feed_forward_length")),
            "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": []}


# the experts are (E, out, in) in numpy order, as switch_mlp holds them
GGUF = GGUFSpec("qwen3moe", "Qwen3MoeForCausalLM", LLAMA_GGUF_TENSORS | {
    "ffn_gate_inp": "mlp.gate", "ffn_gate_exps": "mlp.switch_mlp.gate_proj",
    "ffn_up_exps": "mlp.switch_mlp.up_proj", "ffn_down_exps": "mlp.switch_mlp.down_proj",
    # --fuse-gate-up-exps: (E, 2I, H), gate rows then up rows
    "ffn_gate_up_exps": ("mlp.switch_mlp.gate_proj", "mlp.switch_mlp.up_proj")},
    config=gguf_config, default_rope_theta=1e6)
