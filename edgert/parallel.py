"""Quantized matmuls split by output rows across CPU streams.

MLX's CPU backend runs each op on one core, and ops on different streams on different cores.
Splitting a quantized matmul's output rows into shards, one per stream, keeps every row's
arithmetic as it was (the result is bit-identical to `mx.quantized_matmul`) and uses all cores.
Small matmuls are not split: the hand-off between streams costs more than it saves.
"""

from __future__ import annotations

import os
import threading

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_unflatten

_LOCAL = threading.local()  # MLX streams belong to the thread that made them


def cpu_streams(n: int) -> list:
    streams = _LOCAL.__dict__.setdefault("streams", [])
    while len(streams) < n:
        streams.append(mx.new_stream(mx.cpu))
    return streams[:n]


def split_rows(arrays: list[mx.array], n: int) -> list[list[mx.array]]:
    """Shard each (rows, ...) array into n contiguous row blocks (views, no copies)."""
    rows = arrays[0].shape[0]
    bounds = [rows * i // n for i in range(n + 1)]
    return [[a[lo:hi] for a in arrays] for lo, hi in zip(bounds[:-1], bounds[1:])]


def split_quantized_matmul(x: mx.array, shards, group_size: int, bits: int, mode: str,
                           streams) -> mx.array:
    """x (..., K) @ W.T for W given as row shards [(w_q, scales, biases)], one per stream."""
    outs = [mx.quantized_matmul(x, w, s, b, transpose=True, group_size=group_size, bits=bits,
                                mode=mode, stream=st) for (w, s, b), st in zip(shards, streams)]
    return mx.concatenate(outs, axis=-1)


class SplitMatmul:
    """The row-sharded form of one quantized weight, with the policy for when to use it."""

    def __init__(self, module, n: int, min_work: int):
        w, s, b = module.weight, module.scales, module.get("biases")  # no biases in "mxfp4"
        self.shards = [shard + [None] * (b is None) for shard in
                       split_rows([w, s] if b is None else [w, s, b], n)]
        self.streams = cpu_streams(n)
        self.rows, self.cols = w.shape[0], w.shape[1] * 32 // module.bits
        self.min_work = min_work
        self.group_size, self.bits, self.mode = module.group_size, module.bits, module.mode

    def use_for(self, x: mx.array) -> bool:
        return x.size // x.shape[-1] * self.rows * self.cols >= self.min_work

    def __call__(self, x: mx.array) -> mx.array:
        return split_quantized_matmul(x, self.shards, self.group_size, self.bits, self.mode,
                                      self.streams)


def _wrap(cls, q: nn.Module, n: int, min_work: int):
    """A `cls` twin of the quantized module `q` sharing its arrays, with row shards for n streams."""
    new = cls.__new__(cls)
    nn.Module.__init__(new)
    for k, v in q.items():
        new[k] = v
    for attr in ("group_size", "bits", "mode", "num_embeddings", "dims"):
        if hasattr(q, attr):
            setattr(new, attr, getattr(q, attr))
    new._split = SplitMatmul(new, n, min_work)
    new.freeze()
    return new


class SplitQuantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear that splits large matmuls across CPU streams."""

    wrap = classmethod(_wrap)

    def __call__(self, x: mx.array) -> mx.array:
        if not self._split.use_for(x):
            return super().__call__(x)
        y = self._split(x)
        return y + self["bias"] if "bias" in self else y


class SplitQuantizedEmbedding(nn.QuantizedEmbedding):
    """nn.QuantizedEmbedding whose `as_linear` (a tied LM head) splits across CPU streams."""

    wrap = classmethod(_wrap)

    def as_linear(self, x: mx.array) -> mx.array:
        if not self._split.use_for(x):
            return super().as_linear(x)
        return self._split(x)


# Split a matmul when it does at least this many weight x token products. Measured on the CPU
# backend, 2 cores, SmolLM2-135M shapes at one token (bench/RESULTS.md): splitting q/o/MLP/head
# took decode from 9.2 to 12.2 tok/s; also splitting the 192x576 k/v projections lost.
DEFAULT_MIN_WORK = 1 << 17


def parallelize(model: nn.Module, n: int | None = None, min_work: int = DEFAULT_MIN_WORK) -> int:
    """Swap the quantized layers of `model` for their CPU-stream-split twins, in place.
    Only on the CPU backend with more than one core; returns how many layers were swapped."""
    n = n or min(os.cpu_count() or 1, 8)
    if n < 2 or mx.default_device() != mx.cpu:
        return 0
    swaps = []
    for path, m in model.named_modules():
        if isinstance(m, (SplitQuantizedLinear, SplitQuantizedEmbedding)):
            continue
        if isinstance(m, nn.QuantizedLinear):
            swaps.append((path, SplitQuantizedLinear.wrap(m, n, min_work)))
        elif isinstance(m, nn.QuantizedEmbedding):
            swaps.append((path, SplitQuantizedEmbedding.wrap(m, n, min_work)))
    if swaps:
        model.update_modules(tree_unflatten(swaps))
    return len(swaps)
