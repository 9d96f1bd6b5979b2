"""`edgert info`: a summary of an MLX package from its config.json and edgert.json."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from .package import read_config


def package_info(path: Path) -> dict:
    config = read_config(path)
    meta_file = path / "edgert.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    size = sum(f.stat().st_size for f in path.glob("model*.safetensors"))
    by_type: dict[str, dict] = defaultdict(lambda: {"tensors": 0, "parameters": 0, "bytes": 0.0})
    params, active = 0, 0.0
    text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
    top_k = text.get("num_experts_per_tok")
    for name, t in meta.get("tensors", {}).items():
        n = 1
        for d in t["shape"]:
            n *= d
        params += n
        # a token reads k of each MoE layer's E experts
        share = top_k / t["experts"] if t.get("experts") and top_k else 1.0
        active += n * share
        key = t["source_type"]
        if "bits" in t:
            key += f" → {t['bits']}-bit g{t['group_size']} ({t['class']})"
        else:
            key += f" → {t.get('dtype', '?')} ({t['class']})"
        entry = by_type[key]
        entry["tensors"] += 1
        entry["parameters"] += n
        entry["bytes"] += n * t["bits_per_weight"] / 8
    q = config.get("quantization") or {}
    residency = _residency(config, meta.get("tensors", {}), top_k)
    return {
        "path": str(path),
        "architecture": config.get("model_type"),
        "layers": text.get("num_hidden_layers"),  # a wrapper's (mlx-lm's VL folders) text model
        "hidden_size": text.get("hidden_size"),
        "heads": f"{text.get('num_attention_heads')} (kv {text.get('num_key_value_heads')})",
        "vocab_size": text.get("vocab_size"),
        "context_length": text.get("max_position_embeddings"),
        "parameters": params or None,
        "active_parameters": round(active) or None,  # per token: k of E experts (MoE)
        "experts": (f"{top_k} of {text.get('num_experts') or text.get('num_local_experts')}"
                    if top_k else None),
        "size_bytes": size,
        "bits_per_weight": round(8 * size / params, 3) if params else None,
        "quantization": {k: q[k] for k in ("bits", "group_size", "mode") if k in q},
        "by_type": dict(by_type),
        **residency,
        "source": meta.get("source", {}),
        "tensors": meta.get("tensors", {}),
    }


def _residency(config: dict, tensors: dict, top_k: int | None = None) -> dict:
    """Stored vs resident parameters and the weight bytes a decode step reads: modules the
    architecture keeps in a memory-mapped file of its own (Model.package_files, e.g. Gemma 4's
    per-layer embeddings) are stored but not resident, and a token reads one row of each;
    of a stacked MoE tensor of E experts a token reads the k (`top_k`) it is routed to."""
    from .errors import EdgertError
    from .models import get_classes

    try:
        mapped = tuple(getattr(get_classes(config.get("model_type", ""))[0], "package_files", {}))
    except EdgertError:
        mapped = ()
    stored = resident = read = 0
    for name, t in tensors.items():
        n = 1
        for d in t["shape"]:
            n *= d
        nbytes = n * t["bits_per_weight"] / 8
        stored += n
        if any(name.startswith(m + ".") for m in mapped):
            read += nbytes / t["shape"][0]  # one row per token
        else:
            resident += n
            read += nbytes * (top_k / t["experts"] if t.get("experts") and top_k else 1.0)
    return {"stored_parameters": stored or None, "resident_parameters": resident or None,
            "bytes_read_per_token": int(read) or None}


def print_info(s: dict, tensors: bool = False) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    head = Table(show_header=False, box=None)
    for label, key in [("path", "path"), ("architecture", "architecture"), ("layers", "layers"),
                       ("hidden size", "hidden_size"), ("heads", "heads"),
                       ("vocabulary", "vocab_size"), ("context", "context_length")]:
        head.add_row(label, str(s[key]))
    if s["parameters"]:
        head.add_row("parameters", f"{s['parameters'] / 1e6:.1f} M")
    if s.get("experts"):
        head.add_row("experts per token", s["experts"])
        head.add_row("active parameters", f"{s['active_parameters'] / 1e6:.1f} M per token")
    if s.get("resident_parameters") and s["resident_parameters"] != s["stored_parameters"]:
        head.add_row("stored parameters", f"{s['stored_parameters'] / 1e6:.1f} M")
        head.add_row("resident parameters", f"{s['resident_parameters'] / 1e6:.1f} M "
                     "(the rest is looked up from a memory-mapped file)")
    if s.get("bytes_read_per_token"):
        head.add_row("weight bytes read per token", f"{s['bytes_read_per_token'] / 2**20:.1f} MiB")
    head.add_row("size", f"{s['size_bytes'] / 2**20:.1f} MiB")
    if s["bits_per_weight"]:
        head.add_row("bits per weight", f"{s['bits_per_weight']:.3f}")
    if s["source"]:
        head.add_row("source", f"{s['source'].get('path', '?')} ({s['source'].get('format', '?')})")
    console.print(head)
    table = Table(title="quantization by type")
    for col in ("source type → MLX", "tensors", "parameters", "MiB"):
        table.add_column(col, justify="right" if col != "source type → MLX" else "left")
    for key, e in sorted(s["by_type"].items(), key=lambda kv: -kv[1]["parameters"]):
        table.add_row(key, str(e["tensors"]), f"{e['parameters']:,}", f"{e['bytes'] / 2**20:.1f}")
    console.print(table)
    if tensors:
        t = Table(title="tensors")
        for col in ("name", "source", "class", "bits", "max abs err", "bpw"):
            t.add_column(col)
        for name, e in s["tensors"].items():
            bits = f"{e['bits']}b g{e['group_size']}" if "bits" in e else e.get("dtype", "")
            t.add_row(name, e["source_type"], e["class"], bits, f"{e['max_abs_error']:.3g}",
                      f"{e['bits_per_weight']:.3f}")
        console.print(t)
