"""Qwen3.5 / Qwen3.6: HF model_types "qwen3_5_text" (Qwen3_5ForCausalLM) and "qwen3_5" (the
published vision-language checkpoints, Qwen3_5ForConditionalGeneration: text weights under
model.language_model.*, the vision tower under model.visual.*, which edgert leaves out).

A hybrid: `layer_types` says which layers are Gated DeltaNet linear attention and which gated
full attention (the source of truth; older configs give full_attention_interval instead).

- full attention: q_proj is twice as wide, each head's rows [query (D), gate (D)]; q/k RMSNorm;
  rotary on the first partial_rotary_factor of each head (mRoPE's three position streams are
  equal for text, which makes it plain rope); output * sigmoid(gate) before o_proj.
- linear attention: in_proj_qkv -> causal depthwise conv1d (kernel K) + SiLU -> q, k, v;
  q, k L2-normalised, q scaled by Dk^-0.5; decay exp(-exp(A_log) softplus(a + dt_bias)) and
  rate sigmoid(b) from in_proj_a / in_proj_b; the delta rule (edgert.models.gated_delta);
  RMSNorm(out) * silu(in_proj_z(x)); out_proj.
- RMSNorms are zero-centred, (1 + w), except the gated one inside linear attention.

Package tensors keep the HF names and layouts (conv1d (C, 1, K), norms unshifted), which
mlx-lm's sanitize also takes. Caches: RecurrentCache [conv (B, K-1, C), delta (B, Hv, Dv, Dk)]
for linear layers, KVCache for full-attention ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..errors import EdgertError, UnsupportedError
from .base import BaseModelArgs, GGUFSpec, attention, causal_mask, embed
from .cache import KVCache, RecurrentCache, first_of
from .gated_delta import decay_and_rate, gated_delta, l2_normalize
from .rope import initialize_rope

MODEL_TYPES = ("qwen3_5", "qwen3_5_text")
COREML_GRAPH = "hybrid"  # edgert.convert.coreml_hybrid
LINEAR, FULL = "linear_attention", "full_attention"


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    hidden_act: str = "silu"
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32
    layer_types: list[str] | None = None
    full_attention_interval: int = 4  # only where layer_types is absent
    rope_parameters: dict | None = None
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.25
    rope_scaling: dict | None = None
    max_position_embeddings: int | None = None
    attention_bias: bool = False
    tie_word_embeddings: bool = False

    @classmethod
    def from_dict(cls, params: dict) -> "ModelArgs":
        """A text config, or a vision-language one whose text_config holds the text model."""
        if isinstance(params.get("text_config"), dict):
            text = dict(params["text_config"])
            if "tie_word_embeddings" in params:  # the wrapper's own setting governs the head
                text["tie_word_embeddings"] = params["tie_word_embeddings"]
            params = {**text, "model_type": params.get("model_type", text.get("model_type"))}
        return super().from_dict(params)

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.layer_types is None:
            n = self.full_attention_interval
            self.layer_types = [FULL if (i + 1) % n == 0 else LINEAR
                                for i in range(self.num_hidden_layers)]
        rope = dict(self.rope_parameters or {})
        self.rope_theta = rope.get("rope_theta", self.rope_theta)
        self.partial_rotary_factor = rope.get("partial_rotary_factor", self.partial_rotary_factor)
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", "mrope"):
            self.rope_scaling = rope
        self.validate()

    def validate(self) -> None:
        """One-line errors for configs this architecture cannot be built from."""
        if len(self.layer_types) != self.num_hidden_layers:
            raise EdgertError(f"{self.model_type}: layer_types has {len(self.layer_types)} "
                              f"entries for {self.num_hidden_layers} layers")
        unknown = sorted(set(self.layer_types) - {LINEAR, FULL})
        if unknown:
            raise UnsupportedError(f"{self.model_type}: layer types {unknown} "
                                   f"(supported: {LINEAR}, {FULL})")
        for what, n, by in [("num_attention_heads", self.num_attention_heads,
                             ("num_key_value_heads", self.num_key_value_heads)),
                            ("linear_num_value_heads", self.linear_num_value_heads,
                             ("linear_num_key_heads", self.linear_num_key_heads))]:
            if by[1] <= 0 or n % by[1]:
                raise EdgertError(f"{self.model_type}: {what} ({n}) is not a multiple of "
                                  f"{by[0]} ({by[1]})")
        if self.hidden_act != "silu":
            raise UnsupportedError(f"{self.model_type}: activation {self.hidden_act!r}")
        if self.linear_conv_kernel_dim < 1:
            raise EdgertError(f"{self.model_type}: linear_conv_kernel_dim must be at least 1")


class RMSNorm(nn.Module):
    """Zero-centred RMSNorm: the stored weight w scales by (1 + w)."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, 1.0 + self.weight, self.eps)


class RMSNormGated(nn.Module):
    """RMSNorm(x) * w * silu(gate), w stored as is (Qwen3_5RMSNormGated)."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.ones((dims,))
        self.eps = eps

    def __call__(self, x: mx.array, gate: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, self.weight, self.eps) * nn.silu(gate.astype(x.dtype))


class Attention(nn.Module):
    """Gated full attention with q/k norm and partial rotary."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        dim, hd = args.hidden_size, args.head_dim
        self.n_heads, self.n_kv_heads = args.num_attention_heads, args.num_key_value_heads
        self.scale = hd**-0.5
        bias = args.attention_bias
        self.q_proj = nn.Linear(dim, 2 * self.n_heads * hd, bias=bias)  # per head [query, gate]
        self.k_proj = nn.Linear(dim, self.n_kv_heads * hd, bias=bias)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * hd, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * hd, dim, bias=bias)
        self.q_norm = RMSNorm(hd, args.rms_norm_eps)
        self.k_norm = RMSNorm(hd, args.rms_norm_eps)
        self.rope = initialize_rope(int(hd * args.partial_rotary_factor), args.rope_theta, False,
                                    args.rope_scaling, args.max_position_embeddings)

    def __call__(self, x: mx.array, mask, cache=None) -> mx.array:
        B, L, _ = x.shape
        q, gate = mx.split(self.q_proj(x).reshape(B, L, self.n_heads, -1), 2, axis=-1)
        # (B, L, H, D) -> (B, H, L, D)
        q = self.q_norm(q).transpose(0, 2, 1, 3)
        k = self.k_norm(self.k_proj(x).reshape(B, L, self.n_kv_heads, -1)).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, L, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        offset = cache.offset if cache is not None else 0
        q, k = self.rope(q, offset=offset), self.rope(k, offset=offset)
        if cache is not None:
            k, v = cache.update_and_fetch(k, v)
        out = attention(q, k, v, self.scale, mask).transpose(0, 2, 1, 3)  # (B, L, H, D)
        return self.o_proj((out * mx.sigmoid(gate)).reshape(B, L, -1))


class CausalConv1d(nn.Module):
    """Depthwise causal convolution over time. weight (C, 1, K) as HF stores it."""

    def __init__(self, channels: int, kernel: int):
        super().__init__()
        self.weight = mx.zeros((channels, 1, kernel))
        self.kernel = kernel

    def __call__(self, x: mx.array, state: mx.array | None) -> tuple[mx.array, mx.array]:
        """x (B, L, C), state (B, K-1, C) the inputs before it -> (out (B, L, C), new state)."""
        B, L, C = x.shape
        K = self.kernel
        if state is None:
            state = mx.zeros((B, K - 1, C), x.dtype)
        padded = mx.concatenate([state.astype(x.dtype), x], axis=1)  # (B, K-1+L, C)
        w = self.weight[:, 0, :].astype(x.dtype)  # (C, K)
        out = sum(padded[:, j : j + L] * w[:, j] for j in range(K))
        return out, padded[:, L:]


class GatedDeltaNet(nn.Module):
    """Linear attention with the gated delta rule (Qwen3_5GatedDeltaNet)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        dim = args.hidden_size
        self.n_k, self.n_v = args.linear_num_key_heads, args.linear_num_value_heads
        self.dk, self.dv = args.linear_key_head_dim, args.linear_value_head_dim
        self.key_dim, self.value_dim = self.n_k * self.dk, self.n_v * self.dv
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.make_projections(dim)
        self.conv1d = CausalConv1d(self.conv_dim, args.linear_conv_kernel_dim)
        self.dt_bias = mx.ones((self.n_v,))
        self.A_log = mx.zeros((self.n_v,))
        self.norm = RMSNormGated(self.dv, args.rms_norm_eps)
        self.out_proj = nn.Linear(self.value_dim, dim, bias=False)

    def make_projections(self, dim: int) -> None:
        self.in_proj_qkv = nn.Linear(dim, self.conv_dim, bias=False)
        self.in_proj_z = nn.Linear(dim, self.value_dim, bias=False)
        self.in_proj_b = nn.Linear(dim, self.n_v, bias=False)
        self.in_proj_a = nn.Linear(dim, self.n_v, bias=False)

    def project(self, x: mx.array):
        """x (B, L, dim) -> qkv (B, L, conv_dim), z (B, L, Hv, Dv), b, a (B, L, Hv)."""
        B, L, _ = x.shape
        z = self.in_proj_z(x).reshape(B, L, self.n_v, self.dv)
        return self.in_proj_qkv(x), z, self.in_proj_b(x), self.in_proj_a(x)

    def __call__(self, x: mx.array, mask=None, cache: RecurrentCache | None = None) -> mx.array:
        B, L, _ = x.shape
        qkv, z, b, a = self.project(x)
        conv, conv_state = self.conv1d(qkv, cache[0] if cache is not None else None)
        q, k, v = mx.split(nn.silu(conv), [self.key_dim, 2 * self.key_dim], axis=-1)
        q = l2_normalize(q.reshape(B, L, self.n_k, self.dk).astype(mx.float32)) * self.dk**-0.5
        k = l2_normalize(k.reshape(B, L, self.n_k, self.dk).astype(mx.float32))
        v = v.reshape(B, L, self.n_v, self.dv)
        g, beta = decay_and_rate(a, b, self.A_log, self.dt_bias)  # (B, L, Hv)
        out, state = gated_delta(q, k, v, g, beta, cache[1] if cache is not None else None)
        if cache is not None:
            cache[0], cache[1] = conv_state, state
            cache.advance(L)
        out = self.norm(out.astype(x.dtype), z)  # (B, L, Hv, Dv)
        return self.out_proj(out.reshape(B, L, -1))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    linear_cls = GatedDeltaNet

    def __init__(self, args: ModelArgs, layer_type: str):
        super().__init__()
        self.layer_type = layer_type
        if layer_type == LINEAR:
            self.linear_attn = self.linear_cls(args)
        else:
            self.self_attn = Attention(args)
        self.mlp = MLP(args.hidden_size, args.intermediate_size)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def __call__(self, x: mx.array, mask, cache=None) -> mx.array:
        mixer = self.linear_attn if self.layer_type == LINEAR else self.self_attn
        h = x + mixer(self.input_layernorm(x), mask, cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class TextModel(nn.Module):
    def __init__(self, args: ModelArgs, layer_cls=DecoderLayer):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [layer_cls(args, t) for t in args.layer_types]
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache=None, dtype=mx.float32) -> mx.array:
        h = embed(self.embed_tokens, inputs, dtype)  # (B, L, dim)
        L = h.shape[1]
        kv = first_of(cache, KVCache)  # masks from the first full-attention cache
        mask = kv.make_mask(L) if kv is not None else (causal_mask(L, 0) if L > 1 else None)
        for layer, c in zip(self.layers, cache or [None] * len(self.layers)):
            h = layer(h, mask, c)
        return self.norm(h)


class Model(nn.Module):
    compiled_decode = False  # recurrent layers: generation runs the plain decode step

    def __init__(self, args: ModelArgs, layer_cls=DecoderLayer):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.activation_dtype = mx.float32
        self.model = TextModel(args, layer_cls)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(self, inputs: mx.array, cache=None) -> mx.array:
        """(B, L) token ids -> (B, L, vocab) logits."""
        h = self.model(inputs, cache, self.activation_dtype)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    def make_cache(self) -> list:
        """RecurrentCache [conv, delta] for linear layers, KVCache for full-attention ones."""
        return [RecurrentCache(2) if layer.layer_type == LINEAR else KVCache()
                for layer in self.layers]

    def sanitize(self, weights: dict) -> dict:
        """Package (HF) names -> this module's: a VL wrapper's model.language_model.* is the
        text model, its vision tower and MTP head are dropped; a tied head is dropped."""
        out = {}
        mlx_lm_saved = False
        for k, v in weights.items():
            if (k := model_name(k)) is None:
                continue
            if k.endswith("conv1d.weight") and v.ndim == 3 and v.shape[1] != 1:
                v = v.swapaxes(1, 2)  # mlx-lm's (C, K, 1) -> HF (C, 1, K)
                mlx_lm_saved = True
            out[k] = v
        if mlx_lm_saved:  # mlx-lm saves the zero-centred norms as 1 + w (it runs plain RMSNorm)
            out = {k: v - 1.0 if k.endswith(ZERO_CENTRED_NORMS) and v.ndim == 1 else v
                   for k, v in out.items()}
        if self.args.tie_word_embeddings:
            out.pop("lm_head.weight", None)
        return out

    @property
    def layers(self):
        return self.model.layers


def model_name(name: str) -> str | None:
    """A package tensor name -> the text model's (a VL wrapper's model.language_model.* is
    model.*, mlx-lm's language_model.model.* too); None for what the text model does not hold
    (vision tower, MTP head, rotary)."""
    if name.startswith(("model.visual.", "visual.", "vision_tower.", "mtp.")) \
            or "rotary_emb" in name:
        return None
    if name.startswith("language_model."):  # mlx-lm's own saved layout
        return name.removeprefix("language_model.")
    return name.replace("model.language_model.", "model.", 1)


# ------------------------------------------------------------------ HF reader hooks


def hf_name(name: str, config: dict) -> str | None:
    """Checkpoint name -> package name: kept as is, except the vision tower (model.visual.*)
    and the multi-token-prediction head (mtp.*), which edgert does not run (dropped)."""
    if name.startswith(("model.visual.", "visual.", "mtp.")):
        return None
    return name


def hf_config(config: dict) -> dict:
    """The package's config, flat and as mlx-lm reads it: a VL wrapper's text_config becomes
    the config (the vision config goes with the vision tower; the wrapper's
    tie_word_embeddings governs), model_type "qwen3_5" (mlx-lm has no "qwen3_5_text"), and
    periodic layer_types also as full_attention_interval (all that mlx-lm reads of them)."""
    config = dict(config)
    if isinstance(text := config.pop("text_config", None), dict):
        config.pop("vision_config", None)
        tied = config.get("tie_word_embeddings", text.get("tie_word_embeddings"))
        config = {**config, **text, "tie_word_embeddings": tied}
    config["model_type"] = "qwen3_5"
    return _with_interval(config)


def _with_interval(config: dict) -> dict:
    """full_attention_interval beside layer_types where they follow one (for mlx-lm)."""
    types = config.get("layer_types") or []
    n = next((i + 1 for i, t in enumerate(types) if t == FULL), None)
    if n and types == [FULL if (i + 1) % n == 0 else LINEAR for i in range(len(types))]:
        config["full_attention_interval"] = n
    return config


def quant_policy(name: str, shape: tuple, config: dict):
    """Keep conv1d, A_log, dt_bias and norms float (mlx-lm does too); everything else, the
    small in_proj_a / in_proj_b included, at the default layout, as mlx-lm's dense Qwen3.5."""
    if not name.endswith(".weight") or "conv1d" in name or "norm" in name:
        return False
    return None


# ------------------------------------------------------------------ GGUF (llama.cpp "qwen35")
#
# llama.cpp's converter (conversion/qwen.py, Qwen3_5TextModel) changes, and this undoes:
# norms stored as 1 + w (all but linear_attn.norm); A_log stored as ssm_a = -exp(A_log);
# conv1d squeezed to (C, K); and where value heads outnumber key heads (r = Hv / Hk > 1) the
# value heads reordered from grouped by key head [k0v0..k0v(r-1), k1v0, ...] to tiled
# [k0v0, k1v0, ..., k0v1, k1v1, ...] in in_proj_qkv's v rows, in_proj_z, in_proj_a/b, A_log,
# dt_bias, conv1d's v channels (rows) and out_proj's columns.

GGUF_TENSORS = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "attn_norm": "input_layernorm",
    "post_attention_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_qkv": "linear_attn.in_proj_qkv", "attn_gate": "linear_attn.in_proj_z",
    "ssm_beta": "linear_attn.in_proj_b", "ssm_alpha": "linear_attn.in_proj_a",
    "ssm_conv1d": "linear_attn.conv1d", "ssm_norm": "linear_attn.norm",
    "ssm_out": "linear_attn.out_proj",
}
# block tensors without a .weight / .bias of their own name: GGUF leaf -> HF leaf
GGUF_LEAVES = {"ssm_a": "linear_attn.A_log", "ssm_dt.bias": "linear_attn.dt_bias"}
_SHIFTED = ("input_layernorm.weight", "post_attention_layernorm.weight", "model.norm.weight",
            "q_norm.weight", "k_norm.weight")
ZERO_CENTRED_NORMS = _SHIFTED  # the RMSNorms that scale by (1 + w) (all but linear_attn.norm)


def gguf_config(meta, config: dict) -> dict:
    """The qwen35 keys on top of the llama-shaped ones: linear-attention shapes (ssm.*), which
    layers are recurrent (attention.recurrent_layers, else full_attention_interval), partial
    rotary (rope.dimension_count) and mRoPE sections."""
    recurrent = meta.get("attention.recurrent_layers")
    n = config["num_hidden_layers"]
    if recurrent is not None:
        layer_types = [LINEAR if r else FULL for r in list(recurrent)[:n]]
    elif (interval := meta.get("full_attention_interval")) is not None:
        layer_types = [FULL if (i + 1) % int(interval) == 0 else LINEAR for i in range(n)]
    else:
        raise EdgertError(f"missing metadata {meta.arch}.attention.recurrent_layers "
                          f"(or {meta.arch}.full_attention_interval)")
    n_v = int(meta.need("ssm.time_step_rank"))
    rope = {"rope_type": "default", "rope_theta": config["rope_theta"],
            "partial_rotary_factor": int(meta.need("rope.dimension_count")) / config["head_dim"]}
    if sections := meta.get("rope.dimension_sections"):
        rope["mrope_section"] = [int(s) for s in list(sections)[:3]]
    rope.update(config.pop("rope_scaling", None) or {})
    return _with_interval({**config, "layer_types": layer_types, "rope_parameters": rope,
            "linear_conv_kernel_dim": int(meta.need("ssm.conv_kernel")),
            "linear_key_head_dim": int(meta.need("ssm.state_size")),
            "linear_num_key_heads": int(meta.need("ssm.group_count")),
            "linear_num_value_heads": n_v,
            "linear_value_head_dim": int(meta.need("ssm.inner_size")) // n_v})


def _map_arrays(value, fn):
    """`fn` on a float array, or on each array of a QuantTensor (its rows move whole)."""
    from ..quant import QuantTensor

    if isinstance(value, QuantTensor):
        biases = None if value.biases is None else fn(value.biases)
        return QuantTensor(fn(value.w_q), fn(value.scales), biases, value.bits,
                           value.group_size, value.mode)
    return fn(value)


def _grouped(x, axis: int, n_k: int, r: int, start: int = 0):
    """Value heads along `axis` (from `start`) from llama.cpp's tiled order (r, n_k, d) back to
    HF's grouped one (n_k, r, d); d, the entries per head, is what is left of the axis."""
    import numpy as np

    head, tail = np.split(x, [start], axis=axis) if start else (None, x)
    shape = tail.shape
    d = shape[axis] // (n_k * r)
    split = (*shape[:axis], r, n_k, d, *shape[axis + 1:])
    tail = tail.reshape(split).swapaxes(axis, axis + 1).reshape(shape)
    return tail if head is None else np.concatenate([head, tail], axis=axis)


def gguf_transform(name: str, value, config: dict):
    """A GGUF tensor (float32 array or QuantTensor) in HF's convention (see above)."""
    import numpy as np

    from ..quant import QuantTensor

    n_k, n_v = config["linear_num_key_heads"], config["linear_num_value_heads"]
    r = n_v // n_k
    key_dim = n_k * config["linear_key_head_dim"]
    quantized = isinstance(value, QuantTensor)
    leaf = name.split("linear_attn.")[-1]

    def rows(x, start=0):
        return x if r == 1 else _map_arrays(x, lambda a: _grouped(a, 0, n_k, r, start))

    if name.endswith(_SHIFTED):
        return value - 1.0
    if leaf in ("in_proj_z.weight", "in_proj_a.weight", "in_proj_b.weight", "dt_bias"):
        return rows(value)
    if leaf == "A_log":
        return np.log(-rows(value))
    if leaf == "in_proj_qkv.weight":
        return rows(value, 2 * key_dim)
    if leaf == "conv1d.weight":
        if quantized:
            raise EdgertError(f"{name}: a quantized conv1d kernel is not supported")
        return rows(value, 2 * key_dim)[:, None, :]  # (C, K) -> HF (C, 1, K)
    if leaf == "out_proj.weight" and r > 1:
        return _columns_grouped(name, value, n_k, r, config["linear_value_head_dim"])
    return value


def _columns_grouped(name: str, value, n_k: int, r: int, dv: int):
    """out_proj's input columns (value heads of dv each) back to grouped order; a quantized
    tensor moves whole groups, so dv must be a multiple of its group size (and of 32 / bits
    words)."""
    from ..quant import QuantTensor

    if not isinstance(value, QuantTensor):
        return _grouped(value, 1, n_k, r)
    if dv % value.group_size or (dv * value.bits) % 32:
        raise EdgertError(f"{name}: value heads of {dv} columns cannot move in groups of "
                          f"{value.group_size} ({value.bits}-bit)")
    biases = None if value.biases is None else _grouped(value.biases, 1, n_k, r)
    return QuantTensor(_grouped(value.w_q, 1, n_k, r), _grouped(value.scales, 1, n_k, r),
                       biases, value.bits, value.group_size, value.mode)


GGUF = GGUFSpec("qwen35", "Qwen3_5ForCausalLM", GGUF_TENSORS, config=gguf_config,
                transform=gguf_transform, leaves=GGUF_LEAVES)
