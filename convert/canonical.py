"""The canonical model between readers and writers.

Readers (GGUF, HF safetensors, ...) only produce a `CanonicalModel`; writers (MLX package,
Core ML package) only consume it. Tensor names are Hugging Face names
(`model.layers.0.self_attn.q_proj.weight`); float tensors keep their source dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np

from edgert.quant import QuantTensor, dequantize, widen, worse_error  # noqa: F401

# Mapping classes, reported per tensor.
EXACT = "exact"  # dequantizes to exactly the source's reference dequantization
WIDENED = "widened"  # lossless, but stored with more bits than the source
F32_SCALES_EXACT = "f32-scales exact"  # exact only with float32 scales (K-quants)
REQUANTIZED = "requantized"  # lossy; max_abs_error says how much
FLOAT = "float"  # a float tensor carried over (possibly cast)


@dataclass
class TensorRecord:
    """One output tensor with its provenance."""

    name: str  # HF name, e.g. "model.layers.0.mlp.down_proj.weight"
    value: np.ndarray | QuantTensor
    source_name: str  # name in the source, e.g. "blk.0.ffn_down.weight"
    source_type: str  # e.g. "Q4_1", "F32"
    mapping: str  # one of the classes above
    max_abs_error: float = 0.0
    note: str = ""
    # The source's own dequantization of this tensor as float32 (what `edgert verify` compares
    # against); None where the value is the source tensor itself.
    reference: Callable[[], np.ndarray] | None = field(default=None, repr=False, compare=False)
    experts: int = 0  # routed experts stacked on the first axis ((E, out, in) / (E, out))

    def reference_value(self) -> np.ndarray:
        """The source's float32 reference for this tensor."""
        if self.reference is not None:
            return self.reference()
        if isinstance(self.value, QuantTensor):
            raise ValueError(f"{self.name}: no reference dequantization recorded")
        return np.asarray(self.value, dtype=np.float32)

    @property
    def shape(self) -> tuple[int, ...]:
        v = self.value
        return v.shape if isinstance(v, QuantTensor) else tuple(v.shape)

    def report(self) -> dict:
        v = self.value
        n = int(np.prod(self.shape))
        entry = {
            "source_name": self.source_name,
            "source_type": self.source_type,
            "class": self.mapping,
            "shape": list(self.shape),
            "max_abs_error": float(self.max_abs_error),
            "bits_per_weight": round(8.0 * v.nbytes / max(n, 1), 4),
        }
        if self.experts:  # routed experts, reported stacked
            entry["experts"] = self.experts
            entry["layout"] = ("stacked experts (E, out, in)" if len(self.shape) == 3
                               else "stacked experts (E, out)")
        if isinstance(v, QuantTensor):
            entry.update(bits=v.bits, group_size=v.group_size, mode=v.mode,
                         scale_dtype=str(v.scales.dtype))
        else:
            entry.update(dtype=str(v.dtype))
        if self.note:
            entry["note"] = self.note
        return entry


@dataclass
class CanonicalModel:
    """An architecture config plus a stream of tensors, tokenizer files and provenance."""

    config: dict  # HF config.json fields (model_type, hidden_size, ...)
    tensors: Callable[[], Iterator[TensorRecord]]  # a fresh iterator per call; streams lazily
    tensor_count: int
    tokenizer_files: dict[str, bytes] = field(default_factory=dict)  # file name -> contents
    source: dict = field(default_factory=dict)  # {"path", "sha256", "format", ...}


_CLASSES = (EXACT, WIDENED, F32_SCALES_EXACT, REQUANTIZED)  # better to worse


def join_rows(name: str, parts: list[TensorRecord], order: np.ndarray) -> TensorRecord:
    """One 2-D tensor from `parts`' rows, concatenated and then taken in `order` (a fused
    projection): floats in the widest dtype; quantized (affine) parts in one layout that holds
    each exactly (the most bits, the smallest group, float32 scales if any has them), class
    "widened" for a part that changed; a float part among quantized ones makes all float32
    (dequantized, exact). The class is the worst part's; the reference is joined the same way."""
    values = [p.value for p in parts]
    quant = [v for v in values if isinstance(v, QuantTensor)]
    classes = [p.mapping for p in parts]
    note = ""
    if quant and (len(quant) < len(values) or any(q.mode != "affine" for q in quant)):
        values = [dequantize(v) if isinstance(v, QuantTensor) else np.float32(v) for v in values]
        note = "dequantized to float32 (parts of mixed layouts)"
        quant = []
    if quant:
        bits, group = max(q.bits for q in quant), min(q.group_size for q in quant)
        dt = np.float32 if any(q.scales.dtype == np.float32 for q in quant) else np.float16
        wide = [widen(q, bits, group, dt) for q in quant]
        classes = [WIDENED if c == EXACT and (q.bits, q.group_size, q.scales.dtype) !=
                   (bits, group, dt) else c for c, q in zip(classes, quant)]
        value = QuantTensor(*(np.concatenate([getattr(w, k) for w in wide])[order]
                              for k in ("w_q", "scales", "biases")), bits, group)
        if len({(q.bits, q.group_size) for q in quant}) > 1:
            note = f"parts widened to {bits}-bit g{group} (exact)"
    else:
        value = np.concatenate([np.asarray(v) for v in values])[order]
    ranked = [c for c in classes if c in _CLASSES]
    mapping = max(ranked, key=_CLASSES.index) if ranked else classes[0]
    error = 0.0
    for p in parts:
        error = worse_error(error, p.max_abs_error)
    types = list(dict.fromkeys(p.source_type for p in parts))
    return TensorRecord(
        name, value, " + ".join(p.source_name for p in parts), " + ".join(types), mapping,
        error, note="; ".join(x for x in ("rows of " + " and ".join(p.name for p in parts),
                                          note) if x),
        reference=lambda: np.concatenate([p.reference_value() for p in parts])[order])
