"""Samplers: small composable logits -> logits / logits -> token functions."""

from __future__ import annotations

import math
from functools import partial
from typing import Callable

import mlx.core as mx

from .errors import EdgertError

NEG_INF = float("-inf")


def _bad(name: str, value, want: str) -> EdgertError:
    return EdgertError(f"{name} = {value!r}: {want}")


def check_sampling(temp: float = 0.0, top_p: float = 0.0, top_k: int = 0, min_p: float = 0.0,
                   repetition_penalty: float | None = None, **_) -> None:
    """Refuse sampling options outside their meaning (one line each): temp >= 0, top_p and
    min_p in [0, 1], top_k a count >= 0, repetition_penalty > 0; NaN and infinities never."""
    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if not number(temp) or temp < 0:
        raise _bad("temperature", temp, "a finite number >= 0 is required (0 is greedy)")
    for name, v in (("top_p", top_p), ("min_p", min_p)):
        if not number(v) or not 0 <= v <= 1:
            raise _bad(name, v, "a probability in [0, 1] is required (0 = off)")
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        raise _bad("top_k", top_k, "a whole number >= 0 is required (0 = off)")
    if repetition_penalty is not None and (not number(repetition_penalty)
                                           or repetition_penalty <= 0):
        raise _bad("repetition_penalty", repetition_penalty,
                   "a finite number > 0 is required (1 = off)")


def apply_top_k(logprobs: mx.array, k: int) -> mx.array:
    """Keep the k most likely tokens. logprobs (B, V)."""
    if k <= 0 or k >= logprobs.shape[-1]:
        return logprobs
    kth = mx.sort(logprobs, axis=-1)[..., -k][..., None]
    return mx.where(logprobs < kth, NEG_INF, logprobs)


def apply_top_p(logprobs: mx.array, p: float) -> mx.array:
    """Keep the smallest set of tokens whose probability mass reaches p."""
    if p <= 0 or p >= 1:
        return logprobs
    order = mx.argsort(-logprobs, axis=-1)
    sorted_lp = mx.take_along_axis(logprobs, order, axis=-1)
    cum = mx.cumsum(mx.exp(sorted_lp), axis=-1)
    drop_sorted = (cum - mx.exp(sorted_lp)) >= p  # mass before this token already >= p
    drop = mx.put_along_axis(mx.zeros_like(drop_sorted), order, drop_sorted, axis=-1)
    return mx.where(drop, NEG_INF, logprobs)


def apply_min_p(logprobs: mx.array, min_p: float) -> mx.array:
    """Drop tokens whose probability is below min_p times the top token's."""
    if min_p <= 0:
        return logprobs
    top = mx.max(logprobs, axis=-1, keepdims=True)
    return mx.where(logprobs < top + mx.log(mx.array(min_p, logprobs.dtype)), NEG_INF, logprobs)


def categorical(logprobs: mx.array, temp: float, key=None) -> mx.array:
    return mx.random.categorical(logprobs * (1 / temp), key=key)


def make_sampler(temp: float = 0.0, top_p: float = 0.0, top_k: int = 0, min_p: float = 0.0,
                 seed: int | None = None) -> Callable[[mx.array], mx.array]:
    """logprobs (B, V) -> token ids (B,). temp 0 is greedy; a seed makes sampling repeatable.

    The sampler also carries what speculative decoding needs to accept drafts by the rule
    that keeps the output distribution (edgert.speculative): `temp`, `distribution(logprobs)`
    (the logits it samples from: filtered, divided by temp) and `next_key()`."""
    check_sampling(temp, top_p, top_k, min_p)
    if temp == 0:
        def greedy(logprobs: mx.array) -> mx.array:
            return mx.argmax(logprobs, axis=-1)

        greedy.temp = 0.0
        return greedy
    filters = []
    if top_k > 0:
        filters.append(partial(apply_top_k, k=top_k))
    if 0 < top_p < 1:
        filters.append(partial(apply_top_p, p=top_p))
    if min_p > 0:
        filters.append(partial(apply_min_p, min_p=min_p))
    state = {"key": mx.random.key(seed if seed is not None else int.from_bytes(
        __import__("os").urandom(4), "little"))}

    def distribution(logprobs: mx.array) -> mx.array:
        for f in filters:
            logprobs = f(logprobs)
        return logprobs * (1 / temp)

    def next_key() -> mx.array:
        state["key"], sub = mx.random.split(state["key"])
        return sub

    def sample(logprobs: mx.array) -> mx.array:
        logits = distribution(logprobs)
        return mx.random.categorical(logits, key=next_key())

    sample.temp, sample.distribution, sample.next_key = temp, distribution, next_key
    return sample


def make_repetition_penalty(penalty: float, context_size: int = 64):
    """A logits processor (tokens, logits) -> logits that divides positive logits of recently
    generated tokens by `penalty` and multiplies negative ones (CTRL / HF semantics)."""
    check_sampling(repetition_penalty=penalty)

    def process(tokens: mx.array, logits: mx.array) -> mx.array:
        if tokens.size == 0 or penalty == 1.0:
            return logits
        recent = tokens[-context_size:]
        selected = logits[:, recent]
        selected = mx.where(selected < 0, selected * penalty, selected / penalty)
        logits[:, recent] = selected
        return logits

    process.stateless = True  # a function of its arguments: speculative decoding may replay it
    return process


def make_logits_processors(repetition_penalty: float | None = None,
                           repetition_context_size: int = 64) -> list:
    procs = []
    if repetition_penalty and repetition_penalty != 1.0:
        procs.append(make_repetition_penalty(repetition_penalty, repetition_context_size))
    return procs


# llama.cpp's sampling defaults (common/common.h: temp 0.8, top_k 40, top_p 0.95, min_p 0.05,
# repeat penalty 1.0), used where a model ships no recommended sampling of its own.
LLAMA_CPP_DEFAULTS = {"temp": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}
# transformers' GenerationConfig defaults, for keys a generation_config.json leaves out.
_HF_DEFAULTS = {"temp": 1.0, "top_k": 50, "top_p": 1.0, "min_p": 0.0}
_HF_KEYS = {"temperature": "temp", "top_k": "top_k", "top_p": "top_p", "min_p": "min_p",
            "repetition_penalty": "repetition_penalty"}


def recommended_sampling(generation_config: dict | None) -> dict:
    """The model's recommended sampling as make_sampler keywords (+ repetition_penalty):
    from its generation_config.json (`do_sample: false` is greedy; keys it leaves out take
    transformers' defaults); where it names no sampling at all, llama.cpp's defaults."""
    gen = generation_config or {}
    given = {ours: gen[hf] for hf, ours in _HF_KEYS.items() if gen.get(hf) is not None}
    if gen.get("do_sample") is False:
        return {"temp": 0.0, **{k: v for k, v in given.items() if k == "repetition_penalty"}}
    if not given and "do_sample" not in gen:
        return dict(LLAMA_CPP_DEFAULTS)
    return _HF_DEFAULTS | given
