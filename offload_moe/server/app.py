"""The OpenAI-compatible HTTP server: FastAPI routes over the batching engine.

Routes: POST /v1/chat/completions and /v1/completions (whole or streamed as server-sent
events), GET /v1/models, /v1/stats (JSON for the chat page), /health (503 while the model
loads), /metrics (Prometheus) and / (the chat page, one static file). With an API key every
route but / and /health needs `Authorization: Bearer KEY`. Every error is OpenAI's JSON error
body; nothing a client sends can stop the server.

The model loads in a background thread after the socket is listening, so /health answers
at once; a load that fails is reported by `ServerState.error` and ends `serve()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import threading
from collections.abc import AsyncIterator, Callable
from importlib import resources
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from offload_moe.chat import render_chat_template
from offload_moe.errors import ConfigError, OffloadMoeError
from offload_moe.server.engine import BatchEngine, Delta, Finished, QueueFullError
from offload_moe.server.metrics import RequestCounter, metrics_text
from offload_moe.server.protocol import (APIError, Generation, Reply, check_model, checked_generation,
                                         checked_messages, checked_prompt, new_id)
from offload_moe.server.tools import (CLOSE, ToolRequest, ToolStream, checked_tools, parse_reply, template_messages,
                                      template_takes_tools)

MAX_BODY_BYTES = 4 * 2**20  # far above any prompt a context holds, far below what could hurt the server
DRAIN_BYTES = 16 * MAX_BODY_BYTES
PUBLIC_PATHS = ("/", "/health")


class ServerState:
    """The model, its engine and the counters, shared by the routes. `load` runs in a
    background thread (start_loading); `on_failure` is told when it fails."""

    def __init__(self, load: Callable[[], Any], model_id: str, api_key: str | None = None, max_batch: int = 8,
                 max_queue: int = 32, on_failure: Callable[[BaseException], None] | None = None):
        self.load, self.model_id, self.api_key = load, model_id, api_key
        self.max_batch, self.max_queue, self.on_failure = max_batch, max_queue, on_failure
        self.llm = None
        self.engine: BatchEngine | None = None
        self.error: BaseException | None = None
        self.requests = RequestCounter()
        self.ready = threading.Event()

    def start_loading(self) -> None:
        threading.Thread(target=self._load, name="offload-moe-load", daemon=True).start()

    def _load(self) -> None:
        try:
            llm = self.load()
            engine = BatchEngine(llm, max_batch=self.max_batch, max_queue=self.max_queue)
            engine.start()
            self.llm, self.engine = llm, engine
            self.ready.set()
        except BaseException as exc:  # noqa: BLE001 - reported to serve(), which exits with its line
            self.error = exc
            if self.on_failure is not None:
                self.on_failure(exc)

    def close(self) -> None:
        if self.engine is not None:
            self.engine.stop()
        if self.llm is not None:
            self.llm.close()

    def eos_ids(self) -> frozenset[int]:
        ids = self.llm.model.generation_config.eos_token_id
        ids = set([ids] if isinstance(ids, int) else (ids or []))
        if self.llm.tokenizer is not None and self.llm.tokenizer.eos_token_id is not None:
            ids.add(self.llm.tokenizer.eos_token_id)
        return frozenset(ids)

    def context(self) -> int:
        return int(getattr(self.llm.model.config, "max_position_embeddings", None) or 2**31)


def _error_response(exc: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
    return JSONResponse(exc.body(), status_code=exc.status, headers=headers)


async def _read_json(request: Request) -> dict[str, Any]:
    """The request body as a JSON object, at most MAX_BODY_BYTES (413 beyond). An oversized body
    is still read (up to DRAIN_BYTES, then the connection is dropped) so that the client, still
    sending, gets the 413 instead of a broken pipe."""
    data, size = bytearray(), 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= MAX_BODY_BYTES:
            data += chunk
        elif size > DRAIN_BYTES:
            break
    if size > MAX_BODY_BYTES:
        raise APIError(413, f"the request body is larger than {MAX_BODY_BYTES} bytes", code="request_too_large")
    try:
        body = json.loads(bytes(data).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise APIError(400, f"the request body is not valid JSON ({exc})", code="invalid_json") from None
    if not isinstance(body, dict):
        raise APIError(400, f"the request body must be a JSON object, not {type(body).__name__}", code="invalid_json")
    return body


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _finish_reason(event: Finished) -> str:
    return "length" if event.reason == "length" else "stop"


def _engine_error(event: Finished) -> APIError:
    return APIError(500, event.error or "generation failed", code="generation_failed", type_="server_error")


class _Submission:
    """One request in the engine, its events arriving on an asyncio queue."""

    def __init__(self, engine: BatchEngine, gen: Generation):
        loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()
        self.handle = engine.submit(gen.prompt_ids, gen.params,
                                    lambda event: loop.call_soon_threadsafe(self.events.put_nowait, event))


async def _stream(sub: _Submission, reply: Reply, include_usage: bool,
                  tools: ToolRequest | None = None) -> AsyncIterator[str]:
    """SSE: a role chunk (chat), content chunks (the last one carries finish_reason: one piece
    is held back until the next arrives), a usage chunk if asked, then [DONE]. With tools, text
    that may be a call is held (server.tools.ToolStream) and the calls come as one last chunk.
    A client that goes away cancels the request (its place is freed at the next step)."""
    extra = {"usage": None} if include_usage else {}
    calls: list = []
    tool_stream = None if tools is None else ToolStream(tools)
    try:
        if reply.chat:
            yield _sse({**reply.chunk("", role=True), **extra})
        held = None
        while not isinstance(event := await sub.events.get(), Finished):
            text = event.text if tool_stream is None else tool_stream.feed(event.text)
            if not text:
                continue
            if held is not None:
                yield _sse({**reply.chunk(held), **extra})
            held = text
        if event.reason == "error":
            yield _sse(_engine_error(event).body())
        else:
            if tool_stream is not None:
                rest, calls = tool_stream.finish()
                held = (held or "") + rest if (held or rest) else None
            if calls:
                if held:
                    yield _sse({**reply.chunk(held), **extra})
                yield _sse({**reply.chunk(None, "tool_calls", tool_calls=calls), **extra})
            else:
                yield _sse({**reply.chunk(held, _finish_reason(event)), **extra})
            if include_usage:
                yield _sse(reply.usage_chunk(event.prompt_tokens, event.completion_tokens))
        yield "data: [DONE]\n\n"
    finally:
        sub.handle.cancel()


async def _whole(sub: _Submission, reply: Reply, request: Request, tools: ToolRequest | None = None) -> dict[str, Any]:
    """The whole reply; a client that disconnects meanwhile cancels it."""
    pieces = []
    try:
        while True:
            try:
                event = await asyncio.wait_for(sub.events.get(), timeout=0.5)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise APIError(499, "the client disconnected", code="client_disconnected") from None
                continue
            if isinstance(event, Delta):
                pieces.append(event.text)
                continue
            if event.reason == "error":
                raise _engine_error(event)
            text, calls = "".join(pieces), []
            if tools is not None:
                text, calls = parse_reply(tools.reply_prefix() + text, tools)
            reason = "tool_calls" if calls else _finish_reason(event)
            return reply.whole(text, reason, event.prompt_tokens, event.completion_tokens, calls)
    finally:
        sub.handle.cancel()


def _require_ready(state: ServerState) -> None:
    if not state.ready.is_set():
        raise APIError(503, "the model is still loading; retry when GET /health answers 200", code="model_loading",
                       type_="server_error")


def _chat_prompt(state: ServerState, body: dict) -> tuple[list[int], ToolRequest | None]:
    """The prompt's token ids (with the opening of a forced tool call appended) and the tools."""
    messages = checked_messages(body)
    tools = checked_tools(body)
    tokenizer = state.llm.tokenizer
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise APIError(400, f"the model {state.model_id!r} has no chat template; use /v1/completions",
                       param="messages", code="no_chat_template")
    native = template_takes_tools(tokenizer)
    extra = {"tools": tools.tools} if tools is not None and native else {}
    try:
        rendered = render_chat_template(tokenizer, template_messages(messages, tools, native), state.llm.path,
                                        add_generation_prompt=True, tokenize=True, return_dict=True, **extra)
    except OffloadMoeError as exc:
        raise APIError(400, f"messages: {exc}", param="messages", code="chat_template_error") from None
    ids = list(rendered["input_ids"])
    if tools is not None and tools.reply_prefix():
        ids += tokenizer.encode(tools.reply_prefix(), add_special_tokens=False)
    return ids, tools


def _completion_prompt(state: ServerState, body: dict) -> list[int]:
    prompt = checked_prompt(body)
    if isinstance(prompt, str):
        if state.llm.tokenizer is None:
            raise APIError(400, "prompt: the model has no tokenizer; send token ids", param="prompt")
        return list(state.llm.tokenizer(prompt)["input_ids"])
    try:
        state.llm.token_ids(prompt)  # the API's own check: every id inside the vocabulary
    except ConfigError as exc:
        raise APIError(400, str(exc), param="prompt", code="invalid_value") from None
    return prompt


async def _generate(state: ServerState, request: Request, chat: bool) -> Response:
    _require_ready(state)
    body = await _read_json(request)
    check_model(body, state.model_id)
    prompt_ids, tools = _chat_prompt(state, body) if chat else (_completion_prompt(state, body), None)
    gen = checked_generation(body, prompt_ids, state.context(), state.eos_ids(), "messages" if chat else "prompt")
    if tools is not None and tools.forced is not None:  # one forced call: the reply ends with it
        gen = dataclasses.replace(gen, params=dataclasses.replace(gen.params, stop=gen.params.stop + (CLOSE,)))
    try:
        sub = _Submission(state.engine, gen)
    except QueueFullError as exc:
        raise APIError(429, str(exc), code="queue_full", type_="rate_limit_error") from None
    reply = Reply(new_id("chatcmpl" if chat else "cmpl"), state.model_id, chat)
    if gen.stream:
        return StreamingResponse(_stream(sub, reply, gen.include_usage, tools), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return JSONResponse(await _whole(sub, reply, request, tools))


def _stats(state: ServerState) -> dict[str, Any]:
    if not state.ready.is_set():
        return {"status": "loading"}
    stats = state.llm.stats()
    total, counters = stats["total"], state.engine.counters
    used = total["hits"] + total["misses"]
    return {"hit_rate": total["hit_rate"] if used else None, "hits": total["hits"], "misses": total["misses"],
            "bytes_copied": total["bytes_copied"], "requests": state.requests.total,
            "tokens_in": counters.prompt_tokens, "tokens_out": counters.completion_tokens,
            "tokens_per_second": counters.tokens_per_second(), "active": state.engine.active,
            "queue_length": state.engine.queue_length, "layers": stats["layers"]}


def _check_key(state: ServerState, request: Request) -> None:
    if state.api_key is None or request.url.path in PUBLIC_PATHS:
        return
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), state.api_key.encode()):
        raise APIError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'",
                       code="invalid_api_key")


def create_app(state: ServerState) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        state.start_loading()
        yield
        await asyncio.to_thread(state.close)

    app = FastAPI(title="offload-moe", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    _add_handlers(app, state)
    _add_routes(app, state)
    return app


def _add_handlers(app: FastAPI, state: ServerState) -> None:
    @app.middleware("http")
    async def guard(request: Request, call_next):
        try:
            _check_key(state, request)
            response = await call_next(request)
        except APIError as exc:
            response = _error_response(exc)
        state.requests.count(request.url.path if response.status_code != 404 else "other", response.status_code)
        return response

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError):
        return _error_response(exc)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        what = f"{request.method} {request.url.path}"
        message = f"no route {what}" if exc.status_code == 404 else f"{what}: {exc.detail}"
        return _error_response(APIError(exc.status_code, message, code="not_found" if exc.status_code == 404 else None))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        return _error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}", code="internal_error",
                                        type_="server_error"))


def _add_routes(app: FastAPI, state: ServerState) -> None:
    page = resources.files("offload_moe.server").joinpath("static/chat.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def chat_page():
        return HTMLResponse(page)

    @app.get("/health")
    async def health():
        if state.ready.is_set():
            return {"status": "ok"}
        return JSONResponse({"status": "error" if state.error else "loading"}, status_code=503)

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": state.model_id, "object": "model", "created": 0,
                                            "owned_by": "offload-moe"}]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        check_model({"model": model_id}, state.model_id)
        return {"id": state.model_id, "object": "model", "created": 0, "owned_by": "offload-moe"}

    @app.get("/v1/stats")
    async def stats():
        return _stats(state)

    @app.get("/metrics")
    async def metrics():
        text = metrics_text(state.requests, lambda: state.engine,
                            lambda: state.llm.stats() if state.ready.is_set() else None)
        return Response(text, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await _generate(state, request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await _generate(state, request, chat=False)
