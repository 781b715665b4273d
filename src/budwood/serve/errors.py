"""The one place where the HTTP surfaces turn errors into OpenAI's error object.

Domain code raises `BudwoodError` with a `kind` (and maybe a `code` and the `param` it is about) and
knows nothing of HTTP; `install_error_handlers` maps each kind to a status here, for every app
`create_app` returns, so the inference routes, the registry and the fine-tuning service answer alike:
{"error": {"message", "type", "param", "code"}}. `APIError` stays for a route of another package that
needs a status no kind names.
"""
from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from budwood.errors import BudwoodError, ErrorKind
from budwood.serve.protocol import APIError, error_body

log = logging.getLogger(__name__)

STATUS: dict[ErrorKind, int] = {
    ErrorKind.INVALID: 400, ErrorKind.UNAUTHENTICATED: 401, ErrorKind.FORBIDDEN: 403, ErrorKind.NOT_FOUND: 404,
    ErrorKind.CONFLICT: 409, ErrorKind.TOO_LARGE: 413, ErrorKind.LIMIT: 429, ErrorKind.QUOTA: 429,
    ErrorKind.UNAVAILABLE: 503, ErrorKind.CANCELLED: 499, ErrorKind.INTERNAL: 500,
}
# OpenAI's error `type`; every kind not named here is an "invalid_request_error"
ERROR_TYPE: dict[ErrorKind, str] = {
    ErrorKind.FORBIDDEN: "permission_error", ErrorKind.LIMIT: "rate_limit_exceeded",
    ErrorKind.QUOTA: "insufficient_quota", ErrorKind.UNAVAILABLE: "server_error", ErrorKind.INTERNAL: "server_error",
}
# how pydantic names the member of a union in an error's location: literal['auto'], constrained-int, int
_UNION_MEMBER = re.compile(r"^([a-z_-]+\[.*\]|constrained-[a-z]+|function-[a-z-]+|int|float|str|bool|dict|list|none)$")


def error_content(e: APIError | BudwoodError) -> tuple[int, dict]:
    """(status, body) for a refusal; the SSE stream sends the same body when a stream fails midway."""
    if isinstance(e, APIError):
        return e.status, e.body
    return STATUS[e.kind], error_body(str(e), ERROR_TYPE.get(e.kind, "invalid_request_error"), e.param, e.code)


def validation_error_body(e: RequestValidationError) -> dict:
    """The first problem pydantic found, named by its request field; for a union field pydantic reports
    one error per member, and the one that is not "should be 'auto'" is the one a person needs."""
    errors = e.errors()
    err = next((x for x in errors if x.get("type") != "literal_error"), errors[0])
    loc = [str(x) for x in err.get("loc", []) if x != "body" and not _UNION_MEMBER.match(str(x))]
    param = ".".join(loc) or None
    if err.get("type") == "json_invalid":
        message = "The request body is not valid JSON."
    else:
        shown = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
        message = f"{param or 'body'}: {err.get('msg')}{shown}"
    return error_body(message, param=param, code="invalid_value" if param else None)


async def _refusal(request: Request, e: APIError | BudwoodError) -> JSONResponse:
    status, body = error_content(e)
    return JSONResponse(body, status_code=status)


async def _invalid_request(request: Request, e: RequestValidationError) -> JSONResponse:
    return JSONResponse(validation_error_body(e), status_code=400)


async def _http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
    type_ = "invalid_request_error" if e.status_code < 500 else "server_error"
    return JSONResponse(error_body(str(e.detail), type_), status_code=e.status_code)


async def _internal_error(request: Request, e: Exception) -> JSONResponse:
    """A bug: logged with its traceback here, answered without one."""
    log.exception("unhandled error in %s", request.url.path)
    return JSONResponse(error_body(f"internal server error: {type(e).__name__}", "server_error"), status_code=500)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(APIError, _refusal)
    app.add_exception_handler(BudwoodError, _refusal)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _internal_error)
