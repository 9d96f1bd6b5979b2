"""edgert serve against mlx_lm.server on the same MLX package, driven by the openai client.

Per server, interleaved round by round (edgert, mlx-lm, edgert, ...):
- TTFT with a cold prefix: a ~2,000-token system prompt never seen before, then a short user
  turn; TTFT with a warm prefix: the same system prompt, another short user turn.
- decode tok/s with 1, 2 and 4 concurrent streams (total generated tokens / wall time).

    python bench/serve_bench.py [PACKAGE] [--system-tokens 2000] [--max-tokens 64] [--rounds 2]

`--servers edgert,edgert-no-batch` compares edgert's batched decode with its turn-taking
(`edgert serve --no-batch`) instead; `--only-streams` skips the TTFT measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request

WORDS = ("river stone lantern copper meadow signal harbor thistle orbit ember canyon velvet "
         "quarry lattice pilot marble fable summit").split()


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def start(kind: str, package: str, port: int) -> subprocess.Popen:
    if kind.startswith("edgert"):
        cmd = [sys.executable, "-m", "edgert", "serve", package, "--port", str(port),
               "--model-id", "m", "--log-level", "warning"]
        if kind == "edgert-no-batch":
            cmd.append("--no-batch")
    else:
        cmd = [sys.executable, "-m", "mlx_lm.server", "--model", package, "--port", str(port),
               "--host", "127.0.0.1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    end = time.monotonic() + 300
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=5)
            return proc
        except OSError:
            if time.monotonic() > end or proc.poll() is not None:
                proc.kill()
                raise RuntimeError(f"{kind} server did not start")
            time.sleep(0.5)


def system_prompt(n_tokens: int, seed: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_tokens))  # ~1 token per word


def ttft(client, model: str, system: str, question: str, max_tokens: int) -> float:
    t0 = time.perf_counter()
    for chunk in client.chat.completions.create(
            model=model, stream=True, max_tokens=max_tokens, temperature=0,
            messages=[{"role": "system", "content": system},
                      {"role": "user", "content": question}]):
        if chunk.choices and chunk.choices[0].delta.content:
            return time.perf_counter() - t0
    return time.perf_counter() - t0


def throughput(client, model: str, streams: int, max_tokens: int) -> float:
    counts = [0] * streams

    def run(i: int) -> None:
        for chunk in client.chat.completions.create(
                model=model, stream=True, max_tokens=max_tokens, temperature=0,
                messages=[{"role": "user", "content": f"Story {i}: tell a long tale."}]):
            if chunk.choices and chunk.choices[0].delta.content:
                counts[i] += 1
    threads = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - t0)


def main(argv=None) -> int:
    import openai

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("package", nargs="?", default=None,
                    help="an MLX package folder (default: the embedded model's package)")
    ap.add_argument("--system-tokens", type=int, default=2000)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--streams", default="1,2,4")
    ap.add_argument("--servers", default="edgert,mlx_lm",
                    help="the two servers, interleaved: edgert, edgert-no-batch, mlx_lm")
    ap.add_argument("--only-streams", action="store_true", help="tok/s only, no TTFT")
    args = ap.parse_args(argv)
    kinds = args.servers.split(",")
    if len(kinds) != 2 or not set(kinds) <= {"edgert", "edgert-no-batch", "mlx_lm"}:
        ap.error("--servers: two of edgert, edgert-no-batch, mlx_lm")
    if args.package is None:
        from edgert.convert.api import ensure_package

        args.package = str(ensure_package(None))
    results: dict[str, dict[str, list[float]]] = {k: {} for k in kinds}
    for rnd in range(args.rounds):
        for kind in kinds:
            port = free_port()
            proc = start(kind, args.package, port)
            try:
                c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x",
                                  max_retries=0, timeout=1800)
                model = "m" if kind.startswith("edgert") else args.package
                ttft(c, model, "warm-up", "Hi", 2)
                system = system_prompt(args.system_tokens, seed=rnd)
                r = results[kind]
                measured = [] if args.only_streams else [
                    ("ttft_cold_s", lambda: ttft(c, model, system, "Name a colour.", 4)),
                    ("ttft_warm_s", lambda: ttft(c, model, system, "Name a fruit.", 4))]
                measured += [(f"tok_s_{n}_streams",
                              lambda n=n: throughput(c, model, n, args.max_tokens))
                             for n in map(int, args.streams.split(","))]
                for name, measure in measured:
                    r.setdefault(name, []).append(measure())
                    print(f"round {rnd} {kind} {name}: {r[name][-1]:.3f}", file=sys.stderr,
                          flush=True)
            finally:
                proc.terminate()
                proc.wait(timeout=60)
    summary = {k: {m: round(statistics.median(v), 3) for m, v in r.items()}
               for k, r in results.items()}
    a, b = kinds  # the first server's advantage over the second (TTFT: b / a)
    ratio = {m: round(summary[b][m] / summary[a][m], 2) if m.startswith("ttft")
             else round(summary[a][m] / summary[b][m], 2)
             for m in summary[a]}
    print(json.dumps({"package": os.path.basename(args.package.rstrip("/")), "args": vars(args),
                      "median": summary, f"{a}_advantage_over_{b}": ratio}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
