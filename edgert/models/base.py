"""Pieces shared by the architectures: argument dataclasses, masks, attention."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import mlx.core as mx


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
