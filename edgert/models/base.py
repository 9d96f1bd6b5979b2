"""Pieces shared by the architectures: argument dataclasses, masks, attention."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn


@dataclass
class BaseModelArgs:
    @classmethod
    def from_dict(cls, params: dict[str, Any]):
        """Build from an HF config dict, keeping only the fields this architecture knows."""
        names = inspect.signature(cls).parameters
        return cls(**{k: v for k, v in params.items() if k in names})


def causal_mask(n_new: int, offset: int, window: int | None = None) -> mx.array:
    """Boolean (n_new, offset + n_new) mask: query i sees keys <= offset + i (within `window`)."""
    q = mx.arange(offset, offset + n_new)[:, None]
    k = mx.arange(offset + n_new)[None, :]
    mask = k <= q
    if window is not None:
        mask = mask & (k > q - window)
    return mask


def attention(q: mx.array, k, v, scale: float, mask, sinks: mx.array | None = None) -> mx.array:
    """Fused attention with grouped-query broadcast. q (B, H, L, D); k, v (B, H_kv, S, D), or
    (w_q, scales, biases) triples from a quantized KV cache (cache.QuantizedKVCache); `sinks`
    (H,): one extra logit per head that takes part in the softmax and attends to nothing."""
    if isinstance(k, tuple):
        return quantized_attention(q, k, v, scale, mask, sinks)
    if sinks is not None:
        return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask,
                                                    sinks=sinks.astype(q.dtype))
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


def quantized_attention(q: mx.array, k: tuple, v: tuple, scale: float, mask,
                        sinks: mx.array | None = None) -> mx.array:
    """Attention over affine-quantized keys and values through mx.quantized_matmul; the
    reference twin is dequantizing them and calling the fused attention."""
    B, H, L, D = q.shape
    n_kv = k[0].shape[1]
    bits = k[0].shape[-1] * 32 // D
    group = D // k[1].shape[-1]
    q = (q * scale).reshape(B, n_kv, H // n_kv, L, D)  # (B, H_kv, rep, L, D)
    k = [mx.expand_dims(a, 2) for a in k]  # (B, H_kv, 1, S, ·)
    v = [mx.expand_dims(a, 2) for a in v]
    scores = mx.quantized_matmul(q, *k, transpose=True, group_size=group, bits=bits)
    if mask is not None:  # boolean (L, S): True where a query may look
        scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
    if sinks is not None:  # a column of sink logits, dropped after the softmax
        sink = mx.broadcast_to(sinks.astype(scores.dtype).reshape(1, n_kv, H // n_kv, 1, 1),
                               (*scores.shape[:-1], 1))
        probs = mx.softmax(mx.concatenate([scores, sink], axis=-1), axis=-1, precise=True)
        probs = probs[..., :-1]
    else:
        probs = mx.softmax(scores, axis=-1, precise=True)  # (B, H_kv, rep, L, S)
    out = mx.quantized_matmul(probs, *v, transpose=False, group_size=group, bits=bits)
    return out.reshape(B, H, L, D)


class Attention(nn.Module):
    """Grouped-query attention as most families compute it: q / k / v projections, optional
    per-head q and k norms (before RoPE), RoPE at the cache's offset, the cache, fused
    attention (with optional sinks), o_proj. A family sets what differs through the
    arguments, or overrides `output` (what happens to the merged heads)."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int, rope, *,
                 scale: float | None = None, bias: bool = False, o_bias: bool | None = None,
                 qk_norm=None, sinks: bool = False):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.scale = head_dim**-0.5 if scale is None else scale
        self.q_proj = nn.Linear(dim, n_heads * head_dim, bias=bias)
        self.k_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, n_kv_heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * head_dim, dim, bias=bias if o_bias is None else o_bias)
        if qk_norm is not None:  # a norm class over head_dim, e.g. partial(nn.RMSNorm, eps=...)
            self.q_norm, self.k_norm = qk_norm(head_dim), qk_norm(head_dim)
        if sinks:
            self.sinks = mx.zeros((n_heads,))  # (H,) one extra logit per head
        self.rope = rope

    def __call__(self, x: mx.array, mask, cache=None) -> mx.array:
        B, L, _ = x.shape
        # (B, L, H*D) -> (B, H, L, D), q/k normalised per head before rope
        q = self.q_proj(x).reshape(B, L, self.n_heads, -1)
        k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(0, 2, 1, 3), k.transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = attention(q, k, v, self.scale, mask, getattr(self, "sinks", None))  # (B, H, L, D)
        return self.output(out.transpose(0, 2, 1, 3).reshape(B, L, -1))

    def output(self, out: mx.array) -> mx.array:
        """(B, L, H*D) merged heads -> (B, L, dim)."""
        return self.o_proj(out)


def embed(embedding: nn.Module, ids: mx.array, dtype: mx.Dtype) -> mx.array:
    """Look up (B, L) ids -> (B, L, dim) in `dtype`. A quantized table is dequantized in `dtype`
    (MLX's own lookup computes scale * q + bias in the scales' dtype, which rounds in float16)."""
    if isinstance(embedding, nn.QuantizedEmbedding) and embedding.mode != "affine":
        return mx.dequantize(embedding["weight"][ids], embedding["scales"][ids], None,
                             embedding.group_size, embedding.bits, mode=embedding.mode,
                             dtype=dtype)  # e.g. "mxfp4": uint8 exponents, no biases
    if isinstance(embedding, nn.QuantizedEmbedding):
        return mx.dequantize(embedding["weight"][ids], embedding["scales"][ids].astype(dtype),
                             embedding["biases"][ids].astype(dtype), embedding.group_size,
                             embedding.bits, mode=embedding.mode)
    return embedding(ids).astype(dtype)


def head_logits(model: nn.Module, h: mx.array, softcap: float | None = None) -> mx.array:
    """(B, L, dim) final hidden states -> (B, L, vocab) logits: the tied embedding or
    `model.lm_head`, then tanh soft-capping where the architecture has it."""
    if model.args.tie_word_embeddings:
        logits = model.model.embed_tokens.as_linear(h)
    else:
        logits = model.lm_head(h)
    return mx.tanh(logits / softcap) * softcap if softcap else logits


# ------------------------------------------------------------------ what a module declares
#
#   MODEL_TYPES = ("llama", "mistral")     HF model_types served; the first is the canonical one
#   ModelArgs, Model                       Model.sanitize(weights), Model.make_cache(), Model.layers
#   hf_name(name, config) -> str | None    (optional) HF checkpoint name -> package name; None drops it
#   hf_config(config) -> dict              (optional) the config stored in the package
#   quant_policy(name, shape, config)      (optional) False: keep float; {"bits", "group_size"}: that
#                                          layout; None: the default (float sources being quantized)
#   package_tensors(records, config)       (optional, the MLX writer) the canonical records (HF
#                                          convention) -> the package's: the layout mlx-lm's model
#                                          loads as it is; Model.sanitize reads it back
#   GGUF = GGUFSpec(...)                   (optional) how llama.cpp stores it
#   COREML_GRAPH = "llama"                 (optional) the Core ML writer's graph that serves it


def _no_transform(name: str, value, config: dict):
    return value


@dataclass(frozen=True)
class GGUFSpec:
    """How llama.cpp's converter stores an architecture, for the GGUF reader.

    `tensors` maps block tensor names (blk.N.<key>.weight|bias) to HF names under
    model.layers.N; `global_tensors` the others (token_embd, output_norm, output). `config`
    adds the architecture's own HF config keys to the common ones the reader derives (hidden
    size, heads, rope, ...), from `meta` (GGUFMeta: get(key, default) / need(key) read
    "<architecture>.<key>"; raw(key) a full key). `transform(hf_name, value, config)` undoes
    the converter's value changes on a numpy float32 array or an edgert.quant.QuantTensor (the
    same function serves the float reference); it returns the value, or (value, note).
    `validate(gguf_name, shape, config)` checks a tensor up front (before anything streams).
    A `tensors` value may be a tuple of names: a fused tensor (e.g. ffn_gate_up_exps) whose
    rows are those tensors' in equal blocks, in order."""

    architecture: str  # general.architecture, e.g. "llama", "qwen35"
    hf_class: str  # config["architectures"][0], e.g. "LlamaForCausalLM"
    tensors: dict[str, str]
    config: Any = None  # (meta, config) -> config
    transform: Any = _no_transform
    validate: Any = None
    global_tensors: dict[str, str] = field(default_factory=lambda: {
        "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"})
    # block tensors blk.N.<leaf> named whole under model.layers.N (bare parameters, no
    # .weight/.bias of their own), e.g. {"ssm_a": "linear_attn.A_log", "ssm_dt.bias":
    # "linear_attn.dt_bias"}, Gemma 4's {"layer_output_scale.weight": "layer_scalar"}
    leaves: dict[str, str] = field(default_factory=dict)
    default_rope_theta: float = 10000.0


# llama.cpp's block names of the llama family, shared by the modules built on llama
LLAMA_GGUF_TENSORS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
