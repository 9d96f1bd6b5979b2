"""Embedding tables kept in a safetensors file of their own and memory-mapped (Gemma 4's
per-layer embeddings): a lookup copies only the rows of the ids asked for. Used by the MLX
model (edgert.models.gemma4) and by the Core ML engine, which feeds the rows to the program."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlx.core as mx
import numpy as np

from .errors import EdgertError, UnsupportedError

_ST_NUMPY = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "U32": np.uint32}


class MappedRows:
    """A (rows, cols) embedding table (float, or MLX affine: weight/scales/biases) in a
    safetensors file, memory-mapped: a lookup copies only the rows of the ids asked for."""

    def __init__(self, arrays: dict[str, np.ndarray], dtypes: dict[str, str],
                 quant: dict | None):
        self.arrays, self.dtypes, self.quant = arrays, dtypes, quant

    @classmethod
    def open(cls, file: Path, module: str, shape: tuple[int, int],
             quantization: dict | None) -> "MappedRows":
        """Map `module`'s tensors in `file`; a missing file, a missing tensor, a shape other
        than `shape` or a file shorter than its header says raises EdgertError."""
        if not file.is_file():
            raise EdgertError(f"{file.parent}: the per-layer embedding file {file.name} is missing")
        size = file.stat().st_size
        try:
            with open(file, "rb") as f:
                n = int.from_bytes(f.read(8), "little")
                header = json.loads(f.read(n))
        except (ValueError, OSError) as e:
            raise EdgertError(f"{file}: not a safetensors file ({e})") from None
        quant = _module_quant(quantization, module) if f"{module}.scales" in header else None
        rows, cols = shape
        want = {"weight": (rows, cols * quant["bits"] // 32 if quant else cols)}
        if quant:
            want |= {k: (rows, cols // quant["group_size"]) for k in ("scales", "biases")}
        arrays, dtypes = {}, {}
        for leaf, wshape in want.items():
            e = header.get(f"{module}.{leaf}")
            if e is None or e["dtype"] not in _ST_NUMPY:
                raise EdgertError(f"{file}: no usable {module}.{leaf}")
            if tuple(e["shape"]) != wshape:
                raise EdgertError(f"{file}: {module}.{leaf} has shape {tuple(e['shape'])}, "
                                  f"the config needs {wshape}")
            start, end = (8 + n + o for o in e["data_offsets"])
            dt = np.dtype(_ST_NUMPY[e["dtype"]])
            if end > size or end - start != math.prod(wshape) * dt.itemsize:
                raise EdgertError(f"{file}: shorter than the {module}.{leaf} table it should "
                                  f"hold ({size} bytes, needs {end})")
            arrays[leaf] = np.memmap(file, dtype=dt, mode="r", offset=start, shape=wshape)
            dtypes[leaf] = e["dtype"]
        return cls(arrays, dtypes, quant)

    def resident(self) -> "MappedRows":
        """The same table read into memory with plain reads (what a runtime without the map
        holds; no page of the map is touched)."""
        arrays = {}
        for k, v in self.arrays.items():
            with open(v.filename, "rb") as f:
                f.seek(v.offset)
                arrays[k] = np.fromfile(f, v.dtype, v.size).reshape(v.shape)
        return MappedRows(arrays, self.dtypes, self.quant)

    def _rows(self, leaf: str, idx: np.ndarray) -> mx.array:
        a = mx.array(self.arrays[leaf][idx])  # only these rows are read from the file
        return a.view(mx.bfloat16) if self.dtypes[leaf] == "BF16" else a

    def __call__(self, ids: mx.array, dtype: mx.Dtype) -> mx.array:
        """(B, L) ids -> (B, L, cols) rows in `dtype`."""
        idx = np.array(ids, dtype=np.int64)
        w = self._rows("weight", idx)
        if self.quant is None:
            return w.astype(dtype)
        q = self.quant
        return mx.dequantize(w, self._rows("scales", idx).astype(dtype),
                             self._rows("biases", idx).astype(dtype), q["group_size"], q["bits"])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    @property
    def row_bytes(self) -> int:
        """Bytes read per token looked up."""
        return sum(a.nbytes // a.shape[0] for a in self.arrays.values())


def _module_quant(quantization: dict | None, module: str) -> dict:
    if not quantization:
        raise EdgertError(f"{module} is quantized but config.json has no quantization")
    q = quantization.get(module, quantization)
    if q.get("mode", "affine") != "affine":
        raise UnsupportedError(f"{module}: quantization mode {q.get('mode')!r} (affine only)")
    return {"bits": q["bits"], "group_size": q["group_size"]}
