"""Rotary position embeddings, including Llama 3's frequency scaling."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np


def inv_frequencies(dims: int, base: float, scaling: dict | None = None) -> np.ndarray:
    """(dims // 2,) float64 inverse frequencies with HF's "linear" or "llama3" scaling
    applied: the one formula the runtime, the GGUF reader (llama.cpp's rope_freqs factors)
    and the Core ML writer (its cos/sin tables) share."""
    inv = 1.0 / base ** (np.arange(0, dims, 2, dtype=np.float64) / dims)
    rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
    if rope_type in ("default", None):
        return inv
    if rope_type == "linear":
        return inv / scaling["factor"]
    if rope_type == "llama3":
        factor = scaling["factor"]
        low, high = scaling.get("low_freq_factor", 1.0), scaling.get("high_freq_factor", 4.0)
        old_ctx = scaling.get("original_max_position_embeddings", 8192)
        wavelens = 2 * math.pi / inv
        smooth = (old_ctx / wavelens - low) / (high - low)
        scaled = np.where(wavelens > old_ctx / low, inv / factor, inv)
        medium = (wavelens > old_ctx / high) & (wavelens < old_ctx / low)
        return np.where(medium, (1 - smooth) * inv / factor + smooth * inv, scaled)
    from ..errors import UnsupportedError

    raise UnsupportedError(f"unsupported rope scaling type {rope_type!r}")


class Llama3RoPE(nn.Module):
    """RoPE with Llama 3.1's piecewise frequency scaling (HF rope_type "llama3")."""

    def __init__(self, dims: int, base: float, scaling: dict):
        super().__init__()
        self.dims = dims
        # (dims / 2,) wavelengths / 2pi, as mx.fast.rope takes them
        self._freqs = mx.array(1.0 / inv_frequencies(dims, base, scaling), dtype=mx.float32)

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
