"""A numpy interpreter for Core ML ML Programs: verifies edgert's `.mlpackage`s without a Mac.

The saved program is loaded back into PyMIL (`coremltools.converters.mil.frontend.milproto`)
and executed op by op; each op is a small numpy kernel in KERNELS. Kernels compute in
float32 and every op's output is rounded to the dtype the program declares for it, so an fp16
program behaves like fp16 storage with fp32 arithmetic inside each op (what Core ML's GPU and
ANE backends do, roughly). Kernels never write into their inputs, so values (states
included) are shared between ops without copies. States persist across `predict` calls of one
session and are shared by all functions, as in one MLState.

    session = InterpreterSession("model.mlpackage")
    out = session.predict("prefill", {"input_ids": ids, "position": pos, "causal_mask": m})

Also here: `weight_blob_bytes` (bytes each weight takes in weight.bin) and
`state_update_violations` (a structural check that every cache update consumes the value the
previous update of that state wrote).
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgert.errors import EdgertError, UnsupportedError

# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


@dataclass
class Package:
    """A loaded `.mlpackage`: its spec, its PyMIL program and the edgert manifest (if any)."""

    path: Path
    spec: Any  # Model_pb2.Model
    program: Any  # coremltools.converters.mil.mil.Program
    manifest: dict = field(default_factory=dict)

    @property
    def functions(self) -> list[str]:
        return list(self.program.functions)


def _spec_path(pkg: Path) -> Path:
    from coremltools.libmodelpackage import ModelPackage

    return Path(ModelPackage(str(pkg)).getRootModel().path())


def load_package(path: str | Path) -> Package:
    """Read a `.mlpackage` (spec, weights, manifest) without loading it into Core ML."""
    from coremltools.converters.mil.frontend.milproto.load import load as load_milproto
    from coremltools.proto import Model_pb2

    path = Path(path)
    if not path.is_dir():
        raise EdgertError(f"{path}: not a .mlpackage folder")
    spec_file = _spec_path(path)
    spec = Model_pb2.Model()
    spec.ParseFromString(spec_file.read_bytes())
    if spec.WhichOneof("Type") != "mlProgram":
        raise UnsupportedError(f"{path}: not an ML Program")
    program = load_milproto(spec, spec.specificationVersion, str(spec_file.parent / "weights"))
    raw = spec.description.metadata.userDefined.get("edgert.manifest")
    return Package(path, spec, program, json.loads(raw) if raw else {})


# ---------------------------------------------------------------------------------------------
# Decompression (shared with the writer, which reports errors with these)
# ---------------------------------------------------------------------------------------------


def _repeat_blocks(a: np.ndarray, shape: tuple) -> np.ndarray:
    """Expand per-block values (one per block along each axis) to `shape`."""
    for axis, (n, nb) in enumerate(zip(shape, a.shape)):
        if n != nb:
            a = np.repeat(a, n // nb, axis=axis)
    return a


def shift_scale(data: np.ndarray, scale: np.ndarray, offset: np.ndarray | None) -> np.ndarray:
    """constexpr_blockwise_shift_scale: scale * (data - offset), per block, in scale's dtype
    (each step rounded to it, as coremltools' reference decompression does)."""
    out_dtype = scale.dtype
    d = data.astype(out_dtype)
    if offset is not None:
        d = (d.astype(np.float32) - _repeat_blocks(offset, data.shape).astype(np.float32))
        d = d.astype(out_dtype)
    s = _repeat_blocks(scale, data.shape)
    return (s.astype(np.float32) * d.astype(np.float32)).astype(out_dtype)


def lut_to_dense(indices: np.ndarray, lut: np.ndarray,
                 vector_axis: int | None = None) -> np.ndarray:
    """constexpr_lut_to_dense (scalar palettes): lut (*blocks, 2**bits, 1), one palette per
    block of `indices`."""
    if lut.shape[-1] != 1:
        raise UnsupportedError("vector palettization (lut vector size > 1)")
    rank = indices.ndim
    block_ids = []
    for axis in range(rank):
        n, nb = indices.shape[axis], lut.shape[axis]
        ids = np.arange(n) // (n // nb)
        block_ids.append(ids.reshape([-1 if a == axis else 1 for a in range(rank)]))
    return lut[(*block_ids, indices.astype(np.intp), 0)]


# ---------------------------------------------------------------------------------------------
# Kernels: op_type -> f(args) where args are the op's inputs as numpy values
# (fp16 inputs arrive as float32; outputs are rounded to the declared dtype afterwards)
# ---------------------------------------------------------------------------------------------

KERNELS: dict[str, Callable[..., Any]] = {}
RAW_DTYPE_OPS = set()  # kernels that see their inputs' stored dtypes (decompression, moves)


def kernel(*names: str, raw: bool = False):
    def register(fn):
        for n in names:
            KERNELS[n] = fn
            if raw:
                RAW_DTYPE_OPS.add(n)
        return fn

    return register


_BINARY = {
    "add": np.add, "sub": np.subtract, "mul": np.multiply, "real_div": np.divide,
    "maximum": np.maximum, "minimum": np.minimum, "pow": np.power,
    "floor_div": np.floor_divide, "mod": np.mod,
    "equal": np.equal, "not_equal": np.not_equal, "less": np.less, "less_equal": np.less_equal,
    "greater": np.greater, "greater_equal": np.greater_equal,
    "logical_and": np.logical_and, "logical_or": np.logical_or, "logical_xor": np.logical_xor,
}
for _name, _fn in _BINARY.items():
    KERNELS[_name] = (lambda f: lambda x, y: f(x, y))(_fn)

_UNARY = {
    "abs": np.abs, "sqrt": np.sqrt, "exp": np.exp, "square": np.square, "sign": np.sign,
    "ceil": np.ceil, "floor": np.floor, "round": np.round, "tanh": np.tanh, "sin": np.sin,
    "cos": np.cos, "logical_not": np.logical_not, "identity": lambda x: x,
    "relu": lambda x: np.maximum(x, 0), "sigmoid": lambda x: 1 / (1 + np.exp(-x)),
    "silu": lambda x: x / (1 + np.exp(-x)), "softplus": lambda x: np.logaddexp(0, x),
}
for _name, _fn in _UNARY.items():
    KERNELS[_name] = (lambda f: lambda x: f(x))(_fn)


@kernel("rsqrt")
def _rsqrt(x, epsilon=1e-12):
    return 1 / np.sqrt(x + epsilon)


@kernel("inverse")
def _inverse(x, epsilon=1e-4):
    return 1 / (x + epsilon)


@kernel("log")
def _log(x, epsilon=1e-45):
    return np.log(x + epsilon)


@kernel("clip")
def _clip(x, alpha, beta):
    return np.clip(x, alpha, beta)


@kernel("gelu")
def _gelu(x, mode="EXACT"):
    if mode == "EXACT":
        from math import erf

        return 0.5 * x * (1 + np.vectorize(erf)(x / math.sqrt(2)))
    if mode == "TANH_APPROXIMATION":
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    return x / (1 + np.exp(-1.702 * x))  # SIGMOID_APPROXIMATION


def _axes(axes):
    return None if axes is None else tuple(int(a) for a in np.atleast_1d(axes))


_REDUCE = {"reduce_mean": np.mean, "reduce_sum": np.sum, "reduce_max": np.max,
           "reduce_min": np.min, "reduce_prod": np.prod}
for _name, _fn in _REDUCE.items():
    KERNELS[_name] = (lambda f: lambda x, axes=None, keep_dims=False:
                      f(x, axis=_axes(axes), keepdims=bool(keep_dims)))(_fn)


@kernel("reduce_sum_square")
def _reduce_sum_square(x, axes=None, keep_dims=False):
    return np.sum(x * x, axis=_axes(axes), keepdims=bool(keep_dims))


@kernel("reduce_argmax")
def _argmax(x, axis=-1, keep_dims=False, output_dtype="int32"):
    r = np.argmax(x, axis=int(axis))
    return np.expand_dims(r, int(axis)) if keep_dims else r


@kernel("softmax")
def _softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=int(axis), keepdims=True))
    return e / e.sum(axis=int(axis), keepdims=True)


@kernel("linear")
def _linear(x, weight, bias=None):
    y = x @ weight.T
    return y if bias is None else y + bias


@kernel("matmul")
def _matmul(x, y, transpose_x=False, transpose_y=False):
    if transpose_x:
        x = np.swapaxes(x, -1, -2)
    if transpose_y:
        y = np.swapaxes(y, -1, -2)
    return np.matmul(x, y)


@kernel("scaled_dot_product_attention")
def _sdpa(query, key, value, attn_mask=None):
    """softmax(q k^T / sqrt(E) + mask) v; a bool mask marks the keys that take part."""
    scores = np.matmul(query, np.swapaxes(key, -1, -2)) / np.sqrt(query.shape[-1])
    if attn_mask is not None:
        scores = (np.where(attn_mask, scores, -np.inf) if attn_mask.dtype == bool
                  else scores + attn_mask)
    return np.matmul(_softmax(scores, -1), value)


@kernel("layer_norm")
def _layer_norm(x, axes, gamma=None, beta=None, epsilon=1e-5):
    ax = _axes(axes)
    mean = x.mean(axis=ax, keepdims=True)
    var = ((x - mean) ** 2).mean(axis=ax, keepdims=True)
    y = (x - mean) / np.sqrt(var + epsilon)
    if gamma is not None:
        y = y * gamma
    return y if beta is None else y + beta


@kernel("gather", raw=True)  # moves data: no upcast
def _gather(x, indices, axis=0, batch_dims=0, validate_indices=False):
    if batch_dims:
        raise UnsupportedError("gather with batch_dims")
    axis = int(axis)
    idx = np.asarray(indices).astype(np.int64)
    idx = np.where(idx < 0, idx + x.shape[axis], idx)
    return np.take(x, idx, axis=axis)


@kernel("gather_along_axis", raw=True)  # moves data: no upcast
def _gather_along_axis(x, indices, axis=0):
    return np.take_along_axis(x, np.asarray(indices).astype(np.int64), axis=int(axis))


@kernel("reshape", raw=True)  # moves data: no upcast
def _reshape(x, shape):
    shape = [int(s) for s in shape]
    # iOS17: a 0 copies the input dim aligned from the right
    for i, s in enumerate(shape):
        if s == 0:
            j = x.ndim - (len(shape) - i)
            shape[i] = x.shape[j] if 0 <= j < x.ndim else 1
    return x.reshape(shape)


@kernel("transpose", raw=True)  # moves data: no upcast
def _transpose(x, perm):
    return np.transpose(x, [int(p) for p in perm])


@kernel("concat", raw=True)  # moves data: no upcast
def _concat(values, axis, interleave=False):
    if interleave:
        raise UnsupportedError("concat with interleave")
    return np.concatenate([np.asarray(v) for v in values], axis=int(axis))


@kernel("split", raw=True)  # moves data: no upcast
def _split(x, axis, num_splits=None, split_sizes=None):
    axis = int(axis)
    if split_sizes is not None:
        return tuple(np.split(x, np.cumsum(split_sizes)[:-1], axis=axis))
    return tuple(np.split(x, int(num_splits), axis=axis))


def _slices(shape, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    """numpy index tuple for slice_by_index / slice_update, plus the axes to squeeze."""
    rank = len(shape)
    stride = [1] * rank if stride is None else [int(s) for s in stride]
    index, squeeze = [], []
    for a in range(rank):
        if squeeze_mask is not None and squeeze_mask[a]:
            b = int(begin[a])
            b = b + shape[a] if b < 0 else b
            index.append(slice(b, b + 1))
            squeeze.append(a)
            continue
        b = None if begin_mask is not None and begin_mask[a] else int(begin[a])
        e = None if end_mask is not None and end_mask[a] else int(end[a])
        index.append(slice(b, e, stride[a]))
    return tuple(index), tuple(squeeze)


@kernel("slice_by_index", raw=True)  # moves data: no upcast
def _slice_by_index(x, begin, end, stride=None, begin_mask=None, end_mask=None, squeeze_mask=None):
    index, squeeze = _slices(x.shape, begin, end, stride, begin_mask, end_mask, squeeze_mask)
    y = x[index]
    return np.squeeze(y, axis=squeeze) if squeeze else y


@kernel("slice_by_size", raw=True)  # moves data: no upcast
def _slice_by_size(x, begin, size):
    index = tuple(slice(int(b), None if int(s) == -1 else int(b) + int(s))
                  for b, s in zip(begin, size))
    return x[index]


@kernel("slice_update", raw=True)  # moves data: no upcast
def _slice_update(x, update, begin, end, stride=None, begin_mask=None, end_mask=None,
                  squeeze_mask=None):
    index, _ = _slices(x.shape, begin, end, stride, begin_mask, end_mask, squeeze_mask)
    y = np.array(x, copy=True)
    y[index] = np.reshape(update, y[index].shape)
    return y


@kernel("expand_dims", raw=True)  # moves data: no upcast
def _expand_dims(x, axes):
    return np.expand_dims(x, tuple(int(a) for a in axes))


@kernel("squeeze", raw=True)  # moves data: no upcast
def _squeeze(x, axes=None):
    return np.squeeze(x, axis=_axes(axes))


@kernel("tile", raw=True)  # moves data: no upcast
def _tile(x, reps):
    return np.tile(x, [int(r) for r in reps])


@kernel("shape", raw=True)  # moves data: no upcast
def _shape(x):
    return np.array(x.shape, np.int32)


@kernel("fill")
def _fill(shape, value=0.0):
    return np.full([int(s) for s in shape], value)


@kernel("fill_like")
def _fill_like(ref_tensor, value=0.0):
    return np.full(ref_tensor.shape, value)


@kernel("range_1d")
def _range_1d(start, end, step):
    return np.arange(start, end, step)


@kernel("cumsum")
def _cumsum(x, axis=0, exclusive=False, reverse=False):
    axis = int(axis)
    y = np.flip(x, axis) if reverse else x
    c = np.cumsum(y, axis=axis)
    if exclusive:
        c = c - y
    return np.flip(c, axis) if reverse else c


@kernel("select", raw=True)  # moves data: no upcast
def _select(cond, a, b):
    return np.where(cond, a, b)


@kernel("cast")
def _cast(x, dtype):
    return x  # the output is rounded to the declared dtype by the interpreter


@kernel("constexpr_blockwise_shift_scale", raw=True)
def _constexpr_shift_scale(data, scale, offset=None):
    return shift_scale(data, scale, offset)


@kernel("constexpr_lut_to_dense", raw=True)
def _constexpr_lut(indices, lut, vector_axis=None):
    return lut_to_dense(indices, lut, vector_axis)


@kernel("constexpr_cast", raw=True)
def _constexpr_cast(source_val, output_dtype):
    return source_val


@kernel("constexpr_affine_dequantize", raw=True)
def _constexpr_affine(quantized_data, zero_point, scale, axis):
    shape = [1] * quantized_data.ndim
    shape[int(axis)] = -1
    zp = np.reshape(zero_point, shape) if np.ndim(zero_point) else zero_point
    sc = np.reshape(scale, shape) if np.ndim(scale) else scale
    return (sc.astype(np.float32) * (quantized_data.astype(np.float32) - zp)).astype(scale.dtype)


# ---------------------------------------------------------------------------------------------
# Interpreter
# ---------------------------------------------------------------------------------------------


def _np_dtype(builtin) -> np.dtype:
    from coremltools.converters.mil.mil import types

    return np.dtype(types.nptype_from_builtin(builtin))


@dataclass
class _StateRef:
    name: str


class InterpreterSession:
    """Runs the functions of one package with persistent states (like an MLState)."""

    def __init__(self, package: str | Path | Package):
        self.package = package if isinstance(package, Package) else load_package(package)
        self.states: dict[str, np.ndarray] = {}
        self._constants: dict[tuple[str, str], Any] = {}  # (function, var) -> value
        self._constants_f32: dict[int, np.ndarray] = {}  # id(fp16 constant) -> upcast once
        self._by_op: dict[str, tuple[list, np.ndarray]] = {}  # op name -> (inputs, value)
        self.reset()

    def _const_inputs(self, op, env: dict) -> list:
        return [env[v.name] if v.name in env else v.val
                for v in op.inputs.values() if not isinstance(v, (list, tuple))]

    def _shared_constexpr(self, op, env: dict):
        """The value another function already decompressed for an op of the same name and
        identical inputs (multifunction packages share weights), else None."""
        hit = self._by_op.get(op.outputs[0].name)
        if hit is None:
            return None
        mine = self._const_inputs(op, env)
        same = len(mine) == len(hit[0]) and all(
            np.shape(a) == np.shape(b) and np.asarray(a).dtype == np.asarray(b).dtype
            and np.array_equal(a, b) for a, b in zip(mine, hit[0]))
        return hit[1] if same else None

    def reset(self) -> None:
        """Zero every state (a fresh MLState)."""
        self.states = self.make_state()

    def make_state(self) -> dict[str, np.ndarray]:
        """A fresh set of zeroed states (name -> array), like `MLModel.make_state()`: pass it
        to `predict(..., state=)` to keep several conversations apart."""
        from coremltools.converters.mil.mil import types

        states = {}
        for func in self.package.program.functions.values():
            for name, var in func.inputs.items():
                if types.is_state(var.sym_type):
                    t = var.sym_type.wrapped_type()
                    states[name] = np.zeros(t.get_shape(), _np_dtype(t.get_primitive()))
        return states

    def predict(self, function: str, inputs: dict[str, np.ndarray],
                state: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
        """Run `function` on `inputs`; returns its outputs by name, updating the states
        (`state` from make_state(), else the session's own)."""
        if state is None:
            return self._predict(function, inputs)
        saved, self.states = self.states, state
        try:
            return self._predict(function, inputs)
        finally:
            state.update(self.states)
            self.states = saved

    def _predict(self, function: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from coremltools.converters.mil.mil import types

        try:
            func = self.package.program.functions[function]
        except KeyError:
            raise EdgertError(f"no function {function!r} (has {self.package.functions})") from None
        env: dict[str, Any] = {}
        for name, var in func.inputs.items():
            if types.is_state(var.sym_type):
                env[var.name] = _StateRef(name)
                continue
            if name not in inputs:
                raise EdgertError(f"{function}: missing input {name!r}")
            value = np.asarray(inputs[name]).astype(_np_dtype(var.dtype))
            _check_shape(function, name, value.shape, var.shape)
            env[var.name] = value
        for op in func.operations:
            self._run(function, op, env)
        return {v.name: env[v.name] for v in func.outputs}

    def _run(self, function: str, op, env: dict) -> None:
        t = op.op_type
        outs = op.outputs
        if t == "const" or t.startswith("constexpr_"):
            key = (function, outs[0].name)
            if key not in self._constants:
                if t == "const":
                    value = outs[0].val
                elif (shared := self._shared_constexpr(op, env)) is not None:
                    value = shared
                else:
                    value = self._call(function, op, env, raw=True)
                self._constants[key] = np.asarray(value).astype(_np_dtype(outs[0].dtype),
                                                                copy=False)
                self._by_op[outs[0].name] = (self._const_inputs(op, env), self._constants[key])
            env[outs[0].name] = self._constants[key]
            return
        if t == "while_loop":
            self._while_loop(function, op, env)
            return
        if t == "read_state":  # kernels never write into their inputs: aliasing is safe
            env[outs[0].name] = self.states[env[op.inputs["input"].name].name]
            return
        if t in ("coreml_update_state", "write_state"):
            state = op.inputs["state" if t == "coreml_update_state" else "input"]
            value = env[op.inputs["value" if t == "coreml_update_state" else "data"].name]
            name = env[state.name].name
            self.states[name] = value.astype(self.states[name].dtype, copy=False)
            if outs:
                env[outs[0].name] = self.states[name]
            return
        result = self._call(function, op, env, raw=t in RAW_DTYPE_OPS)
        results = result if isinstance(result, tuple) else (result,)
        for var, value in zip(outs, results):
            env[var.name] = np.asarray(value).astype(_np_dtype(var.dtype), copy=False)

    def _while_loop(self, function: str, op, env: dict) -> None:
        """while_loop: its cond block, then its body block, on the loop variables, until the
        cond block gives false; the op's outputs are the last loop variables."""
        cond, body = op.blocks
        values = [env[v.name] if v.name in env else v.val for v in op.inputs["loop_vars"]]
        while True:
            for block in (cond, body):
                for var, value in zip(block.inputs, values):
                    env[var.name] = value
                for inner in block.operations:
                    self._run(function, inner, env)
                if block is cond and not bool(np.asarray(env[cond.outputs[0].name])):
                    for var, value in zip(op.outputs, values):
                        env[var.name] = value
                    return
            values = [env[v.name] for v in body.outputs]

    def _call(self, function: str, op, env: dict, raw: bool):
        fn = KERNELS.get(op.op_type)
        if fn is None:
            raise UnsupportedError(f"the interpreter has no kernel for {op.op_type!r}")

        def value(var):
            v = env[var.name] if var.name in env else var.val
            if not raw and isinstance(v, np.ndarray) and v.dtype == np.float16:
                const = self._constants.get((function, var.name))
                if const is None:
                    return v.astype(np.float32)
                if id(const) not in self._constants_f32:  # shared by functions: upcast once
                    self._constants_f32[id(const)] = v.astype(np.float32)
                return self._constants_f32[id(const)]
            if not raw and isinstance(v, np.float16):
                return np.float32(v)
            return v

        args = {}
        for name, var in op.inputs.items():
            args[name] = [value(v) for v in var] if isinstance(var, (list, tuple)) else value(var)
        return fn(**args)


def _check_shape(function: str, name: str, got: tuple, declared: tuple) -> None:
    from coremltools.converters.mil.mil.types.symbolic import is_symbolic

    ok = len(got) == len(declared) and all(
        is_symbolic(d) or int(d) == g for g, d in zip(got, declared))
    if not ok:
        raise EdgertError(f"{function}: input {name!r} has shape {got}, expected {declared}")


# ---------------------------------------------------------------------------------------------
# Package inspection
# ---------------------------------------------------------------------------------------------


def weight_blob_bytes(path: str | Path, function: str | None = None) -> dict[str, int]:
    """Bytes in weight.bin behind each const / constexpr op of `function` (default: the first),
    constexpr chains summed into their last op. Keys are op output names."""
    from coremltools.proto import Model_pb2

    spec_file = _spec_path(Path(path))
    spec = Model_pb2.Model()
    spec.ParseFromString(spec_file.read_bytes())
    funcs = spec.mlProgram.functions
    func = funcs[function or next(iter(funcs))]
    block = func.block_specializations[func.opset]

    def nbytes(value) -> int:  # from the blob's 16-byte header: sentinel, dtype, size
        if value.WhichOneof("value") != "blobFileValue":
            return 0
        off = value.blobFileValue.offset
        blob.seek(off)
        header = blob.read(16)
        sentinel, _dtype, size = struct.unpack("<IIQ", header) if len(header) == 16 else (0,) * 3
        if sentinel != 0xDEADBEEF:
            raise EdgertError(f"{path}: weight.bin has no blob at offset {off}")
        return size

    sizes: dict[str, int] = {}
    with open(spec_file.parent / "weights" / "weight.bin", "rb") as blob:  # headers only
        for op in block.operations:
            if op.type == "const":
                sizes[op.outputs[0].name] = nbytes(op.attributes["val"])
            elif op.type.startswith("constexpr_"):
                total = 0
                for arg in op.inputs.values():
                    for a in arg.arguments:
                        total += nbytes(a.value) if a.HasField("value") else sizes.get(a.name, 0)
                sizes[op.outputs[0].name] = total
    return sizes


def state_update_violations(package: Package, function: str) -> list[str]:
    """Every `slice_update` whose input comes from a state must consume that state's latest
    value: the first `read_state` before any write, else the output of the state's most recent
    `coreml_update_state` (or a `read_state` after its most recent `write_state`). Returns one
    line per violation (a stale read loses the earlier layers' cache writes)."""
    func = package.program.functions[function]
    version: dict[str, int] = {}
    origin: dict[str, tuple[str, int]] = {}  # var -> (state, version it holds)
    problems = []
    for op in func.operations:
        t = op.op_type
        if t == "read_state":
            s = op.inputs["input"].name
            origin[op.outputs[0].name] = (s, version.get(s, 0))
        elif t == "coreml_update_state":
            s = op.inputs["state"].name
            version[s] = version.get(s, 0) + 1
            origin[op.outputs[0].name] = (s, version[s])
        elif t == "write_state":
            s = op.inputs["input"].name
            version[s] = version.get(s, 0) + 1
        elif t == "slice_update" and op.inputs["x"].name in origin:
            s, v = origin[op.inputs["x"].name]
            if v != version.get(s, 0):
                problems.append(f"{op.name}: updates {s} version {v}, "
                                f"but version {version[s]} was written since")
    return problems


def count_ops(package: Package, function: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for op in package.program.functions[function].operations:
        counts[op.op_type] = counts.get(op.op_type, 0) + 1
    return counts
