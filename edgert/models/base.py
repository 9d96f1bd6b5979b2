"""Pieces shared by the architectures: argument dataclasses, masks, attention."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
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


def attention(q: mx.array, k: mx.array, v: mx.array, scale: float, mask) -> mx.array:
    """Fused attention with grouped-query broadcast. q (B, H, L, D); k, v (B, H_kv, S, D)."""
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


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
