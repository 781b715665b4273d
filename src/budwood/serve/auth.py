"""Who is calling, and which models and adapters that caller may see.

`budwood serve --api-key KEY` has one key: its holder (the operator) sees every adapter and may
publish; without a key, everyone is anonymous and sees public adapters only. The fine-tuning service
plugs in its own Authenticator (one key per tenant) and ModelAccess (a tenant's `ft:` models), and
the same routes then scope every answer to the caller's tenant.

Routes name their caller through FastAPI dependencies: `caller: CallerDep` (anyone who passed the key
check) or `dependencies=[Depends(operator_only)]` (the server's operator, never a tenant).
"""
from __future__ import annotations

import asyncio
import hmac
from dataclasses import dataclass
from typing import Annotated, Protocol

from fastapi import Depends, Request
from fastapi.responses import JSONResponse

from budwood.errors import ForbiddenError
from budwood.serve.protocol import error_body


@dataclass(frozen=True)
class Caller:
    """`private`: which private registry adapters it sees (all, none, or those of some namespaces);
    `writes`: where it may publish and yank (anywhere, nowhere, or some namespaces)."""

    tenant: str | None = None
    private: bool | frozenset[str] = False
    writes: bool | frozenset[str] = False

    def may_write(self, namespace: str | None = None) -> bool:
        if isinstance(self.writes, bool):
            return self.writes
        return namespace is None or namespace in self.writes

    @classmethod
    def of_tenant(cls, tenant: str) -> Caller:
        """A tenant of the fine-tuning service: sees its own private adapters, publishes nothing itself
        (its adapters arrive through its jobs, so every byte it stores counts against its quota)."""
        return cls(tenant, frozenset({tenant}), False)


ANONYMOUS = Caller()
OPERATOR = Caller(private=True, writes=True)


class Authenticator(Protocol):
    """Maps a bearer token to a Caller (None: not a valid key). `anonymous` is the caller of a request
    without a token, or None when every /v1 request needs a key."""

    anonymous: Caller | None

    def authenticate(self, token: str) -> Caller | None: ...


class SingleKey:
    def __init__(self, api_key: str):
        self.expected = api_key.encode()
        self.anonymous = None

    def authenticate(self, token: str) -> Caller | None:
        return OPERATOR if hmac.compare_digest(token.encode(), self.expected) else None


class NoKey:
    anonymous = ANONYMOUS

    def authenticate(self, token: str) -> Caller | None:
        return ANONYMOUS


class AuthMiddleware:
    """`Authorization: Bearer KEY` on the protected path prefixes; the caller lands in
    `request.state.caller`. Plain ASGI: Starlette's BaseHTTPMiddleware would hide client disconnects
    from the routes, and a disconnect must cancel its generation."""

    def __init__(self, app, authenticator: Authenticator, prefixes: tuple[str, ...] = ("/v1/",)):
        self.app, self.auth, self.prefixes = app, authenticator, prefixes

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith(self.prefixes):
            header = dict(scope["headers"]).get(b"authorization", b"").decode("latin-1")
            scheme, _, token = header.partition(" ")
            if not header or isinstance(self.auth, NoKey):
                # a server without a key takes any Authorization, an empty bearer too, as vLLM does:
                # lm-evaluation-harness and other clients send "Bearer " when they have no key
                caller = self.auth.anonymous
            elif scheme.lower() != "bearer" or not token.strip():
                caller = None
            else:
                caller = await asyncio.to_thread(self.auth.authenticate, token.strip())
            if caller is None:
                message = "Incorrect API key provided." if header else \
                    "You didn't provide an API key: send it as 'Authorization: Bearer KEY'."
                response = JSONResponse(error_body(message, "invalid_request_error", None, "invalid_api_key"),
                                        status_code=401)
                await response(scope, receive, send)
                return
            scope.setdefault("state", {})["caller"] = caller
        await self.app(scope, receive, send)


def caller_of(request: Request) -> Caller:
    """The request's caller, as AuthMiddleware found it (anonymous outside its prefixes)."""
    return getattr(request.state, "caller", ANONYMOUS)


CallerDep = Annotated[Caller, Depends(caller_of)]


def operator_only(caller: CallerDep) -> None:
    """Dependency of the routes that change the server itself (loading and unloading adapters): its operator
    only. It runs after the body is read (LimitedRoute: its size and JSON depth checked, then parsed as JSON),
    so a tenant's oversized, too deep or malformed body is refused as such (413/400) first; but before the
    fields are validated, so a tenant learns nothing of the routes' schema from validation errors."""
    if caller.tenant is not None:
        raise ForbiddenError("only the server's operator may load or unload adapters")


class ModelAccess(Protocol):
    """Whether a caller may use a model name, and the names only some callers see (listed in
    /v1/models beside the base and the adapters every caller may use)."""

    def can_use(self, caller: Caller, model: str) -> bool: ...

    def listed(self, caller: Caller) -> list[str]: ...


class RegistryAccess:
    """A registry id (`org/name@version`) that exists but is hidden from the caller is refused (as not
    found); every other name (the base, folder adapters, ids the registry does not know) goes on to
    the engine's resolvers."""

    def __init__(self, registry):
        self.registry = registry

    def can_use(self, caller: Caller, model: str) -> bool:
        from budwood.registry.names import RegistryError, parse_ref

        if self.registry is None or "/" not in model:
            return True
        try:
            parse_ref(model)
        except RegistryError:
            return True  # not a registry id: a folder adapter's name or a hub-style base name
        try:
            self.registry.version_info(model, include_private=caller.private)
            return True
        except RegistryError:
            pass
        try:
            self.registry.version_info(model, include_private=True)
        except RegistryError:
            return True
        return False

    def listed(self, caller: Caller) -> list[str]:
        return []
