"""Where Gemma needs more than fp16, measured on real weights: Gemma 3 270M (its Q4_K_M GGUF,
the one real Gemma on these machines) run as a gemma4_text model through edgert's Gemma 4
Core ML graph (convert/coreml_gemma4.py) and its MLX model, both on the same canonical weights.

Gemma 3's block is Gemma 4's without per-layer embeddings, KV sharing, layer_scalar and the
value norm; here the norms' stored w become the 1 + w Gemma 3 applies, Gemma 3's attention
scale 256^-0.5 is folded into the q-norm weights (Gemma 4 has scale 1.0), and the value norm
Gemma 4 adds stays (so this is not Gemma 3's output, but its residual stream: the post-norms
set the size of what each block adds, whatever the values are). The vocabulary is cut to the
rows the prompt uses plus the first 256 (rows kept bit for bit) so the export stays small.

    .venv/bin/python bench/gemma_fp16_range.py --layers 10

Prints, per layer, max |residual| in the MLX engine (float32), then the Core ML program's
logits (numpy MIL interpreter) against the MLX engine's: prefill, then greedy decode steps.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GGUF = Path.home() / ".cache/edgert-test-data/gemma3/gemma-3-270m-q4_k_m.gguf"
TEXT = ("The capital of France is Paris. The capital of Germany is Berlin. Write a short poem "
        "about the sea and the wind, please.")
S, F = "sliding_attention", "full_attention"


def gemma3_as_gemma4(layers: int):
    """(CanonicalModel of a gemma4_text config, prompt ids in its cut vocabulary)."""
    import tokenizers

    from edgert.convert.canonical import CanonicalModel, QuantTensor, TensorRecord
    from edgert.convert.gguf_reader import read_gguf

    src = read_gguf(GGUF)
    cfg = src.config
    tok = tokenizers.Tokenizer.from_str(src.tokenizer_files["tokenizer.json"].decode())
    ids = [cfg["bos_token_id"]] + tok.encode(TEXT, add_special_tokens=False).ids
    rows = np.array(sorted(set(range(256)) | set(ids)))
    remap = {int(r): i for i, r in enumerate(rows)}
    scale = cfg["query_pre_attn_scalar"] ** -0.5
    kept = []
    for rec in src.tensors():
        name, v = rec.name, rec.value
        if name.startswith("model.layers.") and int(name.split(".")[2]) >= layers:
            continue
        if name == "model.embed_tokens.weight":
            v = QuantTensor(v.w_q[rows], v.scales[rows], v.biases[rows], v.bits, v.group_size)
        elif name.endswith("norm.weight"):  # Gemma 3 applies 1 + w
            v = (1.0 + v.astype(np.float32)) * (scale if "q_norm" in name else 1.0)
        kept.append(TensorRecord(name, v, rec.source_name, rec.source_type, rec.mapping))
    kept += [TensorRecord(f"model.layers.{i}.layer_scalar", np.ones(1, np.float32),
                          "(none: Gemma 3 has no layer scalar)", "F32", "float")
             for i in range(layers)]
    types = [F if (i + 1) % cfg["sliding_window_pattern"] == 0 else S for i in range(layers)]
    config = dict(model_type="gemma4_text", hidden_size=cfg["hidden_size"],
                  num_hidden_layers=layers, intermediate_size=cfg["intermediate_size"],
                  num_attention_heads=cfg["num_attention_heads"],
                  num_key_value_heads=cfg["num_key_value_heads"], head_dim=cfg["head_dim"],
                  vocab_size=len(rows), vocab_size_per_layer_input=len(rows),
                  rms_norm_eps=cfg["rms_norm_eps"], sliding_window=cfg["sliding_window"],
                  layer_types=types, hidden_size_per_layer_input=0, num_kv_shared_layers=0,
                  rope_parameters={S: {"rope_type": "default",
                                       "rope_theta": cfg["rope_local_base_freq"]},
                                   F: {"rope_type": "default", "rope_theta": cfg["rope_theta"]}},
                  max_position_embeddings=cfg["max_position_embeddings"],
                  tie_word_embeddings=True, bos_token_id=0, eos_token_id=1)
    model = CanonicalModel(config, lambda: iter(kept), len(kept), {},
                           {"format": "gguf", "path": str(GGUF), "cut": "gemma3 as gemma4"})
    return model, [remap[i] for i in ids]


def residual_maxima(model, ids: list[int]) -> list[float]:
    """max |residual| after each layer of the MLX model (float32), for the whole prompt."""
    import mlx.core as mx

    m = model.model
    x = mx.array([ids])
    h = m.embed_tokens(x).astype(mx.float32) * mx.array(m.args.hidden_size**0.5, mx.float32)
    masks = m.masks(len(ids), [None] * len(m.layers))
    out = []
    for layer in m.layers:
        h, _ = layer(h, None, masks[layer.layer_type], None, 0)
        out.append(float(mx.abs(h).max()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--decode", type=int, default=8)
    args = ap.parse_args()
    import mlx.core as mx

    from edgert.convert.coreml_writer import write_coreml
    from edgert.convert.mlx_writer import write_mlx_package
    from edgert.coreml_engine import CoreMLModel
    from edgert.package import load_model

    t0 = time.time()
    canonical, ids = gemma3_as_gemma4(args.layers)
    with tempfile.TemporaryDirectory() as tmp:
        write_mlx_package(canonical, Path(tmp) / "mlx")
        report = write_coreml(canonical, Path(tmp) / "g.mlpackage", context=128)
        model, _ = load_model(Path(tmp) / "mlx")
        maxima = residual_maxima(model, ids)
        coreml = CoreMLModel(report["path"], backend="interpreter")
        cache, ccache = model.make_cache(), coreml.make_cache()
        ref = np.array(model(mx.array([ids]), cache=cache))[:, -1:]
        ours = np.array(coreml(mx.array([ids]), cache=ccache))
        steps = []
        for _ in range(args.decode + 1):
            steps.append({"finite": bool(np.isfinite(ours).all()),
                          "rel_err": float(np.abs(ours - ref).max() / np.abs(ref).max()),
                          "top1_same": bool(ours.argmax() == ref.argmax())})
            tok = mx.array([[int(ref.argmax())]])
            ref, ours = (np.array(model(tok, cache=cache)),
                         np.array(coreml(tok, cache=ccache)))
    print(json.dumps({"layers": args.layers, "prompt_tokens": len(ids),
                      "residual_max_per_layer": [round(m, 1) for m in maxima],
                      "over_fp16_max_from_layer": next((i for i, m in enumerate(maxima)
                                                        if m > 65504), None),
                      "steps": steps, "seconds": round(time.time() - t0, 1)}))


if __name__ == "__main__":
    main()
