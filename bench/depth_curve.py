"""Decode tok/s against depth: a hybrid (Gated DeltaNet + gated attention, Qwen3.5 layer mix)
beside a dense model of the same size, both built in quantized form (edgert.bench's synthetic
builder). The hybrid's curve should stay flat: 3 of its 4 layers carry a fixed-size recurrent
state instead of a KV cache that grows with depth.

    .venv/bin/python bench/depth_curve.py [--model qwen3.5-9b --dense qwen3-8b --layers 8]
        [--depths 0,1024,4096] [--plot bench/depth_curve.png]

On this 2-core CPU the full-size models prefill too slowly for depth 4096; `--small` (the
default here) runs both at a reduced width (hidden 1024, 16 layers: 12 linear + 4 full for the
hybrid), labelled so. Prefilling 4096 tokens takes tens of minutes per model on this CPU, so
by default the caches are filled with random keys and values of the depth's length
(`--fill random`; `--fill prefill` runs the real prefill). Each model prefills the context once per depth; the decode runs restore
that cache state and alternate between the two models, so load on the machine falls on both
alike; the table gives medians.
"""

from __future__ import annotations

import argparse
import statistics
import time

import mlx.core as mx

from edgert import bench
from edgert.models.cache import KVCache

SMALL = {
    "hybrid-small": dict(model_type="qwen3_5_text", hidden_size=1024, num_hidden_layers=16,
                         intermediate_size=3072, num_attention_heads=8, num_key_value_heads=2,
                         head_dim=128, linear_num_key_heads=8, linear_num_value_heads=8,
                         linear_key_head_dim=128, linear_value_head_dim=128, vocab_size=32000,
                         tie_word_embeddings=False),
    "dense-small": dict(model_type="qwen3", hidden_size=1024, num_hidden_layers=16,
                        intermediate_size=3072, num_attention_heads=8, num_key_value_heads=2,
                        head_dim=128, vocab_size=32000, tie_word_embeddings=False),
}


def fill_random(cache: list, depth: int) -> None:
    """Make every cache `depth` positions deep: full-attention KV caches get random keys and
    values of that length (a decode step's cost depends on their size, not their values);
    recurrent states keep their fixed size whatever the depth."""
    for c in cache:
        if type(c) is KVCache and c.keys is not None:
            B, H, _, D = c.keys.shape
            c.keys = mx.random.normal((B, H, depth, D)).astype(c.keys.dtype)
            c.values = mx.random.normal((B, H, depth, D)).astype(c.values.dtype)
            mx.eval(c.keys, c.values)
        c.offset = depth


def decode_rate(model, cache, snap, first: mx.array, n_gen: int) -> float:
    """Greedy decode tok/s from the cache state `snap`: one untimed step (it grows the
    restored buffers), then n_gen timed steps."""
    for c, s in zip(cache, snap):
        c.restore(s)
    tok = first
    for i in range(n_gen + 1):
        if i == 1:
            tic = time.perf_counter()
        tok = mx.argmax(model(tok[None], cache=cache)[:, -1], axis=-1)
        mx.eval(tok)
    return n_gen / (time.perf_counter() - tic)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="hybrid-small")
    ap.add_argument("--dense", default="dense-small")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--depths", default="0,1024,4096")
    ap.add_argument("--n-gen", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--plot", default=None, help="write a PNG of tok/s against depth")
    ap.add_argument("--fill", choices=("random", "prefill"), default="random",
                    help="how the context gets into the cache: random keys and values of the "
                         "depth's length after a 16-token prefill (fast), or a real prefill")
    args = ap.parse_args()
    bench.SYNTHETIC.update(SMALL)
    depths = [int(d) for d in args.depths.split(",")]
    names = (args.model, args.dense)
    models = {n: bench.load_for_bench(None, n, args.bits, 64, None) for n in names}
    rates = {n: {d: [] for d in depths} for n in names}
    vocab = models[names[0]][0].args.vocab_size
    for depth in depths:
        ctx = mx.random.randint(0, vocab, (1, max(depth, 1)))
        first = mx.array([1])
        states = {}
        for n in names:  # each model prefills the same context once per depth
            model = models[n][0]
            cache = bench.make_cache(model)
            fill = args.fill == "random" and depth > 16
            prefill = ctx[:, :16] if fill else ctx
            for start in range(0, prefill.shape[1], 512):
                model(prefill[:, start:start + 512], cache=cache)
                mx.eval([c.state for c in cache])
            if fill:
                fill_random(cache, depth)
            states[n] = (cache, [c.snapshot() for c in cache])
            decode_rate(model, *states[n], first, 2)  # warm-up
        for _ in range(args.reps):  # interleaved: the machine's load falls on both alike
            for n in names:
                rates[n][depth].append(decode_rate(models[n][0], *states[n], first, args.n_gen))
        print(" | ".join(f"{n} @ d{depth}: {statistics.median(rates[n][depth]):.2f} tok/s "
                         f"({', '.join(f'{r:.2f}' for r in rates[n][depth])})"
                         for n in names), flush=True)
    med = {n: {d: statistics.median(v) for d, v in rates[n].items()} for n in names}
    print(f"| model | {' | '.join(f'tg{args.n_gen} @ d{d}' for d in depths)} | "
          f"d{depths[-1]} / d{depths[0]} |")
    print("|---|" + "---:|" * (len(depths) + 1))
    for n in names:
        cells = " | ".join(f"{med[n][d]:.2f}" for d in depths)
        print(f"| {n} ({models[n][2] / 2**20:.0f} MiB) | {cells} | "
              f"{med[n][depths[-1]] / med[n][depths[0]]:.2f} |")
    # each repetition's two runs were back to back: their ratio cancels the machine's load
    paired = {d: statistics.median(a / b for a, b in zip(rates[names[0]][d], rates[names[1]][d]))
              for d in depths}
    print(f"| {names[0]} ÷ {names[1]}, median of paired repetitions | "
          f"{' | '.join(f'{paired[d]:.2f}' for d in depths)} | "
          f"{paired[depths[-1]] / paired[depths[0]]:.2f} |")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        for n in names:
            ax.plot(depths, [med[n][d] for d in depths], marker="o", label=n)
        ax.set(xlabel="depth (tokens already in the context)", ylabel="decode tok/s (median)",
               title=f"decode against depth, {args.bits}-bit, {bench.mx.default_device()}")
        ax.set_ylim(bottom=0)
        ax.legend()
        ax2.plot(depths, [paired[d] for d in depths], marker="o", color="C2")
        ax2.axhline(1.0, color="grey", linewidth=0.8)
        ax2.set(xlabel="depth (tokens already in the context)",
                ylabel=f"{names[0]} ÷ {names[1]} tok/s", title="paired repetitions (median)")
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
