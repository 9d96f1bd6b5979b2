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


# ------------------------------------------------------------------ GGUF from llama.cpp's tools

GGUF_KINDS = ("Q8_0", "Q4_K_M")  # llama-quantize; at width 64 Q4_K_M's experts fall back to
# Q5_0 / Q8_0 (K-quants need rows of 256)


@pytest.fixture(scope="module")
def ggufs(tmp_path_factory):
    """(transformers model, {"F32" | quant type: GGUF}): the random MoE model (with the tiny
    Gemma tokenizer) through llama.cpp's convert_hf_to_gguf.py, then llama-quantize."""
    import os
    import subprocess
    import sys
    import tarfile

    from test_gemma4 import GGUF_VOCAB, save_tokenizer
    from test_moe_gguf_families import quantize
    from testdata import data_file

    root = tmp_path_factory.mktemp("g4moegguf")
    with tarfile.open(data_file("llama_cpp_python-0.3.36.tar.gz")) as t:
        members = [m for m in t.getmembers() if "/vendor/llama.cpp/" in m.name and any(
            s in m.name for s in ("/convert_hf_to_gguf.py", "/conversion/", "/gguf-py/"))]
        t.extractall(root / "src", members=members, filter="data")
    converter = next((root / "src").glob("*/vendor/llama.cpp"))
    hf = save_moe_model(root / "hf", vocab_size=GGUF_VOCAB, vocab_size_per_layer_input=GGUF_VOCAB)
    save_tokenizer(root / "hf")
    files = {"F32": root / "F32.gguf"}
    p = subprocess.run([sys.executable, str(converter / "convert_hf_to_gguf.py"), str(root / "hf"),
                        "--outfile", str(files["F32"]), "--outtype", "f32"], capture_output=True,
                       text=True, env=dict(os.environ, PYTHONPATH=str(converter / "gguf-py")))
    assert p.returncode == 0, p.stderr[-2000:]
    for kind in GGUF_KINDS:
        files[kind] = quantize(files["F32"], root / f"{kind}.gguf", kind)
    return hf, files


def test_gguf_f32_matches_transformers(ggufs, tmp_path):
    """llama.cpp's converter writes the MoE block (ffn_gate_inp + .scale, ffn_gate_up_exps,
    ffn_down_exps + .scale, the three extra norms); its F32 file gives transformers' logits."""
    import gguf

    hf, files = ggufs
    names = {t.name for t in gguf.GGUFReader(files["F32"]).tensors}
    assert {"blk.0.ffn_gate_up_exps.weight", "blk.0.ffn_down_exps.scale",
            "blk.0.ffn_gate_inp.scale", "blk.0.pre_ffw_norm_2.weight"} <= names
    model, config = load_model(convert_file(files["F32"], tmp_path / "pkg", progress=False))
    assert (config["num_experts"], config["top_k_experts"], config["moe_intermediate_size"]) == (
        E, K, MOE_I)
    ref, out = hf_logits(hf, PROMPT), edgert_logits(model, PROMPT)
    print(f"gemma4 MoE F32 GGUF: edgert vs transformers {rel_err(out, ref):.2e}")
    assert rel_err(out, ref) < 1e-4
    assert (out.argmax(-1) == ref.argmax(-1)).all()
    assert rel_err(cached_logits(model, PROMPT, 24), out) < 1e-5


@pytest.mark.parametrize("kind", GGUF_KINDS)
def test_gguf_every_tensor_against_gguf_py(ggufs, tmp_path, kind):
    """Each tensor of the quantized file, dequantized by gguf-py (fused gate_up cut in its row
    halves), is the package's tensor: bit for bit where the type maps exactly, within the
    reported error where edgert re-quantizes (Q6_K)."""
    import gguf

    from edgert.convert.gguf_reader import hf_names

    _, files = ggufs
    pkg = convert_file(files[kind], tmp_path / "pkg", progress=False)
    report = json.loads((pkg / "edgert.json").read_text())["tensors"]
    ours = {k: v.numpy() for k, v in dequantized_state_dict(pkg).items()}
    types = set()
    for t in gguf.GGUFReader(files[kind]).tensors:
        if t.name == "rope_freqs.weight":  # read into the config
            continue
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        ref = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
        names = hf_names(t.name, "gemma4_text")
        for name, want in zip(names, np.split(ref, len(names), axis=-2) if len(names) > 1
                              else [ref]):
            entry, got = report[name], ours[name].reshape(want.shape)
            if entry["class"] == "requantized":
                assert np.abs(got - want).max() <= entry["max_abs_error"] * (1 + 1e-6), name
            else:
                assert entry["class"] in ("exact", "f32-scales exact", "float"), (name, entry)
                assert np.array_equal(got, want), name
        if "_exps.weight" in t.name:
            types.add(t.tensor_type.name)
    print(kind, "experts:", sorted(types))
    assert types == {"Q8_0": {"Q8_0"}, "Q4_K_M": {"Q5_0", "Q8_0"}}[kind]


def test_gguf_matches_llama_cpp(ggufs, tmp_path):
    """llama.cpp's logits through the llama_cpp binding, on its F32 file and on its own
    dequantization of the quantized ones (its float path; llama.cpp keeps the KV cache in
    float16): within 1% of the largest logit (measured 0.2%), top-1 identical everywhere."""
    import os

    from test_gemma4 import llama_cpp_logits
    from test_moe_gguf import float_copy
    from testdata import data_file

    os.environ["LLAMA_CPP_LIB_PATH"] = str(data_file("llama.cpp/lib/libllama.so").parent)
    import llama_cpp

    _, files = ggufs
    for kind, path in files.items():
        ours = edgert_logits(load_model(convert_file(path, tmp_path / kind, progress=False))[0],
                             PROMPT)
        if kind != "F32":
            float_copy(path, path := tmp_path / f"{kind}-float.gguf")
        theirs = llama_cpp_logits(llama_cpp, path, PROMPT[0].tolist())
        print(f"gemma4 MoE {kind}: edgert vs llama.cpp {rel_err(ours, theirs):.2e}")
        assert rel_err(ours, theirs) < 1e-2, kind
        assert (ours.argmax(-1) == theirs.argmax(-1)).all(), kind


# ------------------------------------------------------------------ bad input


def test_bad_moe_checkpoints(hf_moe, tmp_path):
    """An expert count the tensors contradict, top-k above the expert count, a missing router:
    one line on the CLI, non-zero exit, nothing written."""
    from test_cli import assert_one_line_error, run
    from test_moe import broken

    folder, _ = hf_moe
    cases = {
        "count": (dict(config={"num_experts": 16}), ["8 experts in the checkpoint", "says 16"]),
        "topk": (dict(config={"top_k_experts": 9}), ["top_k_experts 9", "expert count 8"]),
        "router": (dict(drop="model.layers.3.router.proj.weight"),
                   ["no model.layers.3.router.proj.weight"]),
    }
    for name, (change, words) in cases.items():
        src = broken(folder, tmp_path / name, **change)
        assert_one_line_error(run("convert", str(src), "-o", str(tmp_path / f"{name}.out"),
                                  env_home=tmp_path), *words)
        assert not (tmp_path / f"{name}.out").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_bad_moe_gguf(ggufs, tmp_path):
    """A GGUF whose expert_count the tensors contradict, or whose expert_used_count exceeds
    it: a one-line error naming it, nothing written."""
    from test_moe_gguf_families import with_value

    _, files = ggufs
    cases = {
        "count": (with_value(files["F32"], tmp_path / "count.gguf", "gemma4.expert_count", 16),
                  ["in the file", "from its metadata", "16"]),
        "topk": (with_value(files["F32"], tmp_path / "topk.gguf", "gemma4.expert_used_count", 9),
                 ["top_k_experts 9", "expert count 8"]),
    }
    for what, (path, words) in cases.items():
        with pytest.raises(EdgertError) as e:
            convert_file(path, tmp_path / f"{what}-pkg", progress=False)
        assert all(w in str(e.value) for w in words) and "\n" not in str(e.value), str(e.value)
        assert not (tmp_path / f"{what}-pkg").exists()


def test_moe_needs_its_expert_width(packages, tmp_path):
    dst = shutil.copytree(packages[0], tmp_path / "p")
    cfg = json.loads((dst / "config.json").read_text()) | {"moe_intermediate_size": None}
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EdgertError, match="needs a positive moe_intermediate_size"):
        load_model(dst)


# ------------------------------------------------------------------ info and bench


def test_info_counts_total_and_active_parameters(packages):
    """`edgert info`: every parameter, and those a token reads (k of E experts)."""
    from edgert.info import package_info

    from test_cli import run

    s = package_info(packages[4])
    experts = 8 * 3 * E * MOE_I * 64  # 8 layers, gate/up/down
    hf = transformers.Gemma4ForCausalLM(transformers.Gemma4TextConfig(**moe_config()))
    scalars = sum(b.numel() for n, b in hf.named_buffers() if n.endswith("layer_scalar"))
    assert s["parameters"] == sum(p.numel() for p in hf.parameters()) + scalars
    assert s["active_parameters"] == s["parameters"] - experts + experts * K // E
    assert s["experts"] == f"{K} of {E}"
    info = run("info", str(packages[4]), env_home=packages[4].parent)
    assert info.returncode == 0 and "active parameters" in info.stdout and "2 of 8" in info.stdout


def test_synthetic_26b_a4b_shape_matches_the_model_card():
    """The synthetic Gemma 4 26B-A4B (built lazily: nothing evaluated) has the published
    counts: 25.2 B parameters, 3.8 B active per token (Google counts the tied embedding); its
    cut keeps the 5:1 sliding pattern."""
    from edgert import bench

    model = bench._build(bench.SYNTHETIC["gemma4-26b-a4b"])
    assert bench.weight_bytes(model) // 4 == pytest.approx(25.2e9, rel=0.01)
    assert bench.active_weight_bytes(model) // 4 == pytest.approx(3.8e9, rel=0.01)
    assert [layer.layer_type for layer in model.layers].count("full_attention") == 5
    cut = bench._build(bench.SYNTHETIC["gemma4-26b-a4b"], layers=6)
    assert [layer.layer_type for layer in cut.layers][-2:] == ["sliding_attention",
                                                                "full_attention"]


def test_coreml_refuses_the_moe_block(hf_moe, tmp_path):
    from test_cli import assert_one_line_error, run

    folder, _ = hf_moe
    assert_one_line_error(run("convert", str(folder), "--to", "coreml", "-o",
                              str(tmp_path / "m.mlpackage"), env_home=tmp_path),
                          "mixture-of-experts", "gemma4_text")
    assert not (tmp_path / "m.mlpackage").exists()


def test_gguf_with_gate_and_up_apart(ggufs, tmp_path):
    """llama.cpp's gemma4 loader (src/models/gemma4.cpp) also takes ffn_gate_exps / ffn_up_exps
    apart (its converter writes them fused): such a file (rewritten by gguf-py) makes the same
    package, bit for bit."""
    from test_moe_gguf import rewrite

    _, files = ggufs

    def split(r):
        for t in r.tensors:
            a = np.asarray(t.data, np.float32).reshape([int(d) for d in reversed(t.shape.tolist())])
            if ".ffn_gate_up_exps." in t.name:
                gate, up = np.split(a, 2, axis=-2)
                yield t.name.replace("gate_up_exps", "gate_exps"), np.ascontiguousarray(gate)
                yield t.name.replace("gate_up_exps", "up_exps"), np.ascontiguousarray(up)
            else:
                yield t.name, a

    rewrite(files["F32"], tmp_path / "split.gguf", split)
    a = mx.load(str(convert_file(tmp_path / "split.gguf", tmp_path / "a", progress=False)
                    / "model.safetensors"))
    b = mx.load(str(convert_file(files["F32"], tmp_path / "b", progress=False)
                    / "model.safetensors"))
    assert sorted(a) == sorted(b) and "model.layers.0.experts.switch_glu.up_proj.weight" in a
    assert all(np.array_equal(np.array(a[k]), np.array(b[k])) for k in a)
