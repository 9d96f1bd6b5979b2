"""The effect of --kv-bits on logits: SmolLM2 (or PACKAGE) teacher-forced over a text, float
KV cache against 8- and 4-bit ones (group 64 and 32): KL divergence, top-1 agreement, largest
logit error, cache bytes.

    python bench/kv_quant.py [PACKAGE] [--prefill 512] [--positions 128]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import mlx.core as mx


def main(argv=None) -> None:
    from edgert.convert.api import ensure_package
    from edgert.models.cache import cache_nbytes, make_cache, quantize_kv
    from edgert.package import load_model
    from edgert.tokenizer import load_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("package", nargs="?", default=None)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--positions", type=int, default=128)
    args = ap.parse_args(argv)
    path = ensure_package(args.package)
    model, _ = load_model(path)
    tok = load_tokenizer(path)
    text = (Path(__file__).parents[1] / "README.md").read_text() * 4
    ids = tok.encode(text)[: args.prefill + args.positions]

    def run(bits, group):
        cache = quantize_kv(make_cache(model), bits, group)
        model(mx.array(ids[: args.prefill])[None], cache=cache)
        logits = mx.stack([model(mx.array([t])[None], cache=cache)[0, -1]
                           for t in ids[args.prefill:]])  # one decode step per position
        return logits, cache_nbytes(cache)

    ref, ref_bytes = run(None, 64)
    lr = ref - mx.logsumexp(ref, axis=-1, keepdims=True)
    rows = []
    for bits, group in ((8, 64), (8, 32), (4, 64), (4, 32)):
        got, nbytes = run(bits, group)
        lg = got - mx.logsumexp(got, axis=-1, keepdims=True)
        kl = (mx.exp(lr) * (lr - lg)).sum(-1)
        rows.append({"bits": bits, "group": group, "kl_mean": kl.mean().item(),
                     "kl_max": kl.max().item(),
                     "top1": (mx.argmax(got, -1) == mx.argmax(ref, -1)).astype(
                         mx.float32).mean().item(),
                     "max_abs_logit_error": mx.abs(got - ref).max().item(),
                     "max_abs_logit": mx.abs(ref).max().item(),
                     "cache_bytes_vs_float": nbytes / ref_bytes})
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
