"""Qwen3.5-MoE (hybrid layers + routed experts + a sigmoid-gated shared expert) against
transformers and mlx-lm: random-initialised models (8 experts, top-2), text-only and the
vision-language wrapper, converted by edgert."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers

from edgert.convert.api import convert_file
from edgert.models.cache import KVCache, RecurrentCache, make_cache
from edgert.package import load_model
from test_moe import dequantized_state, hf_logits, logits, set_sorting
from test_hf_reader import rel_err

L, F = "linear_attention", "full_attention"
TEXT = dict(hidden_size=128, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, vocab_size=256, linear_conv_kernel_dim=4, linear_key_head_dim=32,
            linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
            num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64,
            shared_expert_intermediate_size=64, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "partial_rotary_factor": 0.5})
VISION = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=128,
              patch_size=4, num_position_embeddings=16)
CONFIGS = {  # mlx-lm places full attention every 4th layer: "vl-interval4" follows that
    "text": ("text", dict(TEXT, num_hidden_layers=3, layer_types=[L, F, L])),
    "vl-interval4": ("vl", dict(TEXT, num_hidden_layers=4, layer_types=[L, L, L, F])),
}
IDS = np.random.default_rng(1).integers(0, 256, size=(1, 40))


def hf_qwen3_5_moe(name: str, folder: Path):
    wrapper, text = CONFIGS[name]
    torch.manual_seed(0)
    if wrapper == "text":
        model = transformers.Qwen3_5MoeForCausalLM(transformers.Qwen3_5MoeTextConfig(**text))
    else:
        model = transformers.Qwen3_5MoeForConditionalGeneration(transformers.Qwen3_5MoeConfig(
            text_config=text, vision_config=VISION, tie_word_embeddings=False))
    model = model.float().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith(("dt_bias", "A_log")):
                p.add_(torch.randn_like(p) * 0.1)
            elif "experts" in n or n.endswith(("mlp.gate.weight", "shared_expert_gate.weight")):
                p.normal_(0, 0.1)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module", params=list(CONFIGS))
def moe(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param) / "hf"
    return hf_qwen3_5_moe(request.param, folder), folder, request.param


def test_float_logits_cache_and_sorting(moe, tmp_path):
    hf, folder, _ = moe
    ours, config = load_model(convert_file(folder, tmp_path / "pkg", bits=0, progress=False))
    ref, got = hf_logits(hf, IDS), logits(ours, IDS)
    assert rel_err(got, ref) < 1e-4
    assert np.array_equal(got.argmax(-1), ref.argmax(-1))
    cache = make_cache(ours)
    assert {type(c) for c in cache} == {KVCache, RecurrentCache}
    steps = [np.array(ours(mx.array(IDS[:, :24]), cache=cache))]
    steps += [np.array(ours(mx.array(IDS[:, i:i + 1]), cache=cache)) for i in range(24, 40)]
    assert rel_err(np.concatenate(steps, axis=1), got) < 1e-5
    set_sorting(ours, False)
    assert rel_err(logits(ours, IDS), got) < 1e-6


def test_default_4bit_and_mlx_lm(moe, tmp_path):
    hf, folder, name = moe
    package = convert_file(folder, tmp_path / "pkg", progress=False)
    report = json.loads((package / "edgert.json").read_text())["tensors"]
    gates = {k: v for k, v in report.items()
             if k.endswith(("mlp.gate.weight", "shared_expert_gate.weight"))}
    assert len(gates) == 2 * CONFIGS[name][1]["num_hidden_layers"]
    assert all(v["bits"] == 8 for v in gates.values())  # routers and shared gates at 8 bits
    shared = next(v for k, v in report.items() if k.endswith("shared_expert.up_proj.weight"))
    assert shared["bits"] == 4
    ours, _ = load_model(package)
    reference = copy.deepcopy(hf)
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in
                               dequantized_state(hf, package).items()}, strict=False)
    got = logits(ours, IDS)
    assert rel_err(got, hf_logits(reference, IDS)) < 1e-4


@pytest.mark.parametrize("bits", [0, 4])
def test_mlx_lm_loads_the_package(tmp_path, bits):
    """mlx-lm's own qwen3_5_moe (the VL wrapper; it knows no qwen3_5_moe_text) on the package,
    float and 4-bit. At 4 bits the routers' 8-bit overrides must also be found under mlx-lm's
    module paths (language_model.model.*), not only the package's (model.language_model.*)."""
    from mlx_lm.utils import load_model as mlx_lm_load

    hf_qwen3_5_moe("vl-interval4", tmp_path / "hf")
    package = convert_file(tmp_path / "hf", tmp_path / "pkg", bits=bits, progress=False)
    ours, _ = load_model(package)
    theirs, _ = mlx_lm_load(package)
    gate = theirs.language_model.model.layers[0].mlp.gate
    assert (getattr(gate, "bits", None) == 8) == (bits == 4)
    theirs.set_dtype(mx.float32)  # mlx-lm computes in the scales' dtype (float16); ours float32
    assert rel_err(logits(ours, IDS), logits(theirs, IDS)) < 1e-4