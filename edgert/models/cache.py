"""Per-layer caches, in three kinds:

- `KVCache`: full attention; keys and values pre-allocated in steps. Trimmable.
- `RotatingKVCache`: sliding-window attention; keeps the last `window - 1` positions (plus the
  new ones during a step). Not trimmable: what fell out of the window is gone.
- `QuantizedKVCache`, `QuantizedRotatingKVCache`: the same two with keys and values stored
  affine-quantized (`quantize_kv`, `--kv-bits`).
- `RecurrentCache`: a fixed-size recurrent state (Gated DeltaNet's conv and delta states).
  Not trimmable: a state summarises every token it has seen.

Every kind has `offset` (tokens seen), `trimmable`, `trim(n)`, `snapshot()` / `restore(s)` and
`nbytes`. A snapshot is a value that later updates of the cache cannot change (MLX arrays are
immutable values; a snapshot holds references, and an update that would write into a shared
buffer copies it first). What cannot be trimmed is rewound by restoring a snapshot: see
`snapshot` / `restore` / `trim_or_none` below and edgert.chat.ChatSession.

A model's `make_cache()` says which kind each layer gets; masks come from the first cache of
each attention kind (`make_mask`), never from `cache[0]` blindly (layer 0 may be recurrent).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from .base import causal_mask


class KVCache:
    step = 256
    trimmable = True

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

    def snapshot(self) -> Any:
        if self.keys is None:
            return (0, None, None)
        return (self.offset, self.keys[..., : self.offset, :], self.values[..., : self.offset, :])

    def restore(self, snap) -> None:
        # New array objects over the snapshot's buffers: a later in-place write (after a trim)
        # then copies instead of changing the snapshot's arrays.
        self.offset, keys, values = snap
        self.keys = None if keys is None else keys[...]
        self.values = None if values is None else values[...]

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return self.keys.nbytes + self.values.nbytes


class QuantizedKVCache(KVCache):
    """Full-attention keys and values stored affine-quantized (`mx.quantize`, `bits` 4 or 8,
    groups along the head dimension); `update_and_fetch` returns (w_q, scales, biases) triples
    that `base.attention` multiplies with `mx.quantized_matmul`. Trimmable, like KVCache."""

    def __init__(self, bits: int = 8, group_size: int = 64):
        super().__init__()
        self.bits, self.group_size = bits, group_size
        # self.keys / self.values: [w_q (B, n_kv, capacity, D*bits/32) uint32,
        #                           scales (B, n_kv, capacity, D/group), biases (same)]

    def _grow(self, n: int, keys: mx.array) -> None:
        prev = self.offset
        if self.keys is not None and prev + n <= self.keys[0].shape[2]:
            return
        B, n_kv, _, D = keys.shape
        if D % self.group_size:
            raise ValueError(f"KV group size {self.group_size} does not divide head dim {D}")
        cap = ((n + self.step - 1) // self.step) * self.step
        shapes = [(D * self.bits // 32, mx.uint32), (D // self.group_size, keys.dtype),
                  (D // self.group_size, keys.dtype)]
        new = [mx.zeros((B, n_kv, cap, w), dt) for w, dt in shapes]
        if self.keys is None:
            self.keys, self.values = new, [mx.zeros_like(a) for a in new]
        else:
            self.keys = [mx.concatenate([a[..., :prev, :], z], axis=2)
                         for a, z in zip(self.keys, new)]
            self.values = [mx.concatenate([a[..., :prev, :], mx.zeros_like(z)], axis=2)
                           for a, z in zip(self.values, new)]

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Quantize and append (B, n_kv, L, D); return the valid (w_q, scales, biases) triples."""
        prev, L = self.offset, keys.shape[2]
        self._grow(L, keys)
        self.offset += L
        for store, new in ((self.keys, keys), (self.values, values)):
            for a, q in zip(store, mx.quantize(new, group_size=self.group_size, bits=self.bits)):
                a[..., prev:self.offset, :] = q
        return (tuple(a[..., :self.offset, :] for a in self.keys),
                tuple(a[..., :self.offset, :] for a in self.values))

    @property
    def state(self):
        return [] if self.keys is None else [*self.keys, *self.values]

    def snapshot(self) -> Any:
        if self.keys is None:
            return (0, None, None)
        return (self.offset, tuple(a[..., :self.offset, :] for a in self.keys),
                tuple(a[..., :self.offset, :] for a in self.values))

    def restore(self, snap) -> None:
        self.offset, keys, values = snap
        self.keys = None if keys is None else [a[...] for a in keys]
        self.values = None if values is None else [a[...] for a in values]

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else sum(a.nbytes for a in [*self.keys, *self.values])


def quantize_kv(cache: list, bits: int | None, group_size: int = 64) -> list:
    """The cache with every KVCache layer replaced by a QuantizedKVCache and every sliding
    window (RotatingKVCache) by a QuantizedRotatingKVCache; recurrent states stay float."""
    if not bits:
        return cache
    if bits not in (4, 8):
        raise ValueError(f"KV-cache bits must be 4 or 8, not {bits}")
    return [QuantizedKVCache(bits, group_size) if type(c) is KVCache else
            QuantizedRotatingKVCache(c.window, bits, group_size)
            if type(c) is RotatingKVCache else c for c in cache]


class RotatingKVCache:
    """Sliding-window keys and values: after each update only the last `window - 1` positions
    are kept (what the next query can still see). `start` is the absolute position of the
    first kept key; masks are built in absolute positions."""

    trimmable = False

    def __init__(self, window: int):
        if window < 1:
            raise ValueError(f"sliding window {window} must be at least 1")
        self.window = window
        self.keys = None  # (B, n_kv, kept, D), positions start .. offset - 1
        self.values = None
        self.offset = 0
        self.start = 0

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Append (B, n_kv, L, D); return the kept positions plus the new ones (what the
        mask of `make_mask(L)`, taken before this update, describes)."""
        if self.keys is None:
            k, v = keys, values
        else:
            k = mx.concatenate([self.keys, keys], axis=2)
            v = mx.concatenate([self.values, values], axis=2)
        self.offset += keys.shape[2]
        keep = min(self.window - 1, k.shape[2])
        self.keys, self.values = k[..., k.shape[2] - keep:, :], v[..., v.shape[2] - keep:, :]
        self.start = self.offset - keep
        return k, v

    @property
    def kept(self) -> int:
        """How many positions the cache holds (at most window - 1)."""
        return 0 if self.keys is None else self.keys.shape[2]

    def make_mask(self, n_new: int):
        """(n_new, kept + n_new) boolean: causal and within the window, in absolute positions;
        None where every kept key is visible to the single new query."""
        kept = self.kept
        if n_new == 1 and kept < self.window:
            return None
        q = mx.arange(self.offset, self.offset + n_new)[:, None]
        k = mx.arange(self.offset - kept, self.offset + n_new)[None, :]
        return (k <= q) & (k > q - self.window)

    @property
    def state(self):
        return self.keys, self.values

    def trim(self, n: int) -> int:
        return 0

    def snapshot(self) -> Any:
        return (self.offset, self.start, self.keys, self.values)

    def restore(self, snap) -> None:
        self.offset, self.start, self.keys, self.values = snap

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class QuantizedRotatingKVCache(RotatingKVCache):
    """A sliding window whose keys and values are stored affine-quantized (as QuantizedKVCache
    stores them: `bits` 4 or 8, groups along the head dimension), each position quantized once
    when it arrives. `update_and_fetch` returns (w_q, scales, biases) triples of the kept
    positions plus the new ones, for `base.attention`'s quantized path."""

    def __init__(self, window: int, bits: int = 8, group_size: int = 64):
        super().__init__(window)
        self.bits, self.group_size = bits, group_size
        # self.keys / self.values: (w_q (B, n_kv, kept, D*bits/32) uint32,
        #                           scales (B, n_kv, kept, D/group), biases (same))

    def update_and_fetch(self, keys: mx.array, values: mx.array):
        """Quantize and append (B, n_kv, L, D); keep the last window - 1 positions."""
        if keys.shape[-1] % self.group_size:
            raise ValueError(f"KV group size {self.group_size} does not divide head dim "
                             f"{keys.shape[-1]}")
        new = [tuple(mx.quantize(x, group_size=self.group_size, bits=self.bits))
               for x in (keys, values)]
        if self.keys is not None:
            new = [tuple(mx.concatenate([a, b], axis=2) for a, b in zip(old, n))
                   for old, n in zip((self.keys, self.values), new)]
        k, v = new
        self.offset += keys.shape[2]
        n = k[0].shape[2]
        keep = min(self.window - 1, n)
        self.keys, self.values = (tuple(a[..., n - keep:, :] for a in t) for t in (k, v))
        self.start = self.offset - keep
        return k, v

    @property
    def kept(self) -> int:
        return 0 if self.keys is None else self.keys[0].shape[2]

    @property
    def state(self):
        return [] if self.keys is None else [*self.keys, *self.values]

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else sum(a.nbytes for a in [*self.keys, *self.values])


class RecurrentCache:
    """A recurrent layer's state: a few arrays replaced (never written into) at every step,
    e.g. Gated DeltaNet's [conv state (B, K-1, conv_dim), delta state (B, Hv, Dv, Dk)]."""

    trimmable = False

    def __init__(self, n: int = 2):
        self.arrays: list[mx.array | None] = [None] * n
        self.offset = 0

    def __getitem__(self, i: int):
        return self.arrays[i]

    def __setitem__(self, i: int, value: mx.array) -> None:
        self.arrays[i] = value

    def advance(self, n: int) -> None:
        self.offset += n

    def make_mask(self, n_new: int):
        return None

    @property
    def state(self):
        return [a for a in self.arrays if a is not None]

    def trim(self, n: int) -> int:
        return 0

    def snapshot(self) -> Any:
        return (self.offset, list(self.arrays))

    def restore(self, snap) -> None:
        self.offset, arrays = snap
        self.arrays = list(arrays)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays if a is not None)


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


def make_cache(model) -> list:
    if hasattr(model, "make_cache"):
        return model.make_cache()
    return [KVCache() for _ in model.layers]


def first_of(cache: list | None, kind: type):
    """The first cache of `kind` in a model's per-layer list (None if there is none): where
    attention layers of that kind take their mask from."""
    if cache is None:
        return None
    return next((c for c in cache if isinstance(c, kind)), None)


def trimmable(cache: list) -> bool:
    return all(getattr(c, "trimmable", False) for c in cache)


def snapshot(cache: list) -> list:
    """Every layer's snapshot: `restore(cache, snapshot(cache))` puts the cache back as it is."""
    return [c.snapshot() for c in cache]


def restore(cache: list, snap: list) -> None:
    for c, s in zip(cache, snap, strict=True):
        c.restore(s)


def cache_nbytes(cache: list) -> int:
    return sum(c.nbytes for c in cache)
