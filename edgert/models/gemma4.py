"""Gemma 4: HF model_types "gemma4_text" (Gemma4ForCausalLM) and "gemma4" (the multimodal
wrapper, of which only the text model is kept).

Per layer: attention with q/k RMSNorm and a scale-free v norm, attention scale 1.0, a norm
before and after attention and MLP, then the per-layer input (PLE) block and `layer_scalar`.
Sliding layers have their own head_dim and rope; full layers take `head_dim` (and, with
`attention_k_eq_v`, the kv head count and k-as-v) from `per_layer_config` (older configs:
`global_head_dim` / `num_global_key_value_heads`) and a proportional partial rope. The last
`num_kv_shared_layers` layers compute no keys or values: each reuses those of the last earlier
layer of its type (no cache of its own) and has a double-wide MLP with `use_double_wide_mlp`.

Per-layer embeddings: a (vocab, layers * ple_dim) table that is only looked up. In a package it
lives in its own file (PLE_FILE) that the runtime memory-maps (MappedRows): a step reads the
rows of its tokens, so the table does not count against resident memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..errors import EdgertError, UnsupportedError
from .base import BaseModelArgs, GGUFSpec, attention, causal_mask, embed, head_logits
from ..mapped_rows import MappedRows
from .cache import KVCache, RotatingKVCache, first_of
from .switch import SwitchGLU, check_experts, fused_gate_up, topk_softmax

MODEL_TYPES = ("gemma4_text", "gemma4")  # the first is what packages store
COREML_GRAPH = "gemma4"  # edgert.convert.coreml_gemma4 (dense variants)
SLIDING, FULL = "sliding_attention", "full_attention"
PLE = "model.embed_tokens_per_layer"
PLE_FILE = "model-per-layer-embeddings.safetensors"  # mlx-lm globs model*.safetensors too

_DROPPED = ("vision_tower", "audio_tower", "embed_vision", "embed_audio",
            "multi_modal_projector")


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
    global_head_dim: int | None = None  # older configs; per_layer_config wins
    num_global_key_value_heads: int | None = None
    per_layer_config: dict | None = None  # {layer index: {"head_dim", "num_key_value_heads"}}
    rms_norm_eps: float = 1e-6
    sliding_window: int = 512
    layer_types: list[str] | None = None
    rope_parameters: dict | None = None
    max_position_embeddings: int | None = None
    final_logit_softcapping: float | None = None
    hidden_activation: str = "gelu_pytorch_tanh"
    attention_bias: bool = False
    attention_k_eq_v: bool = False
    num_kv_shared_layers: int = 0
    vocab_size_per_layer_input: int | None = None
    hidden_size_per_layer_input: int = 256
    use_double_wide_mlp: bool = False
    enable_moe_block: bool = False
    num_experts: int | None = None
    top_k_experts: int | None = None
    moe_intermediate_size: int | None = None
    use_bidirectional_attention: str | None = None
    tie_word_embeddings: bool = True

    def __post_init__(self):
        n = self.num_hidden_layers
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.layer_types is None:
            self.layer_types = [SLIDING if (i + 1) % 6 else FULL for i in range(n)]
            self.layer_types[-1] = FULL
        if self.vocab_size_per_layer_input is None:
            self.vocab_size_per_layer_input = self.vocab_size
        if self.rope_parameters is None:
            self.rope_parameters = {
                SLIDING: {"rope_type": "default", "rope_theta": 10_000.0},
                FULL: {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                       "rope_theta": 1_000_000.0}}
        if self.enable_moe_block:
            check_experts(self.num_experts or 0, self.top_k_experts or 0, "top_k_experts")
            if not self.moe_intermediate_size or self.moe_intermediate_size <= 0:
                raise EdgertError("gemma4: enable_moe_block needs a positive "
                                  f"moe_intermediate_size (got {self.moe_intermediate_size})")
        if self.use_bidirectional_attention:
            raise UnsupportedError("bidirectional Gemma 4 attention is not supported")
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu_new"):
            raise UnsupportedError(f"gemma4 activation {self.hidden_activation!r} is not supported")
        if len(self.layer_types) != n:
            raise EdgertError(f"gemma4: {len(self.layer_types)} layer_types for {n} layers")
        if not 0 <= self.num_kv_shared_layers < n:
            raise EdgertError(f"gemma4: num_kv_shared_layers {self.num_kv_shared_layers} must be "
                              f"below the layer count {n}")
        self.kv_source = self._kv_sources()

    @property
    def num_experts_per_tok(self) -> int | None:
        """Experts a token is routed to (the other MoE families' name; None without MoE)."""
        return self.top_k_experts if self.enable_moe_block else None

    @property
    def first_kv_shared(self) -> int:
        return self.num_hidden_layers - self.num_kv_shared_layers

    def _kv_sources(self) -> list[int]:
        """Per layer, the layer whose keys and values it attends over (itself unless shared)."""
        last: dict[str, int] = {}
        sources = []
        for i, t in enumerate(self.layer_types):
            if i < self.first_kv_shared:
                last[t] = i
            elif t not in last:
                raise EdgertError(f"gemma4: KV-shared layer {i} ({t}) has no earlier {t} layer "
                                  "with a cache to reuse")
            sources.append(last[t] if i >= self.first_kv_shared else i)
        return sources

    def layer_dims(self, i: int) -> tuple[int, int]:
        """(head_dim, kv heads) of layer i."""
        if self.per_layer_config is not None:
            over = self.per_layer_config.get(str(i), self.per_layer_config.get(i, {}))
            return (over.get("head_dim", self.head_dim),
                    over.get("num_key_value_heads", self.num_key_value_heads))
        if self.layer_types[i] != FULL:
            return self.head_dim, self.num_key_value_heads
        n_kv = self.num_key_value_heads
        if self.attention_k_eq_v and self.num_global_key_value_heads is not None:
            n_kv = self.num_global_key_value_heads
        return self.global_head_dim or self.head_dim, n_kv


def rope_wavelengths(dims: int, params: dict) -> np.ndarray:
    """(dims / 2,) float32 wavelengths of the pairs (i, i + dims/2); inf for pairs that stay
    fixed (proportional rope turns only the first `partial_rotary_factor * dims / 2`)."""
    kind = params.get("rope_type", "default")
    base = params["rope_theta"]
    if kind == "default":
        turned = dims // 2
    elif kind == "proportional":
        turned = int(params.get("partial_rotary_factor", 1.0) * dims // 2)
    else:
        raise UnsupportedError(f"gemma4 rope type {kind!r} is not supported")
    factor = params.get("factor", 1.0)
    wavelengths = factor * base ** (np.arange(0, 2 * turned, 2, dtype=np.float32) / dims)
    fixed = np.full(dims // 2 - turned, np.inf, np.float32)  # angle 0
    return np.concatenate([wavelengths, fixed])


class RoPE(nn.Module):
    """Rotary embedding over the whole head (pairs i, i + D/2); with rope_type "proportional"
    only the first `partial_rotary_factor * D / 2` pairs turn (frequencies base^(2i/D), the
    others stay fixed), as Gemma 4's full layers do."""

    def __init__(self, dims: int, params: dict):
        super().__init__()
        self.dims = dims
        self._freqs = mx.array(rope_wavelengths(dims, params))  # (dims/2,)

    def __call__(self, x: mx.array, offset=0) -> mx.array:
        return mx.fast.rope(x, self.dims, traditional=False, base=None, scale=1.0,
                            offset=offset, freqs=self._freqs)


class VNorm(nn.Module):
    """RMSNorm without a weight (Gemma 4's value norm)."""

    def __init__(self, eps: float):
        super().__init__()
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, None, self.eps)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, i: int):
        super().__init__()
        dim, bias = args.hidden_size, args.attention_bias
        self.layer_type = args.layer_types[i]
        self.head_dim, self.n_kv_heads = args.layer_dims(i)
        self.n_heads = args.num_attention_heads
        self.has_kv = i < args.first_kv_shared
        self.k_eq_v = args.attention_k_eq_v and self.layer_type == FULL
        hd = self.head_dim
        self.q_proj = nn.Linear(dim, self.n_heads * hd, bias=bias)
        self.q_norm = nn.RMSNorm(hd, args.rms_norm_eps)
        if self.has_kv:
            self.k_proj = nn.Linear(dim, self.n_kv_heads * hd, bias=bias)
            if not self.k_eq_v:
                self.v_proj = nn.Linear(dim, self.n_kv_heads * hd, bias=bias)
            self.k_norm = nn.RMSNorm(hd, args.rms_norm_eps)
            self.v_norm = VNorm(args.rms_norm_eps)
        self.o_proj = nn.Linear(self.n_heads * hd, dim, bias=bias)
        self.rope = RoPE(hd, args.rope_parameters[self.layer_type])

    def __call__(self, x: mx.array, mask, cache, offset, shared_kv=None):
        """x (B, L, dim) -> ((B, L, dim), (keys, values) for the layers that reuse them)."""
        B, L, _ = x.shape
        q = self.q_norm(self.q_proj(x).reshape(B, L, self.n_heads, -1)).transpose(0, 2, 1, 3)
        q = self.rope(q, offset=offset)  # (B, H, L, D)
        if shared_kv is not None:
            k, v = shared_kv
        else:
            k = self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)
            v = k if self.k_eq_v else self.v_proj(x).reshape(B, L, self.n_kv_heads, -1)
            k = self.rope(self.k_norm(k).transpose(0, 2, 1, 3), offset=offset)
            v = self.v_norm(v).transpose(0, 2, 1, 3)  # (B, n_kv, L, D)
            if cache is not None:
                k, v = cache.update_and_fetch(k, v)
        out = attention(q, k, v, 1.0, mask)  # (B, H, L, D)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, L, -1)), (k, v)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.gelu_approx(self.gate_proj(x)) * self.up_proj(x))


def geglu(gate: mx.array, up: mx.array) -> mx.array:
    return nn.gelu_approx(gate) * up


class Router(nn.Module):
    """The MoE router: a weightless RMSNorm scaled by `scale` / sqrt(dim), E logits, softmax,
    the top-k renormalised, times each chosen expert's `per_expert_scale`."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, self.top_k, self.eps = args.hidden_size, args.top_k_experts, args.rms_norm_eps
        self.proj = nn.Linear(dim, args.num_experts, bias=False)
        self.scale = mx.ones((dim,))
        self.per_expert_scale = mx.ones((args.num_experts,))
        self._root = dim**-0.5

    def __call__(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """(B, L, dim) -> experts (B, L, k), weights (B, L, k) float32."""
        x = mx.fast.rms_norm(x, self.scale * self._root, self.eps)
        inds, weights = topk_softmax(self.proj(x), self.top_k, normalize=True)
        return inds, weights * self.per_expert_scale[inds].astype(weights.dtype)


class Experts(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.switch_glu = SwitchGLU(args.hidden_size, args.moe_intermediate_size,
                                    args.num_experts, activation=geglu)

    def __call__(self, x: mx.array, inds: mx.array, weights: mx.array) -> mx.array:
        """x (B, L, dim), the router's (B, L, k) choice -> (B, L, dim) weighted sum."""
        y = self.switch_glu(x, inds)  # (B, L, k, dim)
        return (y * weights[..., None].astype(y.dtype)).sum(axis=-2)


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, i: int):
        super().__init__()
        dim, eps = args.hidden_size, args.rms_norm_eps
        self.layer_type = args.layer_types[i]
        self.self_attn = Attention(args, i)
        wide = args.use_double_wide_mlp and i >= args.first_kv_shared
        self.mlp = MLP(dim, args.intermediate_size * (2 if wide else 1))
        self.input_layernorm = nn.RMSNorm(dim, eps)
        self.post_attention_layernorm = nn.RMSNorm(dim, eps)
        self.pre_feedforward_layernorm = nn.RMSNorm(dim, eps)
        self.post_feedforward_layernorm = nn.RMSNorm(dim, eps)
        self.moe = args.enable_moe_block
        if self.moe:
            self.router = Router(args)
            self.experts = Experts(args)
            self.pre_feedforward_layernorm_2 = nn.RMSNorm(dim, eps)
            self.post_feedforward_layernorm_1 = nn.RMSNorm(dim, eps)
            self.post_feedforward_layernorm_2 = nn.RMSNorm(dim, eps)
        if ple := args.hidden_size_per_layer_input:
            self.per_layer_input_gate = nn.Linear(dim, ple, bias=False)
            self.per_layer_projection = nn.Linear(ple, dim, bias=False)
            self.post_per_layer_input_norm = nn.RMSNorm(dim, eps)
        self.layer_scalar = mx.ones((1,))

    def __call__(self, x, per_layer_input, mask, cache, offset, shared_kv=None):
        a, kv = self.self_attn(self.input_layernorm(x), mask, cache, offset, shared_kv)
        h = x + self.post_attention_layernorm(a)
        h = h + self.post_feedforward_layernorm(self.feed_forward(h))
        if per_layer_input is not None:  # (B, L, ple)
            g = nn.gelu_approx(self.per_layer_input_gate(h)) * per_layer_input
            h = h + self.post_per_layer_input_norm(self.per_layer_projection(g))
        return h * self.layer_scalar.astype(h.dtype), kv

    def feed_forward(self, h: mx.array) -> mx.array:
        """The dense MLP, and with MoE the experts beside it (both read the stream h)."""
        y = self.mlp(self.pre_feedforward_layernorm(h))
        if not self.moe:
            return y
        inds, weights = self.router(h)
        z = self.experts(self.pre_feedforward_layernorm_2(h), inds, weights)
        return self.post_feedforward_layernorm_1(y) + self.post_feedforward_layernorm_2(z)


class Gemma4TextModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [DecoderLayer(args, i) for i in range(args.num_hidden_layers)]
        self.norm = nn.RMSNorm(args.hidden_size, args.rms_norm_eps)
        if ple := args.hidden_size_per_layer_input:
            n = args.num_hidden_layers
            self.embed_tokens_per_layer = nn.Embedding(args.vocab_size_per_layer_input, n * ple)
            self.per_layer_model_projection = nn.Linear(args.hidden_size, n * ple, bias=False)
            self.per_layer_projection_norm = nn.RMSNorm(ple, args.rms_norm_eps)
        self.ple_rows = None  # a MappedRows once the package's PLE file is mapped

    def per_layer_inputs(self, ids: mx.array, h: mx.array) -> mx.array:
        """(B, L) ids and their (B, L, dim) scaled embeddings -> (B, L, layers, ple)."""
        a, ple = self.args, self.args.hidden_size_per_layer_input
        if self.ple_rows is not None:
            rows = self.ple_rows(ids, h.dtype)
        else:
            rows = embed(self.embed_tokens_per_layer, ids, h.dtype)
        rows = (rows * mx.array(ple**0.5, h.dtype)).reshape(*ids.shape, a.num_hidden_layers, ple)
        proj = self.per_layer_model_projection(h) * mx.array(a.hidden_size**-0.5, h.dtype)
        proj = self.per_layer_projection_norm(proj.reshape(rows.shape))
        return (proj + rows) * mx.array(2.0**-0.5, h.dtype)

    def __call__(self, inputs: mx.array, cache=None, dtype=mx.float32) -> mx.array:
        h = embed(self.embed_tokens, inputs, dtype)  # (B, L, dim)
        h = h * mx.array(self.args.hidden_size**0.5, dtype)
        ple = self.per_layer_inputs(inputs, h) if self.args.hidden_size_per_layer_input else None
        cache = list(cache) if cache is not None else []
        cache += [None] * (len(self.layers) - len(cache))  # KV-shared layers have none
        offset = cache[0].offset if cache[0] is not None else 0
        masks = self.masks(h.shape[1], cache)
        kvs = []
        for i, (layer, c) in enumerate(zip(self.layers, cache)):
            src = self.args.kv_source[i]
            h, kv = layer(h, None if ple is None else ple[:, :, i], masks[layer.layer_type], c,
                          offset, kvs[src] if src != i else None)
            kvs.append(kv)
        return self.norm(h)

    def masks(self, L: int, caches: list) -> dict:
        """Boolean masks per layer type for L new positions (None: attend to all): from the
        first cache of each kind, or causal (within the window) without a cache."""
        full, rotating = first_of(caches, KVCache), first_of(caches, RotatingKVCache)
        window = self.args.sliding_window
        if caches[0] is None:
            return {FULL: causal_mask(L, 0) if L > 1 else None,
                    SLIDING: causal_mask(L, 0, window) if L > 1 else None}
        return {FULL: full.make_mask(L) if full is not None else None,
                SLIDING: rotating.make_mask(L) if rotating is not None else None}


class Model(nn.Module):
    compiled_decode = False  # the PLE lookup reads token ids on the host
    package_files = {PLE: PLE_FILE}  # tensors under these modules live in a file of their own

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.activation_dtype = mx.float32
        self.model = Gemma4TextModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        """(B, L) token ids -> (B, L, vocab) logits."""
        return head_logits(self, self.model(inputs, cache, self.activation_dtype),
                           self.args.final_logit_softcapping)

    def make_cache(self) -> list:
        """One cache per layer that computes keys and values (the KV-shared layers at the end
        have none): RotatingKVCache(window) for sliding layers, KVCache for full ones."""
        a = self.args
        return [RotatingKVCache(a.sliding_window) if t == SLIDING else KVCache()
                for t in a.layer_types[: a.first_kv_shared]]

    def sanitize(self, weights: dict) -> dict:
        """Drop what the model does not hold: a tied lm_head, KV-shared layers' k/v weights."""
        first = self.args.first_kv_shared
        out = {}
        for k, v in weights.items():
            if self.args.tie_word_embeddings and k.startswith("lm_head."):
                continue
            parts = k.split(".")
            if (len(parts) > 4 and parts[1] == "layers" and int(parts[2]) >= first
                    and parts[4] in ("k_proj", "v_proj", "k_norm", "v_norm")):
                continue
            out[k] = v
        return out

    def map_files(self, folder: Path, config: dict, weights: dict | None = None,
                  resident: bool = False) -> None:
        """Look the PLE table up in the package's own file (PLE_FILE) through a memory map, in
        place of the weights' embedding; `resident` reads it into memory instead. A package
        whose weights hold the table (e.g. written by mlx-lm) keeps it there."""
        if not self.args.hidden_size_per_layer_input:
            return
        if weights is not None and f"{PLE}.weight" in weights:
            return
        a = self.args
        shape = (a.vocab_size_per_layer_input, a.num_hidden_layers * a.hidden_size_per_layer_input)
        rows = MappedRows.open(Path(folder) / PLE_FILE, PLE, shape, config.get("quantization"))
        self.model.pop("embed_tokens_per_layer", None)
        self.model.ple_rows = rows.resident() if resident else rows

    @property
    def mapped_bytes_per_token(self) -> int:
        """Bytes a token reads from the memory-mapped PLE table (one row), 0 if not mapped."""
        rows = self.model.ple_rows
        return rows.row_bytes if rows is not None else 0

    @property
    def layers(self):
        return self.model.layers

    @property
    def activation_dtype(self) -> mx.Dtype:
        return self._activation_dtype

    @activation_dtype.setter
    def activation_dtype(self, dtype: mx.Dtype) -> None:
        # Gemma's residual stream outgrows float16 (see gemma3): bfloat16 instead
        self._activation_dtype = mx.bfloat16 if dtype == mx.float16 else dtype


# ------------------------------------------------------------------ Hugging Face checkpoints


def hf_name(name: str, config: dict) -> str | None:
    """Checkpoint name -> package name: the wrapper's text model moves to `model.`; the vision
    and audio towers and their projections are left out (None)."""
    if name.startswith("model.language_model."):
        return "model." + name.removeprefix("model.language_model.")
    if name.removeprefix("model.").startswith(_DROPPED):
        return None
    return name


def hf_fused(name: str, config: dict):
    """The MoE block's fused experts -> ([package names], split): `experts.gate_up_proj`
    (E, 2I, H) is gate then up along the output axis; `experts.down_proj` (E, H, I) is
    already (E, out, in)."""
    prefix, _, leaf = name.rpartition(".experts.")
    if not prefix.startswith("model.layers.") or leaf not in ("gate_up_proj", "down_proj"):
        return None
    return fused_gate_up(f"{prefix}.experts.switch_glu", leaf)


def quant_policy(name: str, shape: tuple, config: dict):
    """The router stays at 8 bits (as mlx-lm's quant_predicate)."""
    if name.endswith(".router.proj.weight"):
        return {"bits": 8, "group_size": 64}
    return None


def hf_config(config: dict) -> dict:
    """The text model's config (the wrapper's text_config), with `global_head_dim` and
    `num_global_key_value_heads` spelled out for readers of older configs (mlx-lm), and with
    MoE the experts per token also as `num_experts_per_tok` (what `edgert info` reads)."""
    if config.get("model_type") == "gemma4":
        text = dict(config.get("text_config") or {})
        text.setdefault("model_type", "gemma4_text")
        text.setdefault("tie_word_embeddings", config.get("tie_word_embeddings", True))
        for k in ("eos_token_id", "bos_token_id", "pad_token_id"):
            if k in config and k not in text:
                text[k] = config[k]
        config = text
    config = dict(config)
    per_layer = config.get("per_layer_config") or {}
    types = config.get("layer_types") or []
    full = [str(i) for i, t in enumerate(types) if t == FULL]
    if full and str(full[0]) in per_layer:
        over = per_layer[full[0]]
        config.setdefault("global_head_dim", over.get("head_dim", config.get("head_dim")))
        if "num_key_value_heads" in over:
            config.setdefault("num_global_key_value_heads", over["num_key_value_heads"])
    if config.get("enable_moe_block") and config.get("top_k_experts") is not None:
        config["num_experts_per_tok"] = config["top_k_experts"]
    return config


# ------------------------------------------------------------------ GGUF (llama.cpp "gemma4")


def _per_layer(value, n: int, what: str) -> list[int]:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * n
    if len(values) != n:
        raise EdgertError(f"gemma4.{what} has {len(values)} values for {n} layers")
    return [int(v) for v in values]


def gguf_config(meta, config: dict) -> dict:
    """Gemma 4's own fields, read as llama.cpp's converter (conversion/gemma.py Gemma4Model)
    writes them: per-layer kv heads and MLP widths, per-type head dims, the sliding pattern,
    the shared-KV count, the PLE width, and the proportional rope's turned share from the
    rope_freqs tensor (1 per turned pair, 1e30 for the rest)."""
    n = config["num_hidden_layers"]
    swa = [bool(x) for x in _per_layer(meta.get("attention.sliding_window_pattern", [False]),
                                       n, "attention.sliding_window_pattern")]
    types = [SLIDING if s else FULL for s in swa]
    kv = _per_layer(meta.get("attention.head_count_kv"), n, "attention.head_count_kv")
    ffn = _per_layer(meta.get("feed_forward_length"), n, "feed_forward_length")
    shared = int(meta.get("attention.shared_kv_layers", 0))
    hd_full = int(meta.need("attention.key_length"))
    hd_swa = int(meta.get("attention.key_length_swa", hd_full))
    first = n - shared
    rot = 1.0
    if meta.has_tensor("rope_freqs.weight"):
        freqs = meta.tensor("rope_freqs.weight")
        if freqs.size != hd_full // 2 or not np.all((freqs == 1) | (freqs >= 1e29)):
            raise UnsupportedError("gemma4 rope_freqs other than proportional rope")
        rot = 2 * int((freqs == 1).sum()) / hd_full
    drop = ("hidden_act", "rope_theta", "rope_scaling", "attention_bias")
    config = {k: v for k, v in config.items() if k not in drop}
    config.update({
        "intermediate_size": ffn[0], "head_dim": hd_swa,
        "num_key_value_heads": next((kv[i] for i, s in enumerate(swa) if s), kv[0]),
        "per_layer_config": {str(i): {"head_dim": hd_full, "num_key_value_heads": kv[i]}
                             for i, t in enumerate(types) if t == FULL},
        "attention_k_eq_v": any(t == FULL and meta.has_tensor(f"blk.{i}.attn_k.weight")
                                and not meta.has_tensor(f"blk.{i}.attn_v.weight")
                                for i, t in enumerate(types[:first])),
        "layer_types": types, "sliding_window": int(meta.need("attention.sliding_window")),
        "num_kv_shared_layers": shared,
        "use_double_wide_mlp": shared > 0 and ffn[-1] == 2 * ffn[0],
        "hidden_size_per_layer_input": int(meta.get("embedding_length_per_layer_input", 0)),
        "vocab_size_per_layer_input": (meta.shape("per_layer_token_embd.weight")[0]
                                       if meta.has_tensor("per_layer_token_embd.weight")
                                       else config["vocab_size"]),
        "rope_parameters": {
            SLIDING: {"rope_type": "default",
                      "rope_theta": meta.f32("rope.freq_base_swa", 10000.0)},
            FULL: {"rope_type": "proportional", "partial_rotary_factor": rot,
                   "rope_theta": meta.f32("rope.freq_base", 1_000_000.0)}},
        "final_logit_softcapping": meta.f32("final_logit_softcapping"),
        "hidden_activation": "gelu_pytorch_tanh",
    })
    if meta.get("expert_count"):  # the MoE block (26B-A4B), on every layer
        config.update({"enable_moe_block": True, "num_experts": int(meta.need("expert_count")),
                       "top_k_experts": int(meta.need("expert_used_count")),
                       "moe_intermediate_size": int(meta.need("expert_feed_forward_length"))})
    return hf_config(config)


GGUF = GGUFSpec(
    "gemma4", "Gemma4ForCausalLM",
    tensors={  # llama.cpp's gguf-py tensor_mapping
        "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
        "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
        "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
        "inp_gate": "per_layer_input_gate", "proj": "per_layer_projection",
        "post_norm": "post_per_layer_input_norm",
        # the MoE block: router, experts (numpy (E, out, in), as switch_glu holds them; the
        # converter writes gate_up_proj fused, gate rows then up rows), its three norms
        "ffn_gate_inp": "router.proj", "ffn_down_exps": "experts.switch_glu.down_proj",
        "ffn_gate_up_exps": ("experts.switch_glu.gate_proj", "experts.switch_glu.up_proj"),
        "ffn_gate_exps": "experts.switch_glu.gate_proj",
        "ffn_up_exps": "experts.switch_glu.up_proj",
        "pre_ffw_norm_2": "pre_feedforward_layernorm_2",
        "post_ffw_norm_1": "post_feedforward_layernorm_1",
        "post_ffw_norm_2": "post_feedforward_layernorm_2"},
    leaves={"layer_output_scale.weight": "layer_scalar",  # bare parameters
            "ffn_gate_inp.scale": "router.scale", "ffn_down_exps.scale": "router.per_expert_scale"},
    config=gguf_config,
    global_tensors={"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                    "output": "lm_head", "per_layer_token_embd": "model.embed_tokens_per_layer",
                    "per_layer_model_proj": "model.per_layer_model_projection",
                    "per_layer_proj_norm": "model.per_layer_projection_norm"},
    default_rope_theta=1_000_000.0)
