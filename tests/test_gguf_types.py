"""GGML blocks -> MLX affine: bit-exact against gguf-py's reference dequantization.

Oracles: gguf-py's numpy quantizers (bit-exact with llama-quantize for Q4_0, Q4_1, Q8_0) make
the blocks and `gguf.quants.dequantize` says what they mean; MLX's own `mx.dequantize` reads
our mapping. One caveat, kept explicit: where the reference value is -0.0, MLX gives +0.0.
Q4_0 computes d * (q - 8), -0.0 where d < 0 and q = 8; Q8_0 computes d * x, -0.0 where x < 0
and d underflowed to 0 in float16 (a block of values below ~1e-5). MLX computes
d * q + (-k d), and x + (-x) is +0.0. The values are equal; only the sign bit of zero differs,
so exactly those elements are allowed to differ and everything else is compared bit for bit.
"""

from __future__ import annotations

import gguf
import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from edgert.convert.canonical import EXACT, F32_SCALES_EXACT, FLOAT, QuantTensor
from edgert.convert.gguf_reader import open_gguf, read_gguf, unpermute_rows
from edgert.convert.gguf_types import TYPES, mlx_type, pack_rows
from edgert.errors import UnsupportedError

QUANT_TYPES = (T.Q4_0, T.Q4_1, T.Q8_0)


def mlx_dequantize(t: QuantTensor) -> np.ndarray:
    """(rows, cols) float32 through MLX, with scales and biases in float32."""
    return np.array(mx.dequantize(mx.array(t.w_q), mx.array(t.scales.astype(np.float32)),
                                  mx.array(t.biases.astype(np.float32)),
                                  group_size=t.group_size, bits=t.bits))


def assert_bit_exact(ours: np.ndarray, ref: np.ndarray, qtype: T) -> None:
    assert ours.shape == ref.shape and ours.dtype == ref.dtype == np.float32
    assert np.array_equal(ours, ref, equal_nan=True)  # by value (+0.0 == -0.0)
    differ = ours.view(np.uint32) != ref.view(np.uint32)
    if qtype in (T.Q4_0, T.Q8_0):  # -0.0 -> +0.0 only, see the module docstring
        assert (ours.view(np.uint32)[differ] == 0).all()
        assert (ref.view(np.uint32)[differ] == 0x80000000).all()
    else:
        assert not differ.any()


def random_weights(rows: int, cols: int, seed: int) -> np.ndarray:
    """Gaussian rows with special blocks: all zero, constant, tiny (f16 scales subnormal or
    underflowing to 0), a wide range, and a block whose extreme is negative."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    w[0] = 0.0
    w[1, :32] = 3.0
    w[2, :32] = rng.standard_normal(32) * 1e-6
    w[2, 32:64] = rng.standard_normal(32) * 1e-4
    w[3, :32] = np.linspace(-1000, 1000, 32)
    w[4, 32:64] = -w[4, 32:64].max()
    return w


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_random_blocks_match_gguf_py(qtype):
    w = random_weights(48, 256, seed=qtype.value)
    raw = gguf.quants.quantize(w, qtype)  # (48, 256 // 32 * type_size) uint8
    mapped = mlx_type(qtype).to_mlx(raw, w.shape)
    t = mapped.value
    assert mapped.mapping == EXACT and t.scales.dtype == t.biases.dtype == np.float16
    assert t.w_q.dtype == np.uint32 and t.w_q.shape == (48, 256 * t.bits // 32)
    assert t.scales.shape == (48, 256 // 32) and t.shape == w.shape
    assert_bit_exact(mlx_dequantize(t), gguf.quants.dequantize(raw, qtype), qtype)


@pytest.mark.parametrize("qtype", QUANT_TYPES, ids=lambda t: t.name)
def test_biases_beyond_float16_fall_back_to_float32(qtype):
    """-8d (Q4_0) and -128d (Q8_0) overflow float16 for blocks near the f16 limit."""
    w = random_weights(8, 64, seed=1)
    w[5, :32] = np.linspace(-6e4, 6e4, 32)  # Q4_0: d = 7500, -8d = -6e4 (fits)
    w[6, :32] = 6e4  # Q4_0: |8d| = 6e4, Q8_0: |128d| = 6e4 (both fit)
    w[7, :32] = np.linspace(-1e5, 9e4, 32) if qtype != T.Q4_1 else 0  # 8d and 128d overflow
    raw = gguf.quants.quantize(w, qtype)
    mapped = mlx_type(qtype).to_mlx(raw, w.shape)
    widened = qtype != T.Q4_1
    assert mapped.mapping == (F32_SCALES_EXACT if widened else EXACT)
    assert mapped.value.scales.dtype == (np.float32 if widened else np.float16)
    assert_bit_exact(mlx_dequantize(mapped.value), gguf.quants.dequantize(raw, qtype), qtype)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 8])
def test_pack_rows_is_mlx_bit_order(bits):
    """With scale 1 and bias 0 MLX dequantizes packed codes back to themselves."""
    q = np.random.default_rng(bits).integers(0, 2**bits, (4, 256), dtype=np.uint8)
    w_q = pack_rows(q, bits)
    assert w_q.shape == (4, 256 * bits // 32) and w_q.dtype == np.uint32
    ones, zeros = mx.ones((4, 2)), mx.zeros((4, 2))
    out = mx.dequantize(mx.array(w_q), ones, zeros, group_size=128, bits=bits)
    assert np.array_equal(np.array(out), q.astype(np.float32))


def test_float_types():
    w = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    assert np.array_equal(mlx_type(T.F32).to_mlx(w, w.shape).value, w)
    h = w.astype(np.float16)
    out = mlx_type(T.F16).to_mlx(h, h.shape)
    assert out.mapping == FLOAT and out.value.dtype == np.float16 and np.array_equal(out.value, h)
    raw = gguf.quants.quantize(w, T.BF16)  # (3, 16) uint8
    out = mlx_type(T.BF16).to_mlx(raw, w.shape)
    assert out.value.dtype == np.float32 and "bf16" in out.note
    assert np.array_equal(out.value, gguf.quants.dequantize(raw, T.BF16))


def test_unsupported_type_names_the_tensor_and_type():
    with pytest.raises(UnsupportedError, match=r"tensor blk.0.ffn_down.weight has type Q6_K, "
                                               r"not supported yet"):
        mlx_type(T.Q6_K, "blk.0.ffn_down.weight")
    assert set(TYPES) == {T.F32, T.F16, T.BF16, T.Q4_0, T.Q4_1, T.Q8_0}


def test_every_tensor_of_the_default_model_matches_gguf_py(smollm_gguf):
    """Q4_1, Q8_0 and F32 tensors of SmolLM2 through the reader, Q/K rows unpermuted."""
    reader = open_gguf(smollm_gguf)
    by_name = {t.name: t for t in reader.tensors}
    heads = {"attn_q": 9, "attn_k": 3}
    seen = set()
    for record in read_gguf(smollm_gguf).tensors():
        src = by_name[record.source_name]
        ref = gguf.quants.dequantize(src.data, src.tensor_type)
        if (part := record.source_name.split(".")[-2]) in heads:
            ref = unpermute_rows(ref, heads[part])
        if isinstance(record.value, QuantTensor):
            assert_bit_exact(mlx_dequantize(record.value), ref, src.tensor_type)
            assert record.mapping == EXACT
        else:
            assert np.array_equal(record.value, ref)
        seen.add(record.source_type)
    assert seen == {"Q4_1", "Q8_0", "F32"}
