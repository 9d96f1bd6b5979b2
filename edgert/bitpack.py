"""MLX's packed code layout: each row of `w_q` is a little-endian bitstream of `bits`-bit codes
in uint32 words (element j at bit j * bits, LSB first; 3/5/6 bits straddle bytes and words)."""

from __future__ import annotations

import numpy as np


def pack_rows(q: np.ndarray, bits: int) -> np.ndarray:
    """(rows, cols) codes < 2**bits -> (rows, cols * bits // 32) uint32 MLX bitstreams (element
    j at bit j * bits, LSB first; 3/5/6 bits straddle bytes and words)."""
    q = np.asarray(q).astype(np.uint8, copy=False)
    rows = q.shape[0]
    if bits == 8:
        packed = q
    elif 8 % bits == 0:
        per = 8 // bits
        shifts = np.arange(per, dtype=np.uint8) * np.uint8(bits)
        # (rows, cols) -> (rows, cols // per, per) -> (rows, cols * bits // 8) uint8
        packed = np.bitwise_or.reduce(q.reshape(rows, -1, per) << shifts, axis=-1)
    else:
        b = (q[..., None] >> np.arange(bits, dtype=np.uint8)) & 1  # (rows, cols, bits)
        packed = np.packbits(b.reshape(rows, -1), axis=-1, bitorder="little")
    return np.ascontiguousarray(packed).view("<u4")  # (rows, cols * bits // 32)


def unpack_rows(w: np.ndarray, bits: int) -> np.ndarray:
    """(rows, words) 32-bit bitstreams -> (rows, words * 32 // bits) uint8 codes."""
    rows = w.shape[0]
    b = np.ascontiguousarray(w).view("<u4").view(np.uint8)  # (rows, words * 4) bytes
    if 8 % bits == 0:
        shifts = np.arange(8 // bits, dtype=np.uint8) * bits
        return ((b[..., None] >> shifts) & ((1 << bits) - 1)).reshape(rows, -1)
    b = np.unpackbits(b, axis=-1, bitorder="little").reshape(rows, -1, bits)
    return (b << np.arange(bits, dtype=np.uint8)).sum(-1, dtype=np.uint8)
