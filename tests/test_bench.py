"""edgert bench: byte accounting, synthetic models, and partial results on interruption."""

from __future__ import annotations

import mlx.core as mx
import pytest

from edgert import bench
from edgert.errors import EdgertError


@pytest.fixture(scope="module")
def small_synthetic():
    bench.SYNTHETIC["tiny-test"] = dict(
        model_type="qwen3", hidden_size=128, num_hidden_layers=2, intermediate_size=256,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, vocab_size=1000,
        tie_word_embeddings=True)
    yield "tiny-test"
    del bench.SYNTHETIC["tiny-test"]


def test_synthetic_model_is_quantized_with_the_requested_bits(small_synthetic):
    model, _ = bench.synthetic_model(small_synthetic, bits=1, group_size=64)
    assert model.model.layers[0].mlp.up_proj.bits == 1
    # packed 1-bit weights plus f16 scales and biases per 64 weights: 1.5 bits per weight
    n = 128 * 256
    up = model.model.layers[0].mlp.up_proj
    assert up.weight.nbytes + up.scales.nbytes + up.biases.nbytes == n // 8 + 2 * 2 * n // 64


def test_bytes_per_token_counts_weights_once_plus_kv(small_synthetic):
    model, _ = bench.synthetic_model(small_synthetic, bits=4)
    w = bench.weight_bytes(model)
    kv = 2 * 2 * 2 * 32 * 4  # K and V, 2 layers, 2 kv heads, head_dim 32, float32 on CPU
    assert bench.kv_bytes_per_token(model) == kv
    assert bench.bytes_per_decoded_token(model, 100) == w + 100 * kv


def test_synthetic_refuses_what_does_not_fit(monkeypatch):
    monkeypatch.setattr(bench, "available_memory_bytes", lambda: 2 * 2**30)
    with pytest.raises(EdgertError, match="refusing"):
        bench.synthetic_model("llama-3.1-8b", bits=4)


def test_interrupted_run_keeps_partial_results(small_synthetic, monkeypatch):
    calls = {"n": 0}
    real = bench.run_tg

    def flaky_tg(model, n, depth):
        calls["n"] += 1
        if calls["n"] > 2:  # warm-up and the first repetition succeed
            raise KeyboardInterrupt
        return real(model, n, depth)

    monkeypatch.setattr(bench, "run_tg", flaky_tg)
    report = bench.run_bench(synthetic=small_synthetic, n_prompt=[16], n_gen=[4], reps=2)
    assert not report.complete and report.stopped_by == "interrupted"
    tests = {t.test: len(t.tokens_per_s) for t in report.tests}
    assert tests == {"pp16": 2, "tg4": 1}
    rows = report.rows()
    assert rows[1]["ceiling_tok_s"] > 0 and 0 < rows[1]["pct_of_ceiling"]


def test_bandwidth_is_measured(monkeypatch):
    assert bench.measure_bandwidth(nbytes=1 << 24, reps=2) > 0.1  # GB/s
