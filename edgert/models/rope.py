"""Rotary position embeddings, including Llama 3's and YaRN's frequency scaling."""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np


def inv_frequencies(dims: int, base: float, scaling: dict | None = None) -> np.ndarray:
    """(dims // 2,) float64 inverse frequencies with HF's "linear", "llama3" or "yarn" scaling
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
    if rope_type == "yarn":
        keep = _yarn_extrapolation(dims, base, scaling)
        return inv / _yarn_factor(scaling) * (1 - keep) + inv * keep
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


def _yarn_factor(scaling: dict) -> float:
    old_ctx = scaling["original_max_position_embeddings"]
    return scaling.get("factor") or scaling["max_position_embeddings"] / old_ctx


def _yarn_extrapolation(dims: int, base: float, scaling: dict) -> np.ndarray:
    """(dims // 2,) weight of the original frequency in YaRN's blend: 1 for the dimensions that
    turn more than beta_fast times in the original context, 0 below beta_slow, a ramp between
    (transformers' _compute_yarn_parameters)."""
    old_ctx = scaling["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:
        return dims * math.log(old_ctx / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = correction_dim(scaling.get("beta_fast") or 32)
    high = correction_dim(scaling.get("beta_slow") or 1)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dims - 1)
    high = high + 0.001 if low == high else high
    return 1 - np.clip((np.arange(dims // 2, dtype=np.float64) - low) / (high - low), 0, 1)


def yarn_attention_factor(scaling: dict) -> float:
    """YaRN's scale of the rotated part of queries and keys: attention_factor, else from
    mscale / mscale_all_dim, else 0.1 ln(factor) + 1."""
    if (attn := scaling.get("attention_factor")) is not None:
        return float(attn)
    factor = _yarn_factor(scaling)

    def mscale(m: float = 1.0) -> float:
        return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0

    m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
    return mscale(m) / mscale(m_all) if m and m_all else mscale()


class YarnRoPE(nn.Module):
    """RoPE with YaRN scaling (HF rope_type "yarn"): blended frequencies (inv_frequencies) and
    the rotated part of queries and keys scaled by yarn_attention_factor."""

    def __init__(self, dims: int, base: float, scaling: dict,
                 max_position_embeddings: int | None = None):
        super().__init__()
        scaling = {"original_max_position_embeddings": max_position_embeddings,
                   "max_position_embeddings": max_position_embeddings, **scaling}
        self.dims = dims
        self.attention_factor = yarn_attention_factor(scaling)
        self._freqs = mx.array(1.0 / inv_frequencies(dims, base, scaling), dtype=mx.float32)

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        if self.attention_factor != 1.0:  # (..., D): the rotated dims scaled, the rest kept
            x = mx.concatenate([x[..., : self.dims] * self.attention_factor, x[..., self.dims:]],
                               axis=-1)
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
    if rope_type == "yarn":
        return YarnRoPE(dims, base, scaling, max_position_embeddings)
    from ..errors import UnsupportedError

    raise UnsupportedError(f"unsupported rope scaling type {rope_type!r}")
