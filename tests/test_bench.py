"""edgert bench: byte accounting, synthetic models, and partial results on interruption."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import mlx.core as mx
import pytest

from edgert import bench
from edgert.errors import EdgertError
from edgert.generation import decode_forward, generate_step
from edgert.models.cache import KVCache, make_cache
from testdata import data_file


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


# ---------------------------------------------------------------------------- compiled decode

@pytest.mark.parametrize("parallel", [False, True])
def test_compiled_decode_gives_the_same_tokens_and_logprobs(small_synthetic, monkeypatch,
                                                            parallel):
    """The compiled decode step (fixed-capacity KV buffers, masked) against the plain one, bit
    for bit, across several cache growths (step shrunk to 8 positions)."""
    monkeypatch.setattr(KVCache, "step", 8)
    model, _ = bench.synthetic_model(small_synthetic, bits=4)
    if parallel:
        from edgert.parallel import parallelize

        parallelize(model, n=2, min_work=1)  # every matmul split across two streams
    prompt = mx.array([5, 17, 300, 2, 9], dtype=mx.uint32)
    plain = list(generate_step(prompt, model, max_tokens=30, compiled=False))
    fast = list(generate_step(prompt, model, max_tokens=30))
    assert [t for t, _ in fast] == [t for t, _ in plain]
    assert all(mx.array_equal(a, b).item() for (_, a), (_, b) in zip(fast, plain))


def test_compiled_decode_is_used_and_follows_a_trimmed_cache(small_synthetic):
    model, _ = bench.synthetic_model(small_synthetic, bits=4)
    cache, ref = make_cache(model), make_cache(model)
    ids = mx.array([[3, 1, 4, 1, 5, 9, 2, 6]])
    for c in (cache, ref):
        model(ids, cache=c)
        for layer in c:
            layer.trim(3)  # rewind: stale positions stay in the buffers, masked
    forward = decode_forward(model, cache)
    assert forward is not None
    for tok in (7, 8, 9):
        y = mx.array([tok], dtype=mx.uint32)
        assert mx.array_equal(forward(y), model(y[None], cache=ref)[:, -1, :]).item()
    assert cache[0].offset == ref[0].offset == 8


def test_compiled_decode_declines_foreign_caches(small_synthetic):
    model, _ = bench.synthetic_model(small_synthetic, bits=4)

    class OtherCache(KVCache):
        pass

    assert decode_forward(model, [OtherCache() for _ in model.layers]) is None


# ---------------------------------------------------------------------------- bench_peers.py

def _bench_peers():
    path = Path(__file__).resolve().parents[1] / "bench" / "bench_peers.py"
    spec = importlib.util.spec_from_file_location("bench_peers", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_peer_script_reads_a_real_llama_bench_run(smollm_gguf):
    peers = _bench_peers()
    binary = data_file("llama.cpp/bin/llama-bench")
    out = peers.run_llama_bench(binary, smollm_gguf, n_prompt=16, n_gen=4, threads=2)
    assert set(out) == {"pp16", "tg4"}
    assert all(len(v) == 1 and v[0] > 0 for v in out.values())
    assert peers.ratio([2.0, 4.0], out["tg4"]) == pytest.approx(3.0 / out["tg4"][0])


def test_peer_script_names_llama_bench_tests():
    peers = _bench_peers()
    text = ('[{"n_prompt": 512, "n_gen": 0, "samples_ts": [100.0, 110.0]},'
            ' {"n_prompt": 0, "n_gen": 128, "samples_ts": [20.0]},'
            ' {"n_prompt": 0, "n_gen": 128, "samples_ts": [30.0]}]')
    out = peers.llama_bench_results(text)
    assert out == {"pp512": [100.0, 110.0], "tg128": [20.0, 30.0]}
    assert peers.ratio([50.0, 60.0], out["tg128"]) == pytest.approx(2.2)
    rows = peers.table({"edgert": {"pp": [210.0], "tg": [50.0]},
                        "llama.cpp": {"pp": out["pp512"], "tg": out["tg128"]}}, "pp512", "tg128")
    assert rows[-1] == "| llama.cpp | 105.00 ± 5.00 | 25.00 ± 5.00 | 2.00 | 2.00 |"


def test_no_ceiling_below_a_measured_run():
    """A decode run faster than the measured bandwidth allows raises the bandwidth to what it
    implies; a known Apple chip's specification is used where it is higher."""
    r = bench.BenchReport(model="m", backend="cpu", device="?", parameters=1, size_bytes=10**8,
                          bits_per_weight=4.0, load_s=0.0, bandwidth_gbs=1.0,
                          measured_bandwidth_gbs=1.0)
    r.tests = [bench.TestResult("tg128", 0, [50.0, 60.0])]
    r.settle_bandwidth()
    assert r.bandwidth_gbs == 6.0 and "implied" in r.bandwidth_source
    assert all(row["pct_of_ceiling"] <= 100 for row in r.rows())
    mac = bench.BenchReport(model="m", backend="gpu", device="Apple M4 Pro", parameters=1,
                            size_bytes=10**9, bits_per_weight=4.0, load_s=0.0, bandwidth_gbs=200.0)
    mac.settle_bandwidth()
    assert mac.bandwidth_gbs == 273 and "specification" in mac.bandwidth_source


def test_cache_profile_counts_each_cache_kind(tmp_path):
    """Gemma 3: global layers' KV grows with depth, sliding layers' stops at the window (8)."""
    from test_models import hf_model

    from edgert.package import load_model

    hf_model("gemma3", tmp_path)  # 4 layers, every second one sliding
    model, _ = load_model(tmp_path)
    p = bench.CacheProfile.of(model)
    per = 2 * 2 * 16 * 4  # K and V, 2 kv heads, head_dim 16, float32
    assert p.kv_per_position == 2 * per and p.windows == [(per, 8), (per, 8)]
    assert p.recurrent == 0
    assert p.bytes_read(100) == 2 * per * 100 + 2 * per * 8
    assert p.bytes_read(4) == 2 * per * 4 + 2 * per * 4


@pytest.mark.parametrize("name, total, active", [
    ("gpt-oss-20b", 20.91e9, 3.61e9),  # OpenAI's model card: 20.91B total, 3.61B active
    ("qwen3.5-35b-a3b", 35e9, 3e9),  # Qwen's model card: 35B in total, 3B activated
])
def test_synthetic_moe_shapes_match_the_model_cards(name, total, active):
    """The synthetic MoE shapes (built lazily: nothing evaluated) have the published parameter
    counts: all weights, and the ones a token reads (k of E experts) without the input
    embedding, as the cards count them."""
    model = bench._build(bench.SYNTHETIC[name])
    embed = model.model.embed_tokens.weight.size
    assert bench.weight_bytes(model) // 4 == pytest.approx(total, rel=0.02)  # cards round
    assert bench.active_weight_bytes(model) // 4 - embed == pytest.approx(active, rel=0.02)
