"""The registry over HTTP: /v1/registry/... for `budwood publish/pull/search/show/yank --registry URL`.

Reads of public adapters are open to anyone who passes the server's key check; private adapters are
shown to callers who may see them and writes are allowed where the caller may write (`serve.auth.Caller`:
with `budwood serve --api-key`, its holder everywhere; in the fine-tuning service, a tenant in its own
namespace). A server without a key serves public reads only. Errors use the OpenAI error shape.
"""
from __future__ import annotations

import asyncio
import tempfile

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from budwood.registry.local import LocalRegistry
from budwood.registry.names import NotFound, RegistryError, VersionExists
from budwood.registry.schemas import PublishRequest, VersionInfo, YankRequest
from budwood.registry.store import CHUNK
from budwood.serve.auth import caller_of
from budwood.serve.protocol import error_body

MAX_BLOB_BYTES = 64 << 30


def _error(e: RegistryError) -> JSONResponse:
    status = 404 if isinstance(e, NotFound) else 409 if isinstance(e, VersionExists) else 400
    return JSONResponse(error_body(str(e), code={404: "not_found", 409: "version_exists"}.get(status)),
                        status_code=status)


def registry_router(registry: LocalRegistry) -> APIRouter:
    router = APIRouter(prefix="/v1/registry")

    def call(fn, *args, **kwargs):
        return asyncio.to_thread(fn, *args, **kwargs)

    def refused(request: Request, namespace: str | None = None) -> JSONResponse | None:
        caller = caller_of(request)
        if caller.may_write(namespace):
            return None
        if caller.tenant is not None:
            message = (f"tenant {caller.tenant!r} reads this registry; its adapters are published by its "
                       "fine-tuning jobs (the service's operator publishes others)")
        else:
            message = "this registry has no API key configured; it serves public reads only (start the server " \
                      "with --api-key to allow publishing)"
        return JSONResponse(error_body(message, "permission_error", code="read_only"), status_code=403)

    @router.get("/adapters")
    async def search(request: Request, q: str | None = None, base: str | None = None, tag: str | None = None,
                     license: str | None = None, where: list[str] = Query(default=[])):
        try:
            found = await call(registry.search, q, base, tag, license, where,
                               include_private=caller_of(request).private)
        except RegistryError as e:
            return _error(e)
        return {"object": "list", "data": [v.model_dump(mode="json") for v in found]}

    @router.get("/adapters/{namespace}/{name}")
    async def show(namespace: str, name: str, request: Request):
        try:
            info = await call(registry.show, f"{namespace}/{name}", include_private=caller_of(request).private)
        except RegistryError as e:
            return _error(e)
        return info.model_dump(mode="json")

    @router.get("/adapters/{namespace}/{name}/versions/{version}")
    async def version(namespace: str, name: str, version: str, request: Request):
        ref = f"{namespace}/{name}" + ("" if version == "latest" else f"@{version}")
        try:
            info = await call(registry.version_info, ref, include_private=caller_of(request).private)
        except RegistryError as e:
            return _error(e)
        return info.model_dump(mode="json")

    @router.get("/blobs/{digest}")
    async def blob(digest: str, request: Request):
        try:
            if not await call(registry.blob_visible, digest, caller_of(request).private):
                raise NotFound(f"blob {digest}: not found")
        except RegistryError as e:
            return _error(e)
        return FileResponse(registry.store.path(digest), media_type="application/octet-stream")

    @router.head("/blobs/{digest}")
    async def has_blob(digest: str, request: Request):
        if refused(request):
            return Response(status_code=403)
        caller = caller_of(request)
        try:  # a tenant learns only of blobs it can already see: whether others stored some content stays theirs
            known = registry.store.has(digest) if caller.writes is True else \
                await call(registry.blob_visible, digest, caller.private)
            return Response(status_code=200 if known else 404)
        except RegistryError:
            return Response(status_code=400)

    @router.put("/blobs/{digest}")
    async def upload_blob(digest: str, request: Request):
        if no := refused(request):
            return no
        size = 0
        with tempfile.SpooledTemporaryFile(max_size=16 << 20, dir=registry.store.root / "tmp") as spool:
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_BLOB_BYTES:
                    return JSONResponse(error_body(f"blob larger than {MAX_BLOB_BYTES} bytes", code="too_large"),
                                        status_code=413)
                spool.write(chunk)
            spool.seek(0)
            try:
                await call(registry.store.put_stream, iter(lambda: spool.read(CHUNK), b""), digest)
            except RegistryError as e:
                return _error(e)
        return JSONResponse({"sha256": digest, "size": size}, status_code=201)

    @router.post("/adapters/{namespace}/{name}/versions")
    async def publish(namespace: str, name: str, body: PublishRequest, request: Request):
        if no := refused(request, namespace):
            return no
        if body.id != f"{namespace}/{name}":
            return _error(RegistryError(f"the manifest is for {body.id}, the URL for {namespace}/{name}"))
        try:
            info: VersionInfo = await call(registry.commit, body)
        except RegistryError as e:
            return _error(e)
        return JSONResponse(info.model_dump(mode="json"), status_code=201)

    @router.post("/adapters/{namespace}/{name}/versions/{version}/yank")
    async def yank(namespace: str, name: str, version: str, body: YankRequest, request: Request):
        if no := refused(request, namespace):
            return no
        try:
            info = await call(registry.yank, f"{namespace}/{name}@{version}", body.reason, body.undo)
        except RegistryError as e:
            return _error(e)
        return info.model_dump(mode="json")

    return router
