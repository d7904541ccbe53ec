"""The HTTP ingress: a FastAPI app on a Serve deployment, OpenAI-compatible (`/v1/completions`,
`/v1/chat/completions` with SSE streaming, `/v1/models`) plus adapter management, health and stats.

This is the only place where typed errors become HTTP status codes (OpenAI's error body), where the
API key is checked and where body size is limited. The deployment class also inherits the Python
handle API from AppService, so `serve.get_app_handle(app).generate.remote(...)` works too.
It knows nothing about engines or stores beyond what AppService exposes.

No `from __future__ import annotations` here: FastAPI must see real classes in the route signatures
(Serve rebinds the route methods, and string annotations would then not resolve).
"""
import functools
import hmac
import json
import logging
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import BackPressureError

from adapters_store.errors import (
    AdapterNotFoundError, CommitConflictError, CorruptAdapterError, InvalidAdapterNameError,
    StorePermissionError, StoreUnavailableError,
)
from serve.app.config import LimitsConfig
from serve.app.metrics import app_metrics
from serve.app.schemas import (
    ChatCompletionRequest, CompletionRequest, LearnRequest, chat_response, completion_response, model_card,
    openai_error, stream_chunk,
)
from serve.app.service import AppService, OverloadedError

logger = logging.getLogger(__name__)

# Per-process settings the middleware reads; the Ingress constructor fills them (one replica per process).
GUARD = {"api_key": None, "max_body_bytes": LimitsConfig().max_body_bytes}


def configure_guard(api_key: str | None, max_body_bytes: int) -> None:
    # Why a function: Serve pickles the ingress class by value, with a copy of this module's globals;
    # calling a module-level function updates the GUARD that the middleware really reads.
    GUARD.update(api_key=api_key, max_body_bytes=max_body_bytes)

# (exception class, HTTP status, OpenAI error type, code); first match wins, so subclasses come first.
ERROR_MAP = [
    (OverloadedError, 429, "rate_limit_error", "overloaded"),
    (BackPressureError, 503, "server_error", "overloaded"),
    # A worker or the Directory died (or is restarting) under the request: Serve replaces it, a retry works.
    (RayActorError, 503, "server_error", "replica_unavailable"),
    (AdapterNotFoundError, 404, "invalid_request_error", "model_not_found"),
    (InvalidAdapterNameError, 400, "invalid_request_error", "invalid_adapter_name"),
    (ValidationError, 422, "invalid_request_error", "invalid_request"),
    (CommitConflictError, 409, "conflict_error", "commit_conflict"),
    (StoreUnavailableError, 503, "server_error", "store_unavailable"),
    (StorePermissionError, 500, "server_error", "store_permission"),
    # Stored bytes that fail their checksum: the server's data is damaged, not the client's request.
    (CorruptAdapterError, 500, "server_error", "adapter_corrupted"),
    (TimeoutError, 503, "server_error", "timeout"),
    (ValueError, 400, "invalid_request_error", "invalid_request"),
]


def _cause(exc: BaseException) -> BaseException:
    """The user exception inside a RayTaskError (raised in a worker or the Directory)."""
    while getattr(exc, "cause", None) is not None and exc.cause is not exc:
        exc = exc.cause
    return exc


def error_response(exc: BaseException, retry_after_s: int = 1) -> JSONResponse:
    """Map a typed error to (status, OpenAI error body); unknown errors are 500 and logged."""
    exc = _cause(exc)
    for error_class, status, error_type, code in ERROR_MAP:
        if isinstance(exc, error_class):
            param = "model" if status == 404 else None
            headers = {"Retry-After": str(retry_after_s)} if status in (429, 503) else None
            message = _message(exc)
            return JSONResponse(openai_error(message, error_type, param=param, code=code), status, headers=headers)
    logger.exception("internal error", exc_info=exc)
    return JSONResponse(openai_error(f"internal error: {type(exc).__name__}", "server_error"), 500)


def _message(exc: BaseException) -> str:
    if isinstance(exc, RayActorError):  # Ray's text names actor ids, pids and IPs: not for clients
        return "a replica serving this request died or is restarting; retry the request"
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors())
    return str(exc) or type(exc).__name__


class GuardMiddleware:
    """ASGI middleware: Bearer API key on every path (401) and a cap on request body bytes (413)."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if not _authorized(headers.get("authorization", "")):
            body = openai_error("missing or invalid API key (Authorization: Bearer <key>)",
                                "authentication_error", code="invalid_api_key")
            return await JSONResponse(body, 401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
        limit = GUARD["max_body_bytes"]
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            return await _too_large(limit)(scope, receive, send)
        return await self.app(scope, _limited_receive(receive, limit), send)


def _authorized(header: str) -> bool:
    key = GUARD["api_key"]
    if not key:
        return True
    scheme, _, token = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse(openai_error(f"request body over this server's limit of {limit} bytes",
                                     "invalid_request_error", code="body_too_large"), 413)


class _BodyTooLarge(ValueError):
    pass


def _limited_receive(receive, limit: int):
    # Chunked bodies carry no Content-Length: count bytes as they arrive.
    seen = 0

    async def limited():
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _BodyTooLarge(f"request body over this server's limit of {limit} bytes")
        return message
    return limited


app = FastAPI(title="online-llm", version="0.1.0")
app.add_middleware(GuardMiddleware)


def openai_errors(route: str):
    """Decorator for route methods: typed errors -> OpenAI error responses; counts requests per status."""
    def wrap(method):
        @functools.wraps(method)
        async def run(self, *args, **kwargs):
            try:
                response = await method(self, *args, **kwargs)
            except _BodyTooLarge:
                response = _too_large(self.config.limits.max_body_bytes)
            except Exception as exc:  # why broad: every failure must leave as an OpenAI error body
                response = error_response(exc, self.config.queues.retry_after_s)
            app_metrics().request(route, getattr(response, "status_code", 200))
            return response
        return run
    return wrap


async def _prepend(first, rest):
    """`first`, then every item of the async iterator `rest`."""
    yield first
    async for item in rest:
        yield item


def _sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


@serve.ingress(app)
class Ingress(AppService):
    """The ingress deployment: HTTP routes below, handle methods inherited from AppService."""

    def __init__(self, config: dict, workers, directory, store_factory=None):
        super().__init__(config, workers, directory, store_factory)
        configure_guard(self.config.api_key, self.config.limits.max_body_bytes)

    async def _parse(self, request: Request, schema):
        body = await request.json()
        return schema.model_validate(body, context={"limits": self.config.limits})

    async def _resolve_model(self, model: str) -> str | None:
        return await self.resolve(self.adapter_of_model(model), strict=True)

    @app.post("/v1/completions")
    @openai_errors("completions")
    async def completions(self, request: Request):
        body = await self._parse(request, CompletionRequest)
        ref = await self._resolve_model(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if body.stream:
            if len(prompts) != 1:
                raise ValueError("stream: true takes one prompt")
            return await self._stream("text", body.model, prompts[0], ref, body.sampling())
        results = [await self.complete(prompt, ref, body.sampling()) for prompt in prompts]
        return completion_response(body.model, results)

    @app.post("/v1/chat/completions")
    @openai_errors("chat")
    async def chat_completions(self, request: Request):
        body = await self._parse(request, ChatCompletionRequest)
        ref = await self._resolve_model(body.model)
        if body.stream:
            return await self._stream("chat", body.model, body.conversation(), ref, body.sampling())
        return chat_response(body.model, await self.complete(body.conversation(), ref, body.sampling()))

    async def _stream(self, kind: str, model: str, prompt, ref: str | None, sampling: dict):
        """SSE in OpenAI's chunk format, ending with `data: [DONE]`; errors before the first token are
        ordinary error responses (the status line is not sent until the first delta exists)."""
        admission = self.admitted()
        admission.__enter__()
        try:
            deltas = await self.open_stream(prompt, ref, sampling)
            first = await anext(deltas, "")
        except BaseException:
            admission.__exit__(None, None, None)
            raise
        chunk_id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"

        async def events():
            finish_reason = "stop"
            try:
                items = _prepend(first, deltas)
                yield _sse(stream_chunk(kind, chunk_id, model, "", first=True))
                async for item in items:
                    if isinstance(item, dict):  # the worker's final result
                        finish_reason = item.get("finish_reason") or finish_reason
                    elif item:
                        yield _sse(stream_chunk(kind, chunk_id, model, item))
                yield _sse(stream_chunk(kind, chunk_id, model, None, finish_reason=finish_reason))
                yield _sse("[DONE]")
            finally:
                admission.__exit__(None, None, None)
        return StreamingResponse(events(), media_type="text/event-stream")

    @app.get("/v1/models")
    @openai_errors("models")
    async def models(self):
        cards = [model_card(self.base_id, parent=None)]
        cards += [model_card(name, parent=self.base_id) for name in await self.list_adapters()]
        return {"object": "list", "data": cards}

    @app.get("/v1/adapters")
    @openai_errors("adapters")
    async def adapters(self):
        return {"object": "list", "data": await self.list_adapters()}

    @app.get("/v1/adapters/{name}")
    @openai_errors("adapter_info")
    async def adapter_info_route(self, name: str):
        return await self.get_adapter_info(name)

    @app.delete("/v1/adapters/{name}")
    @openai_errors("adapter_delete")
    async def adapter_delete_route(self, name: str, delete_from_disk: bool = True):
        if not await self.delete_adapter(name, delete_from_disk=delete_from_disk):
            raise AdapterNotFoundError(f"adapter {name!r} not found")
        return {"name": name, "deleted": True, "deleted_from_disk": bool(delete_from_disk and self.store)}

    @app.get("/v1/adapters/{name}/revisions")
    @openai_errors("adapter_revisions")
    async def adapter_revisions_route(self, name: str):
        return {"name": name, "revisions": await self.list_revisions(name)}

    @app.post("/v1/adapters/{name}/learn")
    @openai_errors("learn")
    async def learn_route(self, name: str, request: Request):
        body = await self._parse(request, LearnRequest)
        report = await self.learn(body.examples, name, **body.options())
        return {"adapter": name, "revision": report["revision"], "report": report}

    @app.get("/health")
    @openai_errors("health")
    async def health(self):
        # Answers only when the Directory answers; workers are checked by Serve's own health checks.
        directory = await self.directory.stats.remote()
        return {"status": "ok", "workers": len(directory["workers"]), "adapters": directory["adapters"]}

    @app.get("/v1/stats")
    @openai_errors("stats")
    async def stats_route(self, detailed: bool = True):
        return await self.stats(show_detailed=detailed)
