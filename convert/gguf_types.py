"""GGML tensor types mapped onto MLX: a table plus one small class per type.

MLX affine quantization stores w[r, j] = scales[r, j // g] * q[r, j] + biases[r, j // g], each
row of q a little-endian bitstream (element j at bit j * bits, LSB first) in uint32 words. A
GGML block of B weights runs along a row (the input axis), so it becomes one or more MLX groups
of that row. Block layouts follow ggml-common.h (`block_q4_0`, ...) and gguf-py's quants.py.

| GGML     | block: bytes            | MLX                                  | w           |
|----------|-------------------------|--------------------------------------|-------------|
| F32, F16 | -                       | float, unchanged                     | -           |
| BF16     | -                       | float32 (exact widening)             | -           |
| Q4_0     | 32: f16 d, 16 B nibbles | 4-bit g32, s = d, b = -8d            | d * (q - 8) |
| Q4_1     | 32: f16 d, f16 m, 16 B  | 4-bit g32, s = d, b = m              | d * q + m   |
| Q8_0     | 32: f16 d, 32 int8      | 8-bit g32, q + 128, s = d, b = -128d | d * q       |

Each product d * q fits in 19 bits, so s * q + b equals the reference in float32 whether or
not it is fused (the one difference: where the reference gives -0.0, MLX gives +0.0).
Scales and biases stay float16 where they are exact there; where a bias such as -128d
overflows float16 the tensor keeps float32 scales and biases instead ("f32-scales exact").
A new type is one more class here with `qtype=` and an `affine` method.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from edgert.errors import UnsupportedError

from .canonical import EXACT, F32_SCALES_EXACT, FLOAT, QuantTensor

T = GGMLQuantizationType


class Mapped(NamedTuple):
    value: np.ndarray | QuantTensor
    mapping: str  # a mapping class from canonical.py
    note: str = ""


TYPES: dict[GGMLQuantizationType, type[GGMLType]] = {}


def mlx_type(qtype: GGMLQuantizationType, tensor_name: str = "") -> type[GGMLType]:
    """The class that maps `qtype`; UnsupportedError naming the type (and tensor) otherwise."""
    try:
        return TYPES[qtype]
    except KeyError:
        where = f"tensor {tensor_name} has type" if tensor_name else "type"
        raise UnsupportedError(f"{where} {qtype.name}, not supported yet "
                               f"(supported: {', '.join(t.name for t in TYPES)})") from None


def pack_rows(q: np.ndarray, bits: int) -> np.ndarray:
    """(rows, cols) uint8 codes < 2**bits -> (rows, cols * bits // 32) uint32 MLX bitstreams."""
    rows = q.shape[0]
    if bits == 8:
        packed = q
    elif 8 % bits == 0:
        per = 8 // bits
        shifts = np.arange(per, dtype=np.uint8) * np.uint8(bits)
        # (rows, cols) -> (rows, cols // per, per) -> (rows, cols * bits // 8) uint8
        packed = np.bitwise_or.reduce(q.reshape(rows, -1, per) << shifts, axis=-1)
    else:  # 3/5/6 bits straddle bytes and words
        b = (q[..., None] >> np.arange(bits, dtype=np.uint8)) & 1  # (rows, cols, bits)
        packed = np.packbits(b.reshape(rows, -1), axis=-1, bitorder="little")
    return np.ascontiguousarray(packed).view("<u4")  # (rows, cols * bits // 32)


def f16(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The f16 field at byte `offset` of each block: (n_blocks, type_size) -> (n_blocks, 1) f32."""
    return blocks[:, offset:offset + 2].view(np.float16).astype(np.float32)


class GGMLType:
    """One GGML tensor type; `to_mlx` maps a tensor's data as gguf-py reads it."""

    qtype: ClassVar[GGMLQuantizationType]

    def __init_subclass__(cls, qtype: GGMLQuantizationType | None = None, **kwargs):
        super().__init_subclass__(**kwargs)
        if qtype is not None:
            cls.qtype = qtype
            TYPES[qtype] = cls

    @classmethod
    def to_mlx(cls, data: np.ndarray, shape: tuple[int, ...]) -> Mapped:
        """`data` is gguf-py's array for the tensor; `shape` its numpy shape (rows, cols)."""
        raise NotImplementedError


class F32(GGMLType, qtype=T.F32):
    @classmethod
    def to_mlx(cls, data, shape):
        return Mapped(data.reshape(shape), FLOAT)


class F16(F32, qtype=T.F16):
    pass


class BF16(GGMLType, qtype=T.BF16):
    @classmethod
    def to_mlx(cls, data, shape):
        # (..., cols * 2) uint8 -> (..., cols) uint16 -> high half of a float32
        bits = np.ascontiguousarray(data).view("<u2").reshape(shape)
        return Mapped((bits.astype(np.uint32) << 16).view(np.float32), FLOAT,
                      "bf16 widened to float32 (exact)")


class BlockType(GGMLType):
    """A block-quantized type whose blocks map onto MLX affine groups of one row."""

    bits: ClassVar[int]
    group_size: ClassVar[int]

    @classmethod
    def affine(cls, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(n_blocks, type_size) uint8 -> codes (n_blocks, block_size) uint8, scales and biases
        (n_blocks, block_size // group_size) float32 (exact values)."""
        raise NotImplementedError

    @classmethod
    def to_mlx(cls, data, shape):
        rows, cols = shape
        block_size, type_size = GGML_QUANT_SIZES[cls.qtype]
        blocks = np.asarray(data).reshape(-1, type_size)  # (rows * cols // block_size, type_size)
        q, s, b = cls.affine(blocks)
        w_q = pack_rows(q.reshape(rows, cols), cls.bits)  # (rows, cols * bits // 32) uint32
        s, b = s.reshape(rows, -1), b.reshape(rows, -1)  # (rows, cols // group_size) float32
        with np.errstate(over="ignore"):
            s16, b16 = s.astype(np.float16), b.astype(np.float16)
        if np.array_equal(s16, s) and np.array_equal(b16, b):
            return Mapped(QuantTensor(w_q, s16, b16, cls.bits, cls.group_size), EXACT)
        return Mapped(QuantTensor(w_q, s, b, cls.bits, cls.group_size), F32_SCALES_EXACT,
                      "float32 scales/biases: float16 would overflow or round")


class Q4_0(BlockType, qtype=T.Q4_0):
    """block_q4_0: f16 d, then 16 bytes; byte i holds element i (low nibble) and i + 16 (high).
    w = d * (q - 8)  ->  s = d, b = -8d."""

    bits, group_size = 4, 32

    @classmethod
    def affine(cls, blocks):
        d = f16(blocks, 0)  # (n, 1)
        qs = blocks[:, 2:]  # (n, 16) uint8
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1)  # (n, 32) codes 0..15
        return q, d, -8 * d


class Q4_1(BlockType, qtype=T.Q4_1):
    """block_q4_1: f16 d, f16 m, then 16 bytes as in Q4_0. w = d * q + m  ->  s = d, b = m."""

    bits, group_size = 4, 32

    @classmethod
    def affine(cls, blocks):
        qs = blocks[:, 4:]  # (n, 16) uint8
        q = np.concatenate([qs & 0x0F, qs >> 4], axis=1)  # (n, 32) codes 0..15
        return q, f16(blocks, 0), f16(blocks, 2)


class Q8_0(BlockType, qtype=T.Q8_0):
    """block_q8_0: f16 d, then 32 int8. w = d * x  ->  q = x + 128, s = d, b = -128d."""

    bits, group_size = 8, 32

    @classmethod
    def affine(cls, blocks):
        d = f16(blocks, 0)  # (n, 1)
        q = blocks[:, 2:] ^ np.uint8(0x80)  # (n, 32) int8 two's complement + 128 as uint8
        return q, d, -128 * d
