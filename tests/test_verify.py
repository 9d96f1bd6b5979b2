"""`edgert verify`, the convert options (--bits, --group-size, --override, --requantize) and
the requantize path, against gguf-py's dequantization, torch's KL divergence and transformers."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from edgert.cli import main
from edgert.convert.api import convert_file, read_source
from edgert.convert.canonical import QuantTensor
from edgert.errors import UnsupportedError
from edgert.verify import PROMPTS, compare, reference_model, verify
from test_convert_gguf import tiny_gguf


def run(capsys, *args: str) -> tuple[int, str]:
    """`edgert ARGS` in this process, through main() (one-line errors, exit codes)."""
    try:
        main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out + out.err


def deq(t: QuantTensor) -> np.ndarray:
    return np.array(mx.dequantize(mx.array(t.w_q), mx.array(t.scales).astype(mx.float32),
                                  mx.array(t.biases).astype(mx.float32),
                                  group_size=t.group_size, bits=t.bits))


def test_metrics_match_torch():
    rng = np.random.default_rng(0)
    ref, pkg = rng.standard_normal((2, 7, 50)).astype(np.float32) * 3
    pkg[:3] = ref[:3]  # three positions identical
    v = compare([ref[:4], ref[4:]], [pkg[:4], pkg[4:]], min_top1=0.5, max_kl=1.0)
    want = torch.nn.functional.kl_div(torch.log_softmax(torch.tensor(pkg, dtype=torch.float64), -1),
                                      torch.log_softmax(torch.tensor(ref, dtype=torch.float64), -1),
                                      log_target=True, reduction="none").sum(-1)
    assert v.kl_mean == pytest.approx(want.mean().item(), rel=1e-9)
    assert v.kl_max == pytest.approx(want.max().item(), rel=1e-9)
    assert v.top1_agreement == float((ref.argmax(-1) == pkg.argmax(-1)).mean())
    assert v.max_abs_logit_error == float(np.abs(ref - pkg).max()) and v.positions == 7


def test_exact_package_verifies_against_its_gguf(smollm_package, smollm_gguf):
    v = verify(smollm_package, smollm_gguf)
    assert v.passed and v.top1_agreement == 1.0 and v.kl_mean < 1e-6, v


def test_reference_model_matches_transformers(tmp_path):
    """The reference is gguf-py's dequantization in edgert's model: same logits as
    transformers reading the GGUF."""
    import transformers

    from edgert.package import read_config

    src = tmp_path / "m.gguf"
    tiny_gguf(src, "llama", T.Q4_1, {"blk.0.ffn_down.weight": T.Q8_0})
    pkg = convert_file(src, tmp_path / "pkg", progress=False)
    model = reference_model(read_config(pkg), src)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=src.name,
                                                           dtype=torch.float32)
    ids = [[3, 17, 42, 99, 5, 64, 127, 0]]
    with torch.no_grad():
        want = hf(torch.tensor(ids)).logits[0].numpy()
    got = np.array(model(mx.array(ids)))[0]
    assert np.abs(got - want).max() < 1e-4 * np.abs(want).max()


def test_verify_command_fails_past_thresholds(smollm_gguf, tmp_path, capsys):
    """A 2-bit re-quantization of the default model fails verify with exit code 1; the JSON
    figures are the library's."""
    out = tmp_path / "q2"
    code, text = run(capsys, "convert", smollm_gguf, "-o", out, "--bits", "2", "--group-size",
                     "32", "--override", "model.embed_tokens=8")
    assert code == 0, text
    prompts = PROMPTS[:2]
    code, text = run(capsys, "verify", out, "-r", smollm_gguf, "--json",
                     *sum((["-p", p] for p in prompts), []))
    assert code == 1, text
    figures = json.loads(text[text.index("{"):text.rindex("}") + 1])
    assert not figures["passed"] and figures["kl_mean"] > 0.05
    code, text = run(capsys, "verify", out, "-r", smollm_gguf, "--max-kl", "1e9",
                     "--min-top1", "0", "-p", prompts[0])
    assert code == 0 and "PASS" in text, text
    info = json.loads((out / "edgert.json").read_text())
    embed = next(t for t in info["tensors"].values() if t["source_name"] == "token_embd.weight")
    assert (embed["bits"], embed["group_size"], embed["class"]) == (8, 32, "exact")  # Q8_0 kept
    down = next(t for t in info["tensors"].values() if t["source_name"] == "blk.0.ffn_down.weight")
    assert (down["bits"], down["group_size"], down["class"]) == (2, 32, "requantized")


def test_requantize_flags_on_gguf(tmp_path):
    """--bits/--group-size/--override re-quantize from gguf-py's dequantization, and the
    measured error is the error against it."""
    src = tmp_path / "m.gguf"
    tiny_gguf(src, "llama", T.Q8_0)
    cm = read_source(src, bits=4, group_size=32, overrides={"*.down_proj": {"bits": 0},
                                                             "model.embed_tokens": {"bits": 8}})
    for r in cm.tensors():
        if r.name.endswith("norm.weight"):
            assert r.mapping == "float"
            continue
        ref = r.reference_value()
        if "down_proj" in r.name:
            assert r.mapping == "exact" and np.array_equal(r.value, ref)
        elif "embed_tokens" in r.name:  # 8-bit g32 is the Q8_0 layout itself: kept exact
            assert r.mapping == "exact" and r.value.bits == 8 and np.array_equal(deq(r.value), ref)
        else:
            assert r.mapping == "requantized" and (r.value.bits, r.value.group_size) == (4, 32)
            assert r.max_abs_error == pytest.approx(np.abs(deq(r.value) - ref).max(), rel=1e-6)
            assert 0 < r.max_abs_error < 0.2 * np.abs(ref).max()  # about half a 4-bit step


def iq3_xxs_gguf(path: Path) -> None:
    """A tiny llama whose ffn_up tensors are IQ3_XXS: random blocks with finite f16 scales."""
    tiny_gguf(path, "llama", T.Q4_0, hidden=256, ffn=256, vocab=64)
    reader = gguf.GGUFReader(path)
    w = gguf.GGUFWriter(path.with_suffix(".iq3.gguf"), "llama")
    for f in reader.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture":
            continue
        w.add_key_value(f.name, f.contents(), f.types[0],
                        f.types[-1] if f.types[0] == gguf.GGUFValueType.ARRAY else None)
    rng = np.random.default_rng(1)
    block, size = gguf.GGML_QUANT_SIZES[T.IQ3_XXS]
    for t in reader.tensors:
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        if "ffn_up" in t.name:
            raw = rng.integers(0, 256, (shape[0], shape[1] // block, size), dtype=np.uint8)
            raw[..., :2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)
            w.add_tensor(t.name, raw.reshape(shape[0], -1), raw_dtype=T.IQ3_XXS)
        else:
            w.add_tensor(t.name, np.array(t.data), raw_dtype=t.tensor_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    path.with_suffix(".iq3.gguf").replace(path)


def test_unsupported_type_only_with_requantize(tmp_path, capsys):
    src = tmp_path / "iq3.gguf"
    iq3_xxs_gguf(src)
    with pytest.raises(UnsupportedError, match="IQ3_XXS"):
        read_source(src)
    code, text = run(capsys, "convert", src, "-o", tmp_path / "no")
    assert code != 0 and "IQ3_XXS" in text and len(text.strip().splitlines()) == 1
    assert not (tmp_path / "no").exists()
    seen = 0
    for rec in read_source(src, requantize=True).tensors():
        if rec.source_type == "IQ3_XXS":
            seen += 1
            ref = gguf.quants.dequantize(next(t for t in gguf.GGUFReader(src).tensors
                                              if t.name == rec.source_name).data, T.IQ3_XXS)
            assert rec.mapping == "requantized" and rec.value.bits == 4
            assert rec.max_abs_error == pytest.approx(np.abs(deq(rec.value) - ref).max(), rel=1e-6)
    assert seen == 2
    code, text = run(capsys, "convert", src, "-o", tmp_path / "yes", "--requantize")
    assert code == 0, text
    v = verify(tmp_path / "yes", src, prompts=("hello",), min_top1=0.0, max_kl=1e9)
    assert v.passed and v.max_abs_logit_error > 0


def test_bad_override_is_one_line(smollm_gguf, tmp_path, capsys):
    code, text = run(capsys, "convert", smollm_gguf, "-o", tmp_path / "x", "--override", "lm_head")
    assert code == 2 and "PATTERN=BITS" in text
