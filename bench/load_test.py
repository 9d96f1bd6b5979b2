"""A bounded load test of `edgert serve` with the official openai client on loopback.

Hundreds of requests from a few concurrent clients: chat and text completions, streamed and
not, some cancelled mid-stream, some malformed. Every request must end answered (200) or
cleanly refused (a 4xx/503 JSON error), the server must be idle afterwards and its MLX memory
back to the baseline (plus what the prefix cache holds).

    python bench/load_test.py --requests 300 --clients 4            # starts its own server
    python bench/load_test.py --url http://127.0.0.1:8080 --model M  # or drives a running one
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import threading
import time
import urllib.request
from collections import Counter


def health(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/health", timeout=30) as r:
        return json.loads(r.read())


def wait_idle(url: str, timeout: float = 120) -> dict:
    end = time.monotonic() + timeout
    while True:
        h = health(url)
        if h["active"] == 0 and h["waiting"] == 0:
            return h
        if time.monotonic() > end:
            raise RuntimeError(f"server still busy after {timeout} s: {h}")
        time.sleep(0.1)


def one_request(client, model: str, rng: random.Random, max_tokens: int) -> str:
    """Send one request of a random kind; return its outcome."""
    import openai

    kind = rng.choice(["chat", "chat-stream", "chat-cancel", "completion", "completion-stream",
                       "bad"])
    question = f"Question {rng.randrange(1000)}: name a {rng.choice(['colour', 'city', 'fruit'])}."
    messages = [{"role": "system", "content": "You answer briefly."},
                {"role": "user", "content": question}]
    try:
        if kind == "chat":
            r = client.chat.completions.create(model=model, messages=messages,
                                               max_tokens=max_tokens)
            assert r.choices[0].finish_reason in ("stop", "length")
        elif kind == "completion":
            r = client.completions.create(model=model, prompt=question, max_tokens=max_tokens)
            assert r.choices[0].finish_reason in ("stop", "length")
        elif kind == "bad":
            client.chat.completions.create(model=model, messages=messages, max_tokens=-1)
            return "bad-accepted"  # must not happen
        else:
            create = client.completions.create if kind.startswith("completion") else (
                client.chat.completions.create)
            body = {"prompt": question} if kind.startswith("completion") else {"messages": messages}
            stream = create(model=model, max_tokens=max_tokens * 4, stream=True, **body)
            for i, _ in enumerate(stream):
                if kind == "chat-cancel" and i == 2:
                    stream.close()
                    return "cancelled"
        return "answered"
    except openai.APIStatusError as e:
        if kind == "bad" and e.status_code == 400:
            return "refused-bad"
        if e.status_code == 503:
            return "refused-busy"
        return f"error-{e.status_code}"
    except openai.APIConnectionError:
        return "connection-error"


def run_load(url: str, model: str, requests: int = 300, clients: int = 4,
             max_tokens: int = 8, seed: int = 0) -> dict:
    """Drive the server; returns outcomes, timings and the memory check."""
    import openai

    wait_idle(url)
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)
    client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}],
                                   max_tokens=2)  # warm-up: compiled steps, buffers
    before = wait_idle(url)
    outcomes: Counter = Counter()
    lock = threading.Lock()
    counter = iter(range(requests))

    def worker(i: int) -> None:
        rng = random.Random(seed * 1000 + i)
        while True:
            with lock:
                if next(counter, None) is None:
                    return
            outcome = one_request(client, model, rng, max_tokens)
            with lock:
                outcomes[outcome] += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    after = wait_idle(url)
    # what the prefix cache holds is bounded and accounted for; the rest must be gone
    grown = (after["active_memory_bytes"] - after["prefix_cache_bytes"]) - (
        before["active_memory_bytes"] - before["prefix_cache_bytes"])
    return {"requests": requests, "clients": clients, "seconds": round(seconds, 1),
            "outcomes": dict(outcomes), "served": after["served"] - before["served"],
            "memory_growth_bytes": grown, "prefix_cache_bytes": after["prefix_cache_bytes"],
            "ok": sum(outcomes.values()) == requests and not any(
                k.startswith(("error", "connection", "bad-accepted")) for k in outcomes)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", help="a running server (default: start one on a free port)")
    ap.add_argument("--model", default=None, help="MODEL to serve, or the model id at --url")
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--max-queue", type=int, default=64)
    args = ap.parse_args(argv)
    if args.url:
        report = run_load(args.url, args.model, args.requests, args.clients, args.max_tokens)
    else:
        sys.path.insert(0, str(__import__("pathlib").Path(__file__).parents[1] / "tests"))
        from server_util import running_server

        with running_server(args.model, model_id="load", max_queue=args.max_queue) as (url, _):
            report = run_load(url, "load", args.requests, args.clients, args.max_tokens)
    print(json.dumps(report, indent=2))
    return 0 if report["ok"] and report["memory_growth_bytes"] <= 16 << 20 else 1


if __name__ == "__main__":
    sys.exit(main())
