"""Llama 2/3 (incl. llama3 rope scaling), Mistral and SmolLM: HF model_type "llama"."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import mlx.core as mx
import mlx.nn as nn

from ..errors import EdgertError
from ..quant import map_rows, unpermute_rows

from . import base
from .base import LLAMA_GGUF_TENSORS, BaseModelArgs, GGUFSpec, causal_mask, embed
from .rope import initialize_rope


MODEL_TYPES = ("llama", "mistral", "smollm")
COREML_GRAPH = "llama"


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    max_position_embeddings: int | None = None
    rope_theta: float = 10000.0
    rope_traditional: bool = False
    rope_scaling: dict | None = None
    rope_parameters: dict | None = None  # transformers >= 5 keeps theta and scaling here
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = True
    sliding_window: int | None = None

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.rope_parameters:
            self.rope_theta = self.rope_parameters.get("rope_theta", self.rope_theta)
            if self.rope_parameters.get("rope_type", "default") != "default":
                self.rope_scaling = self.rope_parameters


class Attention(base.Attention):
    def __init__(self, args: ModelArgs, qk_norm: bool = False, bias: bool | None = None):
        hd = args.head_dim
        super().__init__(args.hidden_size, args.num_attention_heads, args.num_key_value_heads, hd,
                         initialize_rope(hd, args.rope_theta, args.rope_traditional,
                                         args.rope_scaling, args.max_position_embeddings),
                         bias=args.attention_bias if bias is None else bias,
                         o_bias=args.attention_bias,
                         qk_norm=partial(nn.RMSNorm, eps=args.rms_norm_eps) if qk_norm else None)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, hidden, bias = args.hidden_size, args.intermediate_size, args.mlp_bias
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, attention_cls=Attention, **attn_kwargs):
        super().__init__()
        self.self_attn = attention_cls(args, **attn_kwargs)
        self.mlp = MLP(args)
        self.input_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)
        self.post_attention_layernorm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, x: mx.array, mask, cache=None) -> mx.array:
        h = x + self.self_attn(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaModel(nn.Module):
    def __init__(self, args: ModelArgs, **block_kwargs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [TransformerBlock(args, **block_kwargs) for _ in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, eps=args.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache=None, dtype=mx.float32) -> mx.array:
        h = embed(self.embed_tokens, inputs, dtype)  # (B, L, dim)
        if cache is None:
            cache = [None] * len(self.layers)
        L = h.shape[1]
        if hasattr(cache[0], "make_mask"):  # the cache knows its layout (see cache.PositionedKV)
            mask = cache[0].make_mask(L)
        else:
            mask = causal_mask(L, cache[0].offset if cache[0] is not None else 0) if L > 1 else None
        for layer, c in zip(self.layers, cache):
            h = layer(h, mask, c)
        return self.norm(h)


class Model(nn.Module):
    compiled_decode = True  # masks come from the cache: generation may compile the decode step

    def __init__(self, args: ModelArgs, **block_kwargs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.activation_dtype = mx.float32
        self.model = LlamaModel(args, **block_kwargs)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        """(B, L) token ids -> (B, L, vocab) logits."""
        h = self.model(inputs, cache, self.activation_dtype)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def sanitize(self, weights: dict) -> dict:
        weights = {k: v for k, v in weights.items() if "rotary_emb.inv_freq" not in k}
        if self.args.tie_word_embeddings:
            weights = {k: v for k, v in weights.items() if not k.startswith("lm_head.")}
        return weights

    @property
    def layers(self):
        return self.model.layers


# ------------------------------------------------------------------ GGUF (llama.cpp "llama")

_QK_HEADS = {"q_proj": "num_attention_heads", "k_proj": "num_key_value_heads"}


def _qk_heads(hf_name: str, config: dict) -> int | None:
    """Heads whose rows llama.cpp permuted in this tensor (q_proj / k_proj), else None."""
    parts = hf_name.split(".")
    return config[_QK_HEADS[parts[-2]]] if len(parts) > 2 and parts[-2] in _QK_HEADS else None


def gguf_transform(hf_name: str, value, config: dict):
    """Undo the Q/K row interleave llama.cpp applies for its rope (LlamaModel.permute)."""
    n = _qk_heads(hf_name, config)
    return value if n is None else map_rows(value, lambda x: unpermute_rows(x, n))


def gguf_validate(gguf_name: str, shape: tuple, config: dict) -> None:
    part = gguf_name.split(".")[-2]
    n = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}.get(part)
    if n and shape[0] % (2 * n):
        raise EdgertError(f"tensor {gguf_name} has {shape[0]} rows, which {n} heads cannot split")


def gguf_config(meta, config: dict) -> dict:
    return {**config, "mlp_bias": meta.has_tensor("blk.0.ffn_gate.bias")}


GGUF = GGUFSpec("llama", "LlamaForCausalLM", LLAMA_GGUF_TENSORS, config=gguf_config,
                transform=gguf_transform, validate=gguf_validate)
