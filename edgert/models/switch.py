"""Routed experts: E linear layers stacked as one (E, out, in) weight, applied to each token's
top-k experts with `mx.gather_mm` (float) or `mx.gather_qmm` (quantized). Shared by the MoE
architectures; the parameter names (`switch_mlp.{gate,up,down}_proj.weight`) are mlx-lm's, so
both load the same package.

For prefill, tokens are sorted by expert first (`sorted_indices=True` lets the kernels walk
each expert's weights once); `SwitchGLU.sort_min` says from how many (token, expert) pairs on.
Sorting changes the order of the work, not the arithmetic: the results are the same.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from ..errors import EdgertError


def sort_by_expert(x: mx.array, indices: mx.array):
    """x (..., 1, 1, D), indices (..., k) -> x rows (N*k, 1, D) in expert order, their
    experts (N*k,) and the inverse permutation."""
    k = indices.shape[-1]
    flat = indices.flatten()
    order = mx.argsort(flat)
    return x.flatten(0, -3)[order // k], flat[order], mx.argsort(order)


def unsort(y: mx.array, inverse: mx.array, shape: tuple) -> mx.array:
    """(N*k, 1, D) in expert order -> (..., k, 1, D) in token order."""
    return mx.unflatten(y[inverse], 0, shape)


class SwitchLinear(nn.Module):
    """E float linear layers: weight (E, out, in), optional bias (E, out)."""

    def __init__(self, input_dims: int, output_dims: int, num_experts: int, bias: bool = False):
        super().__init__()
        scale = math.sqrt(1 / input_dims)
        self.weight = mx.random.uniform(-scale, scale, (num_experts, output_dims, input_dims))
        if bias:
            self.bias = mx.zeros((num_experts, output_dims))

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        """x (..., 1, in) rows, indices (...) expert of each -> (..., 1, out)."""
        y = mx.gather_mm(x, self["weight"].swapaxes(-1, -2), rhs_indices=indices,
                         sorted_indices=sorted_indices)
        if "bias" in self:
            y = y + mx.expand_dims(self["bias"][indices], -2)
        return y

    def to_quantized(self, group_size: int = 64, bits: int = 4, mode: str = "affine"):
        """The quantized form (nn.quantize calls this); weights are replaced at load."""
        return QuantizedSwitchLinear.from_float(self, group_size, bits, mode)


class QuantizedSwitchLinear(nn.Module):
    """E quantized linear layers: weight (E, out, in * bits / 32) uint32, scales and biases
    (E, out, in / group_size) (no biases in mode "mxfp4"), optional bias (E, out)."""

    def __init__(self, weight: mx.array, group_size: int, bits: int, mode: str = "affine",
                 bias: mx.array | None = None):
        super().__init__()
        self.group_size, self.bits, self.mode = group_size, bits, mode
        self.weight, self.scales, *biases = mx.quantize(weight, group_size, bits, mode=mode)
        if biases:
            self.biases = biases[0]
        if bias is not None:
            self.bias = bias
        self.freeze()

    @classmethod
    def from_float(cls, layer: SwitchLinear, group_size: int, bits: int, mode: str = "affine"):
        return cls(layer.weight, group_size, bits, mode, layer.get("bias"))

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        y = mx.gather_qmm(x, self["weight"], self["scales"], self.get("biases"),
                          rhs_indices=indices, transpose=True, group_size=self.group_size,
                          bits=self.bits, mode=self.mode, sorted_indices=sorted_indices)
        if "bias" in self:
            y = y + mx.expand_dims(self["bias"][indices], -2)
        return y


def swiglu(gate: mx.array, up: mx.array) -> mx.array:
    return nn.silu(gate) * up


class SwitchGLU(nn.Module):
    """The experts of a SwiGLU MoE layer: down(act(gate(x)) * up(x)) per selected expert."""

    sort_min = 64  # sort tokens by expert from this many (token, expert) pairs on

    def __init__(self, input_dims: int, hidden_dims: int, num_experts: int,
                 activation=swiglu, bias: bool = False):
        super().__init__()
        self.gate_proj = SwitchLinear(input_dims, hidden_dims, num_experts, bias)
        self.up_proj = SwitchLinear(input_dims, hidden_dims, num_experts, bias)
        self.down_proj = SwitchLinear(hidden_dims, input_dims, num_experts, bias)
        self.activation = activation

    def __call__(self, x: mx.array, indices: mx.array) -> mx.array:
        """x (..., D), indices (..., k) -> (..., k, D): each selected expert's output."""
        x = mx.expand_dims(x, (-2, -3))  # (..., 1, 1, D)
        indices = mx.stop_gradient(indices)
        do_sort = indices.size >= self.sort_min
        idx, inverse = indices, None
        if do_sort:
            x, idx, inverse = sort_by_expert(x, indices)  # (N*k, 1, D), (N*k,)
        h = self.activation(self.gate_proj(x, idx, do_sort), self.up_proj(x, idx, do_sort))
        y = self.down_proj(h, idx, do_sort)  # (..., k, 1, D) or (N*k, 1, D)
        if do_sort:
            y = unsort(y, inverse, indices.shape)
        return y.squeeze(-2)


def topk_softmax(logits: mx.array, k: int, normalize: bool) -> tuple[mx.array, mx.array]:
    """Softmax router: (..., E) logits -> (experts (..., k), weights (..., k)), weights the
    softmax probabilities of the k largest (renormalized to sum 1 if `normalize`)."""
    probs = mx.softmax(logits.astype(mx.float32), axis=-1, precise=True)
    inds = mx.stop_gradient(mx.argpartition(probs, kth=-k, axis=-1)[..., -k:])
    scores = mx.take_along_axis(probs, inds, axis=-1)
    if normalize:
        scores = scores / scores.sum(axis=-1, keepdims=True)
    return inds, scores


def check_experts(num_experts: int, top_k: int, top_k_name: str = "num_experts_per_tok") -> None:
    """One-line errors for an impossible routing configuration (`top_k_name`: the config's
    name for k)."""
    if num_experts <= 0:
        raise EdgertError(f"num_experts must be positive (got {num_experts})")
    if not 0 < top_k <= num_experts:
        raise EdgertError(f"{top_k_name} {top_k} must be between 1 and the expert "
                          f"count {num_experts}")


def fused_gate_up(base: str, leaf: str):
    """HF fused experts under `base` (a switch_mlp / switch_glu): (package names, split) for
    `down_proj` as it is, or `gate_up_proj` (E, 2I, H) as its gate then up halves."""
    import numpy as np

    if leaf == "down_proj":
        return [f"{base}.down_proj.weight"], lambda w: [w]
    return ([f"{base}.gate_proj.weight", f"{base}.up_proj.weight"],
            lambda w: np.split(w, 2, axis=-2))
