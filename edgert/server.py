"""`edgert serve`: an OpenAI-compatible HTTP server (FastAPI on uvicorn) over one Engine.

Endpoints: POST /v1/chat/completions, POST /v1/completions (server-sent events with
`stream: true`), GET /v1/models, GET /health; the OpenAPI description at /openapi.json and
/docs. Bad input gets an OpenAI-style JSON error (`{"error": {"message", "type", "param",
"code"}}`) with a 4xx status and one log line; the server keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, Event, Job
from .errors import EdgertError

log = logging.getLogger("edgert.server")

MAX_BODY_BYTES = 8 << 20
MAX_TOKENS_LIMIT = 1 << 20  # beyond this a max_tokens is absurd, whatever the context


# -- request models ---------------------------------------------------------------------------

class StreamOptions(BaseModel):
    include_usage: bool = False


class Sampling(BaseModel):
    """The request fields shared by both endpoints; unknown fields are ignored."""

    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    temperature: float | None = Field(None, ge=0, le=100)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1)
    stream: bool = False
    stream_options: StreamOptions | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class Function(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(BaseModel):
    type: Literal["function"] = "function"
    function: Function


class NamedChoice(BaseModel):
    type: Literal["function"] = "function"
    function: Function


class JSONSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str = "response"
    schema_: dict[str, Any] = Field(default_factory=lambda: {"type": "object"}, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaSpec | None = None


class ChatRequest(Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_TOKENS_LIMIT)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedChoice | None = None
    response_format: ResponseFormat | None = None


class CompletionRequest(Sampling):
    prompt: str | list[int]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


# -- errors -----------------------------------------------------------------------------------

class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type_, param, code)


def error_body(message: str, type_: str, param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, type_: str = "invalid_request_error",
                   param: str | None = None, code: str | None = None) -> JSONResponse:
    log.warning("%d %s", status, message)
    return JSONResponse(error_body(message, type_, param, code), status_code=status)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    e = errors[0]
    loc = [str(x) for x in e.get("loc", ()) if x != "body"]
    if e.get("type") == "json_invalid":
        return f"request body is not valid JSON: {e.get('ctx', {}).get('error', e['msg'])}", None
    param = ".".join(loc) or None
    return (f"{param}: {e['msg']}" if param else e["msg"]), param


class BodyLimit:
    """ASGI middleware: refuse request bodies over `limit` bytes with 413, from the
    Content-Length header or while the body arrives."""

    drain_limit = 256 << 20  # bodies up to this are read (and dropped) before the answer

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    @staticmethod
    async def _drain(receive) -> None:
        while True:
            message = await receive()
            if message["type"] != "http.request" or not message.get("more_body"):
                return

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            if length.isdigit() and int(length) <= self.drain_limit:
                await self._drain(receive)  # so that the client reads the answer
            return await self._refuse(send)
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._refuse(send)

    async def _refuse(self, send):
        msg = f"request body larger than {self.limit} bytes"
        log.warning("413 %s", msg)
        body = json.dumps(error_body(msg, "invalid_request_error", code="body_too_large")).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


# -- the app ----------------------------------------------------------------------------------

def _text_content(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    parts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(400, f"message content part of type {part.get('type')!r} is not "
                           "supported (text only)", param="messages")
        parts.append(part["text"])
    return "".join(parts)


class Server:
    """The request handling over an Engine: validation, prompts, jobs and responses."""

    def __init__(self, engine: Engine, model_id: str, default_max_tokens: int = 512):
        from .reasoning import reasoning_format
        from .tools import tool_format

        self.engine, self.model_id = engine, model_id
        self.tool_format = tool_format(engine.tokenizer.chat_template)
        self.reasoning_format = reasoning_format(engine.tokenizer.chat_template)
        self.default_max_tokens = default_max_tokens
        self.created = int(time.time())

    # prompts

    def chat_prompt(self, req: ChatRequest) -> tuple[list[int], list[int]]:
        """The prompt's token ids, and where its last message starts (a snapshot point)."""
        tok = self.engine.tokenizer
        messages = []
        for m in req.messages:
            extra = {k: v for k, v in (m.model_extra or {}).items() if v is not None}
            if isinstance(extra.get("tool_calls"), list):  # templates take arguments as objects
                extra["tool_calls"] = [_arguments_as_object(c) for c in extra["tool_calls"]]
            messages.append({"role": m.role, "content": _text_content(m.content), **extra})
        kwargs = {}
        if self.use_tools(req):
            kwargs["tools"] = [t.model_dump(exclude_none=True) for t in req.tools]
        try:
            text = tok.apply_chat_template(messages, add_generation_prompt=True, **kwargs)
            # where the last message starts: a later turn shares what comes before
            head = (tok.apply_chat_template(messages[:-1], add_generation_prompt=False, **kwargs)
                    if len(messages) > 1 else "")
        except EdgertError as e:
            raise APIError(400, str(e), param="messages") from None
        ids = tok.encode(text, add_special_tokens=not tok.has_chat_template)
        n = len(tok.encode(head, add_special_tokens=not tok.has_chat_template)) if head else 0
        return ids, [n] if text.startswith(head) and 0 < n < len(ids) else []

    def reasoning(self, ids: list[int]) -> tuple[str, bool] | None:
        """(format, whether the prompt `ids` left the reply inside a reasoning block), or None
        for a template without reasoning: the reply's reasoning goes to `reasoning_content`."""
        from .reasoning import prompt_opens_reasoning

        if self.reasoning_format is None:
            return None
        return self.reasoning_format, prompt_opens_reasoning(self.engine.tokenizer, ids,
                                                             self.reasoning_format)

    @staticmethod
    def use_tools(req: ChatRequest) -> bool:
        return bool(req.tools) and req.tool_choice != "none"

    def grammar(self, req: ChatRequest) -> str | None:
        """The grammar the reply must follow (response_format, or a forced tool call)."""
        from .grammar import json_schema_grammar
        from .tools import forced_call_grammar

        choice = req.tool_choice
        if self.use_tools(req) and (choice == "required" or isinstance(choice, NamedChoice)):
            name = choice.function.name if isinstance(choice, NamedChoice) else None
            if name is not None and name not in {t.function.name for t in req.tools}:
                raise APIError(400, f"tool_choice names {name!r}, which is not among the tools",
                               param="tool_choice")
            tok = self.engine.tokenizer
            special = {t: i for t in ("<tool_call>", "</tool_call>", "<|channel|>",
                                      "<|constrain|>", "<|message|>")
                       if (i := tok.special_token_id(t)) is not None}
            return forced_call_grammar([t.model_dump(exclude_none=True) for t in req.tools],
                                       name, self.tool_format, special)
        rf = req.response_format
        if rf is None or rf.type == "text":
            return None
        if rf.type == "json_object":
            return json_schema_grammar({"type": "object"})
        if rf.json_schema is None:
            raise APIError(400, "response_format json_schema needs a json_schema",
                           param="response_format")
        try:
            return json_schema_grammar(rf.json_schema.schema_)
        except EdgertError as e:
            raise APIError(400, str(e), param="response_format",
                           code="invalid_json_schema") from None

    def constrain(self, job: Job, grammar: str) -> None:
        """Give the job a logits processor for `grammar` (400 if llguidance rejects it)."""
        from .grammar import GrammarProcessor, check_grammar, ll_tokenizer

        n_vocab = int(self.engine.config.get("vocab_size") or self.engine.tokenizer.vocab_size)
        ll_tok = ll_tokenizer(self.engine.tokenizer, n_vocab)
        try:
            check_grammar(ll_tok, grammar)
            job.processors.append(GrammarProcessor(ll_tok, grammar))
        except EdgertError as e:
            raise APIError(400, str(e), param="response_format",
                           code="invalid_json_schema") from None

    def completion_prompt(self, req: CompletionRequest) -> list[int]:
        if isinstance(req.prompt, list):
            vocab = self.engine.tokenizer.vocab_size
            if any(not 0 <= t < vocab for t in req.prompt):
                raise APIError(400, f"prompt token ids must lie in [0, {vocab})", param="prompt")
            return list(req.prompt)
        return self.engine.tokenizer.encode(req.prompt)

    # jobs

    def make_job(self, req: Sampling, ids: list[int], max_tokens: int | None, emit,
                 logprobs: bool, top_logprobs: int) -> Job:
        if req.model != self.model_id:
            raise APIError(404, f"model {req.model!r} does not exist; this server serves "
                           f"{self.model_id!r}", param="model", code="model_not_found")
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        ctx = self.engine.context_length
        if len(ids) >= ctx:
            raise APIError(400, f"the prompt is {len(ids)} tokens; this model's context is "
                           f"{ctx} tokens", param="messages", code="context_length_exceeded")
        if max_tokens is None:
            max_tokens = min(self.default_max_tokens, ctx - len(ids))
        elif len(ids) + max_tokens > ctx:
            raise APIError(400, f"this model's context is {ctx} tokens; the request asks for "
                           f"{len(ids) + max_tokens} ({len(ids)} in the prompt, {max_tokens} "
                           "to generate)", param="max_tokens", code="context_length_exceeded")
        d = self.engine.defaults
        sampling = {
            "temp": d.get("temp", 0.0) if req.temperature is None else req.temperature,
            "top_p": d.get("top_p", 0.0) if req.top_p is None else req.top_p,
            "top_k": d.get("top_k", 0) if req.top_k is None else req.top_k,
            "min_p": d.get("min_p", 0.0) if req.min_p is None else req.min_p,
            "repetition_penalty": (d.get("repetition_penalty") if req.repetition_penalty is None
                                   else req.repetition_penalty),
            "seed": req.seed,
        }
        stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        if len(stop) > 16:
            raise APIError(400, "at most 16 stop strings", param="stop")
        return Job(prompt=ids, max_tokens=max_tokens, sampling=sampling, emit=emit, stop=stop,
                   logprobs=logprobs, top_logprobs=top_logprobs)

    def submit(self, job: Job) -> None:
        try:
            self.engine.submit(job)
        except EdgertError as e:
            raise APIError(503, str(e), type_="server_error", code="server_busy") from None

    async def events(self, request: Request, job: Job, events: asyncio.Queue):
        """The job's events as they come; the job is cancelled when the client goes away."""
        try:
            while True:
                try:
                    event = await asyncio.wait_for(events.get(), timeout=0.5)
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        log.info("client went away; stopping its generation")
                        return
                    continue
                yield event
                if event.kind != "delta":
                    return
        finally:
            job.cancelled = True  # no-op once finished; stops it otherwise


def _emitter(loop: asyncio.AbstractEventLoop):
    q: asyncio.Queue[Event] = asyncio.Queue()

    def emit(event: Event) -> None:
        loop.call_soon_threadsafe(q.put_nowait, event)

    return q, emit


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _event_error(event: Event) -> JSONResponse:
    e = event.error
    if isinstance(e, EdgertError):
        return error_response(400, str(e))
    return error_response(500, f"generation failed: {type(e).__name__}", "server_error")


def create_app(engine: Engine, model_id: str, default_max_tokens: int = 512,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The FastAPI application serving `engine` as the model named `model_id`."""
    from . import __version__

    srv = Server(engine, model_id, default_max_tokens)
    app = FastAPI(title="edgert", version=__version__,
                  description="An OpenAI-compatible server for one local model.")
    app.state.server = srv

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.type, exc.param, exc.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.error("internal error: %s: %s", type(exc).__name__, exc)
        return JSONResponse(error_body(f"internal error: {type(exc).__name__}", "server_error"),
                            status_code=500)

    @app.get("/health")
    async def health():
        """Liveness and the engine's counters."""
        return {"status": "ok", "model": model_id, **engine.stats()}

    @app.get("/v1/models")
    async def models():
        """The one model this server serves."""
        return {"object": "list", "data": [
            {"id": model_id, "object": "model", "created": srv.created, "owned_by": "edgert"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        """A chat completion (OpenAI Chat Completions API), streamed with `stream: true`."""
        q, emit = _emitter(asyncio.get_running_loop())
        ids, checkpoints = srv.chat_prompt(req)
        job = srv.make_job(req, ids, req.max_completion_tokens or req.max_tokens, emit,
                           req.logprobs, req.top_logprobs or 0)
        job.checkpoints = checkpoints
        if (grammar := srv.grammar(req)) is not None:
            await asyncio.to_thread(srv.constrain, job, grammar)
        srv.submit(job)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()),
                "model": model_id}
        events = srv.events(request, job, q)
        tools = (srv.tool_format or "any") if srv.use_tools(req) else None
        reasoning = srv.reasoning(ids)
        if req.stream:
            return _stream(events, head, "chat.completion.chunk", req, chat=True, tools=tools,
                           reasoning=reasoning)
        return await _collect(events, head, chat=True, logprobs=job.logprobs, tools=tools,
                              reasoning=reasoning)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        """A text completion (OpenAI Completions API), streamed with `stream: true`."""
        q, emit = _emitter(asyncio.get_running_loop())
        ids = srv.completion_prompt(req)
        job = srv.make_job(req, ids, req.max_tokens, emit, req.logprobs is not None,
                           req.logprobs or 0)
        srv.submit(job)
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_id}
        events = srv.events(request, job, q)
        if req.stream:
            return _stream(events, head, "text_completion", req, chat=False)
        return await _collect(events, head, chat=False, logprobs=job.logprobs,
                              echo=req.prompt if req.echo and isinstance(req.prompt, str) else "")

    return BodyLimit(app, max_body_bytes) if max_body_bytes else app


def _chat_logprobs(entries: list | None) -> dict | None:
    return None if entries is None else {"content": entries}


def _completion_logprobs(entries: list | None) -> dict | None:
    if entries is None:
        return None
    return {"tokens": [e["token"] for e in entries],
            "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]}
                             for e in entries],
            "text_offset": []}


def _tool_calls(text: str, tools: str, found: list | None = None,
                visible: str | None = None) -> tuple[str | None, list[dict]]:
    """(content, tool calls) of a reply. `found`: the harmony calls a reasoning parse of the
    reply already found (with its `visible` content), so the reply is not parsed again."""
    from .tools import harmony_calls, parse_tool_calls

    if tools == "harmony" and found is not None:
        return visible or None, harmony_calls(found)
    if tools != "any":
        return parse_tool_calls(text, tools)
    for fmt in ("hermes", "llama3"):  # a template that names no format: try both
        content, calls = parse_tool_calls(text, fmt)
        if calls:
            return content, calls
    return text, []


def _arguments_as_object(call) -> Any:
    f = call.get("function") if isinstance(call, dict) else None
    if isinstance(f, dict) and isinstance(f.get("arguments"), str):
        try:
            return {**call, "function": {**f, "arguments": json.loads(f["arguments"])}}
        except json.JSONDecodeError:
            pass
    return call


async def _collect(events, head: dict, chat: bool, logprobs: bool, echo: str = "",
                   tools: str | None = None, reasoning: tuple[str, bool] | None = None
                   ) -> JSONResponse:
    text, lps, done = [echo], [], None
    async for event in events:
        if event.kind == "error":
            return _event_error(event)
        if event.kind == "delta":
            text.append(event.text)
            lps.extend(event.logprobs or [])
        else:
            done = event
    if done is None:  # the client left; nobody reads this
        return JSONResponse({}, status_code=499)
    if chat:
        message = {"role": "assistant", "content": "".join(text)}
        finish = done.finish_reason
        raw = message["content"]
        found = None  # harmony: the tool calls the reasoning parse found
        if reasoning:
            from .reasoning import split_reasoning

            thought, message["content"], found = split_reasoning(raw, *reasoning)
            if thought is not None:
                message["reasoning_content"] = thought
        if tools:
            message["content"], calls = _tool_calls(
                raw if tools == "harmony" else message["content"], tools,
                found if reasoning and reasoning[0] == "harmony" else None,
                message["content"])
            if calls:
                message["tool_calls"], finish = calls, "tool_calls"
        choice = {"index": 0, "message": message,
                  "logprobs": _chat_logprobs(lps) if logprobs else None, "finish_reason": finish}
        body = {**head, "object": "chat.completion", "choices": [choice]}
    else:
        choice = {"index": 0, "text": "".join(text),
                  "logprobs": _completion_logprobs(lps) if logprobs else None,
                  "finish_reason": done.finish_reason}
        body = {**head, "object": "text_completion", "choices": [choice]}
    return JSONResponse({**body, "usage": done.usage, "system_fingerprint": "edgert"})


def _stream(events, head: dict, obj: str, req: Sampling, chat: bool,
            tools: str | None = None, reasoning: tuple[str, bool] | None = None
            ) -> StreamingResponse:
    """Server-sent events; with tools the reply is held back until it is complete and then
    sent as content or as tool calls. Reasoning goes out as `reasoning_content` deltas."""
    from .reasoning import ReasoningParser, split_reasoning

    parser = ReasoningParser(*reasoning) if reasoning else None
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(delta_text: str | None, logprobs, finish: str | None, role: bool = False) -> dict:
        if chat:
            delta = {"role": "assistant", "content": ""} if role else (
                {} if delta_text is None else {"content": delta_text})
            choice = {"index": 0, "delta": delta, "logprobs": _chat_logprobs(logprobs),
                      "finish_reason": finish}
        else:
            choice = {"index": 0, "text": delta_text or "",
                      "logprobs": _completion_logprobs(logprobs), "finish_reason": finish}
        body = {**head, "object": obj, "choices": [choice]}
        if include_usage:
            body["usage"] = None
        return body

    async def body():
        if chat:
            yield _sse(chunk(None, None, None, role=True))
        held: list[str] = []
        async for event in events:
            if event.kind == "error":
                e = event.error
                msg = str(e) if isinstance(e, EdgertError) else f"generation failed: {type(e).__name__}"
                yield _sse(error_body(msg, "server_error"))
                break
            if event.kind == "delta":
                if tools:
                    held.append(event.text)
                elif parser:
                    for i, (kind, text) in enumerate(parser.feed(event.text)):
                        yield _sse(_reasoning_delta(
                            chunk(text, None if i else event.logprobs, None), kind))
                else:
                    yield _sse(chunk(event.text, event.logprobs, None))
                continue
            finish = event.finish_reason
            if parser and not tools:
                for kind, text in parser.finish():
                    yield _sse(_reasoning_delta(chunk(text, None, None), kind))
            if tools:
                raw, found, visible = "".join(held), None, None
                if parser:
                    thought, visible, found = split_reasoning(raw, *reasoning)
                    if thought is not None:
                        yield _sse(_reasoning_delta(chunk(thought, None, None), "reasoning"))
                    found = found if reasoning[0] == "harmony" else None
                content, calls = _tool_calls(raw if tools == "harmony" or not parser
                                             else visible, tools, found, visible)
                if content:
                    yield _sse(chunk(content, None, None))
                if calls:
                    c = chunk(None, None, None)
                    c["choices"][0]["delta"] = {"tool_calls": [
                        {"index": i, **call} for i, call in enumerate(calls)]}
                    yield _sse(c)
                    finish = "tool_calls"
            yield _sse(chunk(None if chat else "", None, finish))
            if include_usage:
                yield _sse({**head, "object": obj, "choices": [], "usage": event.usage})
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


def _reasoning_delta(chunk: dict, kind: str) -> dict:
    """A chat chunk whose text is reasoning: sent as `reasoning_content` (llama-server's and
    vLLM's field), not as content."""
    if kind == "reasoning":
        delta = chunk["choices"][0]["delta"]
        delta["reasoning_content"] = delta.pop("content")
    return chunk


def serve(model: str | None, host: str = "127.0.0.1", port: int = 8080, *,
          model_id: str | None = None, max_active: int = 4, batch: bool = True,
          max_queue: int = 64,
          prefix_cache_bytes: int = 1 << 30, default_max_tokens: int = 512,
          prompt_cache=None, kv_bits: int | None = None, kv_group_size: int = 64,
          draft_model=None, prompt_lookup: int | None = None, num_draft: int = 4,
          log_level: str = "info") -> None:
    """Load `model` and serve it until interrupted."""
    import uvicorn

    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    engine = Engine(model, max_active=max_active, batch=batch, max_queue=max_queue,
                    prefix_cache_bytes=prefix_cache_bytes, prompt_cache=prompt_cache,
                    kv_bits=kv_bits, kv_group_size=kv_group_size, draft_model=draft_model,
                    prompt_lookup=prompt_lookup, num_draft=num_draft)
    app = create_app(engine, model_id or default_model_id(model), default_max_tokens)
    log.info("serving %s on http://%s:%d/v1", model_id or default_model_id(model), host, port)
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, access_log=False)
    finally:
        engine.close()


def default_model_id(model: str | None) -> str:
    """The name clients use for the model: a Hugging Face repo id as given, else the file or
    folder name without .gguf."""
    from pathlib import Path

    from .hub import display_name
    from .paths import DEFAULT_MODEL_FILE

    if (repo := display_name(model)) is not None:
        return repo
    name = Path(model).expanduser().name if model else DEFAULT_MODEL_FILE
    return name[:-5] if name.lower().endswith(".gguf") else name
