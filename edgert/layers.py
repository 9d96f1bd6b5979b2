"""Quantized layers that carry per-module data beyond MLX's (weight, scales, biases).

- `PermutedQuantizedLinear`: GPTQ act-order. The converter sorted the input columns by group
  (MLX groups are contiguous) and stored the order as `<module>.input_perm`; the layer takes
  `x[..., input_perm]` before the quantized matmul.
- `BitLinear`: BitNet b1.58 as transformers runs it: per-token absmax int8 activations, ternary
  weights stored as MLX 2-bit (scale 1, bias -1), output scaled by `<module>.weight_scale`.

The loader turns a quantized Linear into one of these when the package has the extra tensor
(`swap_layers`), the same way a `.scales` tensor makes a Linear quantized.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten


class _QuantizedMatmul(nn.Module):
    """The parameters and matmul of an nn.QuantizedLinear, without being one (so that
    edgert.parallel, which swaps nn.QuantizedLinear layers, leaves these alone)."""

    def __init__(self, q: nn.QuantizedLinear):
        super().__init__()
        self.group_size, self.bits, self.mode = q.group_size, q.bits, q.mode
        for k, v in q.items():  # weight, scales, biases, bias
            if isinstance(v, mx.array):
                self[k] = v

    def matmul(self, x: mx.array) -> mx.array:
        return mx.quantized_matmul(x, self["weight"], self["scales"], self.get("biases"),
                                   transpose=True, group_size=self.group_size, bits=self.bits,
                                   mode=self.mode)

    def add_bias(self, y: mx.array) -> mx.array:
        return y + self["bias"] if "bias" in self else y


class PermutedQuantizedLinear(_QuantizedMatmul):
    """y = W' x[..., input_perm] + bias, W' the quantized weight with permuted input columns."""

    def __init__(self, q: nn.QuantizedLinear, input_perm: mx.array):
        super().__init__(q)
        self.input_perm = input_perm  # (in,) uint32
        self.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        return self.add_bias(self.matmul(mx.take(x, self.input_perm, axis=-1)))


class BitLinear(_QuantizedMatmul):
    """transformers' BitLinear / AutoBitLinear (offline) forward, op for op.

    scale = 127 / max(|x|) per token (at least 1e-5); x_q = clip(round(x * scale), -128, 127);
    "divide" (BitLinear): y = (x_q @ W.T) / (weight_scale * scale) + bias;
    "multiply" (AutoBitLinear): y = ((x_q / scale) @ W.T + bias) * weight_scale.
    x_q is integer-valued and W ternary, so the matmul is exact in float32 (|sums| < 2**24).
    """

    def __init__(self, q: nn.QuantizedLinear, weight_scale: mx.array, activation_bits: int = 8,
                 weight_scale_op: str = "divide"):
        super().__init__(q)
        if weight_scale_op not in ("divide", "multiply"):
            raise ValueError(f"weight_scale_op {weight_scale_op!r}")
        self.weight_scale = weight_scale  # (1,)
        self.activation_bits, self.weight_scale_op = activation_bits, weight_scale_op
        self.freeze()

    def __call__(self, x: mx.array) -> mx.array:
        qmax = 2 ** (self.activation_bits - 1) - 1
        # qmax / absmax evaluated as torch does it (reciprocal, then multiply), so that x_q is
        # transformers' bit for bit
        scale = qmax * mx.reciprocal(mx.maximum(mx.abs(x).max(axis=-1, keepdims=True), 1e-5))
        x_q = mx.clip(mx.round(x * scale), -qmax - 1, qmax)
        if self.weight_scale_op == "divide":
            y = self.add_bias(self.matmul(x_q) / (self.weight_scale * scale))
        else:
            y = self.add_bias(self.matmul(x_q / scale)) * self.weight_scale
        return y.astype(x.dtype)


def swap_layers(model: nn.Module, weights: dict[str, mx.array], config: dict) -> int:
    """Replace quantized Linear layers whose package tensors say so, in place: `<path>.input_perm`
    -> PermutedQuantizedLinear, `<path>.weight_scale` -> BitLinear (its activation bits and
    weight-scale op from config["bitnet"]). Call after quantizing, before loading the weights;
    returns how many layers were replaced."""
    bitnet = config.get("bitnet", {})
    swaps = []
    for path, m in model.named_modules():
        if not isinstance(m, nn.QuantizedLinear):
            continue
        if (perm := weights.get(f"{path}.input_perm")) is not None:
            swaps.append((path, PermutedQuantizedLinear(m, perm)))
        elif (ws := weights.get(f"{path}.weight_scale")) is not None:
            swaps.append((path, BitLinear(m, ws, bitnet.get("activation_bits", 8),
                                          bitnet.get("weight_scale", "divide"))))
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    return len(swaps)
