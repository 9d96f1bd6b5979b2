"""Gemma 3 text models: HF model_type "gemma3_text" (Gemma3ForCausalLM).

Llama-shaped attention with q/k RMSNorm, a norm before and after both the attention and the
GELU-tanh MLP, embeddings scaled by sqrt(hidden_size), RMSNorm weights stored as w with
(1 + w) applied, and sliding-window layers (own rope base) interleaved with global ones.

Sliding layers get a RotatingKVCache (only the window is kept); global layers a KVCache.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import EdgertError, UnsupportedError
from . import base
from .base import (LLAMA_GGUF_TENSORS, BaseModelArgs, GGUFSpec, causal_mask, embed,
                   head_logits)
from .cache import KVCache, RotatingKVCache, first_of
from .rope import initialize_rope

SLIDING, FULL = "sliding_attention", "full_attention"
MODEL_TYPES = ("gemma3_text",)


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    head_dim: int = 256
    num_key_value_heads: int | None = None
    rms_norm_eps: float = 1e-6
    query_pre_attn_scalar: float = 256
    sliding_window: int | None = 4096
    sliding_window_pattern: int = 6  # older configs; `layer_types` wins where present
    layer_types: list[str] | None = None
    rope_theta: float = 1_000_000.0  # global layers
    rope_local_base_freq: float = 10_000.0  # sliding layers
    rope_scaling: dict | None = None  # global layers only
    rope_parameters: dict | None = None  # transformers >= 5: {layer type: {rope_theta, ...}}
    max_position_embeddings: int | None = None
    final_logit_softcapping: float | None = None
    hidden_activation: str = "gelu_pytorch_tanh"
    attention_bias: bool = False
    use_bidirectional_attention: bool | None = False
    tie_word_embeddings: bool = True

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.layer_types is None:
            n = self.sliding_window_pattern
            self.layer_types = [SLIDING if (i + 1) % n else FULL
                                for i in range(self.num_hidden_layers)]
        if not self.sliding_window:
            self.layer_types = [FULL] * self.num_hidden_layers
        if self.rope_parameters:
            full = self.rope_parameters.get(FULL) or {}
            local = self.rope_parameters.get(SLIDING) or {}
            self.rope_theta = full.get("rope_theta", self.rope_theta)
            self.rope_local_base_freq = local.get("rope_theta", self.rope_local_base_freq)
            if full.get("rope_type", "default") != "default":
                self.rope_scaling = full
            if local.get("rope_type", "default") != "default":
                raise UnsupportedError("rope scaling on sliding-window layers is not supported")
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu_new"):
            raise UnsupportedError(f"gemma3 activation {self.hidden_activation!r} is not supported")
        if self.use_bidirectional_attention:
            raise UnsupportedError("bidirectional (embedding) Gemma 3 models are not supported")


class RMSNorm(nn.Module):
    """Gemma's RMSNorm: the stored weight w scales by (1 + w)."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, 1.0 + self.weight, self.eps)


class Attention(base.Attention):
    def __init__(self, args: ModelArgs, layer_type: str):
        hd = args.head_dim
        if layer_type == SLIDING:
            rope = initialize_rope(hd, args.rope_local_base_freq)
        else:
            rope = initialize_rope(hd, args.rope_theta, False, args.rope_scaling,
                                   args.max_position_embeddings)
        super().__init__(args.hidden_size, args.num_attention_heads, args.num_key_value_heads, hd,
                         rope, scale=args.query_pre_attn_scalar**-0.5, bias=args.attention_bias,
                         qk_norm=partial(RMSNorm, eps=args.rms_norm_eps))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, hidden = args.hidden_size, args.intermediate_size
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.gelu_approx(self.gate_proj(x)) * self.up_proj(x))


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, layer_type: str):
        super().__init__()
        self.layer_type = layer_type
        self.self_attn = Attention(args, layer_type)
        self.mlp = MLP(args)
        dim, eps = args.hidden_size, args.rms_norm_eps
        self.input_layernorm = RMSNorm(dim, eps)
        self.post_attention_layernorm = RMSNorm(dim, eps)
        self.pre_feedforward_layernorm = RMSNorm(dim, eps)
        self.post_feedforward_layernorm = RMSNorm(dim, eps)

    def __call__(self, x: mx.array, mask, cache=None) -> mx.array:
        h = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), mask, cache))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class Gemma3Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [TransformerBlock(args, t) for t in args.layer_types]
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache=None, dtype=mx.float32) -> mx.array:
        h = embed(self.embed_tokens, inputs, dtype)  # (B, L, dim)
        h = h * mx.array(self.args.hidden_size**0.5, dtype)  # the scale rounded to `dtype`, as HF
        if cache is None:
            cache = [None] * len(self.layers)
        masks = self.masks(h.shape[1], cache)
        for layer, c in zip(self.layers, cache):
            h = layer(h, masks[layer.layer_type], c)
        return self.norm(h)

    def masks(self, L: int, caches: list) -> dict:
        """Boolean (L, S) masks per layer type for L new positions (None: attend to all): full
        layers' from the first full cache, sliding layers' from the first rotating cache where
        they have one (make_cache), else the full mask narrowed to the window."""
        cache = next((c for c, layer in zip(caches, self.layers) if layer.layer_type == FULL),
                     caches[0])
        rotating = first_of(caches, RotatingKVCache)
        offset = cache.offset if cache is not None else 0  # an array in a compiled step
        if hasattr(cache, "make_mask"):  # the cache knows its layout (see cache.PositionedKV)
            full = cache.make_mask(L)
        else:
            full = causal_mask(L, offset) if L > 1 else None
        masks = {FULL: full}
        if rotating is not None:
            masks[SLIDING] = rotating.make_mask(L)
        elif (window := self.args.sliding_window) is not None:
            if full is None and offset < window:
                masks[SLIDING] = None
            else:  # keys within `window` of their query, on top of the causal mask
                S = offset + L if full is None else full.shape[-1]
                q = mx.arange(L)[:, None] + offset
                near = mx.arange(S)[None] > q - window
                masks[SLIDING] = near if full is None else near & full
        return masks


class Model(nn.Module):
    compiled_decode = True  # masks come from the cache: generation may compile the decode step

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.activation_dtype = mx.float32
        self.model = Gemma3Model(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    @property
    def activation_dtype(self) -> mx.Dtype:
        return self._activation_dtype

    @activation_dtype.setter
    def activation_dtype(self, dtype: mx.Dtype) -> None:
        # the residual stream reaches ~1e5 (270M), past float16's 65504: bfloat16 instead
        self._activation_dtype = mx.bfloat16 if dtype == mx.float16 else dtype

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        """(B, L) token ids -> (B, L, vocab) logits."""
        return head_logits(self, self.model(inputs, cache, self.activation_dtype),
                           self.args.final_logit_softcapping)

    def make_cache(self) -> list:
        """Sliding layers keep only their window (RotatingKVCache); global layers a KVCache."""
        window = self.args.sliding_window
        return [RotatingKVCache(window) if layer.layer_type == SLIDING and window else KVCache()
                for layer in self.layers]

    def sanitize(self, weights: dict) -> dict:
        if self.args.tie_word_embeddings:
            weights = {k: v for k, v in weights.items() if not k.startswith("lm_head.")}
        return weights

    @property
    def layers(self):
        return self.model.layers


# ------------------------------------------------------------------ GGUF (llama.cpp "gemma3")

def gguf_config(meta, config: dict) -> dict:
    """Gemma 3's own fields, read as llama.cpp reads them (src/models/gemma3.cpp)."""
    n_layers, hidden = config["num_hidden_layers"], config["hidden_size"]
    config = {k: v for k, v in config.items() if k != "hidden_act"}
    config["hidden_activation"] = "gelu_pytorch_tanh"
    # llama.cpp scales queries by 1/sqrt(head_dim), except for the 27B (62 layers) model
    config["query_pre_attn_scalar"] = (hidden // config["num_attention_heads"] if n_layers == 62
                                       else config["head_dim"])
    # local layers: their own rope base, no rope scaling (llama.cpp's *_swa defaults)
    config["rope_local_base_freq"] = meta.f32("rope.freq_base_swa", 10000.0)
    if (cap := meta.f32("final_logit_softcapping")):
        config["final_logit_softcapping"] = cap
    window = meta.get("attention.sliding_window")
    pattern = meta.get("attention.sliding_window_pattern", 6)
    if not window:
        sliding, pattern = [False] * n_layers, 1
    elif isinstance(pattern, list):  # one flag per layer
        sliding, pattern = [bool(x) for x in pattern], None
        if len(sliding) != n_layers:
            raise EdgertError(f"gemma3.attention.sliding_window_pattern has {len(sliding)} "
                              f"flags for {n_layers} layers")
    else:  # every n-th layer is global; 0: all slide (llama_hparams::set_swa_pattern)
        pattern = int(pattern)
        sliding = [pattern == 0 or i % pattern < pattern - 1 for i in range(n_layers)]
        pattern = pattern or None
    config["sliding_window"] = int(window) if window else None
    if pattern is not None:  # what mlx-lm reads; edgert and transformers read layer_types
        config["sliding_window_pattern"] = pattern
    config["layer_types"] = ["sliding_attention" if s else "full_attention" for s in sliding]
    return config


def gguf_transform(hf_name: str, value, config: dict):
    """llama.cpp stores Gemma's RMSNorm weights w as 1 + w (convert_hf_to_gguf.py, Gemma3Model);
    HF names carry w: subtract 1 in float32, as transformers' GGUF loader does."""
    if not hf_name.endswith("norm.weight"):
        return value
    return np.asarray(value, np.float32) - np.float32(1), "llama.cpp stores 1 + w: 1 subtracted"


GGUF = GGUFSpec("gemma3", "Gemma3ForCausalLM", LLAMA_GGUF_TENSORS | {
    "ffn_norm": "pre_feedforward_layernorm", "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm"}, config=gguf_config, transform=gguf_transform)
