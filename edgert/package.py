"""Load an MLX package folder (config.json + safetensors + tokenizer) into a model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import EdgertError
from .models import get_classes
from .validate import check_config, check_memory, check_quantization, summarize


def read_config(path: Path) -> dict:
    cfg = path / "config.json"
    if not cfg.is_file():
        raise EdgertError(f"{path} is not an MLX package (no config.json)")
    try:
        config = json.loads(cfg.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdgertError(f"{cfg}: invalid JSON ({e})") from None
    if not isinstance(config, dict):
        raise EdgertError(f"{cfg}: not a JSON object")
    return config


def load_weights(path: Path, exclude: tuple[str, ...] = ()) -> dict[str, mx.array]:
    """The package's weights (lazily); `exclude` names files the model maps itself."""
    files = sorted(f for f in path.glob("model*.safetensors") if f.name not in exclude)
    if not files:
        raise EdgertError(f"{path} has no model*.safetensors")
    weights: dict[str, mx.array] = {}
    for f in files:
        try:
            weights.update(mx.load(str(f)))
        except (RuntimeError, ValueError, OSError) as e:  # MLX's own header and size checks
            raise EdgertError(f"{f}: corrupt safetensors file ({str(e).splitlines()[0]})") from None
    return weights


def check_package(path: Path, config: dict, weights: dict[str, mx.array]) -> None:
    """config.json against the tensors present, and its quantization block, as data
    (edgert.validate), before any layer is built or any kernel runs."""
    quantization = config.get("quantization")
    try:
        check_config(config, {k: tuple(v.shape) for k, v in weights.items()})
        if quantization is not None:
            check_quantization(quantization)
    except EdgertError as e:
        raise EdgertError(f"{path / 'config.json'}: {e}") from None
    check_memory(sum(v.nbytes for v in weights.values()), f"the weights of {path}")
    if quantization is None and (scales := [k for k in weights if k.endswith(".scales")]):
        raise EdgertError(f"{path / 'config.json'}: no quantization block, but {len(scales)} "
                          f"tensors are quantized ({summarize(scales)})")


def mismatch(model: nn.Module, weights: dict) -> str | None:
    """One line saying which parameters the weights lack or add (counts and the first few)."""

    want = {k for k, _ in tree_flatten(model.parameters())}
    missing, extra = sorted(want - weights.keys()), sorted(weights.keys() - want)
    parts = [f"{len(missing)} missing ({summarize(missing)})"] if missing else []
    parts += [f"{len(extra)} unexpected ({summarize(extra)})"] if extra else []
    return "; ".join(parts) or None


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


def check_fits(path: Path, exclude: tuple = ()) -> None:
    """Refuse, in one line, a package whose weights exceed the memory available (loading it
    would swap): names its size, the memory available and what would fit. Files the model
    maps itself (`exclude`) are not loaded, so they do not count."""
    from .bench import available_memory_bytes

    size = sum(f.stat().st_size for f in path.glob("model*.safetensors") if f.name not in exclude)
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
    model_cls, args_cls = get_classes(config.get("model_type"))
    # files the model maps itself (Gemma 4's PLE table) are not loaded as weights
    own_files = tuple(getattr(model_cls, "package_files", {}).values())
    weights = load_weights(path, exclude=own_files)  # lazy: headers only until evaluated
    check_package(path, config, weights)
    check_fits(path, own_files)
    try:
        args = args_cls.from_dict(config)
    except TypeError as e:
        raise EdgertError(f"{path}/config.json: {e}") from None
    model = model_cls(args)
    raw = weights
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
        try:
            apply_quantization(model, q, weights)
        except ValueError as e:  # layers sized from the config that its layout cannot split
            raise EdgertError(f"{path}: config.json does not match the weights "
                              f"({str(e).splitlines()[0]})") from None
    from .layers import swap_layers

    swap_layers(model, weights, config)  # GPTQ act-order inputs, BitNet linear layers
    if own_files:  # tables looked up from a memory-mapped file (Gemma 4's PLE)
        model.map_files(path, config, weights)
    if (problem := mismatch(model, weights)) is not None:
        raise EdgertError(f"{path}: weights do not match the config: {problem}")
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:  # shapes
        raise EdgertError(f"{path}: weights do not match the config "
                          f"({summarize(str(e).splitlines(), 2)})") from None
    model.activation_dtype = activation_dtype(weights)
    if parallel:
        from .parallel import parallelize

        parallelize(model)
    wire(model)
    if not lazy:
        mx.eval(model.parameters())
    model.eval()
    return model, config


def wire(model: nn.Module) -> int | None:
    """Where the device recommends a working-set size (Metal), raise MLX's wired limit to it, as
    mlx-lm does while it generates, so the weights are not paged out between tokens; say once
    on stderr when the model takes over 90% of it. Returns the previous limit, or None where
    the device recommends nothing (the CPU and CUDA backends) and nothing was changed."""
    recommended = mx.device_info().get("max_recommended_working_set_size")
    if not recommended:
        return None
    size = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    if size > 0.9 * recommended:
        print(f"edgert: the weights take {size / 2**30:.1f} GiB, over 90% of the "
              f"{recommended / 2**30:.1f} GiB this GPU keeps resident; decoding may page "
              "(a smaller quantization would fit)", file=sys.stderr)
    return mx.set_wired_limit(recommended)


def load(model: str | Path | None = None, lazy: bool = False):
    """Load a model and its tokenizer: an MLX package folder, a .gguf file (converted into the
    cache on first use), or None for the embedded default model. Returns (model, tokenizer)."""
    from .convert.api import ensure_package
    from .tokenizer import load_tokenizer

    path = ensure_package(model)
    m, _ = load_model(path, lazy=lazy)
    return m, load_tokenizer(path)
