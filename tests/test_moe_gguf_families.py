"""GGUFs of the MoE families beyond qwen3moe, made by llama.cpp's own tools from random
transformers models: `qwen35moe` (Qwen3.5's hybrid layers, routed experts, a shared expert),
`gpt-oss` (sinks, biases, sliding layers, yarn, MXFP4 experts) and `qwen3next` (Qwen3-Next's
fused linear-attention projections, which llama.cpp splits, and Qwen3.5-MoE's experts).
convert_hf_to_gguf.py (the llama-cpp-python sdist's, with its gguf-py) writes the F32 file
once per module, llama-quantize the Q8_0, Q4_K_M and MXFP4_MOE ones.

Oracles: transformers on the F32 file's weights (1e-4, top-1 identical); gguf-py's
dequantization of every tensor of the quantized files (exact types bit for bit, the
architecture's transform applied); llama.cpp through the llama_cpp binding on its float path
(its own dequantization of the quantized file), top-1 identical; mlx-lm on the package.
qwen3next's packages are mlx-lm's layout (edgert.models.qwen3_next.package_tensors)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers

from edgert.convert.api import convert_file
from edgert.convert.gguf_reader import hf_names
from edgert.errors import EdgertError
from edgert.models import architecture
from edgert.models.cache import make_cache
from edgert.package import load_model
from test_hf_reader import rel_err
from test_moe_gguf import float_copy, rewrite
from test_qwen3_5 import _RUN_CONVERTER, llama_cpp_converter, llama_cpp_logits  # noqa: F401
from test_qwen3_5 import write_char_tokenizer
from testdata import data_file

L, F = "linear_attention", "full_attention"
# widths of 256 so that llama-quantize's K-quants reach the experts (rows of 256 weights)
QWEN35MOE = dict(hidden_size=256, intermediate_size=256, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=64, linear_conv_kernel_dim=4,
                 linear_key_head_dim=32, linear_value_head_dim=32, linear_num_key_heads=2,
                 linear_num_value_heads=4, num_experts=8, num_experts_per_tok=2,
                 moe_intermediate_size=256, shared_expert_intermediate_size=256,
                 num_hidden_layers=3, layer_types=[L, F, L], tie_word_embeddings=False,
                 rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                  "partial_rotary_factor": 0.5})
# Qwen3-Next: llama.cpp's qwen3next has no dense layers (every layer routes)
QWEN3NEXT = dict(QWEN35MOE, rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                             "partial_rotary_factor": 0.25})
YARN = {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 4.0, "beta_fast": 32.0,
        "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 64}
GPT_OSS = dict(hidden_size=256, intermediate_size=256, num_hidden_layers=4,
               num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_local_experts=8,
               num_experts_per_tok=2, sliding_window=8, max_position_embeddings=256,
               rope_parameters=YARN)
FAMILIES = {  # llama.cpp architecture: (transformers class, config class, config, model_type)
    "qwen35moe": ("Qwen3_5MoeForCausalLM", "Qwen3_5MoeTextConfig", QWEN35MOE, "qwen3_5_moe"),
    "gpt-oss": ("GptOssForCausalLM", "GptOssConfig", GPT_OSS, "gpt_oss"),
    "qwen3next": ("Qwen3NextForCausalLM", "Qwen3NextConfig", QWEN3NEXT, "qwen3_next"),
}
# random Qwen checkpoints have no MTP layers
CONVERTER_FLAGS = {"qwen35moe": ["--no-mtp"], "qwen3next": ["--no-mtp"]}
QUANT_TYPES = ("Q8_0", "Q4_K_M", "MXFP4_MOE")
EXPERT_TYPES = {"Q8_0": {"Q8_0"}, "Q4_K_M": {"Q4_K", "Q6_K"}, "MXFP4_MOE": {"MXFP4"}}
IDS = [int(i) for i in np.random.default_rng(4).integers(0, 100, 40)]  # crosses gpt-oss' window


def random_model(arch: str, folder: Path):
    """A random transformers model of the family, saved with a 100-token BPE tokenizer; norms,
    experts, routers, gates, sinks and biases moved off their initial values."""
    cls, config_cls, config, _ = FAMILIES[arch]
    vocab = write_char_tokenizer(folder, merge=True)
    torch.manual_seed(0)
    model = getattr(transformers, cls)(getattr(transformers, config_cls)(
        **config, vocab_size=vocab)).float().eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith(("dt_bias", "A_log")):
                p.add_(torch.randn_like(p) * 0.1)
            elif "sinks" in n:
                p.normal_(0, 0.5)
            elif ("experts" in n or "router" in n or n.endswith("bias")
                  or n.endswith(("mlp.gate.weight", "shared_expert_gate.weight"))):
                p.normal_(0, 0.1)
    model.save_pretrained(folder)
    return model


def llama_cpp_gguf(converter: Path, hf_folder: Path, out: Path, *flags: str) -> Path:
    """The F32 GGUF llama.cpp's convert_hf_to_gguf.py makes of an HF folder."""
    r = subprocess.run([sys.executable, "-c", _RUN_CONVERTER, str(converter), str(hf_folder),
                        "--outfile", str(out), "--outtype", "f32", *flags],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return out


def quantize(src: Path, dst: Path, kind: str) -> Path:
    lib = data_file("llama.cpp/lib/libllama.so").parent
    r = subprocess.run([str(data_file("llama.cpp/bin/llama-quantize")), str(src), str(dst), kind],
                       capture_output=True, text=True, env={"LD_LIBRARY_PATH": str(lib)})
    assert r.returncode == 0, r.stderr[-2000:]
    return dst


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, llama_cpp_converter, tmp_path_factory):
    """(llama.cpp architecture, transformers model, {"F32" | quant type: GGUF path})."""
    arch = request.param
    root = tmp_path_factory.mktemp(arch)
    (root / "hf").mkdir()
    hf = random_model(arch, root / "hf")
    files = {"F32": llama_cpp_gguf(llama_cpp_converter, root / "hf", root / "F32.gguf",
                                   *CONVERTER_FLAGS.get(arch, []))}
    for kind in QUANT_TYPES:
        files[kind] = quantize(files["F32"], root / f"{kind}.gguf", kind)
    return arch, hf, files


def hf_logits(hf, ids=IDS) -> np.ndarray:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].numpy()


def edgert_logits(model, ids=IDS) -> np.ndarray:
    return np.array(model(mx.array([ids])))[0]  # (T, vocab)


def test_f32_gguf_matches_transformers(family, tmp_path):
    """The F32 file: transformers' logits within 1e-4, top-1 identical; cached decode equals
    the uncached run."""
    arch, hf, files = family
    model, config = load_model(convert_file(files["F32"], tmp_path / "pkg", progress=False))
    assert config["model_type"] == FAMILIES[arch][3]
    assert config.get("num_experts", config.get("num_local_experts")) == 8
    assert config["num_experts_per_tok"] == 2
    ref, got = hf_logits(hf), edgert_logits(model)
    print(f"{arch} F32: transformers vs edgert {rel_err(got, ref):.2e}")
    assert rel_err(got, ref) < 1e-4
    assert np.array_equal(got.argmax(-1), ref.argmax(-1))
    cache = make_cache(model)
    steps = [np.array(model(mx.array([IDS[:24]]), cache=cache))[0]]
    steps += [np.array(model(mx.array([IDS[t:t + 1]]), cache=cache))[0] for t in range(24, 40)]
    assert rel_err(np.concatenate(steps), got) < 1e-5


def package_floats(package: Path) -> dict[str, np.ndarray]:
    """Every tensor of a package as float32: quantized ones dequantized by MLX (per expert for
    stacked ones), in the mode the package's config gives them."""
    w = mx.load(str(package / "model.safetensors"))
    q = json.loads((package / "config.json").read_text()).get("quantization", {})
    out = {}
    for k, v in w.items():
        module = k.removesuffix(".weight")
        if k.endswith((".scales", ".biases")):
            continue
        if f"{module}.scales" not in w:
            out[k] = np.array(v.astype(mx.float32))
            continue
        spec = q.get(module, q)
        s, b = w[f"{module}.scales"], w.get(f"{module}.biases")

        def one(wq, s, b):
            return mx.dequantize(wq, s if spec.get("mode") == "mxfp4" else s.astype(mx.float32),
                                 None if b is None else b.astype(mx.float32),
                                 group_size=spec["group_size"], bits=spec["bits"],
                                 mode=spec.get("mode", "affine")).astype(mx.float32)
        parts = [one(v[e], s[e], None if b is None else b[e]) for e in range(v.shape[0])] \
            if v.ndim == 3 else [one(v, s, b)]
        out[k] = np.array(mx.stack(parts) if v.ndim == 3 else parts[0])
    return out


def qkvz_rows(config: dict, part: str) -> np.ndarray:
    """Where in_proj_qkv's rows ([q, k, v] of all key heads) or in_proj_z's sit in HF's fused
    in_proj_qkvz, which holds per key head [q (Dk), k (Dk), v (r*Dv), z (r*Dv)]."""
    n_k, dk = config["linear_num_key_heads"], config["linear_key_head_dim"]
    rv = config["linear_num_value_heads"] // n_k * config["linear_value_head_dim"]
    head = (np.arange(n_k) * (2 * dk + 2 * rv))[:, None]  # each key head's first row
    if part == "z":
        return (head + 2 * dk + rv + np.arange(rv)).ravel()
    q, k, v = head + np.arange(dk), head + dk + np.arange(dk), head + 2 * dk + np.arange(rv)
    return np.concatenate([q.ravel(), k.ravel(), v.ravel()])


ZERO_CENTRED = ("input_layernorm.weight", "post_attention_layernorm.weight",
                "model.norm.weight", "q_norm.weight", "k_norm.weight")


def in_package(arch: str, name: str, want: np.ndarray, ours: dict, config: dict):
    """(package tensor name, the package's value of HF tensor `name`, `want` as the package
    holds it). qwen3next's packages are mlx-lm's layout: the zero-centred norms as 1 + w,
    conv1d (C, K, 1), in_proj_qkv and in_proj_z as rows of in_proj_qkvz."""
    if arch != "qwen3next":
        return name, ours[name].reshape(want.shape), want
    if name.endswith(ZERO_CENTRED):
        return name, ours[name], want + np.float32(1)
    if name.endswith("conv1d.weight"):
        return name, ours[name], want.swapaxes(1, 2)
    for part in ("qkv", "z"):
        if name.endswith(f"in_proj_{part}.weight"):
            fused = name.replace(f"in_proj_{part}.", "in_proj_qkvz.")
            return fused, ours[fused][qkvz_rows(config, part)], want
    return name, ours[name].reshape(want.shape), want


@pytest.mark.parametrize("kind", QUANT_TYPES)
def test_every_tensor_against_gguf_py(family, tmp_path, kind):
    """Each tensor of the quantized file, dequantized by gguf-py and put in HF's convention by
    the architecture's transform, is the package's tensor: bit for bit for the exact types
    (MXFP4 and Q8_0 experts, Q4_K, ...), within the reported error where edgert re-quantizes
    (Q6_K)."""
    arch, _, files = family
    package = convert_file(files[kind], tmp_path / "pkg", progress=False)
    config = json.loads((package / "config.json").read_text())
    report = json.loads((package / "edgert.json").read_text())["tensors"]
    module = architecture(config["model_type"])
    ours = package_floats(package)
    experts = set()
    for t in gguf.GGUFReader(files[kind]).tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        ref = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
        names = hf_names(t.name, config["model_type"])
        for name, part in zip(names, np.split(ref, len(names), axis=-2) if len(names) > 1
                              else [ref]):
            out = module.GGUF.transform(name, part, config)
            want = out[0] if isinstance(out, tuple) else out
            stored, got, want = in_package(arch, name, want, ours, config)
            entry = report[stored]
            if entry["class"] == "requantized":
                assert np.abs(got - want).max() <= entry["max_abs_error"] * (1 + 1e-6), name
            else:
                assert entry["class"] in ("exact", "f32-scales exact", "widened", "float"), (
                    name, entry)
                assert np.array_equal(got, want), name
        if "_exps.weight" in t.name:
            experts.add(t.tensor_type.name)
    print(arch, kind, "experts:", sorted(experts))
    assert experts == EXPERT_TYPES[kind]


def test_llama_cpp_peer(family, tmp_path):
    """llama.cpp on its F32 file and on its own dequantization of the quantized files (its
    float path) against edgert's packages of the same files: logits within 1% of the largest;
    top-1 identical at every position where every tensor maps exactly (F32, Q8_0, MXFP4_MOE).
    Q4_K_M's Q6_K tensors are re-quantized to 8 bits (their error reported), which can flip a
    near tie: there at 95% of the positions."""
    arch, _, files = family
    for kind in ("F32", "Q8_0", "MXFP4_MOE", "Q4_K_M"):
        model, _ = load_model(convert_file(files[kind], tmp_path / kind, progress=False))
        ours = edgert_logits(model)
        path = files[kind]
        if kind != "F32":
            float_copy(files[kind], path := tmp_path / f"{kind}-float.gguf")
        theirs = llama_cpp_logits(path, IDS)
        same = (ours.argmax(-1) == theirs.argmax(-1)).mean()
        print(f"{arch} {kind}: llama.cpp vs edgert {rel_err(ours, theirs):.2e}, top-1 {same:.3f}")
        assert rel_err(ours, theirs) < 1e-2, kind
        assert same >= (0.95 if kind == "Q4_K_M" else 1.0), kind


@pytest.mark.parametrize("kind", ["F32", "MXFP4_MOE", "Q4_K_M"])
def test_mlx_lm_same_logits(family, tmp_path, kind):
    """mlx-lm loads the package converted from the GGUF and gives edgert's logits. gpt-oss:
    mlx-lm's YaRN always truncates its correction range, so both read the package with
    `truncate: true` there. qwen3next: the package is mlx-lm's layout (norms 1 + w, conv1d
    (C, K, 1), llama.cpp's attn_qkv and attn_gate joined back into in_proj_qkvz: in Q4_K_M
    they are Q8_0 and Q4_K, joined at 8 bits with float32 scales, exactly)."""
    from mlx_lm.utils import load_model as mlx_lm_load

    arch, _, files = family
    package = convert_file(files[kind], tmp_path / "pkg", progress=False)
    config = json.loads((package / "config.json").read_text())
    for key in ("rope_parameters", "rope_scaling"):
        if (config.get(key) or {}).get("rope_type") == "yarn":
            config[key]["truncate"] = True
    (package / "config.json").write_text(json.dumps(config))
    ours, _ = load_model(package)
    theirs, _ = mlx_lm_load(package)
    theirs.set_dtype(mx.float32)
    got, want = edgert_logits(ours), edgert_logits(theirs)
    print(f"{arch} {kind}: mlx-lm vs edgert {rel_err(got, want):.2e}")
    assert rel_err(got, want) < 1e-4
    if arch == "qwen3next" and kind == "Q4_K_M":
        entry = json.loads((package / "edgert.json").read_text())["tensors"][
            "model.layers.0.linear_attn.in_proj_qkvz.weight"]
        assert (entry["source_type"], entry["bits"], entry["scale_dtype"]) == (
            "Q8_0 + Q4_K", 8, "float32"), entry


@pytest.mark.parametrize("family", ["qwen35moe", "qwen3next"], indirect=True)
def test_fused_gate_up_exps(family, llama_cpp_converter, tmp_path):
    """The converter's --fuse-gate-up-exps (one ffn_gate_up_exps (E, 2I, H), gate rows first),
    as F32 and quantized by llama-quantize, converts to the unfused file's package bit for bit."""
    arch, _, files = family
    hf_folder = files["F32"].parent / "hf"
    fused = {"F32": llama_cpp_gguf(llama_cpp_converter, hf_folder, tmp_path / "fused.gguf",
                                   *CONVERTER_FLAGS.get(arch, []), "--fuse-gate-up-exps")}
    fused["Q8_0"] = quantize(fused["F32"], tmp_path / "fused-Q8_0.gguf", "Q8_0")
    names = {t.name for t in gguf.GGUFReader(fused["F32"]).tensors}
    assert "blk.0.ffn_gate_up_exps.weight" in names and "blk.0.ffn_up_exps.weight" not in names
    for kind, path in fused.items():
        a = mx.load(str(convert_file(path, tmp_path / f"{kind}-fused", progress=False)
                        / "model.safetensors"))
        b = mx.load(str(convert_file(files[kind], tmp_path / kind, progress=False)
                        / "model.safetensors"))
        assert sorted(a) == sorted(b)
        for k in a:
            assert np.array_equal(np.array(a[k]), np.array(b[k])), (kind, k)


def without(src: Path, dst: Path, drop: str) -> Path:
    """An F32 GGUF without tensor `drop` (rewritten by gguf-py)."""
    def tensors(r):
        for t in r.tensors:
            if t.name != drop:
                yield t.name, np.asarray(t.data, np.float32).reshape(
                    [int(d) for d in reversed(t.shape.tolist())])

    rewrite(src, dst, tensors)
    return dst


def with_value(src: Path, dst: Path, key: str, value: int) -> Path:
    """An F32 GGUF with metadata `key` set to `value` (rewritten by gguf-py)."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, r.fields["general.architecture"].contents())
    for f in r.fields.values():
        if not f.name.startswith("GGUF.") and f.name != "general.architecture":
            array = f.types[0] == gguf.GGUFValueType.ARRAY
            w.add_key_value(f.name, value if f.name == key else f.contents(), f.types[0],
                            f.types[-1] if array else None)
    for t in r.tensors:
        w.add_tensor(t.name, np.asarray(t.data, np.float32).reshape(
            [int(d) for d in reversed(t.shape.tolist())]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


MISSING = {  # per family: (a tensor to drop, a metadata key to remove)
    "qwen35moe": ("blk.0.ffn_gate_inp_shexp.weight", "expert_shared_feed_forward_length"),
    "gpt-oss": ("blk.1.attn_sinks.weight", "attention.sliding_window"),
    "qwen3next": ("blk.2.ffn_gate_inp.weight", "expert_used_count"),
}


def test_bad_moe_gguf(family, llama_cpp_converter, tmp_path):
    """A GGUF without a tensor the model needs (a shared-expert gate, sinks, a router), without
    an expert / window key, with an expert count the tensors contradict or a top-k above the
    expert count: a one-line error naming it, nothing written."""
    from test_cli import assert_one_line_error, run

    arch, _, files = family
    tensor, key = MISSING[arch]
    layer = tensor.split(".")[1]
    cases = {
        "tensor": (without(files["F32"], tmp_path / "no-tensor.gguf", tensor),
                   [f"model.layers.{layer}.", "no tensor for"]),
        "key": (tmp_path / "no-key.gguf", [f"{arch}.{key}"]),
        "count": (with_value(files["F32"], tmp_path / "count.gguf", f"{arch}.expert_count", 16),
                  ["shape [8, 256, 256] in the file, [16, 256, 256] from its metadata"]),
        "topk": (with_value(files["F32"], tmp_path / "topk.gguf", f"{arch}.expert_used_count",
                            9), ["num_experts_per_tok 9", "expert count 8"]),
    }
    script = llama_cpp_converter / "gguf-py/gguf/scripts/gguf_new_metadata.py"
    r = subprocess.run([sys.executable, str(script), str(files["F32"]), str(cases["key"][0]),
                        "--force", "--remove-metadata", f"{arch}.{key}"], capture_output=True,
                       text=True, env={**os.environ,
                                       "PYTHONPATH": str(llama_cpp_converter / "gguf-py")})
    assert r.returncode == 0, r.stderr[-2000:]
    for what, (path, words) in cases.items():
        with pytest.raises(EdgertError) as e:
            convert_file(path, tmp_path / f"{what}-pkg", progress=False)
        assert all(w in str(e.value) for w in words) and "\n" not in str(e.value), str(e.value)
        assert not (tmp_path / f"{what}-pkg").exists()
    assert_one_line_error(run("convert", str(cases["tensor"][0]), "-o", str(tmp_path / "cli"),
                              env_home=tmp_path), *cases["tensor"][1])
    assert not (tmp_path / "cli").exists()


@pytest.mark.parametrize("family", ["qwen3next"], indirect=True)
def test_qwen3next_packages_written_before_still_load(family, tmp_path, monkeypatch):
    """A qwen3next package as edgert wrote it before its layout was mlx-lm's (attn_qkv and
    attn_gate apart as in_proj_qkv / in_proj_z, conv1d (C, 1, K), norms w) still loads, with
    the same logits as the package written now."""
    from edgert.models import qwen3_next

    _, _, files = family
    new, _ = load_model(convert_file(files["Q4_K_M"], tmp_path / "new", progress=False))
    monkeypatch.delattr(qwen3_next, "package_tensors")
    package = convert_file(files["Q4_K_M"], tmp_path / "old", progress=False)
    monkeypatch.undo()
    names = set(mx.load(str(package / "model.safetensors")))
    assert "model.layers.0.linear_attn.in_proj_qkv.weight" in names
    assert "model.layers.0.linear_attn.in_proj_qkvz.weight" not in names
    old, _ = load_model(package)
    assert rel_err(edgert_logits(old), edgert_logits(new)) < 1e-5
