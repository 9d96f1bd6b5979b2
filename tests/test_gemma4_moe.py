"""Gemma 4's MoE block (the 26B-A4B variant: `enable_moe_block`, routed GeGLU experts beside
every layer's dense MLP) against transformers, mlx-lm and llama.cpp.

Random-initialised transformers gemma4_text models (8 experts, top-2, moe width 32) with the
other Gemma 4 features on too (PLE, KV sharing, k-as-v full layers, a sliding window of 4
shorter than the 40-token prompt, soft-capping): float logits within 1e-4 of transformers with
the same top-1, cached decode equal to the uncached run, expert sorting on and off the same;
the 4-bit package against transformers on its own dequantized weights (router at 8 bits); the
multimodal wrapper; mlx-lm on the packages; GGUFs from llama.cpp's converter (F32, and Q8_0
from llama-quantize) against transformers, gguf-py and llama.cpp's own logits; bad input.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers

from edgert.convert.api import convert_file
from edgert.errors import EdgertError
from edgert.models import gemma4
from edgert.package import load_model
from test_gemma4 import (cached_logits, dequantized_state_dict, edgert_logits, hf_logits,
                         rel_err, text_config)

E, K, MOE_I = 8, 2, 32
MOE = dict(enable_moe_block=True, num_experts=E, top_k_experts=K, moe_intermediate_size=MOE_I)
PROMPT = np.random.default_rng(0).integers(0, 160, size=(1, 40))  # 80 (token, expert) pairs


def moe_config(**over) -> dict:
    return text_config(**MOE) | over


def randomize_moe(model: torch.nn.Module) -> None:
    """Norms, router scales and layer scalars off their init values (ones); experts and the
    router's projection spread (init std 0.02), so that the routing is decisive and the
    experts really differ."""
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("router.scale"):
                p.add_(0.3 * torch.randn_like(p))
            elif name.endswith("per_expert_scale"):
                p.copy_(0.5 + torch.rand_like(p))
            elif ".experts." in name or name.endswith("router.proj.weight"):
                p.normal_(0, 0.1)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.copy_(0.5 + torch.rand_like(b))


def save_moe_model(folder: Path, **over) -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.Gemma4ForCausalLM(transformers.Gemma4TextConfig(
        **moe_config(**over))).eval()
    randomize_moe(model)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module")
def hf_moe(tmp_path_factory):
    folder = tmp_path_factory.mktemp("g4moe") / "hf"
    return folder, save_moe_model(folder)


@pytest.fixture(scope="module")
def packages(hf_moe, tmp_path_factory):
    """The HF folder as a float package and a default (4-bit) package."""
    folder, _ = hf_moe
    root = tmp_path_factory.mktemp("g4moepkg")
    return {bits: convert_file(folder, root / f"b{bits}", progress=False,
                               **({"bits": 0} if bits == 0 else {}))
            for bits in (0, 4)}


def set_sorting(model, on: bool) -> None:
    for layer in model.layers:
        layer.experts.switch_glu.sort_min = 0 if on else 1 << 30


def test_float_package_matches_transformers(hf_moe, packages):
    _, hf = hf_moe
    model, config = load_model(packages[0])
    assert config["model_type"] == "gemma4_text" and config["enable_moe_block"]
    assert (config["num_experts"], config["top_k_experts"]) == (E, K)
    assert all(hasattr(layer, "experts") for layer in model.layers)
    ref = hf_logits(hf, PROMPT)
    out = edgert_logits(model, PROMPT)
    print(f"gemma4 MoE float: edgert vs transformers {rel_err(out, ref):.2e}")
    assert rel_err(out, ref) < 1e-4
    assert (out.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("bits", [0, 4])
def test_cached_decode_and_sorting(packages, bits):
    """Cached decode (prefill before, at and past the window of 4) equals the uncached run;
    tokens sorted by expert or not give the same logits (the 80-pair prompt sorts by default)."""
    model, _ = load_model(packages[bits])
    full = edgert_logits(model, PROMPT)
    for prefill in (1, 4, 24):
        assert rel_err(cached_logits(model, PROMPT, prefill), full) < 1e-5, prefill
    set_sorting(model, True)
    on = edgert_logits(model, PROMPT)
    set_sorting(model, False)
    off = edgert_logits(model, PROMPT)
    assert rel_err(on, off) < 1e-6 and rel_err(on, full) < 1e-6


def moe_state_dict(pkg: Path) -> dict[str, torch.Tensor]:
    """The package's (dequantized) weights under transformers' names, the experts fused back
    into gate_up_proj (E, 2I, H) / down_proj (E, H, I)."""
    w = dequantized_state_dict(pkg)
    out = {}
    for k, v in w.items():
        if ".experts.switch_glu." not in k:
            out[k] = v
            continue
        base = k.split(".switch_glu.")[0]
        if k.endswith("down_proj.weight"):
            out[f"{base}.down_proj"] = v
        elif k.endswith("gate_proj.weight"):
            out[f"{base}.gate_up_proj"] = torch.cat(
                [v, w[k.replace("gate_proj", "up_proj")]], dim=1)
    return out


def test_4bit_package_matches_transformers_on_its_weights(packages):
    """The default package: experts stacked (E, out, in) at 4 bits, the router at 8 bits,
    router scales float; against transformers running the package's own weights."""
    pkg = packages[4]
    report = json.loads((pkg / "edgert.json").read_text())["tensors"]
    up = report["model.layers.0.experts.switch_glu.up_proj.weight"]
    assert up["shape"] == [E, MOE_I, 64] and up["bits"] == 4 and up["experts"] == E
    assert up["layout"] == "stacked experts (E, out, in)"
    assert up["source_name"] == "model.layers.0.experts.gate_up_proj"
    routers = [v for k, v in report.items() if k.endswith("router.proj.weight")]
    assert len(routers) == 8 and all(r["bits"] == 8 for r in routers)
    assert "bits" not in report["model.layers.0.router.per_expert_scale"]
    model, _ = load_model(pkg)
    torch.manual_seed(0)
    hf = transformers.Gemma4ForCausalLM(transformers.Gemma4TextConfig(**moe_config())).eval()
    missing = hf.load_state_dict(moe_state_dict(pkg), strict=False).missing_keys
    assert missing == ["lm_head.weight"]  # tied
    ref = hf_logits(hf, PROMPT)
    out = edgert_logits(model, PROMPT)
    assert rel_err(out, ref) < 1e-4
    assert (out.argmax(-1) == ref.argmax(-1)).all()


def test_multimodal_wrapper_gives_the_text_models_logits(tmp_path):
    """The `gemma4` wrapper (text_config with the MoE block, vision and audio towers): the
    package is its text model, towers left out, with the wrapper's logits."""
    from test_gemma4 import _tiny_audio

    torch.manual_seed(0)
    vision = transformers.Gemma4VisionConfig(hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=1, num_attention_heads=2,
                                             num_key_value_heads=2, head_dim=16)
    cfg = transformers.Gemma4Config(text_config=transformers.Gemma4TextConfig(**moe_config()),
                                    vision_config=vision,
                                    audio_config=transformers.Gemma4AudioConfig(**_tiny_audio()))
    wrapper = transformers.Gemma4ForConditionalGeneration(cfg).eval()
    randomize_moe(wrapper)
    wrapper.save_pretrained(tmp_path / "hf")
    pkg = convert_file(tmp_path / "hf", tmp_path / "pkg", bits=0, progress=False)
    model, config = load_model(pkg)
    assert config["model_type"] == "gemma4_text" and config["num_experts_per_tok"] == K
    source = json.loads((pkg / "edgert.json").read_text())["source"]
    assert "tensors left out" in source["dropped"] and "audio_tower" in source["dropped"]
    names = json.loads((pkg / "edgert.json").read_text())["tensors"]
    assert not any("tower" in n or "language_model" in n for n in names)
    with torch.no_grad():
        ref = wrapper(input_ids=torch.tensor(PROMPT)).logits[0].numpy()
    out = edgert_logits(model, PROMPT)
    assert rel_err(out, ref) < 1e-4
    assert (out.argmax(-1) == ref.argmax(-1)).all()


@pytest.mark.parametrize("bits", [0, 4])
def test_mlx_lm_loads_the_packages_with_the_same_logits(packages, bits):
    """mlx-lm 0.32's gemma4_text (its Router / Experts / switch_glu) loads the packages; float16
    scales widened to float32 on its side as edgert does on the CPU (see test_gemma4)."""
    from mlx.utils import tree_map_with_path
    from mlx_lm.utils import load_model as mlx_lm_load

    pkg = packages[bits]
    ours, _ = load_model(pkg)
    theirs, _ = mlx_lm_load(pkg)
    assert theirs.layers[0].enable_moe
    theirs.update(tree_map_with_path(
        lambda p, v: v.astype(mx.float32) if p.endswith((".scales", ".biases")) else v,
        theirs.parameters()))
    a = edgert_logits(ours, PROMPT)
    b = np.array(theirs(mx.array(PROMPT))[0].astype(mx.float32))
    print(f"gemma4 MoE {bits}-bit: edgert vs mlx-lm {rel_err(a, b):.2e}")
    assert rel_err(a, b) < 1e-4
    assert (a.argmax(-1) == b.argmax(-1)).all()
