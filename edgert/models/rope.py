"""Rotary position embeddings, including Llama 3's frequency scaling."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn


class Llama3RoPE(nn.Module):
    """RoPE with Llama 3.1's piecewise frequency scaling (HF rope_type "llama3")."""

    def __init__(self, dims: int, base: float, scaling: dict):
        super().__init__()
        self.dims = dims
        factor = scaling["factor"]
        low = scaling.get("low_freq_factor", 1.0)
        high = scaling.get("high_freq_factor", 4.0)
        old_ctx = scaling.get("original_max_position_embeddings", 8192)
        low_wavelen, high_wavelen = old_ctx / low, old_ctx / high

        freqs = base ** (mx.arange(0, dims, 2, dtype=mx.float32) / dims)  # (dims/2,) = 1/inv_freq
        wavelens = 2 * math.pi * freqs
        freqs = mx.where(wavelens > low_wavelen, freqs * factor, freqs)
        medium = (wavelens > high_wavelen) & (wavelens < low_wavelen)
        smooth = (old_ctx / wavelens - low) / (high - low)
        smoothed = freqs / ((1 - smooth) / factor + smooth)
        self._freqs = mx.where(medium, smoothed, freqs)

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        return mx.fast.rope(x, self.dims, traditional=False, base=None, scale=1.0,
                            offset=offset, freqs=self._freqs)


def initialize_rope(dims: int, base: float, traditional: bool = False,
                    scaling: dict | None = None, max_position_embeddings: int | None = None):
    """The RoPE module an HF config asks for."""
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type in ("default", None):
        return nn.RoPE(dims, traditional=traditional, base=base)
    if rope_type == "linear":
        return nn.RoPE(dims, traditional=traditional, base=base, scale=1 / scaling["factor"])
    if rope_type == "llama3":
        return Llama3RoPE(dims, base, scaling)
    from ..errors import UnsupportedError

    raise UnsupportedError(f"unsupported rope scaling type {rope_type!r}")
