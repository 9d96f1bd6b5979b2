"""CanonicalModel -> MLX package folder (the layout mlx-lm writes and loads).

    OUT/config.json              HF config + "quantization" (defaults, per-module overrides)
    OUT/model.safetensors        or model-0000i-of-0000N.safetensors + model.safetensors.index.json
    OUT/tokenizer.json, ...      the tokenizer files of the canonical model
    OUT/edgert.json              provenance, per-tensor report, totals

A quantized tensor `X.weight` is stored as `X.weight` (uint32 w_q), `X.scales`, `X.biases`;
float tensors keep their dtype. Tensors are written in the architecture's package layout
(its `package_tensors`, where it has one). The package is built in a temporary sibling
folder and moved into place with os.replace once complete, so an interrupted conversion
leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable, Iterator, NamedTuple

import numpy as np

from edgert.errors import EdgertError
from edgert.paths import sweep_partials, temp_sibling
from edgert.signals import raise_pending

from .canonical import CanonicalModel, QuantTensor, TensorRecord

FORMAT_VERSION = 1
SHARD_BYTES = 2 << 30
_ST_DTYPES = {"float32": "F32", "float16": "F16", "float64": "F64", "uint32": "U32",
              "uint16": "U16", "uint8": "U8", "int32": "I32", "int16": "I16", "int8": "I8",
              "int64": "I64", "bool": "BOOL"}


class OutputExistsError(EdgertError):
    """The output folder exists and replacing it was not asked for."""


class ShardWriter:
    """A safetensors file written tensor by tensor: data goes straight to disk behind a header
    area reserved up front (`reserve` bytes, padded with spaces as the format allows), so a
    shard never has to be held in memory."""

    def __init__(self, path: Path, reserve: int):
        self.path, self.reserve = path, reserve + (-reserve % 8)  # data 8-byte aligned
        self._f = open(path, "wb")
        self._f.seek(8 + self.reserve)
        self.header: dict = {}
        self.nbytes = 0

    def add(self, name: str, a: np.ndarray) -> None:
        if a.dtype.name not in _ST_DTYPES:
            raise EdgertError(f"tensor {name}: dtype {a.dtype} cannot be stored in safetensors")
        self.header[name] = {"dtype": _ST_DTYPES[a.dtype.name], "shape": list(a.shape),
                             "data_offsets": [self.nbytes, self.nbytes + a.nbytes]}
        self._f.write(np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).data)
        self.nbytes += a.nbytes

    def close(self, metadata: dict[str, str]) -> None:
        blob = json.dumps({"__metadata__": metadata, **self.header}, separators=(",", ":")).encode()
        if len(blob) > self.reserve:
            raise EdgertError(f"{self.path.name}: header of {len(blob)} bytes exceeds the "
                              f"{self.reserve} reserved")
        self._f.seek(0)
        self._f.write(self.reserve.to_bytes(8, "little"))
        self._f.write(blob + b" " * (self.reserve - len(blob)))
        self._f.close()


def header_reserve(names: int) -> int:
    """Bytes to reserve for the header of a shard holding up to `names` tensors."""
    return 4096 + 320 * names


def _arrays(record: TensorRecord) -> dict[str, np.ndarray]:
    v = record.value
    if not isinstance(v, QuantTensor):
        return {record.name: v}
    if not record.name.endswith(".weight"):
        raise EdgertError(f"quantized tensor {record.name} is not a .weight")
    module = record.name.removesuffix(".weight")
    arrays = {f"{module}.weight": v.w_q, f"{module}.scales": v.scales}
    if v.biases is not None:  # mode "mxfp4" has none
        arrays[f"{module}.biases"] = v.biases
    return arrays


# A vision-language wrapper's text model: the package keeps HF's names (the first); mlx-lm's
# VL models name their modules the second way, and look overrides up by their module paths.
VL_TEXT = ("model.language_model.", "language_model.model.")


def quantization_config(quantized: dict[str, QuantTensor]) -> dict | None:
    """config.json's "quantization": the (bits, group, mode) with most parameters as the
    default, plus an override for each module path that differs from it."""
    if not quantized:
        return None
    count: Counter = Counter()
    for q in quantized.values():
        count[(q.bits, q.group_size, q.mode)] += int(np.prod(q.shape))
    bits, group, mode = count.most_common(1)[0][0]
    out: dict = {"group_size": group, "bits": bits, "mode": mode}
    for module, q in quantized.items():
        if (q.bits, q.group_size, q.mode) != (bits, group, mode):
            override = {"group_size": q.group_size, "bits": q.bits, "mode": q.mode}
            out[module] = override
            if module.startswith(VL_TEXT[0]):  # the same override under mlx-lm's module path
                out[VL_TEXT[1] + module.removeprefix(VL_TEXT[0])] = override
    return out


def _totals(records: list[dict]) -> dict:
    by_type: dict[str, dict] = defaultdict(lambda: {"tensors": 0, "parameters": 0, "bytes": 0})
    for r in records:
        entry = by_type[r["source_type"]]
        entry["tensors"] += 1
        entry["parameters"] += r["parameters"]
        entry["bytes"] += r["bytes"]
    params = sum(r["parameters"] for r in records)
    size = sum(r["bytes"] for r in records)
    return {"tensors": len(records), "parameters": params, "bytes": size,
            "bits_per_weight": round(8 * size / max(params, 1), 4),
            "by_source_type": dict(by_type)}


def write_mlx_package(model: CanonicalModel, out: Path, *, force: bool = False,
                      on_tensor: Callable[[TensorRecord], None] | None = None,
                      shard_bytes: int = SHARD_BYTES) -> Path:
    """Write `model` as an MLX package folder at `out` and return `out`.

    An existing `out` is refused (OutputExistsError) unless `force`. Tensors are pulled one at
    a time and written in shards of at most `shard_bytes` (one shard -> model.safetensors).
    `on_tensor` is called after each tensor (progress)."""
    out = Path(out)
    if out.exists() and not force:
        raise OutputExistsError(f"{out} already exists (use --force to replace it)")
    _check_config(model.config)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        sweep_partials(out.parent)  # what writers killed earlier left behind
        tmp = temp_sibling(out)
    except OSError as e:
        raise EdgertError(f"{out.parent}: cannot write there ({e.strerror or e})") from None
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private
        _write(model, tmp, on_tensor, shard_bytes)
        raise_pending()  # a signal swallowed on the way still stops the commit
        _move_into_place(tmp, out, force)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise EdgertError(f"{out}: writing failed ({e.strerror or e}); nothing was "
                          "left behind") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


class _QuantLayout(NamedTuple):
    """What config.json needs of a quantized tensor (its arrays are on disk already)."""

    bits: int
    group_size: int
    mode: str
    shape: tuple[int, ...]  # (rows, cols), or (E, rows, cols) for stacked experts


def _write(model: CanonicalModel, folder: Path, on_tensor, shard_bytes: int) -> None:
    shards: list[dict[str, int]] = []  # per shard: tensor name -> bytes
    reserve = header_reserve(3 * model.tensor_count + 16)
    writer: ShardWriter | None = None
    quantized: dict[str, _QuantLayout] = {}
    reports: dict[str, dict] = {}
    totals: list[dict] = []

    own_files = _own_files(model.config)
    own_writers: dict[str, ShardWriter] = {}
    own_names: dict[str, str] = {}  # tensor -> its own file

    def flush():
        nonlocal writer
        if writer is not None:
            writer.close({"format": "mlx"})
            writer = None

    for record in package_tensors(model):
        arrays = _arrays(record)
        size = sum(a.nbytes for a in arrays.values())
        own = next((f for m, f in own_files.items() if record.name.startswith(m + ".")), None)
        if own is not None:  # the architecture keeps this module in a file of its own
            if own not in own_writers:
                own_writers[own] = ShardWriter(folder / f"{own}.tmp", header_reserve(8))
            for name, a in arrays.items():
                own_writers[own].add(name, a)
                own_names[name] = own
        else:
            if writer is not None and writer.nbytes and writer.nbytes + size > shard_bytes:
                flush()
            if writer is None:
                writer = ShardWriter(folder / f"shard-{len(shards):05d}.tmp", reserve)
                shards.append({})
            for name, a in arrays.items():
                writer.add(name, a)
                shards[-1][name] = a.nbytes
        if isinstance(v := record.value, QuantTensor):
            quantized[record.name.removesuffix(".weight")] = _QuantLayout(
                v.bits, v.group_size, v.mode, v.shape)
        reports[record.name] = record.report()
        totals.append({"source_type": record.source_type, "bytes": size,
                       "parameters": int(np.prod(record.shape))})
        if on_tensor is not None:
            on_tensor(record)
        del record, arrays, v  # the next tensor may be as big: hold one at a time
    flush()
    if not shards:
        raise EdgertError("the model has no tensors")

    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    for i, name in enumerate(names):
        os.replace(folder / f"shard-{i:05d}.tmp", folder / name)
    for name, w in own_writers.items():
        w.close({"format": "mlx"})
        os.replace(folder / f"{name}.tmp", folder / name)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(sum(s.values()) for s in shards)},
                 "weight_map": {k: name for name, s in zip(names, shards) for k in sorted(s)}
                 | own_names}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    config = dict(model.config)
    if (quant := quantization_config(quantized)) is not None:
        config["quantization"] = quant
        config["quantization_config"] = dict(quant)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for name, data in model.tokenizer_files.items():
        (folder / name).write_bytes(data)
    meta = {"format_version": FORMAT_VERSION, "source": model.source, "totals": _totals(totals),
            "tensors": reports}
    (folder / "edgert.json").write_text(json.dumps(meta, indent=2))


def _check_config(config: dict) -> None:
    """Refuse, before anything is written, a config the runtime could not build a model from
    (the architecture's ModelArgs raise a one-line EdgertError, e.g. Gemma 4's KV sharing)."""
    from edgert.models import get_classes

    try:
        _, args_cls = get_classes(config.get("model_type", ""))
    except EdgertError:
        return  # an architecture only other engines run: nothing to check here
    try:
        args_cls.from_dict(config)
    except TypeError as e:
        raise EdgertError(f"config: {e}") from None


def package_tensors(model: CanonicalModel) -> Iterator[TensorRecord]:
    """The model's tensors in the package's layout: its architecture's
    `package_tensors(records, config)` where it has one (the layout mlx-lm's model of that
    type loads as it is, e.g. norms stored as 1 + w, projections fused), else as read."""
    from edgert.models import architecture

    try:
        hook = getattr(architecture(model.config.get("model_type")), "package_tensors", None)
    except EdgertError:
        hook = None  # an architecture only other engines run
    return model.tensors() if hook is None else hook(model.tensors(), model.config)


def _own_files(config: dict) -> dict[str, str]:
    """Module path -> file name for modules the architecture stores in a file of their own
    (its Model.package_files, e.g. Gemma 4's memory-mapped per-layer embeddings)."""
    from edgert.models import get_classes

    try:
        model_cls, _ = get_classes(config.get("model_type", ""))
    except EdgertError:
        return {}
    return dict(getattr(model_cls, "package_files", {}))


def _move_into_place(tmp: Path, out: Path, force: bool) -> None:
    old = None
    if force and out.exists():
        old = temp_sibling(out, ".old")
        os.replace(out, old / out.name)
    try:
        os.replace(tmp, out)
    except OSError:
        if old is not None and not out.exists():
            os.replace(old / out.name, out)  # put the previous package back
        elif out.exists():  # another writer finished first
            raise OutputExistsError(f"{out} already exists (use --force to replace it)") from None
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
