"""Quantized packages of every bit width, group size and scale dtype: edgert against mlx-lm
loading the same folder, and against the float model of the dequantized weights."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

from edgert.models import qwen3
from edgert.package import load_model

CONFIG = dict(model_type="qwen3", hidden_size=128, num_hidden_layers=2, intermediate_size=256,
              num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=384,
              rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True,
              max_position_embeddings=256)


def write_package(folder: Path, bits: int, group_size: int, scale_dtype) -> None:
    """A random model quantized by MLX, its embedding/head kept at 8 bits (a per-module
    override, as converters write them)."""
    mx.random.seed(bits * 1000 + group_size)
    model = qwen3.Model(qwen3.ModelArgs.from_dict(CONFIG))
    override = {"group_size": 64, "bits": 8, "mode": "affine"}
    nn.quantize(model, group_size, bits, class_predicate=lambda p, m: (
        override if p == "model.embed_tokens" else hasattr(m, "to_quantized")))
    weights = dict(tree_flatten(model.parameters()))
    weights = {k: v.astype(scale_dtype) if k.endswith(("scales", "biases")) else v
               for k, v in weights.items()}
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    quant = {"group_size": group_size, "bits": bits, "mode": "affine",
             "model.embed_tokens": override}
    (folder / "config.json").write_text(json.dumps(
        dict(CONFIG, quantization=quant, quantization_config=quant)))


def dequantized_float_model(model) -> nn.Module:
    """The same model with every quantized weight dequantized in float32."""
    quantized = {n: m for n, m in model.named_modules() if hasattr(m, "scales")}
    weights = []
    for k, v in tree_flatten(model.parameters()):
        module, _, leaf = k.rpartition(".")
        if module not in quantized:
            weights.append((k, v.astype(mx.float32)))
        elif leaf == "weight":
            m = quantized[module]
            weights.append((k, mx.dequantize(m.weight, m.scales.astype(mx.float32),
                                             m.biases.astype(mx.float32), m.group_size, m.bits)))
    ref = qwen3.Model(qwen3.ModelArgs.from_dict(CONFIG))
    ref.load_weights(weights)
    return ref


@pytest.mark.parametrize("scale_dtype", [mx.float16, mx.bfloat16, mx.float32])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 8])
def test_quantized_package(tmp_path, bits, group_size, scale_dtype):
    from mlx_lm.utils import load_model as mlxlm_load

    write_package(tmp_path, bits, group_size, scale_dtype)
    model, _ = load_model(tmp_path)
    assert model.model.layers[0].mlp.down_proj.bits == bits
    assert model.model.embed_tokens.bits == 8
    ids = mx.array(np.random.default_rng(bits).integers(0, CONFIG["vocab_size"], (1, 24)))
    ours = np.array(model(ids))
    assert ours.dtype == np.float32

    ref = np.array(dequantized_float_model(model)(ids))
    scale = np.abs(ref).max()
    assert np.abs(ours - ref).max() / scale < 1e-4

    peer, _ = mlxlm_load(tmp_path)  # mlx-lm, with its parameters in float32 like ours
    peer.update(tree_map(lambda p: p.astype(mx.float32) if p.dtype in (mx.float16, mx.bfloat16)
                         else p, peer.parameters()))
    theirs = np.array(peer(ids))
    assert np.abs(ours - theirs).max() / scale < 1e-5
