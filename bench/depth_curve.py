"""Decode tok/s against depth: a hybrid (Gated DeltaNet + gated attention, Qwen3.5 layer mix)
beside a dense model of the same size, both built in quantized form (edgert.bench's synthetic
builder). The hybrid's curve should stay flat: 3 of its 4 layers carry a fixed-size recurrent
state instead of a KV cache that grows with depth.

    .venv/bin/python bench/depth_curve.py [--model qwen3.5-9b --dense qwen3-8b --layers 8]
        [--depths 0,1024,4096] [--plot bench/depth_curve.png]

On this 2-core CPU the full-size models prefill too slowly for depth 4096; `--small` (the
default here) runs both at a reduced width (hidden 1024, 16 layers: 12 linear + 4 full for the
hybrid), labelled so.
"""

from __future__ import annotations

import argparse

from edgert import bench

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="hybrid-small")
    ap.add_argument("--dense", default="dense-small")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--depths", default="0,1024,4096")
    ap.add_argument("--n-gen", type=int, default=16)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--plot", default=None, help="write a PNG of tok/s against depth")
    args = ap.parse_args()
    bench.SYNTHETIC.update(SMALL)
    depths = [int(d) for d in args.depths.split(",")]
    reports = {}
    for name in (args.model, args.dense):
        reports[name] = bench.run_bench(synthetic=name, bits=args.bits, n_prompt=[],  # decode only
                                        on_result=lambda r, name=name: print(
                                            f"{name} {r.test} @ d{r.depth}: "
                                            f"{r.mean:.2f} tok/s", flush=True),
                                        n_gen=[args.n_gen], reps=args.reps, depths=depths)
    print(f"| model | {' | '.join(f'tg{args.n_gen} @ d{d}' for d in depths)} | "
          f"d{depths[-1]} / d{depths[0]} |")
    print("|---|" + "---:|" * (len(depths) + 1))
    for name, r in reports.items():
        tg = {t.depth: t.mean for t in r.tests if t.test.startswith("tg")}
        cells = " | ".join(f"{tg[d]:.2f}" for d in depths)
        print(f"| {name} ({r.size_bytes / 2**20:.0f} MiB) | {cells} | "
              f"{tg[depths[-1]] / tg[depths[0]]:.2f} |")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for name, r in reports.items():
            tg = sorted((t.depth, t.mean) for t in r.tests if t.test.startswith("tg"))
            ax.plot([d for d, _ in tg], [v for _, v in tg], marker="o", label=name)
        ax.set(xlabel="depth (tokens already in the context)", ylabel="decode tok/s",
               title=f"decode against depth, {args.bits}-bit, {bench.mx.default_device()}")
        ax.set_ylim(bottom=0)
        ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
