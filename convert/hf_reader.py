"""Hugging Face model folders (config.json + *.safetensors) -> CanonicalModel.

The source kind comes from config.json (`quantization_config.quant_method`, or MLX's
`quantization`) and the tensor names of each Linear:

| source                  | tensors per Linear    | onto MLX affine                  | class       |
|-------------------------|-----------------------|----------------------------------|-------------|
| fp32 / fp16 / bf16      | weight                | mx.quantize (4-bit g64, f16)     | requantized |
| GPTQ v1/v2, 2/3/4/8-bit | qweight qzeros scales | w_q = qweight.T, b = -z*s;       | exact or    |
|                         | g_idx                 | act-order: + input_perm          | f32-scales  |
| AWQ GEMM, 4-bit         | qweight qzeros scales | de-interleave, transpose, -z*s   | the same    |
| BitNet b1.58 BitLinear  | weight weight_scale   | 2-bit, s=1, b=-1, scale kept     | exact       |
| MLX (incl. 1/2-bit)     | weight scales biases  | copied                           | exact       |

Norms, biases, embeddings and heads of quantized sources stay float unless the caller asks
for bits. Tensors stream one at a time from memory-mapped files.
"""

from __future__ import annotations

import fnmatch
import importlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import mlx.core as mx
import numpy as np

from edgert.errors import EdgertError, UnsupportedError
from edgert.validate import check_config

from edgert.bitpack import pack_rows, unpack_rows  # noqa: F401 (tests import them from here)
from edgert.quant import (DEFAULT_BITS, DEFAULT_GROUP, MLX_BITS, MLX_GROUPS,  # noqa: F401
                          SCALE_DTYPES, QuantTensor, dequantize, mx_dequantize, quantize_float)

from .canonical import (EXACT, F32_SCALES_EXACT, FLOAT, REQUANTIZED, WIDENED, CanonicalModel,
                        TensorRecord, worse_error)

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "chat_template.jinja", "generation_config.json")

# ------------------------------------------------------------------ safetensors, memory-mapped

_NP_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8,
              "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_}


@dataclass(frozen=True)
class TensorRef:
    """One tensor of a safetensors file, read on demand through a memory map."""

    file: Path
    dtype: str  # safetensors name: "F16", "BF16", "I32", ...
    shape: tuple[int, ...]
    offset: int  # byte offset of the data in the file

    def load(self, index: int | None = None) -> np.ndarray:
        """The tensor in memory (only `[index]` along the first axis, if given: one expert of
        a stacked tensor); BF16 is widened (exactly) to float32, which numpy can hold."""
        if self.dtype not in _NP_DTYPES:
            raise UnsupportedError(f"safetensors dtype {self.dtype} in {self.file.name}")
        n = int(np.prod(self.shape))
        a = np.memmap(self.file, dtype=_NP_DTYPES[self.dtype], mode="r", offset=self.offset,
                      shape=(n,)).reshape(self.shape)
        if index is not None:
            a = a[index]
        if self.dtype == "BF16":
            return (a.astype(np.uint32) << 16).view(np.float32)
        return np.array(a)


_ST_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
             "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def read_json(path: Path, what: str = "JSON"):
    """The parsed JSON file at `path`; EdgertError naming the file when it is not JSON."""
    try:
        return json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise EdgertError(f"{path}: not valid {what} ({e})") from None
    except OSError as e:
        raise EdgertError(f"{path}: cannot read ({e.strerror or e})") from None


def _shard_files(folder: Path) -> list[Path]:
    """The checkpoint's safetensors files: those the index names (each inside `folder`), or
    model*.safetensors."""
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return sorted(folder.glob("model*.safetensors")) or sorted(folder.glob("*.safetensors"))
    data = read_json(index)
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise EdgertError(f"{index}: no weight_map of tensor name -> file name")
    root = folder.resolve()
    files = set()
    for name in set(weight_map.values()):
        f = (folder / name).resolve()
        if Path(name).is_absolute() or f.parent != root:
            raise EdgertError(f"{index}: file {name!r} lies outside the model folder")
        if not f.is_file():
            raise EdgertError(f"{index}: names {name!r}, which does not exist")
        files.add(folder / name)
    return sorted(files)


def _header_refs(f: Path) -> dict[str, TensorRef]:
    """The tensors of one safetensors file, from its header, each checked to lie inside the
    file with exactly the bytes its dtype and shape need, and not overlapping another."""
    size = f.stat().st_size
    with open(f, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if size < 8 or n > size - 8:
            raise EdgertError(f"{f}: truncated or corrupt safetensors file (a header of {n} "
                              f"bytes in a file of {size})")
        try:
            header = json.loads(fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise EdgertError(f"{f}: corrupt safetensors header ({e})") from None
    if not isinstance(header, dict):
        raise EdgertError(f"{f}: corrupt safetensors header (not an object)")
    refs, spans, data = {}, [], size - 8 - n
    for name, e in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (lo, hi) = e["dtype"], tuple(e["shape"]), e["data_offsets"]
            ok = (all(isinstance(d, int) and d >= 0 for d in shape) and isinstance(lo, int)
                  and isinstance(hi, int) and 0 <= lo <= hi <= data and dtype in _ST_BYTES)
        except (TypeError, KeyError, ValueError):
            ok = False
        if not ok:
            raise EdgertError(f"{f}: corrupt safetensors entry for {name!r} ({e!r:.120})")
        if hi - lo != math.prod(shape) * _ST_BYTES[dtype]:
            raise EdgertError(f"{f}: tensor {name} holds {hi - lo} bytes, but {dtype} "
                              f"{list(shape)} needs {math.prod(shape) * _ST_BYTES[dtype]}")
        refs[name] = TensorRef(f, dtype, shape, 8 + n + lo)
        spans.append((lo, hi, name))
    spans.sort()
    for (_, end, a), (start, _, b) in zip(spans, spans[1:]):
        if start < end:
            raise EdgertError(f"{f}: the data of tensors {a} and {b} overlap")
    return refs


def safetensors_index(folder: Path) -> dict[str, TensorRef]:
    """Every tensor of the folder's checkpoint (sharded through model.safetensors.index.json,
    or model*.safetensors), from the files' headers only."""
    files = _shard_files(folder)
    if not files:
        raise EdgertError(f"{folder} has no *.safetensors")
    refs = {}
    for f in files:
        refs.update(_header_refs(f))
    return dict(sorted(refs.items()))


@dataclass
class ZeroPointWeight:
    """The GPTQ / AWQ reference: w[r, j] = scales[r, g_idx[j]] * (q[r, j] - zeros[r, g_idx[j]])."""

    q: np.ndarray  # (out, in) uint8 codes
    scales: np.ndarray  # (out, n_groups) float16 (float32 when widened from bf16)
    zeros: np.ndarray  # (out, n_groups) int32 zero points
    g_idx: np.ndarray  # (in,) group of each input column
    bits: int

    def dequantize(self) -> np.ndarray:
        """(out, in) float32, the reference dequantization."""
        qz = (self.q.astype(np.int32) - self.zeros[:, self.g_idx]).astype(np.float32)
        return self.scales.astype(np.float32)[:, self.g_idx] * qz

    def to_mlx(self, group_size: int, perm: np.ndarray | None) -> tuple[QuantTensor, str, float]:
        """MLX affine with scales s and biases -z*s, columns in `perm` order.

        s (float16) times an integer of at most 9 bits is exact in float32, so s*q + (-z*s)
        equals s*(q - z) in float32. Biases stay float16 where that is exact too (e.g. the
        symmetric -2**(bits-1) * s), else scales and biases are stored as float32. The
        dequantization is checked against the reference; the error is 0 unless the source's
        scales carry more than 11 significant bits."""
        g = next(g for g in MLX_GROUPS if group_size % g == 0)
        s = self.scales.astype(np.float32)  # (out, n_groups)
        b = -self.zeros.astype(np.float32) * s
        mapping = F32_SCALES_EXACT
        if self.scales.dtype == np.float16 and np.array_equal(b.astype(np.float16), b):
            s, b, mapping = self.scales, b.astype(np.float16), EXACT
        q = self.q if perm is None else self.q[:, perm]  # (out, in), group k in columns kG..kG+G-1
        t = QuantTensor(pack_rows(q, self.bits), np.repeat(s, group_size // g, axis=1),
                        np.repeat(b, group_size // g, axis=1), self.bits, g)
        rows, n_groups = self.scales.shape  # the reference s * (q - z), in float32
        qz = mx.array(q).reshape(rows, n_groups, group_size).astype(mx.int32)
        qz = (qz - mx.array(self.zeros)[..., None]).astype(mx.float32)
        ref = mx.array(self.scales).astype(mx.float32)[..., None] * qz
        err = mx.abs(mx_dequantize(t) - ref.reshape(q.shape)).max().item()
        return t, (mapping if err == 0 else REQUANTIZED), err


def group_order(g_idx: np.ndarray, group_size: int) -> tuple[np.ndarray | None, bool]:
    """(perm, even): input columns perm[k*G:(k+1)*G] are exactly group k of `g_idx` (perm None
    when already in order); even False when the groups are not G columns each."""
    blocks = np.arange(len(g_idx)) // group_size
    if len(g_idx) % group_size:
        return None, False
    if np.array_equal(g_idx, blocks):
        return None, True
    perm = np.argsort(g_idx, kind="stable")
    return perm, bool(np.array_equal(g_idx[perm], blocks))


def gptq_weight(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray,
                g_idx: np.ndarray | None, bits: int, group_size: int,
                zero_offset: int) -> ZeroPointWeight:
    """Decode GPTQ tensors (AutoGPTQ `QuantLinear.pack`): qweight (in*bits/32, out) and qzeros
    (n_groups, out*bits/32) pack little-endian bitstreams along in / out (3-bit straddles words,
    as MLX does); v1 checkpoints store z - 1 (zero_offset 1), gptq_v2 stores z."""
    q = unpack_rows(qweight.T, bits)  # (in*bits/32, out) int32 -> (out, in) codes
    zeros = unpack_rows(qzeros, bits).astype(np.int32) + zero_offset  # (n_groups, out)
    if g_idx is None:
        g_idx = np.arange(q.shape[1]) // group_size
    return ZeroPointWeight(q, np.ascontiguousarray(scales.T), np.ascontiguousarray(zeros.T),
                           g_idx.astype(np.int64), bits)


AWQ_ORDER = np.array([0, 4, 1, 5, 2, 6, 3, 7])  # column 8k+j sits in nibble AWQ_ORDER[j]


def awq_unpack(w: np.ndarray) -> np.ndarray:
    """AutoAWQ GEMM packing, 8 columns per int32 interleaved [0,2,4,6,1,3,5,7]:
    (rows, cols/8) int32 -> (rows, cols) uint8."""
    nibbles = unpack_rows(w, 4).reshape(w.shape[0], -1, 8)  # nibble i of word k
    return nibbles[..., AWQ_ORDER].reshape(w.shape[0], -1)


def awq_weight(qweight: np.ndarray, qzeros: np.ndarray, scales: np.ndarray,
               group_size: int) -> ZeroPointWeight:
    """Decode AWQ GEMM tensors: qweight (in, out/8), qzeros (n_groups, out/8) and scales
    (n_groups, out)."""
    q = awq_unpack(qweight).T  # (in, out) -> (out, in)
    zeros = awq_unpack(qzeros).astype(np.int32).T  # (n_groups, out) -> (out, n_groups)
    g_idx = np.arange(q.shape[1]) // group_size
    return ZeroPointWeight(np.ascontiguousarray(q), np.ascontiguousarray(scales.T),
                           np.ascontiguousarray(zeros), g_idx, 4)


def bitnet_codes(weight: np.ndarray) -> np.ndarray:
    """transformers' BitNet packing: (out/4, in) uint8, row block i of the output in bits 2i..2i+1,
    value = code - 1 -> (out, in) codes 0..2. An unpacked float ternary weight is accepted too."""
    if weight.dtype == np.uint8:
        codes = (weight[None] >> (2 * np.arange(4, dtype=np.uint8))[:, None, None]) & 3
        codes = codes.reshape(-1, weight.shape[1])  # (4, out/4, in) -> (out, in)
    else:
        codes = np.asarray(weight, dtype=np.float32) + 1
        if not np.isin(codes, (0, 1, 2)).all():
            raise UnsupportedError("BitNet weight is not ternary")
        codes = codes.astype(np.uint8)
    if (codes == 3).any():
        raise UnsupportedError("BitNet weight holds code 3 (not ternary)")
    return codes


def ternary_to_mlx(codes: np.ndarray) -> QuantTensor:
    """(out, in) codes 0..2 -> MLX 2-bit with scale 1 and bias -1: w = q - 1 exactly."""
    rows, cols = codes.shape
    g = next((g for g in MLX_GROUPS if cols % g == 0), None)
    if g is None:
        raise UnsupportedError(f"BitNet input size {cols} is not a multiple of 32")
    ones = np.ones((rows, cols // g), np.float16)
    return QuantTensor(pack_rows(codes, 2), ones, -ones, 2, g)


# ------------------------------------------------------------------ what the caller asked for


@dataclass
class Request:
    """Bits and group size asked for, with per-module overrides by module path or fnmatch
    pattern (`{"model.embed_tokens": {"bits": 8}, "*.down_proj": {"bits": 6}}`); bits 0 = float."""

    bits: int | None = None
    group_size: int | None = None
    overrides: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self):
        for where, o in [("", {"bits": self.bits, "group_size": self.group_size}),
                         *((f" for {k!r}", v) for k, v in self.overrides.items())]:
            if o.get("bits") not in (None, 0, *MLX_BITS):
                raise EdgertError(f"bits{where} must be 0 (float) or one of {MLX_BITS}")
            if o.get("group_size") not in (None, *MLX_GROUPS):
                raise EdgertError(f"group_size{where} must be one of {MLX_GROUPS}")

    def override(self, module: str) -> dict | None:
        """The per-module override matching `module` (path or pattern), or None."""
        o = self.overrides.get(module)
        if o is None:
            o = next((v for k, v in self.overrides.items() if fnmatch.fnmatchcase(module, k)), None)
        return o

    def get(self, module: str) -> dict | None:
        """{"bits", "group_size"} asked for `module` (values may be None); None if nothing was."""
        o = self.overrides.get(module)
        if o is None:
            o = next((v for k, v in self.overrides.items() if fnmatch.fnmatchcase(module, k)), None)
        if o is None and self.bits is None and self.group_size is None:
            return None
        o = o or {}
        return {"bits": o.get("bits", self.bits),
                "group_size": o.get("group_size", self.group_size)}


# ------------------------------------------------------------------ records

Step = tuple[list[str], Callable[[], list[TensorRecord]]]  # output names, producer


def _float_record(name: str, ref: TensorRef) -> TensorRecord:
    return TensorRecord(name, ref.load(), name, ref.dtype, FLOAT,
                        note="bf16 widened to float32" if ref.dtype == "BF16" else "")


def _matrix_records(name: str, w: np.ndarray, source: str, source_type: str, want: dict | None,
                    scale_dtype: str, exact_float: bool = False) -> list[TensorRecord]:
    """A float (rows, cols) weight: quantized as asked (default 4-bit g64), or kept float."""
    bits = DEFAULT_BITS if want is None or want["bits"] is None else want["bits"]
    group = DEFAULT_GROUP if want is None or want["group_size"] is None else want["group_size"]
    if bits == 0 or w.shape[1] % group:
        note = "" if bits == 0 else f"kept float: {w.shape[1]} columns, group {group}"
        return [TensorRecord(name, w, source, source_type, EXACT if exact_float else FLOAT,
                             note=note)]
    t, err = quantize_float(w, bits, group, scale_dtype)
    return [TensorRecord(name, t, source, source_type, REQUANTIZED, err,
                         reference=lambda: np.asarray(w, dtype=np.float32))]


def _differs(want: dict | None, bits: int, group: int) -> bool:
    """Whether the caller asked for other bits or another group than the source's."""
    return want is not None and any(want[k] is not None and want[k] != v
                                    for k, v in (("bits", bits), ("group_size", group)))


def _requantized(name: str, ref: np.ndarray, source: str, source_type: str, want: dict,
                 scale_dtype: str, bits: int, group: int) -> list[TensorRecord]:
    """Re-quantize a source's float32 reference dequantization to the bits/group asked for."""
    want = {"bits": want["bits"] if want["bits"] is not None else bits,
            "group_size": want["group_size"] or group}
    recs = _matrix_records(name, ref, source, source_type, want, scale_dtype, exact_float=True)
    if want["bits"] == 0:
        recs[0].note = "dequantized to float32"
    return recs


def _zero_point_step(module: str, refs: dict[str, TensorRef], kind: str, qcfg: dict,
                     want: dict | None, scale_dtype: str) -> Step:
    """GPTQ / AWQ: exact onto MLX (with an input permutation for act-order), or re-quantized
    from the reference when asked for other bits / group, or when groups are uneven."""
    bits = int(qcfg.get("bits", qcfg.get("w_bit", 4)))
    qweight = refs[f"{module}.qweight"]
    in_features = qweight.shape[0] if kind == "awq" else qweight.shape[0] * 32 // bits
    group = int(qcfg.get("group_size", qcfg.get("q_group_size", 128)))
    group = in_features if group == -1 else group
    missing = [x for x in ("qzeros", "scales") if f"{module}.{x}" not in refs]
    if missing:
        raise UnsupportedError(f"{module}: {kind.upper()} without {', '.join(missing)}")
    g_ref = refs.get(f"{module}.g_idx")
    g_idx = g_ref.load() if g_ref is not None else None
    source_type = f"{kind.upper()} {bits}-bit g{group}"

    def decode() -> ZeroPointWeight:
        qz, s = refs[f"{module}.qzeros"].load(), refs[f"{module}.scales"].load()
        if kind == "awq":
            return awq_weight(qweight.load(), qz, s, group)
        fmt = qcfg.get("checkpoint_format") or qcfg.get("format") or "gptq"
        return gptq_weight(qweight.load(), qz, s, g_idx, bits, group, 0 if fmt == "gptq_v2" else 1)

    mapped_group = next((g for g in MLX_GROUPS if group % g == 0), None)
    perm, even = group_order(g_idx if g_idx is not None else np.arange(in_features) // group, group)
    source = f"{module}.qweight"
    if mapped_group is None or not even or _differs(want, bits, mapped_group):
        note = "" if even and mapped_group else "groups do not map onto MLX groups"

        def requantize() -> list[TensorRecord]:
            recs = _requantized(f"{module}.weight", decode().dequantize(), source, source_type,
                                want or {"bits": None, "group_size": None}, scale_dtype, bits,
                                mapped_group or DEFAULT_GROUP)
            recs[0].note = recs[0].note or note
            return recs

        return [f"{module}.weight"], requantize

    def exact() -> list[TensorRecord]:
        t, mapping, err = decode().to_mlx(group, perm)
        recs = [TensorRecord(f"{module}.weight", t, source, source_type, mapping, err,
                             note="" if perm is None else "input columns permuted (act-order)",
                             reference=lambda: decode().dequantize())]
        if perm is not None:
            recs.append(TensorRecord(f"{module}.input_perm", perm.astype(np.uint32),
                                     f"{module}.g_idx", "I32", EXACT,
                                     note="the runtime takes x[..., input_perm] first"))
        return recs

    return [f"{module}.weight"] + ([] if perm is None else [f"{module}.input_perm"]), exact


def _stacked_zero_point_step(target: str, members: list[tuple[int, str]],
                             refs: dict[str, TensorRef], kind: str, qcfg: dict,
                             want: dict | None, scale_dtype: str) -> Step:
    """GPTQ / AWQ experts ((expert, module) each) as one (E, out, in) tensor: stacked exactly
    where every expert maps exactly with the same layout and no input permutation (act-order
    orders differ per expert, and a stacked layer takes one); otherwise re-quantized from the
    experts' reference dequantizations."""
    check_numbering(target, [e for e, _ in members])
    modules = [m for _, m in sorted(members)]
    experts = [_zero_point_step(m, refs, kind, qcfg, want, scale_dtype)[1] for m in modules]
    E = len(modules)
    source = _expert_pattern([f"{m}.qweight" for m in modules])
    note = f"{E} experts stacked (E, out, in)"

    def produce() -> list[TensorRecord]:
        recs = [produce_one() for produce_one in experts]
        first = [r[0] for r in recs]
        reference = lambda: np.stack([r.reference_value() for r in first])
        same = len({(r.value.bits, r.value.group_size) for r in first
                    if isinstance(r.value, QuantTensor)}) == 1
        if all(len(r) == 1 and isinstance(r[0].value, QuantTensor) and r[0].mapping in (
                EXACT, F32_SCALES_EXACT) for r in recs) and same:
            stacked = stack_quantized([r.value for r in first])
            mapping = F32_SCALES_EXACT if stacked.scales.dtype == np.float32 else EXACT
            return [TensorRecord(target, stacked, source, first[0].source_type, mapping,
                                 note=note, reference=reference, experts=E)]
        ref = reference()
        v = first[0].value  # the source's bits and group, unless the caller asked otherwise
        layout = ({"bits": v.bits, "group_size": v.group_size} if isinstance(v, QuantTensor)
                  else {"bits": None, "group_size": None})
        stack = ExpertStack(target, source, first[0].source_type, ref.shape, lambda e: ref[e])
        out = _stack_records(stack, want or layout, scale_dtype, True)
        out[0].note += "; re-quantized from the experts' dequantization (act-order or mixed layouts)"
        return out

    return [target], produce


def _bitnet_step(module: str, refs: dict[str, TensorRef]) -> Step:
    def produce() -> list[TensorRecord]:
        ref = refs[f"{module}.weight"]
        t = ternary_to_mlx(bitnet_codes(ref.load()))
        return [TensorRecord(f"{module}.weight", t, f"{module}.weight", f"BitNet {ref.dtype}",
                             EXACT, note="w = q - 1; output scaled by weight_scale")]

    return [f"{module}.weight"], produce


def _mlx_step(module: str, refs: dict[str, TensorRef], quant: dict, want: dict | None,
              scale_dtype: str) -> Step:
    entry = quant.get(module)
    entry = entry if isinstance(entry, dict) else quant
    bits, group, mode = entry["bits"], entry["group_size"], entry.get("mode", "affine")
    if mode != "affine":
        raise UnsupportedError(f"{module}: MLX quantization mode {mode!r} (only affine)")
    name = f"{module}.weight"
    source_type = f"MLX {bits}-bit g{group}"

    def load() -> tuple[QuantTensor, str]:
        s, b = refs[f"{module}.scales"], refs[f"{module}.biases"]
        t = QuantTensor(refs[name].load(), s.load(), b.load(), bits, group)
        return t, (WIDENED if s.dtype == "BF16" else EXACT)

    if _differs(want, bits, group):
        return [name], lambda: _requantized(name, dequantize(load()[0]), name, source_type, want,
                                            scale_dtype, bits, group)

    def copy() -> list[TensorRecord]:
        t, mapping = load()
        note = "bf16 scales widened to float32" if mapping == WIDENED else ""
        return [TensorRecord(name, t, name, source_type, mapping, note=note,
                             reference=lambda: dequantize(load()[0]))]

    return [name], copy


# ------------------------------------------------------------------ stacked experts (MoE)


@dataclass
class ExpertStack:
    """One (E, out, in) package tensor gathered from E per-expert source tensors or cut from
    a fused one; read one expert at a time, so at most one tensor's experts are in memory."""

    name: str  # package name, e.g. model.layers.0.mlp.switch_mlp.up_proj.weight
    source_name: str  # e.g. model.layers.0.mlp.experts.{0..7}.up_proj.weight
    source_type: str  # the sources' safetensors dtype
    shape: tuple[int, ...]  # (E, out, in), or (E, out) for biases
    load: Callable[[int], np.ndarray]  # expert e -> (out, in) / (out,)


def expert_stacks(refs: dict[str, TensorRef], arch,
                  config: dict) -> tuple[dict[str, ExpertStack], set[str]]:
    """The stacked tensors an architecture module declares (`hf_stack(name, config)` ->
    (package name, expert) for per-expert tensors; `hf_fused(name, config)` -> (package
    names, split) for fused (E, a, b) ones), keyed by the first source name they consume,
    and the source names consumed. One-line errors for experts missing, numbered out of order or of different shapes."""
    stack, fused = getattr(arch, "hf_stack", None), getattr(arch, "hf_fused", None)
    groups: dict[str, dict[int, str]] = {}
    out: dict[str, ExpertStack] = {}
    consumed: set[str] = set()
    for name, ref in refs.items():
        if stack is not None and (hit := stack(name, config)) is not None:
            groups.setdefault(hit[0], {})[hit[1]] = name
        elif fused is not None and (hit := fused(name, config)) is not None:
            out.update(_fused_stacks(name, ref, *hit))
        else:
            continue
        consumed.add(name)
    for target, by_expert in groups.items():
        check_numbering(target, list(by_expert))
        names = [by_expert[e] for e in sorted(by_expert)]
        shapes = {refs[n].shape for n in names}
        if len(shapes) > 1 or len(next(iter(shapes))) != 2:
            odd = next(n for n in names if refs[n].shape != refs[names[0]].shape)
            raise EdgertError(f"{target}: expert tensors of mismatched shapes ({names[0]} "
                              f"{list(refs[names[0]].shape)}, {odd} {list(refs[odd].shape)})")
        out[names[0]] = ExpertStack(
            target, _expert_pattern(names), refs[names[0]].dtype,
            (len(names), *refs[names[0]].shape), lambda e, names=names: refs[names[e]].load())
    return out, consumed


def check_numbering(target: str, experts: list[int]) -> None:
    """One line where the experts a stacked tensor gathers are not numbered 0..E-1 (float
    per-expert tensors and GPTQ / AWQ expert modules alike)."""
    if sorted(experts) != list(range(len(experts))):
        raise EdgertError(f"{target}: the checkpoint's experts are {sorted(experts)}, "
                          f"not 0..{len(experts) - 1}")


def _fused_stacks(name: str, ref: TensorRef, targets: list[str], split) -> dict:
    """The parts of a fused (E, a, b) tensor, each (E, out, in), keyed name, name#1, ..."""
    if len(ref.shape) < 2:
        raise EdgertError(f"{name}: fused experts of shape {list(ref.shape)} (expected (E, ...))")
    dummy = np.broadcast_to(np.zeros((), np.float32), (1, *ref.shape[1:]))
    shapes = [p.shape[1:] for p in split(dummy)]
    return {name if j == 0 else f"{name}#{j}": ExpertStack(
        t, name, ref.dtype, (ref.shape[0], *shape),
        lambda e, j=j: np.ascontiguousarray(split(ref.load(e)[None])[j][0]))
        for j, (t, shape) in enumerate(zip(targets, shapes))}


def _expert_pattern(names: list[str]) -> str:
    """model.layers.0.mlp.experts.{0..7}.up_proj.weight for the report."""
    if len(names) == 1:
        return names[0]
    parts = names[0].split(".")
    i = next(i for i, (a, b) in enumerate(zip(parts, names[1].split("."))) if a != b)
    parts[i] = f"{{0..{len(names) - 1}}}"
    return ".".join(parts)


def stack_quantized(parts: list[QuantTensor]) -> QuantTensor:
    """Per-expert (out, in) quantized tensors -> one (E, out, in); float32 scales for all if
    any expert needed them (exact widening of the others); mode "mxfp4" (no biases) kept."""
    dt = np.float32 if any(p.scales.dtype == np.float32 for p in parts) else parts[0].scales.dtype
    biases = None if parts[0].biases is None else np.stack([p.biases.astype(dt) for p in parts])
    return QuantTensor(np.stack([p.w_q for p in parts]),
                       np.stack([p.scales.astype(dt) for p in parts]), biases,
                       parts[0].bits, parts[0].group_size, parts[0].mode)


def _stack_records(stack: ExpertStack, want: dict | None, scale_dtype: str,
                   quantize: bool) -> list[TensorRecord]:
    """Each expert quantized as asked (default 4-bit g64) with the same layout, then stacked;
    or the float experts stacked."""
    bits = DEFAULT_BITS if want is None or want["bits"] is None else want["bits"]
    group = DEFAULT_GROUP if want is None or want["group_size"] is None else want["group_size"]
    E, cols = stack.shape[0], stack.shape[-1]
    note = f"{E} experts stacked (E, out, in)" if len(stack.shape) == 3 else f"{E} experts stacked"
    reference = lambda: np.stack([np.asarray(stack.load(e), np.float32) for e in range(E)])
    quantize = quantize and len(stack.shape) == 3 and stack.name.endswith(".weight")
    if not quantize or bits == 0 or cols % group:
        if quantize and bits != 0:
            note += f"; kept float: {cols} columns, group {group}"
        return [TensorRecord(stack.name, np.stack([stack.load(e) for e in range(E)]),
                             stack.source_name, stack.source_type, FLOAT, note=note, experts=E)]
    parts, err = [], 0.0
    for e in range(E):
        t, e_err = quantize_float(stack.load(e), bits, group, scale_dtype)
        parts.append(t)
        err = worse_error(err, e_err)
    return [TensorRecord(stack.name, stack_quantized(parts), stack.source_name,
                         stack.source_type, REQUANTIZED, err, note=note, reference=reference,
                         experts=E)]


def check_against_model(arch, config: dict, planned: dict[str, tuple]) -> None:
    """Compare the tensors a conversion will write with the parameters of the architecture's
    model built from `config` (lazily: nothing is allocated), one line per problem kind:
    the expert count, a tensor missing (e.g. a router), an unexpected one, a shape."""
    from mlx.utils import tree_flatten

    try:
        args = arch.ModelArgs.from_dict(config)
    except TypeError as e:
        raise EdgertError(f"config.json: {e}") from None
    model = arch.Model(args)
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    # what the loader will see: the names and shapes after the model's own sanitize (lazy
    # zeros: nothing is allocated)
    seen = model.sanitize({k: mx.zeros(v, mx.float32) for k, v in planned.items()})
    planned = {k: tuple(v.shape) for k, v in seen.items()}
    for name, shape in planned.items():
        want = expected.get(name)
        if want is None:
            raise EdgertError(f"{name}: in the checkpoint, but not in a {config['model_type']} "
                              "model of this config.json")
        if len(want) == 3 and len(shape) == 3 and want[1:] == shape[1:] and want != shape:
            raise EdgertError(f"{name}: {shape[0]} experts in the checkpoint, config.json "
                              f"says {want[0]}")
        if want != tuple(shape):
            raise EdgertError(f"{name}: shape {list(shape)} in the checkpoint, {list(want)} "
                              "from config.json")
    missing = sorted(set(expected) - set(planned))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise EdgertError(f"the checkpoint has no {missing[0]}{more}")


FP4_E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                     -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)


def mxfp4_dequantize(w_q: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """MXFP4 by the OCP definition: (rows, cols/8) uint32 of 4-bit E2M1 codes, element 2i in
    the low nibble of byte i, and (rows, cols/32) uint8 E8M0 scales 2**(s - 127) ->
    (rows, cols) float32."""
    codes = w_q.view(np.uint8)
    nib = np.stack([codes & 0x0F, codes >> 4], axis=-1).reshape(*codes.shape[:-1], -1)
    vals = FP4_E2M1[nib].reshape(*scales.shape, 32)
    return np.ldexp(vals, scales.astype(np.int32)[..., None] - 127).reshape(*nib.shape)


def _mxfp4_steps(module: str, refs: dict[str, TensorRef], arch, config: dict) -> list[Step]:
    """HF MXFP4 (`X_blocks` (E, rows, cols/32, 16) uint8, `X_scales` (E, rows, cols/32) uint8)
    onto MLX's "mxfp4" mode bit for bit (the same nibble order and scales), one expert at a
    time; the architecture's `hf_packed(X, config)` names the parts and splits the rows."""
    packed = getattr(arch, "hf_packed", lambda n, c: None)(module, config)
    if packed is None:
        raise UnsupportedError(f"{module}: MXFP4 tensors this architecture does not place")
    targets, split = packed
    blocks, scales = refs[f"{module}_blocks"], refs[f"{module}_scales"]
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16 or len(scales.shape) != 3:
        raise EdgertError(f"{module}: MXFP4 blocks {list(blocks.shape)} and scales "
                          f"{list(scales.shape)} do not match")

    def expert(e: int) -> tuple[list, list]:
        b = np.ascontiguousarray(blocks.load(e)).reshape(scales.shape[1], -1)  # (rows, cols/2)
        return split(b.view(np.uint32)[None]), split(scales.load(e)[None])

    def produce(j: int) -> list[TensorRecord]:
        parts = [expert(e) for e in range(blocks.shape[0])]
        w_q = np.stack([np.ascontiguousarray(p[0][j][0]) for p in parts])
        s = np.stack([np.ascontiguousarray(p[1][j][0]) for p in parts])
        t = QuantTensor(w_q, s, None, 4, 32, "mxfp4")
        return [TensorRecord(f"{targets[j]}.weight", t, f"{module}_blocks", "MXFP4", EXACT,
                             note=f"{len(parts)} experts stacked (E, out, in)",
                             reference=lambda: mxfp4_dequantize(w_q, s), experts=len(parts))]

    return [([f"{t}.weight"], lambda j=j: produce(j)) for j, t in enumerate(targets)]


# ------------------------------------------------------------------ the folder


def source_kind(qcfg: dict, mlx_quant: dict | None) -> str:
    """"float", "gptq", "awq", "bitnet" or "mlx", from config.json."""
    method = (qcfg.get("quant_method") or "").lower()
    if mlx_quant is not None:
        return "mlx"
    if not method:
        return "float"
    if method == "gptq":
        fmt = qcfg.get("checkpoint_format") or qcfg.get("format") or "gptq"
        if fmt not in ("gptq", "gptq_v2"):
            raise UnsupportedError(f"GPTQ checkpoint_format {fmt!r} (supported: gptq, gptq_v2)")
        if int(qcfg.get("bits", 4)) not in (2, 3, 4, 8):
            raise UnsupportedError(f"GPTQ bits {qcfg.get('bits')}")
        return "gptq"
    if method == "awq":
        version = (qcfg.get("version") or "gemm").lower()
        if version != "gemm" or int(qcfg.get("bits", qcfg.get("w_bit", 4))) != 4:
            raise UnsupportedError(f"AWQ {version} {qcfg.get('bits')}-bit (supported: gemm 4-bit)")
        return "awq"
    if method == "mxfp4":
        return "mxfp4"
    if method == "bitnet":
        if qcfg.get("use_rms_norm") or qcfg.get("quantization_mode", "offline") != "offline":
            raise UnsupportedError("BitNet with use_rms_norm or online quantization")
        return "bitnet"
    raise UnsupportedError(f"quantization method {method!r} (supported: gptq, awq, bitnet, mxfp4, "
                           "MLX packages and float checkpoints)")


def read_hf_folder(path: Path, *, bits: int | None = None, group_size: int | None = None,
                   overrides: dict[str, dict] | None = None,
                   scale_dtype: str = "float16") -> CanonicalModel:
    """Read an HF model folder (config.json + *.safetensors, sharded or not) as a CanonicalModel.

    Float checkpoints are quantized with mx.quantize (default 4-bit, group 64; `bits=0` keeps
    float); GPTQ, AWQ, BitNet and MLX checkpoints map exactly onto MLX affine and are
    re-quantized only where `bits` / `group_size` / `overrides` ask for something else.
    `overrides` maps module paths or fnmatch patterns to {"bits", "group_size"}. Tensors are
    read lazily, one at a time, when `tensors()` is iterated.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise EdgertError(f"{path} is not a Hugging Face model folder (no config.json)")
    if scale_dtype not in SCALE_DTYPES:
        raise EdgertError(f"scale_dtype must be one of {list(SCALE_DTYPES)}")
    config = read_json(path / "config.json")
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise EdgertError(f"{path / 'config.json'}: not a JSON object with a model_type")
    from edgert.models import architecture

    arch = architecture(config.get("model_type"))  # what is specific to it lives there
    qcfg = config.pop("quantization_config", None) or {}
    mlx_quant = config.pop("quantization", None)
    kind = source_kind(qcfg, mlx_quant)
    request = Request(bits, group_size, dict(overrides or {}))
    refs, dropped = _renamed(safetensors_index(path), arch, config)
    if hasattr(arch, "hf_config"):
        config = arch.hf_config(config)
    # the config the package stores (a wrapper's text model), with its quantization block
    _check_config(path, arch, {**config, "quantization": mlx_quant} if mlx_quant else config)
    try:  # rows-first shapes only: packed GPTQ / AWQ / BitNet tensors are left out
        check_config(config, {n: r.shape for n, r in refs.items() if r.dtype != "U8"
                              and not n.endswith((".qweight", ".qzeros"))})
    except EdgertError as e:
        raise EdgertError(f"{path / 'config.json'}: {e}") from None
    if kind == "float" and any(n.endswith(".qweight") for n in refs):
        raise EdgertError(f"{path}: quantized tensors (qweight) but no quantization_config")
    if kind == "bitnet":
        config["bitnet"] = {"activation_bits": 8, "weight_scale": (
            "multiply" if qcfg.get("linear_class") == "autobitlinear" else "divide")}

    steps = _plan(refs, kind, qcfg if kind != "mlx" else mlx_quant, request, scale_dtype,
                  bool(config.get("tie_word_embeddings")), arch, config)
    tokenizer_files = {n: (path / n).read_bytes() for n in TOKENIZER_FILES if (path / n).is_file()}
    return CanonicalModel(
        config=config,
        tensors=lambda: (r for _, produce in steps for r in produce()),
        tensor_count=sum(len(names) for names, _ in steps),
        tokenizer_files=tokenizer_files,
        source={"path": str(path), "format": "hf-" + kind, "quantization_config": qcfg or mlx_quant,
                "files": sorted({r.file.name for r in refs.values()}),
                **({"dropped": dropped} if dropped else {})},
    )


def _check_config(path: Path, arch, config: dict) -> None:
    """Build the architecture's arguments once, so that a config it cannot run from fails
    here, before anything is written (one-line EdgertError)."""
    try:
        arch.ModelArgs.from_dict(config)
    except TypeError as e:
        raise EdgertError(f"{path}/config.json: {e}") from None


def _renamed(refs: dict[str, TensorRef], arch, config: dict) -> tuple[dict[str, TensorRef], str]:
    """The checkpoint's tensors under the names the architecture keeps (its `hf_name`; None
    drops a tensor, e.g. a vision tower), and a one-line account of what was dropped."""
    rename = getattr(arch, "hf_name", None)
    if rename is None:
        return refs, ""
    kept, dropped = {}, []
    for name, ref in refs.items():
        new = rename(name, config)
        if new is None:
            dropped.append(name)
        else:
            kept[new] = ref
    if not dropped:
        return dict(sorted(kept.items())), ""
    stems = sorted({n.split(".")[0] + "." + n.split(".")[1] if "." in n else n for n in dropped})
    return dict(sorted(kept.items())), f"{len(dropped)} tensors left out ({', '.join(stems[:3])})"


def _plan(refs: dict[str, TensorRef], kind: str, qcfg: dict, request: Request,
          scale_dtype: str, tied: bool, arch=None, config: dict | None = None) -> list[Step]:
    """One step per output tensor (or per quantized module), in the checkpoint's name order.
    Experts the architecture stacks (`expert_stacks`) make one step per stacked tensor; a
    float source planned with them is checked against the model first (check_against_model)."""
    config = config or {}
    stacks, consumed = expert_stacks(refs, arch, config) if arch is not None else ({}, set())
    policy = getattr(arch, "quant_policy", None) if kind == "float" else None

    def want_for(module: str, name: str, shape: tuple) -> dict | None:
        """The caller's override, else the architecture's policy (routers at 8 bits), else
        the caller's defaults."""
        p = None if request.override(module) is not None or request.bits == 0 else (
            policy(name, shape, config) if policy is not None else None)
        if p is False:
            return {"bits": 0, "group_size": None}
        if isinstance(p, dict):
            return {"bits": p.get("bits", request.bits),
                    "group_size": p.get("group_size", request.group_size)}
        return request.get(module)

    owned: dict[str, str] = {}  # source tensor name -> module that consumes it
    for name in refs:
        module, _, leaf = name.rpartition(".")
        if kind in ("gptq", "awq") and leaf == "qweight":
            owned |= {f"{module}.{x}": module for x in ("qweight", "qzeros", "scales", "g_idx")}
        elif kind == "bitnet" and leaf == "weight_scale":
            owned[f"{module}.weight"] = module
        elif kind == "mxfp4" and name.endswith("_blocks") and f"{name[:-7]}_scales" in refs:
            owned |= {name: name[:-7], f"{name[:-7]}_scales": name[:-7]}
        elif kind == "mlx" and leaf == "scales" and f"{module}.biases" in refs:
            owned |= {f"{module}.{x}": module for x in ("weight", "scales", "biases")}

    # GPTQ / AWQ experts: each expert's module decodes on its own; the stack is one step
    expert_of: dict[str, tuple[str, int]] = {}  # module -> (stacked package name, expert)
    stack = getattr(arch, "hf_stack", None)
    if kind in ("gptq", "awq") and stack is not None:
        for module in set(owned.values()):
            if (hit := stack(f"{module}.weight", config)) is not None:
                expert_of[module] = hit
    steps, done = [], set()
    planned: dict[str, tuple] = {}
    for name, ref in refs.items():
        module, _, leaf = name.rpartition(".")
        if name.endswith("rotary_emb.inv_freq") or (tied and name.startswith("lm_head.")):
            continue
        if name in consumed:
            for key in (k for k in (name, *(f"{name}#{j}" for j in range(1, 8))) if k in stacks):
                st = stacks[key]
                want = want_for(st.name.removesuffix(".weight"), st.name, st.shape)
                steps.append(([st.name], lambda st=st, want=want: _stack_records(
                    st, want, scale_dtype, kind == "float" or want is not None)))
                planned[st.name] = st.shape
            continue
        planned[name] = ref.shape
        if name in owned:
            module = owned[name]
            if module in done:
                continue
            done.add(module)
            want = request.get(module)
            if module in expert_of:
                target = expert_of[module][0]
                members = sorted((e, m) for m, (t, e) in expert_of.items() if t == target)
                if members[0][1] == module:  # the stack's step, planned at its first expert
                    steps.append(_stacked_zero_point_step(target, members, refs, kind,
                                                          qcfg, want, scale_dtype))
                continue
            if kind == "bitnet":
                steps.append(_bitnet_step(module, refs))
            elif kind == "mxfp4":
                steps.extend(_mxfp4_steps(module, refs, arch, config))
            elif kind == "mlx":
                steps.append(_mlx_step(module, refs, qcfg, want, scale_dtype))
            else:
                steps.append(_zero_point_step(module, refs, kind, qcfg, want, scale_dtype))
            continue
        want = want_for(module, name, ref.shape)
        quantizable = (leaf == "weight" and len(ref.shape) == 2
                       and ref.dtype in ("F32", "F16", "BF16"))
        if quantizable and (kind == "float" or want is not None):
            steps.append(([name], lambda name=name, ref=ref, want=want: _matrix_records(
                name, ref.load(), name, ref.dtype, want, scale_dtype)))
        else:
            steps.append(([name], lambda name=name, ref=ref: [_float_record(name, ref)]))
    if stacks and kind == "float":
        check_against_model(arch, config, planned)
    return steps
