"""Max |activation| per op and layer of the real Gemma 3 270M (its Q4_K_M GGUF) in edgert's MLX
engine, float32, over one 28-token prompt: which values outgrow fp16 (65504).

    .venv/bin/python bench/gemma3_activations.py --package /tmp/g3pkg   # converts once
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GGUF = Path.home() / ".cache/edgert-test-data/gemma3/gemma-3-270m-q4_k_m.gguf"
TEXT = ("The capital of France is Paris. The capital of Germany is Berlin. Write a short poem "
        "about the sea and the wind, please.")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--package", default="/tmp/edgert-gemma3-270m")
    args = ap.parse_args()
    import mlx.core as mx
    import mlx.nn as nn

    from edgert.convert.api import convert_file
    from edgert.package import load_model
    from edgert.tokenizer import load_tokenizer

    pkg = Path(args.package)
    if not pkg.exists():
        convert_file(GGUF, pkg, progress=False)
    model, cfg = load_model(pkg)
    ids = mx.array([load_tokenizer(pkg).encode(TEXT)])
    m = model.model
    h = m.embed_tokens(ids).astype(mx.float32) * mx.array(cfg["hidden_size"]**0.5, mx.float32)
    masks = m.masks(ids.shape[1], [None] * len(m.layers))

    def top(a) -> float:
        return round(float(mx.abs(a).max()), 1)

    rows = []
    for i, layer in enumerate(m.layers):
        r = {"layer": i, "type": layer.layer_type, "residual_in": top(h)}
        x = layer.input_layernorm(h)
        a = layer.self_attn
        o = a(x, masks[layer.layer_type], None)
        r |= {"input_norm": top(x), "q": top(a.q_proj(x)), "k": top(a.k_proj(x)),
              "v": top(a.v_proj(x)), "o_proj": top(o)}
        pa = layer.post_attention_layernorm(o)
        h = h + pa
        f = layer.pre_feedforward_layernorm(h)
        g, u = layer.mlp.gate_proj(f), layer.mlp.up_proj(f)
        d = layer.mlp.down_proj(nn.gelu_approx(g) * u)
        pf = layer.post_feedforward_layernorm(d)
        h = h + pf
        r |= {"post_attention_norm": top(pa), "pre_ff_norm": top(f), "gate": top(g), "up": top(u),
              "gelu_x_up": top(nn.gelu_approx(g) * u), "down": top(d), "post_ff_norm": top(pf),
              "residual_out": top(h),
              "post_ff_norm_weight": top(1 + layer.post_feedforward_layernorm.weight)}
        rows.append(r)
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
