"""The Starlette app: OpenAI routes, health, metrics, and the guards in front of them.

Every answer that is not a success has the OpenAI error shape, whichever layer produced it:
the guard middleware (401 without the API key, 413 for a declared body over the limit), the
router (404 unknown route, 405 wrong method), a handler (`APIError`: 400/404/413/429/503), or an
unexpected exception (500). The guard also counts requests by route and status for /metrics.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.chat import ChatReply, render_prompt
from serving.completion import CompletionReply
from serving.errors import APIError, bad_request, from_param_error, from_validation_error
from serving.handler import Reply, handle
from serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    ParamError,
    TokenizeRequest,
    TokenizeResponse,
)
from serving.state import ServerState

log = logging.getLogger("serving.app")
M = TypeVar("M", bound=BaseModel)

ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/models", "/health", "/metrics")
Endpoint = Callable[[Request], Awaitable[Response]]


async def read_json(request: Request, limit: int) -> Any:
    """The body as JSON; 413 past `limit` bytes (also when no Content-Length was sent)."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(
                413, f"The request body is larger than this server's limit of {limit} bytes.", code="request_too_large"
            )
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except ValueError as e:
        raise APIError(
            400,
            f"We could not parse the JSON body of your request ({e}). The body must be a JSON object.",
            code="invalid_json",
        ) from e
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    return body


def parse(model: type[M], body: dict[str, Any]) -> M:
    try:
        return model.model_validate(body)
    except ValidationError as e:
        raise from_validation_error(e) from e


async def _body_request(request: Request, model: type[M]) -> tuple[ServerState, M]:
    state: ServerState = request.app.state.server
    state.ready_engine()  # 503 first: no point validating while loading or stopping
    req = parse(model, await read_json(request, state.config.max_body_bytes))
    try:
        req.check()  # type: ignore[attr-defined]
    except ParamError as e:
        raise from_param_error(e) from e
    return state, req


def generation_route(model: type[ChatCompletionRequest | CompletionRequest], reply: type[Reply]) -> Endpoint:
    """The endpoint of a generation route: its request schema, then the handler both routes share."""

    async def endpoint(request: Request) -> Response:
        state, req = await _body_request(request, model)
        return await handle(request, state, reply, req)

    return endpoint


def _card(state: ServerState) -> ModelCard:
    return ModelCard(id=state.model_name, created=state.created)


async def list_models(request: Request) -> Response:
    state: ServerState = request.app.state.server
    state.ready_engine()
    return JSONResponse(ModelList(data=[_card(state)]).model_dump())


async def get_model(request: Request) -> Response:
    state: ServerState = request.app.state.server
    state.ready_engine()
    state.check_model(request.path_params["model_id"])
    return JSONResponse(_card(state).model_dump())


async def tokenize(request: Request) -> Response:
    state, req = await _body_request(request, TokenizeRequest)
    engine = state.ready_engine()
    if req.model is not None:
        state.check_model(req.model)
    tok = engine.tokenizer
    if req.messages is not None:  # special tokens: the template's, plus a BOS if asked and missing
        add = bool(req.add_generation_prompt)
        ids = render_prompt(tok, req.messages, template=state.chat_template, add_generation_prompt=add)
        if req.add_special_tokens and tok.bos_token_id is not None and ids[:1] != [tok.bos_token_id]:
            ids = [tok.bos_token_id, *ids]
    else:
        ids = engine.tokenizer.encode(req.prompt or "", add_special_tokens=req.add_special_tokens is not False)
    strs = engine.tokenizer.convert_ids_to_tokens(ids) if req.return_token_strs else None
    out = TokenizeResponse(count=len(ids), max_model_len=engine.max_seq_len, tokens=ids, token_strs=strs)
    return JSONResponse(out.model_dump())


async def detokenize(request: Request) -> Response:
    state, req = await _body_request(request, DetokenizeRequest)
    engine = state.ready_engine()
    if req.model is not None:
        state.check_model(req.model)
    if any(not 0 <= t < engine.vocab_size for t in req.tokens):
        raise bad_request(f"'tokens' holds an id outside the vocabulary (0..{engine.vocab_size - 1})", "tokens")
    return JSONResponse(DetokenizeResponse(prompt=engine.tokenizer.decode(req.tokens)).model_dump())


async def health(request: Request) -> Response:
    """200 while requests are taken; 503 while loading, shutting down, or with a broken engine."""
    state: ServerState = request.app.state.server
    state.ready_engine()
    return JSONResponse({"status": "ok"})


async def metrics(request: Request) -> Response:
    state: ServerState = request.app.state.server
    body, content_type = state.metrics.render()
    return Response(body, media_type=content_type)


# ---- errors ------------------------------------------------------------------------------------


async def _api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, APIError)
    return exc.response()


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        error = APIError(404, f"Unknown route: {request.method} {request.url.path}", code="unknown_url")
    elif exc.status_code == 405:
        error = APIError(
            405, f"Method {request.method} is not allowed on {request.url.path}", code="method_not_allowed"
        )
    else:
        error = APIError(exc.status_code, exc.detail)
    error.headers = {**(exc.headers or {}), **(error.headers or {})}
    return error.response()


class GuardMiddleware:
    """API key, declared body size, and the request counter, in front of the routes; and the 500
    of an unexpected exception, with its trace in the log. (Starlette's own handler for those
    re-raises after answering, and uvicorn then drops the keep-alive connection the client may
    already be sending its next request on.)"""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        route = next((r for r in ROUTES if path == r or path.startswith(r + "/")), "other")
        status: list[int | None] = [None]  # once the response has started

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await refusal.response()(scope, receive, counting_send)
            else:
                await self.app(scope, receive, counting_send)
        except Exception as exc:
            if status[0] is not None:  # too late for an error answer: uvicorn ends the connection
                raise
            log.exception("internal error on %s %s", scope["method"], path)
            await APIError(500, f"Internal server error: {type(exc).__name__}").response()(
                scope, receive, counting_send
            )
        finally:
            self.state.metrics.requests.labels(route=route, status=str(status[0] or 500)).inc()

    def _refusal(self, scope: Scope) -> APIError | None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        key = self.state.config.api_key
        if key is not None and scope["path"].startswith("/v1/"):
            given = headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
                return APIError(
                    401,
                    "Incorrect or missing API key: send it as `Authorization: Bearer KEY`.",
                    code="invalid_api_key",
                )
        length = headers.get("content-length", "")
        limit = self.state.config.max_body_bytes
        if length.isdigit() and int(length) > limit:
            return APIError(
                413, f"The request body is larger than this server's limit of {limit} bytes.", code="request_too_large"
            )
        return None


def build_app(state: ServerState) -> Starlette:
    routes = [
        Route("/v1/chat/completions", generation_route(ChatCompletionRequest, ChatReply), methods=["POST"]),
        Route("/v1/completions", generation_route(CompletionRequest, CompletionReply), methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
    ]
    handlers = {APIError: _api_error, HTTPException: _http_error}
    app = Starlette(routes=routes, exception_handlers=handlers)  # type: ignore[arg-type]
    app.state.server = state
    app.add_middleware(GuardMiddleware, state=state)
    return app
