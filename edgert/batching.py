"""Batched decode for the server: several requests' next tokens computed in one model call.

Each request is prefilled on its own (through the prefix cache, as before); its KV cache then
joins a `Batch`, whose per-layer `BatchKVCache`s hold every row's keys and values aligned at
the right (left padding): row b's positions fill columns `left[b] .. end - 1`. A decode step
feeds (B, 1) tokens; each row's rope position is its own (`offset`, a (B,) array) and its mask
hides the padding, so each row's logits are those it gets alone (up to the rounding of a
batched matmul). Rows join and leave between steps without touching the other rows' values.

Only models whose caches are all plain `KVCache` and whose attention takes its mask from the
cache (`compiled_decode`) are batched; see `batchable`.
"""

from __future__ import annotations

import mlx.core as mx

from .models.cache import KVCache, make_cache


def batchable(model) -> bool:
    """Whether `model` can decode rows together: every layer a full-attention KVCache (not a
    sliding window, a recurrent state or a quantized cache) and masks taken from the cache."""
    if not getattr(model, "compiled_decode", False):
        return False
    return all(type(c) is KVCache for c in make_cache(model))


class BatchKVCache:
    """One layer's keys and values for B rows: buffers (B, n_kv, capacity, D), columns
    `left[b] .. end - 1` valid for row b. `offset` (B,) int32 is each row's position count,
    which the model's rope reads; `make_mask` hides the padding."""

    step = 256

    def __init__(self, keys: mx.array, values: mx.array, left: list[int]):
        self.keys, self.values = keys, values  # (B, n_kv, end, D): exactly the valid columns
        self.end = keys.shape[2]
        self.left = list(left)
        self.offset = self._offsets()

    def _offsets(self) -> mx.array:
        return mx.array([self.end - l for l in self.left], dtype=mx.int32)

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Append (B, n_kv, L, D) at column `end`; return the (B, n_kv, end, D) views."""
        L = keys.shape[2]
        if self.end + L > self.keys.shape[2]:
            grow = ((L + self.step - 1) // self.step) * self.step
            pad = lambda a: mx.zeros((*a.shape[:2], grow, a.shape[3]), a.dtype)  # noqa: E731
            self.keys = mx.concatenate([self.keys[..., :self.end, :], pad(self.keys)], axis=2)
            self.values = mx.concatenate([self.values[..., :self.end, :], pad(self.values)],
                                         axis=2)
        self.keys[..., self.end:self.end + L, :] = keys
        self.values[..., self.end:self.end + L, :] = values
        self.end += L
        self.offset = self._offsets()
        return self.keys[..., :self.end, :], self.values[..., :self.end, :]

    def make_mask(self, n_new: int) -> mx.array:
        """(B, 1, n_new, end + n_new) boolean: a row's queries see its own columns, causally."""
        cols = mx.arange(self.end + n_new)[None, None, :]  # (1, 1, T)
        rows = mx.array(self.left)[:, None, None]  # (B, 1, 1)
        q = mx.arange(self.end, self.end + n_new)[None, :, None]  # (1, n_new, 1)
        return ((cols >= rows) & (cols <= q))[:, None]

    @property
    def state(self):
        return self.keys, self.values

    def valid(self) -> tuple[mx.array, mx.array]:
        return self.keys[..., :self.end, :], self.values[..., :self.end, :]

    def row(self, b: int) -> KVCache:
        """Row b as a KVCache of its own (what the prefix cache snapshots)."""
        c = KVCache()
        c.keys = self.keys[b:b + 1, :, self.left[b]:self.end, :]
        c.values = self.values[b:b + 1, :, self.left[b]:self.end, :]
        c.offset = self.end - self.left[b]
        return c


def _left_pad(a: mx.array, n: int) -> mx.array:
    if n == 0:
        return a
    return mx.concatenate([mx.zeros((*a.shape[:2], n, a.shape[3]), a.dtype), a], axis=2)


class Batch:
    """The rows decoding together and their per-layer BatchKVCaches (None while empty)."""

    def __init__(self):
        self.rows: list = []
        self.layers: list[BatchKVCache] | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, row, cache: list[KVCache]) -> None:
        """Add `row` whose own cache is `cache` (one KVCache per layer, all at one offset)."""
        n = cache[0].offset
        if self.layers is None:
            self.layers = [BatchKVCache(c.keys[..., :n, :], c.values[..., :n, :], [0])
                           for c in cache]
        else:
            layers = []
            for bl, c in zip(self.layers, cache, strict=True):
                end = max(bl.end, n)
                keys, values = bl.valid()
                keys = mx.concatenate([_left_pad(keys, end - bl.end),
                                       _left_pad(c.keys[..., :n, :], end - n)], axis=0)
                values = mx.concatenate([_left_pad(values, end - bl.end),
                                         _left_pad(c.values[..., :n, :], end - n)], axis=0)
                layers.append(BatchKVCache(keys, values,
                                           [l + end - bl.end for l in bl.left] + [end - n]))
            self.layers = layers
        mx.eval([bl.state for bl in self.layers])
        self.rows.append(row)

    def _index(self, row) -> int:
        return next(i for i, r in enumerate(self.rows) if r is row)

    def row_cache(self, row) -> list[KVCache]:
        b = self._index(row)
        return [bl.row(b) for bl in self.layers]

    def remove(self, row) -> None:
        """Drop `row`; columns that are padding in every remaining row go too."""
        b = self._index(row)
        self.rows.pop(b)
        if not self.rows:
            self.layers = None
            return
        keep = mx.array([i for i in range(len(self.rows) + 1) if i != b])
        layers = []
        for bl in self.layers:
            left = bl.left[:b] + bl.left[b + 1:]
            cut = min(left)
            keys, values = bl.valid()
            layers.append(BatchKVCache(keys[keep, :, cut:, :], values[keep, :, cut:, :],
                                       [l - cut for l in left]))
        self.layers = layers
        mx.eval([bl.state for bl in self.layers])
