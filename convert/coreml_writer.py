"""Core ML writer: a stateful, multifunction `.mlpackage` built with the MIL Builder straight
from the canonical tensors (no torch tracing). llama / mistral / qwen2 / qwen3.

The package (the contract the Swift side reads, also written to the manifest):

    functions  prefill  input_ids (1, L) int32, 1 <= L <= min(context, PREFILL_MAX) (RangeDim)
               decode   input_ids (1, 1) int32            (the default function)
    inputs     position     (1,) int32   sequence index of input_ids[0, 0]
               causal_mask  (1, 1, L, context) fp16, additive: 0 where key j <= position + i,
                            MASK_VALUE (-1e4, finite) elsewhere, unwritten cache slots included
    states     key_cache, value_cache  (n_layers, n_kv_heads, context, head_dim) fp16, one per
               kind for all layers, shared by both functions
    output     logits (1, 1, vocab) fp32 for the last input position

Each function reads each cache once and threads the updated value through the layers:
`read_state -> slice_update(layer 0) -> coreml_update_state -> slice_update(layer 1) -> ...`,
so no pass can merge a later layer's read into an earlier one (the `remove_redundant_ops`
pitfall), and each `slice_update` is followed by its own `coreml_update_state` before the next
one (two pending updates crash `canonicalize_inplace_pattern`).

Numerics: everything is fp16. RMSNorm divides x by max|x| first, so the mean of squares lies in
[1/d, 1] and cannot overflow whatever the residual stream holds:
    y = x / m, m = max(max|x|, 2^-14);  out = w * y * rsqrt(mean(y^2) + (sqrt(eps) / m)^2)
which equals w * x * rsqrt(mean(x^2) + eps). Attention is the fused
`scaled_dot_product_attention` with grouped-query heads folded into the query length
(q (1, H, L, D) -> (1, n_kv, n_rep * L, D), the mask tiled n_rep times): the op has no GQA
broadcast. RoPE uses constant (context, head_dim) cos / signed-sin tables (llama3 and linear
scaling folded in) gathered at position + arange(L).

Weights: MLX affine tensors w = s*q + b map onto iOS18 constexpr ops (see `encode_quant`); the
report classifies each tensor as exact / widened / requantized / float with its max abs error
against the canonical dequantization and its bits per weight measured in weight.bin.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from edgert.bitpack import unpack_rows
from edgert.coreml_manifest import (FUNCTIONS, MANIFEST_AUTHOR, MANIFEST_FORMAT,  # noqa: F401
                                     MANIFEST_VERSION, STATES, manifest_path, weights_sha256)
from edgert.errors import EdgertError, UnsupportedError
from edgert.paths import sweep_partials, temp_sibling
from edgert.signals import raise_pending

from .canonical import EXACT, FLOAT, REQUANTIZED, WIDENED, CanonicalModel, QuantTensor

MASK_VALUE = -1e4  # additive mask value; finite so fp16 softmax never sees -inf - -inf
# the graphs this writer builds, by the name a module gives as COREML_GRAPH -> "module:class"
# of this package: "llama" here, "hybrid" (Gated DeltaNet + gated attention, Qwen3.5),
# "gemma4" (sliding windows, KV sharing, per-layer embeddings read outside the program)
GRAPHS = {"llama": "coreml_writer:_Graph", "hybrid": "coreml_hybrid:HybridGraph",
          "gemma4": "coreml_gemma4:Gemma4Graph"}
TARGETS = ("iOS18", "iOS26")
DEFAULT_CONTEXT = 2048
PREFILL_MAX = 512  # longest prefill chunk: bounds the (L, context) mask and attention scores
# Largest state (KV cache and recurrent states together) a package may declare, per target: an
# iOS app is killed near 3.5 GB on 8 GB iPhones without the increased-memory entitlement, ~6 GB
# with it, and the weights need room too. macOS 15 / 26 run the same packages (same limit).
MAX_STATE_BYTES = {"iOS18": 4 << 30, "iOS26": 4 << 30}
MAX_KV_BYTES = MAX_STATE_BYTES  # the name before recurrent states
# progress(stage, done, total): "encoding weights" counts tensors; later stages pass 0, 0
Progress = Callable[[str, int, int], None]


# ---------------------------------------------------------------------------------------------
# Architecture
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StateSpec:
    """One Core ML state: fp16, `kind` "kv_cache" (positional), "window" (the last positions
    of a sliding window, shifted along) or "recurrent" (carried); see STATE_KINDS."""

    name: str
    shape: tuple
    kind: str

    @property
    def nbytes(self) -> int:
        return 2 * int(np.prod(self.shape))


@dataclass(frozen=True)
class InputSpec:
    """An input beyond input_ids / position / causal_mask: fp16 (1, L, *dims), its values
    made outside the program as `source` says (written to the manifest)."""

    name: str
    dims: tuple
    source: dict
    dtype: str = "float16"


@dataclass
class Arch:
    """What the graph needs from an HF config (parsed by the runtime's own ModelArgs); `args`
    is that ModelArgs, for what a graph reads beyond the llama-shaped fields."""

    model_type: str
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    eps: float
    inv_freq: np.ndarray  # (head_dim // 2,) float64, rope scaling applied
    max_positions: int | None
    tie_word_embeddings: bool
    graph: str = "llama"
    args: object = None
    module: object = None

    @property
    def rotary_dims(self) -> int:
        return 2 * len(self.inv_freq)

    def states(self, context: int) -> list[StateSpec]:
        """The package's states (in this order in both functions and the manifest)."""
        return graph_class(self.graph).states(self, context)

    def extra_inputs(self) -> list[InputSpec]:
        """The graph's inputs beyond the three every package has (in this order)."""
        return graph_class(self.graph).extra_inputs(self)

    @classmethod
    def from_config(cls, config: dict) -> "Arch":
        model_type = config.get("model_type", "<missing>")
        text = config.get("text_config") if isinstance(config.get("text_config"), dict) else config
        experts = text.get("num_experts") or text.get("num_local_experts")
        if experts:
            raise UnsupportedError(f"Core ML export: mixture-of-experts models are not supported "
                                   f"({model_type}, {experts} experts); use the MLX package")
        from edgert.models import architecture, supported

        served = [t for t in supported() if getattr(architecture(t), "COREML_GRAPH", None)
                  in GRAPHS]
        if model_type not in served:
            raise UnsupportedError(f"Core ML export: unsupported architecture {model_type!r} "
                                   f"(supported: {', '.join(served)})")
        module = architecture(model_type)
        try:
            a = module.ModelArgs.from_dict(config)
        except TypeError as e:
            raise EdgertError(f"config.json: {e}") from None
        if getattr(a, "rope_traditional", False):
            raise UnsupportedError("Core ML export: traditional (interleaved) RoPE")
        graph = graph_class(module.COREML_GRAPH)
        return cls(model_type, a.num_hidden_layers, a.hidden_size, a.num_attention_heads,
                   a.num_key_value_heads, a.head_dim, a.vocab_size, a.rms_norm_eps,
                   graph.inv_freq(a), a.max_position_embeddings, bool(a.tie_word_embeddings),
                   module.COREML_GRAPH, a, module)


def rope_inv_freq(dims: int, base: float, scaling: dict | None) -> np.ndarray:
    """(dims // 2,) inverse frequencies, as the runtime computes them."""
    from edgert.models.rope import inv_frequencies

    if (scaling or {}).get("rope_type") == "yarn":  # its attention factor is not in the tables
        raise UnsupportedError("Core ML export: yarn rope scaling")
    try:
        return inv_frequencies(dims, base, scaling)
    except UnsupportedError as e:
        raise UnsupportedError(f"Core ML export: {e}") from None


def rope_tables(inv_freq: np.ndarray, context: int) -> tuple[np.ndarray, np.ndarray]:
    """cos and signed sin, each (context, head_dim) fp16, for rotate-half RoPE:
    rope(x) = x * cos + swap_halves(x) * sin_signed, sin_signed = [-sin, sin]."""
    angles = np.arange(context, dtype=np.float64)[:, None] * inv_freq[None, :]  # (ctx, D/2)
    cos, sin = np.cos(angles), np.sin(angles)
    return (np.concatenate([cos, cos], axis=1).astype(np.float16),
            np.concatenate([-sin, sin], axis=1).astype(np.float16))


# ---------------------------------------------------------------------------------------------
# Weights: canonical tensors -> constexpr ops
# ---------------------------------------------------------------------------------------------


def dequantize(t: QuantTensor) -> np.ndarray:
    """The canonical weight s*q + b in float32 (what the MLX runtime computes with)."""
    return _affine(unpack_rows(t.w_q, t.bits), t.scales, t.biases, t.group_size)


def _affine(q: np.ndarray, scales: np.ndarray, biases: np.ndarray, group: int) -> np.ndarray:
    """s*q + b per (row, group) in float32, from (rows, cols) unpacked codes."""
    rows, cols = q.shape
    q = q.reshape(rows, -1, group).astype(np.float32)
    s = scales.astype(np.float32)[:, :, None]
    b = biases.astype(np.float32)[:, :, None]
    return (s * q + b).reshape(rows, cols)


@dataclass
class Encoded:
    """One weight as Core ML constexpr inputs (or a plain fp16 const)."""

    kind: str  # "fp16" | "shift_scale" | "lut" | "lut_scale"
    arrays: dict  # op input name -> numpy array (sub-byte data as uint8 values)
    dtypes: dict  # op input name -> MIL sub-byte dtype name ("uint4", "uint1", ...)
    description: str  # e.g. "shift_scale uint4 g32 offset uint4"
    mapping: str  # exact | widened | requantized | float
    max_abs_error: float
    shape: tuple

    def emit(self, name: str):
        """Create the op(s) inside the current MIL function; returns the (fp16) weight Var."""
        from coremltools.converters.mil import Builder as mb
        from coremltools.converters.mil.mil import types

        def arr(key):
            a = self.arrays[key]
            dtype = self.dtypes.get(key)
            if dtype in (None, "uint8", "int8"):
                return a.astype(dtype) if dtype else a
            return a.view(getattr(types, f"np_{dtype}_dtype"))  # sub-byte: uint8 tagged, no copy

        if self.kind == "fp16":
            return mb.const(val=self.arrays["val"], name=name)
        if self.kind == "shift_scale":
            kw = dict(data=arr("data"), scale=self.arrays["scale"])
            if "offset" in self.arrays:
                kw["offset"] = arr("offset")
            return mb.constexpr_blockwise_shift_scale(**kw, name=name)
        if self.kind == "lut":
            return mb.constexpr_lut_to_dense(indices=arr("indices"), lut=self.arrays["lut"],
                                             name=name)
        if self.kind == "lut_scale":  # int8 palette -> per-block scale (iOS26 keeps this order)
            q = mb.constexpr_lut_to_dense(indices=arr("indices"), lut=self.arrays["lut"],
                                          name=name + "_palette")
            return mb.constexpr_blockwise_shift_scale(data=q, scale=self.arrays["scale"],
                                                      name=name)
        raise AssertionError(self.kind)


def encode_float(a: np.ndarray) -> Encoded:
    h = a.astype(np.float16)
    err = float(np.abs(h.astype(np.float32) - a.astype(np.float32)).max()) if a.size else 0.0
    return Encoded("fp16", {"val": h}, {}, "fp16", FLOAT, err, tuple(a.shape))


def _fits(z: np.ndarray, lo: int, hi: int) -> bool:
    return bool(np.all(z == np.round(z)) and z.min() >= lo and z.max() <= hi)


def encode_quant(t: QuantTensor, target: str = "iOS18") -> Encoded:
    """MLX affine w = s*q + b (per row x group) as a Core ML constexpr.

    bits 1, 2, 3   constexpr_lut_to_dense, a palette of the 2**bits values fl16(s*k + b) per
                   (row, group) block: exact for any scale dtype. With target iOS26 and
                   -b/s the same constant c in every block (Q1_0: 1/2, TQ2_0 / BitNet: 1), a
                   global int8 palette k*(q - c) followed by a per-block scale s/k: 1.125 bpw.
    bits 4         constexpr_blockwise_shift_scale, uint4 data, w = s * (q - z), z = -b/s.
    bits 5, 6, 8   the same with uint8 data (5 and 6 bits: widened).
    z is stored in the data's integer type when every z is an integer in range, else as fp16;
    exact when s * z == -b holds exactly for all blocks, else requantized (error reported).
    """
    if t.mode != "affine":
        raise UnsupportedError(f"Core ML export: quantization mode {t.mode!r}")
    if t.bits not in (1, 2, 3, 4, 5, 6, 8):
        raise UnsupportedError(f"Core ML export: {t.bits}-bit weights")
    rows, cols = t.shape
    g = t.group_size
    q = unpack_rows(t.w_q, t.bits)  # (rows, cols) uint8
    s64, b64 = t.scales.astype(np.float64), t.biases.astype(np.float64)  # (rows, cols // g)

    if t.bits <= 3:
        z = -b64 / np.where(s64 == 0, 1, s64)
        c = z.flat[0] if z.size else 0.0
        if target == "iOS26" and t.bits <= 2 and np.all(z == c):
            k = next((k for k in (1, 2, 4) if k * c == round(k * c)), None)
            levels = k * (np.arange(2**t.bits) - c) if k else None
            scale = (s64 / k).astype(np.float16) if k else None
            if (k and np.all(np.abs(levels) <= 127)
                    and np.all(scale.astype(np.float64) * k == s64)):
                enc = Encoded("lut_scale", {
                    "indices": q,
                    "lut": levels.astype(np.int8).reshape(1, 1, -1, 1),  # (1, 1, 2**bits, 1)
                    "scale": scale,  # (rows, cols // g)
                }, {"indices": f"uint{t.bits}"},
                    f"lut_scale uint{t.bits} int8 palette {levels.astype(int).tolist()} g{g}",
                    EXACT, 0.0, (rows, cols))
                return _with_error(enc, t, q)
        levels = np.arange(2**t.bits, dtype=np.float32)
        lut = (t.scales.astype(np.float32)[:, :, None] * levels
               + t.biases.astype(np.float32)[:, :, None])  # (rows, cols // g, 2**bits)
        enc = Encoded("lut", {"indices": q, "lut": lut.astype(np.float16)[..., None]},
                      {"indices": f"uint{t.bits}"},
                      f"lut uint{t.bits} per (row, {g}) block", EXACT, 0.0, (rows, cols))
        return _with_error(enc, t, q)

    data_bits = 4 if t.bits == 4 else 8
    data_dtype = f"uint{data_bits}"
    scale = t.scales.astype(np.float16)
    s16 = scale.astype(np.float64)
    z = -b64 / np.where(s16 == 0, 1, s16)  # (rows, cols // g)
    exact_scale = np.array_equal(s16, s64)
    widened = WIDENED if data_bits != t.bits else EXACT

    def candidate(offset: np.ndarray, integer: bool) -> Encoded:
        exact = exact_scale and np.all(offset.astype(np.float64) * s16 == -b64)
        dtypes = {"data": data_dtype, **({"offset": data_dtype} if integer else {})}
        desc = f"shift_scale {data_dtype} g{g} offset {data_dtype if integer else 'fp16'}"
        enc = Encoded("shift_scale", {"data": q, "scale": scale, "offset": offset}, dtypes,
                      desc, widened if exact else REQUANTIZED, 0.0, (rows, cols))
        return _with_error(enc, t, q)

    z_int = np.round(z)
    options = []
    if _fits(z_int, 0, 2**data_bits - 1):
        options.append(candidate(z_int.astype(np.uint8), integer=True))
        if options[0].mapping != REQUANTIZED:
            return options[0]  # exact with an integer offset: the smallest form
    options.append(candidate(z.astype(np.float16), integer=False))
    exact = [o for o in options if o.mapping != REQUANTIZED]
    return exact[0] if exact else min(options, key=lambda o: o.max_abs_error)


def decompress(enc: Encoded) -> np.ndarray:
    """The fp16 weight Core ML materialises (the interpreter's kernels, on the raw arrays)."""
    from edgert.mil_interpreter import lut_to_dense, shift_scale

    a = enc.arrays
    if enc.kind == "fp16":
        return a["val"]
    if enc.kind == "shift_scale":
        return shift_scale(a["data"], a["scale"], a.get("offset"))
    if enc.kind == "lut":
        return lut_to_dense(a["indices"], a["lut"])
    if enc.kind == "lut_scale":
        return shift_scale(lut_to_dense(a["indices"], a["lut"]), a["scale"], None)
    raise AssertionError(enc.kind)


ERROR_ROWS = 2048  # rows per chunk when measuring errors: bounds the float temporaries


def _rows(enc: Encoded, rows: slice) -> Encoded:
    """The encoding of some rows (arrays whose first axis is the weight's rows get cut)."""
    n = enc.shape[0]
    arrays = {k: v[rows] if (v.ndim and v.shape[0] == n and not (k == "lut" and
                                                                 enc.kind == "lut_scale"))
              else v for k, v in enc.arrays.items()}
    return Encoded(enc.kind, arrays, enc.dtypes, enc.description, enc.mapping, 0.0, enc.shape)


def _with_error(enc: Encoded, t: QuantTensor, q: np.ndarray) -> Encoded:
    """Set enc.max_abs_error: max |Core ML's weight - dequantize(t)|, ERROR_ROWS at a time;
    `q` is t's codes, already unpacked."""
    err = 0.0
    for start in range(0, enc.shape[0], ERROR_ROWS):
        r = slice(start, start + ERROR_ROWS)
        got = decompress(_rows(enc, r)).astype(np.float32)
        ref = _affine(q[r], t.scales[r], t.biases[r], t.group_size)
        err = max(err, float(np.abs(got - ref).max()))
    enc.max_abs_error = err
    return enc


# ---------------------------------------------------------------------------------------------
# Graph
# ---------------------------------------------------------------------------------------------


def _h(x: float) -> np.float16:
    return np.float16(x)


def _op_name(tensor_name: str) -> str:
    """MIL op name of a weight: the HF name with dots as underscores."""
    return tensor_name.replace(".", "_")


class _Graph:
    """Emits one function's ops (the llama graph); weights are created as consts inside each
    function (both functions get the same arrays, stored once by convert_multifunction).

    States are read once each (`read`) and their updated values threaded through the layers
    (`update`: slice_update, then its coreml_update_state at once)."""

    def __init__(self, arch: Arch, weights: dict[str, Encoded], context: int,
                 inputs: dict | None = None):
        from coremltools.converters.mil import Builder as mb

        self.mb, self.arch, self.weights, self.context = mb, arch, weights, context
        self.inputs = dict(inputs or {})  # extra input name -> the function's input Var
        self._vars: dict = {}
        self._state_vars: dict = {}  # state name -> its function input
        self._values: dict = {}  # state name -> the latest value (threaded)

    @staticmethod
    def states(arch: Arch, context: int) -> list[StateSpec]:
        shape = (arch.n_layers, arch.n_kv_heads, context, arch.head_dim)
        return [StateSpec(STATES[0], shape, "kv_cache"), StateSpec(STATES[1], shape, "kv_cache")]

    @staticmethod
    def extra_inputs(arch: Arch) -> list[InputSpec]:
        return []

    @staticmethod
    def inv_freq(a) -> np.ndarray:
        """(rotary dims // 2,) inverse frequencies of the model's ModelArgs `a`."""
        rotary = int(a.head_dim * getattr(a, "partial_rotary_factor", 1.0))  # partial rotary
        return rope_inv_freq(rotary, a.rope_theta, a.rope_scaling)

    def read(self, states: dict) -> None:
        """Read every state once (states: name -> the function's state input)."""
        self._state_vars = dict(states)
        self._values = {n: self.mb.read_state(input=v) for n, v in states.items()}

    def update(self, name: str, update, begin, end):
        """Write `update` into state `name` at [begin, end) and commit it; returns the state's
        new value. Each slice_update is committed before the next (see the module docstring)."""
        mb = self.mb
        value = mb.slice_update(x=self._values[name], update=update, begin=begin, end=end)
        self._values[name] = mb.coreml_update_state(state=self._state_vars[name], value=value)
        return self._values[name]

    def check_all_used(self) -> None:
        if unused := sorted(set(self.weights) - set(self._vars)):
            raise UnsupportedError(f"Core ML export: {len(unused)} tensors the "
                                   f"{self.arch.model_type} graph does not use, e.g. {unused[0]}")

    def w(self, name: str):
        """The Var of HF tensor `name`, created on first use."""
        if name not in self._vars:
            self._vars[name] = self.weights[name].emit(_op_name(name))
        return self._vars[name]

    def has(self, name: str) -> bool:
        return name in self.weights

    def linear(self, x, prefix: str):
        bias = self.w(f"{prefix}.bias") if self.has(f"{prefix}.bias") else None
        return self.mb.linear(x=x, weight=self.w(f"{prefix}.weight"), bias=bias)

    def rms_norm(self, x, weight_name: str):
        """RMSNorm over the last axis, overflow-free in fp16 (see the module docstring)."""
        mb = self.mb
        m = mb.reduce_max(x=mb.abs(x=x), axes=[-1], keep_dims=True)  # (..., 1)
        m = mb.maximum(x=m, y=_h(2.0**-14))
        y = mb.real_div(x=x, y=m)  # |y| <= 1
        ms = mb.reduce_mean(x=mb.mul(x=y, y=y), axes=[-1], keep_dims=True)  # [1/d, 1]
        r = mb.real_div(x=_h(np.sqrt(self.arch.eps)), y=m)
        inv = mb.rsqrt(x=mb.add(x=ms, y=mb.mul(x=r, y=r)), epsilon=_h(0.0))
        return mb.mul(x=mb.mul(x=y, y=inv), y=self.w(weight_name))

    def rope(self, x, cos, sin):
        """x (1, heads, L, D); cos, sin (L, R), R <= D: rotate-half on the first R of each head
        (partial rotary), the rest passed through."""
        mb = self.mb
        D, R = self.arch.head_dim, self.arch.rotary_dims
        rest = None
        if R < D:
            x, rest = mb.split(x=x, split_sizes=[R, D - R], axis=-1)
        x1, x2 = mb.split(x=x, num_splits=2, axis=-1)
        swapped = mb.concat(values=[x2, x1], axis=-1)
        out = mb.add(x=mb.mul(x=x, y=cos), y=mb.mul(x=swapped, y=sin))
        return out if rest is None else mb.concat(values=[out, rest], axis=-1)

    def embed(self, input_ids, position, decode: bool):
        """The embedded chunk (1, L, hid), its RoPE rows cos, sin (L, R) at position +
        arange(L), and position + L (1,)."""
        mb, a = self.mb, self.arch
        x = mb.gather(x=self.w("model.embed_tokens.weight"), indices=input_ids, axis=0)
        if decode:
            pos = position  # (1,)
        else:
            n = mb.gather(x=mb.shape(x=input_ids), indices=1, axis=0)  # scalar L
            pos = mb.add(x=mb.range_1d(start=0, end=n, step=1), y=position)  # (L,)
        cos_t, sin_t = rope_tables(a.inv_freq, self.context)
        cos = mb.gather(x=cos_t, indices=pos, axis=0)  # (L, R)
        sin = mb.gather(x=sin_t, indices=pos, axis=0)
        end = mb.add(x=position, y=mb.gather(x=mb.shape(x=input_ids), indices=[1], axis=0))
        return x, cos, sin, end

    def attend(self, q, k, v, slot: int, position, end, mask):
        """q (1, H, L, D), k, v (1, KV, L, D), rotated: written into KV slot `slot` at
        [position, end), then attention over that slot's whole cache -> (1, L, H * D)."""
        mb, a, ctx = self.mb, self.arch, self.context
        H, KV, D = a.n_heads, a.n_kv_heads, a.head_dim
        begin = mb.concat(values=[np.array([slot, 0], np.int32), position,
                                  np.array([0], np.int32)], axis=0)
        stop = mb.concat(values=[np.array([slot + 1, KV], np.int32), end,
                                 np.array([D], np.int32)], axis=0)
        k_cache = self.update(STATES[0], k, begin, stop)
        v_cache = self.update(STATES[1], v, begin, stop)
        keys = mb.slice_by_index(x=k_cache, begin=[slot, 0, 0, 0], end=[slot + 1, KV, ctx, D])
        values = mb.slice_by_index(x=v_cache, begin=[slot, 0, 0, 0],
                                   end=[slot + 1, KV, ctx, D])
        qg = mb.reshape(x=q, shape=[1, KV, -1, D])  # (1, KV, n_rep * L, D)
        o = mb.scaled_dot_product_attention(query=qg, key=keys, value=values, attn_mask=mask)
        o = mb.transpose(x=mb.reshape(x=o, shape=[1, H, -1, D]), perm=[0, 2, 1, 3])
        return mb.reshape(x=o, shape=[1, -1, H * D])  # (1, L, H * D)

    def mlp(self, x, p: str):
        """x + MLP(post_attention_layernorm(x)) of block `p`."""
        mb = self.mb
        h = self.rms_norm(x, f"{p}.post_attention_layernorm.weight")
        gate = mb.silu(x=self.linear(h, f"{p}.mlp.gate_proj"))
        up = self.linear(h, f"{p}.mlp.up_proj")
        return mb.add(x=x, y=self.linear(mb.mul(x=gate, y=up), f"{p}.mlp.down_proj"))

    def head(self, x, decode: bool):
        """Final norm and head of the last position -> logits (1, 1, vocab) fp32."""
        mb = self.mb
        if not decode:  # last position only
            x = mb.slice_by_index(x=x, begin=[0, -1, 0], end=[1, 0, self.arch.hidden],
                                  end_mask=[False, True, False])  # (1, 1, hid)
        x = self.rms_norm(x, "model.norm.weight")
        head = "lm_head" if self.has("lm_head.weight") else "model.embed_tokens"
        logits = mb.linear(x=x, weight=self.w(f"{head}.weight"))  # (1, 1, vocab)
        self.check_all_used()
        return mb.cast(x=logits, dtype="fp32", name="logits")

    def gqa_mask(self, mask):
        """The mask tiled for grouped-query heads folded into the query length."""
        n_rep = self.arch.n_heads // self.arch.n_kv_heads
        return mask if n_rep == 1 else self.mb.tile(x=mask, reps=[1, 1, n_rep, 1])

    def build(self, input_ids, position, mask, states: dict, decode: bool):
        mb, a = self.mb, self.arch
        H, KV, D = a.n_heads, a.n_kv_heads, a.head_dim
        x, cos, sin, end = self.embed(input_ids, position, decode)
        mask = self.gqa_mask(mask)  # (1, 1, n_rep * L, ctx)
        self.read(states)  # (n_layers, KV, ctx, D) each
        for i in range(a.n_layers):
            p = f"model.layers.{i}"
            h = self.rms_norm(x, f"{p}.input_layernorm.weight")
            q = mb.reshape(x=self.linear(h, f"{p}.self_attn.q_proj"), shape=[1, -1, H, D])
            k = mb.reshape(x=self.linear(h, f"{p}.self_attn.k_proj"), shape=[1, -1, KV, D])
            v = mb.reshape(x=self.linear(h, f"{p}.self_attn.v_proj"), shape=[1, -1, KV, D])
            if self.has(f"{p}.self_attn.q_norm.weight"):
                q = self.rms_norm(q, f"{p}.self_attn.q_norm.weight")
                k = self.rms_norm(k, f"{p}.self_attn.k_norm.weight")
            q = self.rope(mb.transpose(x=q, perm=[0, 2, 1, 3]), cos, sin)  # (1, H, L, D)
            k = self.rope(mb.transpose(x=k, perm=[0, 2, 1, 3]), cos, sin)  # (1, KV, L, D)
            v = mb.transpose(x=v, perm=[0, 2, 1, 3])
            o = self.attend(q, k, v, i, position, end, mask)  # (1, L, H * D)
            x = mb.add(x=x, y=self.linear(o, f"{p}.self_attn.o_proj"))
            x = self.mlp(x, p)
        return self.head(x, decode)


def graph_class(name: str) -> type:
    """The graph builder named by a module's COREML_GRAPH (see GRAPHS)."""
    import importlib

    module, cls = GRAPHS[name].split(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), cls)


def build_program(arch: Arch, weights: dict[str, Encoded], context: int, function: str,
                  target: str = "iOS18"):
    """One single-function MIL program ("main") for `function` in FUNCTIONS."""
    import coremltools as ct
    from coremltools.converters.mil import Builder as mb
    from coremltools.converters.mil.mil import Function, Program, get_new_symbol, types

    decode = function == "decode"
    L = 1 if decode else get_new_symbol()
    states = arch.states(context)
    extra = arch.extra_inputs()
    specs = {
        "input_ids": mb.TensorSpec((1, L), types.int32),
        "position": mb.TensorSpec((1,), types.int32),
        "causal_mask": mb.TensorSpec((1, 1, L, context), types.fp16),
        **{e.name: mb.TensorSpec((1, L, *e.dims), types.fp16) for e in extra},
        **{s.name: mb.StateTensorSpec(s.shape, types.fp16) for s in states},
    }
    with Function(specs, opset_version=getattr(ct.target, target)) as func:
        i = func.inputs
        graph = graph_class(arch.graph)(arch, weights, context, {e.name: i[e.name] for e in extra})
        logits = graph.build(
            i["input_ids"], i["position"], i["causal_mask"], {s.name: i[s.name] for s in states},
            decode)
        func.set_outputs([logits])
    prog = Program()
    prog.add_function("main", func)
    return prog


def convert_multifunction(arch: Arch, weights: dict[str, Encoded], context: int, target: str,
                          progress: Progress | None = None):
    """Both functions in one MLModel (not loaded), weights stored once.

    Each function goes through coremltools' pass pipeline on its own; the two optimised
    programs are then joined in memory and serialised once, identical consts sharing one blob
    entry (`share_consts_across_functions`). coremltools' `save_multifunction` instead
    reloads both packages from disk, which unpacks every weight again: one Qwen3-8B block
    with its 152k-row embedding and head peaked at 19.1 GiB that way, 2.3 GiB this way."""
    import coremltools as ct
    from coremltools.converters.mil.converter import mil_convert
    from coremltools.converters.mil.mil import Program

    multi = Program()
    for fn in FUNCTIONS:
        if progress:
            progress(f"building and optimising {fn}", 0, 0)
        prog = build_program(arch, weights, context, fn, target)
        optimised = convert_program(prog, fn, context, target, convert_to="milinternal",
                                    extra=arch.extra_inputs())
        multi.add_function(fn, optimised.functions["main"])
    multi.default_function_name = "decode"
    share_consts_across_functions(multi)
    multi.skip_all_passes = True
    multi.export_as_multifunction = True
    if progress:
        progress("writing weight.bin", 0, 0)
    with _quiet_passes():
        return mil_convert(multi, convert_to="mlprogram", convert_from="milinternal",
                           specification_version=getattr(ct.target, target),
                           compute_units=ct.ComputeUnit.CPU_ONLY, skip_model_load=True)


def share_consts_across_functions(prog) -> int:
    """Give identical consts of different functions one `weight_id`, so the serialiser writes
    them to weight.bin once; returns how many consts now share a blob entry.

    Does what coremltools' `const_deduplication._deduplicate_const_across_functions` does, but
    compares whole values by SHA-256 of their bytes (no temporaries). coremltools compares
    candidates with `np.allclose`, which casts both to float64: for a 152k x 4096 embedding's
    codes (0.6 G uint8) that is several 5 GB temporaries, the 16 GiB peak of a one-block
    Qwen3-8B export. Each function has been deduplicated within itself by the pass pipeline.
    """
    import hashlib

    groups: dict[tuple, list] = {}
    for func in prog.functions.values():
        for op in func.operations:
            if op.op_type != "const" or op.weight_id is not None:
                continue
            val = op.outputs[0].val
            if not isinstance(val, (np.ndarray, np.generic)):
                continue
            digest = hashlib.sha256(np.ascontiguousarray(val)).hexdigest()
            key = (str(op.outputs[0].dtype), np.shape(val), digest)
            groups.setdefault(key, []).append(op)
    shared = 0
    for i, ops in enumerate(g for g in groups.values() if len(g) > 1):
        for op in ops:
            op.weight_id = f"shared_{i}"
        shared += len(ops)
    return shared


@contextlib.contextmanager
def _quiet_passes():
    """Silence coremltools' per-pipeline progress bars while we convert."""
    from coremltools.converters.mil.mil.passes import pass_pipeline

    saved = pass_pipeline.tqdm
    pass_pipeline.tqdm = lambda it, **_: it
    try:
        yield
    finally:
        pass_pipeline.tqdm = saved


def convert_program(prog, function: str, context: int, target: str, pipeline=None,
                    convert_to: str = "mlprogram", extra: list[InputSpec] = ()):
    """MIL program -> MLModel (not loaded: Core ML cannot run on Linux), or with convert_to
    "milinternal" the optimised MIL program (nothing serialised). `extra`: the graph's
    inputs beyond the three every package has."""
    import coremltools as ct

    L = 1 if function == "decode" else ct.RangeDim(1, prefill_max(context), 1)
    inputs = [ct.TensorType(name="input_ids", shape=(1, L), dtype=np.int32),
              ct.TensorType(name="position", shape=(1,), dtype=np.int32),
              ct.TensorType(name="causal_mask", shape=(1, 1, L, context), dtype=np.float16),
              *(ct.TensorType(name=e.name, shape=(1, L, *e.dims), dtype=np.float16)
                for e in extra)]
    with _quiet_passes():
        return ct.convert(prog, inputs=inputs, convert_to=convert_to,
                          minimum_deployment_target=getattr(ct.target, target),
                          compute_precision=ct.precision.FLOAT32,  # the program is fp16 already
                          pass_pipeline=pipeline or ct.PassPipeline.DEFAULT,
                          skip_model_load=True)


# ---------------------------------------------------------------------------------------------
# Package
# ---------------------------------------------------------------------------------------------


def _token_ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def _chat_template(files: dict[str, bytes]) -> str | None:
    if "chat_template.jinja" in files:
        return files["chat_template.jinja"].decode()
    if "tokenizer_config.json" in files:
        tpl = json.loads(files["tokenizer_config.json"]).get("chat_template")
        if isinstance(tpl, list):  # [{"name": "default", "template": ...}, ...]
            tpl = next((t["template"] for t in tpl if t.get("name") == "default"), None)
        return tpl
    return None


def package_tokenizer_files(files: dict[str, bytes]) -> dict[str, bytes]:
    """The tokenizer files the package carries: the source's, plus a `tokenizer.json`
    rebuilt from a SentencePiece `tokenizer.model` where the source has no tokenizer.json
    (the Swift bridge reads tokenizer.json only)."""
    if "tokenizer.json" in files or "tokenizer.model" not in files:
        return dict(files)
    import tempfile

    from edgert.tokenizer import _sentencepiece_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp) / "tokenizer.model"
        model.write_bytes(files["tokenizer.model"])
        tok, defaults = _sentencepiece_tokenizer(model)
    # the model's BOS / EOS names and add_bos_token, which load_tokenizer takes from
    # tokenizer.model itself, now go in the config: tokenizer.json is read first
    config = json.loads(files["tokenizer_config.json"]) if "tokenizer_config.json" in files else {}
    return dict(files, **{"tokenizer.json": tok.to_str().encode(),
                          "tokenizer_config.json": json.dumps(defaults | config).encode()})


def build_manifest(canonical: CanonicalModel, arch: Arch, context: int, target: str,
                   summary: dict, weights_digest: str | None = None,
                   sources: dict | None = None) -> dict:
    """The contract a Swift app reads (also stored in the model's user-defined metadata):
    names and shapes of the functions, inputs, outputs and states, the tokens, the tokenizer
    files, the chat template reduced to role prefixes / suffixes (`chat_format`, see
    edgert.convert.chat_format) and the weights' SHA-256. `sources`: per extra input, what
    the writer adds to its source (the layout of the file it wrote)."""
    from edgert import __version__

    from .chat_format import chat_format_from_files

    cfg = canonical.config
    files = package_tokenizer_files(canonical.tokenizer_files)
    gen = json.loads(files["generation_config.json"]) if "generation_config.json" in files else {}
    eos = _token_ids(cfg.get("eos_token_id"))
    stop = sorted(set(eos) | set(_token_ids(gen.get("eos_token_id"))))
    L = -1  # flexible: 1 <= L <= prefill_max(context)
    states = arch.states(context)
    extra = arch.extra_inputs()
    sources = sources or {}

    def io(decode: bool) -> dict:
        n = 1 if decode else L
        return {
            "inputs": [
                {"name": "input_ids", "shape": [1, n], "dtype": "int32"},
                {"name": "position", "shape": [1], "dtype": "int32"},
                {"name": "causal_mask", "shape": [1, 1, n, context], "dtype": "float16"},
                *({"name": e.name, "shape": [1, n, *e.dims], "dtype": e.dtype,
                   "source": dict(e.source, **sources.get(e.name, {}))} for e in extra),
            ],
            "outputs": [{"name": "logits", "shape": [1, 1, arch.vocab], "dtype": "float32"}],
            "states": [{"name": s.name, "shape": list(s.shape), "dtype": "float16",
                        "kind": s.kind, "bytes": s.nbytes} for s in states],
        }

    return {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "model_type": arch.model_type,
        "target": target,
        "context_length": context,
        "vocab_size": arch.vocab,
        "num_hidden_layers": arch.n_layers,
        "num_key_value_heads": arch.n_kv_heads,
        "head_dim": arch.head_dim,
        # what the states take in memory (bytes, allocated once per conversation)
        "state_bytes": {**{k: sum(s.nbytes for s in states if s.kind == k)
                           for k in sorted({s.kind for s in states})},
                        "total": sum(s.nbytes for s in states)},
        "functions": {"prefill": dict(io(False), min_length=1,
                                         max_length=prefill_max(context)),
                      "decode": io(True)},
        "default_function": "decode",
        "causal_mask": {"masked_value": MASK_VALUE, "visible_value": 0.0,
                        "rule": "row i (token at position+i) sees key j iff j <= position+i"},
        "bos_token_id": cfg.get("bos_token_id"),
        "eos_token_id": eos,
        "stop_token_ids": stop,
        "pad_token_id": cfg.get("pad_token_id"),
        "chat_template": _chat_template(files),
        "chat_format": chat_format_from_files(files, _chat_template(files)),
        "tokenizer_files": [f"tokenizer/{n}" for n in sorted(files)],
        "weights_sha256": weights_digest,
        "edgert_version": __version__,
        "quantization": summary,
        "bits_per_weight": summary.get("bits_per_weight"),
        "source": {k: v for k, v in canonical.source.items() if isinstance(v, (str, int, float))},
    }


def _add_item(pkg_path: Path, src: Path, name: str, description: str) -> None:
    """Register a file or folder as an item of the package (<pkg>/Data/com.edgert/<name>)."""
    from coremltools.libmodelpackage import ModelPackage

    ModelPackage(str(pkg_path)).addItem(str(src), name, MANIFEST_AUTHOR, description)


def _set_metadata(pkg_path: Path, manifest: dict, canonical: CanonicalModel) -> None:
    """Write the manifest into the root spec's metadata, in place (no package copy)."""
    from coremltools.libmodelpackage import ModelPackage
    from coremltools.proto import Model_pb2

    spec_path = Path(ModelPackage(str(pkg_path)).getRootModel().path())
    spec = Model_pb2.Model()
    spec.ParseFromString(spec_path.read_bytes())
    meta = spec.description.metadata
    name = canonical.config.get("_name_or_path") or canonical.config.get("model_type", "model")
    meta.shortDescription = f"{name} for edgert (Core ML, stateful KV cache)"
    meta.userDefined["edgert.manifest"] = json.dumps(manifest)
    meta.userDefined["edgert.format_version"] = str(MANIFEST_VERSION)
    spec_path.write_bytes(spec.SerializeToString())


def prefill_max(context: int) -> int:
    return min(context, PREFILL_MAX)


def kv_cache_bytes(arch: Arch, context: int) -> int:
    """The positional (KV) states' bytes at `context`."""
    return sum(s.nbytes for s in arch.states(context) if s.kind == "kv_cache")


def state_bytes(arch: Arch, context: int) -> int:
    """Every state's bytes at `context` (KV cache and recurrent states)."""
    return sum(s.nbytes for s in arch.states(context))


def _size(n: int) -> str:
    """Bytes as the largest unit that keeps a digit before the point: '4.7 GiB', '5.5 KiB'."""
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} bytes"


def check_context(arch: Arch, context: int, target: str) -> None:
    """Refuse a context the model or the target cannot hold (one-line EdgertError)."""
    if context < 1:
        raise EdgertError(f"context must be positive, got {context}")
    if arch.max_positions and context > arch.max_positions:
        raise EdgertError(f"context {context} exceeds the model's max_position_embeddings "
                          f"({arch.max_positions})")
    limit = MAX_STATE_BYTES[target]
    fixed = state_bytes(arch, context) - kv_cache_bytes(arch, context)  # recurrent
    if fixed > limit:
        raise EdgertError(f"the recurrent states need {_size(fixed)}, over the "
                          f"{limit / 2**30:.0f} GiB of state a {target} package may hold "
                          f"(at any context)")
    kv = kv_cache_bytes(arch, context)
    if kv + fixed > limit:
        most = context * (limit - fixed) // kv
        extra = f" (+ {_size(fixed)} recurrent)" if fixed else ""
        raise EdgertError(f"context {context} needs a {kv / 2**30:.1f} GiB KV cache{extra}, "
                          f"over the {limit / 2**30:.0f} GiB a {target} package may hold: use "
                          f"--context {most} or less")


def default_context(arch: Arch, target: str) -> int:
    """DEFAULT_CONTEXT, or less where the model or the target's state limit allows less."""
    ctx = min(DEFAULT_CONTEXT, arch.max_positions or DEFAULT_CONTEXT)
    kv = kv_cache_bytes(arch, ctx)
    room = MAX_STATE_BYTES[target] - (state_bytes(arch, ctx) - kv)
    return max(1, min(ctx, ctx * max(room, 0) // kv)) if kv else ctx


def _stoppable(progress: Progress | None) -> Progress:
    """`progress` that first re-raises a signal coremltools may have swallowed."""
    def report(stage: str, done: int, total: int) -> None:
        raise_pending()
        if progress:
            progress(stage, done, total)
    return report


def _work_folder(out: Path) -> Path:
    """The temporary sibling of `out` the package is built in (stale ones swept first)."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        sweep_partials(out.parent)
        return temp_sibling(out)
    except OSError as e:
        raise EdgertError(f"{out.parent}: cannot write there ({e.strerror or e})") from None


def check_output(out: Path, target: str, force: bool) -> None:
    """Refuse, in one line, an output path or target that cannot be written."""
    if out.suffix != ".mlpackage":
        raise EdgertError(f"{out}: a Core ML package path must end in .mlpackage")
    if out.exists() and not force:
        raise EdgertError(f"{out} exists (use --force to overwrite)")
    if target not in TARGETS:
        raise UnsupportedError(f"Core ML export: target {target!r} "
                               f"(supported: {', '.join(TARGETS)})")
    parent = next((p for p in out.absolute().parents if p.exists()), None)
    if parent is None or not os.access(parent, os.W_OK | os.X_OK):
        raise EdgertError(f"{out}: cannot write in {parent} (read-only or no permission)")


class PackageFiles:
    """Tensors of the modules a model keeps in files of their own (`package_files`: module
    path -> file name, as the MLX package has them), written tensor by tensor into `folder`
    as safetensors in the MLX package's layout: quantized tables as weight / scales / biases,
    float ones as fp16."""

    def __init__(self, folder: Path, modules: dict[str, str]):
        self.folder, self.modules = folder, dict(modules)
        self.writers: dict = {}
        self.layouts: dict[str, dict] = {}  # module -> its file's description

    def add(self, name: str, rec) -> bool:
        """Write `rec` (package name `name`) if it belongs to such a module; False if not."""
        from .mlx_writer import ShardWriter, _arrays, header_reserve

        module = next((m for m in self.modules if name.startswith(m + ".")), None)
        if module is None:
            return False
        file = self.modules[module]
        if file not in self.writers:
            self.writers[file] = ShardWriter(self.folder / file, header_reserve(8))
        v = rec.value
        arrays = _arrays(rec) if isinstance(v, QuantTensor) else {
            rec.name: np.asarray(v).astype(np.float16)}
        for key, a in arrays.items():
            self.writers[file].add(key.replace(rec.name.removesuffix(".weight"), module, 1), a)
        quant = ({"bits": v.bits, "group_size": v.group_size, "mode": v.mode}
                 if isinstance(v, QuantTensor) else None)
        self.layouts[module] = {"path": file, "tensor": module, "shape": list(rec.shape),
                                "quantization": quant,
                                "description": f"{module} ({rec.source_type}), read outside "
                                               "the program"}
        return True

    def close(self) -> dict[str, dict]:
        """module -> {"path", "tensor", "shape", "quantization", "bytes", "description"}."""
        for file, w in self.writers.items():
            w.close({"format": "mlx"})
        for layout in self.layouts.values():
            layout["bytes"] = (self.folder / layout["path"]).stat().st_size
        return self.layouts


def _input_sources(arch: Arch, files: dict[str, dict]) -> dict[str, dict]:
    """Per extra input whose source is a table in a package file: that file's layout."""
    out = {}
    for e in arch.extra_inputs():
        tensor = e.source.get("tensor")
        if tensor is not None:
            if tensor not in files:
                raise EdgertError(f"the model has no {tensor}.weight (input {e.name} reads it)")
            f = files[tensor]
            out[e.name] = {"path": f["path"], "shape": f["shape"],
                           "quantization": f["quantization"], "bytes": f["bytes"]}
    return out


def write_coreml(canonical: CanonicalModel, out: Path, *, context: int | None = None,
                 target: str = "iOS18", force: bool = False,
                 progress: Progress | None = None) -> dict:
    """Write `canonical` as a stateful multifunction Core ML package at `out` (.mlpackage).

    `context` is the KV cache length (default DEFAULT_CONTEXT or the model's limit; at most
    the model's max_position_embeddings and MAX_KV_BYTES of cache); `target`
    "iOS18" or "iOS26" (adds the 1.125-bpw LUT -> scale chain for Q1_0 / ternary weights).
    Returns the report: per-tensor representation, class, max abs error and bits per weight
    (measured in weight.bin), totals and timings. Writes to a temporary folder next to `out`
    and renames it when complete; refuses an existing `out` unless `force`. Raises
    EdgertError / UnsupportedError (one line) for what it cannot express. `progress` hears
    of each tensor encoded and of each later stage (see Progress).
    """
    t0 = time.time()
    out = Path(out)
    check_output(out, target, force)
    progress = _stoppable(progress)
    arch = Arch.from_config(canonical.config)
    context = default_context(arch, target) if context is None else int(context)
    check_context(arch, context, target)
    if arch.n_heads % arch.n_kv_heads:
        raise UnsupportedError("Core ML export: attention heads not a multiple of KV heads")

    # a module's model_name(name) maps package names to its model's (e.g. a VL wrapper's text)
    rename = getattr(arch.module, "model_name", lambda n: n)
    work = _work_folder(out)
    try:
        item = work / "edgert"
        (item / "tokenizer").mkdir(parents=True)
        # modules the model keeps in a file of its own (Gemma 4's per-layer embeddings): the
        # file goes into the package as it is, read outside the program
        own = PackageFiles(item, getattr(getattr(arch.module, "Model", None),
                                         "package_files", {}))
        weights, records = {}, {}
        for i, rec in enumerate(canonical.tensors(), 1):
            name = rename(rec.name)
            if name is not None and own.add(name, rec):
                pass
            elif name is not None and "rotary_emb.inv_freq" not in name:
                v = rec.value
                enc = encode_quant(v, target) if isinstance(v, QuantTensor) else encode_float(v)
                # provenance only: keeping `rec` would keep its packed source codes (4 GB for
                # an 8B 4-bit model) alongside the encoded ones until the report is written
                weights[name], records[name] = enc, {
                    "source_name": rec.source_name, "source_type": rec.source_type,
                    "source_class": rec.mapping, "note": rec.note}
            del rec
            if progress:
                progress("encoding weights", i, canonical.tensor_count)
        files = own.close()
        if "model.embed_tokens.weight" not in weights:
            raise EdgertError("the model has no model.embed_tokens.weight")
        if arch.tie_word_embeddings:
            weights.pop("lm_head.weight", None)
        elif "lm_head.weight" not in weights:
            raise EdgertError("the model has no lm_head.weight and does not tie embeddings")
        t_encode = time.time() - t0

        t_convert = time.time()
        pkg = work / out.name
        try:  # coremltools writes weight.bin while converting, then the package
            convert_multifunction(arch, weights, context, target, progress).save(str(pkg))
        except RuntimeError as e:
            if "writ" not in str(e).lower():  # not its file writer: a real failure
                raise
            raise EdgertError(f"{out}: writing the Core ML package failed ({e} Is the disk "
                              "full?); nothing was left behind") from e
        t_convert = time.time() - t_convert
        raise_pending()  # an interrupt coremltools swallowed while saving: the package is partial

        if progress:
            progress("measuring bits per weight", 0, 0)
        tensors, summary = _tensor_report(pkg, weights, records)
        summary["package_files"] = {f["path"]: f["bytes"] for f in files.values()}
        manifest = build_manifest(canonical, arch, context, target, summary,
                                  weights_sha256(pkg), sources=_input_sources(arch, files))
        for name, data in package_tokenizer_files(canonical.tokenizer_files).items():
            (item / "tokenizer" / name).write_bytes(data)
        (item / "manifest.json").write_text(json.dumps(manifest, indent=2))
        _add_item(pkg, item / "manifest.json", "manifest.json", "edgert manifest")
        _add_item(pkg, item / "tokenizer", "tokenizer", "tokenizer files")
        for f in files.values():  # registered with a stand-in, then moved in (no copy)
            (work / "stand-in").write_bytes(b"")
            _add_item(pkg, work / "stand-in", f["path"], f["description"])
            os.replace(item / f["path"], manifest_path(pkg).parent / f["path"])
        _set_metadata(pkg, manifest, canonical)

        raise_pending()  # an interrupt coremltools swallowed still stops the commit
        if out.exists():  # --force: move the old package aside, deleted with `work`
            os.replace(out, work / "replaced")
        os.replace(pkg, out)
    except OSError as e:
        raise EdgertError(f"{out}: writing the Core ML package failed ({e.strerror or e}); "
                          "nothing was left behind") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)

    return {
        "format": "coreml",
        "path": str(out),
        "manifest": str(manifest_path(out)),
        "target": target,
        "context": context,
        "functions": list(FUNCTIONS),
        "tensors": tensors,
        "summary": summary,
        "seconds": {"encode": round(t_encode, 3), "convert": round(t_convert, 3),
                    "total": round(time.time() - t0, 3)},
    }


def convert_to_coreml(src: Path, out: Path, *, context: int | None = None,
                      target: str = "iOS18", force: bool = False,
                      progress: Progress | None = None, **options) -> dict:
    """Read a checkpoint (GGUF file or HF folder; `options` go to `read_source`) and write it
    as a Core ML package at `out`; returns write_coreml's report. Cheap refusals (an existing
    output, a bad suffix or target) come before the source is read."""
    from .api import read_source

    out = Path(out)
    check_output(out, target, force)
    if progress:
        progress(f"reading {Path(src).name}", 0, 0)
    canonical = read_source(Path(src), **options)
    return write_coreml(canonical, out, context=context, target=target, force=force,
                        progress=progress)


def _tensor_report(pkg: Path, weights: dict[str, Encoded], records: dict) -> tuple[dict, dict]:
    """Per-tensor report with bits per weight measured in the package's weight.bin;
    `records` holds each tensor's provenance (source_name, source_type, source_class, note)."""
    from edgert.mil_interpreter import weight_blob_bytes

    blob = weight_blob_bytes(pkg, function="decode")  # op name -> bytes of its blob inputs
    tensors, counts = {}, {}
    total_bytes = total_n = 0
    for name, enc in weights.items():
        rec = records[name]
        n = int(np.prod(enc.shape))
        nbytes = blob.get(_op_name(name), 0)
        tensors[name] = {
            "source_name": rec["source_name"],
            "source_type": rec["source_type"],
            "source_class": rec["source_class"],
            "coreml": enc.description,
            "class": enc.mapping,
            "shape": list(enc.shape),
            "max_abs_error": enc.max_abs_error,
            "bits_per_weight": round(8 * nbytes / max(n, 1), 4),
        }
        if rec["note"]:
            tensors[name]["note"] = rec["note"]
        if nbytes == 0:
            tensors[name]["note"] = "not in weight.bin (inline, or folded away by coremltools)"
        counts[enc.description] = counts.get(enc.description, 0) + 1
        total_bytes += nbytes
        total_n += n
    classes = {}
    for t in tensors.values():
        classes[t["class"]] = classes.get(t["class"], 0) + 1
    summary = {
        "representations": counts,
        "classes": classes,
        "weight_bytes": total_bytes,
        "parameters": total_n,
        "bits_per_weight": round(8 * total_bytes / max(total_n, 1), 4),
        "max_abs_error": max((t["max_abs_error"] for t in tensors.values()), default=0.0),
    }
    return tensors, summary
