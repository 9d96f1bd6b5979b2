"""Generation: a generator of (token, logprobs), and streaming text on top of it."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Generator, Iterable

import mlx.core as mx

from .errors import EdgertError
from .models.cache import KVCache, PositionedKV, make_cache
from .sample import make_logits_processors, make_sampler
from .signals import raise_pending
from .speculative import SpecStats


def context_length(model) -> int | None:
    """How many positions `model` can attend over: a Core ML package's KV-cache length, else
    the config's max_position_embeddings (None when it does not say)."""
    if isinstance(n := getattr(model, "context", None), int):
        return n
    return getattr(getattr(model, "args", None), "max_position_embeddings", None)


def check_prompt_length(model, n_prompt: int, cache: list | None = None) -> int | None:
    """Refuse (one line naming both numbers) a prompt that, after what `cache` already holds,
    does not fit the model's context; returns how many tokens may still be generated (None:
    no limit known). Every front end (generate, chat, the server) goes through here."""
    limit = context_length(model)
    if limit is None:
        return None
    held = max((c.offset for c in cache), default=0) if cache else 0
    if held + n_prompt > limit:
        what = f"{n_prompt} tokens" + (f" after {held} in the conversation" if held else "")
        raise EdgertError(f"the prompt ({what}) is longer than the model's context of "
                          f"{limit} tokens")
    return limit - held - n_prompt + 1  # the last position's prediction needs no slot


def generate_step(
    prompt: mx.array,
    model,
    *,
    max_tokens: int = 256,
    sampler: Callable[[mx.array], mx.array] | None = None,
    logits_processors: list | None = None,
    prompt_cache: list | None = None,
    prefill_step_size: int = 512,
    compiled: bool = True,
    on_prefilled: Callable[[list], None] | None = None,
    draft=None,
    num_draft: int = 4,
    history: list[int] | None = None,
    stats=None,
) -> Generator[tuple[int, mx.array], None, None]:
    """Yield (token id, logprobs over the vocabulary) for each generated token.

    The prompt (1-D token ids) is prefilled in chunks of `prefill_step_size` through the KV
    cache; the next step is queued with `mx.async_eval` while the caller handles this one.
    With `compiled`, one-token steps run through `decode_forward` where the model and cache
    allow it (same tokens and logprobs, bit for bit). `on_prefilled(cache)` is called once the
    cache holds every prompt token but the last (where a chat session takes its snapshot).

    With a `draft` (edgert.speculative: DraftModel or PromptLookup), tokens after the first
    are decoded speculatively, `num_draft` drafts checked per target pass; `history` names
    the tokens `prompt_cache` already holds (drafting looks at them too) and `stats`
    (a speculative.SpecStats) counts drafted and accepted tokens. Where drafts cannot be
    checked (a stateful logits processor such as a grammar) decoding is plain.
    """
    if prompt.size == 0:
        raise EdgertError("empty prompt: nothing to generate from")
    sampler = sampler or make_sampler()
    processors = logits_processors or []
    cache = prompt_cache if prompt_cache is not None else make_cache(model)
    room = check_prompt_length(model, prompt.size, cache)
    max_tokens = max_tokens if room is None else min(max_tokens, room)
    tokens = prompt  # everything seen so far, for the logits processors

    forward = decode_forward(model, cache) if compiled else None

    def step(y: mx.array, first: bool = False) -> tuple[mx.array, mx.array]:
        nonlocal tokens
        if forward is not None and y.size == 1:
            logits = forward(y)  # (1, V)
        else:
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
    if on_prefilled is not None:
        on_prefilled(cache)

    session = None
    if draft is not None and max_tokens > 1:
        from .speculative import can_speculate, speculative_steps

        if can_speculate(sampler, processors):
            history = list(history or [])
            session = draft.start(prefill_step_size)
            if hasattr(session, "prefill"):  # a draft model reads the prompt as the target does
                session.prefill(history + prompt.tolist())
    y, logprobs = step(y, first=True)
    if session is not None:
        yield from speculative_steps(
            int(y.item()), logprobs, model, cache, history + prompt.tolist(), session=session,
            num_draft=num_draft, max_tokens=max_tokens, sampler=sampler, processors=processors,
            stats=stats if stats is not None else SpecStats(), skip=len(history),
            forward=forward)
        return
    mx.async_eval(y, logprobs)
    n = 0
    while n < max_tokens:
        if n + 1 < max_tokens:
            next_y, next_logprobs = step(y)
            mx.async_eval(next_y, next_logprobs)
        raise_pending()  # a signal swallowed somewhere (a __del__) still stops generation
        yield y.item(), logprobs
        n += 1
        if n < max_tokens:
            y, logprobs = next_y, next_logprobs


def _compiled_forward(model):
    """mx.compile of one decode step with the KV buffers as explicit inputs and outputs, made
    once per model. Shapes are fixed while the cache capacity stays the same (one trace per
    capacity); the write position is an array, so a new position does not retrace."""
    fn = getattr(model, "_edgert_compiled_forward", None)
    if fn is None:
        def forward(y, offset, keys, values):
            layers = [PositionedKV(k, v, offset) for k, v in zip(keys, values)]
            logits = model(y[None], cache=layers)[:, -1, :]  # (1, V)
            return logits, [c.keys for c in layers], [c.values for c in layers]

        fn = mx.compile(forward)
        object.__setattr__(model, "_edgert_compiled_forward", fn)
    return fn


def decode_forward(model, cache: list) -> Callable[[mx.array], mx.array] | None:
    """The compiled twin of `model(y[None], cache=cache)[:, -1, :]` for one token y (shape (1,)),
    advancing `cache` the same way; None where the model or the cache does not support it
    (the model must take its mask from the cache: `compiled_decode`)."""
    if not getattr(model, "compiled_decode", False) or not all(type(c) is KVCache for c in cache):
        return None
    fn = _compiled_forward(model)

    def forward(y: mx.array) -> mx.array:
        if cache[0].keys is None:  # an empty cache: the first step has no buffers to pass
            return model(y[None], cache=cache)[:, -1, :]
        for c in cache:  # growing changes the capacity: outside the compiled function
            c.reserve(1, c.keys, c.values)
        offset = mx.array(cache[0].offset, dtype=mx.int32)
        logits, keys, values = fn(y, offset, [c.keys for c in cache], [c.values for c in cache])
        for c, k, v in zip(cache, keys, values):
            c.keys, c.values = k, v
            c.offset += 1
        return logits

    return forward


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
    draft_tokens: int = 0  # speculative decoding: tokens drafted so far
    accepted_tokens: int = 0  # ... and accepted by the target

    @property
    def acceptance(self) -> float | None:
        """Accepted / drafted tokens (None when nothing was drafted)."""
        return self.accepted_tokens / self.draft_tokens if self.draft_tokens else None


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
    on_prefilled: Callable[[list], None] | None = None,
    draft=None,
    num_draft: int = 4,
    history: list[int] | None = None,
) -> Generator[GenerationResponse, None, None]:
    """Generate from a prompt (text, or token ids), yielding a response per token with the
    newly completed text; stops at any of the tokenizer's stop tokens. `draft`, `num_draft`
    and `history`: speculative decoding (see generate_step); each response counts the drafted
    and accepted tokens."""
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
    stats = SpecStats()
    for n, (token, logprobs) in enumerate(
        generate_step(prompt, model, max_tokens=max_tokens, sampler=sampler,
                      logits_processors=logits_processors, prompt_cache=prompt_cache,
                      prefill_step_size=prefill_step_size, on_prefilled=on_prefilled,
                      draft=draft, num_draft=num_draft, history=history, stats=stats),
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
            draft_tokens=stats.drafted, accepted_tokens=stats.accepted,
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
        draft_tokens=stats.drafted, accepted_tokens=stats.accepted,
    )


def generate(model, tokenizer, prompt: str | Iterable[int], max_tokens: int = 256,
             **kwargs) -> str:
    """Generate and return the whole text."""
    return "".join(r.text for r in stream_generate(model, tokenizer, prompt, max_tokens, **kwargs))
