"""The serving engine: one model, one generation thread, requests decoded together.

Every MLX operation runs on the engine's own thread (MLX streams belong to the thread that made
them), so the model is loaded there too. Up to `max_active` requests decode at once; the rest
wait in arrival order, so no request starves another. A request is a `Job`: its tokens,
sampling and stop rules in, `Event`s out through `emit` (called on the engine thread). Setting
`job.cancelled` stops it at its next token.

How active requests share the model:

- Batched (edgert.batching): where every layer's cache is a full-attention KVCache and the
  model takes its masks from the cache (llama, qwen2, qwen3, qwen3_moe...), each request is
  prefilled on its own and then joins a batch whose rows decode in one model call per step
  (left-padded KV, per-row positions and masks); each row samples with its own sampler,
  logits processors (grammar, repetition penalty), stop strings and logprobs, and leaves the
  batch when it finishes or its client goes away without changing the other rows.
- Turn-taking (round robin, one token per request per turn): the caches that cannot be
  batched this way (sliding windows, recurrent states, quantized KV with --kv-bits, Core ML
  states) and speculative decoding (--draft-model, --prompt-lookup), whose verification
  steps differ in length from row to row.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import EdgertError
from .tokenizer import held_back

log = logging.getLogger("edgert.server")


@dataclass
class Job:
    """One generation request, already tokenized and checked."""

    prompt: list[int]
    max_tokens: int
    sampling: dict  # make_sampler keywords (temp, top_p, top_k, min_p, seed) + repetition_penalty
    emit: Callable[["Event"], None]
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0
    processors: list = field(default_factory=list)  # extra logits processors (grammars)
    make_processors: Callable[[], list] | None = None  # built on the engine thread
    checkpoints: list[int] = field(default_factory=list)  # prompt lengths worth a snapshot
    cancelled: bool = False
    created: float = field(default_factory=time.monotonic)


@dataclass
class Event:
    """`kind` "delta" (text, logprobs: list of per-token dicts), "done" (finish_reason, usage)
    or "error" (error: an exception)."""

    kind: str
    text: str = ""
    logprobs: list | None = None
    finish_reason: str | None = None
    usage: dict | None = None
    error: Exception | None = None


class StopStrings:
    """Cuts generated text at the first stop string, across token boundaries: text that may
    be the start of a stop string is held back until the next tokens decide."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was hit)."""
        buf = self.held + text
        if not self.stops:
            self.held = ""
            return buf, False
        cut = min((i for s in self.stops if (i := buf.find(s)) >= 0), default=-1)
        if cut >= 0:
            self.held = ""
            return buf[:cut], True
        hold = held_back(buf, self.stops)
        self.held = buf[len(buf) - hold:] if hold else ""
        return buf[:len(buf) - hold], False

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text


def _top_logprobs(tokenizer, logprobs, token: int, k: int) -> dict:
    """An OpenAI logprobs entry for `token` from the (V,) logprobs vector."""
    import mlx.core as mx

    def entry(t: int, lp: float) -> dict:
        s = tokenizer.decode([t])
        return {"token": s, "logprob": lp, "bytes": list(s.encode("utf-8"))}

    out = entry(token, logprobs[token].item())
    if k > 0:
        top = mx.argpartition(-logprobs, k - 1)[:k]
        vals = logprobs[top].tolist()
        pairs = sorted(zip(top.tolist(), vals), key=lambda p: -p[1])
        out["top_logprobs"] = [entry(t, lp) for t, lp in pairs]
    else:
        out["top_logprobs"] = []
    return out


class Engine:
    """Loads a model on its own thread and serves `Job`s there."""

    def __init__(self, model: str | Path | None = None, *, max_active: int = 4,
                 batch: bool = True, max_queue: int = 64, prefix_cache_bytes: int = 1 << 30,
                 prefill_step_size: int = 512, prompt_cache: str | Path | None = None,
                 kv_bits: int | None = None, kv_group_size: int = 64,
                 draft_model: str | Path | None = None, prompt_lookup: int | None = None,
                 num_draft: int = 4):
        from .convert.api import ensure_package
        from .coreml_engine import is_coreml_package
        from .hub import local_path

        model = local_path(model)  # a repo id: its local copy (a Core ML one is told apart)
        self.coreml = is_coreml_package(model)  # served through the Core ML engine
        if self.coreml and (kv_bits or prompt_cache is not None or draft_model is not None
                            or prompt_lookup is not None):
            raise EdgertError("--kv-bits, --prompt-cache and speculative decoding need an MLX "
                              "model, not a Core ML package")
        self.path = Path(model).expanduser() if self.coreml else ensure_package(model)
        # speculative decoding (edgert.speculative): a draft model or prompt lookup
        self.draft_path = None if draft_model is None else ensure_package(draft_model)
        self.prompt_lookup, self.num_draft = prompt_lookup, num_draft
        self.draft = None
        self.max_active, self.max_queue = max_active, max_queue
        self.prefill_step_size = prefill_step_size
        self._prefix_bytes = prefix_cache_bytes
        self._prompt_cache = prompt_cache
        self.kv_bits, self.kv_group_size = kv_bits, kv_group_size
        self._inbox: queue.Queue[Job | None] = queue.Queue()
        self._waiting: deque[Job] = deque()
        self._active: list[tuple[Job, Iterator]] = []  # turn-taking jobs
        self._want_batch = batch  # False: turn-taking even where the model could batch
        self._batch = None  # edgert.batching.Batch, where the model batches
        self.max_batch = self.batched_steps = 0  # the largest batch reached; steps run
        self._ready = threading.Event()
        self._load_error: Exception | None = None
        self.model = self.tokenizer = self.prefix = None
        self.config: dict = {}
        self.served = 0
        self._thread = threading.Thread(target=self._run, name="edgert-engine", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._load_error is not None:
            raise self._load_error

    # -- public API (any thread) ------------------------------------------------------------

    @property
    def context_length(self) -> int:
        return int(self.config.get("max_position_embeddings") or 4096)

    def submit(self, job: Job) -> None:
        """Queue a job; raises EdgertError when the queue is full."""
        if self._inbox.qsize() + len(self._waiting) >= self.max_queue:
            raise EdgertError(f"server busy: {self.max_queue} requests already waiting")
        self._inbox.put(job)

    def stats(self) -> dict:
        import mlx.core as mx

        batch = len(self._batch) if self._batch is not None else 0
        return {"active": len(self._active) + batch,
                "waiting": len(self._waiting) + self._inbox.qsize(),
                "served": self.served, "batched": self._batch is not None,
                "batch_size": batch, "max_batch_size": self.max_batch,
                "batched_steps": self.batched_steps, "prefix_cache_entries": len(self.prefix),
                "prefix_cache_bytes": self.prefix.nbytes,
                "prefix_cache_hits": self.prefix.hits,
                "active_memory_bytes": mx.get_active_memory()}

    def close(self) -> None:
        self._inbox.put(None)
        self._thread.join(timeout=30)

    # -- the engine thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            from .package import load_model
            from .prefix_cache import PrefixCache
            from .sample import recommended_sampling
            from .tokenizer import load_tokenizer

            if self.coreml:
                self._load_coreml()
            else:
                self.model, self.config = load_model(self.path)
                self.tokenizer = load_tokenizer(self.path)
            self.defaults = recommended_sampling(self.tokenizer.generation_config)
            self.draft = self._load_drafter()
            from .models.cache import make_cache, quantize_kv

            self.prefix = PrefixCache(self.model, self._prefix_bytes, make=lambda: quantize_kv(
                make_cache(self.model), self.kv_bits, self.kv_group_size))
            if self._prompt_cache is not None:
                n = self.prefix.load(self._prompt_cache, self.path)
                log.info("prompt cache %s: %d tokens", self._prompt_cache, n)
            from .batching import Batch, batchable

            if (self._want_batch and not self.coreml and self.draft is None
                    and not self.kv_bits and batchable(self.model)):
                self._batch = Batch()
        except Exception as e:  # reported to the constructor
            self._load_error = e
            self._ready.set()
            return
        self._ready.set()
        while True:
            if not self._take(block=not self._active and not self._batch):
                break
            if self._batch:
                self._batch_step()
            for job, steps in list(self._active):
                self._advance(job, steps)

    def _load_coreml(self) -> None:
        """The Core ML engine's model (Core ML on macOS 15+, the MIL interpreter elsewhere)
        and the package's tokenizer; its cache snapshots are the states, copied."""
        from .coreml_engine import load_coreml

        logging.getLogger("coremltools").setLevel(logging.ERROR)  # its Linux import warnings
        self.model, self.tokenizer = load_coreml(self.path)
        self.config = {"max_position_embeddings": self.model.context,
                       "vocab_size": self.model.vocab_size}

    def _load_drafter(self):
        from .speculative import DraftModel, PromptLookup, check_vocabularies

        if self.prompt_lookup is not None:
            return PromptLookup(self.prompt_lookup)
        if self.draft_path is None:
            return None
        from .package import load_model
        from .tokenizer import load_tokenizer

        check_vocabularies(self.tokenizer, load_tokenizer(self.draft_path))
        return DraftModel(load_model(self.draft_path)[0])

    def _take(self, block: bool) -> bool:
        """Move arrived jobs into the waiting line and start waiting ones while there is room;
        False once close() asked the thread to stop."""
        while True:
            try:
                job = self._inbox.get(block=block and not self._waiting)
            except queue.Empty:
                break
            if job is None:
                for j, steps in self._active:
                    steps.close()
                return False
            self._waiting.append(job)
            block = False
        while self._waiting and len(self._active) + len(self._batch or ()) < self.max_active:
            job = self._waiting.popleft()
            if job.cancelled:
                continue
            if self._batch is None:
                self._active.append((job, self._generate(job)))
                continue
            try:
                self._start_row(job)
            except Exception as e:  # this request only
                log.error("generation failed: %s: %s", type(e).__name__, e)
                job.emit(Event("error", error=e))
                self.served += 1
        return True

    def _advance(self, job: Job, steps: Iterator) -> None:
        try:
            if job.cancelled:
                steps.close()
                log.info("request cancelled by its client")
                done = True
            else:
                event = next(steps, None)
                done = event is None or event.kind != "delta"
                if event is not None:
                    job.emit(event)
        except Exception as e:  # a failure in one request must not stop the others
            log.error("generation failed: %s: %s", type(e).__name__, e)
            job.emit(Event("error", error=e))
            done = True
        if done:
            self._active = [(j, s) for j, s in self._active if j is not job]
            self.served += 1

    def _prefill(self, ids: list[int], cache: list) -> None:
        import mlx.core as mx

        for i in range(0, len(ids), self.prefill_step_size):
            self.model(mx.array(ids[i:i + self.prefill_step_size], dtype=mx.uint32)[None],
                       cache=cache)
            mx.eval([c.state for c in cache])

    def _sampling(self, job: Job) -> tuple:
        """The job's sampler and logits processors (built on the engine thread)."""
        from .sample import make_logits_processors, make_sampler

        s = job.sampling
        sampler = make_sampler(s.get("temp", 0.0), s.get("top_p", 0.0), s.get("top_k", 0),
                               s.get("min_p", 0.0), s.get("seed"))
        processors = make_logits_processors(s.get("repetition_penalty")) + list(job.processors)
        if job.make_processors is not None:
            processors += job.make_processors()
        return sampler, processors

    def _generate(self, job: Job) -> Iterator[Event]:
        """The events of one job decoded on its own (a turn of one token each): deltas, then
        "done" with the usage."""
        import mlx.core as mx

        from .generation import generate_step
        from .models.cache import trimmable
        from .speculative import SpecStats

        ids = job.prompt
        cache, reused = self.prefix.fetch(ids)
        cached_tokens = reused
        sampler, processors = self._sampling(job)

        def on_prefilled(c: list) -> None:
            # every cache kind: a request that comes while this one decodes reuses its prompt
            self.prefix.store(ids[:-1], c)

        if not trimmable(cache):  # snapshots where later prompts may diverge (a new turn)
            for point in sorted(p for p in job.checkpoints if reused < p < len(ids) - 1):
                self._prefill(ids[reused:point], cache)
                self.prefix.store(ids[:point], cache)
                reused = point
        spec = SpecStats()
        steps = generate_step(mx.array(ids[reused:], dtype=mx.uint32), self.model,
                              max_tokens=job.max_tokens, sampler=sampler,
                              logits_processors=processors, prompt_cache=cache,
                              prefill_step_size=self.prefill_step_size,
                              on_prefilled=on_prefilled, draft=self.draft,
                              num_draft=self.num_draft, history=ids[:reused], stats=spec)
        reply = Reply(self.tokenizer, job)
        try:
            for token, logprobs in steps:
                if job.cancelled:
                    reply.finish = "cancelled"
                    break
                event, stop = reply.feed(token, logprobs)
                if event is not None:
                    yield event
                if stop:
                    break
            if (event := reply.close()) is not None:
                yield event
        finally:
            steps.close()
            offset = max(c.offset for c in cache)
            seen = (ids + reply.generated)[:offset]
            if len(seen) == offset:
                self.prefix.store(seen, cache)
        yield reply.done(cached_tokens, spec)

    # -- batched decode ---------------------------------------------------------------------

    def _start_row(self, job: Job) -> None:
        """Prefill `job` on its own (all of its prompt but the last token) and add it to the
        batch, whose next step feeds that last token."""
        import mlx.core as mx

        from .generation import check_prompt_length

        ids = job.prompt
        cache, reused = self.prefix.fetch(ids)
        if len(ids) - reused <= 1 and cache[0].offset == 0:  # nothing to join the batch with
            self._active.append((job, self._generate(job)))
            return
        sampler, processors = self._sampling(job)
        room = check_prompt_length(self.model, len(ids) - reused, cache)
        self._prefill(ids[reused:-1], cache)
        self.prefix.store(ids[:-1], cache)  # a request arriving meanwhile reuses the prompt
        row = Row(job, Reply(self.tokenizer, job), sampler, processors,
                  tokens=mx.array(ids[reused:], dtype=mx.uint32), next_token=ids[-1],
                  max_tokens=job.max_tokens if room is None else min(job.max_tokens, room),
                  cached_tokens=reused)
        self._batch.add(row, cache)
        self.max_batch = max(self.max_batch, len(self._batch))

    def _batch_step(self) -> None:
        """One model call for every row of the batch, then each row's own sampling, stop
        rules and events; finished, cancelled or failed rows leave the batch."""
        import mlx.core as mx

        from .signals import raise_pending

        for row in [r for r in self._batch.rows if r.job.cancelled]:
            log.info("request cancelled by its client")
            row.reply.finish = "cancelled"
            self._end_row(row, emit=False)
        rows = list(self._batch.rows)
        if not rows:
            return
        y = mx.array([[r.next_token] for r in rows], dtype=mx.uint32)  # (B, 1)
        try:
            logits = self.model(y, cache=self._batch.layers)[:, -1, :]  # (B, V)
        except Exception as e:  # the step failed for every row
            log.error("generation failed: %s: %s", type(e).__name__, e)
            for row in rows:  # their caches may be half-updated: not kept
                row.job.emit(Event("error", error=e))
                self._end_row(row, emit=False, store=False)
            return
        self.batched_steps += 1
        picks = {}
        for b, row in enumerate(rows):
            try:
                picks[row] = row.sample(logits[b:b + 1])
            except Exception as e:  # a grammar that fails, say: this row only
                log.error("generation failed: %s: %s", type(e).__name__, e)
                row.job.emit(Event("error", error=e))
                self._end_row(row, emit=False)
        mx.eval(list(picks.values()))
        raise_pending()
        for row, (token, logprobs) in picks.items():
            token = int(token.item())
            row.n += 1
            event, stop = row.reply.feed(token, logprobs)
            if event is not None:
                row.job.emit(event)
            if stop or row.n >= row.max_tokens:
                self._end_row(row)
            else:
                row.next_token = token

    def _end_row(self, row: "Row", emit: bool = True, store: bool = True) -> None:
        """Take `row` out of the batch: its cache into the prefix cache (a snapshot of its own
        row, as a request decoded alone leaves), then its last events."""
        ids = row.job.prompt
        cache = self._batch.row_cache(row)
        seen = (ids + row.reply.generated)[:cache[0].offset]
        if store and len(seen) == cache[0].offset:
            self.prefix.store(seen, cache)
        self._batch.remove(row)
        self.served += 1
        if emit and not row.job.cancelled:
            if (event := row.reply.close()) is not None:
                row.job.emit(event)
            row.job.emit(row.reply.done(row.cached_tokens))


@dataclass(eq=False)
class Row:
    """A job decoding in the batch: its sampling, and the token its next step feeds."""

    job: Job
    reply: "Reply"
    sampler: Callable
    processors: list
    tokens: Any  # mx.array: what the logits processors have seen (as generate_step keeps it)
    next_token: int
    max_tokens: int
    cached_tokens: int
    n: int = 0  # tokens sampled so far
    first: bool = True

    def sample(self, logits):
        """(token (1,), logprobs (V,)) from this row's (1, V) logits, as generate_step's step
        computes them alone."""
        import mlx.core as mx

        if self.processors:
            if not self.first:
                self.tokens = mx.concatenate(
                    [self.tokens, mx.array([self.next_token], dtype=mx.uint32)])
            for p in self.processors:
                logits = p(self.tokens, logits)
        self.first = False
        logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
        return self.sampler(logprobs), logprobs.squeeze(0)


class Reply:
    """What a job's sampled tokens become: text deltas cut at stop tokens and stop strings,
    logprobs entries, and the usage at the end."""

    def __init__(self, tokenizer, job: Job):
        self.tok, self.job = tokenizer, job
        self.detok, self.stopper = tokenizer.detokenizer(), StopStrings(job.stop)
        self.generated: list[int] = []  # every sampled token, a final stop token included
        self.finish, self.hit, self.pending_lp = "length", False, []

    def feed(self, token: int, logprobs) -> tuple[Event | None, bool]:
        """(a delta to emit or None, whether the reply is complete) for one sampled token."""
        job, tok = self.job, self.tok
        self.generated.append(token)
        if token in tok.eos_token_ids:
            self.finish = "stop"
            return None, True
        if job.logprobs:
            self.pending_lp.append(_top_logprobs(tok, logprobs, token, job.top_logprobs))
        self.detok.add_token(token)
        text, self.hit = self.stopper.feed(self.detok.last_segment)
        if self.hit:
            self.finish = "stop"
            self._tail = text
            return None, True
        if text or (self.pending_lp and not self.stopper.held):
            event = Event("delta", text=text, logprobs=self.pending_lp or None)
            self.pending_lp = []
            return event, False
        return None, False

    def close(self) -> Event | None:
        """The last delta (text held back so far, logprobs not sent yet), if any."""
        if self.hit:
            text = self._tail
        else:
            self.detok.finalize()
            text, self.hit = self.stopper.feed(self.detok.last_segment)
            if self.hit:
                self.finish = "stop"
            else:
                text += self.stopper.flush()
        if text or self.pending_lp:
            return Event("delta", text=text, logprobs=self.pending_lp or None)
        return None

    def done(self, cached_tokens: int, spec=None) -> Event:
        ids, generated, finish = self.job.prompt, self.generated, self.finish
        n_out = len(generated) - (finish == "stop" and not self.hit and bool(generated))
        usage = {"prompt_tokens": len(ids), "completion_tokens": n_out,
                 "total_tokens": len(ids) + n_out,
                 "prompt_tokens_details": {"cached_tokens": cached_tokens}}
        if spec is not None and spec.drafted:  # OpenAI's names for kept / thrown-away tokens
            usage["completion_tokens_details"] = {
                "accepted_prediction_tokens": spec.accepted,
                "rejected_prediction_tokens": spec.drafted - spec.accepted}
        drafts = (f", {spec.accepted}/{spec.drafted} drafts accepted"
                  if spec is not None and spec.drafted else "")
        log.info("prompt %d tok (%d cached), %d generated, finish %s%s",
                 len(ids), cached_tokens, n_out, finish, drafts)
        return Event("done", finish_reason=finish, usage=usage)
