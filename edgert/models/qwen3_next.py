"""Qwen3-Next (Qwen3-Next-80B-A3B): HF model_type "qwen3_next" (Qwen3NextForCausalLM).

The Qwen3.5 hybrid (edgert.models.qwen3_5) with the linear-attention projections fused:
in_proj_qkvz holds, per key head, [q (Dk), k (Dk), v (r*Dv), z (r*Dv)] rows and in_proj_ba
[b (r), a (r)], r = value heads per key head. On every `decoder_sparse_step`-th layer not in
`mlp_only_layers`, Qwen3.5-MoE's block: a softmax top-k router (renormalised if
`norm_topk_prob`) over routed experts plus a shared expert scaled by
sigmoid(shared_expert_gate(x)); the other layers keep a dense MLP. Package names as
qwen3_5_moe's (mlx-lm's): `mlp.gate`, `mlp.switch_mlp.*`, `mlp.shared_expert.*`,
`mlp.shared_expert_gate`.

The package is laid out as mlx-lm's qwen3_next loads it without changing anything (its sanitize
leaves a package alone once the experts are stacked): zero-centred norms stored as 1 + w
(float32), conv1d as (C, K, 1), in_proj_qkvz fused (a GGUF's in_proj_qkv / in_proj_z joined
back), and the config keys it reads at the top level (package_tensors, hf_config). The loader
reads that layout back (Qwen3.5's sanitize: a (C, K, 1) kernel means shifted norms), and still
reads packages edgert wrote before it (HF layout, or in_proj_qkv / in_proj_z apart).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn
import numpy as np

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
        """Qwen3.5's (mlx-lm's (C, K, 1) conv1d and 1 + w norms back to HF's); linear layers
        whose package holds in_proj_qkv / in_proj_z apart (from a GGUF, written before the
        package was mlx-lm's layout) take the split layout."""
        weights = super().sanitize(weights)
        for i, layer in enumerate(self.layers):
            if f"model.layers.{i}.linear_attn.in_proj_qkv.weight" in weights:
                layer.linear_attn.split_projections()
        return weights


# ------------------------------------------------------------------ the package (mlx-lm's layout)


def hf_config(config: dict) -> dict:
    """The package's config: transformers' (rope_parameters, layer_types) plus what mlx-lm's
    qwen3_next reads at the top level: rope_theta, partial_rotary_factor, rope_scaling (a
    rope other than the default) and full_attention_interval (where layer_types follow one;
    mlx-lm places full attention by it alone)."""
    config = dict(config)
    rope = config.get("rope_parameters") or {}
    for key in ("rope_theta", "partial_rotary_factor"):
        if key in rope:
            config[key] = rope[key]
    if rope.get("rope_type", rope.get("type", "default")) not in ("default", "mrope"):
        config["rope_scaling"] = rope
    return qwen3_5._with_interval(config)


def _is_norm(record) -> bool:
    return record.name.endswith(qwen3_5.ZERO_CENTRED_NORMS) and len(record.shape) == 1


def _shifted(record):
    """A zero-centred norm w stored as 1 + w, in float32 (transformers computes 1 + w in
    float32: 1 + w rounded to a bfloat16 source's dtype would lose most of w)."""
    return dataclasses.replace(record, value=np.asarray(record.value, np.float32) + 1.0,
                               note="stored as 1 + w (mlx-lm's convention)", reference=None)


def _fused(parts: dict, config: dict):
    """in_proj_qkv [q, k, v] (v grouped by key head) and in_proj_z -> in_proj_qkvz: per key
    head [q (Dk), k (Dk), v (r*Dv), z (r*Dv)] rows, as HF and mlx-lm hold it."""
    from ..convert.canonical import join_rows

    n_k, dk = config["linear_num_key_heads"], config["linear_key_head_dim"]
    n_v, dv = config["linear_num_value_heads"], config["linear_value_head_dim"]
    key_dim, rv = n_k * dk, n_v // n_k * dv
    conv_dim = 2 * key_dim + n_k * rv
    order = np.concatenate([np.concatenate([h * dk + np.arange(dk),
                                            key_dim + h * dk + np.arange(dk),
                                            2 * key_dim + h * rv + np.arange(rv),
                                            conv_dim + h * rv + np.arange(rv)])
                            for h in range(n_k)])
    qkv, z = parts["in_proj_qkv.weight"], parts["in_proj_z.weight"]
    return join_rows(qkv.name.replace("in_proj_qkv", "in_proj_qkvz"), [qkv, z], order)


def package_tensors(records, config: dict):
    """Canonical records (HF convention) -> mlx-lm's layout (see the module docstring). A
    source already in it (an mlx-lm package: conv1d (C, K, 1)) passes through; norms wait for
    the first conv1d kernel to show which (there is one per linear layer)."""
    held, shifted = [], None  # norms seen before the first conv1d; whether they need 1 + w
    pending: dict[str, dict] = {}  # layer -> the in_proj_qkv / in_proj_z seen so far
    for r in records:
        if r.name.endswith("linear_attn.conv1d.weight") and len(r.shape) == 3:
            hf = r.shape[1] == 1 and r.shape[2] != 1  # HF (C, 1, K); mlx-lm (C, K, 1)
            shifted = hf if shifted is None else shifted
            if hf:
                r = dataclasses.replace(r, value=np.ascontiguousarray(r.value.swapaxes(1, 2)),
                                        note="(C, K, 1), mlx-lm's layout", reference=None)
            yield r
            yield from (_shifted(h) if shifted else h for h in held)
            held = []
        elif _is_norm(r):
            if shifted is None:
                held.append(r)
            else:
                yield _shifted(r) if shifted else r
        elif r.name.endswith((".linear_attn.in_proj_qkv.weight", ".linear_attn.in_proj_z.weight")):
            layer, _, leaf = r.name.rpartition(".linear_attn.")
            parts = pending.setdefault(layer, {})
            parts[leaf] = r
            if len(parts) == 2:
                yield _fused(pending.pop(layer), config)
        else:
            yield r
    yield from (_shifted(h) for h in held)  # no linear layer: the source was HF's
    for parts in pending.values():  # a half the reader's checks let through: as read
        yield from parts.values()


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
    """Qwen3.5-MoE's keys; every layer routes and renormalises; mlx-lm's top-level keys."""
    return hf_config({**qwen3_5_moe.gguf_config(meta, config), "norm_topk_prob": True,
                      "decoder_sparse_step": 1, "mlp_only_layers": []})


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
