"""Mixture of experts (Qwen3-MoE) against transformers and mlx-lm.

Random-initialised transformers Qwen3-MoE models (8 experts, top-2; dense layers through
mlp_only_layers and decoder_sparse_step; norm_topk_prob on and off) are saved per expert (as
save_pretrained writes them) or fused (transformers' in-memory gate_up_proj / down_proj
layout), converted by edgert, and run: float logits within 1e-4 of transformers with the same
top-1, 4-bit ones within 1e-4 of transformers on the dequantized weights, cached decode equal
to the uncached forward, expert sorting on and off the same, mlx-lm's logits on the package.
"""

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
from edgert.generation import generate_step
from edgert.models.cache import make_cache
from edgert.package import load_model
from test_cli import assert_one_line_error, run
from test_hf_reader import deq, rel_err

VOCAB = 256
BASE = dict(vocab_size=VOCAB, hidden_size=128, intermediate_size=128, moe_intermediate_size=64,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=8,
            num_experts_per_tok=2, tie_word_embeddings=False, max_position_embeddings=256)
CONFIGS = {  # name -> (config, checkpoint layout)
    "dense-layer-1": (dict(BASE, num_hidden_layers=3, mlp_only_layers=[1], norm_topk_prob=True),
                      "per-expert"),
    "sparse-step-2": (dict(BASE, num_hidden_layers=4, decoder_sparse_step=2,
                           norm_topk_prob=False), "per-expert"),
    "fused": (dict(BASE, num_hidden_layers=2, norm_topk_prob=True), "fused"),
}
IDS = np.random.default_rng(0).integers(0, VOCAB, size=(1, 40))  # 80 (token, expert) pairs


def hf_moe(kw: dict):
    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**kw)).eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
            elif "experts" in n or n.endswith("mlp.gate.weight"):
                p.normal_(0, 0.1)  # spread the routing, so that experts really differ
    return model


def save_checkpoint(model, folder: Path, layout: str) -> Path:
    """save_pretrained (one tensor per expert) or the fused in-memory layout."""
    model.save_pretrained(folder)
    if layout == "fused":
        (folder / "model.safetensors").unlink()
        save_file({k: v.contiguous().numpy() for k, v in model.state_dict().items()},
                  str(folder / "model.safetensors"))
    return folder


def hf_logits(model, ids=IDS) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


@pytest.fixture(scope="module", params=list(CONFIGS))
def moe(request, tmp_path_factory):
    """(transformers model, checkpoint folder, name)."""
    kw, layout = CONFIGS[request.param]
    model = hf_moe(kw)
    folder = save_checkpoint(model, tmp_path_factory.mktemp(request.param) / "hf", layout)
    return model, folder, request.param


def logits(model, ids=IDS) -> np.ndarray:
    return np.array(model(mx.array(ids)).astype(mx.float32))


def set_sorting(model, on: bool) -> None:
    for layer in model.layers:
        if hasattr(layer.mlp, "switch_mlp"):
            layer.mlp.switch_mlp.sort_min = 0 if on else 1 << 30


def test_float_logits_match_transformers(moe, tmp_path):
    hf, folder, name = moe
    ours, config = load_model(convert_file(folder, tmp_path / "pkg", bits=0, progress=False))
    ref, got = hf_logits(hf), logits(ours)
    assert rel_err(got, ref) < 1e-4
    assert np.array_equal(got.argmax(-1), ref.argmax(-1))
    sparse = [i for i, layer in enumerate(ours.layers) if hasattr(layer.mlp, "switch_mlp")]
    assert sparse == {"dense-layer-1": [0, 2], "sparse-step-2": [1, 3], "fused": [0, 1]}[name]
    assert config["num_experts"] == 8


def test_cached_decode_and_sorting(moe, tmp_path):
    _, folder, _ = moe
    for bits in (0, 4):
        ours, _ = load_model(convert_file(folder, tmp_path / f"pkg{bits}", bits=bits,
                                          progress=False))
        full = logits(ours)
        cache = make_cache(ours)
        prefill = np.array(ours(mx.array(IDS[:, :24]), cache=cache))
        steps = [prefill] + [np.array(ours(mx.array(IDS[:, i:i + 1]), cache=cache))
                             for i in range(24, IDS.shape[1])]
        assert rel_err(np.concatenate(steps, axis=1), full) < 1e-5
        set_sorting(ours, True)
        sorted_ = logits(ours)
        set_sorting(ours, False)
        assert rel_err(logits(ours), sorted_) < 1e-6
        assert rel_err(sorted_, full) < 1e-6  # the default (sorted: 80 pairs >= 64) too
        runs = [[int(t) for t, _ in generate_step(mx.array(IDS[0, :8]), ours, max_tokens=12,
                                                  compiled=c)] for c in (True, False)]
        assert runs[0] == runs[1]  # the compiled decode step routes the same


def dequantized_state(model, package: Path) -> dict[str, np.ndarray]:
    """The package's weights back in transformers' in-memory names, dequantized by MLX."""
    from edgert.convert.canonical import QuantTensor

    w = {k: np.array(v.astype(mx.float32) if v.dtype != mx.uint32 else v)
         for k, v in mx.load(str(package / "model.safetensors")).items()}
    q = json.loads((package / "config.json").read_text())["quantization"]
    state = {}
    for k in [k for k in w if not k.endswith((".scales", ".biases"))]:
        module = k.removesuffix(".weight")
        if f"{module}.scales" in w:
            spec = q.get(module, q)
            t = QuantTensor(w[k], w[f"{module}.scales"], w[f"{module}.biases"], spec["bits"],
                            spec["group_size"])
            state[k] = np.stack([deq(QuantTensor(t.w_q[e], t.scales[e], t.biases[e], t.bits,
                                                 t.group_size)) for e in range(t.w_q.shape[0])]
                                ) if t.w_q.ndim == 3 else deq(t)
        else:
            state[k] = w[k]
    out = {}
    for k, v in state.items():
        if ".switch_mlp." in k:
            base = k.split(".switch_mlp.")[0] + ".experts"
            if k.endswith("down_proj.weight"):
                out[f"{base}.down_proj"] = v
            elif k.endswith("gate_proj.weight"):
                up = state[k.replace("gate_proj", "up_proj")]
                out[f"{base}.gate_up_proj"] = np.concatenate([v, up], axis=1)
        else:
            out[k] = v
    state_names = set(model.state_dict())
    assert set(out) <= state_names, set(out) - state_names
    # a VL wrapper's vision tower is left out of the package
    assert all(k.startswith("model.visual.") for k in state_names - set(out))
    return out


def test_default_4bit_conversion(moe, tmp_path):
    hf, folder, _ = moe
    package = convert_file(folder, tmp_path / "pkg", progress=False)
    report = json.loads((package / "edgert.json").read_text())["tensors"]
    up = next(v for k, v in report.items() if k.endswith("switch_mlp.up_proj.weight"))
    assert up["shape"] == [8, 64, 128] and up["bits"] == 4
    assert up["layout"] == "stacked experts (E, out, in)"
    routers = [v for k, v in report.items() if k.endswith("mlp.gate.weight")]
    assert routers and all(r["bits"] == 8 for r in routers)  # routers stay at 8 bits

    ours, _ = load_model(package)
    reference = copy.deepcopy(hf)
    reference.load_state_dict({k: torch.from_numpy(v) for k, v in
                               dequantized_state(hf, package).items()})
    ref, got = hf_logits(reference), logits(ours)
    assert rel_err(got, ref) < 1e-4
    # min-max 4-bit with zero on the grid: within one step, (max - min) / 15 <= 2 max|w| / 15
    w_max = max(float(v.abs().max()) for k, v in hf.state_dict().items() if "experts" in k)
    assert 0 < up["max_abs_error"] <= 2 * w_max / 15

    from mlx_lm.utils import load_model as mlx_lm_load

    theirs, _ = mlx_lm_load(package)
    theirs.set_dtype(mx.float32)
    assert rel_err(got, logits(theirs)) < 1e-4


# ------------------------------------------------------------------ bad input


def broken(folder: Path, out: Path, config: dict | None = None, drop: str | None = None,
           replace: tuple[str, tuple] | None = None) -> Path:
    """A copy of the checkpoint with config keys changed, a tensor dropped or reshaped."""
    out.mkdir()
    cfg = json.loads((folder / "config.json").read_text()) | (config or {})
    (out / "config.json").write_text(json.dumps(cfg))
    tensors = load_file(str(folder / "model.safetensors"))
    if drop:
        del tensors[drop]
    if replace:
        tensors[replace[0]] = np.zeros(replace[1], np.float32)
    save_file(tensors, str(out / "model.safetensors"))
    return out


def test_bad_moe_checkpoints(tmp_path):
    kw, _ = CONFIGS["dense-layer-1"]
    folder = save_checkpoint(hf_moe(kw), tmp_path / "hf", "per-expert")
    cases = {
        "count": (dict(config={"num_local_experts": 16}), ["8 experts", "says 16"]),
        "topk": (dict(config={"num_experts_per_tok": 9}), ["num_experts_per_tok 9", "8"]),
        "router": (dict(drop="model.layers.2.mlp.gate.weight"),
                   ["no model.layers.2.mlp.gate.weight"]),
        "shapes": (dict(replace=("model.layers.0.mlp.experts.3.up_proj.weight", (32, 128))),
                   ["mismatched shapes", "experts.3.up_proj"]),
    }
    for name, (change, words) in cases.items():
        src = broken(folder, tmp_path / name, **change)
        assert_one_line_error(run("convert", str(src), "-o", str(tmp_path / f"{name}.out"),
                                  env_home=tmp_path), *words)
        assert not (tmp_path / f"{name}.out").exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert not leftovers


# ------------------------------------------------------------------ info, bench, memory, Core ML


def test_info_counts_active_parameters(tmp_path):
    kw, _ = CONFIGS["dense-layer-1"]
    folder = save_checkpoint(hf_moe(kw), tmp_path / "hf", "per-expert")
    package = convert_file(folder, tmp_path / "pkg", progress=False)
    from edgert.info import package_info

    s = package_info(package)
    H, I, E, k = kw["hidden_size"], kw["moe_intermediate_size"], 8, 2
    experts = 2 * 3 * E * I * H  # two sparse layers (0 and 2), gate/up/down each
    assert s["parameters"] == sum(p.numel() for p in hf_moe(kw).parameters())
    assert s["active_parameters"] == s["parameters"] - experts + experts * k // E
    assert s["experts"] == "2 of 8"
    per_expert_bytes = 3 * I * H * 4.5 / 8  # 4-bit g64 with f16 scales and biases
    assert s["bytes_read_per_token"] < s["size_bytes"] - 2 * (E - k) * per_expert_bytes + 1024
    info = run("info", str(package), env_home=tmp_path)
    assert info.returncode == 0 and "active parameters" in info.stdout


def test_bench_reads_k_of_e_experts(monkeypatch):
    from edgert import bench

    bench.SYNTHETIC["tiny-moe"] = dict(
        model_type="qwen3_moe", hidden_size=128, num_hidden_layers=2, intermediate_size=256,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=1000,
        num_experts=8, num_experts_per_tok=2, moe_intermediate_size=64)
    try:
        model, _ = bench.synthetic_model("tiny-moe", bits=4)
        experts = [m for layer in model.layers for m in (layer.mlp.switch_mlp.gate_proj,
                                                          layer.mlp.switch_mlp.up_proj,
                                                          layer.mlp.switch_mlp.down_proj)]
        expert_bytes = sum(m.weight.nbytes + m.scales.nbytes + m.biases.nbytes for m in experts)
        assert bench.active_weight_bytes(model) == (bench.weight_bytes(model) - expert_bytes
                                                    + expert_bytes * 2 // 8)
        # the 30B-A3B shape: a cut names what fits, and is labelled
        monkeypatch.setattr(bench, "available_memory_bytes", lambda: 4 * 2**30)
        with pytest.raises(Exception, match=r"--layers \d+ would fit"):
            bench.synthetic_model("qwen3-30b-a3b", bits=4)
        full = bench.SYNTHETIC["qwen3-30b-a3b"]
        assert 0 < bench.layers_that_fit(full, 4, 64, int(0.8 * 4 * 2**30)) < 48
    finally:
        del bench.SYNTHETIC["tiny-moe"]
    assert bench.expected_experts_touched(128, 8, 1) == pytest.approx(8)
    assert bench.expected_experts_touched(128, 8, 512) == pytest.approx(128, abs=1e-6)


def test_refuses_a_model_larger_than_memory(tmp_path, monkeypatch):
    from edgert import bench
    from edgert.errors import EdgertError

    kw, _ = CONFIGS["fused"]
    package = convert_file(save_checkpoint(hf_moe(kw), tmp_path / "hf", "fused"),
                           tmp_path / "pkg", progress=False)
    monkeypatch.setattr(bench, "available_memory_bytes", lambda: 100_000)
    with pytest.raises(EdgertError, match="GiB of memory is available.*would fit") as e:
        load_model(package)
    assert "\n" not in str(e.value)


def test_wired_limit_set_where_the_device_recommends_one(tmp_path, monkeypatch, capsys):
    """On Metal (device_info reports a recommended working set) the loader raises MLX's wired
    limit to it, as mlx-lm does, and warns once when the weights exceed 90% of it; on this
    CPU backend, which reports none, the limit is left alone."""
    import mlx.core as mx

    assert "max_recommended_working_set_size" not in mx.device_info()  # this CPU backend
    kw, _ = CONFIGS["fused"]
    package = convert_file(save_checkpoint(hf_moe(kw), tmp_path / "hf", "fused"),
                           tmp_path / "pkg", progress=False)
    calls = []
    monkeypatch.setattr(mx, "set_wired_limit", lambda n: calls.append(n) or 0)
    load_model(package)
    assert calls == []
    for recommended, warned in ((1 << 40, False), (1 << 16, True)):
        monkeypatch.setattr(mx, "device_info", lambda r=recommended: {
            "max_recommended_working_set_size": r})
        model, _ = load_model(package)
        assert calls[-1] == recommended
        err = capsys.readouterr().err
        assert ("over 90%" in err) == warned and err.count("\n") <= 1


def test_coreml_refuses_moe(tmp_path):
    kw, _ = CONFIGS["fused"]
    folder = save_checkpoint(hf_moe(kw), tmp_path / "hf", "fused")
    assert_one_line_error(run("convert", str(folder), "--to", "coreml", "-o",
                              str(tmp_path / "m.mlpackage"), env_home=tmp_path),
                          "mixture-of-experts", "qwen3_moe")
    assert not (tmp_path / "m.mlpackage").exists()


@pytest.mark.parametrize("g_kind", ["plain", "act-order"])
def test_gptq_moe_checkpoint(tmp_path, g_kind):
    """A GPTQ Qwen3-MoE (AutoGPTQ's packing; every expert its own QuantLinear, the router kept
    float, as GPTQModel writes MoE models): plain groups stack exactly into (E, out, in) and
    the logits are transformers' on GPTQ's reference weights. Act-order experts (their column
    orders differ per expert, and a stacked layer takes one) are re-quantized from GPTQ's own
    dequantization, with the error reported."""
    from safetensors.numpy import load_file as load_np
    from test_hf_reader import LINEARS, autogptq_pack, gptq_quantize, make_g_idx

    kw, _ = CONFIGS["dense-layer-1"]
    hf = hf_moe(kw)
    hf.save_pretrained(tmp_path / "hf")  # per-expert names, as checkpoints have them
    sd = load_np(str(tmp_path / "hf" / "model.safetensors"))
    rng, out, refs = np.random.default_rng(0), {}, {}
    for name, w in sd.items():
        if not name.endswith(LINEARS):
            out[name] = w.astype(np.float16)
            continue
        g_idx = make_g_idx(w.shape[1], 32, g_kind if ".experts." in name else "plain", rng)
        q, s, z = gptq_quantize(w, 4, g_idx, sym=False)
        refs[name] = (s.astype(np.float32)[g_idx].T * (q.astype(np.float32) - z[g_idx].T))
        module = name.removesuffix(".weight")
        out |= {f"{module}.qweight": autogptq_pack(q.T, 4),
                f"{module}.qzeros": np.ascontiguousarray(autogptq_pack((z - 1).T, 4).T),
                f"{module}.scales": s, f"{module}.g_idx": g_idx}
    folder = tmp_path / "gptq"
    folder.mkdir()
    save_file(out, str(folder / "model.safetensors"))
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": 32,
                                     "sym": False, "desc_act": g_kind == "act-order"}
    (folder / "config.json").write_text(json.dumps(config))
    package = convert_file(folder, tmp_path / "pkg", progress=False)
    report = json.loads((package / "edgert.json").read_text())["tensors"]
    stacked = {k: v for k, v in report.items() if ".switch_mlp." in k}
    assert len(stacked) == 3 * 2  # two sparse layers (layer 1 is dense)
    want = "exact" if g_kind == "plain" else "requantized"
    assert all(v["class"].endswith(want) for v in stacked.values()), stacked
    ours, _ = load_model(package)
    if g_kind == "act-order":  # re-quantized: held to transformers on the package's weights
        assert all(v["max_abs_error"] > 0 for v in stacked.values())
        reference = copy.deepcopy(hf)
        reference.load_state_dict({k: torch.from_numpy(v) for k, v in
                                   dequantized_state(hf, package).items()}, strict=False)
        assert rel_err(logits(ours), hf_logits(reference)) < 1e-4
        return
    # transformers with GPTQ's reference weights (and the checkpoint's float16 tensors),
    # experts fused as it holds them in memory
    state = {k: v for k, v in refs.items() if ".experts." not in k}
    state |= {k: v for k, v in out.items() if k in sd and k not in refs}
    for layer in (0, 2):
        base = f"model.layers.{layer}.mlp.experts"
        per = lambda p: np.stack([refs[f"{base}.{e}.{p}.weight"] for e in range(8)])
        state[f"{base}.gate_up_proj"] = np.concatenate([per("gate_proj"), per("up_proj")], 1)
        state[f"{base}.down_proj"] = per("down_proj")
    reference = copy.deepcopy(hf)
    assert set(state) <= set(reference.state_dict())
    reference.load_state_dict({k: torch.from_numpy(v.astype(np.float32)) for k, v in
                               state.items()}, strict=False)
    assert rel_err(logits(ours), hf_logits(reference)) < 1e-4


AWQ_REVERSE_ORDER = [0, 4, 1, 5, 2, 6, 3, 7]  # AutoAWQ packing_utils: nibble of column 8k+j


def awq_dequantize_gemm(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray,
                        group: int) -> np.ndarray:
    """AutoAWQ's `dequantize_gemm` (packing_utils.py) in numpy: unpack 8 nibbles per int32 word
    (shifts 0, 4, .., 28), undo the GEMM column order, (q - z) * s per group -> (out, in)."""
    def unpack(w):
        nib = (w.view(np.uint32)[..., None] >> (4 * np.arange(8, dtype=np.uint32))) & 15
        nib = nib.reshape(w.shape[0], -1)
        order = np.arange(nib.shape[1]).reshape(-1, 8)[:, AWQ_REVERSE_ORDER].reshape(-1)
        return nib[:, order].astype(np.float32)

    iw, iz = unpack(qweight), unpack(qzeros)  # (in, out), (n_groups, out)
    s = scales.astype(np.float32).repeat(group, axis=0)
    return ((iw - iz.repeat(group, axis=0)) * s).T  # (out, in)


def awq_quantize(w: np.ndarray, group: int) -> dict[str, np.ndarray]:
    """AutoAWQ's asymmetric 4-bit grid (zeros in 0..15, w = (q - z) * s, float16 scales),
    packed as WQLinear_GEMM.from_linear does: qweight (in, out/8), qzeros (n_groups, out/8)."""
    from test_hf_reader import awq_pack

    wg = w.reshape(w.shape[0], -1, group)
    wmin, wmax = wg.min(-1), wg.max(-1)
    s16 = (np.maximum(wmax - wmin, 1e-5) / 15).astype(np.float16)
    z = np.clip(np.round(-wmin / s16.astype(np.float32)), 0, 15)
    q = np.clip(np.round(wg / s16[..., None].astype(np.float32)) + z[..., None], 0, 15)
    return {"qweight": awq_pack(q.reshape(w.shape).T), "qzeros": awq_pack(z.T),
            "scales": np.ascontiguousarray(s16.T)}


def awq_moe_checkpoint(hf, folder: Path, group: int) -> dict[str, np.ndarray]:
    """`hf` saved as AutoAWQ saves a Qwen3-MoE (every Linear of the decoder layers its own
    WQLinear_GEMM: attention, each expert, the router; embeddings, norms and the head float16).
    Returns AWQ's reference dequantization (awq_dequantize_gemm) of each quantized weight."""
    from safetensors.numpy import load_file as load_np
    from test_hf_reader import LINEARS

    hf.save_pretrained(folder / "float")  # per-expert names, as checkpoints have them
    out, refs = {}, {}
    for name, w in load_np(str(folder / "float" / "model.safetensors")).items():
        if not name.startswith("model.layers.") or not name.endswith(
                (*LINEARS, ".mlp.gate.weight")):
            out[name] = w.astype(np.float16)
            continue
        module = name.removesuffix(".weight")
        t = awq_quantize(w, group)
        out |= {f"{module}.{k}": v for k, v in t.items()}
        refs[name] = awq_dequantize_gemm(t["qweight"], t["qzeros"], t["scales"], group)
    (folder / "awq").mkdir()
    save_file(out, str(folder / "awq" / "model.safetensors"))
    config = json.loads((folder / "float" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": group,
                                     "zero_point": True, "version": "gemm"}
    (folder / "awq" / "config.json").write_text(json.dumps(config))
    return refs


def test_awq_moe_checkpoint(tmp_path):
    """An AWQ Qwen3-MoE (AutoAWQ's GEMM packing, zero points; the router quantized too, as
    AutoAWQ does): each expert maps exactly and the experts stack into (E, out, in), every
    weight bit-identical after MLX's dequantization to AWQ's own (AutoAWQ's dequantize_gemm,
    written out here); mlx-lm's AWQ decoder gives the same codes and scales per expert; the
    logits are transformers' on AWQ's weights (1e-4; each of those weights within one 4-bit
    step of the float model's), and mlx-lm loads the package with the same logits."""
    from mlx_lm.utils import _transform_awq_weights
    from mlx_lm.utils import load_model as mlx_lm_load
    from safetensors.numpy import load_file as load_np

    kw, _ = CONFIGS["dense-layer-1"]
    hf, group = hf_moe(kw), 32
    refs = awq_moe_checkpoint(hf, tmp_path, group)
    package = convert_file(tmp_path / "awq", tmp_path / "pkg", progress=False)
    report = json.loads((package / "edgert.json").read_text())["tensors"]
    stacked = {k: v for k, v in report.items() if ".switch_mlp." in k}
    assert len(stacked) == 3 * 2  # two sparse layers (layer 1 is dense)
    assert all(v["class"] in ("exact", "f32-scales exact") and v["shape"][0] == 8
               and v["max_abs_error"] == 0 for v in stacked.values()), stacked

    state = dequantized_state(hf, package)  # transformers' names, experts fused
    src = load_np(str(tmp_path / "awq" / "model.safetensors"))
    pkg = mx.load(str(package / "model.safetensors"))
    for layer in (0, 2):
        base = f"model.layers.{layer}.mlp.experts"
        per = lambda p: np.stack([refs[f"{base}.{e}.{p}.weight"] for e in range(8)])
        assert np.array_equal(state[f"{base}.gate_up_proj"],
                              np.concatenate([per("gate_proj"), per("up_proj")], 1))
        assert np.array_equal(state[f"{base}.down_proj"], per("down_proj"))
        for e in (0, 5):  # mlx-lm's own AWQ decoding of one expert: the same codes, scales
            m = f"{base}.{e}.up_proj"
            theirs, _ = _transform_awq_weights({f"{m}.{k}": mx.array(src[f"{m}.{k}"])
                                                for k in ("qweight", "qzeros", "scales")},
                                               {"bits": 4, "group_size": group})
            ours = f"model.layers.{layer}.mlp.switch_mlp.up_proj"
            assert np.array_equal(np.array(pkg[f"{ours}.weight"][e]),
                                  np.array(theirs[f"{m}.weight"]))
            assert np.array_equal(np.array(pkg[f"{ours}.scales"][e].astype(mx.float32)),
                                  np.array(theirs[f"{m}.scales"].astype(mx.float32)))
    floats = load_np(str(tmp_path / "float" / "model.safetensors"))
    for name, ref in refs.items():
        if ".experts." not in name:
            assert np.array_equal(state[name], ref), name
        # what 4 bits imply: each weight within one step (its group's scale) of the float one
        step = src[name.replace(".weight", ".scales")].astype(np.float32).T.repeat(group, 1)
        assert (np.abs(ref - floats[name]) <= step).all(), name

    reference = copy.deepcopy(hf)
    reference.load_state_dict({k: torch.from_numpy(v.astype(np.float32)) for k, v in
                               state.items()}, strict=True)
    ours, _ = load_model(package)
    got, want = logits(ours), hf_logits(reference)
    print(f"AWQ MoE: transformers on AWQ's weights vs edgert {rel_err(got, want):.2e}")
    assert rel_err(got, want) < 1e-4 and np.array_equal(got.argmax(-1), want.argmax(-1))
    theirs, _ = mlx_lm_load(package)
    theirs.set_dtype(mx.float32)
    assert rel_err(logits(theirs), got) < 1e-4


@pytest.mark.parametrize("kind", ["float", "awq"])
def test_experts_numbered_out_of_order(tmp_path, kind):
    """Experts 0, 1, .., 6, 8 (7 missing), per-expert float tensors or AWQ modules alike: one
    line naming the stacked tensor and the numbers found, nothing written."""
    from edgert.errors import EdgertError

    kw, _ = CONFIGS["dense-layer-1"]
    hf = hf_moe(kw)
    if kind == "awq":
        awq_moe_checkpoint(hf, tmp_path, 32)
        folder = tmp_path / "awq"
    else:
        folder = save_checkpoint(hf, tmp_path / "float", "per-expert")
    tensors = load_file(str(folder / "model.safetensors"))
    prefix = "model.layers.0.mlp.experts."
    tensors = {k.replace(f"{prefix}7.", f"{prefix}8.") if k.startswith(prefix) else k: v
               for k, v in tensors.items()}
    save_file(tensors, str(folder / "model.safetensors"))
    with pytest.raises(EdgertError, match=r"switch_mlp\.(down|gate|up)_proj\.weight: the "
                       r"checkpoint's experts are \[0, 1, 2, 3, 4, 5, 6, 8\], not 0\.\.7"):
        convert_file(folder, tmp_path / "pkg", progress=False)
    assert not (tmp_path / "pkg").exists()
