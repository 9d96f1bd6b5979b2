"""GGUF -> MLX package: contents, loading by mlx-lm and edgert, agreement with transformers
reading the same GGUF, and one-line errors (with nothing left behind) for bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from edgert.convert.api import convert_file, ensure_package
from edgert.convert.canonical import REQUANTIZED, CanonicalModel, TensorRecord
from edgert.convert.gguf_reader import open_gguf, read_gguf
from edgert.convert.mlx_writer import OutputExistsError, write_mlx_package
from edgert.errors import EdgertError, UnsupportedError
from edgert.package import load_model
from edgert.paths import sha256_file
from test_hf_reader import deq  # MLX's own dequantization

# ------------------------------------------------------------- tiny GGUFs, written like llama.cpp


def llama_cpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute: HF Q/K rows -> GGUF rows."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def tiny_gguf(path: Path, arch: str = "llama", qtype: T = T.Q4_0, types: dict | None = None,
              tie: bool = True, layers: int = 2, hidden: int = 64, heads: int = 4,
              kv_heads: int = 2, ffn: int = 96, vocab: int = 128, head_dim: int | None = None,
              extra: dict[str, np.ndarray] | None = None,
              meta: dict | None = None) -> dict[str, np.ndarray]:
    """Write a random model as a GGUF; returns each tensor's reference dequantization in HF row
    order (GGUF name -> float32). `types` overrides the GGML type per tensor; `extra` adds
    float32 tensors as they are; `meta` adds metadata (str, float32 or uint32 by type)."""
    rng = np.random.default_rng(0)
    hd = head_dim or hidden // heads
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    w.add_rope_dimension_count(hd)
    w.add_vocab_size(vocab)
    w.add_file_type(2)
    if head_dim:
        w.add_key_length(hd)
        w.add_value_length(hd)
    for key, value in (meta or {}).items():
        {str: w.add_string, float: w.add_float32, int: w.add_uint32}[type(value)](key, value)
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,)}
    if not tie:
        shapes["output.weight"] = (vocab, hidden)
    for i in range(layers):
        b = f"blk.{i}."
        shapes |= {b + "attn_norm.weight": (hidden,), b + "ffn_norm.weight": (hidden,),
                   b + "attn_q.weight": (heads * hd, hidden),
                   b + "attn_k.weight": (kv_heads * hd, hidden),
                   b + "attn_v.weight": (kv_heads * hd, hidden),
                   b + "attn_output.weight": (hidden, heads * hd),
                   b + "ffn_gate.weight": (ffn, hidden), b + "ffn_up.weight": (ffn, hidden),
                   b + "ffn_down.weight": (hidden, ffn)}
        if arch == "qwen2":
            shapes |= {b + "attn_q.bias": (heads * hd,), b + "attn_k.bias": (kv_heads * hd,),
                       b + "attn_v.bias": (kv_heads * hd,)}
        if arch == "qwen3":
            shapes |= {b + "attn_q_norm.weight": (hd,), b + "attn_k_norm.weight": (hd,)}
    expected = {}
    for name, shape in shapes.items():
        x = (0.1 * rng.standard_normal(shape) + ("norm" in name)).astype(np.float32)
        t = (types or {}).get(name, qtype if len(shape) == 2 else T.F32)
        if t in (T.Q6_K, T.Q2_K, T.IQ2_XXS, T.IQ3_S, T.NVFP4, T.Q8_K):  # random blocks
            block, size = gguf.GGML_QUANT_SIZES[t]
            raw = rng.integers(0, 256, (shape[0], shape[1] // block * size), dtype=np.uint8)
            w.add_tensor(name, raw, raw_dtype=t)
            continue
        expected[name] = gguf.quants.dequantize(gguf.quants.quantize(x, t), t)
        if arch == "llama" and name.split(".")[-2] in ("attn_q", "attn_k"):
            x = llama_cpp_permute(x, heads if ".attn_q." in name else kv_heads)
        w.add_tensor(name, gguf.quants.quantize(x, t), raw_dtype=t)
    for name, x in (extra or {}).items():
        w.add_tensor(name, x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def dequantized(folder: Path) -> dict[str, np.ndarray]:
    """Every weight of a package as float32 (quantized ones through mx.dequantize)."""
    weights = {}
    for f in folder.glob("model*.safetensors"):
        weights.update(mx.load(str(f)))
    config = json.loads((folder / "config.json").read_text())
    q = config.get("quantization", {})
    out = {}
    for name, v in weights.items():
        if name.endswith((".scales", ".biases")):
            continue
        module = name.removesuffix(".weight")
        if f"{module}.scales" in weights:
            p = q.get(module, q)
            v = mx.dequantize(v, weights[f"{module}.scales"].astype(mx.float32),
                              weights[f"{module}.biases"].astype(mx.float32),
                              group_size=p["group_size"], bits=p["bits"])
        out[name] = np.array(v.astype(mx.float32))
    return out


def assert_no_leftovers(folder: Path) -> None:
    assert not folder.exists() or not list(folder.iterdir())


# ------------------------------------------------------------------ the default model


def test_package_contents(smollm_gguf, smollm_package):
    files = {p.name for p in smollm_package.iterdir()}
    assert {"config.json", "model.safetensors", "edgert.json"} <= files
    assert [p.name for p in smollm_package.parent.iterdir()] == [smollm_package.name]
    config = json.loads((smollm_package / "config.json").read_text())
    assert {k: config[k] for k in (
        "model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
        "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta",
        "max_position_embeddings", "vocab_size", "tie_word_embeddings", "bos_token_id",
        "eos_token_id")} == {
        "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "head_dim": 64, "rms_norm_eps": 1e-5, "rope_theta": 100000.0,
        "max_position_embeddings": 8192, "vocab_size": 49152, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": 2}
    assert config["quantization"] == config["quantization_config"] == {
        "group_size": 32, "bits": 4, "mode": "affine",
        "model.embed_tokens": {"group_size": 32, "bits": 8, "mode": "affine"}}

    meta = json.loads((smollm_package / "edgert.json").read_text())
    assert meta["format_version"] == 1
    assert meta["source"] | {"path": None} == {
        "path": None, "sha256": sha256_file(smollm_gguf), "format": "gguf", "gguf_version": 3,
        "file_type": "MOSTLY_Q4_1", "architecture": "llama",
        "name": "Smollm2 135M 8k Lc100K Mix1 Ep2"}
    reader = open_gguf(smollm_gguf)
    totals = meta["totals"]
    assert totals["parameters"] == sum(t.n_elements for t in reader.tensors) == 134_515_008
    assert {k: v["tensors"] for k, v in totals["by_source_type"].items()} == {
        "Q4_1": 210, "Q8_0": 1, "F32": 61}
    assert 5.8 < totals["bits_per_weight"] < 5.9  # Q4_1 5 bpw, Q8_0 9 bpw (f16 d + bias)
    q = meta["tensors"]["model.layers.0.self_attn.q_proj.weight"]
    assert q == {"source_name": "blk.0.attn_q.weight", "source_type": "Q4_1", "class": "exact",
                 "shape": [576, 576], "max_abs_error": 0.0, "bits_per_weight": 5.0, "bits": 4,
                 "group_size": 32, "mode": "affine", "scale_dtype": "float16"}

    weights = mx.load(str(smollm_package / "model.safetensors"))
    assert weights["model.layers.0.self_attn.q_proj.weight"].dtype == mx.uint32
    assert weights["model.layers.0.self_attn.q_proj.scales"].shape == (576, 18)
    assert weights["model.embed_tokens.biases"].dtype == mx.float16
    assert weights["model.norm.weight"].dtype == mx.float32
    assert len(weights) == 61 + 3 * 211


def test_mlx_lm_loads_the_package(smollm_package):
    import mlx.nn as nn
    from mlx_lm.utils import load_model as mlx_lm_load

    model, _ = mlx_lm_load(Path(smollm_package))
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    assert model.model.embed_tokens.bits == 8
    assert model.model.layers[0].mlp.down_proj.bits == 4
    assert np.isfinite(np.array(model(mx.array([[1, 2, 3]])))).all()


@pytest.fixture(scope="module")
def transformers_smollm(smollm_gguf):
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        smollm_gguf.parent, gguf_file=smollm_gguf.name, dtype=torch.float32)


def test_unpermuted_weights_equal_transformers(smollm_package, transformers_smollm):
    """transformers undoes llama.cpp's Q/K permutation on its own dequantization: ours must
    be the same float32 numbers."""
    ours = dequantized(smollm_package)
    theirs = transformers_smollm.state_dict()
    for i in (0, 13, 29):
        for proj in ("q_proj", "k_proj", "v_proj"):
            name = f"model.layers.{i}.self_attn.{proj}.weight"
            assert np.array_equal(ours[name], theirs[name].numpy()), name
    assert np.array_equal(ours["model.embed_tokens.weight"],
                          theirs["model.embed_tokens.weight"].numpy())


# ------------------------------------------------------------------ each architecture, tiny


@pytest.mark.parametrize("arch, qtype, types, tie, head_dim", [
    ("llama", T.Q4_0, {"blk.1.ffn_down.weight": T.Q8_0, "blk.0.attn_v.weight": T.F16}, True, None),
    ("qwen2", T.Q8_0, {"output.weight": T.Q4_1, "blk.0.attn_q.weight": T.BF16}, False, None),
    # transformers reads no head_dim from a qwen3 GGUF and assumes 128 (as in real Qwen3)
    ("qwen3", T.Q4_1, {"token_embd.weight": T.F16}, True, 128),
])
def test_tiny_models_match_transformers(tmp_path, arch, qtype, types, tie, head_dim):
    """Weights equal the reference dequantization in HF order, and edgert's logits on the
    package equal transformers' on the GGUF (config, names, biases, norms, ties)."""
    import transformers

    src = tmp_path / f"{arch}.gguf"
    expected = tiny_gguf(src, arch, qtype, types, tie=tie, head_dim=head_dim)
    pkg = convert_file(src, tmp_path / "pkg", progress=False)
    cm = read_gguf(src)
    ours = dequantized(pkg)
    for record in cm.tensors():
        assert np.array_equal(ours[record.name], expected[record.source_name]), record.name
    assert len(ours) == len(expected) == cm.tensor_count

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=src.name,
                                                           dtype=torch.float32)
    ids = [[3, 17, 42, 99, 5, 64, 127, 0]]
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits[0].numpy()
    model, config = load_model(pkg)
    assert config["tie_word_embeddings"] == tie
    logits = np.array(model(mx.array(ids)))[0]
    assert np.abs(logits - ref).max() < 1e-4 * np.abs(ref).max()


def test_sharded_package_loads(tmp_path):
    src = tmp_path / "m.gguf"
    tiny_gguf(src)
    pkg = write_mlx_package(read_gguf(src), tmp_path / "pkg", shard_bytes=20_000)
    shards = sorted(p.name for p in pkg.glob("model*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((pkg / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert dequantized(pkg).keys() == dequantized(convert_file(src, tmp_path / "one",
                                                               progress=False)).keys()
    load_model(pkg)


def llama_cpp_rope_factors(theta: float, dims: int, factor: float, low: float, high: float,
                           old_ctx: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.generate_extra_tensors (rope_type "llama3")."""
    freqs = 1.0 / (theta ** (np.arange(0, dims, 2, dtype=np.float32) / dims))
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old_ctx / high:
            factors.append(1)
        elif wavelen > old_ctx / low:
            factors.append(factor)
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


@pytest.mark.parametrize("factor, old_ctx", [(8.0, 8192), (32.0, 8192), (4.0, 4096)])
def test_rope_freqs_become_llama3_rope_scaling(tmp_path, factor, old_ctx):
    src = tmp_path / "m.gguf"
    freqs = llama_cpp_rope_factors(10000.0, 16, factor, 1.0, 4.0, old_ctx)
    tiny_gguf(src, extra={"rope_freqs.weight": freqs})
    cm = read_gguf(src)
    assert cm.config["rope_scaling"] == {
        "rope_type": "llama3", "factor": factor, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": old_ctx}
    assert "rope_freqs" in cm.source["note"]
    assert all(r.source_name != "rope_freqs.weight" for r in cm.tensors())
    load_model(convert_file(src, tmp_path / "pkg", progress=False))

    src.unlink()
    tiny_gguf(src, extra={"rope_freqs.weight": freqs[::-1].copy()})
    with pytest.raises(UnsupportedError, match="rope_freqs"):
        read_gguf(src)


# ------------------------------------------------------------------ output folder handling


def test_existing_output_is_refused_unless_forced(tmp_path):
    src = tmp_path / "m.gguf"
    tiny_gguf(src)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(OutputExistsError, match="already exists"):
        convert_file(src, out, progress=False)
    assert (out / "keep").exists()
    convert_file(src, out, force=True, progress=False)
    assert (out / "config.json").is_file() and not (out / "keep").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "out"]


@pytest.mark.parametrize("error", [KeyboardInterrupt, RuntimeError])
def test_interrupted_write_leaves_nothing(tmp_path, error):
    src = tmp_path / "m.gguf"
    tiny_gguf(src)
    cm = read_gguf(src)

    def tensors():
        for i, record in enumerate(cm.tensors()):
            if i == 5:
                raise error("stop")
            yield record

    broken = CanonicalModel(cm.config, tensors, cm.tensor_count, {}, cm.source)
    with pytest.raises(error):
        write_mlx_package(broken, tmp_path / "out" / "pkg", on_tensor=lambda r: None)
    assert_no_leftovers(tmp_path / "out")


def test_ensure_package(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGERT_HOME", str(tmp_path / "home"))
    src = tmp_path / "m.gguf"
    tiny_gguf(src)
    pkg = ensure_package(src, progress=False)
    assert pkg.parent == tmp_path / "home" / "models" and (pkg / "config.json").is_file()
    stamp = (pkg / "model.safetensors").stat().st_mtime_ns
    assert ensure_package(str(src)) == pkg
    assert (pkg / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not rebuilt
    assert ensure_package(pkg) == pkg
    monkeypatch.setattr("edgert.convert.api.default_model_gguf", lambda: src)
    assert ensure_package(None) == pkg
    with pytest.raises(EdgertError, match="no such file"):
        ensure_package(tmp_path / "nope.gguf")
    with pytest.raises(EdgertError, match="no config.json"):
        ensure_package(tmp_path / "home")
    (tmp_path / "w.bin").write_bytes(b"1234")
    with pytest.raises(EdgertError, match="expected a .gguf file"):
        ensure_package(tmp_path / "w.bin")


# ------------------------------------------------------------------ bad input


def patched(src: Path, dst: Path, edit) -> Path:
    """Copy `src` to `dst` and edit it through gguf-py's writable memory map."""
    dst.write_bytes(src.read_bytes())
    r = gguf.GGUFReader(dst, "r+")
    edit(r)
    r.data.flush()
    return dst


@pytest.fixture
def tiny(tmp_path) -> Path:
    src = tmp_path / "tiny.gguf"
    tiny_gguf(src, layers=1)
    return src


def assert_refused(src: Path, tmp_path: Path, *words: str, kind=EdgertError) -> None:
    """convert_file fails with a one-line error containing `words`, leaving no output."""
    out = tmp_path / "out" / "pkg"
    with pytest.raises(kind) as e:
        convert_file(src, out, progress=False)
    message = str(e.value)
    assert "\n" not in message
    for w in words:
        assert w in message, message
    assert_no_leftovers(tmp_path / "out")


def test_missing_path(tmp_path):
    assert_refused(tmp_path / "nope.gguf", tmp_path, "nope.gguf", "no such file")


def test_not_a_gguf(tmp_path):
    src = tmp_path / "notes.gguf"
    src.write_text("this is not a gguf file at all\n" * 10)
    assert_refused(src, tmp_path, "not a GGUF file")
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    assert_refused(empty, tmp_path, "not a GGUF file")


def test_bad_magic(tiny, tmp_path):
    data = bytearray(tiny.read_bytes())
    data[:4] = b"GGML"
    tiny.write_bytes(bytes(data))
    assert_refused(tiny, tmp_path, "bad magic")


def test_unsupported_version(tiny, tmp_path):
    data = bytearray(tiny.read_bytes())
    data[4:8] = (7).to_bytes(4, "little")
    tiny.write_bytes(bytes(data))
    assert_refused(tiny, tmp_path, "GGUF version 7", kind=UnsupportedError)


@pytest.mark.parametrize("keep", [10, 30, 200, 2000])
def test_truncated_header(tiny, tmp_path, keep):
    tiny.write_bytes(tiny.read_bytes()[:keep])
    assert_refused(tiny, tmp_path, str(tiny))


def test_truncated_tensor_data(smollm_gguf, tmp_path):
    src = tmp_path / "cut.gguf"
    src.write_bytes(smollm_gguf.read_bytes()[: 2 * smollm_gguf.stat().st_size // 3])
    assert_refused(src, tmp_path, "beyond the end of the file", "truncated")


def test_tensor_offset_beyond_file(tiny, tmp_path):
    def edit(r):
        r.tensors[-1].field.parts[-1][0] = 1 << 40
    assert_refused(patched(tiny, tmp_path / "far.gguf", edit), tmp_path,
                   r"tensor blk.0.ffn_down.weight", "beyond the end of the file")


def test_absurd_string_length(tiny, tmp_path):
    def edit(r):
        r.fields["general.architecture"].parts[3][0] = 1 << 62  # the string's length
    assert_refused(patched(tiny, tmp_path / "s.gguf", edit), tmp_path, "past the end")


def test_absurd_counts(tiny, tmp_path):
    def edit(r):
        r.fields["GGUF.tensor_count"].parts[0][0] = 1 << 50
    assert_refused(patched(tiny, tmp_path / "c.gguf", edit), tmp_path, "cannot fit")

    big = tmp_path / "array.gguf"
    w = gguf.GGUFWriter(big, "llama")
    w.add_array("general.tags", list(range(5)))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.close()

    def edit_array(r):
        r.fields["general.tags"].parts[4][0] = 1 << 60  # element count; would loop ~forever
    assert_refused(patched(big, tmp_path / "a.gguf", edit_array), tmp_path, "cannot fit")


def test_unknown_architecture(tmp_path):
    src = tmp_path / "gpt2.gguf"
    tiny_gguf(src, arch="gpt2", layers=1)
    assert_refused(src, tmp_path, "unknown architecture 'gpt2'", kind=UnsupportedError)


@pytest.mark.parametrize("qtype", [T.IQ2_XXS, T.IQ3_S], ids=lambda t: t.name)
def test_unsupported_tensor_type(tmp_path, qtype):
    src = tmp_path / "k.gguf"
    tiny_gguf(src, layers=1, hidden=256, heads=4, kv_heads=4, ffn=256,
              types={"blk.0.ffn_down.weight": qtype})
    assert_refused(src, tmp_path, f"tensor blk.0.ffn_down.weight has type {qtype.name}, "
                   "not supported yet", kind=UnsupportedError)


def test_requantize_takes_what_gguf_py_dequantizes(tmp_path):
    """--requantize lets through any type gguf-py can dequantize (NVFP4 here, which has no MLX
    mapping), held to gguf-py's dequantization; a type gguf-py cannot read (Q8_K) is refused
    up front, naming the tensor."""
    src = tmp_path / "nvfp4.gguf"  # ffn 128: whole NVFP4 blocks of 64 per row
    tiny_gguf(src, layers=1, ffn=128, types={"blk.0.ffn_down.weight": T.NVFP4})
    assert_refused(src, tmp_path, "blk.0.ffn_down.weight has type NVFP4", kind=UnsupportedError)
    raw = next(t for t in gguf.GGUFReader(src).tensors if t.name == "blk.0.ffn_down.weight")
    ref = gguf.quants.dequantize(raw.data, T.NVFP4)
    rec = next(r for r in read_gguf(src, requantize=True).tensors()
               if r.name == "model.layers.0.mlp.down_proj.weight")
    assert rec.mapping == REQUANTIZED and (rec.value.bits, rec.value.group_size) == (4, 64)
    err = np.abs(deq(rec.value) - ref).max()
    assert rec.max_abs_error == pytest.approx(err) and err <= np.abs(rec.value.scales).max()

    src = tmp_path / "q8k.gguf"
    tiny_gguf(src, layers=1, hidden=256, heads=4, kv_heads=4, ffn=256,
              types={"blk.0.ffn_down.weight": T.Q8_K})
    with pytest.raises(UnsupportedError, match="tensor blk.0.ffn_down.weight: gguf-py cannot "
                                               "dequantize Q8_K either"):
        read_gguf(src, requantize=True)


def test_unknown_tensor_type_id(tiny, tmp_path):
    def edit(r):
        r.tensors[0].field.parts[4][0] = 99
    assert_refused(patched(tiny, tmp_path / "t.gguf", edit), tmp_path, "GGML type id 99",
                   kind=UnsupportedError)


def test_unknown_tensor_name(tmp_path):
    src = tmp_path / "extra.gguf"
    w = gguf.GGUFWriter(src, "llama")
    for key, value in {"block_count": 1, "embedding_length": 32, "feed_forward_length": 32,
                       "attention.head_count": 2, "vocab_size": 4}.items():
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_tensor("blk.0.attn_weird.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    assert_refused(src, tmp_path, "tensor blk.0.attn_weird.weight has no llama counterpart",
                   kind=UnsupportedError)


# ------------------------------------------------------------------ other sources, tokenizer


def test_convert_file_reads_hf_folders(tmp_path):
    import transformers

    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=128, tie_word_embeddings=False)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(tmp_path / "hf")
    pkg = convert_file(tmp_path / "hf", tmp_path / "pkg", progress=False)
    meta = json.loads((pkg / "edgert.json").read_text())
    assert meta["tensors"]["model.layers.0.mlp.down_proj.weight"]["class"] == "requantized"
    load_model(pkg)
    with pytest.raises(EdgertError, match="without config.json"):
        convert_file(tmp_path, tmp_path / "pkg2", progress=False)


def test_tokenizer_files_are_written(smollm_gguf, smollm_package):
    files = read_gguf(smollm_gguf).tokenizer_files
    assert files
    for name, data in files.items():
        assert (smollm_package / name).read_bytes() == data
