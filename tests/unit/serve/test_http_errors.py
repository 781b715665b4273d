"""serve/errors.py: every error a route raises becomes OpenAI's error object with its kind's status."""
from __future__ import annotations

import pytest
from fastapi import APIRouter, FastAPI
from fastapi.testclient import TestClient
from pydantic import BaseModel, Field

from budwood.errors import BudwoodError, ConflictError, ErrorKind
from budwood.registry.local import LicenseNotAccepted
from budwood.registry.names import NotFound, RegistryError, VersionExists
from budwood.serve import APIError, create_app, install_error_handlers
from budwood.serve.errors import STATUS

FIELDS = {"message", "type", "param", "code"}


class Body(BaseModel):
    temperature: float | None = Field(None, ge=0, le=2)
    mode: str | int = "auto"


def app_raising(error: BaseException) -> TestClient:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    async def boom():
        raise error

    @app.post("/body")
    async def body(b: Body):
        return {"ok": True}

    return TestClient(app, raise_server_exceptions=False)


def error_of(r) -> dict:
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == FIELDS, body
    return body["error"]


@pytest.mark.parametrize(("kind", "status", "type_"), [
    (ErrorKind.INVALID, 400, "invalid_request_error"),
    (ErrorKind.UNAUTHENTICATED, 401, "invalid_request_error"),
    (ErrorKind.FORBIDDEN, 403, "permission_error"),
    (ErrorKind.NOT_FOUND, 404, "invalid_request_error"),
    (ErrorKind.CONFLICT, 409, "invalid_request_error"),
    (ErrorKind.TOO_LARGE, 413, "invalid_request_error"),
    (ErrorKind.LIMIT, 429, "rate_limit_exceeded"),
    (ErrorKind.QUOTA, 429, "insufficient_quota"),
    (ErrorKind.UNAVAILABLE, 503, "server_error"),
    (ErrorKind.CANCELLED, 499, "invalid_request_error"),
    (ErrorKind.INTERNAL, 500, "server_error"),
])
def test_a_budwood_error_is_answered_by_its_kind_with_its_code_and_param(kind, status, type_):
    r = app_raising(BudwoodError("the thing is wrong", code="some_code", param="thing", kind=kind)).get("/boom")
    assert r.status_code == status
    assert error_of(r) == {"message": "the thing is wrong", "type": type_, "param": "thing", "code": "some_code"}


def test_every_kind_has_a_status():
    assert set(STATUS) == set(ErrorKind)


@pytest.mark.parametrize(("error", "status", "code"), [
    (NotFound("acme/x: not found"), 404, "not_found"),
    (VersionExists("acme/x@1.0.0 exists"), 409, "version_exists"),
    (LicenseNotAccepted("acme/x@1.0.0", "LicenseRef-x", "terms"), 400, None),
    (RegistryError("bad adapter id"), 400, None),
], ids=["not-found", "version-exists", "licence", "registry-error"])
def test_registry_errors_keep_their_statuses_and_codes(error, status, code):
    r = app_raising(error).get("/boom")
    assert r.status_code == status and error_of(r)["code"] == code


def test_an_api_error_keeps_its_own_status_and_body_even_when_it_is_also_a_budwood_error():
    class ServiceError(APIError, BudwoodError):
        pass

    r = app_raising(ServiceError(402, "pay first", "billing_error", "plan", "unpaid")).get("/boom")
    assert r.status_code == 402
    assert error_of(r) == {"message": "pay first", "type": "billing_error", "param": "plan", "code": "unpaid"}


def test_a_bug_is_a_500_naming_only_the_exception_type():
    r = app_raising(KeyError("secret internals")).get("/boom")
    err = error_of(r)
    assert r.status_code == 500 and err["type"] == "server_error"
    assert err["message"] == "internal server error: KeyError" and "secret" not in r.text


def test_validation_errors_name_the_field_without_union_members():
    client = app_raising(RuntimeError())
    r = client.post("/body", json={"temperature": "hot"})
    err = error_of(r)
    assert r.status_code == 400 and err["param"] == "temperature" and err["code"] == "invalid_value"
    assert "'hot'" in err["message"]
    r = client.post("/body", json={"mode": [1]})
    assert error_of(r)["param"] == "mode"  # not mode.str or mode.int
    r = client.post("/body", content=b'{"temperature": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and error_of(r)["message"] == "The request body is not valid JSON."


def test_unknown_routes_get_the_error_shape():
    r = app_raising(RuntimeError()).get("/nowhere")
    assert r.status_code == 404 and error_of(r)["type"] == "invalid_request_error"


def test_routers_given_to_create_app_are_answered_by_the_same_handlers():
    router = APIRouter()

    @router.post("/v1/things")
    async def make_thing():
        raise ConflictError("this Idempotency-Key was used with another request", code="idempotency_conflict",
                            param="Idempotency-Key")

    client = TestClient(create_app(routers=[router]))  # no `with`: the lifespan (the engine) is not started
    r = client.post("/v1/things")
    assert r.status_code == 409
    assert error_of(r) == {"message": "this Idempotency-Key was used with another request",
                           "type": "invalid_request_error", "param": "Idempotency-Key", "code": "idempotency_conflict"}
