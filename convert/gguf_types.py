"""GGML tensor types mapped onto MLX: a table plus one small class per type.

MLX affine quantization stores w[r, j] = scales[r, j // g] * q[r, j] + biases[r, j // g], each
row of q a little-endian bitstream (element j at bit j * bits, LSB first) in uint32 words. A
GGML block of B weights runs along a row (the input axis), so it becomes one or more MLX groups
of that row. Block layouts follow ggml-common.h (`block_q4_0`, ...) and gguf-py's quants.py.

| GGML      | block: bytes                | MLX                                   | class    | bpw        |
|-----------|-----------------------------|---------------------------------------|----------|------------|
| F32, F16  | -                           | float, unchanged                      | float    | 32, 16     |
| BF16      | -                           | float32 (exact widening)              | float    | 16 -> 32   |
| Q4_0      | 32: f16 d, 16 B nibbles     | 4-bit g32, s = d, b = -8d             | exact    | 4.5 -> 5   |
| Q4_1      | 32: f16 d, f16 m, 16 B      | 4-bit g32, s = d, b = m               | exact    | 5 -> 5     |
| Q5_0      | 32: f16 d, 4 B qh, 16 B     | 5-bit g32, s = d, b = -16d            | exact    | 5.5 -> 6   |
| Q5_1      | 32: f16 d, f16 m, qh, qs    | 5-bit g32, s = d, b = m               | exact    | 6 -> 6     |
| Q8_0      | 32: f16 d, 32 int8          | 8-bit g32, q + 128, s = d, b = -128d  | exact    | 8.5 -> 9   |
| Q1_0 (41) | 128: f16 d, 16 B sign bits  | 1-bit g128, s = 2d, b = -d            | exact    | 1.125->1.25|
| Q1_0_G32  | 32: f16 d, 4 B (PrismML 40) | 1-bit g32, s = 2d, b = -d             | exact    | 1.5 -> 2   |
| Q2_0 (42) | 64: f16 d, 16 B             | 2-bit g64, s = d, b = -d              | exact    | 2.25 -> 2.5|
| TQ2_0     | 256: 64 B, f16 d            | 2-bit g128, s = d, b = -d             | exact    | 2.06->2.25 |
| TQ1_0     | 256: base-3 trits, f16 d    | 2-bit g128, s = d, b = -d             | widened  | 1.69->2.25 |
| Q4_K      | 256: d, dmin, 6-bit sc/m    | 4-bit g32, s = d*sc, b = -dmin*m      | f32 exact| 4.5 -> 6   |
| Q5_K      | 256: as Q4_K + high bits    | 5-bit g32, s = d*sc, b = -dmin*m      | f32 exact| 5.5 -> 7   |
| Q3_K      | 256: 16 x 16, 6-bit sc      | 8-bit g128, q = 128 - sc*q, s = -d, b = 128d | widened | 3.44->8.25 |
| Q2_K      | 256: 16 x 16, 4-bit sc/m    | 8-bit g32 re-quantized (min-max)      | requant. | 2.63 -> 9  |
| Q6_K      | 256: 16 x 16, int8 sc       | 8-bit g32 re-quantized (min-max)      | requant. | 6.56 -> 9  |
| IQ4_NL    | 32: f16 d, 16 B table idx   | 8-bit g32, q = kv + 128, s = d, b = -128d | widened | 4.5 -> 9 |
| IQ4_XS    | 256: d, 6-bit sc per 32     | 8-bit g32, q = kv + 128, s = d*sc, b = -128s | widened | 4.25->10 |
| MXFP4     | 32: E8M0 e, 16 B e2m1       | mode "mxfp4" g32, scale = e, nibbles re-ordered | exact | 4.25 -> 4.25 |

bpw on the MLX side counts float16 scales and biases (32 bits per group) or float32 ones (64).

Exactness. MLX's CPU dequantization computes round(s * q) and then adds b (no fused multiply-
add), so every mapping keeps s * q exact in float32 (at most 24 significant bits) and
s * q + b then rounds once, as the reference's own expression does: e.g. Q4_K's d * sc has at
most 11 + 6 bits and q 4, IQ4_XS's d * (ls - 32) at most 11 + 5 and q 8, Q3_K's d 11 and
q 8. The one difference: where the reference gives -0.0, MLX gives +0.0 (x + (-x) is +0.0).
Scales and biases stay float16 where they are exact there; else the tensor keeps float32 ones
("f32-scales exact" for the exact types; widened types stay "widened" with a note).

Sub-blocks of 16 (Q2_K, Q3_K, Q6_K): MLX quantized matmul takes groups of 32, 64 or 128 only,
and a group of 32 spans two sub-blocks with different scales (and, in Q2_K, different mins).
- Q3_K has an exact layout: both sub-scales are integers sc in [-32, 31] times the super-
  block's f16 d, so w = d * m with m = sc * q in [-124, 128] -- one 8-bit grid per 256 weights
  (8-bit g128, s = -d, b = 128d, q = 128 - m).
- Q6_K (m = sc * q needs 13 bits) and Q2_K (a per-sub-block min dmin * m on top) have none:
  they are re-quantized from gguf-py's dequantization to 8-bit g32 with min-max scales
  (mx.quantize, zero on the grid), float16 scales and biases (float32 where float16 would
  overflow), and the max abs error against the reference is measured per tensor and reported
  (Mapped.max_abs_error -> TensorRecord.max_abs_error). Measured on Gemma 3 270M Q4_K_M and
  on llama-quantize's SmolLM2 files: per group of 32, the error is at most 0.28 (mean 0.12)
  of the group's larger Q6_K step d * sc -- Q6_K's own rounding is up to 0.5 step -- and at
  most 0.02 of a Q2_K step; as absolute values, <= 0.0023 (Gemma) and <= 0.019 (SmolLM2).
  An exact alternative would be a second matmul per layer (Q2_K: a 6-bit d * sc * q part plus
  a per-16 min term; Q6_K: two 6-bit halves), which MLX layers do not have.
`dequantize_requantize` is the same path for any type gguf-py can dequantize (opt-in).

Type ids. gguf-py names the ids it knows; edgert adds the ones it does not (`ExtraType`): Q2_0
(id 42; gguf 0.19 predates it) and PrismML's first 1-bit type, which reused id 40 with blocks
of 32 (6 bytes), where mainline has NVFP4 (blocks of 64, 36 bytes). PrismML's id 41
(Q1_0_g128: 128 weights, 18 bytes, bit set -> +d else -d) is mainline Q1_0 byte for byte.
`ggml_type` tells the readings of one id apart by the tensor's bytes per block.
A new type is one more class here with `qtype=` and an `affine` method.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

from edgert.bitpack import pack_rows
from edgert.errors import UnsupportedError

from .canonical import (EXACT, F32_SCALES_EXACT, FLOAT, REQUANTIZED, WIDENED, QuantTensor,
                        worse_error)

T = GGMLQuantizationType


class ExtraType(NamedTuple):
    """A GGML type that this gguf-py does not name (or that a fork gave another layout)."""

    name: str
    value: int  # the type id in the file
    block_size: int
    type_size: int


Q2_0_TYPE: GGMLQuantizationType | ExtraType = getattr(T, "Q2_0", None) or ExtraType(
    "Q2_0", 42, 64, 18)
Q1_0_G32 = ExtraType("Q1_0_G32", 40, 32, 6)  # PrismML's first Q1_0 (mainline 40 is NVFP4)
EXTRA_TYPES = tuple(t for t in (Q2_0_TYPE, Q1_0_G32) if isinstance(t, ExtraType))
QType = GGMLQuantizationType | ExtraType


def type_layout(qtype: QType) -> tuple[int, int]:
    """(weights per block, bytes per block) of `qtype`."""
    if isinstance(qtype, ExtraType):
        return qtype.block_size, qtype.type_size
    return GGML_QUANT_SIZES[qtype]


def ggml_type(type_id: int, n_elements: int, n_bytes: int | None = None) -> QType:
    """The type that type id `type_id` means for a tensor of `n_elements` weights with at most
    `n_bytes` bytes of data in the file (up to the next tensor).

    Readings of one id (mainline and a fork's) are told apart by bytes per block: the largest
    layout that fits in `n_bytes` wins, since tensor data is packed in order with padding below
    the alignment. UnsupportedError for an id nobody here knows."""
    readings: list[QType] = [t for t in T if t.value == type_id]
    readings += [e for e in EXTRA_TYPES if e.value == type_id]
    if not readings:
        raise UnsupportedError(f"GGML type id {type_id} is unknown to gguf-py and edgert")
    if n_bytes is None or len(readings) == 1:
        return readings[0]

    def size(t: QType) -> int:
        block, type_size = type_layout(t)
        return n_elements // block * type_size if n_elements % block == 0 else -1

    fitting = [t for t in readings if 0 <= size(t) <= n_bytes]
    return max(fitting, key=size) if fitting else readings[0]


class Mapped(NamedTuple):
    value: np.ndarray | QuantTensor
    mapping: str  # a mapping class from canonical.py
    note: str = ""
    max_abs_error: float = 0.0  # against the source's dequantization (requantized only)


TYPES: dict[QType, type[GGMLType]] = {}


def mlx_type(qtype: QType, tensor_name: str = "") -> type[GGMLType]:
    """The class that maps `qtype`; UnsupportedError naming the type (and tensor) otherwise."""
    try:
        return TYPES[qtype]
    except KeyError:
        where = f"tensor {tensor_name} has type" if tensor_name else "type"
        raise UnsupportedError(f"{where} {qtype.name}, not supported yet "
                               f"(supported: {', '.join(t.name for t in TYPES)}; "
                               "`edgert convert --requantize` re-quantizes it, lossy)") from None


def f16(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The f16 field at byte `offset` of each block: (n_blocks, type_size) -> (n_blocks, 1) f32."""
    return np.ascontiguousarray(blocks[:, offset:offset + 2]).view(np.float16).astype(np.float32)


def nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, k) bytes holding element i in the low and i + k in the high nibble -> (n, 2k) codes."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def bit_planes(qs: np.ndarray, bits: int) -> np.ndarray:
    """(n, k) bytes whose shift s * bits holds element s * k + i of byte i -> (n, 8 // bits * k)."""
    shifts = np.arange(0, 8, bits, dtype=np.uint8)[:, None]  # (8 // bits, 1)
    return ((qs[:, None, :] >> shifts) & ((1 << bits) - 1)).reshape(len(qs), -1)


class GGMLType:
    """One GGML tensor type; `to_mlx` maps a tensor's data as gguf-py reads it."""

    qtype: ClassVar[QType]

    def __init_subclass__(cls, qtype: QType | None = None, **kwargs):
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


def _blocks(qtype: QType, data: np.ndarray) -> np.ndarray:
    """gguf-py's (rows, bytes per row) uint8 -> (rows * cols // block_size, type_size)."""
    return np.ascontiguousarray(data).view(np.uint8).reshape(-1, type_layout(qtype)[1])


class BlockType(GGMLType):
    """A block-quantized type whose blocks map onto MLX affine groups of one row."""

    bits: ClassVar[int]
    group_size: ClassVar[int]
    mapping: ClassVar[str] = EXACT  # or WIDENED: lossless but more bits than the source

    @classmethod
    def affine(cls, blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(n_blocks, type_size) uint8 -> codes (n_blocks, block_size) uint8, scales and biases
        (n_blocks, block_size // group_size) float32 (exact values)."""
        raise NotImplementedError

    @classmethod
    def to_mlx(cls, data, shape):
        rows, cols = shape
        q, s, b = cls.affine(_blocks(cls.qtype, data))
        w_q = pack_rows(q.reshape(rows, cols), cls.bits)  # (rows, cols * bits // 32) uint32
        s, b = s.reshape(rows, -1), b.reshape(rows, -1)  # (rows, cols // group_size) float32
        with np.errstate(over="ignore"):
            s16, b16 = s.astype(np.float16), b.astype(np.float16)
        if np.array_equal(s16, s) and np.array_equal(b16, b):
            return Mapped(QuantTensor(w_q, s16, b16, cls.bits, cls.group_size), cls.mapping)
        t = QuantTensor(w_q, s, b, cls.bits, cls.group_size)
        note = "float32 scales/biases: float16 would overflow or round"
        return Mapped(t, F32_SCALES_EXACT if cls.mapping == EXACT else cls.mapping, note)


# ------------------------------------------------------------------ 32-weight blocks


class Q4_0(BlockType, qtype=T.Q4_0):
    """block_q4_0: f16 d, then 16 bytes; byte i holds element i (low nibble) and i + 16 (high).
    w = d * (q - 8)  ->  s = d, b = -8d."""

    bits, group_size = 4, 32

    @classmethod
    def affine(cls, blocks):
        d = f16(blocks, 0)  # (n, 1)
        return nibbles(blocks[:, 2:]), d, -8 * d  # codes (n, 32) 0..15


class Q4_1(BlockType, qtype=T.Q4_1):
    """block_q4_1: f16 d, f16 m, then 16 bytes as in Q4_0. w = d * q + m  ->  s = d, b = m."""

    bits, group_size = 4, 32

    @classmethod
    def affine(cls, blocks):
        return nibbles(blocks[:, 4:]), f16(blocks, 0), f16(blocks, 2)


def _q5(qh: np.ndarray, qs: np.ndarray) -> np.ndarray:
    """qh (n, 4) bytes = bit 4 of element j at bit j, qs (n, 16) as Q4_0 -> (n, 32) codes 0..31."""
    return nibbles(qs) | (np.unpackbits(qh, axis=1, bitorder="little") << 4)


class Q5_0(BlockType, qtype=T.Q5_0):
    """block_q5_0: f16 d, 4 bytes qh (5th bits), 16 bytes as Q4_0. w = d * (q - 16)."""

    bits, group_size = 5, 32

    @classmethod
    def affine(cls, blocks):
        d = f16(blocks, 0)
        return _q5(blocks[:, 2:6], blocks[:, 6:]), d, -16 * d


class Q5_1(BlockType, qtype=T.Q5_1):
    """block_q5_1: f16 d, f16 m, 4 bytes qh, 16 bytes. w = d * q + m."""

    bits, group_size = 5, 32

    @classmethod
    def affine(cls, blocks):
        return _q5(blocks[:, 4:8], blocks[:, 8:]), f16(blocks, 0), f16(blocks, 2)


class Q8_0(BlockType, qtype=T.Q8_0):
    """block_q8_0: f16 d, then 32 int8. w = d * x  ->  q = x + 128, s = d, b = -128d."""

    bits, group_size = 8, 32

    @classmethod
    def affine(cls, blocks):
        d = f16(blocks, 0)  # (n, 1)
        q = blocks[:, 2:] ^ np.uint8(0x80)  # (n, 32) int8 two's complement + 128 as uint8
        return q, d, -128 * d


IQ4_KVALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113],
                       dtype=np.int16)  # kvalues_iq4nl in ggml-common.h
_IQ4_CODES = (IQ4_KVALUES + 128).astype(np.uint8)


class IQ4_NL(BlockType, qtype=T.IQ4_NL):
    """block_iq4_nl: f16 d, 16 bytes of table indices laid out as Q4_0. w = d * kv[i]
    ->  8-bit q = kv[i] + 128, s = d, b = -128d (widened: 4.5 -> 9 bpw)."""

    bits, group_size, mapping = 8, 32, WIDENED

    @classmethod
    def affine(cls, blocks):
        d = f16(blocks, 0)
        return _IQ4_CODES[nibbles(blocks[:, 2:])], d, -128 * d


class MXFP4(GGMLType, qtype=T.MXFP4):
    """block_mxfp4: E8M0 exponent e, 16 bytes of e2m1 codes laid out as Q4_0. ggml reads
    w = 2**(e - 128) * (2 * e2m1(q)), MLX mode "mxfp4" 2**(e - 127) * e2m1(q): the same codes
    and scale bytes, the nibbles re-ordered into MLX's sequence. e = 255 is NaN to MLX (E8M0's
    NaN) but finite to ggml; no quantizer writes it, and it is refused."""

    @classmethod
    def to_mlx(cls, data, shape):
        rows, cols = shape
        blocks = _blocks(cls.qtype, data)
        e = blocks[:, :1]  # (n, 1) uint8
        if (e == 255).any():
            raise UnsupportedError("MXFP4 block with E8M0 scale 255 (NaN in MLX's mxfp4)")
        w_q = pack_rows(nibbles(blocks[:, 1:]).reshape(rows, cols), 4)  # (rows, cols // 8)
        t = QuantTensor(w_q, e.reshape(rows, -1).copy(), None, 4, 32, mode="mxfp4")
        return Mapped(t, EXACT)


# ------------------------------------------------------------------ 1- and 2-bit (ternary)


class Q1_0(BlockType, qtype=T.Q1_0):
    """block_q1_0 (mainline id 41 = PrismML's Q1_0_g128): f16 d, 16 bytes of bits, element j
    at bit j. w = +d where the bit is set, else -d  ->  s = 2d, b = -d."""

    bits, group_size = 1, 128

    @classmethod
    def affine(cls, blocks):
        d = f16(blocks, 0)
        return np.unpackbits(blocks[:, 2:], axis=1, bitorder="little"), 2 * d, -d


class Q1_0_G32Type(Q1_0, qtype=Q1_0_G32):
    """PrismML's first Q1_0 (id 40): as Q1_0 with blocks of 32 (f16 d, 4 bytes)."""

    bits, group_size = 1, 32


class Q2_0(BlockType, qtype=Q2_0_TYPE):
    """block_q2_0 (id 42): f16 d, 16 bytes, element j at bits 2 (j % 4) of byte j // 4.
    w = d * (q - 1), q in 0..3  ->  s = d, b = -d."""

    bits, group_size = 2, 64

    @classmethod
    def affine(cls, blocks):
        d = f16(blocks, 0)
        q = (blocks[:, 2:, None] >> np.arange(0, 8, 2, dtype=np.uint8)) & 3  # (n, 16, 4)
        return q.reshape(len(blocks), 64), d, -d


class TQ2_0(BlockType, qtype=T.TQ2_0):
    """block_tq2_0: 64 bytes, then f16 d; element 128 c + 32 s + i at bits 2s of byte 32 c + i.
    w = d * (q - 1)  ->  2-bit g128, s = d, b = -d (d repeated for both groups)."""

    bits, group_size = 2, 128

    @classmethod
    def affine(cls, blocks):
        n = len(blocks)
        d = f16(blocks, 64)
        q = bit_planes(blocks[:, :64].reshape(n * 2, 32), 2).reshape(n, 256)
        d = np.repeat(d, 2, axis=1)  # (n, 2)
        return q, d, -d


_POW3 = np.array([1, 3, 9, 27, 81], dtype=np.uint8)[:, None]  # (5, 1)


def _trits(qs: np.ndarray, powers: np.ndarray) -> np.ndarray:
    """(n, k) base-3 bytes -> (n, len(powers) * k) trits 0..2: element p * k + i is the p-th
    trit of byte i, read as ggml does: ((byte * 3**p) mod 256) * 3 >> 8."""
    scaled = qs[:, None, :] * powers  # (n, p, k) uint8, wrapping
    return ((scaled.astype(np.uint16) * 3) >> 8).astype(np.uint8).reshape(len(qs), -1)


class TQ1_0(BlockType, qtype=T.TQ1_0):
    """block_tq1_0: 48 bytes of 5 trits, 4 bytes of 4 trits, f16 d. w = d * (t - 1)
    ->  2-bit g128, s = d, b = -d (widened: 1.6875 -> 2.25 bpw, +0.56)."""

    bits, group_size, mapping = 2, 128, WIDENED

    @classmethod
    def affine(cls, blocks):
        d = np.repeat(f16(blocks, 52), 2, axis=1)  # (n, 2)
        q = np.concatenate([_trits(blocks[:, :32], _POW3), _trits(blocks[:, 32:48], _POW3),
                            _trits(blocks[:, 48:52], _POW3[:4])], axis=1)  # (n, 256)
        return q, d, -d


# ------------------------------------------------------------------ K-quants (256-weight blocks)


def _k4_scales(sc: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The 12 bytes of 6-bit scales and mins of Q4_K / Q5_K (get_scale_min_k4) -> two (n, 8)."""
    a, b, c = sc[:, 0:4], sc[:, 4:8], sc[:, 8:12]
    scale = np.concatenate([a & 63, (c & 0x0F) | ((a >> 6) << 4)], axis=1)
    mins = np.concatenate([b & 63, (c >> 4) | ((b >> 6) << 4)], axis=1)
    return scale.astype(np.float32), mins.astype(np.float32)


def _k4_codes(qs: np.ndarray) -> np.ndarray:
    """Q4_K's 128 bytes: sub-blocks 2c and 2c + 1 are the low / high nibbles of bytes 32c..
    -> (n, 256) codes."""
    n = len(qs)
    return nibbles(qs.reshape(n * 4, 32)).reshape(n, 256)


class Q4_K(BlockType, qtype=T.Q4_K):
    """block_q4_K: f16 d, f16 dmin, 12 bytes of 6-bit sc / m, 128 bytes of nibbles.
    w = d * sc * q - dmin * m per 32  ->  s = d * sc, b = -dmin * m (float32: 17 bits)."""

    bits, group_size = 4, 32

    @classmethod
    def affine(cls, blocks):
        sc, m = _k4_scales(blocks[:, 4:16])
        return _k4_codes(blocks[:, 16:]), f16(blocks, 0) * sc, -(f16(blocks, 2) * m)


class Q5_K(BlockType, qtype=T.Q5_K):
    """block_q5_K: as Q4_K plus 32 bytes qh: bit k of qh[i] is bit 4 of element 32 k + i."""

    bits, group_size = 5, 32

    @classmethod
    def affine(cls, blocks):
        sc, m = _k4_scales(blocks[:, 4:16])
        high = bit_planes(blocks[:, 16:48], 1)  # (n, 256)
        q = _k4_codes(blocks[:, 48:]) | (high << 4)
        return q, f16(blocks, 0) * sc, -(f16(blocks, 2) * m)


class Q3_K(BlockType, qtype=T.Q3_K):
    """block_q3_K: 32 bytes hmask, 64 bytes low 2 bits, 12 bytes of 6-bit scales, f16 d.
    w = d * (sc - 32) * q, q = low - 4 (hmask bit clear) in -4..3, per 16. m = (sc - 32) * q
    lies in -124..128 for every sub-block, so one grid of d serves the whole 256:
    8-bit g128, q' = 128 - m, s = -d, b = 128d (widened: 3.4375 -> 8.25 bpw)."""

    bits, group_size, mapping = 8, 128, WIDENED

    @classmethod
    def affine(cls, blocks):
        n = len(blocks)
        sc = blocks[:, 96:108]
        low = np.concatenate([sc[:, :8] & 0x0F, sc[:, :8] >> 4], axis=1)  # (n, 16)
        high = bit_planes(sc[:, 8:12], 2)  # (n, 16): scale i from byte 8 + i % 4
        scales = (low | (high << 4)).astype(np.int16) - 32  # (n, 16) in -32..31
        ql = bit_planes(blocks[:, 32:96].reshape(n * 2, 32), 2).reshape(n, 256)
        hbit = bit_planes(blocks[:, :32], 1)  # (n, 256)
        q = ql.astype(np.int16) - 4 * (1 - hbit.astype(np.int16))  # (n, 256) in -4..3
        m = np.repeat(scales, 16, axis=1) * q  # (n, 256) in -124..128
        d = np.repeat(f16(blocks, 108), 2, axis=1)  # (n, 2)
        return (128 - m).astype(np.uint8), -d, 128 * d


class IQ4_XS(BlockType, qtype=T.IQ4_XS):
    """block_iq4_xs: f16 d, u16 scales_h, 4 bytes scales_l, 128 bytes of table indices (each
    32 laid out as Q4_0). w = d * (ls - 32) * kv[i] per 32  ->  8-bit g32, q = kv[i] + 128,
    s = d * (ls - 32) (16 bits), b = -128 s (widened: 4.25 -> 10 bpw with float32 scales)."""

    bits, group_size, mapping = 8, 32, WIDENED

    @classmethod
    def affine(cls, blocks):
        n = len(blocks)
        h = np.ascontiguousarray(blocks[:, 2:4]).view("<u2")  # (n, 1)
        low = nibbles(blocks[:, 4:8])  # (n, 8): low nibbles of bytes 0..3, then high
        low = low.reshape(n, 2, 4).transpose(0, 2, 1).reshape(n, 8)  # sub-block 2k, 2k+1 <- byte k
        high = (h >> (2 * np.arange(8, dtype=np.uint16))) & 3  # (n, 8)
        ls = (low | (high << 4)).astype(np.float32) - 32
        idx = nibbles(blocks[:, 8:].reshape(n * 8, 16)).reshape(n, 256)
        s = f16(blocks, 0) * ls  # (n, 8)
        return _IQ4_CODES[idx], s, -128 * s


# ------------------------------------------------------------------ re-quantized types


def dequantize_requantize(data: np.ndarray, qtype: QType, shape: tuple[int, int], bits: int = 8,
                          group_size: int = 32, scale_dtype: str = "float16") -> Mapped:
    """Opt-in path for any type gguf-py can dequantize (IQ2_XXS, ..., or a type that maps but
    in another layout): gguf-py's reference dequantization, re-quantized to MLX affine
    `bits` / `group_size`; class "requantized" with the measured max abs error."""
    import gguf.quants

    from edgert.quant import quantize_float

    try:
        ref = gguf.quants.dequantize(data, qtype)  # (rows, cols) float32
    except NotImplementedError:
        raise UnsupportedError(f"type {qtype.name}: gguf-py cannot dequantize it, so it cannot "
                               "be re-quantized either") from None
    t, err = quantize_float(ref.reshape(shape), bits, group_size, scale_dtype)
    return Mapped(t, REQUANTIZED, f"{qtype.name} has no exact MLX layout: re-quantized to "
                  f"{bits}-bit group {group_size} from gguf-py's dequantization", err)


class RequantizedType(GGMLType):
    """A type with no exact MLX layout: re-quantized by default (see the module docstring)."""

    bits: ClassVar[int] = 8
    group_size: ClassVar[int] = 32

    @classmethod
    def to_mlx(cls, data, shape):
        return dequantize_requantize(data, cls.qtype, shape, cls.bits, cls.group_size)


class Q2_K(RequantizedType, qtype=T.Q2_K):
    """block_q2_K: w = d * sc * q - dmin * m per 16 (the min differs per sub-block)."""


class Q6_K(RequantizedType, qtype=T.Q6_K):
    """block_q6_K: w = d * sc * q per 16, sc int8, q in -32..31 (sc * q needs 13 bits)."""

