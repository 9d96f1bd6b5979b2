"""Core ML export at scale: synthetic 8B-class models (edgert.bench.SYNTHETIC shapes) built
straight from random bits as canonical quantized tensors (no float weights), written with
edgert.convert.coreml_writer.write_coreml. Records export time, peak RSS and package size.

    python bench/export_coreml.py --model qwen3-8b --bits 1 --target iOS26 --layers 2,4
    python bench/export_coreml.py --model llama-3.1-8b --bits 4 --layers 2,4

Each run is a fresh subprocess (so peak RSS is that export's own). With --layers cut below the
model's depth, the figures for the full depth are extrapolated linearly from the two smallest
cuts (time and RSS: fixed + per-layer; size: exact per-layer bytes) and labelled as such.

Weights: 1-bit as Q1_0 (w = s * (q - 1/2), g128: exact; iOS26 packs a LUT -> scale chain),
2-bit as ternary (w = s * (q - 1)), 4-bit as Q4_0 (w = s * (q - 8), g32), others MLX-style
random biases. Embedding and LM head are quantized like every other matrix, as in
`edgert bench --synthetic`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PATTERNS = {1: ("sign", 128), 2: ("ternary", 128), 4: ("q4_0", 32)}


def synthetic_canonical(name: str, bits: int, group: int | None, layers: int | None,
                        seed: int = 0):
    """A CanonicalModel of SYNTHETIC[name] with random codes; returns (model, full depth)."""
    from edgert.bench import SYNTHETIC
    from edgert.convert.canonical import EXACT, FLOAT, CanonicalModel, QuantTensor, TensorRecord

    cfg = dict(SYNTHETIC[name], rms_norm_eps=1e-6, max_position_embeddings=40960,
               bos_token_id=1, eos_token_id=2)
    full = cfg["num_hidden_layers"]
    n = full if layers is None else min(layers, full)
    cfg["num_hidden_layers"] = n
    pattern, default_group = PATTERNS.get(bits, ("mlx", 64))
    g = group or default_group
    hid, inter = cfg["hidden_size"], cfg["intermediate_size"]
    H, KV = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    D = cfg.get("head_dim", hid // H)
    shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], hid),
              "lm_head.weight": (cfg["vocab_size"], hid)}
    norms = {"model.norm.weight": hid}
    for i in range(n):
        p = f"model.layers.{i}"
        shapes.update({f"{p}.self_attn.q_proj.weight": (H * D, hid),
                       f"{p}.self_attn.k_proj.weight": (KV * D, hid),
                       f"{p}.self_attn.v_proj.weight": (KV * D, hid),
                       f"{p}.self_attn.o_proj.weight": (hid, H * D),
                       f"{p}.mlp.gate_proj.weight": (inter, hid),
                       f"{p}.mlp.up_proj.weight": (inter, hid),
                       f"{p}.mlp.down_proj.weight": (hid, inter)})
        norms.update({f"{p}.input_layernorm.weight": hid,
                      f"{p}.post_attention_layernorm.weight": hid})
        if cfg["model_type"] == "qwen3":
            norms.update({f"{p}.self_attn.q_norm.weight": D, f"{p}.self_attn.k_norm.weight": D})

    def quant(rows: int, cols: int, rng) -> QuantTensor:
        w_q = rng.integers(0, 2**32, (rows, cols * bits // 32), dtype=np.uint32)  # random codes
        s = (rng.random((rows, cols // g), dtype=np.float32) * 0.02 / 2**bits + 1e-4)
        s = s.astype(np.float16)
        offset = {"sign": 0.5, "ternary": 1.0, "q4_0": 8.0}.get(pattern)
        if offset is not None:
            if pattern == "sign":
                s = (s.astype(np.float32) * 2).astype(np.float16)  # s/2 exact in fp16
            b = (-offset * s.astype(np.float32)).astype(np.float16)
        else:
            b = (-rng.random((rows, cols // g), dtype=np.float32) * 0.01).astype(np.float16)
        return QuantTensor(w_q, s, b, bits, g)

    def tensors():
        rng = np.random.default_rng(seed)
        for k, (rows, cols) in shapes.items():
            yield TensorRecord(k, quant(rows, cols, rng), k, f"synthetic-{bits}bit", EXACT)
        for k, d in norms.items():
            w = (1 + 0.1 * rng.standard_normal(d)).astype(np.float16)
            yield TensorRecord(k, w, k, "F16", FLOAT)

    tok = {"tokenizer_config.json": json.dumps({"bos_token": "<s>"}).encode()}
    return CanonicalModel(cfg, tensors, len(shapes) + len(norms), tok,
                          {"format": "synthetic", "name": name}), full


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def export_once(args) -> dict:
    """One export in this process; prints one JSON line."""
    from edgert.convert.coreml_writer import write_coreml

    t0 = time.perf_counter()
    model, full = synthetic_canonical(args.model, args.bits, args.group_size, args.one)
    out = Path(args.out) / f"{args.model}-{args.bits}bit-{args.one}L.mlpackage"
    report = write_coreml(model, out, context=args.context, target=args.target, force=True)
    seconds = time.perf_counter() - t0
    s = report["summary"]
    weight_bin = out / "Data" / "com.apple.CoreML" / "weights" / "weight.bin"
    result = {
        "model": args.model, "bits": args.bits, "target": args.target,
        "context": report["context"], "layers": model.config["num_hidden_layers"],
        "full_layers": full, "seconds": round(seconds, 1),
        "seconds_split": report["seconds"],
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "package_bytes": du(out), "weight_bin_bytes": weight_bin.stat().st_size,
        "parameters": s["parameters"], "bits_per_weight": s["bits_per_weight"],
        "representations": s["representations"], "classes": s["classes"],
    }
    if not args.keep:
        shutil.rmtree(out)
    print(json.dumps(result), flush=True)
    return result


def extrapolate(runs: list[dict]) -> dict:
    """Full-depth figures from the two smallest cuts: fixed + per-layer."""
    a, b = sorted(runs, key=lambda r: r["layers"])[:2]
    full, dl = a["full_layers"], b["layers"] - a["layers"]

    def line(key):
        per = (b[key] - a[key]) / dl
        return a[key] + per * (full - a["layers"]), per

    out = {"layers": full, "extrapolated_from": [a["layers"], b["layers"]]}
    for key in ("seconds", "peak_rss_gib", "package_bytes", "parameters"):
        value, per = line(key)
        out[key], out[f"{key}_per_layer"] = round(value, 2), round(per, 3)
    out["bits_per_weight"] = round(8 * out["package_bytes"] / out["parameters"], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="qwen3-8b")
    ap.add_argument("--bits", type=int, default=1)
    ap.add_argument("--group-size", type=int, default=None)
    ap.add_argument("--target", default="iOS18", choices=["iOS18", "iOS26"])
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--layers", default="",
                    help="comma-separated depths to export (default: the full model)")
    ap.add_argument("--out", default=None, help="where packages go (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the packages")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # child run
    args = ap.parse_args()

    if args.one is not None:
        export_once(args)
        return
    tmp = None
    if args.out is None:
        tmp = args.out = tempfile.mkdtemp(prefix="edgert-coreml-bench-")
    try:
        from edgert.bench import SYNTHETIC

        depths = [int(x) for x in args.layers.split(",") if x] or [
            SYNTHETIC[args.model]["num_hidden_layers"]]
        runs = []
        for n in depths:
            cmd = [sys.executable, __file__, "--model", args.model, "--bits", str(args.bits),
                   "--target", args.target, "--context", str(args.context), "--out", args.out,
                   "--one", str(n)] + (["--keep"] if args.keep else []) + (
                ["--group-size", str(args.group_size)] if args.group_size else [])
            p = subprocess.run(cmd, capture_output=True, text=True,
                               env=dict(os.environ, PYTHONWARNINGS="ignore"))
            if p.returncode != 0:
                sys.exit(f"export of {n} layers failed:\n{p.stderr[-2000:]}")
            runs.append(json.loads(p.stdout.strip().splitlines()[-1]))
            r = runs[-1]
            print(f"{args.model} {args.bits}-bit {args.target} {r['layers']}/{r['full_layers']} "
                  f"layers: {r['seconds']:.0f} s, peak RSS {r['peak_rss_gib']:.2f} GiB, package "
                  f"{r['package_bytes'] / 2**30:.2f} GiB, {r['bits_per_weight']:.3f} bpw "
                  f"{r['representations']}", flush=True)
        if len(runs) >= 2 and runs[-1]["layers"] < runs[-1]["full_layers"]:
            e = extrapolate(runs)
            print(f"EXTRAPOLATED to {e['layers']} layers from {e['extrapolated_from']}: "
                  f"{e['seconds']:.0f} s, peak RSS {e['peak_rss_gib']:.1f} GiB, package "
                  f"{e['package_bytes'] / 2**30:.2f} GiB ({e['bits_per_weight']:.3f} bpw); per "
                  f"layer {e['seconds_per_layer']:.1f} s, {e['peak_rss_gib_per_layer']:.2f} GiB",
                  flush=True)
            print(json.dumps({"runs": runs, "extrapolated": e}))
        else:
            print(json.dumps({"runs": runs}))
    finally:
        if tmp and not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
