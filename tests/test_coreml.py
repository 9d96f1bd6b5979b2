"""Core ML export: packages written by edgert.convert.coreml_writer, executed op by op by the
numpy MIL interpreter, against the MLX runtime (edgert.package.load_model) on the same weights.
Core ML itself cannot run here (Linux); the saved program is what gets checked."""

from __future__ import annotations

import json
import re
import zlib
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_unflatten

from edgert.convert.canonical import EXACT, CanonicalModel, QuantTensor, TensorRecord
from edgert.bitpack import unpack_rows
from edgert.convert.coreml_writer import (MASK_VALUE, dequantize, decompress, encode_quant,
                                          manifest_path, write_coreml)
from edgert.mil_interpreter import (InterpreterSession, count_ops, load_package,
                                            state_update_violations, weight_blob_bytes)
from edgert.errors import EdgertError, UnsupportedError
from edgert.models import get_classes
from edgert.models.cache import make_cache
from edgert.package import load_model

import coremltools as ct  # noqa: E402  (a declared dependency: fail, never skip)

CONTEXT = 64
PROMPT, DECODE_STEPS = 9, 16
REL_TOL = 5e-3  # max |logit error| / max |logit|: fp16 weights and activations (worst seen 3e-3)

BASE = dict(hidden_size=128, num_hidden_layers=2, intermediate_size=256, num_attention_heads=4,
            head_dim=32, max_position_embeddings=256, bos_token_id=1, eos_token_id=[2, 3])
CONFIGS = {
    # GQA 4:1, llama3 rope scaling that bites within the test's positions, untied head
    "llama": dict(BASE, model_type="llama", num_key_value_heads=1, vocab_size=320,
                  rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    # q/k norms, tied embeddings
    "qwen3": dict(BASE, model_type="qwen3", num_key_value_heads=2, vocab_size=384,
                  rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=True),
    # q/k/v biases
    "qwen2": dict(BASE, model_type="qwen2", num_key_value_heads=2, vocab_size=352,
                  rms_norm_eps=1e-6, rope_theta=1e6, tie_word_embeddings=False),
}
TOKENIZER_FILES = {
    "tokenizer.json": b'{"model": {"type": "BPE"}}',
    "tokenizer_config.json": json.dumps({"chat_template": "{% for m in messages %}{{ m.content }}"
                                                          "{% endfor %}"}).encode(),
}

# name -> (bits, group size, weight pattern, target)
VARIANTS = {
    "q8": (8, 32, "mlx", "iOS18"),
    "q4": (4, 64, "mlx", "iOS18"),
    "q4_0": (4, 32, "q4_0", "iOS18"),  # b = -8s: integer offsets, exact
    "q3": (3, 64, "mlx", "iOS18"),
    "q6": (6, 64, "mlx", "iOS18"),
    "q2_ternary": (2, 128, "ternary", "iOS18"),  # q in {0, 1, 2}, b = -s (TQ2_0 / BitNet)
    "q1": (1, 128, "mlx", "iOS18"),
    "q1_sign": (1, 128, "sign", "iOS26"),  # b = -s/2 (Q1_0): LUT -> scale chain
    "f16": (16, 0, "float", "iOS18"),  # not quantized: fp16 consts
}
CASES = [("llama", "q4"), ("llama", "q8"), ("llama", "q1"), ("llama", "q2_ternary"),
         ("qwen3", "q4"), ("qwen3", "q8"), ("qwen3", "q1"), ("qwen3", "q2_ternary"),
         ("qwen2", "q4_0"), ("llama", "q3"), ("qwen3", "q6"), ("qwen3", "q1_sign"),
         ("llama", "f16")]


# -------------------------------------------------------------------------------------------
# Test models: an MLX package on disk (the runtime's input) and the same weights as a
# CanonicalModel (the writer's input)
# -------------------------------------------------------------------------------------------


def pack_bits(q: np.ndarray, bits: int) -> np.ndarray:
    """(rows, cols) ints < 2**bits -> (rows, cols * bits // 32) uint32, LSB first."""
    rows, cols = q.shape
    per = 32 // bits
    q = q.astype(np.uint32).reshape(rows, cols // per, per)
    return (q << (np.arange(per, dtype=np.uint32) * bits)).sum(axis=2, dtype=np.uint32)


def write_mlx_package(folder: Path, arch: str, bits: int, group: int, pattern: str) -> None:
    """A random model quantized by MLX; norms randomised (MLX inits them to ones, which
    coremltools would fold away); `pattern` overrides the quantized weights' codes."""
    config = CONFIGS[arch]
    model_cls, args_cls = get_classes(config["model_type"])
    mx.random.seed(zlib.crc32(f"{arch}-{bits}-{pattern}".encode()))
    model = model_cls(args_cls.from_dict(config))
    model.update(_random_norms(model))
    if bits == 16:
        model.set_dtype(mx.float16)
        mx.save_safetensors(str(folder / "model.safetensors"),
                            dict(tree_flatten(model.parameters())))
        (folder / "config.json").write_text(json.dumps(config))
        return
    nn.quantize(model, group, bits)
    weights = {k: np.array(v) for k, v in tree_flatten(model.parameters())}
    rng = np.random.default_rng(bits)
    for k in [k for k in weights if k.endswith(".scales")]:
        base = k[: -len(".scales")]
        s = weights[k].astype(np.float16)
        rows, cols = s.shape[0], s.shape[1] * group
        if pattern == "ternary":
            s = np.abs(s)
            weights[f"{base}.weight"] = pack_bits(rng.integers(0, 3, (rows, cols)), bits)
            weights[f"{base}.biases"] = -s
        elif pattern == "sign":
            s = (np.abs(s) * 2).astype(np.float16)
            weights[f"{base}.biases"] = (-s.astype(np.float32) / 2).astype(np.float16)
        elif pattern == "q4_0":
            weights[f"{base}.biases"] = (-8 * s.astype(np.float32)).astype(np.float16)
        weights[k] = s
    weights = {k: v.astype(np.float16) if k.endswith((".biases", ".scales")) else v
               for k, v in weights.items()}
    mx.save_safetensors(str(folder / "model.safetensors"),
                        {k: mx.array(v) for k, v in weights.items()})
    quant = {"group_size": group, "bits": bits, "mode": "affine"}
    (folder / "config.json").write_text(json.dumps(dict(config, quantization=quant)))


def _random_norms(model) -> dict:
    rng = np.random.default_rng(0)
    params = dict(tree_flatten(model.parameters()))
    new = [(k, mx.array((1 + 0.2 * rng.standard_normal(v.shape)).astype(np.float32)))
           for k, v in params.items() if "norm" in k]
    return tree_unflatten(new)


def canonical_from_mlx(folder: Path) -> CanonicalModel:
    config = json.loads((folder / "config.json").read_text())
    weights = {k: np.array(v) for k, v in mx.load(str(folder / "model.safetensors")).items()}
    q = config.get("quantization")

    def tensors():
        for k, v in weights.items():
            if k.endswith((".scales", ".biases")):
                continue
            base, _, leaf = k.rpartition(".")
            if leaf == "weight" and f"{base}.scales" in weights:
                t = QuantTensor(v, weights[f"{base}.scales"], weights[f"{base}.biases"],
                                q["bits"], q["group_size"])
                yield TensorRecord(k, t, k, f"mlx-affine-{q['bits']}", EXACT)
            else:
                yield TensorRecord(k, v, k, str(v.dtype), "float")

    n = sum(1 for k in weights if not k.endswith((".scales", ".biases")))
    return CanonicalModel(config, tensors, n, dict(TOKENIZER_FILES),
                          {"format": "mlx", "path": str(folder)})


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(arch, variant) -> (MLX package folder, Core ML package path, report), built once."""
    cache = {}

    def get(arch: str, variant: str):
        if (arch, variant) not in cache:
            bits, group, pattern, target = VARIANTS[variant]
            root = tmp_path_factory.mktemp(f"{arch}-{variant}")
            write_mlx_package(root, arch, bits, group, pattern)
            report = write_coreml(canonical_from_mlx(root), root / "model.mlpackage",
                                  context=CONTEXT, target=target)
            cache[arch, variant] = root, Path(report["path"]), report
        return cache[arch, variant]

    return get


def causal_mask(position: int, n: int) -> np.ndarray:
    m = np.full((1, 1, n, CONTEXT), MASK_VALUE, np.float16)
    for i in range(n):
        m[0, 0, i, : position + i + 1] = 0
    return m


def step_inputs(ids: np.ndarray, position: int) -> dict:
    return {"input_ids": ids.astype(np.int32), "position": np.array([position], np.int32),
            "causal_mask": causal_mask(position, ids.shape[1])}


# -------------------------------------------------------------------------------------------
# Core ML program (numpy interpreter) == MLX runtime
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,variant", CASES)
def test_prefill_and_decode_match_mlx_runtime(exported, arch, variant):
    folder, pkg, report = exported(arch, variant)
    model, _ = load_model(folder)
    cache = make_cache(model)
    session = InterpreterSession(pkg)
    vocab = CONFIGS[arch]["vocab_size"]

    ids = np.random.default_rng(1).integers(0, vocab, (1, PROMPT))
    ours = session.predict("prefill", step_inputs(ids, 0))["logits"]
    ref = np.array(model(mx.array(ids), cache=cache))[:, -1:]  # (1, 1, vocab)
    position, worst, ties = PROMPT, 0.0, 0
    for step in range(DECODE_STEPS + 1):
        assert ours.shape == (1, 1, vocab) and ours.dtype == np.float32
        err = float(np.abs(ours - ref).max())
        worst = max(worst, err / float(np.abs(ref).max()))
        # top-1 must agree unless the reference's runner-up is within twice this step's
        # error (then either order is within fp16 accuracy; ours must pick a tied token)
        tied = np.flatnonzero(ref.ravel() >= ref.max() - 2 * err)
        if len(tied) == 1:
            assert ours.argmax() == ref.argmax(), f"top-1 differs at step {step}"
        else:
            ties += 1
            assert ours.argmax() in tied, f"top-1 outside the reference's near-ties at {step}"
        if step == DECODE_STEPS:
            break
        token = np.array([[ref.argmax()]])
        ours = session.predict("decode", step_inputs(token, position))["logits"]
        ref = np.array(model(mx.array(token), cache=cache))
        position += 1
    assert worst < REL_TOL, f"max relative logit error {worst:.2e}"
    assert ties <= 2, f"{ties} near-tied steps: the test model's logits are too flat"


def first_layers(model: CanonicalModel, n: int) -> CanonicalModel:
    """The same model cut to its first n blocks (the final norm and head kept)."""
    def tensors():
        for rec in model.tensors():
            block = re.match(r"model\.layers\.(\d+)\.", rec.name)
            if block is None or int(block[1]) < n:
                yield rec

    return CanonicalModel(dict(model.config, num_hidden_layers=n), tensors, model.tensor_count,
                          model.tokenizer_files, model.source)


def test_real_model_matches_mlx_runtime(smollm_gguf, smollm_package, tmp_path):
    """SmolLM2-135M-Instruct's real weights (Q4_1 + Q8_0, tied embeddings) from its GGUF, cut
    to 4 of its 30 blocks to keep the conversion short: the Core ML program and the MLX
    package converted from the same file give the same tokens."""
    from edgert.convert.gguf_reader import read_gguf

    n_layers = 4
    report = write_coreml(first_layers(read_gguf(smollm_gguf), n_layers),
                          tmp_path / "smollm.mlpackage", context=CONTEXT)
    assert report["tensors"]["model.embed_tokens.weight"]["class"] == "exact"  # Q8_0
    session = InterpreterSession(report["path"])
    model, _ = load_model(smollm_package)
    model.model.layers = model.model.layers[:n_layers]
    cache = make_cache(model)
    ids = np.array([[1, 9690, 314, 253, 3725, 1458, 30, 3165, 253, 1370, 28, 2]])
    ours = session.predict("prefill", step_inputs(ids, 0))["logits"]
    ref = np.array(model(mx.array(ids), cache=cache))[:, -1:]
    position, worst = ids.shape[1], 0.0
    for step in range(DECODE_STEPS + 1):
        assert ours.argmax() == ref.argmax(), f"top-1 differs at step {step}"
        worst = max(worst, float(np.abs(ours - ref).max() / np.abs(ref).max()))
        if step == DECODE_STEPS:
            break
        token = np.array([[ref.argmax()]])
        ours = session.predict("decode", step_inputs(token, position))["logits"]
        ref = np.array(model(mx.array(token), cache=cache))
        position += 1
    assert worst < REL_TOL, f"max relative logit error {worst:.2e}"


def test_prefill_in_chunks_equals_one_prefill(exported):
    """The cache written by one prefill call is what the next call attends to."""
    _, pkg, _ = exported("qwen3", "q4")
    ids = np.random.default_rng(2).integers(0, 384, (1, 12))
    whole = InterpreterSession(pkg).predict("prefill", step_inputs(ids, 0))["logits"]
    chunked = InterpreterSession(pkg)
    chunked.predict("prefill", step_inputs(ids[:, :5], 0))
    chunked.predict("prefill", step_inputs(ids[:, 5:11], 5))
    last = chunked.predict("decode", step_inputs(ids[:, 11:], 11))["logits"]
    assert np.abs(last - whole).max() <= 1e-3 * np.abs(whole).max()


# -------------------------------------------------------------------------------------------
# The saved package
# -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch,variant", [("llama", "q4"), ("qwen3", "q1")])
def test_package_structure(exported, arch, variant):
    _, pkg, report = exported(arch, variant)
    cfg = CONFIGS[arch]
    n_layers = cfg["num_hidden_layers"]
    package = load_package(pkg)
    spec = package.spec
    assert [f.name for f in spec.description.functions] == ["prefill", "decode"]
    assert spec.description.defaultFunctionName == "decode"
    cache_shape = [n_layers, cfg["num_key_value_heads"], CONTEXT, cfg["head_dim"]]
    for f in spec.description.functions:
        assert [s.name for s in f.state] == ["key_cache", "value_cache"]
        assert all(list(s.type.stateType.arrayType.shape) == cache_shape for s in f.state)
        assert [i.name for i in f.input] == ["input_ids", "position", "causal_mask"]
        assert [o.name for o in f.output] == ["logits"]
    prefill_ids = spec.description.functions[0].input[0].type.multiArrayType
    assert prefill_ids.shapeRange.sizeRanges[1].upperBound == CONTEXT

    for fn in ("prefill", "decode"):
        ops = count_ops(package, fn)
        assert ops["scaled_dot_product_attention"] == n_layers
        assert ops["read_state"] == 2  # each cache read once, then threaded through
        assert ops["coreml_update_state"] == 2 * n_layers
        assert ops["slice_update"] == 2 * n_layers
        assert state_update_violations(package, fn) == []
        # on disk each coreml_update_state is a write_state followed by a read_state
        proto = _proto_op_counts(spec, fn)
        assert proto["write_state"] == 2 * n_layers
        assert proto["read_state"] == 2 + 2 * n_layers
    compressed = {"q4": "constexpr_blockwise_shift_scale", "q1": "constexpr_lut_to_dense"}
    assert count_ops(package, "decode")[compressed[variant]] == 7 * n_layers + 1 + (
        arch == "llama")  # + embedding (+ untied head)

    manifest = json.loads(manifest_path(pkg).read_text())
    assert manifest == package.manifest  # also in the model's metadata
    assert manifest["context_length"] == CONTEXT and manifest["vocab_size"] == cfg["vocab_size"]
    assert manifest["stop_token_ids"] == [2, 3] and manifest["bos_token_id"] == 1
    assert set(manifest["functions"]) == {"prefill", "decode"}
    assert manifest["functions"]["decode"]["states"][0]["shape"] == cache_shape
    assert manifest["chat_template"].startswith("{% for m in messages %}")
    folder = manifest_path(pkg).parent
    for name in manifest["tokenizer_files"]:
        assert (folder / name).read_bytes() == TOKENIZER_FILES[Path(name).name]
    assert "com.edgert/manifest.json" in (pkg / "Manifest.json").read_text()


def _proto_op_counts(spec, function: str) -> dict[str, int]:
    func = next(f for name, f in spec.mlProgram.functions.items() if name == function)
    counts: dict[str, int] = {}
    for op in func.block_specializations[func.opset].operations:
        counts[op.type] = counts.get(op.type, 0) + 1
    return counts


def test_functions_share_weights(exported):
    _, pkg, report = exported("qwen3", "q4")
    decode = sum(weight_blob_bytes(pkg, "decode").values())
    weight_bin = pkg / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    assert weight_bin.stat().st_size < 1.1 * decode  # prefill adds no second copy


def test_progress_counts_every_tensor_then_names_each_stage(tmp_path):
    write_mlx_package(tmp_path, "qwen3", *VARIANTS["q4"][:3])
    canonical = canonical_from_mlx(tmp_path)
    calls = []
    write_coreml(canonical, tmp_path / "p.mlpackage", context=CONTEXT,
                 progress=lambda *a: calls.append(a))
    n = canonical.tensor_count
    assert calls[:n] == [("encoding weights", i, n) for i in range(1, n + 1)]
    assert [c[0] for c in calls[n:]] == ["building and optimising prefill",
                                         "building and optimising decode",
                                         "writing weight.bin", "measuring bits per weight"]


def test_shared_consts_are_equal_in_full():
    """Cross-function sharing compares whole values: consts that agree on their first 100
    elements (all coremltools' own hash looks at) but differ later stay apart."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import Function, Program, types

    from edgert.convert.coreml_writer import share_consts_across_functions

    a = np.zeros((4, 64), np.float16)
    c = np.arange(256, dtype=np.float16).reshape(4, 64)
    d = c.copy()
    d[3, 63] = -1
    prog = Program()
    for fn, second in (("f", c), ("g", d)):
        with Function({"x": mb.TensorSpec((4, 64), types.fp16)}) as func:
            y = mb.add(x=func.inputs["x"], y=mb.const(val=a.copy(), name="same"))
            func.set_outputs([mb.add(x=y, y=mb.const(val=second, name="other"))])
        prog.add_function(fn, func)
    assert share_consts_across_functions(prog) == 2
    ids = {(name, op.name): op.weight_id for name, f in prog.functions.items()
           for op in f.operations if op.op_type == "const" and op.name in ("same", "other")}
    assert ids[("f", "same")] == ids[("g", "same")] is not None
    assert ids[("f", "other")] is None and ids[("g", "other")] is None


@pytest.mark.parametrize("arch,variant,bpw", [
    ("qwen3", "q1", 1.25),  # 1 bit + a 2-entry fp16 palette per 128 weights
    ("qwen3", "q2_ternary", 2.5),  # 2 bits + 4 fp16 entries per 128
    ("qwen3", "q1_sign", 1.125),  # iOS26: 1 bit + one fp16 scale per 128
    ("qwen2", "q4_0", 4.625),  # 4 bits + fp16 scale + uint4 offset per 32
])
def test_bits_per_weight_in_weight_bin(exported, arch, variant, bpw):
    _, pkg, report = exported(arch, variant)
    down = report["tensors"]["model.layers.0.mlp.down_proj.weight"]
    assert down["bits_per_weight"] == pytest.approx(bpw, abs=0.01)
    assert down["class"] == "exact"


def test_report_classes(exported):
    _, _, report = exported("qwen3", "q6")
    t = report["tensors"]["model.layers.1.mlp.up_proj.weight"]
    assert t["coreml"].startswith("shift_scale uint8")
    assert t["class"] in ("widened", "requantized")
    _, _, report = exported("llama", "q3")
    t = report["tensors"]["model.layers.1.mlp.up_proj.weight"]
    assert (t["coreml"], t["class"]) == ("lut uint3 per (row, 64) block", "exact")
    assert report["tensors"]["model.norm.weight"]["class"] == "float"
    _, _, report = exported("qwen3", "q1_sign")
    assert report["tensors"]["model.layers.0.mlp.up_proj.weight"]["coreml"].startswith(
        "lut_scale uint1 int8 palette [-1, 1]")


# -------------------------------------------------------------------------------------------
# Stale cache reads: the check above catches the remove_redundant_ops pitfall
# -------------------------------------------------------------------------------------------


def _per_layer_read_program(n_layers: int = 3, width: int = 4):
    """Each layer reads the shared cache itself (the pattern remove_redundant_ops breaks)."""
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import Function, Program, types

    specs = {"x": mb.TensorSpec((1, 1, 1, width), types.fp16),
             "position": mb.TensorSpec((1,), types.int32),
             "cache": mb.StateTensorSpec((n_layers, 1, 8, width), types.fp16)}
    with Function(specs, opset_version=ct.target.iOS18) as f:
        x, pos, state = f.inputs["x"], f.inputs["position"], f.inputs["cache"]
        end = mb.add(x=pos, y=np.int32(1))
        for i in range(n_layers):
            c = mb.read_state(input=state)
            begin = mb.concat(values=[np.array([i, 0], np.int32), pos,
                                      np.array([0], np.int32)], axis=0)
            stop = mb.concat(values=[np.array([i + 1, 1], np.int32), end,
                                     np.array([width], np.int32)], axis=0)
            c = mb.slice_update(x=c, update=mb.mul(x=x, y=np.float16(i + 1)), begin=begin,
                                end=stop)
            c = mb.coreml_update_state(state=state, value=c)
        f.set_outputs([mb.reduce_sum(x=c, axes=[1, 2, 3], name="out")])
    prog = Program()
    prog.add_function("main", f)
    return prog


@pytest.mark.parametrize("merge", [True, False])
def test_stale_cache_reads_are_detected(tmp_path, merge):
    pipeline = ct.PassPipeline.DEFAULT
    if not merge:
        pipeline.remove_passes(["common::remove_redundant_ops"])
    model = ct.convert(_per_layer_read_program(), minimum_deployment_target=ct.target.iOS18,
                       compute_precision=ct.precision.FLOAT32, pass_pipeline=pipeline,
                       skip_model_load=True)
    model.save(str(tmp_path / "m.mlpackage"))
    session = InterpreterSession(tmp_path / "m.mlpackage")
    session.predict("main", {"x": np.ones((1, 1, 1, 4)), "position": np.array([0])})
    written = session.states["cache"][:, 0, 0, 0]  # what each layer left in its slot
    if merge:  # every read merged into the first: only the last layer's write survives
        assert len(state_update_violations(session.package, "main")) == 2
        assert written.tolist() == [0, 0, 3]
    else:
        assert state_update_violations(session.package, "main") == []
        assert written.tolist() == [1, 2, 3]


# -------------------------------------------------------------------------------------------
# Weight encodings against references edgert did not write
# -------------------------------------------------------------------------------------------


def _quant_tensor(bits: int, group: int, rows=64, cols=256, pattern="mlx") -> QuantTensor:
    w = mx.random.normal((rows, cols), key=mx.random.key(bits))
    w_q, s, b = mx.quantize(w, group, bits)
    s, b = np.array(s.astype(mx.float16)), np.array(b.astype(mx.float16))
    if pattern == "q4_0":
        b = (-8 * s.astype(np.float32)).astype(np.float16)
    return QuantTensor(np.array(w_q), s, b, bits, group)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 8])
def test_unpack_and_dequantize_match_mlx(bits):
    t = _quant_tensor(bits, 32)
    ref = mx.dequantize(mx.array(t.w_q), mx.array(t.scales).astype(mx.float32),
                        mx.array(t.biases).astype(mx.float32), 32, bits)
    assert np.array_equal(dequantize(t), np.array(ref))
    assert unpack_rows(t.w_q, bits).max() == 2**bits - 1


@pytest.mark.parametrize("bits,pattern", [(1, "mlx"), (2, "mlx"), (3, "mlx"), (4, "q4_0"),
                                          (4, "mlx"), (8, "mlx")])
def test_decompression_matches_coremltools(bits, pattern):
    from coremltools.converters.mil.mil.ops.defs.iOS18.compression import (
        constexpr_blockwise_shift_scale, constexpr_lut_to_dense)

    t = _quant_tensor(bits, 64, pattern=pattern)
    enc = encode_quant(t)
    a = enc.arrays
    if enc.kind == "lut":
        theirs = constexpr_lut_to_dense.decompress(a["indices"], a["lut"], None)
    else:
        theirs = constexpr_blockwise_shift_scale.decompress(a["data"], a["scale"], a["offset"])
    assert np.array_equal(decompress(enc), theirs)
    if enc.mapping == EXACT:  # exact: the source weight rounded once to fp16, bit for bit
        assert np.array_equal(decompress(enc), dequantize(t).astype(np.float16))
    else:  # offsets rounded to fp16: within two fp16 steps of the largest weight
        ulp = float(np.spacing(np.float16(np.abs(dequantize(t)).max())))
        assert enc.max_abs_error <= 2 * ulp


# -------------------------------------------------------------------------------------------
# One-line errors
# -------------------------------------------------------------------------------------------


def test_refusals(exported, tmp_path):
    folder, pkg, _ = exported("qwen3", "q4")
    canonical = canonical_from_mlx(folder)
    with pytest.raises(EdgertError, match="exists"):
        write_coreml(canonical, pkg, context=CONTEXT)
    with pytest.raises(EdgertError, match="max_position_embeddings"):
        write_coreml(canonical, tmp_path / "long.mlpackage", context=4096)
    with pytest.raises(EdgertError, match=".mlpackage"):
        write_coreml(canonical, tmp_path / "model.mlmodel", context=CONTEXT)
    gemma = CanonicalModel(dict(canonical.config, model_type="gemma3"), canonical.tensors, 0)
    with pytest.raises(UnsupportedError, match="gemma3"):
        write_coreml(gemma, tmp_path / "g.mlpackage", context=CONTEXT)
    # a context the model allows but whose KV cache (2 states x 2 layers x 2 heads x 32 x fp16
    # = 512 bytes per position) is over the target's limit
    long = CanonicalModel(dict(canonical.config, max_position_embeddings=1 << 24),
                          canonical.tensors, 0)
    with pytest.raises(EdgertError, match=r"8\.0 GiB KV cache.*--context 8388608 or less"):
        write_coreml(long, tmp_path / "l.mlpackage", context=1 << 24, target="iOS26")
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_interrupted_export_leaves_nothing(exported, tmp_path, monkeypatch):
    """Ctrl-C in the middle of the conversion: no package and no temporary folder remain."""
    folder, _, _ = exported("qwen3", "q4")

    def interrupt(*args, **kwargs):  # the package is written, its manifest not yet added
        raise KeyboardInterrupt

    monkeypatch.setattr("edgert.convert.coreml_writer._add_item", interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_coreml(canonical_from_mlx(folder), tmp_path / "m.mlpackage", context=CONTEXT)
    assert list(tmp_path.iterdir()) == []


# -------------------------------------------------------------------------------------------
# The Core ML engine (edgert.coreml_engine): the MLX engine's generation loop over a package
# -------------------------------------------------------------------------------------------


def test_engine_greedy_tokens_match_mlx_engine(exported):
    """generate_step (chunked prefill, then decode) over the package through the interpreter
    gives the MLX engine's greedy tokens on the same weights."""
    from edgert.coreml_engine import CoreMLModel
    from edgert.generation import generate_step

    folder, pkg, _ = exported("llama", "q4")
    coreml = CoreMLModel(pkg, backend="interpreter")
    assert coreml.backend == "interpreter"
    model, _ = load_model(folder)
    prompt = mx.array(np.random.default_rng(3).integers(0, 320, 11), dtype=mx.uint32)
    ref = [t for t, _ in generate_step(prompt, model, max_tokens=8, prefill_step_size=4)]
    cache = coreml.make_cache()
    ours = [t for t, _ in generate_step(prompt, coreml, max_tokens=8, prefill_step_size=4,
                                        prompt_cache=cache)]
    assert ours == ref
    assert cache[0].offset == 11 + 7  # the last token is sampled, not fed

    # rewind to 5 tokens (as a chat turn does) and go on: stale slots are masked, overwritten
    cache[0].trim(cache[0].offset - 5)
    again = [t for t, _ in generate_step(prompt[5:], coreml, max_tokens=8, prompt_cache=cache)]
    assert again == ref


def test_engine_refuses_what_does_not_fit(exported, tmp_path):
    from edgert.coreml_engine import CoreMLModel, read_manifest

    _, pkg, _ = exported("llama", "q4")
    coreml = CoreMLModel(pkg, backend="interpreter")
    cache = coreml.make_cache()
    cache[0].offset = CONTEXT - 2
    with pytest.raises(EdgertError, match=f"{CONTEXT + 1} tokens do not fit.*{CONTEXT}"):
        coreml(mx.array([[1, 2, 3]]), cache=cache)
    with pytest.raises(EdgertError, match="not an edgert Core ML package"):
        read_manifest(tmp_path)
    with pytest.raises(EdgertError, match="no such Core ML package"):
        read_manifest(tmp_path / "missing.mlpackage")


# -------------------------------------------------------------------------------------------
# ios_bridge: the Core ML target (not compiled here: no CoreML on Linux) parses, and the
# package speaks the manifest's names (tree-sitter's Swift grammar; the platform-independent
# core is compiled and tested by tests/test_ios_bridge.py)
# -------------------------------------------------------------------------------------------

SWIFT_ROOT = Path(__file__).resolve().parents[1] / "ios_bridge"
SWIFT_FILES = sorted([SWIFT_ROOT / "Package.swift", *(SWIFT_ROOT / "Sources").rglob("*.swift"),
                      *(SWIFT_ROOT / "Tests").rglob("*.swift")])


def _swift_parser():
    import tree_sitter
    import tree_sitter_swift

    return tree_sitter.Parser(tree_sitter.Language(tree_sitter_swift.language()))


def _syntax_errors(node) -> list[str]:
    found = []
    if node.is_error or node.is_missing:
        row, col = node.start_point
        found.append(f"{row + 1}:{col + 1} {'missing' if node.is_missing else 'error'} "
                     f"{node.type} {node.text[:40]!r}")
    for child in node.children:
        found += _syntax_errors(child)
    return found


def _declarations(root, kind: str, name: str):
    """The body of `enum`/`struct`/`class` `name` anywhere in the tree."""
    stack = [root]
    while stack:
        n = stack.pop()
        if (n.type == "class_declaration" and n.children and
                any(c.type == kind for c in n.children) and
                any(c.type == "type_identifier" and c.text.decode() == name for c in n.children)):
            return next(c for c in n.children if c.type.endswith("_body"))
        stack.extend(n.children)
    raise AssertionError(f"no {kind} {name}")


def _properties(body) -> dict[str, tuple[str, bool]]:
    """Stored `let` properties of a declaration body: name -> (initializer or type text,
    optional?)."""
    props = {}
    for n in body.children:
        if n.type != "property_declaration" or not any(
                c.type == "value_binding_pattern" and c.text == b"let" for c in n.children):
            continue  # `var`: computed
        name = next(c for c in n.children if c.type == "pattern").text.decode()
        value = n.children[-1]
        optional = any(c.type == "type_annotation" and c.text.decode().endswith("?")
                       for c in n.children)
        props[name] = (value.text.decode(), optional)
    return props


def _literal(text: str):
    return json.loads(text)  # Swift string / integer / array-of-string literals are JSON here


def test_swift_sources_parse():
    assert {f.name for f in SWIFT_FILES} >= {"Package.swift", "Manifest.swift",
                                             "CoreMLLanguageModel.swift",
                                             "CompiledModelCache.swift", "Generation.swift",
                                             "Sampling.swift", "Tokenizer.swift"}
    parser = _swift_parser()
    for f in SWIFT_FILES:
        errors = _syntax_errors(parser.parse(f.read_bytes()).root_node)
        assert not errors, f"{f.relative_to(SWIFT_ROOT)}: {errors[:3]}"
    # the checker does catch broken Swift
    assert _syntax_errors(parser.parse(b"func f(x: Int { let y = }\n").root_node)
    assert _syntax_errors(parser.parse(b"struct A { var x: [Int }\n").root_node)


def test_swift_speaks_the_manifest_of_a_real_export(exported):
    _, pkg, _ = exported("llama", "q4")
    manifest = json.loads(manifest_path(pkg).read_text())
    parser = _swift_parser()
    source = (SWIFT_ROOT / "Sources" / "EdgertCore" / "Manifest.swift").read_bytes()
    root = parser.parse(source).root_node

    io = {k: _literal(v) for k, (v, _) in _properties(_declarations(root, "enum",
                                                                    "IONames")).items()}
    written = set(manifest["functions"])
    for fn in manifest["functions"].values():
        written |= {t["name"] for kind in ("inputs", "outputs", "states") for t in fn[kind]}
    assert set(io.values()) == written
    for fn in manifest["functions"].values():  # the order Manifest.validate() expects
        assert [t["name"] for t in fn["inputs"]] == [io["inputIDs"], io["position"],
                                                      io["causalMask"]]
        assert [t["name"] for t in fn["outputs"]] == [io["logits"]]
        assert [t["name"] for t in fn["states"]] == [io["keyCache"], io["valueCache"]]
    # every name is used through IONames, never spelled out elsewhere (states are handled
    # generically: MLState holds whatever the manifest declares)
    code = "\n".join(f.read_text() for f in SWIFT_FILES if "Tests" not in f.parts)
    for member, value in io.items():
        assert member in ("keyCache", "valueCache") or f"IONames.{member}" in code, member
        assert code.count(f'"{value}"') == 1, f"{value!r} spelled out outside IONames"
    core_ml = (SWIFT_ROOT / "Sources" / "EdgertBridge" / "CoreMLLanguageModel.swift").read_text()
    for member in ("prefill", "decode", "inputIDs", "position", "causalMask", "logits"):
        assert f"IONames.{member}" in core_ml, member

    layout = {k: _literal(v) for k, (v, _) in _properties(_declarations(
        root, "enum", "PackageLayout")).items()}
    item = manifest_path(pkg).relative_to(pkg)
    assert layout["itemFolder"] + [layout["manifestFile"]] == list(item.parts)
    assert layout["format"] == manifest["format"]
    assert layout["formatVersion"] == manifest["format_version"]
    assert layout["metadataKey"] in load_package(pkg).spec.description.metadata.userDefined

    # each Decodable property is a key the writer emits (snake_case), optional ones may be null
    def snake(name: str) -> str:
        return re.sub(r"([A-Z])", lambda m: "_" + m[1].lower(), name)

    prefill = manifest["functions"]["prefill"]
    samples = {"Manifest": [manifest], "Function": list(manifest["functions"].values()),
               "Tensor": prefill["inputs"] + prefill["states"],
               "CausalMask": [manifest["causal_mask"]]}
    room = {"Tensor.source"}  # for inputs other models add (a per-layer embedding file)
    for struct, objects in samples.items():
        props = _properties(_declarations(root, "struct", struct))
        assert props, struct
        for name, (_, optional) in props.items():
            present = [snake(name) in obj for obj in objects]
            if f"{struct}.{name}" not in room:
                assert any(present) if optional else all(present), f"{struct}.{name}"
