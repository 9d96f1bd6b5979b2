"""MLX affine quantization as data and math, shared by the readers, the writers and the runtime:
the canonical quantized tensor (`QuantTensor`), float -> affine (`quantize_float`) and back
(`dequantize`)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

MLX_BITS = (1, 2, 3, 4, 5, 6, 8)
MLX_GROUPS = (128, 64, 32)  # largest first: the group a source group is split into
DEFAULT_BITS, DEFAULT_GROUP = 4, 64  # mlx-lm's defaults
ROW_BLOCK = 4096  # rows quantized at a time, to bound the float32 working copy


def worse_error(a: float, b: float) -> float:
    """The larger of two max-abs errors, NaN (an overflow) winning: max() would drop it."""
    return math.nan if math.isnan(a) or math.isnan(b) else max(a, b)


@dataclass
class QuantTensor:
    """MLX affine quantization: w[..., r, j] = scales[..., r, j // group] * q[..., r, j]
    + biases[..., r, j // group]. Leading axes (e.g. experts, (E, out, in)) are allowed."""

    w_q: np.ndarray  # (..., rows, cols * bits // 32) uint32, each row a little-endian bitstream
    scales: np.ndarray  # (...,rows, cols // group_size) float16 / float32
    biases: np.ndarray | None  # (..., rows, cols // group_size) as scales; None in mode "mxfp4"
    bits: int
    group_size: int
    mode: str = "affine"

    @property
    def shape(self) -> tuple[int, ...]:
        """(..., rows, cols): leading axes (experts) as w_q has them."""
        *lead, words = self.w_q.shape
        return (*lead, words * 32 // self.bits)

    @property
    def nbytes(self) -> int:
        biases = 0 if self.biases is None else self.biases.nbytes
        return self.w_q.nbytes + self.scales.nbytes + biases


SCALE_DTYPES = {"float16": np.float16, "float32": np.float32}


def mx_dequantize(t: QuantTensor) -> mx.array:
    return mx.dequantize(mx.array(t.w_q), mx.array(t.scales).astype(mx.float32),
                         mx.array(t.biases).astype(mx.float32), group_size=t.group_size,
                         bits=t.bits, mode=t.mode)


def dequantize(t: QuantTensor) -> np.ndarray:
    """(rows, cols) float32: scales * q + biases, computed in float32."""
    return np.array(mx_dequantize(t))


def quantize_float(w: np.ndarray, bits: int, group_size: int,
                   scale_dtype: str = "float16") -> tuple[QuantTensor, float]:
    """A float (rows, cols) matrix -> MLX affine `bits` / `group_size` (mx.quantize: min-max
    per group, zero on the grid) and its max abs error against `w`, measured on the CPU with
    the stored scales (NaN if anything overflowed). ROW_BLOCK rows at a time, so only one
    block is ever in float32. Scales or biases beyond float16 keep the whole tensor in
    float32 (the same tensor in one dtype)."""
    np_dt = SCALE_DTYPES[scale_dtype]
    parts = []
    with mx.stream(mx.cpu):
        for lo in range(0, w.shape[0], ROW_BLOCK):
            x = mx.array(np.asarray(w[lo:lo + ROW_BLOCK], dtype=np.float32))
            q, s, b = mx.quantize(x, group_size=group_size, bits=bits)
            parts.append((np.array(q), np.array(s), np.array(b)))
        if np_dt == np.float16:
            with np.errstate(over="ignore"):
                fits = all(np.isfinite(p[i].astype(np.float16)).all() for p in parts
                           for i in (1, 2))
            np_dt = np.float16 if fits else np.float32
        err = 0.0
        for lo, (q, s, b) in zip(range(0, w.shape[0], ROW_BLOCK), parts):
            x = mx.array(np.asarray(w[lo:lo + ROW_BLOCK], dtype=np.float32))
            d = mx.dequantize(mx.array(q), mx.array(s.astype(np_dt).astype(np.float32)),
                              mx.array(b.astype(np_dt).astype(np.float32)),
                              group_size=group_size, bits=bits)
            err = worse_error(err, mx.abs(d - x).max().item())
    w_q, s, b = (np.concatenate([p[i] for p in parts]) for i in range(3))
    return QuantTensor(w_q, s.astype(np_dt), b.astype(np_dt), bits, group_size), err




def unpermute_rows(x: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation for llama (LlamaModel.permute in convert_hf_to_gguf).

    GGUF keeps each head's rows interleaved for GGML's rope, (n_head, half, 2); HF keeps them
    split in halves, (n_head, 2, half). Works on any array whose first axis is the rows."""
    rows = x.shape[0]
    # (rows, ...) -> (n_head, half, 2, ...) -> (n_head, 2, half, ...) -> (rows, ...)
    return x.reshape(n_head, rows // n_head // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def map_rows(value, fn):
    """`fn` applied to the rows (first axis) of a float array, or of each array of a 2-D
    QuantTensor (its blocks run along the input axis, so rows move whole)."""
    if isinstance(value, QuantTensor):
        biases = None if value.biases is None else fn(value.biases)
        return QuantTensor(fn(value.w_q), fn(value.scales), biases, value.bits,
                           value.group_size, value.mode)
    return fn(value)


def widen(t: QuantTensor, bits: int, group_size: int, scale_dtype) -> QuantTensor:
    """The same values in a wider affine layout, exactly: the codes repacked at `bits` (>= t's),
    scales and biases repeated for `group_size` (dividing t's) and cast to `scale_dtype`
    (float32, or t's own)."""
    from .bitpack import pack_rows, unpack_rows

    if t.mode != "affine" or bits < t.bits or t.group_size % group_size:
        raise ValueError(f"{t.bits}-bit g{t.group_size} {t.mode} cannot widen to "
                         f"{bits}-bit g{group_size}")
    *lead, words = t.w_q.shape
    w_q = t.w_q if bits == t.bits else pack_rows(
        unpack_rows(t.w_q.reshape(-1, words), t.bits), bits).reshape(*lead, -1)
    r = t.group_size // group_size
    scales = np.repeat(t.scales, r, axis=-1).astype(scale_dtype)
    return QuantTensor(w_q, scales, np.repeat(t.biases, r, axis=-1).astype(scale_dtype), bits,
                       group_size)
