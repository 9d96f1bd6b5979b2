"""Gemma 3 from GGUF: a tiny random gemma3 GGUF written as llama.cpp writes them, and the real
Gemma 3 270M Q4_K_M file, each against transformers reading the same file."""

from __future__ import annotations

from pathlib import Path

import gguf
import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers
from gguf import GGMLQuantizationType as T

from edgert.convert.api import convert_file
from edgert.convert.gguf_reader import hf_config, open_gguf
from edgert.package import load_model
from testdata import data_file


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


# ------------------------------------------------------------------ a tiny gemma3 GGUF


def tiny_gemma3_gguf(path: Path, layers: int = 6, hidden: int = 64, heads: int = 2,
                     kv_heads: int = 1, head_dim: int = 256, ffn: int = 96, vocab: int = 128,
                     metadata: dict | None = None, types: dict | None = None) -> None:
    """A random gemma3 GGUF with llama.cpp's conventions: RMSNorm weights stored as 1 + w, 2-D
    tensors Q8_0 unless `types` says otherwise. `metadata` adds gemma3.* keys (name -> value).

    head_dim is 256 because transformers reads no query_pre_attn_scalar from a GGUF and keeps
    its default of 256, while llama.cpp scales by 1/sqrt(head_dim)."""
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(path, "gemma3")
    w.add_block_count(layers)
    w.add_context_length(1024)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(100000.0)
    w.add_vocab_size(vocab)
    for key, value in (metadata or {}).items():
        if isinstance(value, list):
            w.add_array(f"gemma3.{key}", value)
        elif isinstance(value, float):
            w.add_float32(f"gemma3.{key}", value)
        else:
            w.add_uint32(f"gemma3.{key}", value)
    shapes = {"token_embd.weight": (vocab, hidden), "output_norm.weight": (hidden,)}
    for i in range(layers):
        b = f"blk.{i}."
        shapes |= {b + "attn_norm.weight": (hidden,), b + "attn_q_norm.weight": (head_dim,),
                   b + "attn_k_norm.weight": (head_dim,),
                   b + "post_attention_norm.weight": (hidden,), b + "ffn_norm.weight": (hidden,),
                   b + "post_ffw_norm.weight": (hidden,),
                   b + "attn_q.weight": (heads * head_dim, hidden),
                   b + "attn_k.weight": (kv_heads * head_dim, hidden),
                   b + "attn_v.weight": (kv_heads * head_dim, hidden),
                   b + "attn_output.weight": (hidden, heads * head_dim),
                   b + "ffn_gate.weight": (ffn, hidden), b + "ffn_up.weight": (ffn, hidden),
                   b + "ffn_down.weight": (hidden, ffn)}
    for name, shape in shapes.items():
        if len(shape) == 1:  # convert_hf_to_gguf.py Gemma3Model: norm weights + 1
            w.add_tensor(name, (1 + 0.3 * rng.standard_normal(shape)).astype(np.float32))
            continue
        x = (0.2 * rng.standard_normal(shape)).astype(np.float32)
        t = (types or {}).get(name, T.Q8_0)
        w.add_tensor(name, gguf.quants.quantize(x, t), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_tiny_gemma3_matches_transformers(tmp_path):
    """Names, the norm shift, sliding-window layers and rope bases as transformers reads them;
    a window of 4 against 24 tokens, so the window matters."""
    src = tmp_path / "g.gguf"
    tiny_gemma3_gguf(src, metadata={"attention.sliding_window": 4},
                     types={"blk.0.attn_q.weight": T.Q4_0, "blk.5.ffn_down.weight": T.F16,
                            "token_embd.weight": T.Q4_1})
    pkg = convert_file(src, tmp_path / "pkg", progress=False)
    model, config = load_model(pkg)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=src.name,
                                                           dtype=torch.float32)
    for key in ("model_type", "sliding_window", "layer_types", "num_key_value_heads",
                "head_dim", "tie_word_embeddings"):
        assert config[key] == getattr(hf.config, key), key
    assert config["rope_theta"] == hf.config.rope_parameters["full_attention"]["rope_theta"]
    assert (config["rope_local_base_freq"]
            == hf.config.rope_parameters["sliding_attention"]["rope_theta"])

    theirs = hf.state_dict()
    ours = dict(mx.load(str(pkg / "model.safetensors")))
    norms = [k for k in ours if k.endswith("norm.weight")]
    assert len(norms) == 1 + 6 * 6
    for k in norms:  # transformers subtracts llama.cpp's 1 too, in float32
        assert np.array_equal(np.array(ours[k]), theirs[k].numpy()), k

    ids = np.random.default_rng(1).integers(0, 128, size=(1, 24))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    assert rel_err(np.array(model(mx.array(ids))), ref) < 1e-4


@pytest.mark.parametrize("metadata, expected", [
    ({"attention.sliding_window": 8}, "SSSSSF" "SS"),  # llama.cpp's default: every 6th is global
    ({"attention.sliding_window": 8, "attention.sliding_window_pattern": 3}, "SSF" "SSF" "SS"),
    ({"attention.sliding_window": 8,
      "attention.sliding_window_pattern": [True, False] * 4}, "SF" * 4),
    ({}, "F" * 8),  # no window: every layer global
])
def test_sliding_window_pattern(tmp_path, metadata, expected):
    src = tmp_path / "g.gguf"
    tiny_gemma3_gguf(src, layers=8, metadata=metadata | {"rope.freq_base_swa": 5000.0,
                                                          "final_logit_softcapping": 30.0})
    reader = open_gguf(src)
    config = hf_config(reader, {t.name for t in reader.tensors})
    names = {"S": "sliding_attention", "F": "full_attention"}
    assert config["layer_types"] == [names[c] for c in expected]
    assert config["sliding_window"] == metadata.get("attention.sliding_window")
    assert config["rope_local_base_freq"] == 5000.0
    assert config["final_logit_softcapping"] == 30.0
    assert config["query_pre_attn_scalar"] == config["head_dim"] == 256
    assert config["hidden_activation"] == "gelu_pytorch_tanh" and "hidden_act" not in config


# ------------------------------------------------------------------ the real Gemma 3 270M


class _MappedReader(gguf.GGUFReader):
    """gguf-py's reader over a plain ndarray view of its memory map: the same bytes, but
    transformers' two passes over the 262k-token vocabulary take ~20 s each instead of ~90 s
    (each of gguf-py's per-field slices of an np.memmap builds a new memmap object)."""

    @property
    def data(self) -> np.ndarray:
        return self._data

    @data.setter
    def data(self, value: np.memmap) -> None:
        self._data = value.view(np.ndarray)


@pytest.fixture(scope="module")
def gemma_gguf() -> Path:
    return data_file("gemma3/gemma-3-270m-q4_k_m.gguf")


@pytest.fixture(scope="module")
def gemma_package(gemma_gguf, tmp_path_factory) -> Path:
    return convert_file(gemma_gguf, tmp_path_factory.mktemp("gemma3") / "gemma-3-270m",
                        progress=False)


@pytest.fixture(scope="module")
def gemma(gemma_package):
    from edgert.tokenizer import load_tokenizer

    return load_model(gemma_package)[0], load_tokenizer(gemma_package)


@pytest.fixture(scope="module")
def transformers_gemma(gemma_gguf):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFReader", _MappedReader)
        return transformers.AutoModelForCausalLM.from_pretrained(
            gemma_gguf.parent, gguf_file=gemma_gguf.name, dtype=torch.float32)


PROMPT = "The capital of France is Paris. The capital of Germany is"


def test_real_config_as_transformers_reads_it(gemma_package, transformers_gemma):
    import json

    config = json.loads((gemma_package / "config.json").read_text())
    hf = transformers_gemma.config
    for key in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim", "sliding_window",
                "layer_types", "query_pre_attn_scalar", "vocab_size", "tie_word_embeddings",
                "max_position_embeddings", "final_logit_softcapping"):
        assert config.get(key) == getattr(hf, key), key
    assert config["rms_norm_eps"] == pytest.approx(hf.rms_norm_eps, rel=1e-6)
    assert config["rope_theta"] == hf.rope_parameters["full_attention"]["rope_theta"]
    assert (config["rope_local_base_freq"]
            == hf.rope_parameters["sliding_attention"]["rope_theta"])


def test_real_logits_match_transformers(gemma, gemma_package, transformers_gemma):
    """Top-1 identical at every position; and with the tensors the converter reports as
    re-quantized (Q6_K has no exact MLX layout) put into transformers' model as edgert holds
    them, the logits agree to float32 rounding: every other tensor maps exactly."""
    import json

    model, tok = gemma
    ids = tok.encode(PROMPT)
    ours = np.array(model(mx.array([ids])))[0]
    hf = transformers_gemma
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0].numpy()
    assert (ours.argmax(-1) == ref.argmax(-1)).all()

    report = json.loads((gemma_package / "edgert.json").read_text())["tensors"]
    lossy = [k for k, v in report.items() if v["class"] == "requantized"]
    assert all(v["class"] in ("exact", "f32-scales exact", "widened", "float")
               for k, v in report.items() if k not in lossy)
    params = dict(hf.named_parameters())
    saved = {k: params[k].detach().clone() for k in lossy}
    weights = {}
    for f in gemma_package.glob("model*.safetensors"):
        weights.update(mx.load(str(f)))
    quantization = json.loads((gemma_package / "config.json").read_text())["quantization"]
    try:
        with torch.no_grad():
            for k in lossy:
                module = k.removesuffix(".weight")
                q = quantization.get(module, quantization)
                w = mx.dequantize(weights[k], weights[f"{module}.scales"].astype(mx.float32),
                                  weights[f"{module}.biases"].astype(mx.float32),
                                  group_size=q["group_size"], bits=q["bits"])
                params[k].copy_(torch.from_numpy(np.array(w)))
            ref = hf(torch.tensor([ids])).logits[0].numpy()
    finally:
        with torch.no_grad():
            for k, v in saved.items():
                params[k].copy_(v)
    assert rel_err(ours, ref) < 1e-4


def test_real_mlx_lm_loads_the_package(gemma, gemma_package):
    """mlx-lm runs in the embedding scales' dtype (float16 here), where Gemma's residual stream
    (|h| ~ 1e5) overflows and is clipped; with float32 tables it agrees with edgert up to its
    bfloat16-rounded embedding scale (25.25 for sqrt(640) = 25.298)."""
    from mlx_lm.utils import load_model as mlx_lm_load

    model, tok = gemma
    theirs, _ = mlx_lm_load(gemma_package)
    table = theirs.model.embed_tokens
    table.scales, table.biases = table.scales.astype(mx.float32), table.biases.astype(mx.float32)
    ids = mx.array([tok.encode(PROMPT)])
    ours, theirs = np.array(model(ids))[0], np.array(theirs(ids))[0]
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()
    assert rel_err(ours, theirs) < 5e-3


def test_real_tokenizer_matches_transformers(gemma, gemma_gguf):
    _, tok = gemma
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(gguf, "GGUFReader", _MappedReader)
        hf = transformers.AutoTokenizer.from_pretrained(gemma_gguf.parent,
                                                        gguf_file=gemma_gguf.name)
    for text in ["The capital of France is Paris.", "  two  spaces,\ttabs\nand\n\n\nnewlines",
                 "emoji 🙂, 日本語, Ünïcödé, 3.14159", "def f(x):\n    return x**2  # ok",
                 "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"]:
        assert tok.encode(text) == hf.encode(text), text
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == text.replace(
            "<start_of_turn>", "").replace("<end_of_turn>", "")
    assert hf.convert_tokens_to_ids("<end_of_turn>") in tok.eos_token_ids
    assert hf.eos_token_id in tok.eos_token_ids


def test_real_greedy_chat_answer(gemma):
    """This file carries no chat template (a base model): the chat falls back to plain text."""
    from edgert.chat import ChatSession

    model, tok = gemma
    session = ChatSession(model, tok)
    text = "".join(r.text for r in session.reply("What is the capital of France?", 12, {}))
    assert "Paris" in text


def test_real_float16_request_runs_bfloat16(gemma):
    """Gemma's residual stream outgrows float16 (largest 65504), so where the loader would pick
    float16 activations (off the CPU) the model runs bfloat16."""
    from edgert.models.base import causal_mask, embed

    model, tok = gemma
    ids = mx.array([tok.encode(PROMPT)])
    h = embed(model.model.embed_tokens, ids, mx.float32) * model.args.hidden_size**0.5
    mask = causal_mask(ids.shape[1], 0)  # shorter than the window: one mask for every layer
    peak = 0.0
    for layer in model.layers:
        h = layer(h, mask)
        peak = max(peak, mx.abs(h).max().item())
    assert peak > float(np.finfo(np.float16).max)
    try:
        model.activation_dtype = mx.float16
        assert model.activation_dtype == mx.bfloat16
    finally:
        model.activation_dtype = mx.float32
