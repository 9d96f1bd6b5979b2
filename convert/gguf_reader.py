"""GGUF files -> CanonicalModel (llama, qwen2, qwen3), read with gguf-py's memory-mapped reader.

Never `mx.load` a GGUF: it silently stops at the first tensor type it does not know. Every
corrupt or truncated file becomes a one-line EdgertError: the header is bounds-checked before
gguf-py walks it, and each tensor's data range is checked against the file size.
"""

from __future__ import annotations

import bisect
import functools
import importlib.metadata
import math
import re
from pathlib import Path
from typing import Iterator

import numpy as np
from gguf import GGUFReader, GGUFValueType, LlamaFileType, ReaderTensor

from edgert.errors import EdgertError, UnsupportedError
from edgert.paths import sha256_file

from .canonical import CanonicalModel, QuantTensor, TensorRecord
from .gguf_types import ExtraType, ggml_type, mlx_type, type_layout

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM"}
VERSIONS = (2, 3)
GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm",
                "output": "lm_head"}
BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
SKIPPED = {"rope_freqs.weight"}  # folded into config["rope_scaling"]
_BLOCK = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


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
        for i, field in enumerate(fields):
            _, name, _, dims, raw_type, offset = field.parts
            name = bytes(name).decode("utf-8", "replace")
            n = math.prod(int(d) for d in dims)
            begin = start_offs + int(offset[0])
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


def open_gguf(path: Path) -> GGUFReader:
    """A memory-mapped GGUFReader for `path`; EdgertError (one line) for anything unreadable."""
    path = Path(path)
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
    """llama.cpp's rope_freqs for HF rope_type "llama3" (convert_hf_to_gguf, LlamaModel)."""
    freqs = 1.0 / theta ** (np.arange(0, dims, 2, dtype=np.float64) / dims)  # (dims / 2,)
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < old_ctx / high, 1.0, np.where(wavelen > old_ctx / low, factor, mid))


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


def hf_config(reader: GGUFReader, tensor_names: set[str]) -> dict:
    """config.json fields for the GGUF's architecture, from its metadata and tensor names."""
    arch = meta(reader, "general.architecture")
    if arch not in ARCHITECTURES:
        raise UnsupportedError(f"unknown architecture {arch!r} "
                               f"(supported: {', '.join(ARCHITECTURES)})")

    def need(key: str):
        value = meta(reader, f"{arch}.{key}")
        if value is None:
            raise EdgertError(f"missing metadata {arch}.{key}")
        if not isinstance(value, (int, float)):
            raise UnsupportedError(f"metadata {arch}.{key} = {value!r} (one number expected)")
        return value

    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    kv_heads = int(meta(reader, f"{arch}.attention.head_count_kv", heads))
    head_dim = int(meta(reader, f"{arch}.attention.key_length", hidden // heads))
    vocab = meta(reader, f"{arch}.vocab_size") or len(meta(reader, "tokenizer.ggml.tokens", []))
    config = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": _f32(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(meta(reader, f"{arch}.rope.freq_base",
                                1e6 if arch.startswith("qwen") else 1e4)),
        "max_position_embeddings": int(meta(reader, f"{arch}.context_length", 4096)),
        "vocab_size": int(vocab),
        "tie_word_embeddings": "output.weight" not in tensor_names,
        # qwen2's q/k/v always have biases (in HF and edgert); attention_bias adds o_proj's
        "attention_bias": "blk.0.attn_output.bias" in tensor_names,
    }
    if arch == "llama":
        config["mlp_bias"] = "blk.0.ffn_gate.bias" in tensor_names
    for key in ("bos", "eos", "padding"):
        if (i := meta(reader, f"tokenizer.ggml.{key}_token_id")) is not None:
            config["pad_token_id" if key == "padding" else f"{key}_token_id"] = int(i)
    kind = meta(reader, f"{arch}.rope.scaling.type")
    factor = (meta(reader, f"{arch}.rope.scaling.factor")
              or meta(reader, f"{arch}.rope.scale_linear"))
    if kind == "linear" or (kind is None and factor):
        config["rope_scaling"] = {"rope_type": "linear", "factor": _f32(factor)}
    elif kind == "yarn":
        config["rope_scaling"] = {
            "rope_type": "yarn", "factor": _f32(factor),
            "original_max_position_embeddings": int(
                meta(reader, f"{arch}.rope.scaling.original_context_length", 4096))}
    elif kind not in (None, "none"):
        raise UnsupportedError(f"rope scaling type {kind!r} is not supported")
    return config


# ------------------------------------------------------------------ tensors

def hf_name(gguf_name: str) -> str | None:
    """The HF name of a GGUF tensor, or None.

    blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight"""
    if m := _BLOCK.fullmatch(gguf_name):
        layer, part, kind = m.groups()
        return f"model.layers.{layer}.{BLOCK_NAMES[part]}.{kind}" if part in BLOCK_NAMES else None
    stem, _, kind = gguf_name.rpartition(".")
    if stem in GLOBAL_NAMES and kind in ("weight", "bias"):
        return f"{GLOBAL_NAMES[stem]}.{kind}"
    return None


def unpermute_rows(x: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation for llama (LlamaModel.permute in convert_hf_to_gguf).

    GGUF keeps each head's rows interleaved for GGML's rope, (n_head, half, 2); HF keeps them
    split in halves, (n_head, 2, half). Works on any array whose first axis is the rows."""
    rows = x.shape[0]
    # (rows, ...) -> (n_head, half, 2, ...) -> (n_head, 2, half, ...) -> (rows, ...)
    return x.reshape(n_head, rows // n_head // 2, 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)


def _unpermute(value: np.ndarray | QuantTensor, n_head: int) -> np.ndarray | QuantTensor:
    if isinstance(value, QuantTensor):  # blocks run along the input axis: rows move whole
        biases = None if value.biases is None else unpermute_rows(value.biases, n_head)
        return QuantTensor(unpermute_rows(value.w_q, n_head), unpermute_rows(value.scales, n_head),
                           biases, value.bits, value.group_size, value.mode)
    return unpermute_rows(value, n_head)


def read_gguf(path: Path) -> CanonicalModel:
    """Read a GGUF file (llama, qwen2, qwen3) as a CanonicalModel with HF names.

    Everything is validated up front (architecture, tensor names and types, data ranges);
    tensors are then mapped one at a time from the memory map as `tensors()` is iterated."""
    path = Path(path)
    reader = open_gguf(path)
    try:
        names = {t.name for t in reader.tensors}
        config = hf_config(reader, names)
        arch = config["model_type"]
        heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
        kept = [t for t in reader.tensors if t.name not in SKIPPED]
        for t in kept:
            if hf_name(t.name) is None:
                raise UnsupportedError(f"tensor {t.name} has no {arch} counterpart")
            if mlx_type(t.tensor_type, t.name) and len(t.shape) != 2 and (
                    type_layout(t.tensor_type)[0] > 1):
                raise UnsupportedError(f"tensor {t.name}: {len(t.shape)}-dim "
                                       f"{t.tensor_type.name} tensors are not supported")
            n = heads.get(t.name.split(".")[-2]) if arch == "llama" else None
            if n and int(t.shape[-1]) % (2 * n):
                raise EdgertError(f"tensor {t.name} has {int(t.shape[-1])} rows, which "
                                  f"{n} heads cannot split")
        note = ""
        if "rope_freqs.weight" in names:
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
            m = mlx_type(t.tensor_type, t.name).to_mlx(t.data, shape)
            value = m.value
            part = t.name.split(".")[-2]
            if arch == "llama" and part in heads:
                value = _unpermute(value, heads[part])
            yield TensorRecord(hf_name(t.name), value, t.name, t.tensor_type.name, m.mapping,
                               m.max_abs_error, note=m.note)

    source = {
        "path": str(path.resolve()), "sha256": sha256_file(path), "format": "gguf",
        "gguf_version": int(meta(reader, "GGUF.version")),
        "file_type": _file_type(file_type),
        "architecture": arch, "name": meta(reader, "general.name"),
    }
    if note:
        source["note"] = note
    return CanonicalModel(config, tensors, len(kept), tokenizer_files, source)


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
