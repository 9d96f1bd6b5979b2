"""edgert against mlx-lm and llama.cpp on the same model, interleaved in one run.

    .venv/bin/python bench/bench_peers.py [PACKAGE_OR_GGUF] [-p 512] [-n 128] [-r 3]

pp: prefill of P prompt tokens (time to the first sampled token, fresh cache).
tg: decode of N tokens after a one-token prompt (greedy).
edgert and mlx-lm run the MLX package converted from the GGUF, in this process; llama.cpp runs
the GGUF itself through `llama-bench -o json -r 1` once per repetition (its own warm-up run
first each time), so every repetition measures every runtime once, in turn.
mlx-lm runs the package as it loads it; its activations follow the scales' dtype (float16),
which its CPU kernels run slowly, so it also runs with float16 parameters cast to float32.
`--twins` adds edgert's plain (uncompiled) decode path as a row of its own.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_map

LLAMA_CPP = Path(os.environ.get("EDGERT_TEST_DATA") or Path.home() / ".cache" / "edgert-test-data") \
    / "llama.cpp"


# ---------------------------------------------------------------------------- llama.cpp

def llama_bench_results(text: str) -> dict[str, list[float]]:
    """llama-bench `-o json` output -> {"pp512": [tok/s, ...], "tg128": [...]} (llama-bench's
    test names: pp<n_prompt> for prompt-only tests, tg<n_gen> for generation-only ones)."""
    out: dict[str, list[float]] = {}
    for rec in json.loads(text):
        p, n = rec["n_prompt"], rec["n_gen"]
        name = f"pp{p}" if n == 0 else f"tg{n}" if p == 0 else f"pp{p}+tg{n}"
        out.setdefault(name, []).extend(float(x) for x in rec["samples_ts"])
    return out


def run_llama_bench(binary: Path, gguf: Path, n_prompt: int, n_gen: int, threads: int,
                    reps: int = 1) -> dict[str, list[float]]:
    """One llama-bench process: pp n_prompt and/or tg n_gen (0 skips a test), `reps` times."""
    cmd = [str(binary), "-m", str(gguf), "-p", str(n_prompt), "-n", str(n_gen), "-r", str(reps),
           "-o", "json", "-t", str(threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({res.returncode}): {res.stderr[-2000:]}")
    return llama_bench_results(res.stdout)


class LlamaCpp:
    """llama.cpp as a peer: each measurement is one llama-bench run on the GGUF."""

    def __init__(self, binary: Path, gguf: Path, threads: int):
        self.binary, self.gguf, self.threads = binary, gguf, threads

    def pp(self, n: int) -> float:
        return run_llama_bench(self.binary, self.gguf, n, 0, self.threads)[f"pp{n}"][0]

    def tg(self, n: int) -> float:
        return run_llama_bench(self.binary, self.gguf, 0, n, self.threads)[f"tg{n}"][0]


# ---------------------------------------------------------------------------- MLX runtimes

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


class MLXRuntime:
    def __init__(self, step_fn, model, prompt: mx.array):
        self.step_fn, self.model, self.prompt = step_fn, model, prompt

    def pp(self, n: int) -> float:
        return time_prefill(self.step_fn, self.model, self.prompt[:n])

    def tg(self, n: int) -> float:
        return time_decode(self.step_fn, self.model, n)


# ---------------------------------------------------------------------------- report

def ratio(ours: list[float], theirs: list[float]) -> float:
    """edgert ÷ peer, as the ratio of the mean tokens per second."""
    return statistics.mean(ours) / statistics.mean(theirs)


def mean_std(xs: list[float]) -> str:
    return f"{statistics.mean(xs):.2f} ± {statistics.pstdev(xs):.2f}"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def table(results: dict[str, dict[str, list[float]]], pp: str, tg: str) -> list[str]:
    e = results["edgert"]
    lines = [f"| runtime | {pp} tok/s | {tg} tok/s | edgert ÷ peer {pp} | edgert ÷ peer {tg} |",
             "|---|---:|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {mean_std(r['pp'])} | {mean_std(r['tg'])} | "
                     f"{ratio(e['pp'], r['pp']):.2f} | {ratio(e['tg'], r['tg']):.2f} |")
    return lines


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", default=None, help="MLX package or GGUF (default model)")
    ap.add_argument("-p", type=int, default=512)
    ap.add_argument("-n", type=int, default=128)
    ap.add_argument("-r", type=int, default=3)
    ap.add_argument("--no-f16", action="store_true", help="skip mlx-lm with its own float16 dtype")
    ap.add_argument("--twins", action="store_true", help="also edgert's uncompiled decode path")
    ap.add_argument("--gguf", type=Path, default=None, help="GGUF for llama.cpp (default: the "
                    "model argument if it is one, else the default model's)")
    ap.add_argument("--llama-bench", type=Path, default=LLAMA_CPP / "bin" / "llama-bench")
    ap.add_argument("-t", "--threads", default="2",
                    help="llama.cpp threads; a list (1,2) runs it once per count")
    ap.add_argument("--no-llama-cpp", action="store_true")
    args = ap.parse_args()

    from mlx_lm.generate import generate_step as mlxlm_step
    from mlx_lm.utils import load_model as mlxlm_load

    from edgert.convert.api import ensure_package
    from edgert.generation import generate_step as edgert_step
    from edgert.package import load_model
    from edgert.paths import default_model_gguf

    path = ensure_package(args.model)
    ours, _ = load_model(path)
    vocab = ours.args.vocab_size
    prompt = mx.array(np.random.default_rng(0).integers(3, vocab, size=args.p), dtype=mx.uint32)

    peers = {"edgert": MLXRuntime(edgert_step, ours, prompt)}
    if args.twins:
        def plain_step(*a, **k):
            return edgert_step(*a, compiled=False, **k)
        peers["edgert, uncompiled decode"] = MLXRuntime(plain_step, ours, prompt)
    if not args.no_f16:
        peers["mlx-lm"] = MLXRuntime(mlxlm_step, mlxlm_load(Path(path))[0], prompt)
    f32, _ = mlxlm_load(Path(path))
    cast_f16_to_f32(f32)
    peers["mlx-lm, parameters cast to float32"] = MLXRuntime(mlxlm_step, f32, prompt)
    gguf = args.gguf
    if gguf is None and args.model is None:
        gguf = default_model_gguf()
    elif gguf is None and str(args.model).endswith(".gguf"):
        gguf = Path(args.model)
    if not args.no_llama_cpp:
        if gguf is None or not args.llama_bench.is_file():
            print(f"llama.cpp skipped: no GGUF given or no {args.llama_bench} "
                  "(tests/fetch_data.sh builds it)")
        else:
            for t in (int(x) for x in str(args.threads).split(",")):
                peers[f"llama.cpp, {t} thread{'s' if t > 1 else ''}"] = LlamaCpp(
                    args.llama_bench, gguf, t)

    load_before = load_average()
    for name, rt in peers.items():  # warm-up
        rt.pp(min(32, args.p))
        rt.tg(4)
    results = {name: {"pp": [], "tg": []} for name in peers}
    for i in range(args.r):  # interleaved: every runtime once per repetition and test
        for name, rt in peers.items():
            results[name]["pp"].append(rt.pp(args.p))
        for name, rt in peers.items():
            results[name]["tg"].append(rt.tg(args.n))
        print(f"repetition {i + 1}/{args.r}: " + ", ".join(
            f"{name} {r['pp'][-1]:.1f}/{r['tg'][-1]:.1f}" for name, r in results.items()),
            flush=True)

    print(f"model: {path}" + (f" (llama.cpp: {gguf})" if gguf else ""))
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, {platform.machine()}, "
          f"mlx {mx.__version__}, device {mx.default_device()}")
    print(f"load average (1/5/15 min) before: {load_before}, after: {load_average()}")
    print(f"{args.r} repetitions, mean ± std; ratio = edgert mean ÷ peer mean")
    print("\n".join(table(results, f"pp{args.p}", f"tg{args.n}")))


if __name__ == "__main__":
    main()
