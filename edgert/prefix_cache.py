"""A prefix cache across requests: an LRU of cache snapshots keyed by the tokens they hold,
bounded in bytes, for every cache kind (through the protocol of edgert.models.cache).

A trimmable cache (all KV) can reuse any entry that shares a prefix with the new prompt: it
is restored and trimmed back to the shared part. A cache with layers that cannot be trimmed
(rotating, recurrent) can reuse only an entry whose tokens are all a prefix of the prompt, so
a request leaves two entries there: the prompt (taken by generate_step's `on_prefilled`) and
the prompt plus its reply.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from .chat import common_prefix
from .models.cache import cache_nbytes, make_cache, restore, snapshot, trimmable


class PrefixCache:
    """Snapshots keyed by token tuples, least recently used evicted past `max_bytes`."""

    def __init__(self, model, max_bytes: int = 1 << 30, make=None):
        self.model, self.max_bytes = model, max_bytes
        self.make = make or (lambda: make_cache(self.model))  # a fresh cache of the model
        self._entries: OrderedDict[tuple[int, ...], tuple[list, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0
        self.hits = 0
        self.reused_tokens = 0

    def __len__(self) -> int:
        return len(self._entries)

    def fetch(self, ids: list[int]) -> tuple[list, int]:
        """A cache for `ids`, restored from the entry that saves the most prompt tokens, and
        how many of them it holds (never all: the last prompt token must be fed for logits)."""
        cache = self.make()
        can_trim = trimmable(cache)
        best, best_n = None, 0
        with self._lock:
            for key in self._entries:
                if can_trim:
                    n = min(common_prefix(key, ids), len(ids) - 1)
                else:
                    n = len(key) if len(key) < len(ids) and tuple(ids[:len(key)]) == key else 0
                if n > best_n:
                    best, best_n = key, n
            if best is None:
                return cache, 0
            self._entries.move_to_end(best)
            snap = self._entries[best][0]
            self.hits += 1
            self.reused_tokens += best_n
        restore(cache, snap)
        for c in cache:
            if c.offset > best_n:
                c.trim(c.offset - best_n)
        return cache, best_n

    def store(self, tokens: list[int], cache: list) -> None:
        """Remember `cache`, which holds exactly `tokens`. With trimmable caches an entry that
        is a prefix of `tokens` is dropped: the new one serves every prompt the old one did."""
        if not tokens or any(c.offset != len(tokens) for c in cache):
            return
        key = tuple(tokens)
        nbytes = cache_nbytes(cache)
        if nbytes > self.max_bytes:
            return
        snap = snapshot(cache)
        with self._lock:
            if trimmable(cache):
                for k in [k for k in self._entries if len(k) <= len(key) and key[:len(k)] == k]:
                    self._drop(k)
            elif key in self._entries:
                self._drop(key)
            self._entries[key] = (snap, nbytes)
            self.nbytes += nbytes
            while self.nbytes > self.max_bytes:
                self._drop(next(iter(self._entries)))

    def load(self, path, package) -> int:
        """Add the prompt cache file at `path` (edgert.prompt_cache) as an entry; returns its
        token count. EdgertError if it belongs to another model."""
        from .prompt_cache import load_prompt_cache

        cache = self.make()
        tokens, snap = load_prompt_cache(path, package, cache)
        restore(cache, snap)
        self.store(tokens, cache)
        return len(tokens)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.nbytes = 0

    def _drop(self, key) -> None:
        _, nbytes = self._entries.pop(key)
        self.nbytes -= nbytes
