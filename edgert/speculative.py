"""Speculative decoding: a cheap drafter proposes K tokens, the target checks them in one pass.

Two drafters:

- `DraftModel`: a smaller model with the same vocabulary drafts K tokens one at a time.
- `PromptLookup`: n-gram lookup in the tokens so far (prompt and output, "prompt lookup
  decoding" as in transformers and llama.cpp): the tokens that followed the most recent
  earlier occurrence of the last n tokens, for n from `max_ngram` down to 1.

The target feeds the tokens it has not seen yet plus the K drafts in one forward pass and keeps
the longest prefix of drafts it agrees with, plus one token of its own (the correction, or a
bonus token when every draft was accepted). Greedy: a draft is accepted when it is the target's
argmax, so the tokens are those of plain greedy decoding (up to floating-point ties: a batch of
K+1 positions rounds differently from K+1 single steps). Sampling: a draft d is accepted with
probability min(1, p(d) / q(d)) and a rejection samples from max(p - q, 0) renormalised
(Leviathan et al. 2023; a prompt-lookup draft has q one-hot), which keeps the target's
distribution p (after temperature, top-k, top-p, min-p).

Rejected drafts leave the target's cache ahead of the accepted tokens. Trimmable caches (KV)
are trimmed. A cache with layers that cannot be trimmed (a sliding window, Gated DeltaNet's
recurrent state) is restored from the snapshot taken before the verifying pass, and the tokens
accepted since are fed again at the front of the next verifying pass (no extra pass). The
draft model's cache is rewound the same way.

Logits processors must be replayable per position (`stateless`, like the repetition penalty);
with any other (a grammar), and with a sampler that does not carry its distribution,
generation falls back to plain decoding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import mlx.core as mx
import numpy as np

from .errors import EdgertError
from .models.cache import make_cache, restore, snapshot, trimmable


@dataclass
class SpecStats:
    """Counters of one generation: drafted and accepted tokens, verifying passes."""

    drafted: int = 0
    accepted: int = 0
    passes: int = 0  # target forward passes after the first token (verifying or plain)

    @property
    def acceptance(self) -> float:
        """Accepted / drafted (0 when nothing was drafted)."""
        return self.accepted / self.drafted if self.drafted else 0.0


def summary(r) -> str:
    """' · speculative: A/D drafts accepted (P%)' for a GenerationResponse that drafted."""
    if not getattr(r, "draft_tokens", 0):
        return ""
    return (f" · speculative: {r.accepted_tokens}/{r.draft_tokens} drafts accepted "
            f"({100 * r.accepted_tokens / r.draft_tokens:.0f}%)")


class Drafter(Protocol):
    def start(self, prefill_step_size: int = 512) -> "DraftSession":
        """Per-generation state (a draft model's cache)."""


class DraftSession(Protocol):
    def draft(self, tokens: list[int], k: int, sampler) -> tuple[list[int], mx.array | None]:
        """Up to k tokens to follow `tokens` (everything so far) and the draft distribution they
        were sampled from ((n, V) logits, softmax-normalised by the caller), None when the
        drafts are deterministic (q one-hot) or greedy."""


# -- prompt lookup ----------------------------------------------------------------------------

class PromptLookup:
    """n-gram drafting from the tokens so far (no model)."""

    def __init__(self, max_ngram: int = 3):
        if max_ngram < 1:
            raise EdgertError(f"--prompt-lookup {max_ngram}: the n-gram size must be at least 1")
        self.max_ngram = max_ngram

    def start(self, prefill_step_size: int = 512) -> "PromptLookup":
        return self

    def draft(self, tokens: list[int], k: int, sampler=None) -> tuple[list[int], None]:
        return lookup(tokens, self.max_ngram, k), None


def lookup(tokens: list[int], max_ngram: int, k: int) -> list[int]:
    """The k tokens that followed the most recent earlier occurrence of the last n tokens (or
    the most that followed any, where none is followed by k), trying n = max_ngram, ..., 1;
    [] when none occurred before."""
    seq = np.asarray(tokens, dtype=np.int64)
    for n in range(min(max_ngram, len(seq) - 1), 0, -1):
        windows = np.lib.stride_tricks.sliding_window_view(seq[:-1], n)  # (len - n, n)
        hits = np.flatnonzero((windows == seq[-n:]).all(axis=1))
        if hits.size:  # the most recent match followed by k tokens, else the earliest
            whole = hits[hits + n + k <= len(seq)]
            start = int(whole[-1] if whole.size else hits[0]) + n
            return seq[start:start + k].tolist()
    return []


# -- draft model ------------------------------------------------------------------------------

class DraftModel:
    """A smaller model with the target's vocabulary, drafting greedily (or by the sampler)."""

    def __init__(self, model):
        self.model = model

    def start(self, prefill_step_size: int = 512) -> "_DraftModelSession":
        return _DraftModelSession(self.model, prefill_step_size)


class _DraftModelSession:
    """The draft model's cache during one generation, kept in step with the tokens so far."""

    def __init__(self, model, prefill_step_size: int):
        from .generation import decode_forward

        self.model, self.step_size = model, prefill_step_size
        self.cache = make_cache(model)
        self.fed: list[int] = []  # the tokens the cache holds
        self.snap: tuple[int, list] | None = None  # (len(fed), snapshot) for untrimmable caches
        self.forward = decode_forward(model, self.cache)

    def _rewind(self, tokens: list[int]) -> None:
        """Make `fed` a prefix of `tokens`: trim, or go back to the snapshot."""
        n = 0
        for a, b in zip(self.fed, tokens):
            if a != b:
                break
            n += 1
        if n == len(self.fed):
            return
        if trimmable(self.cache):
            for c in self.cache:
                c.trim(c.offset - n)
            self.fed = self.fed[:n]
        elif self.snap is not None and self.snap[0] <= n:
            restore(self.cache, self.snap[1])
            self.fed = self.fed[:self.snap[0]]
        else:
            self.cache, self.fed = make_cache(self.model), []
            from .generation import decode_forward

            self.forward = decode_forward(self.model, self.cache)

    def prefill(self, tokens: list[int]) -> None:
        """Feed the prompt while the target prefills it (so that it counts as prompt time)."""
        self._rewind(tokens)
        ids = tokens[len(self.fed):]
        for i in range(0, len(ids), self.step_size):
            self.model(mx.array(ids[i:i + self.step_size], dtype=mx.uint32)[None],
                       cache=self.cache)
            mx.eval([c.state for c in self.cache])
        self.fed += ids

    def _logits(self, ids: list[int]) -> mx.array:
        """Feed ids (prefill in chunks); the last position's logits (1, V)."""
        while len(ids) > 1:
            n = min(self.step_size, len(ids) - 1)
            self.model(mx.array(ids[:n], dtype=mx.uint32)[None], cache=self.cache)
            mx.eval([c.state for c in self.cache])
            self.fed += ids[:n]
            ids = ids[n:]
        y = mx.array(ids, dtype=mx.uint32)
        self.fed += ids
        if self.forward is not None:
            return self.forward(y)
        return self.model(y[None], cache=self.cache)[:, -1, :]

    def draft(self, tokens: list[int], k: int, sampler) -> tuple[list[int], mx.array | None]:
        self._rewind(tokens)
        pending = tokens[len(self.fed):]
        if not pending:  # everything fed already: start again from the last token
            self._rewind(tokens[:-1])
            pending = tokens[len(self.fed):]
        greedy = getattr(sampler, "temp", 0.0) == 0
        drafts, dists = [], []
        logits = self._logits(pending)
        if not trimmable(self.cache):
            self.snap = (len(self.fed), snapshot(self.cache))
        for i in range(k):
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            if greedy:
                d = mx.argmax(logprobs, axis=-1)
            else:
                dist = sampler.distribution(logprobs)  # (1, V)
                d = mx.random.categorical(dist, key=sampler.next_key())
                dists.append(dist)
            d = int(d.item())
            drafts.append(d)
            if i + 1 < k:
                logits = self._logits([d])
        return drafts, None if greedy else mx.concatenate(dists, axis=0)


def check_vocabularies(target_tok, draft_tok) -> None:
    """Refuse (one line) a draft model whose tokenizer maps tokens to other ids."""
    a, b = target_tok.vocab(), draft_tok.vocab()
    if a != b:
        diff = len(set(a.items()) ^ set(b.items()))
        raise EdgertError(f"the draft model's vocabulary differs from the target's "
                          f"({len(b)} vs {len(a)} tokens, {diff} token/id pairs differ): "
                          "speculative decoding needs the same tokenizer")


# -- verification -----------------------------------------------------------------------------

def can_speculate(sampler, processors: list) -> bool:
    """Whether drafts can be verified with this sampler and these logits processors."""
    if getattr(sampler, "temp", None) is None:
        return False
    if sampler.temp > 0 and not hasattr(sampler, "distribution"):
        return False
    return all(getattr(p, "stateless", False) for p in processors)


def accept(logprobs: mx.array, drafts: list[int], q: mx.array | None,
           sampler) -> tuple[int, int]:
    """(how many drafts are accepted, the target's next token after them) from the target's
    processed logprobs at the k+1 positions (k+1, V) and the draft distribution q (k, V)."""
    k = len(drafts)
    if sampler.temp == 0:
        target = mx.argmax(logprobs, axis=-1).tolist()  # (k+1,)
        n = 0
        while n < k and drafts[n] == target[n]:
            n += 1
        return n, target[n]
    p = mx.softmax(sampler.distribution(logprobs), axis=-1)  # (k+1, V)
    V = p.shape[-1]
    d = mx.array(drafts, dtype=mx.int32)
    if q is None:  # deterministic drafts: q is one-hot
        q = mx.zeros((k, V), p.dtype)
        q[mx.arange(k), d] = 1.0
    else:
        q = mx.softmax(_fit(q, V), axis=-1)
    rows = mx.arange(k)
    ratio = p[rows, d] / q[rows, d]  # (k,)
    u = mx.random.uniform(shape=(k,), key=sampler.next_key())
    ok = (u < ratio).tolist()
    n = 0
    while n < k and ok[n]:
        n += 1
    if n == k:  # every draft accepted: a bonus token from the target's last position
        token = mx.random.categorical(mx.log(p[k]), key=sampler.next_key())
    else:  # the residual distribution max(p - q, 0)
        residual = mx.maximum(p[n] - q[n], 0.0)
        token = mx.random.categorical(mx.log(residual), key=sampler.next_key())
    return n, int(token.item())


def _fit(x: mx.array, V: int) -> mx.array:
    """Draft logits (k, V') cut or padded (-inf) to the target's width V."""
    if x.shape[-1] == V:
        return x
    if x.shape[-1] > V:
        return x[:, :V]
    return mx.concatenate([x, mx.full((x.shape[0], V - x.shape[-1]), -mx.inf, x.dtype)], -1)


def speculative_steps(y: int, logprobs0: mx.array, model, cache: list, tokens: list[int],
                      *, session: DraftSession, num_draft: int, max_tokens: int,
                      sampler, processors: list, stats: SpecStats, skip: int = 0,
                      forward: Callable | None = None):
    """Yield (token, logprobs (V,)) from the first sampled token `y` on, `max_tokens` in all.

    `tokens` is everything before y (history and prompt) and `cache` holds all of it; the
    logits processors see `tokens[skip:]` and what follows (as generate_step's do). `forward`
    is the compiled one-token step, used where no draft was found.
    """
    from .signals import raise_pending

    if num_draft < 1:
        raise EdgertError(f"--num-draft {num_draft}: at least 1 draft token is needed")
    V = logprobs0.shape[-1]
    seq = list(tokens) + [y]
    fed = len(tokens)  # the cache holds seq[:fed]
    can_trim = trimmable(cache)
    yield y, logprobs0
    n = 1
    while n < max_tokens:
        k = min(num_draft, max_tokens - n - 1)
        drafts, q = session.draft(seq, k, sampler) if k > 0 else ([], None)
        drafts = drafts[:k]
        if any(t >= V for t in drafts):  # ids the target has no logit for: not drafts
            drafts = drafts[:next(i for i, t in enumerate(drafts) if t >= V)]
        q = None if q is None else q[:len(drafts)]
        inputs = seq[fed:] + drafts
        snap = None if can_trim or not drafts else snapshot(cache)
        if forward is not None and len(inputs) == 1:
            logits = forward(mx.array(inputs, dtype=mx.uint32))  # (1, V)
        else:
            logits = model(mx.array(inputs, dtype=mx.uint32)[None], cache=cache)[0]
            logits = logits[-(len(drafts) + 1):]  # (k+1, V)
        stats.passes += 1
        logprobs = _process(logits, seq[skip:], drafts, processors)  # (k+1, V)
        if drafts:
            a, token = accept(logprobs, drafts, q, sampler)
        else:
            a, token = 0, int(sampler(logprobs).item())
        stats.drafted += len(drafts)
        stats.accepted += a
        if a == len(drafts):
            fed = len(seq) + a
        elif can_trim:
            for c in cache:
                c.trim(len(drafts) - a)
            fed = len(seq) + a
        else:  # back to the snapshot; the accepted tokens go in with the next pass
            restore(cache, snap)
        new = drafts[:a] + [token]
        seq += new
        for i, t in enumerate(new):
            if n >= max_tokens:
                return
            raise_pending()
            yield t, logprobs[i]
            n += 1


def _process(logits: mx.array, seq: list[int], drafts: list[int], processors: list) -> mx.array:
    """The target's logprobs at each verified position, logits processors applied with the
    tokens before that position."""
    if processors:
        rows = []
        for i in range(logits.shape[0]):
            row = logits[i:i + 1]
            hist = mx.array(seq + drafts[:i], dtype=mx.uint32)
            for p in processors:
                row = p(hist, row)
            rows.append(row)
        logits = mx.concatenate(rows, axis=0)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)
