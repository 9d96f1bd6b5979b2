"""Prompt caches on disk: a model's cache after a prompt, saved as safetensors with metadata
naming the model it belongs to, so that a long shared prefix (a system prompt, a document) is
computed once. Any cache kind: each layer's snapshot (edgert.models.cache) is flattened into
tensors plus a JSON description of its structure.

    save_prompt_cache("sys.safetensors", package, tokens, cache)
    tokens, snap = load_prompt_cache("sys.safetensors", package)   # refuses another model's
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import mlx.core as mx

from .errors import EdgertError

FORMAT = "edgert-prompt-cache/1"


def model_fingerprint(package: Path) -> str:
    """The identity of a package's model: its config and its weight files' names and sizes."""
    package = Path(package)
    h = hashlib.sha256((package / "config.json").read_bytes())
    for f in sorted(package.glob("model*.safetensors")):
        h.update(f"{f.name}:{f.stat().st_size}".encode())
    return h.hexdigest()[:32]


def _flatten(obj, tensors: dict, prefix: str):
    """A JSON-able description of a snapshot, its arrays moved into `tensors`."""
    if isinstance(obj, mx.array):
        tensors[prefix] = obj
        return {"array": prefix}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return {"value": obj}
    if isinstance(obj, (list, tuple)):
        return {"tuple" if isinstance(obj, tuple) else "list":
                [_flatten(x, tensors, f"{prefix}.{i}") for i, x in enumerate(obj)]}
    raise EdgertError(f"cannot save a cache snapshot holding {type(obj).__name__}")


def _unflatten(desc, tensors: dict):
    if "array" in desc:
        return tensors[desc["array"]]
    if "value" in desc:
        return desc["value"]
    if "tuple" in desc:
        return tuple(_unflatten(d, tensors) for d in desc["tuple"])
    return [_unflatten(d, tensors) for d in desc["list"]]


def save_prompt_cache(path: str | Path, package: Path, tokens: list[int], cache: list) -> Path:
    """Write `cache` (holding exactly `tokens`) to `path`; written whole or not at all."""
    from .models.cache import snapshot

    path = Path(path)
    if path.suffix != ".safetensors":
        raise EdgertError(f"{path}: a prompt cache file must end in .safetensors")
    tensors: dict[str, mx.array] = {}
    layers = [_flatten(s, tensors, f"layer{i}") for i, s in enumerate(snapshot(cache))]
    metadata = {"format": FORMAT, "model": model_fingerprint(package),
                "model_name": Path(package).name, "tokens": json.dumps(tokens),
                "layers": json.dumps(layers),
                "kinds": json.dumps([type(c).__name__ for c in cache])}
    tmp = path.with_name(f".{path.name}.tmp.safetensors")
    mx.save_safetensors(str(tmp), tensors, metadata=metadata)
    os.replace(tmp, path)
    return path


def load_prompt_cache(path: str | Path, package: Path, cache: list | None = None
                      ) -> tuple[list[int], list]:
    """(tokens, per-layer snapshot) from `path`; EdgertError if it belongs to another model,
    or if `cache` (the model's fresh cache) has other kinds of layers."""
    path = Path(path)
    if not path.is_file():
        raise EdgertError(f"{path}: no such prompt cache")
    try:
        tensors, meta = mx.load(str(path), return_metadata=True)
    except Exception as e:
        raise EdgertError(f"{path}: not a safetensors file ({e})") from None
    if meta.get("format") != FORMAT:
        raise EdgertError(f"{path} is not an edgert prompt cache")
    if meta.get("model") != model_fingerprint(package):
        raise EdgertError(f"{path} is a prompt cache for another model "
                          f"({meta.get('model_name')}), not {Path(package).name}")
    kinds = json.loads(meta["kinds"])
    if cache is not None and kinds != [type(c).__name__ for c in cache]:
        raise EdgertError(f"{path}: its cache layers ({', '.join(sorted(set(kinds)))}) do not "
                          "match this model's")
    snap = [_unflatten(d, tensors) for d in json.loads(meta["layers"])]
    return json.loads(meta["tokens"]), snap


def prefill_cache(model, tokens: list[int], step: int = 512) -> list:
    """A fresh cache of `model` holding `tokens`."""
    from .models.cache import make_cache

    cache = make_cache(model)
    for i in range(0, len(tokens), step):
        model(mx.array(tokens[i:i + step], dtype=mx.uint32)[None], cache=cache)
        mx.eval([c.state for c in cache])
    return cache
