"""Core ML export of the hybrid family (Qwen3.5: Gated DeltaNet + gated attention): random
transformers models converted by edgert, the package run op by op by the numpy MIL interpreter
against edgert's MLX engine on a package converted from the same checkpoint (prefill, then
decode steps), 4-bit and 1-bit. Core ML itself cannot run here (Linux)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers

from edgert.convert.api import convert_file, read_source
from edgert.convert.coreml_writer import MASK_VALUE, manifest_path, write_coreml
from edgert.errors import EdgertError
from edgert.mil_interpreter import (InterpreterSession, count_ops, load_package,
                                    state_update_violations)
from edgert.package import load_model

CONTEXT = 48
PROMPT, DECODE_STEPS = 9, 16
REL_TOL = 5e-3  # max |logit error| / max |logit|: fp16 weights, activations and states
L, F = "linear_attention", "full_attention"
TEXT = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=272, linear_conv_kernel_dim=4, linear_key_head_dim=16,
            linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
            max_position_embeddings=256,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "partial_rotary_factor": 0.5, "mrope_section": [2, 1, 1],
                             "mrope_interleaved": True})
VISION = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64,
              patch_size=4, num_position_embeddings=16)
# name -> (wrapper, text config, bits); layer 0 linear (the mask must not come from it)
CASES = {
    "text-untied-q4": ("text", dict(TEXT, num_hidden_layers=3, layer_types=[L, F, L],
                                    tie_word_embeddings=False), 4),
    "vl-tied-q1": ("vl", dict(TEXT, num_hidden_layers=3, layer_types=[L, L, F],
                              tie_word_embeddings=True), 1),
}


def hf_qwen3_5(wrapper: str, text: dict, folder: Path) -> None:
    """A random transformers Qwen3.5 checkpoint (text-only or the VL wrapper) in `folder`."""
    torch.manual_seed(0)
    if wrapper == "text":
        model = transformers.Qwen3_5ForCausalLM(transformers.Qwen3_5TextConfig(**text))
    else:
        cfg = transformers.Qwen3_5Config(text_config=text, vision_config=VISION,
                                         tie_word_embeddings=text["tie_word_embeddings"])
        model = transformers.Qwen3_5ForConditionalGeneration(cfg)
    with torch.no_grad():  # random norms and gates, so that they are exercised
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith(("dt_bias", "A_log")):
                p.add_(torch.randn_like(p) * 0.1)
    model.float().save_pretrained(folder)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """case -> (MLX package, Core ML package, report), built once from one checkpoint."""
    built = {}

    def get(case: str):
        if case not in built:
            wrapper, text, bits = CASES[case]
            root = tmp_path_factory.mktemp(case)
            hf_qwen3_5(wrapper, text, root / "hf")
            convert_file(root / "hf", root / "mlx", bits=bits, group_size=32)
            report = write_coreml(read_source(root / "hf", bits=bits, group_size=32),
                                  root / "model.mlpackage", context=CONTEXT)
            built[case] = root / "mlx", Path(report["path"]), report
        return built[case]

    return get


def step_inputs(ids: np.ndarray, position: int) -> dict:
    rows = position + np.arange(ids.shape[1])[:, None]
    mask = np.where(np.arange(CONTEXT)[None] <= rows, 0.0, MASK_VALUE).astype(np.float16)
    return {"input_ids": ids.astype(np.int32), "position": np.array([position], np.int32),
            "causal_mask": mask[None, None]}


@pytest.mark.parametrize("case", list(CASES))
def test_prefill_and_decode_match_mlx_engine(exported, case):
    folder, pkg, report = exported(case)
    assert report["summary"]["classes"].get("float", 0) > 0  # conv1d, A_log, norms
    model, _ = load_model(folder)
    cache = model.make_cache()
    session = InterpreterSession(pkg)
    ids = np.random.default_rng(1).integers(0, TEXT["vocab_size"], (1, PROMPT))
    ours = session.predict("prefill", step_inputs(ids, 0))["logits"]
    ref = np.array(model(mx.array(ids), cache=cache))[:, -1:]
    position, worst = PROMPT, 0.0
    for step in range(DECODE_STEPS + 1):
        assert ours.shape == (1, 1, TEXT["vocab_size"]) and ours.dtype == np.float32
        err = float(np.abs(ours - ref).max())
        worst = max(worst, err / float(np.abs(ref).max()))
        tied = np.flatnonzero(ref.ravel() >= ref.max() - 2 * err)
        assert ours.argmax() in tied, f"top-1 outside the reference's near-ties at {step}"
        if step == DECODE_STEPS:
            break
        token = np.array([[ref.argmax()]])
        ours = session.predict("decode", step_inputs(token, position))["logits"]
        ref = np.array(model(mx.array(token), cache=cache))
        position += 1
    assert worst < REL_TOL, f"max relative logit error {worst:.2e}"


def test_engine_tokens_and_snapshots(exported):
    """edgert's Core ML engine over the package (interpreter backend): the MLX engine's greedy
    tokens; its cache cannot trim (recurrent states), and a snapshot restored after the prompt
    gives the same continuation again."""
    from edgert.coreml_engine import CoreMLModel
    from edgert.generation import generate_step
    from edgert.models.cache import restore, snapshot, trimmable

    folder, pkg, _ = exported("vl-tied-q1")
    coreml = CoreMLModel(pkg, backend="interpreter")
    model, _ = load_model(folder)
    prompt = mx.array(np.random.default_rng(3).integers(0, TEXT["vocab_size"], 11), mx.uint32)
    ref = [t for t, _ in generate_step(prompt, model, max_tokens=8, prefill_step_size=4)]
    cache = coreml.make_cache()
    assert not trimmable(cache) and cache[0].trim(3) == 0
    list(generate_step(prompt[:-1], coreml, max_tokens=1, prompt_cache=cache))
    snap = snapshot(cache)  # after the prompt's first 10 tokens and one sampled token
    assert cache[0].offset == 10
    ours = [t for t, _ in generate_step(prompt[-1:], coreml, max_tokens=8, prompt_cache=cache)]
    assert ours == ref
    restore(cache, snap)
    again = [t for t, _ in generate_step(prompt[-1:], coreml, max_tokens=8, prompt_cache=cache)]
    assert again == ref


def test_prefill_in_chunks_equals_one_prefill(exported):
    """The conv and delta states one prefill call leaves are what the next call continues."""
    _, pkg, _ = exported("text-untied-q4")
    ids = np.random.default_rng(2).integers(0, TEXT["vocab_size"], (1, 12))
    whole = InterpreterSession(pkg).predict("prefill", step_inputs(ids, 0))["logits"]
    parts = InterpreterSession(pkg)
    parts.predict("prefill", step_inputs(ids[:, :5], 0))
    parts.predict("prefill", step_inputs(ids[:, 5:11], 5))
    last = parts.predict("decode", step_inputs(ids[:, 11:], 11))["logits"]
    assert np.abs(last - whole).max() <= 1e-3 * np.abs(whole).max()


def test_package_states_and_manifest(exported):
    _, pkg, _ = exported("text-untied-q4")
    package = load_package(pkg)
    kv = [1, 2, CONTEXT, 16]  # one full-attention layer
    conv, delta = [2, 3, 2 * 32 + 64], [2, 4, 16, 16]  # two linear layers: (K-1, C), (Hv, Dv, Dk)
    expected = {"key_cache": kv, "value_cache": kv, "conv_state": conv, "delta_state": delta}
    for f in package.spec.description.functions:
        got = {s.name: list(s.type.stateType.arrayType.shape) for s in f.state}
        assert got == expected
    for fn in ("prefill", "decode"):
        ops = count_ops(package, fn)
        assert ops["read_state"] == 4  # each state read once, then threaded through
        # (the loop's own slice_update, of its output rows, sits inside the while_loop)
        assert ops["coreml_update_state"] == ops["slice_update"] == 2 + 2 * 2
        assert ops["scaled_dot_product_attention"] == 1
        assert ops.get("while_loop", 0) == (2 if fn == "prefill" else 0)
        assert state_update_violations(package, fn) == []

    manifest = json.loads(manifest_path(pkg).read_text())
    assert manifest == package.manifest
    states = manifest["functions"]["decode"]["states"]
    assert manifest["functions"]["prefill"]["states"] == states
    assert {s["name"]: s["shape"] for s in states} == expected
    kinds = {s["name"]: s["kind"] for s in states}
    assert kinds == {"key_cache": "kv_cache", "value_cache": "kv_cache",
                     "conv_state": "recurrent", "delta_state": "recurrent"}
    assert all(s["dtype"] == "float16" and s["bytes"] == 2 * np.prod(s["shape"]) for s in states)
    assert manifest["state_bytes"] == {"kv_cache": 2 * 2 * np.prod(kv),
                                       "recurrent": 2 * (np.prod(conv) + np.prod(delta)),
                                       "total": sum(s["bytes"] for s in states)}


def test_state_too_large_for_the_target(tmp_path):
    """A recurrent state over the target's limit at any context: one line, non-zero exit,
    nothing written. 1 linear layer, one 50048 x 50048 head: a 4.7 GiB delta state from 9 M
    weights."""
    big = dict(TEXT, hidden_size=32, intermediate_size=32, num_attention_heads=1,
               num_key_value_heads=1, head_dim=32, num_hidden_layers=1, layer_types=[L],
               linear_key_head_dim=50048, linear_value_head_dim=50048, linear_num_key_heads=1,
               linear_num_value_heads=1, tie_word_embeddings=True)
    src = tmp_path / "hf"
    model = transformers.Qwen3_5ForCausalLM(transformers.Qwen3_5TextConfig(**big))
    model.save_pretrained(src)
    out = tmp_path / "out"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-m", "edgert", "convert", str(src), "--to",
                           "coreml", "-o", str(out / "big.mlpackage")],
                          capture_output=True, text=True, timeout=300)
    err = proc.stderr.strip()
    assert proc.returncode != 0 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "recurrent states need 4.7 GiB" in err and "iOS18" in err, err
    assert list(out.iterdir()) == []


def test_context_too_long_counts_the_recurrent_state(exported, tmp_path):
    folder, _, _ = exported("text-untied-q4")
    hf = folder.parent / "hf"
    canonical = read_source(hf, bits=4, group_size=32)
    canonical.config["max_position_embeddings"] = 1 << 26
    with pytest.raises(EdgertError, match=r"KV cache \(\+ 5\.5 KiB recurrent\).*--context"):
        write_coreml(canonical, tmp_path / "l.mlpackage", context=1 << 26)
    assert not list(tmp_path.iterdir())


# -------------------------------------------------------------------------------------------
# The interpreter's while_loop against numpy
# -------------------------------------------------------------------------------------------


def test_interpreter_while_loop_matches_numpy(tmp_path):
    """A MIL while_loop (a decaying outer-product recurrence over the rows of a flexible-length
    input, the shape of the delta rule's scan) saved, loaded back and run by the interpreter:
    the same as the loop in numpy."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import types

    @mb.program(input_specs=[mb.TensorSpec((ct.RangeDim(1, 16).symbol, 3), types.fp32)],
                opset_version=ct.target.iOS18)
    def prog(x):
        n = mb.gather(x=mb.shape(x=x), indices=0, axis=0)

        def cond(t, s, acc):
            return mb.less(x=t, y=n)

        def body(t, s, acc):
            row = mb.reshape(x=mb.gather(x=x, indices=t, axis=0), shape=[3, 1])
            s = mb.add(x=mb.mul(x=s, y=np.float32(0.9)),
                       y=mb.matmul(x=row, y=row, transpose_y=True))  # (3, 3)
            acc = mb.add(x=acc, y=mb.reduce_sum(x=s))
            return mb.add(x=t, y=np.int32(1)), s, acc

        _, s, acc = mb.while_loop(_cond=cond, _body=body,
                                  loop_vars=(np.int32(0), np.zeros((3, 3), np.float32),
                                             np.float32(0.0)))
        return mb.identity(x=s, name="s"), mb.identity(x=acc, name="acc")

    model = ct.convert(prog, convert_to="mlprogram", minimum_deployment_target=ct.target.iOS18,
                       compute_precision=ct.precision.FLOAT32, skip_model_load=True)
    model.save(str(tmp_path / "loop.mlpackage"))
    session = InterpreterSession(tmp_path / "loop.mlpackage")
    for n in (1, 7):
        x = np.random.default_rng(n).standard_normal((n, 3)).astype(np.float32)
        s, acc = np.zeros((3, 3)), 0.0
        for row in x:
            s = 0.9 * s + np.outer(row, row)
            acc += s.sum()
        out = session.predict("main", {"x": x})
        np.testing.assert_allclose(out["s"], s, rtol=1e-5)
        np.testing.assert_allclose(out["acc"], acc, rtol=1e-5)
