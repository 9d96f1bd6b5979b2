"""PrismML's Hadamard packs of Qwen3.5 (HF model_type "prism_hadamard_qwen35", as mlx-lm names
the format): the Qwen3.5 text model (edgert.models.qwen3_5) whose packed layers are 2-bit
affine, group 128, with a signed blockwise Walsh-Hadamard rotation folded into each weight's
input axis.

The pack, as mlx-lm reads it (mlx_lm/models/prism_hadamard_qwen35.py):
- config.json: model_type, text_config (the qwen3_5 text config), schema_version 1 (tensor
  namespace "mlx-lm-text": keys as mlx-lm's text model, model.* / lm_head.*) or 2
  ("mlx-vlm-qwen3_5": language_model.model.* / language_model.lm_head.*, a vision tower
  beside it, which edgert leaves out), gdn_activation_layout "grouped" (value heads grouped
  by key head, HF's order), quantization exactly {bits 2, group_size 128, mode affine}, and
  `modules`: one record per packed layer {path, embedding, dtype, block}; `path` is the
  layer's module path in the text model (model.layers.0.mlp.up_proj, model.embed_tokens,
  lm_head).
- per packed layer: weight (out, in / 16) uint32, scales and biases (out, in / 128); where
  block > 0 also signs (in,) of +-1.

A layer with block b computes W x as W' R x, with R x = H_b (signs * x): signs, then the
normalised Walsh-Hadamard transform (scale 1/sqrt(b)) of each run of b inputs, in float32;
W' = W R^T is what is stored (each row rotated the same way). An embedding row e' = R e is
rotated back on lookup, e = signs * H_b e' (H_b is its own inverse), after rounding the
dequantized row to the record's activation dtype (float16; the packs were made that way);
tied to the head, the embedding is the linear layer above. Layers not in `modules` are plain:
quantized where the pack has their scales (the package's quantization block), else float.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import mlx.core as mx
import mlx.nn as nn

from ..errors import EdgertError, UnsupportedError
from . import qwen3_5

MODEL_TYPES = ("prism_hadamard_qwen35",)
NAMESPACES = {1: "mlx-lm-text", 2: "mlx-vlm-qwen3_5"}  # schema_version -> tensor_namespace
QUANTIZATION = {"bits": 2, "group_size": 128, "mode": "affine"}
BLOCKS = (0, 512, 1024, 2048, 4096, 8192)  # 0: no rotation
PACK_FIELDS = ("schema_version", "tensor_namespace", "gdn_activation_layout", "quantization",
               "modules")
RECORD_FIELDS = ("path", "embedding", "dtype", "block")
ACTIVATION_DTYPES = {"float16": mx.float16}


@dataclass
class ModelArgs(qwen3_5.ModelArgs):
    schema_version: int | None = None
    tensor_namespace: str | None = None
    gdn_activation_layout: str | None = None
    quantization: dict = field(default_factory=dict)
    modules: list = field(default_factory=list)

    @classmethod
    def from_dict(cls, params: dict) -> "ModelArgs":
        """The pack's config: the text model from text_config, the pack's own fields from the
        top level."""
        text = params.get("text_config")
        if isinstance(text, dict):
            pack = {k: params[k] for k in PACK_FIELDS if k in params}
            params = {**params, "text_config": {**text, **pack}}
        return super().from_dict(params)

    def validate(self) -> None:
        super().validate()
        what = f"{self.model_type} pack"
        if NAMESPACES.get(self.schema_version) != self.tensor_namespace:
            raise UnsupportedError(
                f"{what}: schema_version {self.schema_version!r} with tensor_namespace "
                f"{self.tensor_namespace!r} (supported: "
                + ", ".join(f"{s} {n!r}" for s, n in NAMESPACES.items()) + ")")
        if self.gdn_activation_layout != "grouped":
            raise UnsupportedError(f"{what}: gdn_activation_layout "
                                   f"{self.gdn_activation_layout!r} (only 'grouped')")
        # absent only while a converter writes the package (it adds the block from the tensors;
        # the loader refuses quantized tensors without one)
        if self.quantization and self.quantization != QUANTIZATION:
            raise EdgertError(f"{what}: quantization must be exactly {QUANTIZATION}, "
                              f"got {self.quantization!r}")
        if not isinstance(self.modules, list) or not self.modules:
            raise EdgertError(f"{what}: config has no `modules` list of packed layers")
        seen = set()
        for i, r in enumerate(self.modules):
            if not isinstance(r, dict) or any(k not in r for k in RECORD_FIELDS):
                raise EdgertError(f"{what}: modules[{i}] must hold {', '.join(RECORD_FIELDS)}")
            if r["path"] in seen:
                raise EdgertError(f"{what}: module {r['path']!r} is listed twice")
            seen.add(r["path"])
            if r["block"] not in BLOCKS or isinstance(r["block"], bool):
                raise EdgertError(f"{what}: module {r['path']!r} has Hadamard block "
                                  f"{r['block']!r} (one of {', '.join(map(str, BLOCKS))})")
            if r["dtype"] not in ACTIVATION_DTYPES:
                raise UnsupportedError(f"{what}: module {r['path']!r} has activation dtype "
                                       f"{r['dtype']!r} (only float16)")


# ------------------------------------------------------------------ the rotation


def walsh_hadamard(x: mx.array) -> mx.array:
    """Unnormalised Walsh-Hadamard transform (Sylvester order) of the last axis, a power of
    two: the pure-MLX twin of mx.hadamard_transform, log2(n) butterflies."""
    shape, n = x.shape, x.shape[-1]
    h = 1
    while h < n:
        y = x.reshape(-1, n // (2 * h), 2, h)  # pairs (a, b) h apart inside runs of 2h
        a, b = y[:, :, 0], y[:, :, 1]
        x = mx.stack([a + b, a - b], axis=2).reshape(shape)
        h *= 2
    return x


@functools.cache
def fused_available() -> bool:
    """Whether mx.hadamard_transform runs on the default device (tried once, on a tiny input,
    against the twin)."""
    try:
        x = mx.random.normal((2, 512), key=mx.random.key(0))
        return bool(mx.allclose(mx.hadamard_transform(x, scale=1.0), walsh_hadamard(x),
                                atol=1e-3).item())
    except Exception:  # noqa: BLE001 - any failure means: not on this device
        return False


def rotate(x: mx.array, block: int, signs: mx.array, inverse: bool = False,
           use_fused: bool | None = None) -> mx.array:
    """R x (or R^T x with `inverse`) along the last axis, R = blockwise normalised Hadamard of
    `block` after the signs, computed in float32; returns x's dtype."""
    dtype, shape = x.dtype, x.shape
    x = x.astype(mx.float32)
    if not inverse:
        x = x * signs
    x = x.reshape(-1, block)  # (runs, block)
    scale = 1 / math.sqrt(block)
    if fused_available() if use_fused is None else use_fused:
        x = mx.hadamard_transform(x, scale=scale)
    else:
        x = walsh_hadamard(x) * scale
    x = x.reshape(shape)
    if inverse:
        x = x * signs
    return x.astype(dtype)


# ------------------------------------------------------------------ packed layers


class HadamardLinear(nn.Module):
    """2-bit g128 affine linear layer whose input axis carries a Hadamard rotation (block 0:
    none). weight (out, in / 16) uint32; scales, biases (out, in / 128); signs (in,)."""

    bits, group_size = QUANTIZATION["bits"], QUANTIZATION["group_size"]

    def __init__(self, input_dims: int, output_dims: int, block: int, dtype: mx.Dtype):
        super().__init__()
        self.block, self.dtype = block, dtype
        self.weight = mx.zeros((output_dims, input_dims * self.bits // 32), mx.uint32)
        self.scales = mx.zeros((output_dims, input_dims // self.group_size))
        self.biases = mx.zeros((output_dims, input_dims // self.group_size))
        if block:
            self.signs = mx.ones((input_dims,))
        self.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        """(..., in) -> (..., out)."""
        if self.block:
            x = rotate(x, self.block, self["signs"])
        return mx.quantized_matmul(x, self["weight"], self["scales"].astype(x.dtype),
                                   self["biases"].astype(x.dtype), transpose=True,
                                   group_size=self.group_size, bits=self.bits)


class HadamardEmbedding(HadamardLinear):
    """The token table packed as a HadamardLinear of (vocab, dim): rows rotated back on
    lookup; `as_linear` is the tied head."""

    def __call__(self, ids: mx.array) -> mx.array:
        """(B, L) ids -> (B, L, dim) in the record's activation dtype."""
        rows = mx.dequantize(self["weight"][ids], self["scales"][ids], self["biases"][ids],
                             group_size=self.group_size, bits=self.bits).astype(self.dtype)
        return rotate(rows, self.block, self["signs"], inverse=True) if self.block else rows

    def as_linear(self, x: mx.array) -> mx.array:
        return HadamardLinear.__call__(self, x)


def _packed(path: str, module, record: dict) -> HadamardLinear:
    """The packed layer that replaces `module` (nn.Linear / nn.Embedding) at `path`."""
    where = f"prism_hadamard_qwen35 pack: module {path!r}"
    embedding = isinstance(module, nn.Embedding)
    if not isinstance(module, (nn.Linear, nn.Embedding)):
        raise EdgertError(f"{where} is not a linear or embedding layer of the model")
    if bool(record["embedding"]) != embedding:
        raise EdgertError(f"{where}: embedding is {record['embedding']!r}, but it is "
                          f"{'an embedding' if embedding else 'a linear layer'}")
    if "bias" in module:
        raise UnsupportedError(f"{where}: a packed layer with a bias")
    rows, width = module.weight.shape
    block = record["block"]
    if width % QUANTIZATION["group_size"] or (block and width % block):
        raise EdgertError(f"{where}: input width {width} does not split into groups of 128 "
                          f"and Hadamard blocks of {block}")
    cls = HadamardEmbedding if embedding else HadamardLinear
    return cls(width, rows, block, ACTIVATION_DTYPES[record["dtype"]])


# ------------------------------------------------------------------ the model


class Model(qwen3_5.Model):
    """qwen3_5's model with the packed layers swapped in (they are no nn.QuantizedLinear, so
    the package loader's quantization leaves them as they are)."""

    def __init__(self, args: ModelArgs):
        super().__init__(args)
        modules = dict(self.named_modules())
        swaps = [(r["path"], _packed(r["path"], modules.get(r["path"]), r))
                 for r in args.modules]
        from mlx.utils import tree_unflatten

        self.update_modules(tree_unflatten(swaps))

    def sanitize(self, weights: dict) -> dict:
        """qwen3_5's names and layouts (both schemas' keys come to the text model's), then each
        rotated layer's sign vector checked: present and only +-1."""
        weights = super().sanitize(weights)
        rotated = [r["path"] for r in self.args.modules if r["block"]]
        if missing := [p for p in rotated if f"{p}.signs" not in weights]:
            raise EdgertError(f"prism_hadamard_qwen35 pack: no Hadamard sign vector "
                              f"{missing[0]}.signs" + (f" (and {len(missing) - 1} more)"
                                                        if len(missing) > 1 else ""))
        for p in rotated:
            s = weights[f"{p}.signs"]
            if mx.any((s != 1) & (s != -1)).item():
                raise EdgertError(f"prism_hadamard_qwen35 pack: {p}.signs holds values other "
                                  "than -1 and +1")
        return weights


# ------------------------------------------------------------------ HF reader hooks


def hf_name(name: str, config: dict) -> str | None:
    """A pack's tensor name, kept as is (`edgert convert` copies the pack), except a schema-2
    pack's vision tower, which edgert does not run (dropped)."""
    if name.startswith(("vision_tower.", "model.visual.", "visual.")):
        return None
    return name
