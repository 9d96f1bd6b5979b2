"""Why batched decode does or does not pay on this backend: one decode step of the default
model (SmolLM2-135M-Instruct) for B rows of a left-padded batch (edgert.batching), and the
quantized matmuls it is made of at M = 1, 2, 4 rows.

    python bench/batch_step.py [--reps 6]
"""

from __future__ import annotations

import argparse
import time

import mlx.core as mx


def timed(fn, reps: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - t) / reps


def main(argv=None) -> None:
    from edgert.batching import Batch
    from edgert.models.cache import make_cache
    from edgert.package import load

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=6)
    args = ap.parse_args(argv)
    model, tok = load(None)
    ids = tok.encode("Tell me a long story about a lighthouse keeper and the sea. " * 3)
    for B in (1, 2, 4):
        batch = Batch()
        for i in range(B):  # rows of different lengths
            cache = make_cache(model)
            model(mx.array(ids[:len(ids) - i])[None], cache=cache)
            batch.add(object(), cache)
        y = mx.array([[5]] * B, dtype=mx.uint32)  # (B, 1)
        dt = timed(lambda: mx.eval(model(y, cache=batch.layers)[:, -1, :]), args.reps)
        print(f"step B={B}: {dt * 1e3:.0f} ms, {B / dt:.2f} tok/s", flush=True)
    for N, K, bits, group in [(49152, 576, 8, 32), (1536, 576, 4, 32), (576, 1536, 4, 32)]:
        wq, s, b = mx.quantize(mx.random.normal((N, K)), group_size=group, bits=bits)
        for M in (1, 2, 4):
            x = mx.random.normal((M, K))
            dt = timed(lambda: mx.eval(mx.quantized_matmul(
                x, wq, s, b, transpose=True, group_size=group, bits=bits)), args.reps)
            print(f"qmm {N}x{K} {bits}-bit M={M}: {dt * 1e3:.1f} ms", flush=True)


if __name__ == "__main__":
    main()
