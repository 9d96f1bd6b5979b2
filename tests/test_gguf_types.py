"""GGML blocks -> MLX: bit-exact against gguf-py's and llama.cpp's reference dequantization.

Oracles: gguf-py's numpy quantizers (bit-exact with llama-quantize for Q4_0, Q4_1, Q8_0, TQ1_0,
TQ2_0) and random block bytes make the blocks; `gguf.quants.dequantize` says what they mean,
and where gguf-py has no dequantizer (Q1_0, Q2_0) llama.cpp's own ggml library does (its
`to_float` through ctypes). MLX's own `mx.dequantize` reads our mapping. One caveat, kept
explicit: a zero may come out with the other sign. The reference computes d * 0 = -0.0 where
d < 0, MLX d * q + (-d * q) = +0.0; for MXFP4, MLX reads code 8 as e2m1's -0.0 where ggml's
table has 0. Exactly those elements may differ, and only in the sign bit of a zero.
Re-quantized types (Q2_K, Q6_K, and the opt-in path) are held to the error they report.
"""

from __future__ import annotations

import ctypes
import json
import struct

import gguf
import mlx.core as mx
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from edgert.convert.canonical import (EXACT, F32_SCALES_EXACT, FLOAT, REQUANTIZED, WIDENED,
                                      QuantTensor)
from edgert.convert.gguf_reader import open_gguf, read_gguf, unpermute_rows
from edgert.convert.gguf_types import (Q1_0_G32, Q2_0_TYPE, TYPES, ExtraType,
                                       dequantize_requantize, ggml_type, mlx_type, pack_rows,
                                       type_layout)
from edgert.errors import UnsupportedError

from testdata import data_file

GGUF_PY_QUANTIZES = (T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0, T.TQ1_0, T.TQ2_0, T.MXFP4)
# byte offsets of each block's f16 fields (kept finite in random blocks)
F16_FIELDS = {T.Q4_0: [0], T.Q4_1: [0, 2], T.Q5_0: [0], T.Q5_1: [0, 2], T.Q8_0: [0],
              T.IQ4_NL: [0], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q3_K: [108], T.IQ4_XS: [0],
              T.TQ2_0: [64], T.TQ1_0: [52], T.Q2_K: [80, 82], T.Q6_K: [208], T.MXFP4: [],
              T.Q1_0: [0], Q2_0_TYPE: [0], Q1_0_G32: [0]}
CLASSES = {T.Q4_0: EXACT, T.Q4_1: EXACT, T.Q5_0: EXACT, T.Q5_1: EXACT, T.Q8_0: EXACT,
           T.Q1_0: EXACT, Q1_0_G32: EXACT, Q2_0_TYPE: EXACT, T.TQ2_0: EXACT, T.MXFP4: EXACT,
           T.Q4_K: F32_SCALES_EXACT, T.Q5_K: F32_SCALES_EXACT, T.TQ1_0: WIDENED,
           T.Q3_K: WIDENED, T.IQ4_NL: WIDENED, T.IQ4_XS: WIDENED, T.Q2_K: REQUANTIZED,
           T.Q6_K: REQUANTIZED}
GGML_ONLY = (T.Q1_0, Q2_0_TYPE, Q1_0_G32)  # gguf-py cannot dequantize these


def mlx_dequantize(t: QuantTensor) -> np.ndarray:
    """(rows, cols) float32 through MLX on the CPU, affine scales and biases in float32."""
    with mx.stream(mx.cpu):
        if t.mode != "affine":
            out = mx.dequantize(mx.array(t.w_q), mx.array(t.scales), None,
                                group_size=t.group_size, bits=t.bits, mode=t.mode,
                                dtype=mx.float32)
        else:
            out = mx.dequantize(mx.array(t.w_q), mx.array(t.scales.astype(np.float32)),
                                mx.array(t.biases.astype(np.float32)),
                                group_size=t.group_size, bits=t.bits)
        return np.array(out)


def assert_bit_exact(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape and ours.dtype == ref.dtype == np.float32
    assert np.array_equal(ours, ref, equal_nan=True)  # by value (+0.0 == -0.0)
    differ = ours.view(np.uint32) != ref.view(np.uint32)
    assert (ours[differ] == 0).all() and (ref[differ] == 0).all()  # signs of zero only


def assert_maps(mapped, ref: np.ndarray, qtype) -> None:
    """The mapping reproduces `ref`: bit for bit, or within the error it reports."""
    ours = mlx_dequantize(mapped.value)
    if mapped.mapping == REQUANTIZED:
        assert np.isfinite(mapped.max_abs_error)
        assert np.abs(ours - ref).max() == np.float32(mapped.max_abs_error)
    else:
        assert mapped.max_abs_error == 0.0
        assert_bit_exact(ours, ref)


# ------------------------------------------------------------------ llama.cpp's ggml as oracle


def ggml_lib() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(data_file("llama.cpp/lib/libggml-base.so")))
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_Traits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    return lib


class _Traits(ctypes.Structure):  # struct ggml_type_traits in ggml.h
    _fields_ = [("type_name", ctypes.c_char_p), ("blck_size", ctypes.c_int64),
                ("blck_size_interleave", ctypes.c_int64), ("type_size", ctypes.c_size_t),
                ("is_quantized", ctypes.c_bool), ("to_float", ctypes.c_void_p),
                ("from_float_ref", ctypes.c_void_p)]


_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)


def ggml_dequantize(raw: np.ndarray, type_id: int, shape: tuple[int, int]) -> np.ndarray:
    """llama.cpp's dequantize_row_* for GGML type `type_id`: (rows, bytes) -> (rows, cols)."""
    traits = ggml_lib().ggml_get_type_traits(type_id).contents
    block, size = type_layout(ggml_type(type_id, shape[0] * shape[1]))
    assert (traits.blck_size, traits.type_size) == (block, size), traits.type_name
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    out = np.empty(shape, np.float32)
    _TO_FLOAT(traits.to_float)(raw.ctypes.data, out.ctypes.data, out.size)
    return out


def reference(raw: np.ndarray, qtype, shape: tuple[int, int]) -> np.ndarray:
    """The source's dequantization: gguf-py's, or llama.cpp's where gguf-py has none.

    PrismML's Q1_0 with blocks of 32 reads as mainline Q1_0 (same rule, bit set -> +d, else
    -d); each 6-byte block is padded into an 18-byte one and the first 32 values kept."""
    if qtype == Q1_0_G32:
        blocks = raw.reshape(-1, 6)
        padded = np.zeros((len(blocks), 18), np.uint8)
        padded[:, :6] = blocks
        out = ggml_dequantize(padded, T.Q1_0.value, (len(blocks), 128))[:, :32]
        return out.reshape(shape)
    if qtype in GGML_ONLY:
        return ggml_dequantize(raw, qtype.value, shape)
    return gguf.quants.dequantize(raw, qtype).reshape(shape)


# ------------------------------------------------------------------ random data


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


def random_blocks(qtype, rows: int, cols: int, seed: int) -> np.ndarray:
    """Random block bytes (valid blocks for these types) with finite f16 fields of every
    magnitude (zero, subnormal, up to 6e4), plus an all-zero block in every row."""
    rng = np.random.default_rng(seed)
    block, size = type_layout(qtype)
    raw = rng.integers(0, 256, (rows, cols // block * size), dtype=np.uint8)
    blocks = raw.reshape(-1, size)  # a view
    for offset in F16_FIELDS[qtype]:
        v = rng.standard_normal(len(blocks)) * 10.0 ** rng.uniform(-8, 4.5, len(blocks))
        v = np.clip(v, -65504, 65504).astype(np.float16)
        v[::7] = 0
        v[1::11] = np.float16(65504) * np.sign(v[1::11])
        blocks[:, offset:offset + 2] = v.view(np.uint8).reshape(-1, 2)
    if qtype == T.MXFP4:
        blocks[:, 0] %= 255  # E8M0 255 is NaN; see test_mxfp4_nan_scale_is_refused
    raw[:, :size] = 0  # an all-zero block starts each row
    return raw


@pytest.mark.parametrize("qtype", GGUF_PY_QUANTIZES, ids=lambda t: t.name)
def test_gguf_py_quantized_weights_map_exactly(qtype):
    w = random_weights(48, 512, seed=qtype.value)
    raw = gguf.quants.quantize(w, qtype)  # (48, 512 // block * type_size) uint8
    mapped = mlx_type(qtype).to_mlx(raw, w.shape)
    t = mapped.value
    assert mapped.mapping == CLASSES[qtype] and t.shape == w.shape
    assert t.w_q.dtype == np.uint32 and t.w_q.shape == (48, 512 * t.bits // 32)
    if t.mode == "affine":
        assert t.scales.dtype == t.biases.dtype == np.float16  # f16 suffices for these
    assert_maps(mapped, gguf.quants.dequantize(raw, qtype), qtype)


@pytest.mark.filterwarnings("ignore:overflow encountered:RuntimeWarning")  # gguf-py: inf
@pytest.mark.parametrize("qtype", list(CLASSES), ids=lambda t: t.name)
def test_random_blocks_map_onto_the_reference(qtype):
    """Every supported type on random block bytes: exact classes bit for bit, re-quantized
    ones within the error they report."""
    shape = (24, 1024)
    raw = random_blocks(qtype, *shape, seed=len(qtype.name) * 1000 + qtype.value)
    mapped = mlx_type(qtype).to_mlx(raw, shape)
    assert mapped.value.shape == shape
    expected = CLASSES[qtype]
    if expected == EXACT:  # extreme scales may need float32 biases (still exact)
        assert mapped.mapping in (EXACT, F32_SCALES_EXACT)
    else:
        assert mapped.mapping == expected
    assert_maps(mapped, reference(raw, qtype, shape), qtype)


@pytest.mark.parametrize("qtype", [T.Q6_K, T.Q2_K], ids=lambda t: t.name)
def test_requantized_error_is_small_on_gaussian_blocks(qtype):
    """On realistic scales (llama-quantize's own data is tested below) the 8-bit re-quantization
    errs by at most about one 8-bit step of the group's range (mx.quantize puts zero on the
    grid, so the step can exceed range / 255; float16 scales add a little)."""
    rng = np.random.default_rng(0)
    shape = (32, 512)
    raw = random_blocks(qtype, *shape, seed=1)
    blocks = raw.reshape(-1, type_layout(qtype)[1])
    for offset in F16_FIELDS[qtype]:  # scales of trained weights: ~1e-3
        blocks[:, offset:offset + 2] = (rng.uniform(1e-4, 2e-3, len(blocks)).astype(np.float16)
                                        .view(np.uint8).reshape(-1, 2))
    ref = reference(raw, qtype, shape)
    mapped = mlx_type(qtype).to_mlx(raw, shape)
    assert_maps(mapped, ref, qtype)
    group_range = np.ptp(ref.reshape(shape[0], -1, 32), axis=-1).max()
    assert 0 < mapped.max_abs_error <= group_range / 255 * 1.5


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


def test_mxfp4_nan_scale_is_refused():
    raw = random_blocks(T.MXFP4, 2, 64, seed=0)
    raw[1, 0] = 255
    with pytest.raises(UnsupportedError, match="E8M0 scale 255"):
        mlx_type(T.MXFP4).to_mlx(raw, (2, 64))


def test_unsupported_type_names_the_tensor_and_type():
    with pytest.raises(UnsupportedError, match=r"tensor blk.0.ffn_down.weight has type IQ2_XXS, "
                                               r"not supported yet"):
        mlx_type(T.IQ2_XXS, "blk.0.ffn_down.weight")
    assert set(TYPES) == set(CLASSES) | {T.F32, T.F16, T.BF16}


@pytest.mark.parametrize("qtype", [T.IQ2_XXS, T.IQ3_S, T.Q6_K, T.NVFP4], ids=lambda t: t.name)
def test_dequantize_requantize_is_held_to_its_error(qtype):
    """The opt-in path for types without a mapping (gguf-py dequantizes, MLX re-quantizes)."""
    block, size = type_layout(qtype)
    shape = (8, 512)
    if qtype in F16_FIELDS:
        raw = random_blocks(qtype, *shape, seed=3)
    else:  # grid types: random grid indices, a small f16 d first in each block
        raw = np.random.default_rng(3).integers(0, 256, (8, 512 // block * size), np.uint8)
        raw.reshape(-1, size)[:, :2] = np.array([0.01], np.float16).view(np.uint8)
    for bits, group in ((4, 64), (8, 32)):
        mapped = dequantize_requantize(raw, qtype, shape, bits, group)
        assert mapped.mapping == REQUANTIZED and mapped.value.bits == bits
        assert mapped.value.group_size == group
        assert_maps(mapped, gguf.quants.dequantize(raw, qtype).reshape(shape), qtype)
    with pytest.raises(UnsupportedError, match="gguf-py cannot dequantize"):
        dequantize_requantize(np.zeros((1, 18), np.uint8), T.Q1_0, (1, 128))


def test_type_ids_read_by_bytes_per_block():
    """Id 40: mainline NVFP4 (64 weights, 36 bytes) or PrismML's Q1_0 (32 weights, 6 bytes);
    id 41 is Q1_0 either way; id 42 is Q2_0 even where gguf-py does not know it."""
    n = 4096
    assert ggml_type(40, n, n // 64 * 36) == T.NVFP4
    assert ggml_type(40, n, n // 32 * 6 + 26) == Q1_0_G32  # with alignment padding
    assert ggml_type(41, n, n // 128 * 18) == T.Q1_0
    assert ggml_type(42, n).value == 42 and ggml_type(42, n).name == "Q2_0"
    assert isinstance(Q1_0_G32, ExtraType) and Q1_0_G32.value == 40
    with pytest.raises(UnsupportedError, match="GGML type id 99"):
        ggml_type(99, n)


# ------------------------------------------------------------------ real files


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
            assert_bit_exact(mlx_dequantize(record.value), ref)
            assert record.mapping == EXACT
        else:
            assert np.array_equal(record.value, ref)
        seen.add(record.source_type)
    assert seen == {"Q4_1", "Q8_0", "F32"}


_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # GGUFValueType


def tensor_table(path) -> list[tuple[str, int, tuple[int, int], int]]:
    """(name, type id, numpy shape, data offset) of each 2-dim tensor, from the GGUF header.

    gguf-py's reader takes seconds per file here (it builds an array per vocabulary string);
    this skips the metadata instead. The data itself is still read (and typed, with edgert's
    `ggml_type`) from a memory map of the file."""
    buf = np.memmap(path, np.uint8, mode="r")
    pos = 24
    n_tensors, n_kv = struct.unpack_from("<QQ", buf, 8)

    def string() -> str:
        nonlocal pos
        (n,) = struct.unpack_from("<Q", buf, pos)
        pos += 8 + n
        return bytes(buf[pos - n:pos]).decode()

    def skip(vtype: int) -> int | None:
        nonlocal pos
        if vtype == 8:
            string()
        elif vtype == 9:
            itype, n = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if itype in _SCALARS:
                pos += n * _SCALARS[itype]
            else:
                for _ in range(n):
                    skip(itype)
        else:
            value = struct.unpack_from({4: "<I", 5: "<i", 10: "<Q"}.get(vtype, "<B"), buf, pos)
            pos += _SCALARS[vtype]
            return value[0]
        return None

    alignment = 32
    for _ in range(n_kv):
        key = string()
        (vtype,) = struct.unpack_from("<I", buf, pos)
        pos += 4
        value = skip(vtype)
        if key == "general.alignment":
            alignment = value
    infos = []
    for _ in range(n_tensors):
        name = string()
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        type_id, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        infos.append((name, type_id, tuple(reversed(dims)), offset))
    start = -(-pos // alignment) * alignment
    return [(name, type_id, dims, start + offset) for name, type_id, dims, offset in infos]


def assert_file_maps(path, rows: int = 96) -> set[str]:
    """Every 2-dim tensor of the GGUF at `path` (its first `rows` rows) maps onto its
    reference; returns the type names seen."""
    table = tensor_table(path)
    buf = np.memmap(path, np.uint8, mode="r")
    ends = sorted(offset for *_, offset in table) + [len(buf)]
    seen = set()
    for name, type_id, dims, offset in table:
        if len(dims) != 2:
            continue
        n = dims[0] * dims[1]
        qtype = ggml_type(type_id, n, ends[ends.index(offset) + 1] - offset)
        block, size = type_layout(qtype)
        k, row_bytes = min(rows, dims[0]), dims[1] // block * size
        raw = buf[offset:offset + k * row_bytes].reshape(k, row_bytes)
        if block == 1:  # float tensors: gguf-py's view of them
            raw = raw.view(np.float32 if qtype == T.F32 else np.float16)
        mapped = mlx_type(qtype, name).to_mlx(raw, (k, dims[1]))
        if isinstance(mapped.value, QuantTensor):
            assert mapped.mapping == CLASSES[qtype] or (
                CLASSES[qtype] == EXACT and mapped.mapping == F32_SCALES_EXACT), name
            assert_maps(mapped, reference(np.array(raw), qtype, (k, dims[1])), qtype)
        seen.add(qtype.name)
    return seen


def test_gemma3_q4_k_m_maps():
    """Google's Gemma 3 270M Q4_K_M (Q4_K, Q6_K, Q5_0, Q8_0 as llama.cpp wrote them)."""
    seen = assert_file_maps(data_file("gemma3/gemma-3-270m-q4_k_m.gguf"))
    assert {"Q4_K", "Q6_K", "Q5_0", "Q8_0"} <= seen


@pytest.mark.parametrize("type_name, expect", [
    ("Q4_K_M", {"Q4_K", "Q6_K", "Q5_0", "Q8_0"}), ("Q1_0", {"Q1_0"}), ("TQ2_0", {"TQ2_0"}),
    ("Q2_0", {"Q2_0"}), ("Q2_K", {"Q2_K", "Q3_K"}), ("Q6_K", {"Q6_K"}),
    ("IQ4_NL", {"IQ4_NL"}), ("MIXED", {"Q5_K", "IQ4_XS", "TQ1_0", "Q3_K", "Q5_1", "Q2_0"})])
def test_llama_quantize_files_map(quantized_smollm, type_name, expect):
    """SmolLM2 re-quantized by llama-quantize: real blocks of each type (tensors whose rows
    are not whole 256 / 128 blocks get llama.cpp's fallback types, mapped the same way)."""
    seen = assert_file_maps(quantized_smollm(type_name))
    assert expect <= seen


def test_reader_tells_type_ids_apart(tmp_path):
    """A file with Q2_0 (id 42, unknown to gguf 0.19), PrismML's Q1_0 (id 40, blocks of 32)
    and Q1_0 (id 41): the reader reads each with its own block size and they map exactly."""
    rows, cols = 8, 512
    tensors = {"a": (42, Q2_0_TYPE), "b": (40, Q1_0_G32), "c": (41, T.Q1_0), "d": (40, Q1_0_G32)}
    raws = {name: random_blocks(qtype, rows, cols, seed=i) for i, (name, (_, qtype))
            in enumerate(tensors.items())}
    path = tmp_path / "ids.gguf"
    w = gguf.GGUFWriter(path, "llama")
    for name, raw in raws.items():  # written as int8 (bytes per row, rows), then re-typed
        w.add_tensor(name, raw.view(np.int8))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    r = gguf.GGUFReader(path, "r+")
    for t in r.tensors:
        t.field.parts[4][0] = tensors[t.name][0]  # type id
        t.field.parts[3][0] = cols  # dims[0]: weights per row
    r.data.flush()
    del r
    read = {t.name: t for t in open_gguf(path).tensors}
    assert [t.tensor_type for t in read.values()] == [q for _, q in tensors.values()]
    for name, t in read.items():
        assert np.array_equal(t.data, raws[name])
        mapped = mlx_type(t.tensor_type).to_mlx(t.data, (rows, cols))
        assert mapped.mapping in (EXACT, F32_SCALES_EXACT)
        assert_maps(mapped, reference(raws[name], t.tensor_type, (rows, cols)), t.tensor_type)


def test_mxfp4_model_converts_loads_and_runs(tmp_path):
    """Mode "mxfp4" through the writer (no biases) and the package loader."""
    from test_convert_gguf import tiny_gguf

    from edgert.convert.api import convert_file
    from edgert.convert.gguf_reader import hf_name
    from edgert.package import load_model

    src = tmp_path / "tiny-mxfp4.gguf"
    expected = tiny_gguf(src, qtype=T.MXFP4)  # GGUF name -> reference, HF row order
    out = convert_file(src, tmp_path / "pkg", progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["mode"] == "mxfp4"
    weights = mx.load(str(out / "model.safetensors"))
    for gguf_name, ref in expected.items():
        module = hf_name(gguf_name).removesuffix(".weight")
        if ref.ndim == 2:
            assert f"{module}.biases" not in weights
            t = QuantTensor(np.array(weights[f"{module}.weight"]),
                            np.array(weights[f"{module}.scales"]), None, 4, 32, "mxfp4")
            assert_bit_exact(mlx_dequantize(t), ref)
    model, _ = load_model(out)
    logits = model(mx.array([[1, 2, 3]]))
    assert logits.shape == (1, 3, 128) and np.isfinite(np.array(logits)).all()
