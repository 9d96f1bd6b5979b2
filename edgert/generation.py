"""Generation: a generator of (token, logprobs), and streaming text on top of it."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Generator, Iterable

import mlx.core as mx

from .errors import EdgertError
from .models.cache import make_cache
from .sample import make_logits_processors, make_sampler


def generate_step(
    prompt: mx.array,
    model,
    *,
    max_tokens: int = 256,
    sampler: Callable[[mx.array], mx.array] | None = None,
    logits_processors: list | None = None,
    prompt_cache: list | None = None,
    prefill_step_size: int = 512,
) -> Generator[tuple[int, mx.array], None, None]:
    """Yield (token id, logprobs over the vocabulary) for each generated token.

    The prompt (1-D token ids) is prefilled in chunks of `prefill_step_size` through the KV
    cache; the next step is queued with `mx.async_eval` while the caller handles this one.
    """
    if prompt.size == 0:
        raise EdgertError("empty prompt: nothing to generate from")
    sampler = sampler or make_sampler()
    processors = logits_processors or []
    cache = prompt_cache if prompt_cache is not None else make_cache(model)
    tokens = prompt  # everything seen so far, for the logits processors

    def step(y: mx.array, first: bool = False) -> tuple[mx.array, mx.array]:
        nonlocal tokens
        logits = model(y[None], cache=cache)[:, -1, :]  # (1, V)
        if processors:
            if not first:
                tokens = mx.concatenate([tokens, y])
            for p in processors:
                logits = p(tokens, logits)
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return sampler(logprobs), logprobs.squeeze(0)

    # Prefill all but the last token through the cache only: evaluating just the cache state
    # leaves the (chunk, vocab) logits unevaluated, so the LM head runs for one position.
    y = prompt
    while y.size > 1:
        n = min(prefill_step_size, y.size - 1)
        model(y[None, :n], cache=cache)
        mx.eval([c.state for c in cache])
        y = y[n:]

    y, logprobs = step(y, first=True)
    mx.async_eval(y, logprobs)
    n = 0
    while n < max_tokens:
        if n + 1 < max_tokens:
            next_y, next_logprobs = step(y)
            mx.async_eval(next_y, next_logprobs)
        yield y.item(), logprobs
        n += 1
        if n < max_tokens:
            y, logprobs = next_y, next_logprobs


@dataclass
class GenerationResponse:
    text: str  # the newly finalized text segment
    token: int
    logprob: float
    prompt_tokens: int
    prompt_tps: float
    generation_tokens: int
    generation_tps: float
    peak_memory_gb: float
    finish_reason: str | None = None  # "stop", "length", or None while running


def stream_generate(
    model,
    tokenizer,
    prompt: str | Iterable[int],
    max_tokens: int = 256,
    *,
    temp: float = 0.0,
    top_p: float = 0.0,
    top_k: int = 0,
    min_p: float = 0.0,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    sampler=None,
    logits_processors=None,
    prompt_cache: list | None = None,
    prefill_step_size: int = 512,
) -> Generator[GenerationResponse, None, None]:
    """Generate from a prompt (text, or token ids), yielding a response per token with the
    newly completed text; stops at any of the tokenizer's stop tokens."""
    if isinstance(prompt, str):
        if not prompt:
            raise EdgertError("empty prompt: nothing to generate from")
        prompt = tokenizer.encode(prompt)
    prompt = mx.array(list(prompt), dtype=mx.uint32)
    sampler = sampler or make_sampler(temp, top_p, top_k, min_p, seed)
    if logits_processors is None:
        logits_processors = make_logits_processors(repetition_penalty)
    detok = tokenizer.detokenizer()
    stops = tokenizer.eos_token_ids

    tic = time.perf_counter()
    prompt_tps = 0.0
    n = 0
    token, logprobs = None, None
    for n, (token, logprobs) in enumerate(
        generate_step(prompt, model, max_tokens=max_tokens, sampler=sampler,
                      logits_processors=logits_processors, prompt_cache=prompt_cache,
                      prefill_step_size=prefill_step_size),
        start=1,
    ):
        if n == 1:
            prompt_time = time.perf_counter() - tic
            prompt_tps = prompt.size / prompt_time
            tic = time.perf_counter()
        if token in stops:
            break
        detok.add_token(token)
        gen_time = time.perf_counter() - tic
        yield GenerationResponse(
            text=detok.last_segment, token=token, logprob=logprobs[token].item(),
            prompt_tokens=prompt.size, prompt_tps=prompt_tps, generation_tokens=n,
            generation_tps=(n - 1) / gen_time if n > 1 and gen_time > 0 else 0.0,
            peak_memory_gb=mx.get_peak_memory() / 1e9,
        )
    detok.finalize()
    gen_time = time.perf_counter() - tic
    yield GenerationResponse(
        text=detok.last_segment, token=token if token is not None else -1,
        logprob=logprobs[token].item() if token is not None else 0.0,
        prompt_tokens=prompt.size, prompt_tps=prompt_tps, generation_tokens=n,
        generation_tps=(n - 1) / gen_time if n > 1 and gen_time > 0 else 0.0,
        peak_memory_gb=mx.get_peak_memory() / 1e9,
        finish_reason="stop" if token in stops else "length",
    )


def generate(model, tokenizer, prompt: str | Iterable[int], max_tokens: int = 256,
             **kwargs) -> str:
    """Generate and return the whole text."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, max_tokens, **kwargs))
