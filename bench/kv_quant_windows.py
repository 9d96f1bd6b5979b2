"""--kv-bits on sliding windows: the real Gemma 3 270M's teacher-forced logits with every cache
quantized, and with the global layers only quantized (all mlx-lm allows, #1573), against the
float cache. Prints one JSON line per configuration.

    python bench/kv_quant_windows.py [--prompt 520 --positions 16] [--layers 18] [--window 512]

The prompt must be longer than the window for the windows to turn over. The GGUF is the test
data's (tests/fetch_data.sh); the package is converted into a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

GGUF = Path(os.environ.get("EDGERT_TEST_DATA", Path.home() / ".cache/edgert-test-data")) / \
    "gemma3/gemma-3-270m-q4_k_m.gguf"


def main(argv=None) -> int:
    import mlx.core as mx

    from edgert.convert.api import convert_file
    from edgert.models.cache import KVCache, QuantizedKVCache, make_cache, quantize_kv
    from edgert.package import load_model
    from edgert.tokenizer import load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompt", type=int, default=520)
    ap.add_argument("--positions", type=int, default=16)
    ap.add_argument("--layers", type=int, default=None, help="keep the first N blocks")
    ap.add_argument("--window", type=int, default=None, help="override the sliding window")
    ap.add_argument("--group-size", type=int, default=64)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        package = convert_file(GGUF, Path(tmp) / "gemma3", progress=False)
        model, _ = load_model(package)
        tok = load_tokenizer(package)
    if args.layers:
        model.model.layers = model.model.layers[:args.layers]
    if args.window:
        model.args.sliding_window = args.window
    text = Path(__file__).resolve().parents[1].joinpath("README.md").read_text() * 4
    ids = tok.encode(text)[:args.prompt + args.positions]

    def logprobs(cache) -> mx.array:  # (positions, V)
        model(mx.array(ids[:args.prompt])[None], cache=cache)
        mx.eval([c.state for c in cache])
        out = model(mx.array(ids[args.prompt:])[None], cache=cache)[0]
        return out - mx.logsumexp(out, axis=-1, keepdims=True)

    ref = logprobs(make_cache(model))
    g = args.group_size
    for bits in (8, 4):
        for name, make in (("all", lambda: quantize_kv(make_cache(model), bits, g)),
                           ("global only", lambda: [QuantizedKVCache(bits, g)
                                                    if type(c) is KVCache else c
                                                    for c in make_cache(model)])):
            t0 = time.perf_counter()
            cache = make()
            got = logprobs(cache)
            kl = (mx.exp(ref) * (ref - got)).sum(-1)
            print(json.dumps({
                "bits": bits, "group": g, "quantized": name,
                "kl_mean": float(f"{kl.mean().item():.3g}"),
                "kl_max": float(f"{kl.max().item():.3g}"),
                "top1": round((got.argmax(-1) == ref.argmax(-1)).astype(mx.float32)
                              .mean().item(), 3),
                "max_abs_logprob_error": float(f"{mx.abs(got - ref).max().item():.3g}"),
                "cache_bytes": sum(c.nbytes for c in cache),
                "seconds": round(time.perf_counter() - t0, 1)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
