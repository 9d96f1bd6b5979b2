"""gpt-oss (gpt-oss-20b, gpt-oss-120b): HF model_type "gpt_oss".

- attention: biases on q/k/v/o, a learned sink logit per head (a softmax column with no value),
  layers alternating sliding-window (`sliding_window`, 128) and full attention (`layer_types`);
- MoE on every layer: a router with bias, top-k of the logits, softmax over the k; experts
  with biases and the clamped SwiGLU (up + 1) * g * sigmoid(alpha g), g = min(gate, limit),
  up clipped to +-limit (alpha 1.702, limit 7).

Package names are mlx-lm's: `mlp.router.{weight,bias}`, `mlp.experts.{gate,up,down}_proj
.{weight,bias}` (E, out, in) / (E, out), `self_attn.sinks`. HF float checkpoints fuse the
experts as gate_up_proj (E, H, 2I) with gate and up in alternate columns and down_proj
(E, I, H), both (in, out): `hf_fused` splits and transposes them. MXFP4 checkpoints
(`*_blocks` (E, out, in/32, 16) uint8, `*_scales` (E, out, in/32) uint8) are MLX's "mxfp4"
layout already, rows interleaved the same way (`hf_packed`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import mlx.core as mx
import mlx.nn as nn

from ..errors import EdgertError
from . import base
from .base import BaseModelArgs, GGUFSpec, causal_mask, embed
from .cache import KVCache, RotatingKVCache, first_of
from .rope import initialize_rope
from .switch import SwitchGLU, check_experts

MODEL_TYPES = ("gpt_oss",)
SLIDING, FULL = "sliding_attention", "full_attention"


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    num_local_experts: int = 128
    num_experts_per_tok: int = 4
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    sliding_window: int = 128
    layer_types: list[str] | None = None
    rope_parameters: dict | None = None
    rope_theta: float = 150000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int | None = None
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0
    tie_word_embeddings: bool = False

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        if self.layer_types is None:
            self.layer_types = [SLIDING if (i + 1) % 2 else FULL
                                for i in range(self.num_hidden_layers)]
        rope = dict(self.rope_parameters or {})
        self.rope_theta = rope.get("rope_theta", self.rope_theta)
        if rope.get("rope_type", "default") != "default":
            self.rope_scaling = rope
        check_experts(self.num_local_experts, self.num_experts_per_tok)


class Attention(base.Attention):
    def __init__(self, args: ModelArgs):
        hd = args.head_dim
        super().__init__(args.hidden_size, args.num_attention_heads, args.num_key_value_heads, hd,
                         initialize_rope(hd, args.rope_theta, False, args.rope_scaling,
                                         args.max_position_embeddings),
                         bias=True, sinks=True)


def clamped_swiglu(gate: mx.array, up: mx.array, alpha: float, limit: float) -> mx.array:
    gate = mx.minimum(gate, limit)
    up = mx.clip(up, -limit, limit)
    return (up + 1) * (gate * mx.sigmoid(alpha * gate))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.router = nn.Linear(args.hidden_size, args.num_local_experts, bias=True)
        act = partial(clamped_swiglu, alpha=args.swiglu_alpha, limit=args.swiglu_limit)
        self.experts = SwitchGLU(args.hidden_size, args.intermediate_size,
                                 args.num_local_experts, activation=act, bias=True)

    def __call__(self, x: mx.array) -> mx.array:
        """(B, L, D) -> (B, L, D): softmax over the top-k router logits."""
        logits = self.router(x)  # (B, L, E)
        inds = mx.stop_gradient(mx.argpartition(logits, kth=-self.top_k, axis=-1)
                                [..., -self.top_k:])  # (B, L, k)
        scores = mx.softmax(mx.take_along_axis(logits, inds, axis=-1).astype(mx.float32),
                            axis=-1, precise=True)
        y = self.experts(x, inds)  # (B, L, k, D)
        return (y * scores[..., None].astype(y.dtype)).sum(axis=-2)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_type: str):
        super().__init__()
        self.layer_type = layer_type
        self.self_attn = Attention(args)
        self.mlp = MLP(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask, cache=None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class GptOssModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, t) for t in args.layer_types]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def masks(self, L: int, caches: list | None) -> dict:
        """Per layer type: full layers' mask from the first KVCache, sliding layers' from the
        first RotatingKVCache; without caches, causal (and within the window)."""
        if caches is None:
            return {FULL: causal_mask(L, 0) if L > 1 else None,
                    SLIDING: causal_mask(L, 0, self.args.sliding_window) if L > 1 else None}
        full, rotating = first_of(caches, KVCache), first_of(caches, RotatingKVCache)
        return {FULL: full.make_mask(L) if full is not None else None,
                SLIDING: rotating.make_mask(L) if rotating is not None else None}

    def __call__(self, inputs: mx.array, cache=None, dtype=mx.float32) -> mx.array:
        h = embed(self.embed_tokens, inputs, dtype)  # (B, L, dim)
        masks = self.masks(h.shape[1], cache)
        for layer, c in zip(self.layers, cache or [None] * len(self.layers)):
            h = layer(h, masks[layer.layer_type], c)
        return self.norm(h)


class Model(nn.Module):
    compiled_decode = False  # sliding layers rotate: generation runs the plain decode step

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.activation_dtype = mx.float32
        self.model = GptOssModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        """(B, L) token ids -> (B, L, vocab) logits."""
        h = self.model(inputs, cache, self.activation_dtype)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def make_cache(self) -> list:
        """Sliding layers keep only their window (RotatingKVCache); full ones a KVCache."""
        return [RotatingKVCache(self.args.sliding_window) if layer.layer_type == SLIDING
                else KVCache() for layer in self.layers]

    def sanitize(self, weights: dict) -> dict:
        if self.args.tie_word_embeddings:
            weights = {k: v for k, v in weights.items() if not k.startswith("lm_head.")}
        return weights

    @property
    def layers(self):
        return self.model.layers


# ------------------------------------------------------------------ for the HF reader


def hf_config(config: dict) -> dict:
    """The package config, with mlx-lm's rope_theta / rope_scaling beside rope_parameters."""
    config, rope = dict(config), config.get("rope_parameters") or {}
    config.setdefault("rope_theta", rope.get("rope_theta", 150000.0))
    if rope.get("rope_type", "default") != "default":
        config.setdefault("rope_scaling", rope)
    return config


def _fused_parts(name: str):
    """(module prefix, HF leaf) of a fused expert tensor, or None."""
    prefix, _, leaf = name.rpartition(".experts.")
    return (prefix, leaf) if prefix.endswith(".mlp") else None


def hf_fused(name: str, config: dict):
    """HF float experts -> ([package names], split) with parts (E, out, in) / (E, out):
    gate_up_proj (E, H, 2I) is gate in even columns, up in odd ones, stored (in, out)."""
    hit = _fused_parts(name)
    if hit is None:
        return None
    base = f"{hit[0]}.experts"
    return {
        "gate_up_proj": ([f"{base}.gate_proj.weight", f"{base}.up_proj.weight"],
                         lambda w: [w[..., ::2].swapaxes(-1, -2), w[..., 1::2].swapaxes(-1, -2)]),
        "down_proj": ([f"{base}.down_proj.weight"], lambda w: [w.swapaxes(-1, -2)]),
        "gate_up_proj_bias": ([f"{base}.gate_proj.bias", f"{base}.up_proj.bias"],
                              lambda b: [b[..., ::2], b[..., 1::2]]),
        "down_proj_bias": ([f"{base}.down_proj.bias"], lambda b: [b]),
    }.get(hit[1])


def hf_packed(name: str, config: dict):
    """MXFP4 experts `X_blocks` / `X_scales`, already (E, out, ...) -> ([package modules],
    split of the rows): gate_up's rows alternate gate, up."""
    hit = _fused_parts(name)
    if hit is None:
        return None
    base = f"{hit[0]}.experts"
    return {"gate_up_proj": ([f"{base}.gate_proj", f"{base}.up_proj"],
                             lambda w: [w[:, ::2], w[:, 1::2]]),
            "down_proj": ([f"{base}.down_proj"], lambda w: [w])}.get(hit[1])


def quant_policy(name: str, shape: tuple, config: dict):
    """Routers at 8 bits (as mlx-lm); sinks and biases are never quantized."""
    if name.endswith(".mlp.router.weight"):
        return {"bits": 8, "group_size": 64}
    return None



# ------------------------------------------------------------------ GGUF (llama.cpp "gpt-oss")
#
# llama.cpp's converter (conversion/gpt_oss.py) splits gate_up_proj's alternate rows into
# ffn_gate_exps / ffn_up_exps (E, I, H) and their biases, transposes float experts to
# (E, out, in), renames sinks to attn_sinks.weight and repacks MXFP4 blocks as ggml's
# block_mxfp4 (edgert maps those onto MLX's mxfp4 exactly). q/k keep HF's row order (NEOX
# rope), so no tensor needs a value transform.

GGUF_TENSORS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm", "ffn_gate_inp": "mlp.router",
    "ffn_gate_exps": "mlp.experts.gate_proj", "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
}


def _sliding_layers(meta, n: int) -> list[bool]:
    """llama.cpp's swa pattern: a per-layer flag array, or every n-th layer full (n = 2 for
    gpt-oss, sliding first)."""
    pattern = meta.get("attention.sliding_window_pattern", 2)
    if isinstance(pattern, list):
        if len(pattern) < n:
            raise EdgertError(f"{meta.arch}.attention.sliding_window_pattern has "
                              f"{len(pattern)} entries for {n} layers")
        return [bool(x) for x in pattern[:n]]
    p = int(pattern)
    return [p == 0 or i % p < p - 1 for i in range(n)]


def gguf_config(meta, config: dict) -> dict:
    """Experts, the sliding window and its layer pattern, yarn's betas. The GGUF does not say
    whether yarn's correction range is truncated (llama.cpp always rounds it outwards); the
    published gpt-oss configs say `truncate: false`, which is what this reads, so that a GGUF
    and the HF checkpoint it came from make the same package (measured on a random model with
    factor 4: llama.cpp's logits 2.7e-3 from edgert's, 4.6e-4 with truncation on)."""
    n = config["num_hidden_layers"]
    sliding = _sliding_layers(meta, n)
    rope = {"rope_type": "default", "rope_theta": config.pop("rope_theta")}
    if (scaling := config.pop("rope_scaling", None)):
        if scaling["rope_type"] == "yarn":
            scaling |= {"beta_fast": meta.f32("rope.scaling.yarn_beta_fast", 32.0),
                        "beta_slow": meta.f32("rope.scaling.yarn_beta_slow", 1.0),
                        "truncate": False}
        rope |= scaling
    config = {k: v for k, v in config.items() if k != "attention_bias"}
    config |= {
        "intermediate_size": int(meta.need("expert_feed_forward_length")),
        "num_local_experts": int(meta.need("expert_count")),
        "num_experts_per_tok": int(meta.need("expert_used_count")),
        "sliding_window": int(meta.need("attention.sliding_window")),
        "layer_types": [SLIDING if s else FULL for s in sliding],
        "rope_parameters": rope,
    }
    return hf_config(config)


GGUF = GGUFSpec("gpt-oss", "GptOssForCausalLM", GGUF_TENSORS, config=gguf_config,
                leaves={"attn_sinks.weight": "self_attn.sinks"}, default_rope_theta=150000.0)
