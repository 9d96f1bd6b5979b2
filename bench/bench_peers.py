"""edgert against mlx-lm on the same MLX package, interleaved in one process.

    .venv/bin/python bench/bench_peers.py [PACKAGE_OR_GGUF] [-p 512] [-n 128] [-r 3]

pp: prefill of P prompt tokens (time to the first sampled token, fresh cache).
tg: decode of N tokens after a one-token prompt (greedy).
mlx-lm runs the package as it loads it; its activations follow the scales' dtype (float16),
which its CPU kernels run slowly, so it also runs with float16 parameters cast to float32.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map


def cast_f16_to_f32(model) -> None:
    model.update(tree_map(lambda p: p.astype(mx.float32) if p.dtype == mx.float16 else p,
                          model.parameters()))
    mx.eval(model.parameters())


def time_prefill(step_fn, model, prompt: mx.array) -> float:
    tic = time.perf_counter()
    gen = step_fn(prompt, model, max_tokens=1)
    tok, _ = next(gen)
    _ = tok if isinstance(tok, int) else tok.item()
    dt = time.perf_counter() - tic
    gen.close()
    return prompt.size / dt


def time_decode(step_fn, model, n: int) -> float:
    gen = step_fn(mx.array([1], dtype=mx.uint32), model, max_tokens=n + 1)
    tok, _ = next(gen)
    tic = time.perf_counter()
    count = 0
    for tok, _ in gen:
        _ = tok if isinstance(tok, int) else tok.item()
        count += 1
    return count / (time.perf_counter() - tic)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=None)
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-r", type=int, default=3)
    ap.add_argument("--no-f16", action="store_true", help="skip mlx-lm with its own float16 dtype")
    args = ap.parse_args()

    from mlx_lm.generate import generate_step as mlxlm_step
    from mlx_lm.utils import load_model as mlxlm_load

    from edgert.convert.api import ensure_package
    from edgert.generation import generate_step as edgert_step
    from edgert.package import load_model

    path = ensure_package(args.model)
    ours, _ = load_model(path)
    peers = {"edgert": (edgert_step, ours)}
    if not args.no_f16:
        peers["mlx-lm"] = (mlxlm_step, mlxlm_load(Path(path))[0])
    f32, _ = mlxlm_load(Path(path))
    cast_f16_to_f32(f32)
    peers["mlx-lm (f32)"] = (mlxlm_step, f32)

    vocab = ours.args.vocab_size
    prompt = mx.array(np.random.default_rng(0).integers(3, vocab, size=args.p), dtype=mx.uint32)
    results = {name: {"pp": [], "tg": []} for name in peers}
    for name, (fn, m) in peers.items():  # warm-up
        time_prefill(fn, m, prompt[:32])
        time_decode(fn, m, 4)
    for _ in range(args.r):  # interleaved: every peer once per repetition
        for name, (fn, m) in peers.items():
            results[name]["pp"].append(time_prefill(fn, m, prompt))
        for name, (fn, m) in peers.items():
            results[name]["tg"].append(time_decode(fn, m, args.n))

    def fmt(xs):
        return f"{statistics.mean(xs):9.2f} ± {statistics.pstdev(xs):6.2f}"

    print(f"model: {path}")
    print(f"machine: {platform.machine()} {platform.processor() or ''}, mlx {mx.__version__}, "
          f"device {mx.default_device()}")
    print(f"{'runtime':<14} {'pp' + str(args.p) + ' tok/s':>20} {'tg' + str(args.n) + ' tok/s':>20}"
          f" {'edgert/peer pp':>15} {'edgert/peer tg':>15}")
    e = results["edgert"]
    for name, r in results.items():
        rp = statistics.mean(e["pp"]) / statistics.mean(r["pp"])
        rt = statistics.mean(e["tg"]) / statistics.mean(r["tg"])
        print(f"{name:<14} {fmt(r['pp']):>20} {fmt(r['tg']):>20} {rp:>15.2f} {rt:>15.2f}")


if __name__ == "__main__":
    main()
