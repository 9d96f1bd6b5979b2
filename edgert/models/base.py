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


def attention(q: mx.array, k, v, scale: float, mask) -> mx.array:
    """Fused attention with grouped-query broadcast. q (B, H, L, D); k, v (B, H_kv, S, D), or
    (w_q, scales, biases) triples from a quantized KV cache (cache.QuantizedKVCache)."""
    if isinstance(k, tuple):
        return quantized_attention(q, k, v, scale, mask)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)


def quantized_attention(q: mx.array, k: tuple, v: tuple, scale: float, mask) -> mx.array:
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
    probs = mx.softmax(scores, axis=-1, precise=True)  # (B, H_kv, rep, L, S)
    out = mx.quantized_matmul(probs, *v, transpose=False, group_size=group, bits=bits)
    return out.reshape(B, H, L, D)


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
