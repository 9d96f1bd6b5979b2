"""gpt-oss (attention sinks, sliding/full layers, biases, the clamped SwiGLU, router biases,
MXFP4 experts) against transformers and mlx-lm: random-initialised models (8 experts, top-2,
window 8 so that 40 tokens cross it), float checkpoints and MXFP4 ones made from random
blocks and scales, held to transformers' own MXFP4 dequantization."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from edgert.convert.api import convert_file
from edgert.models.cache import KVCache, RotatingKVCache, make_cache
from edgert.package import load_model
from test_hf_reader import deq, rel_err
from test_moe import hf_logits, logits

YARN = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
        "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 64}
BASE = dict(vocab_size=256, hidden_size=128, intermediate_size=64, num_hidden_layers=4,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_local_experts=8,
            num_experts_per_tok=2, sliding_window=8, max_position_embeddings=256)
IDS = np.random.default_rng(2).integers(0, 256, size=(1, 40))


def hf_gpt_oss(folder: Path, rope: dict) -> transformers.GptOssForCausalLM:
    torch.manual_seed(0)
    model = transformers.GptOssForCausalLM(transformers.GptOssConfig(**BASE,
                                                                     rope_parameters=rope))
    model = model.float().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
            elif "sinks" in n:
                p.normal_(0, 0.5)
            elif "experts" in n or "router" in n or n.endswith("bias"):
                p.normal_(0, 0.1)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def yarn_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gpt_oss") / "hf"
    return hf_gpt_oss(folder, YARN), folder


def test_float_logits_cache_and_sorting(yarn_model, tmp_path):
    hf, folder = yarn_model
    ours, _ = load_model(convert_file(folder, tmp_path / "pkg", bits=0, progress=False))
    ref, got = hf_logits(hf, IDS), logits(ours, IDS)
    assert rel_err(got, ref) < 1e-4
    assert np.array_equal(got.argmax(-1), ref.argmax(-1))
    cache = make_cache(ours)
    assert [type(c) for c in cache] == [RotatingKVCache, KVCache] * 2
    steps = [np.array(ours(mx.array(IDS[:, :20]), cache=cache))]
    steps += [np.array(ours(mx.array(IDS[:, i:i + 1]), cache=cache)) for i in range(20, 40)]
    assert rel_err(np.concatenate(steps, axis=1), got) < 1e-5
    assert cache[0].keys.shape[2] == 7  # the sliding layers keep window - 1 positions
    for layer in ours.layers:
        layer.mlp.experts.sort_min = 1 << 30
    assert rel_err(logits(ours, IDS), got) < 1e-6


def test_default_4bit_conversion(yarn_model, tmp_path):
    hf, folder = yarn_model
    package = convert_file(folder, tmp_path / "pkg", progress=False)
    report = json.loads((package / "edgert.json").read_text())["tensors"]
    assert report["model.layers.0.mlp.router.weight"]["bits"] == 8
    assert report["model.layers.0.mlp.experts.gate_proj.weight"]["bits"] == 4
    assert "bits" not in report["model.layers.0.mlp.experts.gate_proj.bias"]
    w = mx.load(str(package / "model.safetensors"))
    q = json.loads((package / "config.json").read_text())["quantization"]
    state = copy.deepcopy(hf).state_dict()
    for i in range(BASE["num_hidden_layers"]):
        p = f"model.layers.{i}"

        def weight(module: str) -> np.ndarray:
            spec = q.get(module, q)
            if f"{module}.scales" not in w:
                return np.array(w[f"{module}.weight"])
            from edgert.convert.canonical import QuantTensor

            parts = [QuantTensor(*(np.array(w[f"{module}.{x}"])[e] if w[f"{module}.{x}"].ndim == 3
                                   else np.array(w[f"{module}.{x}"])
                                   for x in ("weight", "scales", "biases")),
                                 spec["bits"], spec["group_size"])
                     for e in range(w[f"{module}.weight"].shape[0] if
                                    w[f"{module}.weight"].ndim == 3 else 1)]
            out = np.stack([deq(t) for t in parts])
            return out if w[f"{module}.weight"].ndim == 3 else out[0]

        for lin in ("q_proj", "k_proj", "v_proj", "o_proj"):
            state[f"{p}.self_attn.{lin}.weight"] = torch.from_numpy(weight(f"{p}.self_attn.{lin}"))
        state[f"{p}.mlp.router.weight"] = torch.from_numpy(weight(f"{p}.mlp.router"))
        gate, up = weight(f"{p}.mlp.experts.gate_proj"), weight(f"{p}.mlp.experts.up_proj")
        gate_up = np.stack([gate, up], axis=2).reshape(gate.shape[0], -1, gate.shape[2])
        state[f"{p}.mlp.experts.gate_up_proj"] = torch.from_numpy(gate_up.swapaxes(1, 2).copy())
        state[f"{p}.mlp.experts.down_proj"] = torch.from_numpy(
            weight(f"{p}.mlp.experts.down_proj").swapaxes(1, 2).copy())
    state["lm_head.weight"] = torch.from_numpy(weight("lm_head"))
    state["model.embed_tokens.weight"] = torch.from_numpy(weight("model.embed_tokens"))
    reference = copy.deepcopy(hf)
    reference.load_state_dict(state)
    ours, _ = load_model(package)
    assert rel_err(logits(ours, IDS), hf_logits(reference, IDS)) < 1e-4


def test_mlx_lm_same_logits(tmp_path):
    """mlx-lm's gpt_oss on the package (default rope: mlx-lm's YaRN has no `truncate`)."""
    from mlx_lm.utils import load_model as mlx_lm_load

    hf_gpt_oss(tmp_path / "hf", {"rope_type": "default", "rope_theta": 150000.0})
    package = convert_file(tmp_path / "hf", tmp_path / "pkg", progress=False)
    ours, _ = load_model(package)
    theirs, _ = mlx_lm_load(package)
    theirs.set_dtype(mx.float32)
    assert rel_err(logits(ours, IDS), logits(theirs, IDS)) < 1e-4


# ------------------------------------------------------------------ MXFP4


def mxfp4_checkpoint(hf, folder: Path, out: Path) -> dict:
    """`folder`'s checkpoint with the experts replaced by random MXFP4 blocks and scales (as
    the published gpt-oss checkpoints store them); returns the float weights transformers'
    own dequantization gives them."""
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    rng = np.random.default_rng(0)
    out.mkdir()
    cfg = json.loads((folder / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4",
                                  "modules_to_not_convert": ["model.layers.*.self_attn",
                                                             "model.layers.*.mlp.router",
                                                             "model.embed_tokens", "lm_head"]}
    (out / "config.json").write_text(json.dumps(cfg))
    tensors, dequantized = load_file(str(folder / "model.safetensors")), {}
    for name in [n for n in tensors if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]:
        E, n_in, n_out = tensors.pop(name).shape
        blocks = rng.integers(0, 256, (E, n_out, n_in // 32, 16), dtype=np.uint8)
        scales = rng.integers(120, 126, (E, n_out, n_in // 32), dtype=np.uint8)
        blocks[0, 0, 0] = 0  # a zero block
        tensors[f"{name}_blocks"], tensors[f"{name}_scales"] = blocks, scales
        dequantized[name] = convert_moe_packed_tensors(
            torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32)
    save_file(tensors, str(out / "model.safetensors"))
    return dequantized


def test_mxfp4_experts_exact(yarn_model, tmp_path):
    hf, folder = yarn_model
    dequantized = mxfp4_checkpoint(hf, folder, tmp_path / "mxfp4")
    package = convert_file(tmp_path / "mxfp4", tmp_path / "pkg", progress=False)
    report = json.loads((package / "edgert.json").read_text())["tensors"]
    gate = report["model.layers.1.mlp.experts.gate_proj.weight"]
    assert (gate["class"], gate["mode"], gate["bits"], gate["group_size"]) == (
        "exact", "mxfp4", 4, 32)
    assert report["model.layers.1.self_attn.q_proj.weight"]["class"] == "float"
    w = mx.load(str(package / "model.safetensors"))
    for i in range(BASE["num_hidden_layers"]):
        p = f"model.layers.{i}.mlp.experts"
        deq_mlx = {x: np.array(mx.dequantize(w[f"{p}.{x}.weight"], w[f"{p}.{x}.scales"],
                                             group_size=32, bits=4, mode="mxfp4",
                                             dtype=mx.float32))
                   for x in ("gate_proj", "up_proj", "down_proj")}  # (E, out, in)
        ref_gate_up = dequantized[f"{p}.gate_up_proj"].numpy()  # (E, in, 2 out), interleaved
        assert np.array_equal(deq_mlx["gate_proj"], ref_gate_up[..., ::2].swapaxes(1, 2))
        assert np.array_equal(deq_mlx["up_proj"], ref_gate_up[..., 1::2].swapaxes(1, 2))
        assert np.array_equal(deq_mlx["down_proj"],
                              dequantized[f"{p}.down_proj"].numpy().swapaxes(1, 2))
    reference = copy.deepcopy(hf)
    reference.load_state_dict(dequantized, strict=False)
    ours, _ = load_model(package)
    got, ref = logits(ours, IDS), hf_logits(reference, IDS)
    assert rel_err(got, ref) < 1e-4
    assert np.array_equal(got.argmax(-1), ref.argmax(-1))
