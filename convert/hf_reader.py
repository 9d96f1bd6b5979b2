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
                        TensorRecord)

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

    def load(self) -> np.ndarray:
        """The tensor in memory; BF16 is widened (exactly) to float32, which numpy can hold."""
        if self.dtype not in _NP_DTYPES:
            raise UnsupportedError(f"safetensors dtype {self.dtype} in {self.file.name}")
        n = int(np.prod(self.shape))
        a = np.memmap(self.file, dtype=_NP_DTYPES[self.dtype], mode="r", offset=self.offset,
                      shape=(n,)).reshape(self.shape)
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
    if method == "bitnet":
        if qcfg.get("use_rms_norm") or qcfg.get("quantization_mode", "offline") != "offline":
            raise UnsupportedError("BitNet with use_rms_norm or online quantization")
        return "bitnet"
    raise UnsupportedError(f"quantization method {method!r} (supported: gptq, awq, bitnet, "
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
    _check_config(path, arch, config)  # the config the package stores (a wrapper's text model)
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

    policy = getattr(arch, "quant_policy", None)
    steps = _plan(refs, kind, qcfg if kind != "mlx" else mlx_quant, request, scale_dtype,
                  bool(config.get("tie_word_embeddings")),
                  policy and (lambda name, shape: policy(name, shape, config)))
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
          scale_dtype: str, tied: bool, policy=None) -> list[Step]:
    """One step per output tensor (or per quantized module), in the checkpoint's name order."""
    owned: dict[str, str] = {}  # source tensor name -> module that consumes it
    for name in refs:
        module, _, leaf = name.rpartition(".")
        if kind in ("gptq", "awq") and leaf == "qweight":
            owned |= {f"{module}.{x}": module for x in ("qweight", "qzeros", "scales", "g_idx")}
        elif kind == "bitnet" and leaf == "weight_scale":
            owned[f"{module}.weight"] = module
        elif kind == "mlx" and leaf == "scales" and f"{module}.biases" in refs:
            owned |= {f"{module}.{x}": module for x in ("weight", "scales", "biases")}

    steps, done = [], set()
    for name, ref in refs.items():
        module, _, leaf = name.rpartition(".")
        if name.endswith("rotary_emb.inv_freq") or (tied and name.startswith("lm_head.")):
            continue
        if name in owned:
            module = owned[name]
            if module in done:
                continue
            done.add(module)
            want = request.get(module)
            if kind == "bitnet":
                steps.append(_bitnet_step(module, refs))
            elif kind == "mlx":
                steps.append(_mlx_step(module, refs, qcfg, want, scale_dtype))
            else:
                steps.append(_zero_point_step(module, refs, kind, qcfg, want, scale_dtype))
            continue
        want = request.get(module)
        quantizable = (leaf == "weight" and len(ref.shape) == 2
                       and ref.dtype in ("F32", "F16", "BF16"))
        if quantizable and kind == "float" and want is None and policy is not None:
            p = policy(name, ref.shape)  # the architecture's own rule for this tensor
            quantizable = p is not False
            want = {"bits": p.get("bits"), "group_size": p.get("group_size")} if p else None
        if quantizable and (kind == "float" or want is not None):
            steps.append(([name], lambda name=name, ref=ref, want=want: _matrix_records(
                name, ref.load(), name, ref.dtype, want, scale_dtype)))
        else:
            steps.append(([name], lambda name=name, ref=ref: [_float_record(name, ref)]))
    return steps
