"""GGUF files -> CanonicalModel, read with gguf-py's memory-mapped reader. What is specific to
an architecture (tensor names, config keys, value transforms) comes from its module in
edgert.models (`GGUF`, a GGUFSpec); this reader holds no per-architecture tables.

Never `mx.load` a GGUF: it silently stops at the first tensor type it does not know. Every
corrupt or truncated file becomes a one-line EdgertError: the header is bounds-checked before
gguf-py walks it, and each tensor's data range is checked against the file size.
"""

from __future__ import annotations

import dataclasses
import bisect
import functools
import importlib.metadata
import math
import re
from pathlib import Path
from typing import Iterator

import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFReader, GGUFValueType, LlamaFileType, ReaderTensor
from gguf.quants import dequantize as gguf_dequantize

from edgert.errors import EdgertError, UnsupportedError
from edgert.paths import sha256_file
from edgert.validate import check_config

from .canonical import (EXACT, F32_SCALES_EXACT, REQUANTIZED, WIDENED, CanonicalModel,
                        QuantTensor, TensorRecord, worse_error)
from edgert.quant import unpermute_rows  # noqa: F401 (tests use it from here)

from .gguf_types import TYPES, ExtraType, Mapped, ggml_type, mlx_type, type_layout

VERSIONS = (2, 3)
SKIPPED = {"rope_freqs.weight"}  # folded into config["rope_scaling"]
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def gguf_py_dequantizes(qtype) -> bool:
    """Whether gguf-py can dequantize `qtype` in numpy (the reference for `requantize` and
    `edgert verify`): asked of gguf-py itself, on one zero block."""
    if qtype not in GGML_QUANT_SIZES:
        return False
    try:
        gguf_dequantize(np.zeros(GGML_QUANT_SIZES[qtype][1], np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


# ------------------------------------------------------------------ opening, with bounds checks

class _Corrupt(Exception):
    pass


class _CheckedReader(GGUFReader):
    """gguf-py's reader, refusing reads past the end of the file and absurd array counts.

    gguf-py itself returns short slices there and can then loop for up to 2**64 elements."""

    @property
    def data(self) -> np.ndarray:
        return self._data

    @data.setter
    def data(self, value: np.memmap) -> None:
        self._data = value.view(np.ndarray)  # same mapped pages; slicing a memmap is 3x slower

    def _get(self, offset, dtype, count=1, override_order=None):
        if offset + _itemsize(dtype) * int(count) > self.data.shape[0]:
            raise _Corrupt(f"truncated or corrupt GGUF: a length or count at byte {offset} "
                           "runs past the end of the file")
        return super()._get(offset, dtype, count, override_order)

    def _get_field_parts(self, orig_offs, raw_type):
        if raw_type == GGUFValueType.ARRAY:
            itype = int(self._get(orig_offs, np.uint32)[0])
            n = int(self._get(orig_offs + 4, np.uint64)[0])
            scalar = _VALUE_TYPES.get(itype)
            least = _itemsize(scalar) if scalar else 8  # strings and arrays: an 8-byte length
            if n * least > self.data.shape[0] - orig_offs:
                raise _Corrupt(f"corrupt GGUF: an array of {n} elements at byte {orig_offs} "
                               "cannot fit in the file")
        return super()._get_field_parts(orig_offs, raw_type)

    def _build_tensors(self, start_offs, fields):
        size = self.data.shape[0]
        starts = sorted(start_offs + int(f.parts[5][0]) for f in fields) + [size]
        own = {}  # field index -> tensor, for type ids that gguf-py reads otherwise or not at all
        expected = 0  # llama.cpp: each tensor's data follows the previous one, padded
        for i, field in enumerate(fields):
            _, name, _, dims, raw_type, offset = field.parts
            name = bytes(name).decode("utf-8", "replace")
            n = math.prod(int(d) for d in dims)
            begin = start_offs + int(offset[0])
            if begin >= size:
                raise _Corrupt(f"truncated or corrupt GGUF: tensor {name} data (byte {begin}) "
                               f"lies beyond the end of the file ({size} bytes)")
            room = starts[bisect.bisect_right(starts, begin)] - begin  # up to the next tensor
            try:  # an id's readings (mainline, PrismML) differ in bytes per block
                qtype = ggml_type(int(raw_type[0]), n, room)
            except UnsupportedError as e:
                raise UnsupportedError(f"tensor {name}: {e} (gguf {_GGUF_VERSION})") from None
            block, type_size = type_layout(qtype)
            if len(dims) and int(dims[0]) % block:
                raise _Corrupt(f"corrupt GGUF: tensor {name} has rows of {int(dims[0])}, not "
                               f"whole blocks of {block}")
            end = begin + n * type_size // block
            if int(offset[0]) != expected:
                raise _Corrupt(f"corrupt GGUF: tensor {name} data starts at offset "
                               f"{int(offset[0])}, not {expected} (right after the previous "
                               f"tensor, aligned to {int(self.alignment)} bytes)")
            expected += -(-(end - begin) // int(self.alignment)) * int(self.alignment)
            if end > size:
                raise _Corrupt(f"truncated or corrupt GGUF: tensor {name} data (bytes {begin}.."
                               f"{end}) lies beyond the end of the file ({size} bytes)")
            if isinstance(qtype, ExtraType):
                np_dims = [int(d) for d in reversed(dims.tolist())]
                np_dims[-1] = np_dims[-1] // block * type_size  # bytes per row
                data = self._get(begin, np.uint8, end - begin).reshape(np_dims)
                own[i] = ReaderTensor(name, qtype, dims, n, end - begin, begin, data, field)
        super()._build_tensors(start_offs, [f for i, f in enumerate(fields) if i not in own])
        if own:
            theirs = iter(self.tensors)
            self.tensors = [own[i] if i in own else next(theirs) for i in range(len(fields))]


_itemsize = functools.cache(lambda dtype: np.dtype(dtype).itemsize)
_VALUE_TYPES = {t.value: dtype for t, dtype in GGUFReader.gguf_scalar_to_np.items()}
_GGUF_VERSION = importlib.metadata.version("gguf")
_READ_ERRORS = (_Corrupt, ValueError, KeyError, IndexError, TypeError, OverflowError, MemoryError)


SPLIT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


def split_part_path(first: Path, no: int, count: int) -> Path:
    """Part `no` (0-based) of a split GGUF whose first part is `first`, named as llama.cpp's
    llama_split_path names it: `{prefix}-{no + 1:05d}-of-{count:05d}.gguf`."""
    m = SPLIT_NAME.match(first.name)
    prefix = m["prefix"] if m else first.name.removesuffix(".gguf")
    return first.with_name(f"{prefix}-{no + 1:05d}-of-{count:05d}.gguf")


def open_gguf(path: Path) -> GGUFReader:
    """A memory-mapped GGUFReader for `path`; EdgertError (one line) for anything unreadable.

    A split GGUF (llama.cpp's gguf-split: metadata `split.no`, `split.count`,
    `split.tensors.count`; every key/value in the first part, tensors spread over all) is
    opened from its first part: the reader's `tensors` are then those of every part, each
    part bounds-checked as a file of its own."""
    reader = _open_one(Path(path))
    count = int(meta(reader, "split.count", 0) or 0)
    if count <= 1:
        return reader
    path = Path(path)
    no = int(meta(reader, "split.no", 0))
    if no != 0:
        raise EdgertError(f"{path}: part {no + 1} of a GGUF split into {count} files; give "
                          f"the first part ({split_part_path(path, 0, count).name})")
    for i in range(1, count):
        part_path = split_part_path(path, i, count)
        if not part_path.is_file():
            raise EdgertError(f"{path}: part {i + 1} of {count} of this split GGUF is missing "
                              f"({part_path.name})")
        part = _open_one(part_path)
        if (int(meta(part, "split.no", -1)), int(meta(part, "split.count", 0))) != (i, count):
            raise EdgertError(f"{part_path}: not part {i + 1} of {count} of {path.name} (its "
                              f"split.no/split.count say otherwise)")
        reader.tensors = reader.tensors + part.tensors  # views into the part's own memory map
    total = meta(reader, "split.tensors.count")
    if total is not None and int(total) != len(reader.tensors):
        raise EdgertError(f"{path}: the split GGUF's parts hold {len(reader.tensors)} tensors, "
                          f"its split.tensors.count says {int(total)}")
    return reader


def _open_one(path: Path) -> GGUFReader:
    """One GGUF file, bounds-checked (see open_gguf)."""
    if not path.is_file():
        raise EdgertError(f"{path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(24)
    if size == 0:
        raise EdgertError(f"{path}: empty file, not a GGUF file")
    if head[:4] != b"GGUF":
        raise EdgertError(f"{path}: not a GGUF file (bad magic {head[:4]!r})")
    if len(head) < 24:
        raise EdgertError(f"{path}: truncated GGUF header ({size} bytes)")
    version = int.from_bytes(head[4:8], "little")
    if version & 0xFFFF == 0:
        raise UnsupportedError(f"{path}: big-endian GGUF files are not supported")
    if version not in VERSIONS:
        raise UnsupportedError(f"{path}: GGUF version {version} is not supported "
                               f"(supported: {', '.join(map(str, VERSIONS))})")
    n_tensors, n_kv = int.from_bytes(head[8:16], "little"), int.from_bytes(head[16:24], "little")
    if 24 + 13 * n_kv + 24 * n_tensors > size:  # smallest key/value and tensor entries
        raise EdgertError(f"{path}: truncated or corrupt GGUF header ({n_tensors} tensors and "
                          f"{n_kv} keys cannot fit in {size} bytes)")
    try:
        return _CheckedReader(path)
    except (EdgertError, _Corrupt) as e:
        raise (EdgertError if isinstance(e, _Corrupt) else type(e))(f"{path}: {e}") from None
    except OSError as e:
        raise EdgertError(f"{path}: cannot read ({e.strerror or e})") from None
    except _READ_ERRORS as e:
        raise EdgertError(f"{path}: corrupt GGUF file ({e})") from None


# ------------------------------------------------------------------ metadata -> HF config

def meta(reader: GGUFReader, key: str, default=None):
    """The value of metadata `key` (str, number, bool or list), or `default`."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def _f32(x: float) -> float:
    """A float32 metadata value as the short decimal it was written from (9.99e-06 -> 1e-05)."""
    return float(str(np.float32(x)))


def _llama3_factors(theta: float, dims: int, factor: float, low: float, high: float,
                    old_ctx: int) -> np.ndarray:
    """llama.cpp's rope_freqs for HF rope_type "llama3": unscaled over scaled frequencies."""
    from edgert.models.rope import inv_frequencies

    scaling = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
               "high_freq_factor": high, "original_max_position_embeddings": old_ctx}
    return inv_frequencies(dims, theta) / inv_frequencies(dims, theta, scaling)


def llama3_scaling(rope_freqs: np.ndarray, theta: float, dims: int) -> dict | None:
    """The HF llama3 rope_scaling whose per-frequency factors llama.cpp stored as rope_freqs."""
    freqs = np.asarray(rope_freqs, dtype=np.float64)
    factor = float(np.float32(freqs.max()))
    if factor == 1.0:
        return None
    for old_ctx in (8192, 4096, 2048, 16384, 32768, 65536, 131072):
        for low, high in ((1.0, 4.0), (1.0, 2.0), (2.0, 4.0), (1.0, 8.0)):
            if np.allclose(_llama3_factors(theta, dims, factor, low, high, old_ctx), freqs,
                           rtol=1e-5):
                return {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                        "high_freq_factor": high, "original_max_position_embeddings": old_ctx}
    raise UnsupportedError("rope_freqs tensor does not match Llama 3 rope scaling")


class GGUFMeta:
    """A GGUF's metadata as an architecture's `GGUF.config` reads it: get / need / f32 take
    keys under "<architecture>."; raw a full key; has_tensor asks for a tensor name."""

    def __init__(self, reader: GGUFReader, tensor_names: set[str], arch: str):
        self.reader, self.tensor_names, self.arch = reader, tensor_names, arch

    def raw(self, key: str, default=None):
        return meta(self.reader, key, default)

    def get(self, key: str, default=None):
        return meta(self.reader, f"{self.arch}.{key}", default)

    def need(self, key: str):
        value = self.get(key)
        if value is None:
            raise EdgertError(f"missing metadata {self.arch}.{key}")
        if not isinstance(value, (int, float)):
            raise UnsupportedError(f"metadata {self.arch}.{key} = {value!r} (one number expected)")
        return value

    def f32(self, key: str, default=None):
        value = self.get(key, default)
        return None if value is None else _f32(value)

    def has_tensor(self, name: str) -> bool:
        return name in self.tensor_names

    def _tensor(self, name: str):
        t = next((t for t in self.reader.tensors if t.name == name), None)
        if t is None:
            raise EdgertError(f"missing tensor {name}")
        return t

    def shape(self, name: str) -> tuple[int, ...]:
        """A tensor's shape in numpy order."""
        return tuple(int(d) for d in reversed(self._tensor(name).shape.tolist()))

    def tensor(self, name: str) -> np.ndarray:
        """A (small) tensor's values as float32 (gguf-py's dequantization)."""
        return _dequantized(self._tensor(name), self.shape(name))


def _first(value):
    """A per-layer metadata array's first value (the architecture reads the rest)."""
    return value[0] if isinstance(value, list) and value else value


def hf_config(reader: GGUFReader, tensor_names: set[str]) -> dict:
    """config.json fields for the GGUF's architecture: the llama-shaped keys every llama.cpp
    decoder stores, then the architecture's own (its module's GGUF.config)."""
    from edgert.models import for_gguf

    arch = meta(reader, "general.architecture")
    module = for_gguf(arch)
    spec, m = module.GGUF, GGUFMeta(reader, tensor_names, arch)
    hidden, heads = int(m.need("embedding_length")), int(m.need("attention.head_count"))
    kv_heads = int(_first(m.get("attention.head_count_kv", heads)))
    head_dim = int(m.get("attention.key_length", hidden // max(heads, 1)))
    vocab = m.get("vocab_size") or len(m.raw("tokenizer.ggml.tokens", []))
    config = {
        "architectures": [spec.hf_class],
        "model_type": module.MODEL_TYPES[0],
        "hidden_size": hidden,
        "intermediate_size": int(_first(m.get("feed_forward_length"))
                                 or m.need("feed_forward_length")),
        "num_hidden_layers": int(m.need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _f32(m.need("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(m.get("rope.freq_base", spec.default_rope_theta)),
        "max_position_embeddings": int(m.get("context_length", 4096)),
        "vocab_size": int(vocab),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        # qwen2's q/k/v always have biases (in HF and edgert); attention_bias adds o_proj's
        "attention_bias": "blk.0.attn_output.bias" in tensor_names,
    }
    for key in ("bos", "eos", "padding"):
        if (i := meta(reader, f"tokenizer.ggml.{key}_token_id")) is not None:
            config["pad_token_id" if key == "padding" else f"{key}_token_id"] = int(i)
    kind = m.get("rope.scaling.type")
    factor = m.get("rope.scaling.factor") or m.get("rope.scale_linear")
    if kind == "linear" or (kind is None and factor):
        config["rope_scaling"] = {"rope_type": "linear", "factor": _f32(factor)}
    elif kind == "yarn":
        config["rope_scaling"] = {
            "rope_type": "yarn", "factor": _f32(factor),
            "original_max_position_embeddings": int(
                m.get("rope.scaling.original_context_length", 4096))}
    elif kind not in (None, "none"):
        raise UnsupportedError(f"rope scaling type {kind!r} is not supported")
    check_config(config, _hf_shapes(reader, config["model_type"]))  # before anything is sized
    return spec.config(m, config) if spec.config else config


# ------------------------------------------------------------------ tensors

def hf_name(gguf_name: str, model_type: str = "llama") -> str | None:
    """The HF name of a GGUF tensor in a `model_type` model, or None (for a fused tensor, its
    first part's).

    blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight"""
    names = hf_names(gguf_name, model_type)
    return names[0] if names else None


def hf_names(gguf_name: str, model_type: str = "llama") -> list[str] | None:
    """The HF names of a GGUF tensor: one, or, where the spec maps it to a tuple of names
    (llama.cpp's fused tensors, e.g. ffn_gate_up_exps), its equal row blocks in order."""
    from edgert.models import architecture

    spec = architecture(model_type).GGUF
    layer, _, leaf = gguf_name.removeprefix("blk.").partition(".")
    if gguf_name.startswith("blk.") and leaf in spec.leaves:
        return [f"model.layers.{layer}.{spec.leaves[leaf]}"]
    if m := _BLOCK.fullmatch(gguf_name):
        layer, part, kind = m.groups()
        target = spec.tensors.get(part)
        if target is None:
            return None
        return [f"model.layers.{layer}.{t}.{kind}"
                for t in (target if isinstance(target, tuple) else (target,))]
    stem, _, kind = gguf_name.rpartition(".")
    if stem in spec.global_tensors and kind in ("weight", "bias"):
        return [f"{spec.global_tensors[stem]}.{kind}"]
    return None


def split_rows(record: TensorRecord, names: list[str]) -> list[TensorRecord]:
    """A fused tensor's record cut into len(names) equal blocks of rows (axis -2), one record
    each; quantized rows move whole, so every class carries over."""
    n, v = len(names), record.value

    def part(a, i):
        return None if a is None else np.ascontiguousarray(np.split(a, n, axis=-2)[i])

    out = []
    for i, name in enumerate(names):
        value = (QuantTensor(part(v.w_q, i), part(v.scales, i), part(v.biases, i), v.bits,
                             v.group_size, v.mode) if isinstance(v, QuantTensor) else part(v, i))
        ref = record.reference
        out.append(dataclasses.replace(
            record, name=name, value=value,
            note="; ".join(x for x in (record.note, f"rows {i + 1} of {n} of the fused tensor") if x),
            reference=None if ref is None else (lambda ref=ref, i=i: part(ref(), i))))
    return out


def _hf_shapes(reader: GGUFReader, model_type: str) -> dict[str, tuple[int, ...]]:
    """HF name -> numpy-order shape (rows first) of every tensor with an HF counterpart (each
    part of a fused tensor with its share of the rows)."""
    out = {}
    for t in reader.tensors:
        shape = [int(d) for d in reversed(t.shape.tolist())]
        names = hf_names(t.name, model_type) or []
        if len(names) > 1:
            shape[-2] //= len(names)
        out |= {name: tuple(shape) for name in names}
    return out


def hf_value(record: TensorRecord, spec, config: dict) -> TensorRecord:
    """`record` with its value (and its reference) in HF's convention: the architecture's
    `GGUF.transform` undoes what llama.cpp's converter changed."""
    out = spec.transform(record.name, record.value, config)
    value, note = out if isinstance(out, tuple) else (out, "")
    if value is record.value:
        return record
    changes = {"value": value}
    if note:
        changes["note"] = "; ".join(x for x in (record.note, note) if x)
    if record.reference is not None:
        changes["reference"] = _transformed(spec, record.name, config, record.reference)
    return dataclasses.replace(record, **changes)


def _transformed(spec, name: str, config: dict, reference):
    """The float reference `reference()` in HF's convention (spec.transform applied)."""
    def value() -> np.ndarray:
        out = spec.transform(name, reference(), config)
        return out[0] if isinstance(out, tuple) else out
    return value


CHUNK_BYTES = 16 << 20  # source bytes mapped per step: bounds the temporaries of to_mlx
_CLASS_ORDER = (EXACT, WIDENED, F32_SCALES_EXACT, REQUANTIZED)  # a tensor gets its worst chunk's


def map_in_chunks(cls, data: np.ndarray, shape: tuple[int, ...]) -> Mapped:
    """`cls.to_mlx(data, shape)` computed over chunks of rows written into preallocated
    outputs, so that converting a tensor needs its output plus one chunk's temporaries,
    not several full-size intermediates (a Llama 3 embedding has 525M weights)."""
    if len(shape) != 2 or data.nbytes <= CHUNK_BYTES:
        return cls.to_mlx(data, shape)
    rows, cols = shape
    data = data.reshape(rows, -1)  # (rows, bytes per row)
    step = max(1, rows * CHUNK_BYTES // data.nbytes)
    first = cls.to_mlx(data[:step], (step, cols))
    if not isinstance(first.value, QuantTensor):
        return cls.to_mlx(data, shape)
    q = first.value
    w_q = np.empty((rows, q.w_q.shape[1]), q.w_q.dtype)
    scales = np.empty((rows, q.scales.shape[1]), q.scales.dtype)
    biases = None if q.biases is None else np.empty((rows, q.biases.shape[1]), q.biases.dtype)
    worst, error = first, 0.0
    for lo in range(0, rows, step):
        m = first if lo == 0 else cls.to_mlx(data[lo:lo + step], (min(step, rows - lo), cols))
        c = m.value
        if c.scales.dtype != scales.dtype:  # a chunk needed float32 scales: widen (exact)
            scales = scales.astype(np.float32)
            biases = None if biases is None else biases.astype(np.float32)
        w_q[lo:lo + step], scales[lo:lo + step] = c.w_q, c.scales
        if biases is not None:
            biases[lo:lo + step] = c.biases
        if _CLASS_ORDER.index(m.mapping) > _CLASS_ORDER.index(worst.mapping):
            worst = m
        error = worse_error(error, m.max_abs_error)
    if scales.dtype == np.float32 and biases is not None:
        biases = biases.astype(np.float32)
    value = QuantTensor(w_q, scales, biases, q.bits, q.group_size, q.mode)
    return worst._replace(value=value, max_abs_error=error)


def map_tensor(cls, data: np.ndarray, shape: tuple[int, ...]) -> Mapped:
    """map_in_chunks, for stacked experts (E, rows, cols) one expert at a time (the per-type
    rules work on 2-D byte arrays), the results stacked: the worst class, the worst error."""
    if len(shape) != 3:
        return map_in_chunks(cls, data, shape)
    parts = [map_in_chunks(cls, data[e], shape[1:]) for e in range(shape[0])]
    worst = max(parts, key=lambda m: _CLASS_ORDER.index(m.mapping)
                if m.mapping in _CLASS_ORDER else -1)
    error = functools.reduce(worse_error, (m.max_abs_error for m in parts), 0.0)
    if isinstance(parts[0].value, QuantTensor):
        from .hf_reader import stack_quantized

        value = stack_quantized([m.value for m in parts])
    else:
        value = np.stack([m.value for m in parts])
    return worst._replace(value=value, max_abs_error=error)


def _dequantized(t, shape: tuple[int, ...]) -> np.ndarray:
    """gguf-py's reference dequantization of tensor `t` in numpy order, float32. For types
    gguf-py cannot dequantize (Q1_0, Q2_0, PrismML's 1-bit) the exact MLX mapping's, which the
    tests check bit for bit against llama.cpp's own dequantization."""
    try:
        w = gguf_dequantize(t.data, t.tensor_type).astype(np.float32).reshape(shape)
    except (NotImplementedError, KeyError, ValueError):
        m = map_tensor(mlx_type(t.tensor_type, t.name), t.data, shape)
        if m.mapping not in (EXACT, WIDENED, F32_SCALES_EXACT):
            raise ValueError(f"{t.name}: no reference dequantization for {t.tensor_type.name}")
        from edgert.quant import dequantize

        v = m.value
        if isinstance(v, QuantTensor) and len(shape) == 3:  # experts, one at a time
            w = np.stack([dequantize(QuantTensor(v.w_q[e], v.scales[e], v.biases[e], v.bits,
                                                 v.group_size)) for e in range(shape[0])])
        else:
            w = dequantize(v) if isinstance(v, QuantTensor) else np.float32(v)
    return w


def _requantized(record: TensorRecord, want: dict, scale_dtype: str) -> TensorRecord:
    """`record` re-quantized from the source's reference dequantization as `want` asks
    ({"bits", "group_size"}; bits 0 keeps float32)."""
    from edgert.quant import DEFAULT_BITS, DEFAULT_GROUP, quantize_float

    ref = record.reference_value()
    bits = DEFAULT_BITS if want.get("bits") is None else want["bits"]
    group = want.get("group_size") or DEFAULT_GROUP
    if ref.ndim == 3 and bits != 0 and ref.shape[2] % group == 0:  # experts, one at a time
        from .hf_reader import stack_quantized

        parts = [quantize_float(ref[e], bits, group, scale_dtype) for e in range(ref.shape[0])]
        err = functools.reduce(worse_error, (e for _, e in parts), 0.0)
        return TensorRecord(record.name, stack_quantized([t for t, _ in parts]),
                            record.source_name, record.source_type, REQUANTIZED, err,
                            note=f"requantized to {bits}-bit group {group} per expert from the "
                            "source's dequantization", reference=record.reference,
                            experts=ref.shape[0])
    if bits == 0 or ref.ndim != 2 or ref.shape[1] % group:
        why = "" if bits == 0 else f" ({ref.shape[-1]} columns, group {group})"
        return TensorRecord(record.name, ref, record.source_name, record.source_type, EXACT,
                            note=f"dequantized to float32{why}", reference=record.reference)
    t, err = quantize_float(ref, bits, group, scale_dtype)
    return TensorRecord(record.name, t, record.source_name, record.source_type, REQUANTIZED,
                        err, note=f"requantized to {bits}-bit group {group} from the source's "
                        "dequantization", reference=record.reference)


def _wants_change(want: dict | None, value) -> bool:
    """Whether bits/group asked for differ from what `value` holds (a float counts as 0 bits)."""
    if want is None:
        return False
    if not isinstance(value, QuantTensor):
        return value.ndim in (2, 3) and want.get("bits") not in (None, 0)
    return any(want.get(k) is not None and want[k] != v
               for k, v in (("bits", value.bits), ("group_size", value.group_size)))


def read_gguf(path: Path, *, bits: int | None = None, group_size: int | None = None,
              overrides: dict[str, dict] | None = None, requantize: bool = False,
              scale_dtype: str = "float16") -> CanonicalModel:
    """Read a GGUF file (an architecture with a GGUF spec) as a CanonicalModel with HF names.

    Tensor types map onto MLX exactly where they can (convert/gguf_types.py); `bits`,
    `group_size` and `overrides` (module path or fnmatch pattern -> {"bits", "group_size"})
    re-quantize from gguf-py's dequantization where they ask for another layout, and
    `requantize` lets a type with no MLX mapping through the same way (default 4-bit g64),
    with its error reported. Everything is validated up front (architecture, tensor names and
    types, data ranges); tensors are then mapped one at a time from the memory map as
    `tensors()` is iterated."""
    from .hf_reader import Request

    path = Path(path)
    request = Request(bits, group_size, dict(overrides or {}))
    reader = open_gguf(path)
    try:
        names = {t.name for t in reader.tensors}
        config = hf_config(reader, names)
        arch = config["model_type"]
        from edgert.models import architecture

        spec = architecture(arch).GGUF
        try:  # a config the architecture cannot be built from fails here, before any write
            architecture(arch).ModelArgs.from_dict(config)
        except TypeError as e:
            raise EdgertError(f"config derived from the metadata: {e}") from None
        kept = [t for t in reader.tensors if t.name not in SKIPPED]
        for t in kept:
            if hf_name(t.name, arch) is None:
                raise UnsupportedError(f"tensor {t.name} has no {arch} counterpart")
            if requantize and t.tensor_type not in TYPES:
                if not gguf_py_dequantizes(t.tensor_type):
                    raise UnsupportedError(f"tensor {t.name}: gguf-py cannot dequantize "
                                           f"{t.tensor_type.name} either")
            elif mlx_type(t.tensor_type, t.name) and len(t.shape) not in (2, 3) and (
                    type_layout(t.tensor_type)[0] > 1):
                raise UnsupportedError(f"tensor {t.name}: {len(t.shape)}-dim "
                                       f"{t.tensor_type.name} tensors are not supported")
            if spec.validate is not None:
                spec.validate(t.name, tuple(int(d) for d in reversed(t.shape.tolist())), config)
        shapes = _hf_shapes(reader, arch)
        _check_complete(architecture(arch), config,
                        {n: shapes[n] for t in kept for n in hf_names(t.name, arch)})
        note = ""
        if "rope_freqs.weight" in names and "rope_parameters" in config:
            note = "rope_freqs tensor skipped: the architecture read it into rope_parameters"
        elif "rope_freqs.weight" in names:
            freqs = next(t for t in reader.tensors if t.name == "rope_freqs.weight").data
            note = "rope_freqs tensor skipped: all factors 1"
            if (scaling := llama3_scaling(freqs, config["rope_theta"], config["head_dim"])):
                config["rope_scaling"] = scaling
                note = "rope_freqs tensor skipped: it is config.rope_scaling (llama3)"
        file_type = meta(reader, "general.file_type")
        tokenizer_files = _tokenizer_files(reader)
    except EdgertError as e:
        raise type(e)(f"{path}: {e}") from None
    except _READ_ERRORS as e:
        raise EdgertError(f"{path}: corrupt GGUF metadata ({e})") from None

    def tensors() -> Iterator[TensorRecord]:
        for t in kept:
            shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # numpy order (rows, cols)
            names = hf_names(t.name, arch)
            reference = functools.partial(_dequantized, t, shape)
            experts = shape[0] if len(shape) == 3 else 0  # stacked (E, out, in)
            if t.tensor_type not in TYPES:  # only with `requantize` (checked above)
                whole = TensorRecord(names[0], np.empty((0, 0)), t.name, t.tensor_type.name,
                                     EXACT, reference=reference, experts=experts)
                for part in split_rows(whole, names) if len(names) > 1 else [whole]:
                    part.reference = _transformed(spec, part.name, config, part.reference)
                    want = request.get(part.name.removesuffix(".weight").removesuffix(".bias"))
                    record = _requantized(part, want or {}, scale_dtype)
                    record.note += f"; {t.tensor_type.name} has no exact MLX layout"
                    yield record
                continue
            m = map_tensor(mlx_type(t.tensor_type, t.name), t.data, shape)
            whole = TensorRecord(names[0], m.value, t.name, t.tensor_type.name, m.mapping,
                                 m.max_abs_error, note=m.note, reference=reference,
                                 experts=experts)
            for part in split_rows(whole, names) if len(names) > 1 else [whole]:
                record = hf_value(part, spec, config)
                want = request.get(record.name.removesuffix(".weight").removesuffix(".bias"))
                if _wants_change(want, record.value) and record.name.endswith(".weight"):
                    record = _requantized(record, want, scale_dtype)
                yield record

    source = {
        "path": str(path.resolve()), "sha256": sha256_file(path), "format": "gguf",
        "gguf_version": int(meta(reader, "GGUF.version")),
        "file_type": _file_type(file_type),
        "architecture": arch, "name": meta(reader, "general.name"),
    }
    if note:
        source["note"] = note
    count = sum(len(hf_names(t.name, arch)) for t in kept)
    return CanonicalModel(config, tensors, count, tokenizer_files, source)


def _check_complete(module, config: dict, planned: dict[str, tuple[int, ...]]) -> None:
    """One line for a parameter of the model built from the metadata that no GGUF tensor
    provides (a router, a shared expert's gate, sinks...) or whose tensor has another size (an
    expert count or width the metadata contradicts), before anything is written. The model is
    built lazily (nothing allocated); its sanitize sees the names as the loader will. Sizes
    are compared as element counts where a transform reshapes (conv1d (C, K) -> (C, 1, K))."""
    from mlx.utils import tree_flatten

    import mlx.core as mx

    model = module.Model(module.ModelArgs.from_dict(config))
    seen = model.sanitize({k: mx.zeros(v) for k, v in planned.items()})  # may pick a layout
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    for name, v in seen.items():
        got, want = tuple(v.shape), expected.get(name)
        if want is not None and (got != want if len(got) == len(want)
                                 else math.prod(got) != math.prod(want)):
            raise EdgertError(f"{name}: shape {list(got)} in the file, {list(want)} from its "
                              "metadata")
    missing = sorted(set(expected) - set(seen))
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise EdgertError(f"no tensor for {missing[0]}{more}, which a {config['model_type']} "
                          "model of this metadata needs")


def _file_type(value: int | None) -> str | int | None:
    try:
        return LlamaFileType(value).name  # e.g. MOSTLY_Q4_1
    except ValueError:
        return value


def _tokenizer_files(reader: GGUFReader) -> dict[str, bytes]:
    if "tokenizer.ggml.model" not in reader.fields:  # e.g. a weights-only test file
        return {}
    from .gguf_tokenizer import tokenizer_files_from_gguf

    return tokenizer_files_from_gguf(reader)
