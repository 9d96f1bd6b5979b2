"""Configs and quantization blocks checked as data, before anything is allocated from them.

Every reader (GGUF, HF folders) and the package loader call `check_config` with the HF config
dict it built or read and the shapes of the tensors actually present (HF names, first axis =
output rows), and the package loader calls `check_quantization` on config.json's
"quantization" block. A count that is not a positive integer, that the tensors contradict
(layers, vocabulary, hidden size, heads), or a rope scaling without its factor becomes one
EdgertError line naming the field; nothing per architecture lives here.
"""

from __future__ import annotations

import math
import os
import re
from typing import Mapping

from .errors import EdgertError

# Counts every supported config carries, and counts checked when present.
REQUIRED_COUNTS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
OPTIONAL_COUNTS = ("intermediate_size", "num_key_value_heads", "head_dim",
                   "max_position_embeddings", "sliding_window")
# Far above any real model, far below what would exhaust memory before a check could run.
LIMITS = {"hidden_size": 1 << 17, "num_hidden_layers": 1 << 12, "num_attention_heads": 1 << 12,
          "num_key_value_heads": 1 << 12, "head_dim": 1 << 12, "vocab_size": 1 << 22,
          "intermediate_size": 1 << 20, "max_position_embeddings": 1 << 24,
          "sliding_window": 1 << 24}
# The layouts MLX's quantized kernels take, per mode (MLX 0.32's table of quantization modes).
QUANT_MODES = {"affine": ((1, 2, 3, 4, 5, 6, 8), (32, 64, 128)),
               "mxfp4": ((4,), (32,)), "nvfp4": ((4,), (16,)), "mxfp8": ((8,), (32,))}
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
SHOWN = 3  # names listed before "and N more"


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def summarize(names, shown: int = SHOWN) -> str:
    """'a, b, c and 417 more' for a long list of names."""
    names = list(names)
    head = ", ".join(map(str, names[:shown]))
    return head + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _counts(config: Mapping) -> dict[str, int]:
    counts = {}
    for key in REQUIRED_COUNTS + OPTIONAL_COUNTS:
        v = config.get(key)
        if v is None:
            if key in REQUIRED_COUNTS:
                raise EdgertError(f"config has no {key}")
            continue
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if not _is_int(v) or v < 1:
            raise EdgertError(f"config {key} = {v!r}: a positive integer is required")
        if v > LIMITS[key]:
            raise EdgertError(f"config {key} = {v} is beyond any real model "
                              f"(at most {LIMITS[key]})")
        counts[key] = v
    heads = counts["num_attention_heads"]
    kv = counts.setdefault("num_key_value_heads", heads)
    if heads % kv:
        raise EdgertError(f"config num_attention_heads = {heads} is not a multiple of "
                          f"num_key_value_heads = {kv}")
    if "head_dim" not in counts:
        if counts["hidden_size"] % heads:
            raise EdgertError(f"config hidden_size = {counts['hidden_size']} does not split "
                              f"into {heads} heads (and there is no head_dim)")
        counts["head_dim"] = counts["hidden_size"] // heads
    return counts


def _check_rope(config: Mapping) -> None:
    for key in ("rope_scaling", "rope_parameters"):
        rope = config.get(key)
        if rope is None:
            continue
        if not isinstance(rope, Mapping):
            raise EdgertError(f"config {key} = {rope!r}: an object is required")
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind in (None, "default"):
            continue
        factor = rope.get("factor")
        if not isinstance(factor, (int, float)) or isinstance(factor, bool) or not (
                math.isfinite(factor) and factor > 0):
            raise EdgertError(f"config {key}: rope_type {kind!r} needs a positive finite "
                              f"factor, got {factor!r}")
    for key in ("rope_theta", "rms_norm_eps"):
        v = config.get(key)
        if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool)
                              or not math.isfinite(v) or v <= 0):
            raise EdgertError(f"config {key} = {v!r}: a positive finite number is required")


def _check_shapes(counts: dict[str, int], shapes: Mapping[str, tuple]) -> None:
    layers = {int(m.group(1)) for n in shapes if (m := _LAYER.search(n))}
    n = counts["num_hidden_layers"]
    if shapes and not layers:
        raise EdgertError(f"config num_hidden_layers = {n}, but no tensor belongs to a layer")
    if extra := sorted(layers - set(range(n))):
        raise EdgertError(f"config num_hidden_layers = {n}, but there are tensors of layers "
                          f"{summarize(extra)}")
    if missing := sorted(set(range(n)) - layers) if layers else []:
        raise EdgertError(f"config num_hidden_layers = {n}, but layers {summarize(missing)} "
                          f"have no tensors (the tensors hold {len(layers)} layers)")

    def rows(suffix: str) -> tuple[str, int] | None:
        name = next((k for k in shapes if k.endswith(suffix)), None)
        shape = shapes[name] if name else None
        return (name, int(shape[0])) if shape else None

    # (tensor, rows expected, what, exact). Head sizes may differ per layer (Gemma 4's global
    # layers, Qwen3-Next's gated queries), so only the head count must divide q_proj's rows;
    # each architecture's own shapes are checked against the built model (package.mismatch).
    expect = [("embed_tokens.weight", counts["vocab_size"], "vocab_size", True),
              ("model.norm.weight", counts["hidden_size"], "hidden_size", True),
              ("layers.0.self_attn.q_proj.weight", counts["num_attention_heads"],
               "num_attention_heads", False)]
    if "intermediate_size" in counts:
        expect.append(("layers.0.mlp.up_proj.weight", counts["intermediate_size"],
                       "intermediate_size", True))
    for suffix, want, what, exact in expect:
        if (got := rows(suffix)) and (got[1] != want if exact else got[1] % want):
            raise EdgertError(f"config {what} = {want}, but tensor {got[0]} has {got[1]} rows")


def check_config(config: Mapping, shapes: Mapping[str, tuple] | None = None) -> dict[str, int]:
    """Validate an HF config dict as data: the counts are positive integers within reach of
    real models, heads split evenly, rope scaling is complete, and, given `shapes` (tensor
    name -> shape, HF names, rows first), the tensors present agree with the counts. Returns
    the counts (with num_key_value_heads and head_dim filled in); raises EdgertError."""
    if not isinstance(config, Mapping):
        raise EdgertError(f"config is a {type(config).__name__}, not an object")
    if isinstance(config.get("text_config"), Mapping):  # multimodal wrappers keep it nested
        config = {**config, **config["text_config"]}
    if not isinstance(config.get("model_type"), str):
        raise EdgertError(f"config model_type = {config.get('model_type')!r}: a name is required")
    counts = _counts(config)
    _check_rope(config)
    if shapes is not None:
        _check_shapes(counts, shapes)
    return counts


def physical_memory() -> int | None:
    """Bytes of RAM on this machine (None where the system does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(nbytes: int, what: str) -> None:
    """Refuse to allocate `nbytes` for `what` when the machine has less RAM than that."""
    total = physical_memory()
    if total is not None and nbytes > total:
        raise EdgertError(f"{what} need {nbytes / 2**30:.1f} GiB, more than this machine's "
                          f"{total / 2**30:.1f} GiB of memory")


def _check_layout(entry: Mapping, where: str, default_mode: str = "affine") -> None:
    mode = entry.get("mode", default_mode)
    if not isinstance(mode, str) or mode not in QUANT_MODES:
        raise EdgertError(f"quantization{where}: mode {mode!r} (supported: "
                          f"{', '.join(QUANT_MODES)})")
    bits, groups = QUANT_MODES[mode]
    b, g = entry.get("bits"), entry.get("group_size")
    if not _is_int(b) or b not in bits:
        raise EdgertError(f"quantization{where}: bits = {b!r} ({mode} takes "
                          f"{', '.join(map(str, bits))})")
    if not _is_int(g) or g not in groups:
        raise EdgertError(f"quantization{where}: group_size = {g!r} ({mode} takes "
                          f"{', '.join(map(str, groups))})")


def check_quantization(quantization) -> None:
    """Validate a package's "quantization" block (defaults plus per-module overrides, each a
    {bits, group_size, mode} object or a boolean) against the layouts MLX's kernels take,
    before any kernel sees it; raises EdgertError."""
    if not isinstance(quantization, Mapping):
        raise EdgertError(f"quantization = {quantization!r}: an object is required")
    _check_layout(quantization, "")
    default_mode = quantization.get("mode", "affine")
    for key, v in quantization.items():
        if key in ("bits", "group_size", "mode"):
            continue
        if isinstance(v, Mapping):
            _check_layout({"bits": quantization["bits"], "group_size": quantization["group_size"],
                           **v}, f" for {key!r}", default_mode)
        elif not isinstance(v, bool):
            raise EdgertError(f"quantization: entry {key!r} = {v!r} is neither a layout "
                              "object nor a boolean")
