"""The CPU-stream split of quantized matmuls against its twin, mx.quantized_matmul."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from edgert.models import llama
from edgert.parallel import SplitQuantizedEmbedding, SplitQuantizedLinear, parallelize


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 8])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("n", [2, 3])
def test_split_linear_is_bit_identical(bits, group_size, n):
    mx.random.seed(bits * 7 + group_size)
    lin = nn.Linear(256, 200, bias=True)
    q = nn.QuantizedLinear.from_linear(lin, group_size, bits)
    split = SplitQuantizedLinear.wrap(q, n, min_work=0)
    x = mx.random.normal((3, 5, 256))
    assert mx.array_equal(split(x), q(x)).item()


def test_split_embedding_head_is_bit_identical():
    emb = nn.QuantizedEmbedding.from_embedding(nn.Embedding(1000, 128), 64, 4)
    split = SplitQuantizedEmbedding.wrap(emb, 2, min_work=0)
    x = mx.random.normal((1, 7, 128))
    assert mx.array_equal(split.as_linear(x), emb.as_linear(x)).item()
    ids = mx.array([[1, 5, 999]])
    assert mx.array_equal(split(ids), emb(ids)).item()


def test_parallel_model_logits_identical():
    args = llama.ModelArgs.from_dict(dict(
        model_type="llama", hidden_size=128, num_hidden_layers=2, intermediate_size=256,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=512))
    mx.random.seed(0)
    ref = llama.Model(args)
    nn.quantize(ref, 32, 4)
    mx.eval(ref.parameters())
    par = llama.Model(args)
    nn.quantize(par, 32, 4)
    par.update(ref.parameters())
    assert parallelize(par, n=2, min_work=0) == 2 * 7 + 1  # every linear plus the tied head
    ids = mx.array(np.arange(20)[None])
    assert mx.array_equal(par(ids), ref(ids)).item()
