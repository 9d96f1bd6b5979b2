"""Core ML export of Gemma 4 dense text models: a random transformers gemma4_text (PLE, KV
sharing, attention_k_eq_v with its own kv heads and head_dim on full layers, a sliding window
of 4 shorter than the prompt, soft-capping) converted by edgert, the package run by edgert's
Core ML engine over the numpy MIL interpreter (the PLE rows looked up from the package's file)
against edgert's MLX engine on a package converted from the same checkpoint. Core ML itself
cannot run here (Linux)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers

from edgert.convert.api import convert_file, read_source
from edgert.convert.canonical import CanonicalModel
from edgert.convert.coreml_writer import write_coreml
from edgert.coreml_engine import CoreMLModel
from edgert.coreml_manifest import manifest_path
from edgert.errors import EdgertError, UnsupportedError
from edgert.mapped_rows import MappedRows
from edgert.mil_interpreter import count_ops, load_package, state_update_violations
from edgert.package import load_model

from test_gemma4 import PROMPT, VOCAB, randomize, text_config

CONTEXT = 40
DECODE_STEPS = 18  # 14 prompt tokens + 18: far past the window of 4
# max |logit error| / max |logit|. This random model is sensitive: rounding its weights to fp16
# alone moves the MLX engine's logits by ~5e-3 (measured, q-norm weights scaled 0.3 below;
# 4e-2 without), and the package also holds its activations, rope tables and caches in fp16.
REL_TOL = 3e-2


def save_hf(folder: Path, **over) -> None:
    """The test_gemma4 model, q-norm weights scaled by 0.3: with attention scale 1.0 and
    random unit-scale q / k norms the attention scores are so sharp that fp16 rounding
    anywhere flips them."""
    torch.manual_seed(0)
    model = transformers.Gemma4ForCausalLM(transformers.Gemma4TextConfig(**text_config(**over)))
    randomize(model.eval())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("q_norm.weight"):
                p.mul_(0.3)
    model.save_pretrained(folder)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(MLX package, Core ML package, report), 4-bit g32, from one checkpoint."""
    root = tmp_path_factory.mktemp("g4coreml")
    save_hf(root / "hf")
    mlx = convert_file(root / "hf", root / "mlx", bits=4, group_size=32, progress=False)
    report = write_coreml(read_source(root / "hf", bits=4, group_size=32),
                          root / "model.mlpackage", context=CONTEXT)
    return Path(mlx), Path(report["path"]), report


def test_prefill_and_decode_match_mlx_engine(exported):
    """Prefill of 14 tokens (window 4), then 18 decode steps: top-1 identical (unless the
    reference's runner-up is within twice the step's error) and logits close."""
    folder, pkg, _ = exported
    model, _ = load_model(folder)
    cache = model.make_cache()
    coreml = CoreMLModel(pkg, backend="interpreter")
    ccache = coreml.make_cache()
    ours = np.array(coreml(mx.array(PROMPT), cache=ccache))
    ref = np.array(model(mx.array(PROMPT), cache=cache))[:, -1:]
    worst, ties = 0.0, 0
    for step in range(DECODE_STEPS + 1):
        assert ours.shape == (1, 1, VOCAB) and np.isfinite(ours).all()
        err = float(np.abs(ours - ref).max())
        worst = max(worst, err / float(np.abs(ref).max()))
        tied = np.flatnonzero(ref.ravel() >= ref.max() - 2 * err)
        ties += len(tied) > 1
        assert ours.argmax() in tied, f"top-1 outside the reference's near-ties at {step}"
        if step == DECODE_STEPS:
            break
        token = mx.array([[int(ref.argmax())]])
        ours = np.array(coreml(token, cache=ccache))
        ref = np.array(model(token, cache=cache))
    assert ccache[0].offset == PROMPT.shape[1] + DECODE_STEPS
    assert worst < REL_TOL, f"max relative logit error {worst:.2e}"
    assert ties <= 6, f"{ties} near-tied steps"


def test_float_export_matches_fp16_weights_closely(tmp_path):
    """Without quantization, against the MLX engine on the same weights rounded to fp16 (what
    the package holds): only the program's fp16 activations, tables and caches differ."""
    from mlx.utils import tree_flatten, tree_unflatten

    save_hf(tmp_path / "hf", num_kv_shared_layers=0, hidden_size_per_layer_input=0)
    folder = convert_file(tmp_path / "hf", tmp_path / "mlx", bits=0, progress=False)
    report = write_coreml(read_source(tmp_path / "hf", bits=0), tmp_path / "m.mlpackage",
                          context=CONTEXT)
    model, _ = load_model(folder)
    model.update(tree_unflatten([(k, v.astype(mx.float16).astype(mx.float32))
                                 for k, v in tree_flatten(model.parameters())]))
    coreml = CoreMLModel(report["path"], backend="interpreter")
    ours = np.array(coreml(mx.array(PROMPT), cache=coreml.make_cache()))
    ref = np.array(model(mx.array(PROMPT)))[:, -1:]
    assert ours.argmax() == ref.argmax()
    assert np.abs(ours - ref).max() < 1e-2 * np.abs(ref).max()


def test_prefill_in_chunks_equals_one_prefill(exported):
    """The window a prefill call leaves (chunks of 5 and 6 past a window of 4) is what the
    next call continues from."""
    _, pkg, _ = exported
    coreml = CoreMLModel(pkg, backend="interpreter")
    ids = PROMPT[:, :12]
    whole = np.array(coreml(mx.array(ids), cache=coreml.make_cache()))
    cache = coreml.make_cache()
    for part in (ids[:, :5], ids[:, 5:11], ids[:, 11:]):
        last = np.array(coreml(mx.array(part), cache=cache))
    assert np.abs(last - whole).max() <= 5e-3 * np.abs(whole).max()  # a few fp16 steps


def test_engine_tokens_and_snapshots(exported):
    """generate_step over the package gives the MLX engine's greedy tokens; the cache cannot
    trim (window states), a snapshot restored gives the same continuation again."""
    from edgert.generation import generate_step
    from edgert.models.cache import restore, snapshot, trimmable

    folder, pkg, _ = exported
    coreml = CoreMLModel(pkg, backend="interpreter")
    model, _ = load_model(folder)
    prompt = mx.array(PROMPT[0], mx.uint32)
    ref = [t for t, _ in generate_step(prompt, model, max_tokens=8, prefill_step_size=4)]
    cache = coreml.make_cache()
    assert not trimmable(cache) and cache[0].trim(3) == 0
    list(generate_step(prompt[:-1], coreml, max_tokens=1, prompt_cache=cache))
    snap = snapshot(cache)
    ours = [t for t, _ in generate_step(prompt[-1:], coreml, max_tokens=8, prompt_cache=cache)]
    assert ours == ref
    restore(cache, snap)
    again = [t for t, _ in generate_step(prompt[-1:], coreml, max_tokens=8, prompt_cache=cache)]
    assert again == ref


def test_package_states_inputs_and_ple_file(exported):
    folder, pkg, report = exported
    cfg = text_config()
    package = load_package(pkg)
    # 6 layers hold caches (the last 2 are KV-shared): full 2 and 5, sliding 0, 1, 3, 4
    expected = {"key_cache": [2, 1, CONTEXT, 32], "value_cache": [2, 1, CONTEXT, 32],
                "sliding_key_cache": [4, 2, 4, 16], "sliding_value_cache": [4, 2, 4, 16]}
    width = cfg["num_hidden_layers"] * cfg["hidden_size_per_layer_input"]
    for f in package.spec.description.functions:
        assert {s.name: list(s.type.stateType.arrayType.shape) for s in f.state} == expected
        assert [i.name for i in f.input] == ["input_ids", "position", "causal_mask",
                                             "per_layer_embeddings"]
    for fn in ("prefill", "decode"):
        ops = count_ops(package, fn)
        assert ops["read_state"] == 4  # each state read once, threaded through
        assert ops["coreml_update_state"] == ops["slice_update"] == 2 * 6
        assert ops["scaled_dot_product_attention"] == cfg["num_hidden_layers"]
        assert state_update_violations(package, fn) == []
    manifest = json.loads(manifest_path(pkg).read_text())
    kinds = {s["name"]: s["kind"] for s in manifest["functions"]["decode"]["states"]}
    assert kinds == {"key_cache": "kv_cache", "value_cache": "kv_cache",
                     "sliding_key_cache": "window", "sliding_value_cache": "window"}
    (extra,) = manifest["functions"]["prefill"]["inputs"][3:]
    assert extra["shape"] == [1, -1, width] and extra["dtype"] == "float16"
    src = extra["source"]
    assert src["kind"] == "embedding_rows" and src["ids"] == "input_ids"
    assert src["shape"] == [VOCAB, width]
    assert src["quantization"] == {"bits": 4, "group_size": 32, "mode": "affine"}
    # the table is not in the program: weight.bin holds no row of it; the file the package
    # carries holds the MLX package's table
    assert not any("per_layer." in n or n.startswith("model.embed_tokens_per_layer")
                   for n in report["tensors"])
    ours = manifest_path(pkg).parent / src["path"]
    assert src["bytes"] == ours.stat().st_size == report["summary"]["package_files"][src["path"]]
    a = MappedRows.open(ours, src["tensor"], (VOCAB, width), src["quantization"])
    q = json.loads((folder / "config.json").read_text())["quantization"]
    b = MappedRows.open(folder / src["path"], src["tensor"], (VOCAB, width), q)
    ids = mx.array([[0, 5, VOCAB - 1]])
    assert np.array_equal(np.array(a(ids, mx.float32)), np.array(b(ids, mx.float32)))


# -------------------------------------------------------------------------------------------
# Bad input
# -------------------------------------------------------------------------------------------


@pytest.fixture
def package_copy(exported, tmp_path):
    _, pkg, _ = exported
    copy = tmp_path / "copy.mlpackage"
    shutil.copytree(pkg, copy)
    manifest = json.loads(manifest_path(copy).read_text())
    ple = manifest_path(copy).parent / manifest["functions"]["decode"]["inputs"][3]["source"]["path"]
    return copy, ple


def test_ple_file_missing(package_copy, tmp_path):
    from test_cli import assert_one_line_error, run

    pkg, ple = package_copy
    ple.unlink()
    with pytest.raises(EdgertError, match=r"per-layer embedding file .* is missing") as e:
        CoreMLModel(pkg, backend="interpreter")
    assert "\n" not in str(e.value)
    assert_one_line_error(run("generate", str(pkg), "-p", "hi", env_home=tmp_path),
                          "per-layer embedding file", "is missing")


def test_ple_file_short(package_copy):
    pkg, ple = package_copy
    data = ple.read_bytes()
    ple.write_bytes(data[: len(data) - 100])
    with pytest.raises(EdgertError, match="shorter than the .* table it should hold"):
        CoreMLModel(pkg, backend="interpreter")


def test_ple_source_outside_the_package_or_unknown(package_copy):
    pkg, _ = package_copy
    path = manifest_path(pkg)
    manifest = json.loads(path.read_text())
    src = manifest["functions"]["decode"]["inputs"][3]["source"]
    src["path"] = "../../../etc/passwd"
    path.write_text(json.dumps(manifest))
    with pytest.raises(EdgertError, match="outside the package"):
        CoreMLModel(pkg, backend="interpreter")
    src["kind"] = "telepathy"
    path.write_text(json.dumps(manifest))
    with pytest.raises(UnsupportedError, match="'telepathy'"):
        CoreMLModel(pkg, backend="interpreter")


def test_moe_variant_is_refused(exported, tmp_path):
    folder, _, _ = exported
    canonical = read_source(folder.parent / "hf", bits=4, group_size=32)
    moe = CanonicalModel(dict(canonical.config, enable_moe_block=True, num_experts=4,
                              top_k_experts=2, moe_intermediate_size=32),
                         canonical.tensors, 0)
    with pytest.raises(UnsupportedError, match="mixture-of-experts"):
        write_coreml(moe, tmp_path / "moe.mlpackage", context=CONTEXT)
    assert not list(tmp_path.iterdir())
