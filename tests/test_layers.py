"""edgert.layers: act-order and BitNet layers against their references (nn.QuantizedLinear on
permuted inputs; transformers' BitLinear / AutoBitLinear)."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
from mlx.utils import tree_flatten

from edgert.convert.hf_reader import bitnet_codes, ternary_to_mlx
from edgert.layers import BitLinear, PermutedQuantizedLinear, swap_layers
from edgert.parallel import parallelize


def quantized_linear(in_f: int, out_f: int, bias: bool, bits: int = 4,
                     group_size: int = 64) -> nn.QuantizedLinear:
    mx.random.seed(0)
    return nn.QuantizedLinear.from_linear(nn.Linear(in_f, out_f, bias=bias), group_size, bits)


@pytest.mark.parametrize("bias", [False, True])
def test_permuted_linear_is_quantized_linear_on_permuted_input(bias):
    q = quantized_linear(256, 96, bias)
    perm = mx.array(np.random.default_rng(0).permutation(256).astype(np.uint32))
    layer = PermutedQuantizedLinear(q, perm)
    x = mx.random.normal((2, 5, 256))
    assert np.array_equal(np.array(layer(x)), np.array(q(x[..., perm])))


@pytest.mark.parametrize("linear_class", ["bitlinear", "autobitlinear"])
@pytest.mark.parametrize("bias", [False, True])
def test_bitlinear_matches_transformers(linear_class, bias):
    from transformers.integrations.bitnet import AutoBitLinear, pack_weights
    from transformers.integrations.bitnet import BitLinear as HFBitLinear

    rng = np.random.default_rng(1)
    ternary = torch.from_numpy(rng.integers(-1, 2, size=(64, 256)).astype(np.int8))
    scale = torch.tensor([0.37])
    b = torch.from_numpy(rng.normal(size=64).astype(np.float32)) if bias else None
    with torch._dynamo.config.patch(disable=True), torch.no_grad():
        if linear_class == "bitlinear":
            ref = HFBitLinear(256, 64, bias=bias, dtype=torch.float32)
            ref.weight.copy_(pack_weights(ternary.clone()))
        else:
            ref = AutoBitLinear(256, 64, bias=bias, dtype=torch.float32)
            ref.weight.copy_(ternary.float())
        ref.weight_scale.copy_(scale)
        if bias:
            ref.bias.copy_(b)
        x = rng.normal(size=(3, 7, 256)).astype(np.float32) * 3
        expected = ref(torch.from_numpy(x)).numpy()

    packed = pack_weights(ternary.clone()).numpy()
    t = ternary_to_mlx(bitnet_codes(packed))
    q = quantized_linear(256, 64, bias, bits=2, group_size=t.group_size)
    q.update({k: mx.array(v) for k, v in
              (("weight", t.w_q), ("scales", t.scales), ("biases", t.biases))})
    if bias:
        q.bias = mx.array(b.numpy())
    op = "divide" if linear_class == "bitlinear" else "multiply"
    ours = np.array(BitLinear(q, mx.array(scale.numpy()), 8, op)(mx.array(x)))
    if op == "divide":  # integer activations times ternary weights: exact sums
        assert np.array_equal(ours, expected)
    else:  # (x_q / scale) @ W.T sums floats, in another order than torch
        assert np.abs(ours - expected).max() <= 1e-6 * np.abs(expected).max()


def test_swap_layers_and_parallel_leave_them_alone():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(256, 256)
            self.b = nn.Linear(256, 256)
            self.c = nn.Linear(256, 256)

    m = Block()
    nn.quantize(m, 64, 2)
    weights = {"a.input_perm": mx.arange(256, dtype=mx.uint32), "b.weight_scale": mx.array([2.0])}
    assert swap_layers(m, weights, {"bitnet": {"weight_scale": "multiply"}}) == 2
    assert isinstance(m.a, PermutedQuantizedLinear) and isinstance(m.b, BitLinear)
    assert m.b.weight_scale_op == "multiply" and isinstance(m.c, nn.QuantizedLinear)
    assert "a.input_perm" in dict(tree_flatten(m.parameters()))
    parallelize(m, n=2, min_work=0)
    assert isinstance(m.a, PermutedQuantizedLinear) and isinstance(m.b, BitLinear)
