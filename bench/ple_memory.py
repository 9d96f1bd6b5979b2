"""Peak resident memory while generating with a synthetic Gemma-4-E4B-shaped 4-bit package:
edgert with the per-layer embedding (PLE) table memory-mapped, edgert with the table read into
memory, and mlx-lm on the same package.

The package is built in quantized form directly (random 4-bit codes, float16 scales and biases)
through edgert's MLX writer; no float model exists at any point. Each runtime runs in its own
subprocess (load, prefill, greedy decode) and reports its VmHWM (peak RSS) from /proc.

    .venv/bin/python bench/ple_memory.py --layers 12 --tokens 8

E4B shape (gemma-4-E4B text_config): hidden 2560, 42 layers (every 5th full), MLP 10240, 8
heads / 2 kv heads, head_dim 256 (512 on full layers), PLE 256 per layer, vocab 262144, the
last 18 layers KV-shared. `--layers` cuts the depth (and the PLE table, one 256-wide slice per
layer, with it) and scales the KV-shared count in proportion.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

E4B = dict(hidden_size=2560, num_hidden_layers=42, intermediate_size=10240,
           num_attention_heads=8, num_key_value_heads=2, head_dim=256, global_head_dim=512,
           hidden_size_per_layer_input=256, vocab_size=262144, vocab_size_per_layer_input=262144,
           num_kv_shared_layers=18, sliding_window=512, final_logit_softcapping=30.0,
           use_double_wide_mlp=False, attention_k_eq_v=False, rms_norm_eps=1e-6,
           max_position_embeddings=131072, tie_word_embeddings=True)


def e4b_config(layers: int) -> dict:
    cfg = dict(E4B, model_type="gemma4_text", num_hidden_layers=layers,
               num_kv_shared_layers=round(18 * layers / 42))
    cfg["layer_types"] = ["full_attention" if (i + 1) % 5 == 0 else "sliding_attention"
                          for i in range(layers)]
    cfg["layer_types"][-1] = "full_attention"
    cfg["rope_parameters"] = {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                           "rope_theta": 1000000.0}}
    return cfg


def shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of the model, HF names -> shapes (KV-shared layers have no k/v)."""
    h, n, ple = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["hidden_size_per_layer_input"]
    first_shared = n - cfg["num_kv_shared_layers"]
    out = {"model.embed_tokens.weight": (cfg["vocab_size"], h),
           "model.embed_tokens_per_layer.weight": (cfg["vocab_size_per_layer_input"], n * ple),
           "model.per_layer_model_projection.weight": (n * ple, h),
           "model.per_layer_projection_norm.weight": (ple,), "model.norm.weight": (h,)}
    for i, t in enumerate(cfg["layer_types"]):
        p = f"model.layers.{i}."
        hd = cfg["global_head_dim"] if t == "full_attention" else cfg["head_dim"]
        q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
        out |= {p + "self_attn.q_proj.weight": (q, h), p + "self_attn.o_proj.weight": (h, q),
                p + "self_attn.q_norm.weight": (hd,)}
        if i < first_shared:
            out |= {p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.v_proj.weight": (kv, h),
                    p + "self_attn.k_norm.weight": (hd,)}
        ffn = cfg["intermediate_size"]
        out |= {p + "mlp.gate_proj.weight": (ffn, h), p + "mlp.up_proj.weight": (ffn, h),
                p + "mlp.down_proj.weight": (h, ffn),
                p + "per_layer_input_gate.weight": (ple, h),
                p + "per_layer_projection.weight": (h, ple), p + "layer_scalar": (1,)}
        for norm in ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm",
                     "post_feedforward_layernorm", "post_per_layer_input_norm"):
            out[p + norm + ".weight"] = (h,)
    return out


def build(folder: Path, layers: int, bits: int = 4, group: int = 64) -> Path:
    """A random quantized package written tensor by tensor (one in memory at a time)."""
    from edgert.convert.canonical import FLOAT, REQUANTIZED, CanonicalModel, TensorRecord
    from edgert.convert.mlx_writer import write_mlx_package
    from edgert.quant import QuantTensor

    cfg = e4b_config(layers)
    table = shapes(cfg)
    rng = np.random.default_rng(0)

    def records():
        for name, shape in table.items():
            if len(shape) == 1:
                yield TensorRecord(name, np.ones(shape, np.float32), name, "synthetic", FLOAT)
                continue
            rows, cols = shape
            w_q = rng.integers(0, 2**32, (rows, cols * bits // 32), dtype=np.uint32)
            s = np.full((rows, cols // group), 0.5 / (8 * np.sqrt(cols)), np.float16)
            yield TensorRecord(name, QuantTensor(w_q, s, -8 * s, bits, group), name,
                               "synthetic", REQUANTIZED)

    model = CanonicalModel(config=cfg, tensors=records, tensor_count=len(table),
                           source={"format": "synthetic", "shape": "gemma-4-E4B"})
    return write_mlx_package(model, folder, force=True)


RUN = r"""
import json, sys, time
import mlx.core as mx
pkg, mode, n_prompt, n_tokens = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
t0 = time.time()
if mode == "mlx-lm":
    from mlx_lm.utils import load_model
    model, _ = load_model(__import__("pathlib").Path(pkg))
else:
    from edgert.package import load_model
    model, config = load_model(pkg)
    if mode == "edgert-resident":
        model.map_files(pkg, config, resident=True)
load_s = time.time() - t0
cache = model.make_cache()
ids = mx.array([[(7 * i + 3) % 1000 for i in range(n_prompt)]])
t0 = time.time()
y = model(ids, cache=cache)[:, -1].argmax(-1)
out = []
for _ in range(n_tokens):
    mx.eval(y)
    out.append(int(y.item()))
    y = model(y[None], cache=cache)[:, -1].argmax(-1)
mx.eval(y)
gen_s = time.time() - t0
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"mode": mode, "peak_rss_mib": hwm / 1024, "load_s": load_s,
                  "generate_s": gen_s, "tokens": out}))
"""


def measure(pkg: Path, mode: str, n_prompt: int, n_tokens: int) -> dict:
    p = subprocess.run([sys.executable, "-c", RUN, str(pkg), mode, str(n_prompt), str(n_tokens)],
                       capture_output=True, text=True)
    if p.returncode:
        return {"mode": mode, "error": (p.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--layers", type=int, default=42)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=8)
    ap.add_argument("--out", type=Path, default=None, help="package folder (default: temp)")
    args = ap.parse_args()
    folder = args.out or Path(tempfile.mkdtemp()) / "e4b"
    pkg = build(folder, args.layers)
    from edgert.info import package_info

    info = package_info(pkg)
    print(f"package {pkg}: {info['size_bytes'] / 2**30:.2f} GiB on disk; stored "
          f"{info['stored_parameters'] / 1e9:.2f} B parameters, resident "
          f"{info['resident_parameters'] / 1e9:.2f} B; weight bytes read per token "
          f"{info['bytes_read_per_token'] / 2**20:.0f} MiB; PLE file "
          f"{(pkg / 'model-per-layer-embeddings.safetensors').stat().st_size / 2**30:.2f} GiB")
    for mode in ("edgert-mapped", "edgert-resident", "mlx-lm"):
        r = measure(pkg, mode, args.prompt, args.tokens)
        print(json.dumps(r))


if __name__ == "__main__":
    main()
