"""KV cache, pre-allocated in steps rather than concatenated each token."""

from __future__ import annotations

import mlx.core as mx

from .base import causal_mask


class KVCache:
    step = 256

    def __init__(self):
        self.keys = None  # (B, n_kv, capacity, D)
        self.values = None
        self.offset = 0

    def reserve(self, n: int, keys: mx.array, values: mx.array) -> None:
        """Grow the buffers (in steps of `step` positions) so that n more positions fit;
        `keys`/`values` give batch, heads, head dims and dtype."""
        prev = self.offset
        if self.keys is not None and prev + n <= self.keys.shape[2]:
            return
        B, n_kv, _, k_dim = keys.shape
        v_dim = values.shape[3]
        grow = ((n + self.step - 1) // self.step) * self.step
        new_k = mx.zeros((B, n_kv, grow, k_dim), keys.dtype)
        new_v = mx.zeros((B, n_kv, grow, v_dim), values.dtype)
        if self.keys is not None:
            self.keys = mx.concatenate([self.keys[..., :prev, :], new_k], axis=2)
            self.values = mx.concatenate([self.values[..., :prev, :], new_v], axis=2)
        else:
            self.keys, self.values = new_k, new_v

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Append (B, n_kv, L, D) keys/values; return the valid (B, n_kv, offset, D) views."""
        prev = self.offset
        self.reserve(keys.shape[2], keys, values)
        self.offset += keys.shape[2]
        self.keys[..., prev:self.offset, :] = keys
        self.values[..., prev:self.offset, :] = values
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]

    def make_mask(self, n_new: int):
        """The attention mask for n_new positions written next (None for a single one)."""
        return causal_mask(n_new, self.offset) if n_new > 1 else None

    @property
    def state(self):
        return self.keys, self.values

    def trim(self, n: int) -> int:
        """Drop the last n positions (used to rewind a chat turn)."""
        n = min(self.offset, n)
        self.offset -= n
        return n

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.nbytes + self.values.nbytes


class PositionedKV:
    """One layer's KV buffers inside a compiled decode step. The write position is an array
    (so one trace serves every position); attention sees the whole capacity, with the
    positions not written yet masked out. Masked positions add exact zeros, so the result is
    bit-identical to attending over the written prefix."""

    def __init__(self, keys: mx.array, values: mx.array, offset: mx.array):
        self.keys, self.values = keys, values  # (B, n_kv, capacity, D)
        self.offset = offset  # () int32: where the next position goes

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        self.keys = mx.slice_update(self.keys, keys, self.offset, axes=(2,))
        self.values = mx.slice_update(self.values, values, self.offset, axes=(2,))
        return self.keys, self.values

    def make_mask(self, n_new: int) -> mx.array:
        if n_new != 1:
            raise ValueError("PositionedKV serves one-token decode steps only")
        return (mx.arange(self.keys.shape[2]) <= self.offset)[None]  # (1, capacity)


def make_cache(model) -> list[KVCache]:
    if hasattr(model, "make_cache"):
        return model.make_cache()
    return [KVCache() for _ in model.layers]
