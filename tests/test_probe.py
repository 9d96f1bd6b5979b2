"""The backend probe: a layout the device cannot run is widened losslessly at load."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from edgert import probe
from edgert.bitpack import pack_rows, unpack_rows
from edgert.convert.api import convert_file
from edgert.package import load_model
from test_models import hf_model


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 8])
def test_probe_accepts_what_the_cpu_runs(bits):
    assert probe.runs(probe.Layout(bits, 32, "affine", "float16"))


@pytest.mark.parametrize("bits,wider", [(1, 2), (3, 4), (5, 8)])
def test_pack_codes_round_trip_and_widening_is_lossless(bits, wider):
    rng = np.random.default_rng(bits)
    q = rng.integers(0, 1 << bits, (4, 128), dtype=np.uint8)
    w = pack_rows(q, bits)
    s = mx.array(rng.uniform(0.5, 1, (4, 4)).astype(np.float16))
    b = mx.array(rng.uniform(-1, 1, (4, 4)).astype(np.float16))
    assert np.array_equal(unpack_rows(w, bits), q)
    a = mx.dequantize(mx.array(w), s, b, group_size=32, bits=bits)
    wide = pack_rows(unpack_rows(w, bits), wider)
    assert np.array_equal(np.array(a), np.array(mx.dequantize(mx.array(wide), s, b, group_size=32,
                                                             bits=wider)))


@pytest.fixture
def one_bit_package(tmp_path):
    hf_model("llama", tmp_path / "hf")
    return convert_file(tmp_path / "hf", tmp_path / "pkg", progress=False, bits=1, group_size=32)


def test_forced_probe_failure_widens_1_bit(one_bit_package, monkeypatch, capsys):
    ids = mx.array([[1, 5, 9, 200, 3, 7]])
    model, _ = load_model(one_bit_package)
    want = np.array(model(ids))
    assert model.model.layers[0].mlp.down_proj.bits == 1

    real = probe._quantized_matmul

    def no_1_bit(x, w, s, b, layout):
        if layout.bits == 1:
            raise ValueError("[quantized_matmul] 1-bit is not supported on this device")
        return real(x, w, s, b, layout)

    monkeypatch.setattr(probe, "_quantized_matmul", no_1_bit)
    probe._runs.cache_clear()
    try:
        model, _ = load_model(one_bit_package)
        err = capsys.readouterr().err
    finally:
        probe._runs.cache_clear()
    assert model.model.layers[0].mlp.down_proj.bits == 2
    assert np.array_equal(np.array(model(ids)), want)  # same codes, scales, biases: same logits
    lines = [line for line in err.splitlines() if "widened" in line]
    assert len(lines) == 1 and "1-bit group-32" in lines[0] and "to 2-bit" in lines[0]


def test_no_wider_layout_is_one_clear_error(one_bit_package, monkeypatch):
    from edgert.errors import UnsupportedError

    monkeypatch.setattr(probe, "_quantized_matmul",
                        lambda *a: (_ for _ in ()).throw(ValueError("nothing runs")))
    probe._runs.cache_clear()
    try:
        with pytest.raises(UnsupportedError, match="cannot run 1-bit group-32"):
            load_model(one_bit_package)
    finally:
        probe._runs.cache_clear()
