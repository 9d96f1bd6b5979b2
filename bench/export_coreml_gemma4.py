"""Core ML export of a synthetic Gemma-4-E2B-shaped model at 4 bits, built straight from random
codes as canonical quantized tensors (no float weights), written by edgert's Core ML writer
(convert/coreml_gemma4.py). Records export time, peak RSS, package size, the PLE file and
what an app keeps resident (the package without the PLE file, which it memory-maps).

    .venv/bin/python bench/export_coreml_gemma4.py --layers 10 --context 2048

E2B shape (gemma-4-E2B text config as this script assumes it): hidden 1536, 35 layers (every
5th full), MLP 6144 (double-wide on the KV-shared layers), 8 heads / 1 kv head, head_dim 256
(512 on full layers), PLE 256 per layer, vocab 262144, the last 20 layers KV-shared, window
512, soft-capping 30. `--layers` cuts the depth; the cut keeps half of its layers KV-shared
(so that a full layer with a cache remains), and the PLE table shrinks with the depth.
4-bit codes as Q4_0 (w = s * (q - 8), g32): exact in Core ML.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

S, F = "sliding_attention", "full_attention"
E2B = dict(model_type="gemma4_text", hidden_size=1536, num_hidden_layers=35,
           intermediate_size=6144, num_attention_heads=8, num_key_value_heads=1, head_dim=256,
           global_head_dim=512, hidden_size_per_layer_input=256, vocab_size=262144,
           vocab_size_per_layer_input=262144, num_kv_shared_layers=20, sliding_window=512,
           final_logit_softcapping=30.0, use_double_wide_mlp=True, attention_k_eq_v=False,
           rms_norm_eps=1e-6, max_position_embeddings=131072, tie_word_embeddings=True,
           bos_token_id=2, eos_token_id=1)


def e2b_config(layers: int) -> dict:
    cfg = dict(E2B, num_hidden_layers=layers,
               num_kv_shared_layers=20 if layers == 35 else layers // 2)
    cfg["layer_types"] = [F if (i + 1) % 5 == 0 else S for i in range(layers)]
    cfg["rope_parameters"] = {S: {"rope_type": "default", "rope_theta": 10000.0},
                              F: {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                  "rope_theta": 1000000.0}}
    return cfg


def shapes(cfg: dict) -> tuple[dict, dict]:
    """(matrices -> (rows, cols), vectors -> size), HF names; KV-shared layers have no k/v."""
    h, n, ple = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["hidden_size_per_layer_input"]
    first_shared = n - cfg["num_kv_shared_layers"]
    mats = {"model.embed_tokens.weight": (cfg["vocab_size"], h),
            "model.embed_tokens_per_layer.weight": (cfg["vocab_size_per_layer_input"], n * ple),
            "model.per_layer_model_projection.weight": (n * ple, h)}
    vecs = {"model.per_layer_projection_norm.weight": ple, "model.norm.weight": h}
    for i, t in enumerate(cfg["layer_types"]):
        p = f"model.layers.{i}."
        hd = cfg["global_head_dim"] if t == F else cfg["head_dim"]
        q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
        mats |= {p + "self_attn.q_proj.weight": (q, h), p + "self_attn.o_proj.weight": (h, q)}
        vecs |= {p + "self_attn.q_norm.weight": hd, p + "layer_scalar": 1}
        if i < first_shared:
            mats |= {p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.v_proj.weight": (kv, h)}
            vecs[p + "self_attn.k_norm.weight"] = hd
        ffn = cfg["intermediate_size"] * (2 if cfg["use_double_wide_mlp"] and i >= first_shared
                                          else 1)
        mats |= {p + "mlp.gate_proj.weight": (ffn, h), p + "mlp.up_proj.weight": (ffn, h),
                 p + "mlp.down_proj.weight": (h, ffn), p + "per_layer_input_gate.weight": (ple, h),
                 p + "per_layer_projection.weight": (h, ple)}
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm", "post_per_layer_input_norm"):
            vecs[p + norm + ".weight"] = h
    return mats, vecs


def canonical(layers: int):
    from edgert.convert.canonical import EXACT, FLOAT, CanonicalModel, QuantTensor, TensorRecord

    cfg = e2b_config(layers)
    mats, vecs = shapes(cfg)

    def tensors():
        rng = np.random.default_rng(0)
        for k, (rows, cols) in mats.items():
            w_q = rng.integers(0, 2**32, (rows, cols // 8), dtype=np.uint32)  # random 4-bit codes
            s = (rng.random((rows, cols // 32), dtype=np.float32) * 0.002 + 1e-4)
            s = s.astype(np.float16)
            b = (-8 * s.astype(np.float32)).astype(np.float16)
            yield TensorRecord(k, QuantTensor(w_q, s, b, 4, 32), k, "synthetic-4bit", EXACT)
        for k, d in vecs.items():
            w = (1 + 0.1 * rng.standard_normal(d)).astype(np.float16)
            yield TensorRecord(k, w, k, "F16", FLOAT)

    tok = {"tokenizer_config.json": json.dumps({"bos_token": "<bos>"}).encode()}
    return CanonicalModel(cfg, tensors, len(mats) + len(vecs), tok,
                          {"format": "synthetic", "name": "gemma-4-e2b-shaped"})


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=35)
    ap.add_argument("--context", type=int, default=2048)
    ap.add_argument("--out", default=None, help="keep the package here")
    args = ap.parse_args()
    from edgert.convert.coreml_writer import write_coreml
    from edgert.coreml_manifest import manifest_path

    t0 = time.perf_counter()
    model = canonical(args.layers)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp) / f"gemma4-e2b-{args.layers}L.mlpackage"
        report = write_coreml(model, out, context=args.context, force=True)
        seconds = time.perf_counter() - t0
        manifest = json.loads(manifest_path(out).read_text())
        ple = sum(report["summary"]["package_files"].values())
        total = du(out)
        print(json.dumps({
            "layers": args.layers, "full_layers": 35, "context": report["context"],
            "kv_shared": model.config["num_kv_shared_layers"], "seconds": round(seconds, 1),
            "seconds_split": report["seconds"],
            "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
            "package_bytes": total, "ple_file_bytes": ple, "app_resident_bytes": total - ple,
            "weight_bin_bytes": (out / "Data/com.apple.CoreML/weights/weight.bin").stat().st_size,
            "state_bytes": manifest["state_bytes"], "parameters_in_program":
                report["summary"]["parameters"], "bits_per_weight":
                report["summary"]["bits_per_weight"], "classes": report["summary"]["classes"]}))


if __name__ == "__main__":
    main()
