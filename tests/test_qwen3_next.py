"""Qwen3-Next packages as mlx-lm loads them: random transformers Qwen3-Next models (hybrid
layers with full attention every second layer, so that mlx-lm's full_attention_interval can
say where; routed experts with a shared expert, one dense layer), converted by edgert from the
HF checkpoint, float and 4-bit. Oracles: transformers' logits (float), mlx-lm's own qwen3_next
model on the same package (float and 4-bit). Packages edgert wrote before its layout was
mlx-lm's still load. (GGUF-made packages: tests/test_moe_gguf_families.py.)"""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

from edgert.convert.api import convert_file
from edgert.models import qwen3_next
from edgert.models.cache import make_cache
from edgert.package import load_model
from test_qwen3_5 import TEXT, hf_logits, rel_err

L, F = "linear_attention", "full_attention"
CONFIG = dict(TEXT, num_hidden_layers=4, layer_types=[L, F, L, F], tie_word_embeddings=False,
              num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
              shared_expert_intermediate_size=64, mlp_only_layers=[2], norm_topk_prob=True,
              rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                               "partial_rotary_factor": 0.25})
IDS = np.random.default_rng(1).integers(0, TEXT["vocab_size"], size=(1, 40))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """(transformers model, its saved folder); norms, gates and experts off their initial
    values (float16-exact, so that float16 packages are comparable too)."""
    torch.manual_seed(0)
    hf = transformers.Qwen3NextForCausalLM(transformers.Qwen3NextConfig(**CONFIG))
    hf = hf.to(torch.float32).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n or n.endswith(("dt_bias", "A_log")):
                p.add_(torch.randn_like(p) * 0.1)
            elif "experts" in n or n.endswith(("mlp.gate.weight", "shared_expert_gate.weight")):
                p.normal_(0, 0.1)
    folder = tmp_path_factory.mktemp("qwen3_next") / "hf"
    hf.save_pretrained(folder)
    return hf, folder


def tensors(package) -> dict[str, tuple]:
    with safe_open(str(package / "model.safetensors"), "np") as f:
        return {k: f.get_slice(k).get_shape() for k in f.keys()}


def mlx_lm_logits(package) -> np.ndarray:
    from mlx_lm.utils import load_model as mlx_lm_load

    theirs, _ = mlx_lm_load(package)
    theirs.set_dtype(mx.float32)  # mlx-lm computes in the scales' dtype; edgert in float32
    return np.array(theirs(mx.array(IDS)))


@pytest.mark.parametrize("bits", [0, None], ids=["float", "4-bit"])
def test_mlx_lm_loads_the_package(checkpoint, tmp_path, bits):
    """The package is mlx-lm's layout (fused in_proj_qkvz, (C, K, 1) conv1d, the top-level
    config keys it reads) and mlx-lm's qwen3_next gives edgert's logits (1e-4, top-1
    identical); float: both within 1e-4 of transformers; cached decode equals uncached."""
    hf, folder = checkpoint
    package = convert_file(folder, tmp_path / "pkg", bits=bits, progress=False)
    config = json.loads((package / "config.json").read_text())
    assert (config["rope_theta"], config["partial_rotary_factor"]) == (10000.0, 0.25)
    assert config["full_attention_interval"] == 2 and config["model_type"] == "qwen3_next"
    shapes = tensors(package)
    assert "model.layers.0.linear_attn.in_proj_qkvz.weight" in shapes
    assert shapes["model.layers.0.linear_attn.conv1d.weight"] == [2 * 2 * 16 + 4 * 8, 4, 1]
    ours, _ = load_model(package)
    got = np.array(ours(mx.array(IDS)))
    theirs = mlx_lm_logits(package)
    print(f"bits {bits}: mlx-lm vs edgert {rel_err(got, theirs):.2e}")
    assert rel_err(got, theirs) < 1e-4 and (got.argmax(-1) == theirs.argmax(-1)).all()
    if bits == 0:
        ref = hf_logits(hf, IDS)
        assert rel_err(got, ref) < 1e-4 and (got.argmax(-1) == ref.argmax(-1)).all()
    cache = make_cache(ours)
    steps = [np.array(ours(mx.array(IDS[:, :30]), cache=cache))]
    steps += [np.array(ours(mx.array(IDS[:, t:t + 1]), cache=cache)) for t in range(30, 40)]
    assert rel_err(np.concatenate(steps, axis=1), got) < 1e-5


def test_norms_stored_as_one_plus_w(checkpoint, tmp_path):
    """The zero-centred norms are stored as 1 + w in float32 (the checkpoint's w plus one,
    exactly), linear attention's gated norm as it is; the report says so."""
    from safetensors.numpy import load_file

    _, folder = checkpoint
    package = convert_file(folder, tmp_path / "pkg", bits=0, progress=False)
    ours = load_file(str(package / "model.safetensors"))
    src = load_file(str(folder / "model.safetensors"))
    report = json.loads((package / "edgert.json").read_text())["tensors"]
    for name in ("model.norm.weight", "model.layers.1.self_attn.q_norm.weight",
                 "model.layers.0.input_layernorm.weight"):
        assert ours[name].dtype == np.float32
        assert np.array_equal(ours[name], src[name].astype(np.float32) + 1), name
        assert "1 + w" in report[name]["note"]
    name = "model.layers.0.linear_attn.norm.weight"
    assert np.array_equal(ours[name], src[name])
    conv = "model.layers.0.linear_attn.conv1d.weight"
    assert np.array_equal(ours[conv][:, :, 0], src[conv][:, 0, :])


def test_packages_written_before_still_load(checkpoint, tmp_path, monkeypatch):
    """A package as edgert wrote it before its layout was mlx-lm's (HF's: norms w, conv1d
    (C, 1, K), no package_tensors) loads with the same logits as the new one."""
    hf, folder = checkpoint
    new, _ = load_model(convert_file(folder, tmp_path / "new", bits=0, progress=False))
    monkeypatch.delattr(qwen3_next, "package_tensors")
    package = convert_file(folder, tmp_path / "old", bits=0, progress=False)
    monkeypatch.undo()
    assert tensors(package)["model.layers.0.linear_attn.conv1d.weight"] == [96, 1, 4]
    old, _ = load_model(package)
    assert np.array_equal(np.array(old(mx.array(IDS))), np.array(new(mx.array(IDS))))


def test_a_package_as_source_keeps_its_layout(checkpoint, tmp_path):
    """Converting an edgert (or mlx-lm) package again: the layout is recognised by its conv1d
    kernel and carried over (norms not shifted twice): the same logits."""
    _, folder = checkpoint
    first = convert_file(folder, tmp_path / "first", progress=False)
    again = convert_file(first, tmp_path / "again", progress=False)
    a, b = load_model(first)[0], load_model(again)[0]
    assert np.array_equal(np.array(a(mx.array(IDS))), np.array(b(mx.array(IDS))))
    assert rel_err(mlx_lm_logits(again), np.array(b(mx.array(IDS)))) < 1e-4


def test_yarn_rope_reaches_mlx_lm(tmp_path):
    """A YaRN rope (transformers 5 keeps it in rope_parameters) is also the package's top-level
    rope_scaling, which mlx-lm reads: transformers, edgert and mlx-lm agree (1e-4)."""
    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
            "factor": 8.0, "original_max_position_embeddings": 16}
    torch.manual_seed(0)
    hf = transformers.Qwen3NextForCausalLM(transformers.Qwen3NextConfig(
        **dict(CONFIG, rope_parameters=yarn))).eval()
    hf.save_pretrained(tmp_path / "hf")
    package = convert_file(tmp_path / "hf", tmp_path / "pkg", bits=0, progress=False)
    assert json.loads((package / "config.json").read_text())["rope_scaling"]["factor"] == 8.0
    got = np.array(load_model(package)[0](mx.array(IDS)))
    assert rel_err(got, hf_logits(hf, IDS)) < 1e-4
    assert rel_err(got, mlx_lm_logits(package)) < 1e-4
