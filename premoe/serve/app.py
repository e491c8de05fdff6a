"""The OpenAI-compatible HTTP API of `premoe serve` (FastAPI).

Endpoints:

- `POST /v1/completions`, `POST /v1/chat/completions`: generation, `stream: true` as server-sent
  events (`data: {...}\\n\\n`, ending with `data: [DONE]`). A request may name its pattern with
  `"premoe": {"task": "math"}`; otherwise it is routed by its prompt. Every response says which
  pattern served it: a `premoe` object in the body (in every stream chunk) and the
  `X-Premoe-Task` header; the body (streaming: each choice's final chunk) adds the request's
  dropped mass and pattern switches (`dropped_mass`, `switches`; miss.py).
- `GET /v1/models`: the served model, with its patterns.
- `GET /health`: liveness and what is resident (no API key needed, for probes).
- `GET /metrics`: Prometheus text (see metrics.py).

Safety: with an API key every endpoint but `/health` needs `Authorization: Bearer KEY`; bodies
above `max_body_bytes` are refused (413); every field is validated and every refusal is a JSON
error in the OpenAI format with a 4xx status. An exception in one request is that request's 500;
the server keeps serving. A client that disconnects (streaming or not) cancels its request.

One module because every endpoint shares the request validation, the key check and the
OpenAI error envelope defined here; the engine and the schemas live in their own modules.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from functools import partial
from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

import premoe
from premoe.serve.decode import SamplingParams
from premoe.serve.engine import Engine
from premoe.serve.metrics import CONTENT_TYPE
from premoe.serve.miss import response_fields
from premoe.serve.requests import EngineConfig, GenRequest, RequestError, RouteInfo
from premoe.serve.schemas import (
    ChatCompletionRequest,
    Choice,
    CompletionRequest,
    chat_chunk,
    chat_logprobs,
    chat_response,
    completion_chunk,
    completion_logprobs,
    completion_response,
    describe_validation_error,
    error_body,
    usage_chunk,
)

log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.5
RETRY_AFTER_S = 1  # the Retry-After of a 429 (queue full) or 503 (shutting down)
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # as OpenAI's legacy completions endpoint


def _error_response(err: RequestError, engine: Engine | None = None) -> JSONResponse:
    if engine is not None:
        engine.metrics.errors.inc(code=str(err.status), type=err.type)
    headers = {}
    if err.status == 401:
        headers["WWW-Authenticate"] = "Bearer"
    elif err.status in (429, 503):  # backpressure: come back later, never a hang
        headers["Retry-After"] = str(RETRY_AFTER_S)
    return JSONResponse(
        error_body(err.message, err.type, err.param, err.code),
        status_code=err.status,
        headers=headers or None,
    )


class _BearerAuth:
    """Every path but /health needs ``Authorization: Bearer KEY``; else a 401 (OpenAI's error
    body). Plain ASGI: Starlette's `BaseHTTPMiddleware` (``@app.middleware``) would pass every
    chunk of every streamed response through a memory stream and a task switch, a large share
    of the event loop's time under many concurrent streams."""

    def __init__(self, app: Any, key: str, engine: Engine) -> None:
        self.app, self.key, self.engine = app, key.encode(), engine

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            err = self._check(dict(scope["headers"]).get(b"authorization", b""))
            if err is not None:
                await _error_response(err, self.engine)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _check(self, header: bytes) -> RequestError | None:
        scheme, _, token = header.decode("latin-1").partition(" ")
        if scheme.lower() != "bearer" or not token:
            msg = "missing API key: send 'Authorization: Bearer KEY'"
            return RequestError(msg, 401, "authentication_error", code="missing_api_key")
        if not hmac.compare_digest(token.strip().encode(), self.key):
            return RequestError(
                "invalid API key", 401, "authentication_error", code="invalid_api_key"
            )
        return None


DISCARD_FACTOR = 8  # a body over the limit is read and dropped up to this many limits


async def _read_json(request: Request, limit: int) -> dict[str, Any]:
    """The JSON object of the body. A body over `limit` is a 413; up to `DISCARD_FACTOR`
    limits of it are read and dropped first, so that the client, still sending, reads the 413
    instead of a reset connection (the guard's body timeout bounds how long that takes)."""
    length = request.headers.get("content-length")
    too_big = False
    if length is not None:
        try:
            too_big = int(length) > limit
        except ValueError:
            raise RequestError("invalid Content-Length header", 400) from None
        if int(length) > DISCARD_FACTOR * limit:
            raise RequestError(
                f"request body is larger than the limit of {limit} bytes", 413, code="too_large"
            )
    body = bytearray()
    seen = 0
    try:
        async for chunk in request.stream():
            seen += len(chunk)
            if seen > limit:
                too_big = True
                body.clear()
                if seen > DISCARD_FACTOR * limit:
                    break
            else:
                body += chunk
    except ClientDisconnect:  # closed by the client, or by the guard's body timeout
        raise RequestError("the client closed the connection", 400, code="disconnected") from None
    if too_big:
        raise RequestError(
            f"request body is larger than the limit of {limit} bytes", 413, code="too_large"
        )

    def bad_constant(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        data = json.loads(bytes(body), parse_constant=bad_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise RequestError(f"the request body is not valid JSON ({exc})", 400) from None
    except RecursionError:
        raise RequestError("the request body is nested too deeply", 400) from None
    try:  # a lone surrogate ("\\ud800") parses but is no text: refuse it here, not in a 500
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise RequestError(
            "the request body holds an invalid string (a lone UTF-16 surrogate)", 400
        ) from None
    except RecursionError:
        raise RequestError("the request body is nested too deeply", 400) from None
    if not isinstance(data, dict):
        raise RequestError("the request body must be a JSON object", 400)
    return data


def _parse(model: type[BaseModel], data: dict[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        message, param = describe_validation_error(exc)
        raise RequestError(message, 400, param=param) from None


class ClientGone(Exception):
    """The client closed the connection while its request was waiting or running."""


async def _next_event(gen: GenRequest, request: Request) -> tuple[str, Any]:
    """The request's next event; cancels it when the client has gone away meanwhile."""
    while True:
        try:
            return await asyncio.wait_for(gen.next_event(), DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                gen.cancel()
                raise ClientGone() from None


def _stream_watches_disconnect(request: Request) -> bool:
    """Whether Starlette's StreamingResponse listens for the client's disconnect itself and
    cancels the stream when it comes (it does under ASGI spec versions below 2.4, as uvicorn's
    h11 server reports); otherwise the stream must poll for it."""
    spec = request.scope.get("asgi", {}).get("spec_version", "2.0")
    return tuple(int(x) for x in spec.split(".")) < (2, 4)


def _sse(obj: Any) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


_SLOT = "\x00premoe-slot\x00"


def _sse_template(chunk: Callable[[str], Any]) -> Callable[[str], bytes]:
    """`lambda text: _sse(chunk(text))`, with `chunk` serialized once: the delta chunks of a
    stream differ only in their text, and re-encoding the rest (ids, model, the premoe fields)
    for every token is most of a chunk's cost."""
    head, slot, tail = _sse(chunk(_SLOT)).partition(json.dumps(_SLOT).encode())
    assert slot, "the chunk does not hold its text"
    return lambda text: head + json.dumps(text).encode() + tail


REF = "#/components/schemas/{model}"


def _body_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The route's OpenAPI requestBody: the handlers read raw JSON (size limit, hostile input)
    and validate it with `model`, so FastAPI cannot infer it."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": REF.format(model=model.__name__)}}},
        }
    }


def openapi_schema(app: FastAPI) -> dict[str, Any]:
    """The app's OpenAPI document, with the request models (and those they use) as
    components."""
    if app.openapi_schema is None:
        doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
        schemas = doc.setdefault("components", {}).setdefault("schemas", {})
        for model in (CompletionRequest, ChatCompletionRequest):
            schema = model.model_json_schema(ref_template=REF)
            schemas.update(schema.pop("$defs", {}))
            schemas[model.__name__] = schema
        app.openapi_schema = doc
    return app.openapi_schema


def create_app(config: EngineConfig, engine: Engine | None = None) -> FastAPI:
    """The FastAPI app serving `config`; the model loads once, in the lifespan (unless
    `engine` is given already loaded), and the decode worker runs while the app does."""
    engine = engine if engine is not None else Engine(config)
    api_key = config.api_key

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not engine.ready:
            await asyncio.to_thread(engine.load)
        engine.start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(
        title="premoe",
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,  # served below, with the request bodies the handlers validate
        version=premoe.__version__,
    )
    app.state.engine = engine

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi() -> JSONResponse:
        return JSONResponse(openapi_schema(app))

    # -- errors ----------------------------------------------------------------------------------
    @app.exception_handler(RequestError)
    async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
        return _error_response(exc, engine)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(RequestError(str(exc.detail), exc.status_code, kind), engine)

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        err = RequestError(f"internal error: {type(exc).__name__}", 500, "server_error")
        return _error_response(err, engine)

    # -- auth ------------------------------------------------------------------------------------
    if api_key is not None:
        app.add_middleware(_BearerAuth, key=api_key, engine=engine)

    # -- info endpoints --------------------------------------------------------------------------
    def _authorized(request: Request) -> bool:
        if api_key is None:
            return True
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(
            token.strip().encode(), api_key.encode()
        )

    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        data = engine.health(detail=_authorized(request))
        return JSONResponse(data, status_code=200 if data["status"] == "ok" else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        engine._update_queue_metric()
        return Response(engine.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": engine.model_name,
                    "object": "model",
                    "created": int(engine.info.get("created", time.time())),
                    "owned_by": "premoe",
                    "max_model_len": engine.max_model_len,
                    "premoe": {
                        "patterns": sorted(engine.patterns),
                        "default_pattern": engine.default_task,
                        "experts_kept": engine.info.get("experts_kept"),
                        "experts_total": engine.info.get("experts_total"),
                    },
                }
            ],
        }

    # -- generation ------------------------------------------------------------------------------
    def _check_model(name: str | None) -> None:
        if name is not None and name != engine.model_name:
            raise RequestError(
                f"the model {name!r} does not exist; this server serves {engine.model_name!r}",
                404,
                "not_found_error",
                param="model",
                code="model_not_found",
            )

    def _params(req: Any, max_tokens: int, index: int = 0) -> SamplingParams:
        logprobs = req.logprobs_count() if hasattr(req, "top_logprobs") else req.logprobs
        seed = req.seed
        if seed is not None and index:  # as vLLM: choice i of n draws with seed + i
            seed = seed + index
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=float(req.temperature),
            top_p=float(req.top_p),
            stop=tuple(req.stop_list()),
            seed=seed,
            top_k=int(req.top_k),
            min_p=float(req.min_p),
            presence_penalty=float(req.presence_penalty),
            frequency_penalty=float(req.frequency_penalty),
            repetition_penalty=float(req.repetition_penalty),
            logprobs=logprobs,
            stop_token_ids=tuple(req.stop_token_ids or ()),
            ignore_eos=bool(req.ignore_eos),
        )

    def _logprobs(gen: GenRequest, chat: bool, start: int = 0, offset: int = 0) -> Any:
        """The OpenAI logprobs object of `gen`'s tokens from `start` (None when not asked)."""
        if gen.params.logprobs is None:
            return None
        entries = [
            (
                engine.token_text(t.token),
                t.logprob,
                [(engine.token_text(i), v) for i, v in t.top],
            )
            for t in gen.logprobs[start:]
        ]
        return chat_logprobs(entries) if chat else completion_logprobs(entries, offset)

    async def _events(
        gens: list[GenRequest], request: Request, poll: bool = True
    ) -> AsyncIterator[tuple[int, str, Any]]:
        """(choice index, kind, value) of every generation, merged as they come; each ends
        with its "finish" or "error". A client that leaves cancels all of them: found by
        polling every DISCONNECT_POLL_S while no event comes (`poll`), or by the caller's task
        being cancelled (a streaming response whose server listens for the disconnect)."""
        queue: asyncio.Queue[list[tuple[int, str, Any]]] = asyncio.Queue()

        def bounded(aw: Any) -> Any:  # no wait_for without a poll: on 3.11 a task per chunk
            return asyncio.wait_for(aw, DISCONNECT_POLL_S) if poll else aw

        async def pump(i: int, gen: GenRequest) -> None:
            while True:
                events = await gen.next_events()
                await queue.put([(i, kind, value) for kind, value in events])
                if events[-1][0] in ("finish", "error"):
                    return

        # one generation (n = 1, the common case) is read directly; several through a pump each
        tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(gens)] if gens[1:] else []
        left = len(gens)
        try:
            while left:
                try:
                    if tasks:
                        items = await bounded(queue.get())
                    else:
                        events = await bounded(gens[0].next_events())
                        items = [(0, kind, value) for kind, value in events]
                except asyncio.TimeoutError:
                    if await request.is_disconnected():
                        raise ClientGone() from None
                    continue
                for item in items:
                    if item[1] == "route":
                        continue
                    if item[1] in ("finish", "error"):
                        left -= 1
                    yield item
        finally:
            for t in tasks:
                t.cancel()
            for g in gens:
                if g.finish_reason is None:
                    g.cancel()

    async def _generate(
        request: Request,
        endpoint: str,
        req: Any,
        prompt_ids: list[int],
        route_text: str,
        max_tokens: int,
    ) -> Response:
        if getattr(req, "top_logprobs", None) and not getattr(req, "logprobs", None):
            raise RequestError("top_logprobs needs logprobs: true", 400, param="top_logprobs")
        first = engine.submit(prompt_ids, route_text, _params(req, max_tokens), task=req.task)
        try:
            kind, value = await _next_event(first, request)
        except (ClientGone, asyncio.CancelledError):
            first.cancel()
            engine.metrics.requests.inc(task="-", endpoint=endpoint, status="cancelled")
            return Response(status_code=499)
        if kind == "error":
            engine.metrics.requests.inc(task="-", endpoint=endpoint, status="error")
            raise value
        route: RouteInfo = value
        gens = [first]
        try:  # choices 2..n: the same pattern as the first (routed once)
            for i in range(1, req.n):
                gens.append(
                    engine.submit(
                        prompt_ids, route_text, _params(req, max_tokens, i), task=route.task
                    )
                )
        except RequestError:
            for g in gens:
                g.cancel()
            raise
        premoe = {**route.as_json(), "routers": engine.pattern_routers.label(route.task)}
        headers = {"X-Premoe-Task": route.task, "X-Request-Id": first.id}
        rid = ("cmpl-" if endpoint == "completions" else "chatcmpl-") + first.id
        created = int(time.time())
        chat = endpoint == "chat.completions"
        log.info(
            "request %s: %s, pattern %s, %d prompt tokens, n=%d",
            first.id,
            endpoint,
            route.task,
            len(prompt_ids),
            req.n,
        )
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(
                _stream(gens, request, rid, created, chat, premoe, endpoint, include_usage),
                media_type="text/event-stream",
                headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        parts: list[list[str]] = [[] for _ in gens]
        try:
            async for i, kind, value in _events(gens, request):
                if kind == "delta":
                    parts[i].append(value)
                elif kind == "error":
                    engine.metrics.requests.inc(task=route.task, endpoint=endpoint, status="error")
                    raise value
        except (ClientGone, asyncio.CancelledError):
            engine.metrics.requests.inc(task=route.task, endpoint=endpoint, status="cancelled")
            log.info("request %s: the client left", first.id)
            return Response(status_code=499)
        engine.metrics.requests.inc(task=route.task, endpoint=endpoint, status="ok")
        choices = [
            Choice("".join(parts[i]), g.finish_reason, g.completion_tokens, _logprobs(g, chat))
            for i, g in enumerate(gens)
        ]
        build = chat_response if chat else completion_response
        premoe = {**premoe, **response_fields(gens)}  # dropped mass, reroutes (miss.py)
        body = build(rid, engine.model_name, choices, len(prompt_ids), premoe, created)
        return JSONResponse(body, headers=headers)

    async def _stream(
        gens: list[GenRequest],
        request: Request,
        rid: str,
        created: int,
        chat: bool,
        premoe: dict[str, Any],
        endpoint: str,
        include_usage: bool,
    ) -> AsyncIterator[bytes]:
        model = engine.model_name
        status = "cancelled"
        sent = [0] * len(gens)  # logprob entries sent per choice
        offset = [0] * len(gens)  # text characters sent per choice

        def new_logprobs(i: int) -> Any:
            g = gens[i]
            lp = _logprobs(g, chat, sent[i], offset[i])
            sent[i] = len(g.logprobs)
            return lp

        def delta_chunk(i: int, text: str, lp: Any = None) -> Any:
            if chat:
                return chat_chunk(rid, model, {"content": text}, None, premoe, created, i, lp)
            return completion_chunk(rid, model, text, None, premoe, created, i, lp)

        plain: dict[int, Callable[[str], bytes]] = {}  # choice -> its delta chunk, no logprobs

        try:
            if chat:
                for i in range(len(gens)):
                    delta = {"role": "assistant", "content": ""}
                    yield _sse(chat_chunk(rid, model, delta, None, premoe, created, i))
            poll = not _stream_watches_disconnect(request)
            async for i, kind, value in _events(gens, request, poll):
                if kind == "delta":
                    lp = new_logprobs(i)
                    offset[i] += len(value)
                    if lp is not None:
                        yield _sse(delta_chunk(i, value, lp))
                        continue
                    if i not in plain:
                        plain[i] = _sse_template(partial(delta_chunk, i))
                    yield plain[i](value)
                elif kind == "finish":
                    lp = new_logprobs(i)
                    last = {**premoe, **response_fields([gens[i]])}  # dropped mass, reroutes
                    if chat:
                        yield _sse(chat_chunk(rid, model, {}, value, last, created, i, lp))
                    else:
                        yield _sse(completion_chunk(rid, model, "", value, last, created, i, lp))
                elif kind == "error":
                    err: RequestError = value
                    status = "error"
                    engine.metrics.errors.inc(code=str(err.status), type=err.type)
                    yield _sse(error_body(err.message, err.type, err.param, err.code))
                    yield b"data: [DONE]\n\n"
                    return
            if include_usage:
                obj = "chat.completion.chunk" if chat else "text_completion"
                done = sum(g.completion_tokens for g in gens)
                prompt = len(gens[0].prompt_ids)
                yield _sse(usage_chunk(rid, model, obj, created, prompt, done))
            status = "ok"
            yield b"data: [DONE]\n\n"
        except (ClientGone, asyncio.CancelledError) as gone:
            log.info("request %s: the client left mid-stream", gens[0].id)
            if isinstance(gone, asyncio.CancelledError):
                raise
        finally:
            for g in gens:
                if g.finish_reason is None:
                    g.cancel()
            engine.metrics.requests.inc(task=premoe["task"], endpoint=endpoint, status=status)

    @app.post("/v1/completions", openapi_extra=_body_schema(CompletionRequest))
    async def completions(request: Request) -> Response:
        data = await _read_json(request, config.max_body_bytes)
        req: CompletionRequest = _parse(CompletionRequest, data)
        _check_model(req.model)
        text = req.prompt_text()
        ids = await asyncio.to_thread(engine.encode_prompt, text)
        max_tokens = engine.resolve_max_tokens(
            len(ids), req.requested_max_tokens(), COMPLETIONS_DEFAULT_MAX_TOKENS
        )
        return await _generate(request, "completions", req, ids, text, max_tokens)

    @app.post("/v1/chat/completions", openapi_extra=_body_schema(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        data = await _read_json(request, config.max_body_bytes)
        req: ChatCompletionRequest = _parse(ChatCompletionRequest, data)
        _check_model(req.model)
        messages = [{"role": m.role, "content": m.text()} for m in req.messages]
        ids = await asyncio.to_thread(engine.encode_chat, messages)
        max_tokens = engine.resolve_max_tokens(len(ids), req.requested_max_tokens(), None)
        route_text = "\n".join(m["content"] for m in messages if m["role"] == "user") or (
            "\n".join(m["content"] for m in messages)
        )
        return await _generate(request, "chat.completions", req, ids, route_text, max_tokens)

    return app
