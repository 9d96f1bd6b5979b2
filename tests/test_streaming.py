"""The GGUF reader maps big tensors in chunks of rows: same result as one whole call."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from edgert.convert import gguf_reader
from edgert.convert.gguf_types import mlx_type


def blocks(qtype: T, rows: int, cols: int, rng, d: float = 0.02) -> np.ndarray:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    half = np.frombuffer(np.float16(d).tobytes(), np.uint8)
    at = {T.Q4_K: (0, 2), T.Q6_K: (size - 2,)}.get(qtype, (0,))  # finite f16 d (and dmin)
    for i in at:
        raw[..., i:i + 2] = half
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", [T.Q4_0, T.Q8_0, T.Q1_0, T.Q4_K, T.Q6_K])
def test_chunks_equal_whole(qtype, monkeypatch):
    rng = np.random.default_rng(int(qtype))
    rows, cols = 300, 512
    data = blocks(qtype, rows, cols, rng)
    if qtype == T.Q8_0:  # one late block whose bias -128 d overflows float16: f32 scales
        data[250, :2] = np.frombuffer(np.float16(60000).tobytes(), np.uint8)
    cls = mlx_type(qtype)
    whole = cls.to_mlx(data, (rows, cols))
    monkeypatch.setattr(gguf_reader, "CHUNK_BYTES", data.nbytes // 7)
    chunked = gguf_reader.map_in_chunks(cls, data, (rows, cols))
    assert chunked.mapping == whole.mapping and chunked.max_abs_error == whole.max_abs_error
    for a, b in ((chunked.value.w_q, whole.value.w_q), (chunked.value.scales, whole.value.scales),
                 (chunked.value.biases, whole.value.biases)):
        assert (a is None and b is None) or (a.dtype == b.dtype and np.array_equal(a, b))
    if qtype == T.Q8_0:
        assert chunked.value.scales.dtype == np.float32


def test_shard_writer_is_read_by_safetensors_and_mlx(tmp_path):
    """Tensors written one by one behind a reserved header: the safetensors library and
    mx.load read the same arrays."""
    import mlx.core as mx
    from safetensors.numpy import load_file

    from edgert.convert.mlx_writer import ShardWriter, header_reserve

    rng = np.random.default_rng(0)
    arrays = {"a.weight": rng.integers(0, 1 << 32, (7, 5), dtype=np.uint32),
              "a.scales": rng.standard_normal((7, 3)).astype(np.float16),
              "b": rng.standard_normal(11).astype(np.float32),
              "c": np.arange(6, dtype=np.uint8).reshape(2, 3)}
    w = ShardWriter(tmp_path / "x.safetensors", header_reserve(len(arrays)))
    for k, v in arrays.items():
        w.add(k, v)
    w.close({"format": "mlx"})
    theirs, ours = load_file(tmp_path / "x.safetensors"), mx.load(str(tmp_path / "x.safetensors"))
    for k, v in arrays.items():
        assert theirs[k].dtype == v.dtype and np.array_equal(theirs[k], v)
        assert np.array_equal(np.array(ours[k]), v)
