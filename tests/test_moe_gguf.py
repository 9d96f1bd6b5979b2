"""Qwen3-MoE GGUFs made by llama.cpp's own tools from a random transformers model: its
convert_hf_to_gguf.py (from the llama-cpp-python sdist, with its vendored gguf-py) writes the
F32 file, llama-quantize makes the quantized ones. edgert's package is held to transformers
(F32), to gguf-py's dequantization of every expert (exact types, bit for bit) and to
llama.cpp's logits (the peer, through the llama_cpp binding).

The random model has a 256-byte BPE vocabulary with a few merges; the converter's check of
the pre-tokenizer's hash (which only knows published tokenizers) is told "qwen2"."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers

from edgert.convert.api import convert_file
from edgert.package import load_model
from test_gguf_types import ggml_dequantize
from test_hf_reader import rel_err
from testdata import data_file

SDIST = "llama_cpp_python-0.3.36"
CONFIG = dict(vocab_size=512, hidden_size=256, intermediate_size=512, moe_intermediate_size=256,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
              num_experts=8, num_experts_per_tok=2, norm_topk_prob=True,
              tie_word_embeddings=False, max_position_embeddings=256)
IDS = [int(i) for i in np.random.default_rng(3).integers(0, 256, 30)]
EXPERTS = ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")

CONVERT = """
import sys
root = sys.argv.pop(1)
sys.path[:0] = [root, root + "/gguf-py"]
import convert_hf_to_gguf as c
for mod in list(sys.modules.values()):
    for cls in [v for v in vars(mod).values() if isinstance(v, type)] if mod else []:
        if "get_vocab_base_pre" in vars(cls):
            cls.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
sys.argv[0] = "convert_hf_to_gguf.py"
c.main()
"""


def byte_bpe_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    merges = [(a, b) for a in "etaoin" for b in "etaoinshr"]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok).save_pretrained(folder)


@pytest.fixture(scope="module")
def llama_cpp_src(tmp_path_factory) -> Path:
    """convert_hf_to_gguf.py, conversion/ and gguf-py/ from the sdist."""
    out = tmp_path_factory.mktemp("llama_cpp_src")
    prefix = f"{SDIST}/vendor/llama.cpp/"
    with tarfile.open(data_file(f"{SDIST}.tar.gz")) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(prefix) and (
            m.name.startswith((prefix + "conversion/", prefix + "gguf-py/"))
            or m.name == prefix + "convert_hf_to_gguf.py")]
        tar.extractall(out, members=members, filter="data")
    return out / prefix


@pytest.fixture(scope="module")
def ggufs(llama_cpp_src, tmp_path_factory):
    """(transformers model, {"F32": path, "Q4_K_M": path, "Q8_0": path})."""
    root = tmp_path_factory.mktemp("moe_gguf")
    torch.manual_seed(0)
    hf = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**CONFIG)).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
            elif "experts" in n or n.endswith("mlp.gate.weight"):
                p.normal_(0, 0.1)
    hf.save_pretrained(root / "hf")
    byte_bpe_tokenizer(root / "hf")
    files = {"F32": root / "f32.gguf"}
    (root / "convert.py").write_text(CONVERT)
    subprocess.run([sys.executable, str(root / "convert.py"), str(llama_cpp_src),
                    str(root / "hf"), "--outfile", str(files["F32"]), "--outtype", "f32"],
                   check=True, capture_output=True)
    files["F32-fused"] = root / "f32-fused.gguf"
    fuse_gate_up(files["F32"], files["F32-fused"])
    quantize = data_file("llama.cpp/bin/llama-quantize")
    for t, src in (("Q4_K_M", "F32"), ("Q8_0", "F32"), ("Q4_K_M-fused", "F32-fused")):
        files[t] = root / f"{t}.gguf"
        subprocess.run([str(quantize), str(files[src]), str(files[t]), t.split("-")[0]],
                       check=True, capture_output=True)
    return hf, files


def rewrite(src: Path, dst: Path, tensors) -> None:
    """`src`'s metadata with the tensors `tensors(reader)` yields as (name, array), by gguf-py."""
    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(dst, r.fields["general.architecture"].contents())
    for f in r.fields.values():
        if not f.name.startswith("GGUF.") and f.name != "general.architecture":
            array = f.types[0] == gguf.GGUFValueType.ARRAY
            w.add_key_value(f.name, f.contents(), f.types[0], f.types[-1] if array else None)
    for name, a in tensors(r):
        w.add_tensor(name, a)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def fuse_gate_up(src: Path, dst: Path) -> None:
    """An F32 file with each layer's gate and up experts as one ffn_gate_up_exps (E, 2I, H),
    gate rows first, as llama.cpp's convert_hf_to_gguf.py --fuse-gate-up-exps writes it (for
    the architectures it fuses: qwen35moe, qwen3next, ...; it refuses qwen3moe)."""
    def tensors(r):
        by_name = {t.name: np.asarray(t.data, np.float32).reshape(
            [int(d) for d in reversed(t.shape.tolist())]) for t in r.tensors}
        for name, a in by_name.items():
            if ".ffn_up_exps." in name:
                continue
            if ".ffn_gate_exps." in name:
                up = by_name[name.replace("gate_exps", "up_exps")]
                yield name.replace("gate_exps", "gate_up_exps"), np.concatenate([a, up], axis=1)
            else:
                yield name, a

    rewrite(src, dst, tensors)


def edgert_logits(package: Path) -> np.ndarray:
    model, _ = load_model(package)
    return np.array(model(mx.array([IDS])))[0]  # (T, vocab)


def test_f32_gguf_matches_transformers(ggufs, tmp_path):
    hf, files = ggufs
    package = convert_file(files["F32"], tmp_path / "pkg", progress=False)
    config = json.loads((package / "config.json").read_text())
    assert (config["model_type"], config["num_experts"], config["num_experts_per_tok"],
            config["moe_intermediate_size"]) == ("qwen3_moe", 8, 2, 256)
    with torch.no_grad():
        ref = hf(torch.tensor([IDS])).logits[0].numpy()
    got = edgert_logits(package)
    assert rel_err(got, ref) < 1e-4
    assert np.array_equal(got.argmax(-1), ref.argmax(-1))


def stacked_dequantized(w: dict, module: str, spec: dict) -> np.ndarray:
    """(E, out, in) float32: MLX's dequantization of each expert of a stacked tensor."""
    s, b = (w[f"{module}.{x}"].astype(mx.float32) for x in ("scales", "biases"))
    return np.stack([np.array(mx.dequantize(w[f"{module}.weight"][e], s[e], b[e],
                                            group_size=spec["group_size"], bits=spec["bits"]))
                     for e in range(s.shape[0])])


@pytest.mark.parametrize("type_name", ["Q4_K_M", "Q8_0"])
def test_expert_types_bit_exact(ggufs, tmp_path, type_name):
    _, files = ggufs
    package = convert_file(files[type_name], tmp_path / "pkg", progress=False)
    report = json.loads((package / "edgert.json").read_text())["tensors"]
    q = json.loads((package / "config.json").read_text())["quantization"]
    w = mx.load(str(package / "model.safetensors"))
    seen = set()
    for t in gguf.GGUFReader(files[type_name]).tensors:
        if not t.name.startswith("blk.") or t.name.split(".")[2] not in EXPERTS:
            continue
        layer, part = t.name.split(".")[1:3]
        module = f"model.layers.{layer}.mlp.switch_mlp.{part[4:-5]}_proj"
        entry = report[f"{module}.weight"]
        assert entry["experts"] == 8 and entry["shape"] == [8, 256, 256]
        ref = gguf.quants.dequantize(t.data, t.tensor_type).reshape(8, 256, 256)
        got = stacked_dequantized(w, module, q.get(module, q))
        if t.tensor_type.name in ("Q4_K", "Q8_0"):  # exact mappings: bit for bit
            assert entry["class"] in ("exact", "f32-scales exact"), entry
            assert np.array_equal(got, ref), t.name
        else:  # Q6_K has no exact MLX layout: re-quantized per expert, the error reported
            assert entry["class"] == "requantized" and entry["bits"] == 8, entry
            assert 0 < np.abs(got - ref).max() <= entry["max_abs_error"] * (1 + 1e-6)
        seen.add(t.tensor_type.name)
    assert seen == ({"Q8_0"} if type_name == "Q8_0" else {"Q4_K", "Q6_K"})


@pytest.mark.parametrize("type_name", ["F32", "Q4_K_M"])
def test_fused_gate_up_exps(ggufs, tmp_path, type_name):
    """A ffn_gate_up_exps file (fused by gguf-py as llama.cpp fuses them; llama-quantize
    quantizes its rows as it does the unfused ones) converts to the same package, bit for bit."""
    _, files = ggufs
    names = {t.name for t in gguf.GGUFReader(files[f"{type_name}-fused"]).tensors}
    assert "blk.0.ffn_gate_up_exps.weight" in names and "blk.0.ffn_up_exps.weight" not in names
    fused = convert_file(files[f"{type_name}-fused"], tmp_path / "fused", progress=False)
    plain = convert_file(files[type_name], tmp_path / "plain", progress=False)
    a, b = (mx.load(str(p / "model.safetensors")) for p in (fused, plain))
    assert sorted(a) == sorted(b)
    for k in a:
        assert np.array_equal(np.array(a[k]), np.array(b[k])), k
    report = json.loads((fused / "edgert.json").read_text())["tensors"]
    up = report["model.layers.0.mlp.switch_mlp.up_proj.weight"]
    assert up["source_name"] == "blk.0.ffn_gate_up_exps.weight" and "rows 2 of 2" in up["note"]


def float_copy(src: Path, dst: Path) -> None:
    """`src` with every quantized tensor replaced by llama.cpp's own dequantization (libggml's
    to_float), expert tensors included."""
    def tensors(r):
        for t in r.tensors:
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))
            if t.tensor_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
                yield t.name, np.asarray(t.data, np.float32).reshape(shape)
            else:
                rows = int(np.prod(shape[:-1]))
                flat = ggml_dequantize(np.asarray(t.data).reshape(rows, -1), int(t.tensor_type),
                                       (rows, shape[-1]))
                yield t.name, flat.reshape(shape)

    rewrite(src, dst, tensors)


def llama_cpp_logits(path: Path) -> np.ndarray:
    os.environ["LLAMA_CPP_LIB_PATH"] = str(data_file("llama.cpp/lib/libllama.so").parent)
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, logits_all=True,
                          n_threads=2, verbose=False, seed=0)
    try:
        llm.eval(IDS)
        return np.array(llm.scores[:len(IDS)], dtype=np.float32)
    finally:
        llm.close()


def test_llama_cpp_peer(ggufs, tmp_path):
    """On llama.cpp's float path (its own dequantization of the Q4_K_M file): the same top-1
    everywhere, within 1% of the largest logit. On its quantized path (8-bit activations,
    float16 KV; within ~5% for dense models, tests/test_llama_cpp_peer.py) a few positions
    differ far more: where the rounded activations flip a router's choice of experts, that
    token runs other experts (measured: 3 of 30 positions at 22-42%, the other 27 within
    5%). So there: within 8% at 85% of the positions, and the same top-1 at 85%."""
    _, files = ggufs
    ours = edgert_logits(convert_file(files["Q4_K_M"], tmp_path / "pkg", progress=False))
    float_copy(files["Q4_K_M"], tmp_path / "f32.gguf")
    exact = llama_cpp_logits(tmp_path / "f32.gguf")
    assert np.array_equal(ours.argmax(-1), exact.argmax(-1))
    assert rel_err(ours, exact) < 0.01
    theirs = llama_cpp_logits(files["Q4_K_M"])
    per_position = np.abs(ours - theirs).max(-1) / np.abs(theirs).max()
    print(f"llama.cpp quantized path: per-position error {np.round(per_position, 3)}")
    assert (per_position < 0.08).mean() >= 0.85
    assert (ours.argmax(-1) == theirs.argmax(-1)).mean() >= 0.85
