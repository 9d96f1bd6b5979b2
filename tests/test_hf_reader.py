"""The HF safetensors reader against the formats' documented layouts and transformers.

Random-initialised transformers models are saved as float checkpoints, or packed here in the
GPTQ (AutoGPTQ `QuantLinear.pack`), AWQ (AutoAWQ GEMM) and BitNet (transformers'
`pack_weights`) layouts. Exact classes must dequantize bit for bit to the format's reference
`s * (q - z)`, and the edgert runtime on the converted tensors must give transformers' logits
(on the reference float weights) within 1e-4.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
import torch
import transformers
from mlx.utils import tree_flatten
from safetensors.torch import load_file, save_file

from edgert.convert.canonical import (EXACT, F32_SCALES_EXACT, FLOAT, REQUANTIZED, WIDENED,
                                      CanonicalModel, QuantTensor)
from edgert.convert.hf_reader import pack_rows, read_hf_folder, unpack_rows
from edgert.layers import BitLinear, swap_layers
from edgert.models import get_classes, qwen3
from edgert.package import apply_quantization, load_model, load_weights, read_config

SMALL = dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256, max_position_embeddings=256)
CONFIGS = {
    "llama": (transformers.LlamaConfig, dict(SMALL, tie_word_embeddings=False, mlp_bias=True)),
    "mistral": (transformers.MistralConfig, dict(SMALL, head_dim=32)),
    "qwen2": (transformers.Qwen2Config, dict(SMALL, tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, dict(SMALL, head_dim=32, tie_word_embeddings=False)),
    "bitnet": (transformers.BitNetConfig, dict(SMALL)),
    "gemma3": (transformers.Gemma3TextConfig, dict(SMALL, head_dim=32, sliding_window=8,
                                                   sliding_window_pattern=2)),
}
LINEARS = tuple(f"{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                        "up_proj", "down_proj"))
IDS = np.random.default_rng(0).integers(0, SMALL["vocab_size"], size=(1, 24))


def hf_model(arch: str, dtype=torch.float32, round_to_f16: bool = False):
    """A random transformers model with random biases and norm weights."""
    cfg_cls, kw = CONFIGS[arch]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg_cls(**kw), dtype=torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
            if round_to_f16:
                p.copy_(p.half().float())
    return model.to(dtype).eval()


def hf_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.float().numpy()


def with_weights(model, weights: dict[str, np.ndarray]):
    """A float32 copy of `model` with some weights replaced."""
    model = copy.deepcopy(model).float()
    missing = set(weights) - set(model.state_dict())
    assert not missing, missing
    model.load_state_dict({k: torch.from_numpy(np.asarray(v, np.float32)) for k, v in
                           weights.items()}, strict=False)
    return model


def save_package(cm: CanonicalModel, folder: Path) -> None:
    """A minimal MLX package writer for these tests (the real one is convert/mlx_writer.py)."""
    folder.mkdir(exist_ok=True)
    weights, quant = {}, {}
    for r in cm.tensors():
        if isinstance(r.value, QuantTensor):
            m, t = r.name.removesuffix(".weight"), r.value
            weights |= {f"{m}.weight": t.w_q, f"{m}.scales": t.scales, f"{m}.biases": t.biases}
            quant[m] = {"bits": t.bits, "group_size": t.group_size, "mode": t.mode}
        else:
            weights[r.name] = r.value
    mx.save_safetensors(str(folder / "model.safetensors"),
                        {k: mx.array(v) for k, v in weights.items()})
    config = dict(cm.config)
    if quant:
        config["quantization"] = {**next(iter(quant.values())), **quant}
    (folder / "config.json").write_text(json.dumps(config))


def load_package(folder: Path) -> nn.Module:
    """edgert.package.load_model plus the hook the loader needs (edgert.layers.swap_layers)."""
    config = read_config(folder)
    model_cls, args_cls = get_classes(config["model_type"])
    model = model_cls(args_cls.from_dict(config))
    weights = model.sanitize(load_weights(folder))
    if (q := config.get("quantization")) is not None:
        apply_quantization(model, q, weights)
    swap_layers(model, weights, config)
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return model


def edgert_logits(cm: CanonicalModel, folder: Path) -> np.ndarray:
    save_package(cm, folder)
    return np.array(load_package(folder)(mx.array(IDS)))


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def deq(t: QuantTensor) -> np.ndarray:
    """MLX's own dequantization, in float32."""
    return np.array(mx.dequantize(mx.array(t.w_q), mx.array(t.scales.astype(np.float32)),
                                  mx.array(t.biases.astype(np.float32)), group_size=t.group_size,
                                  bits=t.bits))


def records(cm: CanonicalModel) -> dict:
    recs = {r.name: r for r in cm.tensors()}
    assert len(recs) == cm.tensor_count
    return recs


# ------------------------------------------------------------------ bit packing


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 8])
def test_pack_rows_is_mlx_layout(bits):
    rng = np.random.default_rng(bits)
    w = mx.array(rng.normal(size=(8, 256)).astype(np.float32))
    w_q, s, b = mx.quantize(w, group_size=64, bits=bits)
    codes = unpack_rows(np.array(w_q), bits)
    assert codes.shape == (8, 256) and codes.max() < 2**bits
    assert np.array_equal(pack_rows(codes, bits), np.array(w_q))
    ref = np.array(s).repeat(64, 1) * codes + np.array(b).repeat(64, 1)
    assert np.array_equal(ref, np.array(mx.dequantize(w_q, s, b, group_size=64, bits=bits)))


# ------------------------------------------------------------------ float checkpoints


@pytest.mark.parametrize("arch,dtype", [("llama", torch.float16), ("qwen2", torch.bfloat16),
                                        ("gemma3", torch.float32),
                                        ("qwen3", torch.float32), ("mistral", torch.float16)])
def test_float_checkpoint_is_quantized_with_measured_error(tmp_path, arch, dtype):
    hf = hf_model(arch, dtype)
    hf.save_pretrained(tmp_path / "hf")
    source = {k: v.float().numpy() for k, v in hf.state_dict().items()}
    cm = read_hf_folder(tmp_path / "hf")
    recs = records(cm)
    assert "quantization_config" not in cm.config and cm.source["format"] == "hf-float"
    dequantized = {}
    for name, r in recs.items():
        if not isinstance(r.value, QuantTensor):
            assert r.mapping == FLOAT
            assert np.array_equal(r.value.astype(np.float32), source[name])
            # float16 kept, bfloat16 widened to float32
            assert r.value.dtype == (np.float16 if dtype == torch.float16 else np.float32)
            continue
        t = r.value
        assert (r.mapping, t.bits, t.group_size, t.scales.dtype) == (REQUANTIZED, 4, 64, np.float16)
        dequantized[name] = deq(t)
        assert r.max_abs_error == np.abs(dequantized[name] - source[name]).max() > 0
    assert sum(n.endswith(LINEARS) for n in dequantized) == 14
    assert "model.embed_tokens.weight" in dequantized
    ref = hf_logits(with_weights(hf, dequantized))
    assert rel_err(edgert_logits(cm, tmp_path / "pkg"), ref) < 1e-4


def test_float_checkpoint_beyond_float16_keeps_float32_scales(tmp_path):
    """A float32 checkpoint whose weights reach 1e6 (float16 stops at 65504): scales stored in
    float16 would be inf, so that tensor keeps float32 scales and biases and still dequantizes
    close to the source; the others stay float16."""
    hf = hf_model("llama", torch.float32)
    big = "model.layers.0.mlp.down_proj.weight"
    with torch.no_grad():
        hf.state_dict()[big].mul_(1e7)
    hf.save_pretrained(tmp_path / "hf")
    source = hf.state_dict()[big].numpy()
    assert np.abs(source).max() > 65504
    recs = records(read_hf_folder(tmp_path / "hf"))
    t = recs[big].value
    assert t.scales.dtype == t.biases.dtype == np.float32
    err = np.abs(deq(t) - source).max()
    assert np.isfinite(err) and recs[big].max_abs_error == err
    assert err <= np.abs(t.scales).max()  # within one quantization step (inf/NaN in float16)
    assert recs["model.layers.0.mlp.up_proj.weight"].value.scales.dtype == np.float16


def test_overrides_patterns_and_float(tmp_path):
    hf = hf_model("llama")
    hf.save_pretrained(tmp_path / "hf")
    overrides = {"model.embed_tokens": {"bits": 8, "group_size": 32}, "*.down_proj": {"bits": 0},
                 "lm_head": {"bits": 6, "group_size": 128}, "model.layers.1.*": {"bits": 3}}
    cm = read_hf_folder(tmp_path / "hf", bits=2, overrides=overrides)
    recs = records(cm)

    def spec(name):
        v = recs[name].value
        return (v.bits, v.group_size) if isinstance(v, QuantTensor) else recs[name].mapping

    assert spec("model.embed_tokens.weight") == (8, 32)
    assert spec("lm_head.weight") == (6, 128)
    assert spec("model.layers.0.mlp.down_proj.weight") == FLOAT
    assert spec("model.layers.1.mlp.down_proj.weight") == FLOAT  # first matching pattern wins
    assert spec("model.layers.0.self_attn.q_proj.weight") == (2, 64)
    assert spec("model.layers.1.self_attn.q_proj.weight") == (3, 64)
    weights = {n: deq(r.value) for n, r in recs.items() if isinstance(r.value, QuantTensor)}
    assert rel_err(edgert_logits(cm, tmp_path / "pkg"), hf_logits(with_weights(hf, weights))) < 1e-4

    float_cm = read_hf_folder(tmp_path / "hf", bits=0)
    assert all(r.mapping == FLOAT for r in float_cm.tensors())
    assert rel_err(edgert_logits(float_cm, tmp_path / "pkg32"), hf_logits(hf)) < 1e-4

    with pytest.raises(Exception, match="bits"):
        read_hf_folder(tmp_path / "hf", bits=7)


def test_sharded_checkpoint_and_tokenizer_files(tmp_path):
    hf = hf_model("qwen2")
    hf.save_pretrained(tmp_path, max_shard_size="200KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    files = {"tokenizer.json": b'{"model": {}}', "tokenizer_config.json": b"{}",
             "chat_template.jinja": b"{{ messages }}", "generation_config.json": b"{}"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    cm = read_hf_folder(tmp_path, bits=0)
    assert cm.tokenizer_files == files
    recs = records(cm)
    state = {k: v.numpy() for k, v in hf.state_dict().items() if k != "lm_head.weight"}  # tied
    assert set(recs) == set(state)
    assert all(np.array_equal(recs[k].value, v) for k, v in state.items())


# ------------------------------------------------------------------ GPTQ


def gptq_quantize(w: np.ndarray, bits: int, g_idx: np.ndarray, sym: bool):
    """Round-to-nearest with GPTQ's `Quantizer.find_params` grid: w (out, in) ->
    q (out, in), scales (n_groups, out) float16, zeros (n_groups, out)."""
    maxq, n_groups = 2**bits - 1, g_idx.max() + 1
    scales = np.zeros((n_groups, w.shape[0]), np.float16)
    zeros = np.zeros((n_groups, w.shape[0]), np.int64)
    for k in range(n_groups):
        wk = w[:, g_idx == k]
        xmin, xmax = np.minimum(wk.min(1), 0), np.maximum(wk.max(1), 0)
        if sym:
            xmax = np.maximum(-xmin, xmax)
            xmin = np.where(xmin < 0, -xmax, xmin)
        scales[k] = (xmax - xmin) / maxq
        zeros[k] = np.full_like(xmax, (maxq + 1) // 2) if sym else np.round(-xmin / scales[k])
    zeros = np.clip(zeros, 1, maxq)  # gptq v1 stores z - 1, so z = 0 has no encoding
    s = scales.astype(np.float32)[g_idx].T
    q = np.clip(np.round(w / s) + zeros[g_idx].T, 0, maxq).astype(np.uint32)
    return q, scales, zeros


def autogptq_pack(intweight: np.ndarray, bits: int) -> np.ndarray:
    """AutoGPTQ `QuantLinear.pack` (qlinear_cuda_old.py), line for line: (n, m) -> (n*bits/32, m),
    packed along axis 0."""
    intweight = intweight.astype(np.uint32)
    qweight = np.zeros((intweight.shape[0] // 32 * bits, intweight.shape[1]), dtype=np.uint32)
    i = row = 0
    while row < qweight.shape[0]:
        if bits in (2, 4, 8):
            for j in range(i, i + (32 // bits)):
                qweight[row] |= intweight[j] << (bits * (j - i))
            i += 32 // bits
            row += 1
        else:
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i))
            i += 10
            qweight[row] |= intweight[i] << 30
            row += 1
            qweight[row] |= (intweight[i] >> 2) & 1
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 1)
            i += 10
            qweight[row] |= intweight[i] << 31
            row += 1
            qweight[row] |= (intweight[i] >> 1) & 0x3
            i += 1
            for j in range(i, i + 10):
                qweight[row] |= intweight[j] << (3 * (j - i) + 2)
            i += 10
            row += 1
    return qweight.view(np.int32)


def make_g_idx(in_features: int, group: int, kind: str, rng) -> np.ndarray:
    if kind == "act-order":  # desc_act: columns in a random order, then group_size per group
        g_idx = np.empty(in_features, np.int32)
        g_idx[rng.permutation(in_features)] = np.arange(in_features) // group
        return g_idx
    if kind == "uneven":
        return np.sort(rng.integers(0, in_features // group, in_features)).astype(np.int32)
    return (np.arange(in_features) // group).astype(np.int32)


def quantized_checkpoint(hf, folder: Path, quantization_config: dict, pack) -> dict:
    """Save `hf` with every projection replaced by `pack(name, w)` tensors (other tensors f16);
    returns the reference float32 weight of each projection."""
    sd, refs = {}, {}
    for name, p in hf.state_dict().items():
        if name.endswith(LINEARS):
            tensors, refs[name] = pack(name, p.numpy())
            sd |= {f"{name.removesuffix('weight')}{k}": torch.from_numpy(v) for k, v in
                   tensors.items()}
        else:
            sd[name] = p.half()
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, folder / "model.safetensors")
    config = hf.config.to_dict() | {"quantization_config": quantization_config}
    (folder / "config.json").write_text(json.dumps(config))
    return refs


@pytest.mark.parametrize("arch,bits,group,g_kind,sym,fmt", [
    ("llama", 4, 128, "plain", True, "gptq"),
    ("qwen2", 4, 64, "act-order", False, "gptq"),
    ("qwen3", 3, 32, "act-order", False, "gptq"),
    ("mistral", 3, 128, "plain", True, "gptq"),
    ("llama", 2, 64, "plain", False, "gptq_v2"),
    ("qwen2", 8, 128, "act-order", True, "gptq"),
    ("qwen3", 4, -1, "plain", True, "gptq"),
    ("llama", 4, 32, "uneven", False, "gptq"),
])
def test_gptq(tmp_path, arch, bits, group, g_kind, sym, fmt):
    hf = hf_model(arch, round_to_f16=True)
    rng = np.random.default_rng(bits)
    packed = {}

    def pack(name, w):
        G = w.shape[1] if group == -1 else group
        g_idx = make_g_idx(w.shape[1], G, g_kind, rng)
        q, s, z = gptq_quantize(w, bits, g_idx, sym)
        stored_z = z - (1 if fmt == "gptq" else 0)
        packed[name] = g_idx
        ref = s.astype(np.float32)[g_idx].T * (q.astype(np.float32) - z[g_idx].T)
        return {"qweight": autogptq_pack(q.T, bits), "qzeros": autogptq_pack(stored_z.T, bits).T,
                "scales": s, "g_idx": g_idx}, ref.astype(np.float32)

    qcfg = {"quant_method": "gptq", "bits": bits, "group_size": group, "sym": sym,
            "desc_act": g_kind == "act-order", "checkpoint_format": fmt}
    refs = quantized_checkpoint(hf, tmp_path / "gptq", qcfg, pack)
    cm = read_hf_folder(tmp_path / "gptq")
    assert cm.source["format"] == "hf-gptq" and "quantization_config" not in cm.config
    recs = records(cm)
    for name, ref in refs.items():
        r, module = recs[name], name.removesuffix(".weight")
        w = deq(r.value)
        if g_kind == "uneven":  # no contiguous groups: re-quantized from the reference
            assert r.mapping == REQUANTIZED and (f"{module}.input_perm" not in recs)
            assert r.max_abs_error == np.abs(w - ref).max() > 0
            continue
        # float16 biases -z*s where they are exact (always for symmetric zero points)
        assert r.mapping == (EXACT if r.value.scales.dtype == np.float16 else F32_SCALES_EXACT)
        assert r.max_abs_error == 0 and (r.mapping == EXACT or not sym)
        assert r.value.bits == bits and r.value.group_size == min(w.shape[1] if group == -1
                                                                 else group, 128)
        if g_kind == "act-order" and w.shape[1] > group:  # one group needs no permutation
            perm = recs[f"{module}.input_perm"].value
            assert np.array_equal(np.sort(perm), np.arange(w.shape[1]))
            assert np.array_equal(packed[name][perm], np.arange(w.shape[1]) // group)
            w = w[:, np.argsort(perm)]
        else:
            assert f"{module}.input_perm" not in recs
        assert np.array_equal(w, ref)  # bit-exact against s * (q - z) in float32
    if g_kind == "uneven":
        refs = {n: deq(recs[n].value) for n in refs}
    assert rel_err(edgert_logits(cm, tmp_path / "pkg"), hf_logits(with_weights(hf, refs))) < 1e-4


def test_gptq_requantized_on_request(tmp_path):
    hf = hf_model("llama", round_to_f16=True)
    rng = np.random.default_rng(0)

    def pack(name, w):
        q, s, z = gptq_quantize(w, 4, make_g_idx(w.shape[1], 128, "plain", rng), sym=True)
        ref = s.astype(np.float32).repeat(128, 0).T * (q.astype(np.float32) - z.repeat(128, 0).T)
        return {"qweight": autogptq_pack(q.T, 4), "qzeros": autogptq_pack((z - 1).T, 4).T,
                "scales": s}, ref  # no g_idx: the trivial one

    qcfg = {"quant_method": "gptq", "bits": 4, "group_size": 128, "sym": True, "desc_act": False}
    refs = quantized_checkpoint(hf, tmp_path / "gptq", qcfg, pack)
    recs = records(read_hf_folder(tmp_path / "gptq", bits=8, group_size=32,
                                  overrides={"*.o_proj": {"bits": 0}, "*.up_proj": {"bits": 4}}))
    for name, ref in refs.items():
        r = recs[name]
        if ".o_proj" in name:
            assert r.mapping == EXACT and np.array_equal(r.value, ref)  # dequantized float32
        elif ".up_proj" in name:  # 4-bit g32 asked, the source is 4-bit g128: re-quantized
            assert (r.mapping, r.value.bits, r.value.group_size) == (REQUANTIZED, 4, 32)
        else:
            assert (r.mapping, r.value.bits, r.value.group_size) == (REQUANTIZED, 8, 32)
            assert r.max_abs_error == np.abs(deq(r.value) - ref).max()
    assert recs["model.embed_tokens.weight"].value.bits == 8  # float tensors follow `bits`


# ------------------------------------------------------------------ AWQ


AWQ_ORDER_MAP = [0, 2, 4, 6, 1, 3, 5, 7]


def awq_pack(intweight: np.ndarray) -> np.ndarray:
    """AutoAWQ `WQLinear_GEMM.from_linear`, line for line: (rows, cols) -> (rows, cols/8) int32."""
    intweight = intweight.astype(np.uint32)
    packed = np.zeros((intweight.shape[0], intweight.shape[1] // 8), dtype=np.uint32)
    for col in range(intweight.shape[1] // 8):
        for i in range(8):
            packed[:, col] |= intweight[:, col * 8 + AWQ_ORDER_MAP[i]] << (i * 4)
    return packed.view(np.int32)


@pytest.mark.parametrize("arch,group", [("qwen2", 128), ("llama", 64), ("qwen3", 32)])
def test_awq(tmp_path, arch, group):
    from mlx_lm.utils import _transform_awq_weights

    hf = hf_model(arch, round_to_f16=True)
    packed = {}

    def pack(name, w):  # AutoAWQ's asymmetric grid: zeros in 0..15, w = (q - z) * s
        wg = w.reshape(w.shape[0], -1, group)
        wmin, wmax = wg.min(-1), wg.max(-1)
        s = np.maximum(wmax - wmin, 1e-5) / 15
        z = np.clip(np.round(-wmin / s), 0, 15)
        s16 = s.astype(np.float16)
        q = np.clip(np.round(wg / s16[..., None].astype(np.float32)) + z[..., None], 0, 15)
        q = q.reshape(w.shape)
        ref = (q.reshape(wg.shape) - z[..., None]) * s16[..., None].astype(np.float32)
        tensors = {"qweight": awq_pack(q.T), "qzeros": awq_pack(z.T), "scales": s16.T.copy()}
        packed[name] = tensors
        return tensors, ref.reshape(w.shape).astype(np.float32)

    qcfg = {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True,
            "version": "gemm"}
    refs = quantized_checkpoint(hf, tmp_path / "awq", qcfg, pack)
    recs = records(read_hf_folder(tmp_path / "awq"))
    for name, ref in refs.items():
        r = recs[name]
        assert r.mapping in (EXACT, F32_SCALES_EXACT) and r.max_abs_error == 0
        assert np.array_equal(deq(r.value), ref)
        # mlx-lm's own AWQ conversion agrees on the packed codes and the scales
        theirs, _ = _transform_awq_weights({f"m.{k}": mx.array(v) for k, v in
                                            packed[name].items()}, qcfg)
        assert np.array_equal(r.value.w_q, np.array(theirs["m.weight"]))
        assert np.array_equal(r.value.scales.astype(np.float32),
                              np.array(theirs["m.scales"]).astype(np.float32))
    cm = read_hf_folder(tmp_path / "awq")
    assert rel_err(edgert_logits(cm, tmp_path / "pkg"), hf_logits(with_weights(hf, refs))) < 1e-4


# ------------------------------------------------------------------ BitNet


@pytest.fixture
def eager_torch():
    """transformers' BitLinear is @torch.compile'd; run it eagerly."""
    with torch._dynamo.config.patch(disable=True):
        yield


def bitnet_checkpoint(hf, folder: Path, linear_class: str) -> None:
    """Ternarize every projection (BitNet's absmean), pack with transformers' `pack_weights`."""
    from transformers.integrations.bitnet import pack_weights

    sd = {}
    for name, p in hf.state_dict().items():
        if name.endswith(LINEARS):
            absmean = p.abs().mean()
            ternary = (p / absmean).round().clamp(-1, 1).to(torch.int8)
            sd[name] = pack_weights(ternary.clone())
            scale = 1 / absmean if linear_class == "bitlinear" else absmean  # divide / multiply
            sd[name.replace(".weight", ".weight_scale")] = scale.reshape(1)
        else:
            sd[name] = p
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, folder / "model.safetensors")
    qcfg = {"quant_method": "bitnet", "linear_class": linear_class, "quantization_mode": "offline"}
    (folder / "config.json").write_text(json.dumps(hf.config.to_dict() | {
        "quantization_config": qcfg}))


@pytest.mark.parametrize("arch,linear_class", [("bitnet", "bitlinear"), ("llama", "bitlinear"),
                                               ("bitnet", "autobitlinear")])
def test_bitnet(tmp_path, eager_torch, arch, linear_class):
    from transformers.integrations.bitnet import unpack_weights

    bitnet_checkpoint(hf_model(arch), tmp_path / "bitnet", linear_class)
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bitnet",
                                                                  dtype=torch.float32)
    cls = {"bitlinear": "BitLinear", "autobitlinear": "AutoBitLinear"}[linear_class]
    assert type(ref_model.model.layers[0].mlp.down_proj).__name__ == cls

    cm = read_hf_folder(tmp_path / "bitnet")
    assert cm.config["bitnet"]["weight_scale"] == {"bitlinear": "divide",
                                                   "autobitlinear": "multiply"}[linear_class]
    recs = records(cm)
    packed = load_file(tmp_path / "bitnet" / "model.safetensors")
    for name, r in recs.items():
        if name.endswith(LINEARS):
            assert r.mapping == EXACT and r.value.bits == 2
            ternary = unpack_weights(packed[name], dtype=torch.float32).numpy()
            assert np.array_equal(deq(r.value), ternary)
        elif name.endswith("weight_scale"):
            assert np.array_equal(r.value, packed[name].numpy())
    model_dir = tmp_path / "pkg"
    ours = edgert_logits(cm, model_dir)
    assert isinstance(load_package(model_dir).model.layers[0].mlp.down_proj, BitLinear)
    assert rel_err(ours, hf_logits(ref_model)) < 1e-4


# ------------------------------------------------------------------ MLX packages


QWEN3 = dict(model_type="qwen3", hidden_size=128, num_hidden_layers=2, intermediate_size=256,
             num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=384,
             rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True,
             max_position_embeddings=256)


def mlx_package(folder: Path, bits: int, group_size: int, scale_dtype) -> dict[str, mx.array]:
    """A random MLX package (PrismML-style for bits 1 and 2), embedding at 8 bits."""
    mx.random.seed(bits)
    model = qwen3.Model(qwen3.ModelArgs.from_dict(QWEN3))
    override = {"group_size": 64, "bits": 8, "mode": "affine"}
    nn.quantize(model, group_size, bits, class_predicate=lambda p, m: (
        override if p == "model.embed_tokens" else hasattr(m, "to_quantized")))
    weights = {k: v.astype(scale_dtype) if k.endswith(("scales", "biases")) else v
               for k, v in tree_flatten(model.parameters())}
    folder.mkdir()
    mx.save_safetensors(str(folder / "model.safetensors"), weights)
    quant = {"group_size": group_size, "bits": bits, "mode": "affine",
             "model.embed_tokens": override}
    (folder / "config.json").write_text(json.dumps(
        dict(QWEN3, quantization=quant, quantization_config=quant)))
    return weights


@pytest.mark.parametrize("bits,group,scale_dtype", [(1, 128, mx.float16), (2, 64, mx.float16),
                                                    (4, 32, mx.bfloat16), (3, 64, mx.float32)])
def test_mlx_package_copied(tmp_path, bits, group, scale_dtype):
    source = mlx_package(tmp_path / "mlx", bits, group, scale_dtype)
    cm = read_hf_folder(tmp_path / "mlx")
    assert "quantization" not in cm.config and cm.source["format"] == "hf-mlx"
    recs = records(cm)
    for name, r in recs.items():
        if isinstance(r.value, QuantTensor):
            m = name.removesuffix(".weight")
            assert r.mapping == (WIDENED if scale_dtype == mx.bfloat16 else EXACT)
            spec = (8, 64) if "embed" in m else (bits, group)
            assert (r.value.bits, r.value.group_size) == spec
            assert np.array_equal(r.value.w_q, np.array(source[name]))
            for k in ("scales", "biases"):
                assert np.array_equal(getattr(r.value, k).astype(np.float32),
                                      np.array(source[f"{m}.{k}"].astype(mx.float32)))
        else:
            assert r.mapping == FLOAT and np.array_equal(r.value, np.array(source[name]))
    original, _ = load_model(tmp_path / "mlx")
    assert np.array_equal(edgert_logits(cm, tmp_path / "pkg"), np.array(original(mx.array(IDS))))


def test_mlx_package_requantized(tmp_path):
    source = mlx_package(tmp_path / "mlx", 4, 64, mx.float16)
    recs = records(read_hf_folder(tmp_path / "mlx", bits=2, group_size=32,
                                  overrides={"model.embed_tokens": {"bits": 8, "group_size": 64}}))
    embed = recs["model.embed_tokens.weight"]
    assert embed.mapping == EXACT and embed.value.bits == 8  # as in the source: copied
    for name, r in recs.items():
        if name.endswith(LINEARS):
            m = name.removesuffix(".weight")
            ref = np.array(mx.dequantize(source[name], source[f"{m}.scales"].astype(mx.float32),
                                         source[f"{m}.biases"].astype(mx.float32), 64, 4))
            assert (r.mapping, r.value.bits, r.value.group_size) == (REQUANTIZED, 2, 32)
            assert r.max_abs_error == np.abs(deq(r.value) - ref).max() > 0


# ------------------------------------------------------------------ errors


def test_unsupported_sources(tmp_path):
    hf_model("llama").save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    for qcfg, message in [({"quant_method": "bitsandbytes"}, "bitsandbytes"),
                          ({"quant_method": "awq", "version": "gemv"}, "gemv"),
                          ({"quant_method": "gptq", "checkpoint_format": "marlin"}, "marlin")]:
        (tmp_path / "config.json").write_text(json.dumps(config | {"quantization_config": qcfg}))
        with pytest.raises(Exception, match=message):
            read_hf_folder(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(config | {"model_type": "gpt2"}))
    with pytest.raises(Exception, match="gpt2"):
        read_hf_folder(tmp_path)
