"""Every error the server answers, in the OpenAI shape `{"error": {message, type, param, code}}`."""

from __future__ import annotations

import math
import re
from typing import Any

from pydantic import ValidationError
from starlette.responses import JSONResponse

from graph.api import (
    EngineBrokenError,
    EngineError,
    EngineStoppedError,
    InvalidRequestError,
    QueueFullError,
    RequestTooLargeError,
)
from serving.protocol import ErrorInfo, ErrorResponse, ParamError

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """An error answer: raise it anywhere in a handler and the client gets it as is."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers

    def body(self) -> dict[str, Any]:
        info = ErrorInfo(
            message=self.message, type=_TYPES.get(self.status, "server_error"), param=self.param, code=self.code
        )
        return ErrorResponse(error=info).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def engine_unavailable(reason: str) -> APIError:
    return APIError(503, f"The engine cannot serve requests: {reason}.", code="engine_unavailable")


# ---- pydantic validation errors -> one clear message ---------------------------------------------

_UNION_TAG = re.compile(r"^(str|int|float|bool|dict|list|none)$|\[")
_EXPECTED = (  # union member tag (prefix) -> what it accepts, in words
    ("str", "a string"),
    ("list[str]", "a list of strings"),
    ("list[int]", "a list of token ids"),
    ("list[list[int]]", "a list of token-id lists"),
    ("list[", "a list of content parts"),
)


def _expected(tag: str) -> str | None:
    for prefix, words in _EXPECTED:
        if tag == prefix or (prefix.endswith("[") and tag.startswith(prefix)):
            return words
    return None


def _param(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not _UNION_TAG.search(str(part)):
            out += f".{part}" if out else str(part)
    return out


def _split_union(loc: tuple[Any, ...]) -> tuple[tuple[Any, ...], str | None]:
    """-> (the location up to the first union member tag, that tag)."""
    for i, part in enumerate(loc):
        if isinstance(part, str) and _UNION_TAG.search(part):
            return loc[:i], part
    return loc, None


def from_validation_error(error: ValidationError) -> APIError:
    """The first problem of a request, named by its parameter path (e.g. `messages[0].content`)."""
    errors = error.errors(include_url=False)
    first = next((e for e in errors if e["type"] == "value_error"), errors[0])
    param = _param(first["loc"])
    kind = first["type"]
    if kind == "extra_forbidden":
        return bad_request(f"Unrecognized request argument supplied: {param}", param, "unknown_parameter")
    if kind == "missing":
        return bad_request(f"Missing required parameter: '{param}'.", param, "missing_required_parameter")
    if kind == "value_error":
        message = str(first["ctx"]["error"]) if "ctx" in first else first["msg"]
        code = "not_supported" if "not supported" in message else "invalid_value"
        return bad_request(message, param, code)
    prefix, _ = _split_union(first["loc"])
    tags = [tag for e in errors for p, tag in [_split_union(e["loc"])] if p == prefix and tag]
    expected_each = [_expected(t) for t in tags]
    if len(tags) > 1 and all(expected_each):  # a union: say what would have been fine
        union = _param(prefix)
        expected = " or ".join(dict.fromkeys(e for e in expected_each if e))
        return bad_request(f"Invalid type for '{union}': expected {expected}.", union, "invalid_type")
    return bad_request(f"Invalid value for '{param}': {first['msg']}.", param, "invalid_value")


def from_param_error(error: ParamError) -> APIError:
    return bad_request(error.message, error.param, "invalid_value")


def from_engine_error(
    error: EngineError, param: str | None = None, param_names: dict[str, str] | None = None
) -> APIError:
    """Errors of `Engine.submit` -> their HTTP answer; `param` names the prompt (messages | prompt),
    `param_names` the request parameters of `SamplingParams` fields named otherwise."""
    if isinstance(error, QueueFullError):
        retry = str(max(1, math.ceil(error.retry_after)))
        return APIError(
            429, f"The server is busy: {error}. Retry later.", code="queue_full", headers={"Retry-After": retry}
        )
    if isinstance(error, RequestTooLargeError):
        return bad_request(str(error), param, "context_length_exceeded")
    if isinstance(error, InvalidRequestError):
        named = (param_names or {}).get(error.param or "", error.param)
        return bad_request(str(error), named or param, "invalid_value")
    if isinstance(error, EngineBrokenError):
        return engine_unavailable(str(error))
    if isinstance(error, EngineStoppedError):
        return APIError(503, "The server is shutting down and takes no new requests.", code="shutting_down")
    return APIError(500, f"Internal error: {type(error).__name__}: {error}")
