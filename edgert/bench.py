"""`edgert bench`: llama-bench-style pp/tg tests, memory, and the bandwidth ceiling.

Decode is bound by memory bandwidth: every decoded token reads every weight once plus the KV
cache, so ceiling tok/s = bandwidth / bytes per token. Runs report the fraction reached.
"""

from __future__ import annotations

import os
import resource
import statistics
import time
from dataclasses import asdict, dataclass, field

import mlx.core as mx
import numpy as np
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import EdgertError
from .generation import generate_step
from .models.cache import make_cache

# Unified-memory bandwidth of Apple chips, GB/s, as Apple specifies them (A-series: LPDDR
# transfer rate x bus width, as reported). Projections from these are labelled as such.
APPLE_BANDWIDTH_GBS = {
    "M1": 68.25, "M1 Pro": 200, "M1 Max": 400, "M1 Ultra": 800,
    "M2": 100, "M2 Pro": 200, "M2 Max": 400, "M2 Ultra": 800,
    "M3": 100, "M3 Pro": 150, "M3 Max": 400, "M3 Ultra": 819,
    "M4": 120, "M4 Pro": 273, "M4 Max": 546,
    "A17 Pro": 51.2, "A18 Pro": 60, "A19 Pro": 76.8,
}

# Published decode / prefill figures (shared/design.md), for context beside our own numbers.
PUBLISHED = [
    ("M4 Pro (273 GB/s)", "Bonsai 8B 1-bit, MLX", 131, 472),
    ("M4 Pro", "Bonsai 8B Q1_0, llama.cpp Metal", "85–117", "~490"),
    ("iPhone 17 Pro Max", "Bonsai 8B 1-bit, MLX Swift", 44, 377),
    ("M1 Max", "Llama-3.1-8B Core ML int4, stateful KV", 33.7, None),
    ("M4 Max", "Qwen3-4B 4-bit, mlx-lm", 134.5, 1622),
    ("M4 Pro / M4 Max / M2 Ultra", "Llama-2-7B Q4_0, llama.cpp", "50.7 / 83.1 / 94.3", "440 / 886 / 1239"),
]

# Shapes of the synthetic models (HF config fields).
SYNTHETIC = {
    # Qwen3.5-9B's text model (transformers' Qwen3_5TextConfig defaults): 24 Gated DeltaNet and
    # 8 gated full-attention layers
    "qwen3.5-9b": dict(model_type="qwen3_5_text", hidden_size=4096, num_hidden_layers=32,
                       intermediate_size=12288, num_attention_heads=16, num_key_value_heads=4,
                       head_dim=256, linear_num_key_heads=16, linear_num_value_heads=32,
                       linear_key_head_dim=128, linear_value_head_dim=128,
                       vocab_size=248320, tie_word_embeddings=False),
    # Qwen3.6-27B / Bonsai-27B shapes: 48 linear and 16 full-attention layers
    "qwen3.6-27b": dict(model_type="qwen3_5_text", hidden_size=5120, num_hidden_layers=64,
                        intermediate_size=17408, num_attention_heads=24, num_key_value_heads=4,
                        head_dim=256, linear_num_key_heads=16, linear_num_value_heads=48,
                        linear_key_head_dim=128, linear_value_head_dim=128,
                        vocab_size=248320, tie_word_embeddings=False),
    "qwen3-8b": dict(model_type="qwen3", hidden_size=4096, num_hidden_layers=36,
                     intermediate_size=12288, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, vocab_size=151936, tie_word_embeddings=False),
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32,
                         intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                         vocab_size=128256, rope_theta=500000.0, tie_word_embeddings=False),
    "qwen3-4b": dict(model_type="qwen3", hidden_size=2560, num_hidden_layers=36,
                     intermediate_size=9728, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "qwen3-1.7b": dict(model_type="qwen3", hidden_size=2048, num_hidden_layers=28,
                       intermediate_size=6144, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, vocab_size=151936, tie_word_embeddings=True),
}
SYNTHETIC["bonsai-8b"] = SYNTHETIC["qwen3-8b"]  # Bonsai 8B is a 1-bit Qwen3-8B
# Qwen3-30B-A3B: 48 layers of 128 experts, 8 per token (~17 GiB at 4 bits, ~1.7 GiB read a token)
SYNTHETIC["qwen3-30b-a3b"] = dict(
    model_type="qwen3_moe", hidden_size=2048, num_hidden_layers=48, intermediate_size=6144,
    num_attention_heads=32, num_key_value_heads=4, head_dim=128, vocab_size=151936,
    num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=True,
    tie_word_embeddings=False)
# gpt-oss-20b: 24 layers (sliding 128 / full alternating) of 32 experts, 4 per token (experts
# MXFP4 in the published checkpoint; here at --bits like the rest)
SYNTHETIC["gpt-oss-20b"] = dict(
    model_type="gpt_oss", hidden_size=2880, num_hidden_layers=24, intermediate_size=2880,
    num_attention_heads=64, num_key_value_heads=8, head_dim=64, vocab_size=201088,
    num_local_experts=32, num_experts_per_tok=4, sliding_window=128,
    rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0, "factor": 32.0,
                     "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False,
                     "original_max_position_embeddings": 4096}, tie_word_embeddings=False)
# Qwen3.5-35B-A3B (transformers' Qwen3_5MoeTextConfig defaults): 30 Gated DeltaNet and 10 full
# attention layers, each with 256 experts (8 per token) and a shared expert
SYNTHETIC["qwen3.5-35b-a3b"] = dict(
    model_type="qwen3_5_moe_text", hidden_size=2048, num_hidden_layers=40, intermediate_size=512,
    num_attention_heads=16, num_key_value_heads=2, head_dim=256, linear_num_key_heads=16,
    linear_num_value_heads=32, linear_key_head_dim=128, linear_value_head_dim=128,
    num_experts=256, num_experts_per_tok=8, moe_intermediate_size=512,
    shared_expert_intermediate_size=512, vocab_size=248320, tie_word_embeddings=False)

# Gemma 4 26B-A4B's text model (google/gemma-4-26B-A4B config.json): 30 layers, 5 sliding (1024)
# to 1 full (head_dim 512, 2 kv heads, k as v), each with a dense GeGLU MLP (2112) and beside it
# 128 experts (704 wide), 8 per token; no PLE, tied 262144-row embedding (25.2 B, 3.8 B active)
SYNTHETIC["gemma4-26b-a4b"] = dict(
    model_type="gemma4_text", hidden_size=2816, num_hidden_layers=30, intermediate_size=2112,
    num_attention_heads=16, num_key_value_heads=8, head_dim=256, global_head_dim=512,
    num_global_key_value_heads=2, attention_k_eq_v=True, sliding_window=1024,
    vocab_size=262144, hidden_size_per_layer_input=0, final_logit_softcapping=30.0,
    enable_moe_block=True, num_experts=128, top_k_experts=8, moe_intermediate_size=704,
    tie_word_embeddings=True)


@dataclass
class TestResult:
    test: str  # llama-bench name: "pp512", "tg128"
    depth: int  # tokens already in the KV cache
    tokens_per_s: list[float] = field(default_factory=list)

    @property
    def mean(self) -> float:
        return statistics.mean(self.tokens_per_s) if self.tokens_per_s else 0.0

    @property
    def std(self) -> float:
        return statistics.pstdev(self.tokens_per_s) if len(self.tokens_per_s) > 1 else 0.0


def weight_bytes(model: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def kv_bytes_per_token(model: nn.Module) -> int:
    """Bytes of K and V one position adds to the cache, over all layers."""
    a = model.args
    itemsize = 4 if model.activation_dtype == mx.float32 else 2
    return 2 * a.num_hidden_layers * a.num_key_value_heads * a.head_dim * itemsize


def bytes_per_decoded_token(model: nn.Module, depth: int) -> int:
    """Every weight a token reads once (k of E experts in MoE layers), plus the caches."""
    return active_weight_bytes(model) + CacheProfile.of(model).bytes_read(depth)


def _top_k(model: nn.Module) -> int | None:
    return getattr(model.args, "num_experts_per_tok", None)


def active_weight_bytes(model: nn.Module) -> int:
    """Bytes of weights one decoded token reads: all of them, except that of each layer's E
    stacked experts (edgert.models.switch) only the k routed to are read."""
    from .models.switch import QuantizedSwitchLinear, SwitchLinear

    total, k = weight_bytes(model), _top_k(model)
    for _, m in model.named_modules():
        if isinstance(m, (SwitchLinear, QuantizedSwitchLinear)) and k:
            e = m["weight"].shape[0]
            total -= sum(v.nbytes for _, v in tree_flatten(m.parameters())) * (e - k) // e
    return total


def expected_experts_touched(num_experts: int, k: int, n_tokens: int) -> float:
    """Distinct experts a prefill of n tokens reads per MoE layer, routing uniform and
    independent: E (1 - (1 - k/E)^n)."""
    return num_experts * (1 - (1 - k / num_experts) ** n_tokens)


@dataclass
class CacheProfile:
    """What one decoded token reads of each cache kind (edgert.models.cache): full-attention
    KV grows with depth; a sliding window's stops growing at its window; a recurrent state is
    read and written once per token whatever the depth."""

    kv_per_position: int = 0  # full-attention layers, bytes per cached position
    windows: list = field(default_factory=list)  # [(bytes per position, window)] per rotating layer
    recurrent: int = 0  # bytes of recurrent state, all layers

    def bytes_read(self, depth: int) -> int:
        window = sum(b * min(depth, w) for b, w in self.windows)
        return self.kv_per_position * depth + window + 2 * self.recurrent

    @classmethod
    def of(cls, model: nn.Module) -> "CacheProfile":
        """Measured on the model's own caches after one token."""
        from .models.cache import KVCache, RecurrentCache, RotatingKVCache

        cache = make_cache(model)
        model(mx.zeros((1, 1), mx.uint32), cache=cache)
        mx.eval([c.state for c in cache])
        profile = cls()
        for c in cache:
            if isinstance(c, RecurrentCache):
                profile.recurrent += c.nbytes
            elif isinstance(c, (KVCache, RotatingKVCache)) and c.keys is not None:
                per = (c.keys.nbytes // c.keys.shape[2]) + (c.values.nbytes // c.values.shape[2])
                if isinstance(c, RotatingKVCache):
                    profile.windows.append((per, c.window))
                else:
                    profile.kv_per_position += per
        return profile


def measure_bandwidth(nbytes: int = 1 << 30, reps: int = 5) -> float:
    """Memory bandwidth in GB/s, the best of two measures. On the CPU, as STREAM measures it:
    every core reads its share of an array far larger than the caches (numpy reductions in
    threads, which release the GIL), read-dominated as decoding is; and a copy through MLX
    split across one stream per core (bytes read + written). On a GPU, the device's own copy."""
    from .parallel import cpu_streams

    cpu = mx.default_device() == mx.cpu
    n = max(1, os.cpu_count() or 1) if cpu else 1
    best = _threaded_read_gbs(nbytes, n, reps) if cpu else 0.0
    streams = cpu_streams(min(n, 8)) if n > 1 else [mx.default_stream(mx.default_device())]
    parts = [mx.random.uniform(shape=(nbytes // 4 // len(streams),)) for _ in streams]
    mx.eval(parts)
    for _ in range(reps + 1):
        tic = time.perf_counter()
        out = [mx.multiply(p, 1.0001, stream=s) for p, s in zip(parts, streams)]
        mx.eval(out)
        best = max(best, 2 * nbytes / (time.perf_counter() - tic) / 1e9)
        del out
    return best


def _threaded_read_gbs(nbytes: int, threads: int, reps: int) -> float:
    from concurrent.futures import ThreadPoolExecutor

    a = np.ones(nbytes // 8, np.int64)
    chunks = np.array_split(a, threads * 4)
    best = 0.0
    with ThreadPoolExecutor(threads) as pool:
        for _ in range(reps + 1):
            tic = time.perf_counter()
            list(pool.map(np.sum, chunks))
            best = max(best, a.nbytes / (time.perf_counter() - tic) / 1e9)
    return best


def chip_bandwidth_gbs(device_name: str) -> float | None:
    """Apple's specified bandwidth for a chip named like "Apple M4 Pro", if known."""
    name = device_name.removeprefix("Apple ").strip()
    return APPLE_BANDWIDTH_GBS.get(name)


def run_pp(model, n_prompt: int, depth: int) -> float:
    """Prefill n_prompt tokens after `depth` tokens already cached; tokens per second."""
    cache = make_cache(model)
    vocab = model.args.vocab_size
    if depth:
        ctx = mx.random.randint(0, vocab, (1, depth))
        model(ctx, cache=cache)
        mx.eval([c.state for c in cache])
    prompt = mx.random.randint(0, vocab, (1, n_prompt))
    mx.eval(prompt)
    tic = time.perf_counter()
    for start in range(0, n_prompt, 512):
        model(prompt[:, start:start + 512], cache=cache)
        mx.eval([c.state for c in cache])
    return n_prompt / (time.perf_counter() - tic)


def run_tg(model, n_gen: int, depth: int) -> float:
    """Generate n_gen tokens greedily after `depth` cached tokens; tokens per second."""
    cache = make_cache(model)
    vocab = model.args.vocab_size
    prompt = mx.random.randint(0, vocab, (max(depth, 1),)).astype(mx.uint32)
    gen = generate_step(prompt, model, max_tokens=n_gen + 1, prompt_cache=cache)
    next(gen)  # prefill and the first token are not part of tg
    tic = time.perf_counter()
    count = sum(1 for _ in gen)
    return count / (time.perf_counter() - tic)


def rss_peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def available_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _build(config: dict, layers: int | None = None):
    """The model of a config (lazy: nothing evaluated), cut to `layers` layers if given."""
    from .models import get_classes

    if layers is not None:
        config = dict(config, num_hidden_layers=layers)
    model_cls, args_cls = get_classes(config["model_type"])
    return model_cls(args_cls.from_dict(config))


def layers_that_fit(config: dict, bits: int, group_size: int, budget: int) -> int:
    """How many of the config's layers fit in `budget` bytes at `bits` (0 if none)."""
    one, two = (estimate_quantized_bytes(_build(config, n), bits, group_size) for n in (1, 2))
    per_layer = two - one
    return max(0, min(config["num_hidden_layers"], int((budget - (one - per_layer)) // per_layer)))


def synthetic_model(name: str, bits: int, group_size: int = 64, layers: int | None = None):
    """A model of a known shape built directly in quantized form from random bits; `layers`
    cuts it to its first layers (config["cut_from_layers"] then says how many it has).

    MLX is lazy: the float weights a fresh QuantizedLinear would hold are replaced before
    anything is evaluated, so no float copy of the weights is ever materialised."""
    from .package import activation_dtype

    if name not in SYNTHETIC:
        raise EdgertError(f"unknown synthetic model {name!r} (known: {', '.join(SYNTHETIC)})")
    config = dict(SYNTHETIC[name], rms_norm_eps=1e-6, max_position_embeddings=40960)
    full = config["num_hidden_layers"]
    if layers is not None:
        if not 0 < layers <= full:
            raise EdgertError(f"--layers {layers}: {name} has 1..{full} layers")
        config.update(num_hidden_layers=layers, cut_from_layers=full)
    model = _build(config)
    need = estimate_quantized_bytes(model, bits, group_size)
    avail = available_memory_bytes()
    if need > 0.8 * avail:
        fit = layers_that_fit(config, bits, group_size, int(0.8 * avail))
        hint = f"; --layers {fit} would fit" if fit else ""
        raise EdgertError(f"synthetic {name} at {bits}-bit needs ~{need / 2**30:.1f} GiB, "
                          f"only {avail / 2**30:.1f} GiB available: refusing rather than "
                          f"swapping{hint}")
    nn.quantize(model, group_size, bits)
    params = []
    for k, v in tree_flatten(model.parameters()):
        if k.endswith(".weight") and v.dtype == mx.uint32:
            v = mx.random.randint(-(2**31), 2**31 - 1, v.shape, dtype=mx.int32).view(mx.uint32)
        elif k.endswith(".scales"):
            v = (mx.random.uniform(shape=v.shape) * 0.02 / 2**bits).astype(mx.float16)
        elif k.endswith(".biases"):
            v = (mx.random.uniform(shape=v.shape) * -0.01).astype(mx.float16)
        else:
            v = mx.ones(v.shape, mx.float16)
        params.append((k, v))
    model.load_weights(params)
    mx.eval(model.parameters())
    model.activation_dtype = activation_dtype({})
    model.eval()
    return model, config


def estimate_quantized_bytes(model: nn.Module, bits: int, group_size: int) -> int:
    from .models.switch import SwitchLinear

    total = 0
    for _, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Embedding, SwitchLinear)):
            n = m.weight.size  # shape only: nothing is evaluated
            total += n * bits // 8 + 2 * 2 * n // group_size
    return total


@dataclass
class BenchReport:
    model: str
    backend: str
    device: str
    parameters: int
    size_bytes: int
    bits_per_weight: float
    load_s: float
    bandwidth_gbs: float = 0.0
    ttft_s: float = 0.0
    tests: list[TestResult] = field(default_factory=list)
    peak_mlx_bytes: int = 0
    peak_rss_bytes: int = 0
    kv_bytes_per_token: int = 0
    cache: CacheProfile = field(default_factory=CacheProfile)
    measured_bandwidth_gbs: float = 0.0
    bandwidth_source: str = "measured"
    active_fraction: float = 1.0  # of the weights, what one decoded token reads (MoE: k of E)
    experts: tuple[int, int] | None = None  # (k, E) for MoE models
    layers: tuple[int, int] | None = None  # (run, full) for a cut synthetic model
    complete: bool = False
    stopped_by: str | None = None

    def settle_bandwidth(self) -> None:
        """The bandwidth the ceilings use: the measured one, raised to the chip's specified
        figure where that is known and higher, and to what the fastest decode run implies
        where that is higher still (a ceiling a measured run exceeds is no ceiling)."""
        spec = chip_bandwidth_gbs(self.device)
        if spec and spec > self.bandwidth_gbs:
            self.bandwidth_gbs, self.bandwidth_source = spec, f"Apple's specification ({spec} GB/s)"
        implied = max((max(t.tokens_per_s) * self.bytes_per_token(t.depth) / 1e9
                       for t in self.tests if t.test.startswith("tg")), default=0.0)
        if implied > self.bandwidth_gbs:
            self.bandwidth_gbs = round(implied, 2)
            self.bandwidth_source = ("implied by the fastest decode run (the measured "
                                     f"{self.measured_bandwidth_gbs} GB/s was lower)")

    def bytes_per_token(self, depth: int) -> float:
        """Weights a decoded token reads (MoE: k of E experts) plus what each cache kind
        reads at this depth."""
        return self.size_bytes * self.active_fraction + self.cache.bytes_read(depth)

    def ceiling(self, depth: int) -> float:
        """Bandwidth-bound decode tok/s on this device at this depth."""
        per_token = self.bytes_per_token(depth)
        return self.bandwidth_gbs * 1e9 / per_token if self.bandwidth_gbs else 0.0

    def rows(self) -> list[dict]:
        out = []
        for t in self.tests:
            row = {"test": t.test, "depth": t.depth, "tok_s": round(t.mean, 3),
                   "std": round(t.std, 3), "reps": len(t.tokens_per_s)}
            if t.test.startswith("tg") and self.bandwidth_gbs:
                ceil = self.ceiling(t.depth)
                row.update(ceiling_tok_s=round(ceil, 2), pct_of_ceiling=round(100 * t.mean / ceil, 1))
            if t.test.startswith("pp") and self.experts:
                k, e = self.experts
                row["experts_touched"] = round(expected_experts_touched(e, k, int(t.test[2:])), 1)
            out.append(row)
        return out

    def projections(self, depth: int = 0) -> list[dict]:
        """This package's decode ceiling on Apple chips, from their bandwidth (projections)."""
        per_token = self.bytes_per_token(depth)
        return [{"chip": chip, "bandwidth_gbs": bw, "ceiling_tok_s": round(bw * 1e9 / per_token, 1)}
                for chip, bw in APPLE_BANDWIDTH_GBS.items()]

    def to_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "tests"}
        d["results"] = self.rows()
        d["projections"] = self.projections()
        return d


def load_for_bench(model_arg: str | None, synthetic: str | None, bits: int, group_size: int,
                   layers: int | None = None):
    """(model, label, size in bytes) for a package / GGUF / the default, or a synthetic model
    (cut to `layers` layers, labelled so)."""
    from pathlib import Path

    if synthetic:
        model, config = synthetic_model(synthetic, bits, group_size, layers)
        label = f"synthetic {synthetic} {bits}-bit g{group_size}"
        if "cut_from_layers" in config:
            label += f" (cut: {config['num_hidden_layers']} of {config['cut_from_layers']} layers)"
        return model, label, weight_bytes(model)
    from .convert.api import ensure_package
    from .package import load_model

    path = ensure_package(model_arg)
    model, _ = load_model(path)
    mapped = tuple(getattr(model, "package_files", {}).values())  # looked up, not read whole
    size = sum(f.stat().st_size for f in Path(path).glob("model*.safetensors")
               if f.name not in mapped) + getattr(model, "mapped_bytes_per_token", 0)
    return model, str(path), size


def run_bench(model_arg: str | None = None, *, synthetic: str | None = None, bits: int = 4,
              group_size: int = 64, n_prompt: list[int] = (512,), n_gen: list[int] = (128,),
              reps: int = 3, depths: list[int] = (0,), warmup: bool = True,
              on_result=None, layers: int | None = None) -> BenchReport:
    """Run the tests; an interruption or an out-of-memory error returns what was measured so
    far with `stopped_by` set."""
    mx.reset_peak_memory()
    tic = time.perf_counter()
    model, label, size = load_for_bench(model_arg, synthetic, bits, group_size, layers)
    load_s = time.perf_counter() - tic
    params = sum(_param_count(m) for _, m in model.named_modules() if _is_weight_layer(m))
    report = BenchReport(
        model=label, backend=str(mx.default_device()).split("(")[-1].split(",")[0],
        device=mx.device_info().get("device_name", "?") if hasattr(mx, "device_info") else "?",
        parameters=params, size_bytes=size, bits_per_weight=round(8 * size / max(params, 1), 3),
        load_s=round(load_s, 3), cache=CacheProfile.of(model),
        active_fraction=round(active_weight_bytes(model) / max(weight_bytes(model), 1), 6))
    report.kv_bytes_per_token = report.cache.kv_per_position
    if (k := _top_k(model)) and (e := getattr(model.args, "num_experts", None)
                                 or getattr(model.args, "num_local_experts", None)):
        report.experts = (k, e)
    if synthetic and layers is not None:
        report.layers = (layers, SYNTHETIC[synthetic]["num_hidden_layers"])
    try:
        report.bandwidth_gbs = report.measured_bandwidth_gbs = round(measure_bandwidth(), 2)
        if warmup:
            run_pp(model, 16, 0)
            run_tg(model, 2, 0)
        t0 = time.perf_counter()
        g = generate_step(mx.random.randint(0, model.args.vocab_size, (  # no pp tests: 16
            n_prompt[0] if n_prompt else 16,)).astype(
            mx.uint32), model, max_tokens=1)
        next(g)
        report.ttft_s = round(time.perf_counter() - t0, 4)
        g.close()
        for depth in depths:
            for p in n_prompt:
                r = TestResult(f"pp{p}", depth)
                report.tests.append(r)
                for _ in range(reps):
                    r.tokens_per_s.append(run_pp(model, p, depth))
                if on_result:
                    on_result(r)
            for n in n_gen:
                r = TestResult(f"tg{n}", depth)
                report.tests.append(r)
                for _ in range(reps):
                    r.tokens_per_s.append(run_tg(model, n, depth))
                if on_result:
                    on_result(r)
        report.complete = True
    except KeyboardInterrupt:
        report.stopped_by = "interrupted"
    except (MemoryError, RuntimeError) as e:
        if "memory" not in str(e).lower() and not isinstance(e, MemoryError):
            raise
        report.stopped_by = f"out of memory: {e}"
    report.tests = [t for t in report.tests if t.tokens_per_s]
    report.settle_bandwidth()
    report.peak_mlx_bytes = mx.get_peak_memory()
    report.peak_rss_bytes = rss_peak_bytes()
    return report


def _is_weight_layer(m) -> bool:
    from .models.switch import QuantizedSwitchLinear, SwitchLinear

    return isinstance(m, (nn.Linear, nn.Embedding, nn.QuantizedLinear, nn.QuantizedEmbedding,
                          SwitchLinear, QuantizedSwitchLinear))


def _param_count(m) -> int:
    w = m["weight"]
    bits = getattr(m, "bits", None)
    return w.size * 32 // bits if bits and w.dtype == mx.uint32 else w.size


# ---------------------------------------------------------------------------- reports

def to_csv(report: BenchReport) -> str:
    import csv
    import io

    rows = report.rows()
    buf = io.StringIO()
    cols = ["model", "backend", "test", "depth", "tok_s", "std", "reps", "ceiling_tok_s",
            "pct_of_ceiling"]
    w = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow(dict(r, model=report.model, backend=report.backend))
    return buf.getvalue()


def to_markdown(report: BenchReport) -> str:
    lines = [f"**{report.model}** — {report.backend} ({report.device}), "
             f"{report.size_bytes / 2**20:.1f} MiB, {report.bits_per_weight} bpw, "
             f"bandwidth {report.bandwidth_gbs} GB/s ({report.bandwidth_source})", "",
             "| test | depth | tok/s | ceiling tok/s | % of ceiling |", "|---|---:|---:|---:|---:|"]
    for r in report.rows():
        lines.append(f"| {r['test']} | {r['depth']} | {r['tok_s']:.2f} ± {r['std']:.2f} | "
                     f"{r.get('ceiling_tok_s', '')} | {r.get('pct_of_ceiling', '')} |")
    lines += [f"\n{line}" for line in moe_notes(report)]
    return "\n".join(lines) + "\n"


def moe_notes(report: BenchReport) -> list[str]:
    """What a token reads of an MoE model, and how a cut model's figures scale."""
    notes = []
    if report.experts:
        k, e = report.experts
        notes.append(f"MoE: {k} of {e} experts per layer per token; a decoded token reads "
                     f"{report.size_bytes * report.active_fraction / 2**20:.0f} MiB of the "
                     f"{report.size_bytes / 2**20:.0f} MiB ({100 * report.active_fraction:.1f}%)"
                     + "".join(f"; pp{int(r['test'][2:])} touches ~{r['experts_touched']} "
                               f"experts per layer" for r in report.rows() if "experts_touched" in r))
    if report.layers:
        run, full = report.layers
        tg = [r for r in report.rows() if r["test"].startswith("tg")]
        scaled = "".join(f"; {r['test']} ×{run}/{full} ≈ {r['tok_s'] * run / full:.2f} tok/s"
                         for r in tg)
        notes.append(f"cut: {run} of {full} layers were run (memory); full-depth figures scale "
                     f"by about {run}/{full} (embeddings and head not rescaled){scaled}")
    return notes


def print_report(report: BenchReport) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    t = Table(title=f"{report.model} · {report.backend} ({report.device})")
    for col in ("test", "depth", "tok/s", "ceiling tok/s", "% of ceiling"):
        t.add_column(col, justify="right" if col != "test" else "left")
    for r in report.rows():
        t.add_row(r["test"], str(r["depth"]), f"{r['tok_s']:.2f} ± {r['std']:.2f}",
                  f"{r['ceiling_tok_s']:.1f}" if "ceiling_tok_s" in r else "",
                  f"{r['pct_of_ceiling']:.1f}%" if "pct_of_ceiling" in r else "")
    console.print(t)
    console.print(
        f"load {report.load_s:.2f} s · time to first token {report.ttft_s * 1e3:.0f} ms · "
        f"peak MLX {report.peak_mlx_bytes / 2**20:.0f} MiB · peak RSS "
        f"{report.peak_rss_bytes / 2**20:.0f} MiB · size {report.size_bytes / 2**20:.1f} MiB · "
        f"{report.parameters / 1e6:.1f} M params · {report.bits_per_weight} bpw · "
        f"bandwidth {report.bandwidth_gbs} GB/s ({report.bandwidth_source})")
    for line in moe_notes(report):
        console.print(line)
    p = Table(title="projection: this package's decode ceiling on Apple chips (bandwidth ÷ bytes "
                    "per token, depth 0)")
    for col in ("chip", "GB/s", "ceiling tok/s"):
        p.add_column(col, justify="right" if col != "chip" else "left")
    for r in report.projections():
        p.add_row(r["chip"], f"{r['bandwidth_gbs']:g}", f"{r['ceiling_tok_s']:.1f}")
    console.print(p)
    pub = Table(title="published figures for reference (not measured here)")
    for col in ("device", "model", "decode tok/s", "prefill tok/s"):
        pub.add_column(col)
    for dev, model, tg, pp in PUBLISHED:
        pub.add_row(dev, model, str(tg), str(pp or "–"))
    console.print(pub)
    m4 = APPLE_BANDWIDTH_GBS["M4 Pro"] * 1e9 / report.size_bytes
    console.print(f"On an M4 Pro (273 GB/s) this package's ceiling is {m4:.0f} tok/s "
                  f"(projection); Bonsai 8B reached 131.")
    if report.stopped_by:
        console.print(f"[red]stopped early ({report.stopped_by}); results above are partial[/red]")


def plot(report: BenchReport, out_dir) -> list:
    """PNG charts: decode vs depth, prefill vs prompt length, and a roofline."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from pathlib import Path

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    tg = [t for t in report.tests if t.test.startswith("tg")]
    pp = [t for t in report.tests if t.test.startswith("pp")]
    if tg:
        fig, ax = plt.subplots(figsize=(6, 4))
        depths = sorted({t.depth for t in tg})
        ax.errorbar(depths, [statistics.mean([t.mean for t in tg if t.depth == d]) for d in depths],
                    yerr=[max(t.std for t in tg if t.depth == d) for d in depths], marker="o",
                    label="measured")
        ax.plot(depths, [report.ceiling(d) for d in depths], "--", label="bandwidth ceiling")
        ax.set(xlabel="depth (tokens in KV cache)", ylabel="decode tok/s", title=report.model)
        ax.legend()
        written.append(out_dir / "decode_vs_depth.png")
        fig.savefig(written[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    if pp:
        fig, ax = plt.subplots(figsize=(6, 4))
        lengths = [int(t.test[2:]) for t in pp if t.depth == pp[0].depth]
        ax.errorbar(lengths, [t.mean for t in pp if t.depth == pp[0].depth],
                    yerr=[t.std for t in pp if t.depth == pp[0].depth], marker="o")
        ax.set(xlabel="prompt length (tokens)", ylabel="prefill tok/s", title=report.model)
        written.append(out_dir / "prefill_vs_length.png")
        fig.savefig(written[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    if tg and report.bandwidth_gbs:
        # Roofline in tokens: achieved bytes/s against the measured bandwidth.
        fig, ax = plt.subplots(figsize=(6, 4))
        for t in tg:
            bytes_tok = report.bytes_per_token(t.depth)
            ax.bar(f"{t.test}@{t.depth}", t.mean * bytes_tok / 1e9)
        ax.axhline(report.bandwidth_gbs, color="red", linestyle="--", label="measured bandwidth")
        ax.set(ylabel="effective GB/s read", title="decode roofline")
        ax.legend()
        written.append(out_dir / "roofline.png")
        fig.savefig(written[-1], dpi=120, bbox_inches="tight")
        plt.close(fig)
    return written
