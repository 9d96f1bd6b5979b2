"""Which quantized-matmul layouts the current MLX device really runs, and lossless widening.

MLX builds differ: the Linux CPU backend runs 1-bit, the CUDA backend has no 1-bit path (it
raises in qmv, and affine dequantize silently does nothing there), Metal's 1-bit depends on
the MLX version. So before a package's weights are used, each (bits, group size, mode, scale
dtype) it holds is tried once on the current device: a tiny `mx.quantized_matmul` checked
against a reference dequantized in numpy (not with `mx.dequantize`, which may be the broken
part). A layout that fails is widened losslessly: the same codes, scales and biases with more
bits per code (1 -> 2, 3 -> 4, 5/6 -> 8), which dequantizes to the same weights.
"""

from __future__ import annotations

import sys
from functools import lru_cache
from typing import NamedTuple

import mlx.core as mx
import numpy as np

from .bitpack import pack_rows, unpack_rows
from .errors import UnsupportedError

WIDER = {1: (2, 4, 8), 2: (4, 8), 3: (4, 8), 4: (8,), 5: (8,), 6: (8,)}


class Layout(NamedTuple):
    bits: int
    group_size: int
    mode: str
    scale_dtype: str  # "float16", "bfloat16", "float32"


def _quantized_matmul(x, w_q, scales, biases, layout: Layout) -> mx.array:
    return mx.quantized_matmul(x, w_q, scales, biases, transpose=True,
                               group_size=layout.group_size, bits=layout.bits, mode=layout.mode)


@lru_cache(maxsize=None)
def _runs(layout: Layout, device: str) -> bool:
    """Whether `layout` gives the reference result on `device` (one tiny matmul)."""
    rows, cols = 8, 2 * layout.group_size
    rng = np.random.default_rng(0)
    q = rng.integers(0, 1 << layout.bits, size=(rows, cols), dtype=np.uint8)
    s = rng.uniform(0.5, 2.0, size=(rows, 2)).astype(np.float32)
    b = rng.uniform(-1.0, 1.0, size=(rows, 2)).astype(np.float32)
    x = rng.standard_normal((3, cols)).astype(np.float32)
    dt = getattr(mx, layout.scale_dtype)
    s_mx, b_mx = mx.array(s).astype(dt), mx.array(b).astype(dt)
    w = (np.repeat(np.array(s_mx.astype(mx.float32)), layout.group_size, axis=1) * q
         + np.repeat(np.array(b_mx.astype(mx.float32)), layout.group_size, axis=1))
    want = x @ w.T  # (3, rows)
    try:
        got = np.array(_quantized_matmul(mx.array(x), mx.array(pack_rows(q, layout.bits)),
                                         s_mx, b_mx, layout).astype(mx.float32))
    except Exception:  # noqa: BLE001 - any failure of the kernel means "does not run here"
        return False
    return got.shape == want.shape and bool(np.allclose(got, want, rtol=1e-2, atol=1e-2))


def runs(layout: Layout) -> bool:
    """Whether the current default device runs `layout` correctly (probed once per device)."""
    if layout.mode != "affine":
        return True  # other modes (mxfp4, ...) have no lossless widening; let them run or fail
    return _runs(layout, str(mx.default_device()))


def widen_for_device(quantization: dict, weights: dict[str, mx.array]) -> dict:
    """Repack, in `weights`, every quantized module whose layout the device cannot run, into
    the narrowest wider layout it can; returns the updated "quantization" config (per-module
    overrides). Says once, on stderr, what was widened."""
    quantization = dict(quantization)
    default = (quantization["bits"], quantization["group_size"], quantization.get("mode", "affine"))
    widened: dict[Layout, tuple[int, int]] = {}  # layout -> (new bits, modules)
    for key in [k for k in weights if k.endswith(".scales")]:
        module = key.removesuffix(".scales")
        o = quantization.get(module)
        bits, group, mode = ((o["bits"], o["group_size"], o.get("mode", default[2]))
                             if isinstance(o, dict) else default)
        layout = Layout(bits, group, mode, str(weights[key].dtype).removeprefix("mlx.core."))
        if runs(layout):
            continue
        wider = next((w for w in WIDER.get(bits, ()) if runs(layout._replace(bits=w))), None)
        if wider is None:
            raise UnsupportedError(f"this MLX device ({mx.default_device()}) cannot run "
                                   f"{bits}-bit group-{group} {mode} matmuls, nor a wider layout")
        codes = unpack_rows(np.array(weights[f"{module}.weight"]), bits)  # (rows, cols)
        weights[f"{module}.weight"] = mx.array(pack_rows(codes, wider))
        quantization[module] = {"bits": wider, "group_size": group, "mode": mode}
        n = widened.get(layout, (wider, 0))[1]
        widened[layout] = (wider, n + 1)
    for layout, (wider, n) in widened.items():
        print(f"edgert: {mx.default_device()} has no {layout.bits}-bit group-{layout.group_size} "
              f"quantized matmul; {n} layer(s) widened to {wider}-bit (lossless, more memory)",
              file=sys.stderr)
    return quantization
