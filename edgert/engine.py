"""The serving engine: one model, one generation thread, requests interleaved token by token.

Every MLX operation runs on the engine's own thread (MLX streams belong to the thread that made
them), so the model is loaded there too. Up to `max_active` requests decode at once, one token
each in turn (round robin); the rest wait in arrival order, so no request starves another.
A request is a `Job`: its tokens, sampling and stop rules in, `Event`s out through `emit`
(called on the engine thread). Setting `job.cancelled` stops it at its next token.
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
                 max_queue: int = 64, prefix_cache_bytes: int = 1 << 30,
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
        self._active: list[tuple[Job, Iterator]] = []
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

        return {"active": len(self._active), "waiting": len(self._waiting) + self._inbox.qsize(),
                "served": self.served, "prefix_cache_entries": len(self.prefix),
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
        except Exception as e:  # reported to the constructor
            self._load_error = e
            self._ready.set()
            return
        self._ready.set()
        while True:
            if not self._take(block=not self._active):
                break
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
        while self._waiting and len(self._active) < self.max_active:
            job = self._waiting.popleft()
            if job.cancelled:
                continue
            self._active.append((job, self._generate(job)))
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

    def _generate(self, job: Job) -> Iterator[Event]:
        """The events of one job: deltas, then "done" with the usage."""
        import mlx.core as mx

        from .generation import generate_step
        from .models.cache import trimmable
        from .sample import make_logits_processors, make_sampler
        from .speculative import SpecStats

        tok, ids = self.tokenizer, job.prompt
        cache, reused = self.prefix.fetch(ids)
        cached_tokens = reused
        s = job.sampling
        sampler = make_sampler(s.get("temp", 0.0), s.get("top_p", 0.0), s.get("top_k", 0),
                               s.get("min_p", 0.0), s.get("seed"))
        processors = make_logits_processors(s.get("repetition_penalty")) + list(job.processors)
        if job.make_processors is not None:
            processors += job.make_processors()

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
        detok, stopper = tok.detokenizer(), StopStrings(job.stop)
        generated: list[int] = []  # every sampled token, a final stop token included
        finish, hit, pending_lp = "length", False, []
        try:
            for token, logprobs in steps:
                if job.cancelled:
                    finish = "cancelled"
                    break
                generated.append(token)
                if token in tok.eos_token_ids:
                    finish = "stop"
                    break
                if job.logprobs:
                    pending_lp.append(_top_logprobs(tok, logprobs, token, job.top_logprobs))
                detok.add_token(token)
                text, hit = stopper.feed(detok.last_segment)
                if hit:
                    break
                if text or (pending_lp and not stopper.held):
                    yield Event("delta", text=text, logprobs=pending_lp or None)
                    pending_lp = []
            if not hit:
                detok.finalize()
                text, hit = stopper.feed(detok.last_segment)
                if not hit:
                    text += stopper.flush()
            if hit:
                finish = "stop"
            if text or pending_lp:
                yield Event("delta", text=text, logprobs=pending_lp or None)
        finally:
            steps.close()
            offset = max(c.offset for c in cache)
            seen = (ids + generated)[:offset]
            if len(seen) == offset:
                self.prefix.store(seen, cache)
        n_out = len(generated) - (finish == "stop" and not hit and bool(generated))
        usage = {"prompt_tokens": len(ids), "completion_tokens": n_out,
                 "total_tokens": len(ids) + n_out,
                 "prompt_tokens_details": {"cached_tokens": cached_tokens}}
        if spec.drafted:  # OpenAI's names for predicted tokens that were kept / thrown away
            usage["completion_tokens_details"] = {
                "accepted_prediction_tokens": spec.accepted,
                "rejected_prediction_tokens": spec.drafted - spec.accepted}
        log.info("prompt %d tok (%d cached), %d generated, finish %s%s",
                 len(ids), cached_tokens, n_out, finish,
                 f", {spec.accepted}/{spec.drafted} drafts accepted" if spec.drafted else "")
        yield Event("done", finish_reason=finish, usage=usage)
