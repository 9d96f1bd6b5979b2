"""Architectures against transformers: random-initialised HF models, same logits in float32."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
import torch
import transformers

from edgert.models.cache import make_cache
from edgert.package import load_model

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=256, max_position_embeddings=512)

CONFIGS = {
    "llama": (transformers.LlamaConfig, dict(SMALL, tie_word_embeddings=False)),
    "llama-tied-bias": (transformers.LlamaConfig,
                        dict(SMALL, tie_word_embeddings=True, attention_bias=True, mlp_bias=True)),
    "llama3-rope": (transformers.LlamaConfig, dict(SMALL, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64})),
    "mistral": (transformers.MistralConfig, dict(SMALL, head_dim=32)),
    "qwen2": (transformers.Qwen2Config, dict(SMALL, tie_word_embeddings=True)),
    "qwen3": (transformers.Qwen3Config, dict(SMALL, head_dim=32, tie_word_embeddings=False)),
    # YaRN (Qwen3's long-context setting): positions past the original context of 32
    "qwen3-yarn": (transformers.Qwen3Config, dict(SMALL, head_dim=32, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1000000.0, "factor": 4.0,
        "original_max_position_embeddings": 32})),
    # a window shorter than the prompts; query_pre_attn_scalar != head_dim; sqrt(48) is not
    # a round number, so the embedding scale's dtype shows; linear rope on global layers only
    "gemma3": (transformers.Gemma3TextConfig, dict(
        SMALL, hidden_size=48, head_dim=16, num_hidden_layers=4, sliding_window=8,
        sliding_window_pattern=2, query_pre_attn_scalar=24, final_logit_softcapping=5.0,
        rope_theta=100000.0, rope_scaling={"rope_type": "linear", "factor": 4.0})),
}


def hf_model(name: str, folder):
    cfg_cls, kw = CONFIGS[name]
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg_cls(**kw), dtype=torch.float32)
    with torch.no_grad():  # random biases and norm weights, so that they are exercised
        for n, p in model.named_parameters():
            if n.endswith(".bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    model.save_pretrained(folder)
    return model


@pytest.fixture(params=list(CONFIGS))
def pair(request, tmp_path):
    hf = hf_model(request.param, tmp_path)
    model, _ = load_model(tmp_path)
    return hf, model


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def test_logits_match_transformers(pair):
    hf, model = pair
    ids = np.random.default_rng(0).integers(0, SMALL["vocab_size"], size=(1, 100))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    out = np.array(model(mx.array(ids)))
    assert out.shape == ref.shape
    assert rel_err(out, ref) < 1e-4


def test_kv_cache_decode_matches_uncached(pair):
    _, model = pair
    ids = np.random.default_rng(1).integers(0, SMALL["vocab_size"], size=(1, 40))
    full = np.array(model(mx.array(ids)))[0]  # (40, V)
    cache = make_cache(model)
    model(mx.array(ids[:, :8]), cache=cache)  # prefill 8, then 32 single-token steps
    for t in range(8, 40):
        step = np.array(model(mx.array(ids[:, t : t + 1]), cache=cache))[0, 0]
        assert rel_err(step, full[t]) < 1e-4, f"position {t}"


@pytest.mark.parametrize("prefill_step", [4, 512])
def test_greedy_generation_matches_transformers(pair, prefill_step):
    from edgert.generation import generate_step

    hf, model = pair
    prompt = np.random.default_rng(2).integers(0, SMALL["vocab_size"], size=13)
    with torch.no_grad():
        ref = hf.generate(torch.tensor(prompt[None]), max_new_tokens=24, do_sample=False,
                          min_new_tokens=24, pad_token_id=0)[0, len(prompt):].tolist()
    ours = [t for t, _ in generate_step(mx.array(prompt, dtype=mx.uint32), model, max_tokens=24,
                                        prefill_step_size=prefill_step)]
    assert ours == ref


def test_gemma3_mlx_lm_gives_the_same_logits(tmp_path):
    """mlx-lm's gemma3_text reads the same package (it knows no softcapping or rope scaling,
    and rounds the embedding scale to bfloat16: sqrt(64) = 8 is exact there)."""
    from mlx_lm.utils import load_model as mlx_lm_load

    kw = dict(SMALL, head_dim=16, num_hidden_layers=4, sliding_window=8, sliding_window_pattern=2)
    torch.manual_seed(0)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.Gemma3TextConfig(**kw),
                                                       dtype=torch.float32)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    hf.save_pretrained(tmp_path)
    ids = np.random.default_rng(3).integers(0, SMALL["vocab_size"], size=(1, 30))
    with torch.no_grad():
        ref = hf(torch.tensor(ids)).logits.numpy()
    ours = np.array(load_model(tmp_path)[0](mx.array(ids)))
    theirs = np.array(mlx_lm_load(tmp_path)[0](mx.array(ids)))
    assert rel_err(ours, ref) < 1e-4
    assert rel_err(ours, theirs) < 1e-5


def test_gemma3_rotating_cache_decode_equals_uncached(tmp_path):
    """Sliding layers keep only their window (RotatingKVCache, window 8): greedy decode well
    past the window gives the tokens and logits of recomputing the whole sequence uncached."""
    from edgert.generation import generate_step
    from edgert.models.cache import RotatingKVCache, make_cache

    hf_model("gemma3", tmp_path)
    model, _ = load_model(tmp_path)
    kinds = {type(c).__name__ for c in make_cache(model)}
    assert kinds == {"KVCache", "RotatingKVCache"}
    prompt = mx.array([5, 17, 200, 2, 9, 11, 3, 40, 41, 42, 7], dtype=mx.uint32)  # > window
    steps = list(generate_step(prompt, model, max_tokens=20, prefill_step_size=4))
    seq = prompt.tolist()
    for token, logprobs in steps:
        full = model(mx.array(seq)[None])[0, -1]
        ref = full - mx.logsumexp(full)
        assert token == int(mx.argmax(ref).item())
        assert mx.allclose(logprobs, ref, atol=1e-4).item()
        seq.append(token)
    cache = make_cache(model)
    model(prompt[None], cache=cache)
    assert max(c.keys.shape[2] for c in cache if isinstance(c, RotatingKVCache)) == 7
