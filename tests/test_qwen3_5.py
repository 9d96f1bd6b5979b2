"""Qwen3.5 (Gated DeltaNet + gated attention) against transformers, mlx-lm and itself:
random-initialised HF models from small configs, converted with edgert's converter."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers

from edgert.convert.api import convert_file
from edgert.errors import EdgertError
from edgert.models import gated_delta as gd
from edgert.models.cache import KVCache, RecurrentCache, make_cache
from edgert.package import load_model

VOCAB = 272  # the byte-level test tokenizer's 256 bytes + specials, padded
TEXT = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=VOCAB, linear_conv_kernel_dim=4, linear_key_head_dim=16,
            linear_value_head_dim=8, linear_num_key_heads=2, linear_num_value_heads=4,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                             "partial_rotary_factor": 0.5})
L, F = "linear_attention", "full_attention"
VISION = dict(depth=1, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=64,
              patch_size=4, num_position_embeddings=16)

# name -> (wrapper, text config); layer 0 is linear everywhere (masks must not come from it)
CONFIGS = {
    "text-irregular-untied": ("text", dict(TEXT, num_hidden_layers=5,
                                           layer_types=[L, F, L, L, F], tie_word_embeddings=False)),
    "text-tied": ("text", dict(TEXT, num_hidden_layers=3, layer_types=[L, L, F],
                               tie_word_embeddings=True)),
    "vl-interval4": ("vl", dict(TEXT, num_hidden_layers=4, layer_types=[L, L, L, F],
                                tie_word_embeddings=False)),
    "vl-tied": ("vl", dict(TEXT, num_hidden_layers=3, layer_types=[L, F, L],
                           tie_word_embeddings=True)),
}


def hf_qwen3_5(name: str, folder: Path, **changes):
    """A random transformers Qwen3.5 model (text-only or the VL wrapper), saved to `folder`;
    `changes` go into its text config."""
    wrapper, text = CONFIGS[name]
    text = dict(text, **changes)
    torch.manual_seed(0)
    if wrapper == "text":
        model = transformers.Qwen3_5ForCausalLM(transformers.Qwen3_5TextConfig(**text))
    else:
        cfg = transformers.Qwen3_5Config(text_config=text, vision_config=VISION,
                                         tie_word_embeddings=text["tie_word_embeddings"])
        model = transformers.Qwen3_5ForConditionalGeneration(cfg)
    model = model.to(torch.float32)
    with torch.no_grad():  # random norm weights and gates, so that they are exercised
        for n, p in model.named_parameters():
            if "norm" in n or n.endswith(("dt_bias", "A_log")):
                p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    model.save_pretrained(folder)
    return model


def hf_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


_CONVERTED: dict[str, tuple] = {}


def convert_once(name: str, tmp_path_factory) -> tuple:
    """(name, transformers model, float package, its edgert model), made once per session."""
    if name not in _CONVERTED:
        folder = tmp_path_factory.mktemp(name)
        hf = hf_qwen3_5(name, folder / "hf")
        package = convert_file(folder / "hf", folder / "pkg", bits=0, progress=False)
        _CONVERTED[name] = (name, hf, package, load_model(package)[0])
    return _CONVERTED[name]


@pytest.fixture(scope="module", params=list(CONFIGS))
def converted(request, tmp_path_factory):
    return convert_once(request.param, tmp_path_factory)


IDS = np.random.default_rng(0).integers(0, VOCAB, size=(1, 80))


def test_logits_match_transformers(converted):
    _, hf, _, model = converted
    ref = hf_logits(hf, IDS)
    out = np.array(model(mx.array(IDS)))
    assert out.shape == ref.shape
    assert rel_err(out, ref) < 1e-4
    assert (out.argmax(-1) == ref.argmax(-1)).all()


def test_cache_kinds_follow_layer_types(converted):
    name, _, _, model = converted
    kinds = [type(c) for c in make_cache(model)]
    want = [RecurrentCache if t == L else KVCache for t in CONFIGS[name][1]["layer_types"]]
    assert kinds == want


def test_cached_decode_matches_uncached(converted):
    _, _, _, model = converted
    ids = IDS[:, :40]
    full = np.array(model(mx.array(ids)))[0]  # (40, V)
    cache = make_cache(model)
    model(mx.array(ids[:, :8]), cache=cache)  # prefill 8, then 32 single-token steps
    for t in range(8, 40):
        step = np.array(model(mx.array(ids[:, t : t + 1]), cache=cache))[0, 0]
        assert rel_err(step, full[t]) < 1e-4, f"position {t}"
    conv, delta = cache[0][0], cache[0][1]
    assert conv.shape == (1, 3, 2 * 2 * 16 + 4 * 8) and delta.shape == (1, 4, 8, 16)
    assert delta.dtype == mx.float32


def test_quantized_default_4bit(converted, tmp_path):
    """The default conversion (4-bit g64): conv1d, A_log, dt_bias and norms stay float; logits
    near the float model's, top-1 mostly the same."""
    name, hf, _, model = converted
    folder = tmp_path / "hf"
    hf.save_pretrained(folder)
    package = convert_file(folder, tmp_path / "q4", progress=False)
    config = json.loads((package / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 64
    from safetensors import safe_open

    with safe_open(str(next(package.glob("model*.safetensors"))), "np") as f:
        names = set(f.keys())
    assert not any(n.endswith(("conv1d.scales", "A_log.scales", "dt_bias.scales", "norm.scales"))
                   for n in names)
    assert any(n.endswith("in_proj_qkv.scales") for n in names)
    q4, _ = load_model(package)
    ref = np.array(model(mx.array(IDS)))
    out = np.array(q4(mx.array(IDS)))
    assert rel_err(out, ref) < 0.2  # 4-bit of random weights
    assert (out.argmax(-1) == ref.argmax(-1)).mean() > 0.6


# mlx-lm places full attention every full_attention_interval (4) layers and ignores
# layer_types: only configs whose layers follow that pattern are comparable.
MLX_LM_COMPARABLE = ["vl-interval4"]


@pytest.mark.parametrize("name", MLX_LM_COMPARABLE)
def test_mlx_lm_loads_the_package(name, tmp_path_factory):
    """mlx-lm (its own qwen3_5 model and sanitize) reads edgert's package: same logits."""
    _, _, package, model = convert_once(name, tmp_path_factory)
    from mlx_lm.utils import load_model as mlx_lm_load

    theirs, _ = mlx_lm_load(Path(package))
    ref = np.array(theirs(mx.array(IDS)))
    out = np.array(model(mx.array(IDS)))
    assert rel_err(out, ref) < 1e-4
    assert (out.argmax(-1) == ref.argmax(-1)).all()


# ------------------------------------------------------------------ the recurrence's forms


def _random_inputs(T: int, Hk: int = 2, Hv: int = 4, Dk: int = 32, Dv: int = 16, seed: int = 0):
    keys = mx.random.split(mx.random.key(seed), 6)
    q = gd.l2_normalize(mx.random.normal((1, T, Hk, Dk), key=keys[0])) * Dk**-0.5
    k = gd.l2_normalize(mx.random.normal((1, T, Hk, Dk), key=keys[1]))
    v = mx.random.normal((1, T, Hv, Dv), key=keys[2])
    g, beta = gd.decay_and_rate(mx.random.normal((1, T, Hv), key=keys[3]),
                                mx.random.normal((1, T, Hv), key=keys[4]),
                                mx.log(mx.random.uniform(0.5, 16, (Hv,), key=keys[5])),
                                mx.ones((Hv,)))
    state = mx.random.normal((1, Hv, Dv, Dk), key=keys[0]) * 0.1
    return q, k, v, g, beta, state


@pytest.mark.parametrize("T,chunk", [(1, 64), (5, 4), (77, 16), (130, 64)])
def test_chunked_equals_sequential(T, chunk):
    q, k, v, g, beta, state = _random_inputs(T)
    ref, ref_state = gd.recurrent(q, k, v, g, beta, state)
    out, out_state = gd.chunked(q, k, v, g, beta, state, chunk=chunk)
    assert float(mx.abs(out - ref).max()) < 1e-5
    assert float(mx.abs(out_state - ref_state).max()) < 1e-5


def test_fused_kernel_equals_sequential():
    """mx.fast.gated_delta_update where this device runs it (it does on MLX 0.32's CPU)."""
    if not gd.fused_available():
        pytest.skip("mx.fast.gated_delta_update does not run on this device")
    q, k, v, g, beta, state = _random_inputs(50)
    ref, ref_state = gd.recurrent(q, k, v, g, beta, state)
    out, out_state = gd.gated_delta(q, k, v, g, beta, state, use_fused=True)
    assert float(mx.abs(out - ref).max()) < 1e-5
    assert float(mx.abs(out_state - ref_state).max()) < 1e-5


def test_model_prefill_chunked_equals_sequential(converted, monkeypatch):
    """The whole model with the fused kernel off: a long prefill (chunked) equals feeding the
    same tokens one at a time (the recurrence itself)."""
    _, _, _, model = converted
    monkeypatch.setattr(gd, "fused_available", lambda: False)
    ids = IDS[:, :70]
    cache = make_cache(model)
    chunked = np.array(model(mx.array(ids), cache=cache))[0, -1]
    seq_cache = make_cache(model)
    for t in range(ids.shape[1]):
        seq = np.array(model(mx.array(ids[:, t : t + 1]), cache=seq_cache))[0, 0]
    assert rel_err(chunked, seq) < 1e-4


# ------------------------------------------------------------------ bad input


def _config(folder: Path, **changes) -> Path:
    cfg = dict(TEXT, model_type="qwen3_5_text", num_hidden_layers=3, layer_types=[L, L, F])
    cfg.update(changes)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


@pytest.mark.parametrize("changes,message", [
    (dict(layer_types=[L, F]), "layer_types has 2 entries for 3 layers"),
    (dict(num_key_value_heads=3), "num_attention_heads (4) is not a multiple of "
                                  "num_key_value_heads (3)"),
    (dict(linear_num_value_heads=5), "linear_num_value_heads (5) is not a multiple of "
                                     "linear_num_key_heads (2)"),
])
def test_bad_config_one_line_error(tmp_path, changes, message):
    from edgert.models import get_classes

    cfg = json.loads((_config(tmp_path, **changes) / "config.json").read_text())
    _, args_cls = get_classes("qwen3_5_text")
    with pytest.raises(EdgertError) as e:
        args_cls.from_dict(cfg)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_config_cli_exit(tmp_path):
    """`edgert convert` of a folder whose layer_types disagree: one line, non-zero exit,
    nothing written."""
    import subprocess
    import sys

    src = tmp_path / "hf"
    hf_qwen3_5("text-tied", src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["layer_types"] = cfg["layer_types"][:2]
    (src / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "pkg"
    r = subprocess.run([sys.executable, "-m", "edgert", "convert", str(src), "-o", str(out)],
                       capture_output=True, text=True)
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "layer_types has 2 entries for 3 layers" in lines[0]
    assert not out.exists()


# ------------------------------------------------------------------ chat with snapshots

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_char_tokenizer(folder: Path) -> int:
    """A character-level tokenizer (printable ASCII and newline, one token each, plus ChatML
    specials) with a Qwen-style ChatML template; returns its vocabulary size. Every id decodes
    to text that encodes back to the same id, so replies re-enter the history unchanged."""
    from tokenizers import Tokenizer, decoders, models

    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    tok = Tokenizer(models.BPE({c: i for i, c in enumerate(chars)}, [], unk_token=None))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>", "<|endoftext|>"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|im_end|>", "chat_template": CHATML}))
    return tok.get_vocab_size()


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    from edgert.tokenizer import load_tokenizer

    folder = tmp_path_factory.mktemp("chat")
    (folder / "hf").mkdir()
    vocab = write_char_tokenizer(folder / "hf")
    hf_qwen3_5("text-irregular-untied", folder / "hf", vocab_size=vocab)
    package = convert_file(folder / "hf", folder / "pkg", bits=0, progress=False)
    return load_model(package)[0], load_tokenizer(package)


def test_chat_snapshots_equal_a_fresh_run(chat_model):
    """Three turns on a hybrid model: each reply has exactly the tokens of a fresh session over
    the whole conversation so far; turns 2 and 3 feed only the tokens after the cached ones."""
    from edgert.chat import ChatSession

    model, tok = chat_model
    users = ["Hello there", "What is 2+2?", "And 3+3?"]
    session = ChatSession(model, tok)
    for turn, user in enumerate(users):
        before = list(session.cached)
        history = list(session.messages)
        tokens = [r.token for r in session.reply(user, 12, {"temp": 0.0})]
        prompt = tok.encode(tok.apply_chat_template(history + [{"role": "user", "content": user}]),
                            add_special_tokens=False)
        if turn == 0:
            assert session.fed == len(prompt)
        else:
            assert before and prompt[: len(before)] == before
            assert session.fed == len(prompt) - len(before) < len(prompt) // 2
        fresh = ChatSession(model, tok)
        fresh.messages = history
        assert [r.token for r in fresh.reply(user, 12, {"temp": 0.0})] == tokens
        assert fresh.fed == len(prompt)
