"""mlx-lm loads the packages edgert writes from real llama.cpp-quantized files (K-quants with
float32 scales, 1-bit, ternary, mixed bit widths per layer) and computes the same logits."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from edgert.convert.api import convert_file
from edgert.package import load_model


@pytest.mark.parametrize("type_name", ["Q4_K_M", "Q1_0-FEW", "TQ2_0-FEW", "MIXED"])
def test_mlx_lm_same_logits(quantized_smollm, tmp_path, type_name):
    from mlx_lm.utils import load_model as mlx_lm_load

    pkg = convert_file(quantized_smollm(type_name), tmp_path / "pkg", progress=False)
    ids = mx.array([[1, 504, 3458, 282, 4649, 314, 8217, 30, 216, 2]])
    ours, _ = load_model(pkg)
    theirs, _ = mlx_lm_load(pkg)
    theirs.set_dtype(mx.float32)  # mlx-lm's activations follow the weights' dtype; ours are f32
    a, b = np.array(ours(ids)), np.array(theirs(ids).astype(mx.float32))
    assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()
    bits = {m.bits for _, m in theirs.named_modules() if hasattr(m, "bits")}
    assert len(bits) > 1 or type_name == "Q4_K_M"  # the per-layer overrides were honoured
