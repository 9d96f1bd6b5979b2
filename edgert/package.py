"""Load an MLX package folder (config.json + safetensors + tokenizer) into a model."""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .errors import EdgertError
from .models import get_classes


def read_config(path: Path) -> dict:
    cfg = path / "config.json"
    if not cfg.is_file():
        raise EdgertError(f"{path} is not an MLX package (no config.json)")
    try:
        return json.loads(cfg.read_text())
    except json.JSONDecodeError as e:
        raise EdgertError(f"{cfg}: invalid JSON ({e})") from None


def load_weights(path: Path) -> dict[str, mx.array]:
    files = sorted(path.glob("model*.safetensors"))
    if not files:
        raise EdgertError(f"{path} has no model*.safetensors")
    weights: dict[str, mx.array] = {}
    for f in files:
        weights.update(mx.load(str(f)))
    return weights


def apply_quantization(model: nn.Module, quantization: dict, weights: dict) -> None:
    """Turn Linear/Embedding layers into their quantized form as config.json says.

    Per-module overrides are keyed by module path; a module without `.scales` in the
    weights stays float (the same rules mlx-lm applies).
    """

    def predicate(path: str, module: nn.Module):
        if path in quantization:
            return quantization[path]
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        return True

    nn.quantize(model, group_size=quantization["group_size"], bits=quantization["bits"],
                mode=quantization.get("mode", "affine"), class_predicate=predicate)


def check_fits(path: Path) -> None:
    """Refuse, in one line, a package whose weights exceed the memory available (loading it
    would swap): names its size, the memory available and what would fit."""
    from .bench import available_memory_bytes

    size = sum(f.stat().st_size for f in path.glob("model*.safetensors"))
    avail = available_memory_bytes()
    if size > avail:
        gib = 2**30
        raise EdgertError(f"{path.name}: the weights take {size / gib:.1f} GiB but only "
                          f"{avail / gib:.1f} GiB of memory is available; a model of at most "
                          f"~{0.9 * avail / gib:.1f} GiB would fit (fewer bits, or close other "
                          "programs)")


def follow_renames(quantization: dict, raw: dict, weights: dict) -> dict:
    """Per-module overrides keyed by the package's names, moved to the names the model's
    sanitize gave their tensors (e.g. a VL wrapper's model.language_model.* -> model.*)."""
    by_id = {id(v): k for k, v in weights.items()}
    out = {}
    for key, value in quantization.items():
        scales = raw.get(f"{key}.scales") if isinstance(value, dict) else None
        new = by_id.get(id(scales)) if scales is not None else None
        out[new.removesuffix(".scales") if new else key] = value
    return out


def activation_dtype(weights: dict) -> mx.Dtype:
    """float32 on the CPU backend (its quantized matmul accumulates in the activation dtype);
    elsewhere the dtype of the float weights."""
    if mx.default_device() == mx.cpu:
        return mx.float32
    for k, v in weights.items():
        if k.endswith("norm.weight") and v.dtype in (mx.float16, mx.bfloat16):
            return v.dtype
    return mx.float16


def load_model(path: str | Path, lazy: bool = False,
               parallel: bool = True) -> tuple[nn.Module, dict]:
    """Build the model of an MLX package folder; returns (model, config).

    `parallel` splits large quantized matmuls across CPU cores (CPU backend only;
    bit-identical results, see edgert.parallel)."""
    path = Path(path)
    config = read_config(path)
    check_fits(path)
    model_cls, args_cls = get_classes(config.get("model_type", "<missing>"))
    try:
        args = args_cls.from_dict(config)
    except TypeError as e:
        raise EdgertError(f"{path}/config.json: {e}") from None
    model = model_cls(args)
    raw = load_weights(path)
    weights = model.sanitize(dict(raw))
    q = config.get("quantization")
    q = follow_renames(q, raw, weights) if q is not None else None
    del raw
    if mx.default_device() == mx.cpu:
        # float32 scales and biases once here, rather than a cast in every quantized matmul
        # (the activations are float32 on the CPU; exact widening, +0.125 bytes per weight)
        weights = {k: v.astype(mx.float32) if k.endswith((".scales", ".biases"))
                   and v.dtype in (mx.float16, mx.bfloat16) else v for k, v in weights.items()}
    if q is not None:
        from .probe import widen_for_device

        q = widen_for_device(q, weights)  # layouts this device cannot run, widened losslessly
        apply_quantization(model, q, weights)
    from .layers import swap_layers

    swap_layers(model, weights, config)  # GPTQ act-order inputs, BitNet linear layers
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise EdgertError(f"{path}: weights do not match the config ({e})") from None
    model.activation_dtype = activation_dtype(weights)
    if parallel:
        from .parallel import parallelize

        parallelize(model)
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    return model, config


def load(model: str | Path | None = None, lazy: bool = False):
    """Load a model and its tokenizer: an MLX package folder, a .gguf file (converted into the
    cache on first use), or None for the embedded default model. Returns (model, tokenizer)."""
    from .convert.api import ensure_package
    from .tokenizer import load_tokenizer

    path = ensure_package(model)
    m, _ = load_model(path, lazy=lazy)
    return m, load_tokenizer(path)
