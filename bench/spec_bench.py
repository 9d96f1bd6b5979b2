"""Speculative decoding against plain decoding, side by side in one run (greedy, same prompts).

Two cases:

- draft: SmolLM2-135M-Instruct dequantized to float32 by edgert (`convert --bits 0` of the
  embedded Q4_1 + Q8_0 GGUF: 7x the bytes per token of the 4-bit package) as the target; as
  drafts, the embedded model's own package (Q4_1 + Q8_0, the very weights the target was
  dequantized from: an upper bound on acceptance) and SmolLM2 re-quantized by edgert to 4-bit
  g128 (`convert --bits 4 --group-size 128`). No larger model with SmolLM2's vocabulary is
  available offline, so the "larger target" is larger in bytes, not in parameters.
- lookup: the embedded SmolLM2 with prompt lookup (n-gram drafts) on a code-editing prompt.

Plain and speculative runs alternate (plain, speculative, plain, ...) so that both see the
same machine load. Reported per case: decode tok/s of each (after the first token, so prefill
is left out; the draft model's prefill counts against speculative), the speed-up (ratio),
the acceptance (accepted / drafted), tokens per target pass, and whether the tokens are the
same. Also the cost of one verifying pass of K+1 tokens relative to a one-token step, measured
here: the speed-up is bounded by tokens-per-pass / that cost.

    .venv/bin/python bench/spec_bench.py [--tokens 32] [--num-draft 3] [--reps 2] [--json]
                                         [--mlx-lm | --only-peer]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

CHAT = ["Write a short story about a robot who learns to paint.",
        "Explain why the sky is blue to a ten-year-old."]
CODE = '''Rename the function `add` to `sum_two` and the argument `a` to `first` in this code. \
Reply with the whole code only.

```python
def add(a, b):
    """Return the sum of a and b."""
    result = a + b
    print("adding", a, "and", b)
    return result


def main():
    total = add(1, 2)
    other = add(total, 3)
    print(add(other, total))


if __name__ == "__main__":
    main()
```'''


def chat_ids(tok, text: str) -> list[int]:
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}]),
                      add_special_tokens=False)


def run_once(model, ids: list[int], n: int, draft, k: int):
    """(tokens, decode seconds after the first token, SpecStats)."""
    import mlx.core as mx

    from edgert.generation import generate_step
    from edgert.speculative import SpecStats

    stats = SpecStats()
    out, t0 = [], None
    for token, _ in generate_step(mx.array(ids, dtype=mx.uint32), model, max_tokens=n,
                                  draft=draft, num_draft=k, stats=stats):
        out.append(token)
        if t0 is None:
            t0 = time.perf_counter()
    return out, time.perf_counter() - t0, stats


def pass_cost(model, ids: list[int], k: int, reps: int = 3) -> float:
    """Median time of a (k+1)-token pass over a one-token step, at the prompt's depth."""
    import mlx.core as mx

    from edgert.models.cache import make_cache

    cache = make_cache(model)
    model(mx.array(ids, dtype=mx.uint32)[None], cache=cache)
    mx.eval([c.state for c in cache])
    times = {1: [], k + 1: []}
    for _ in range(reps):
        for L in times:
            t = time.perf_counter()
            mx.eval(model(mx.array(ids[:L], dtype=mx.uint32)[None], cache=cache))
            times[L].append(time.perf_counter() - t)
            for c in cache:
                c.trim(L)
    return statistics.median(times[k + 1]) / statistics.median(times[1])


def compare(name: str, model, prompts: list[list[int]], n: int, draft, k: int,
            reps: int) -> dict:
    plain_t, spec_t, tokens_n, same = 0.0, 0.0, 0, True
    drafted = accepted = passes = 0
    for _ in range(reps):
        for ids in prompts:
            want, tp, _ = run_once(model, ids, n, None, k)
            got, ts, st = run_once(model, ids, n, draft, k)
            same &= got == want
            plain_t, spec_t, tokens_n = plain_t + tp, spec_t + ts, tokens_n + len(want) - 1
            drafted, accepted, passes = (drafted + st.drafted, accepted + st.accepted,
                                         passes + st.passes)
    return {"case": name, "num_draft": k, "tokens": tokens_n,
            "plain_tps": round(tokens_n / plain_t, 2), "spec_tps": round(tokens_n / spec_t, 2),
            "speedup": round(plain_t / spec_t, 3),
            "acceptance": round(accepted / drafted, 3) if drafted else None,
            "tokens_per_pass": round(tokens_n / passes, 2) if passes else None,
            "verify_pass_cost": round(pass_cost(model, prompts[0], k), 2),
            "identical_tokens": same}


def mlx_lm_compare(target_path: Path, draft_path: Path, prompts: list[list[int]], n: int,
                   k: int, reps: int) -> dict:
    """The peer: mlx-lm's own speculative decoding (stream_generate with draft_model) against
    its plain decoding, on the same packages and prompts, interleaved the same way."""
    import mlx_lm
    from mlx_lm.generate import stream_generate

    model, tok = mlx_lm.load(str(target_path))
    draft, _ = mlx_lm.load(str(draft_path))

    def once(ids, d):
        out, t0, from_draft = [], None, 0
        kw = {"draft_model": d, "num_draft_tokens": k} if d is not None else {}
        for r in stream_generate(model, tok, ids, max_tokens=n, **kw):
            out.append(r.token)
            from_draft += bool(r.from_draft)
            if t0 is None:
                t0 = time.perf_counter()
        return out, time.perf_counter() - t0, from_draft

    plain_t = spec_t = 0.0
    tokens_n, same, accepted = 0, True, 0
    for _ in range(reps):
        for ids in prompts:
            want, tp, _ = once(ids, None)
            got, ts, a = once(ids, draft)
            same &= got == want
            plain_t, spec_t, tokens_n = plain_t + tp, spec_t + ts, tokens_n + len(want) - 1
            accepted += a
    return {"case": f"mlx-lm {mlx_lm.__version__}: same target and Q4_1 draft", "num_draft": k,
            "tokens": tokens_n, "plain_tps": round(tokens_n / plain_t, 2),
            "spec_tps": round(tokens_n / spec_t, 2), "speedup": round(plain_t / spec_t, 3),
            "acceptance": None, "tokens_per_pass": None, "verify_pass_cost": None,
            "identical_tokens": same, "from_draft": accepted}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--num-draft", type=int, default=3)
    ap.add_argument("--lookup", type=int, default=3, help="prompt-lookup n-gram size")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--mlx-lm", action="store_true",
                    help="add the peer: mlx-lm's speculative decoding on the same packages")
    ap.add_argument("--only-peer", action="store_true", help="run the mlx-lm row only")
    args = ap.parse_args()

    from edgert.convert.api import convert_file, ensure_package
    from edgert.package import load_model
    from edgert.paths import default_model_gguf, home
    from edgert.speculative import DraftModel, PromptLookup
    from edgert.tokenizer import load_tokenizer

    def made(name: str, **kw) -> Path:  # SmolLM2 converted by edgert, kept between runs
        path = Path(home()) / "bench" / f"SmolLM2-135M-Instruct.{name}"
        if not path.is_dir():
            convert_file(default_model_gguf(), path, progress=False, **kw)
        return path

    small = ensure_package(None)
    tok = load_tokenizer(small)
    chat = [chat_ids(tok, t) for t in CHAT]
    peer = ([mlx_lm_compare(made("f32", bits=0), small, chat, args.tokens, args.num_draft,
                            args.reps)] if args.mlx_lm or args.only_peer else [])
    if args.only_peer:
        return print_results(peer, args.json)
    small_model, big_model = load_model(small)[0], load_model(made("f32", bits=0))[0]
    q4_model = load_model(made("q4g128", bits=4, group_size=128))[0]
    results = [
        compare("SmolLM2 f32 target, Q4_1 draft (its source)", big_model, chat, args.tokens,
                DraftModel(small_model), args.num_draft, args.reps),
        compare("SmolLM2 f32 target, 4-bit g128 draft", big_model, chat, args.tokens,
                DraftModel(q4_model), args.num_draft, args.reps),
        compare(f"SmolLM2 Q4_1, prompt lookup n={args.lookup}, code edit", small_model,
                [chat_ids(tok, CODE)], 2 * args.tokens, PromptLookup(args.lookup),
                2 * args.num_draft, args.reps),
    ] + peer
    print_results(results, args.json)


def print_results(results: list[dict], as_json: bool) -> None:
    if as_json:
        print(json.dumps(results, indent=2))
        return
    cols = list(dict.fromkeys(c for r in results for c in r))
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in results:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")


if __name__ == "__main__":
    main()
