"""The registry over HTTP: /v1/registry/... for `budwood publish/pull/search/show/yank --registry URL`.

Reads of public adapters are open to anyone who passes the server's key check; private adapters are
shown to callers who may see them and writes are allowed where the caller may write (`serve.auth.Caller`:
with `budwood serve --api-key`, its holder everywhere; in the fine-tuning service, a tenant in its own
namespace). A server without a key serves public reads only. The LocalRegistry itself is the surface's
serving object (`app.state.registry`); its errors are answered in serve/errors.py.
"""
from __future__ import annotations

import asyncio
import tempfile
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response

from budwood.errors import BudwoodError, ErrorKind, ForbiddenError
from budwood.registry.local import LocalRegistry
from budwood.registry.names import NotFound, RegistryError
from budwood.registry.schemas import PublishRequest, YankRequest
from budwood.registry.store import CHUNK, raise_if_full
from budwood.serve.auth import Caller, CallerDep

MAX_BLOB_BYTES = 64 << 30

router = APIRouter(prefix="/v1/registry")


def get_registry(request: Request) -> LocalRegistry:
    """Dependency: the registry `create_app` was given."""
    return request.app.state.registry


RegistryDep = Annotated[LocalRegistry, Depends(get_registry)]


def _check_writes(caller: Caller, namespace: str | None) -> Caller:
    if caller.may_write(namespace):
        return caller
    if caller.tenant is not None:
        message = (f"tenant {caller.tenant!r} reads this registry; its adapters are published by its "
                   "fine-tuning jobs (the service's operator publishes others)")
    else:
        message = ("this registry has no API key configured; it serves public reads only (start the server "
                   "with --api-key to allow publishing)")
    raise ForbiddenError(message, code="read_only")


def blob_writer(caller: CallerDep) -> Caller:
    """Dependency: a caller who may store blobs (anyone who may write somewhere)."""
    return _check_writes(caller, None)


def namespace_writer(namespace: str, caller: CallerDep) -> Caller:
    """Dependency: a caller who may publish and yank in the URL's namespace."""
    return _check_writes(caller, namespace)


@router.get("/adapters")
async def search(registry: RegistryDep, caller: CallerDep, q: str | None = None, base: str | None = None,
                 tag: str | None = None, license: str | None = None, where: list[str] = Query(default=[])):
    found = await asyncio.to_thread(registry.search, q, base, tag, license, where, include_private=caller.private)
    return {"object": "list", "data": [v.model_dump(mode="json") for v in found]}


@router.get("/adapters/{namespace}/{name}")
async def show(namespace: str, name: str, registry: RegistryDep, caller: CallerDep):
    info = await asyncio.to_thread(registry.show, f"{namespace}/{name}", include_private=caller.private)
    return info.model_dump(mode="json")


@router.get("/adapters/{namespace}/{name}/versions/{version}")
async def version(namespace: str, name: str, version: str, registry: RegistryDep, caller: CallerDep):
    ref = f"{namespace}/{name}" + ("" if version == "latest" else f"@{version}")
    info = await asyncio.to_thread(registry.version_info, ref, include_private=caller.private)
    return info.model_dump(mode="json")


@router.get("/blobs/{digest}")
async def blob(digest: str, registry: RegistryDep, caller: CallerDep):
    if not await asyncio.to_thread(registry.blob_visible, digest, caller.private):
        raise NotFound(f"blob {digest}: not found")
    return FileResponse(registry.store.path(digest), media_type="application/octet-stream")


@router.head("/blobs/{digest}")
async def has_blob(digest: str, registry: RegistryDep, caller: CallerDep):
    """Bare statuses (HEAD has no body): 200 known, 404 not, 403 for a caller who may not upload."""
    if not caller.may_write():
        return Response(status_code=403)
    try:  # a tenant learns only of blobs it can already see: whether others stored some content stays theirs
        known = registry.store.has(digest) if caller.writes is True else \
            await asyncio.to_thread(registry.blob_visible, digest, caller.private)
    except RegistryError:
        return Response(status_code=400)
    return Response(status_code=200 if known else 404)


@router.put("/blobs/{digest}", dependencies=[Depends(blob_writer)])
async def upload_blob(digest: str, request: Request, registry: RegistryDep):
    """The body spooled (in memory up to 16 MiB, then to an unnamed file in the store's tmp), then stored by
    its digest; a full disk while spooling is the store's `no_space` (503), the spool closed and so gone."""
    size = 0
    with tempfile.SpooledTemporaryFile(max_size=16 << 20, dir=registry.store.root / "tmp") as spool:
        async for chunk in request.stream():
            size += len(chunk)
            if size > MAX_BLOB_BYTES:
                raise BudwoodError(f"blob larger than {MAX_BLOB_BYTES} bytes", code="too_large",
                                   kind=ErrorKind.TOO_LARGE)
            try:
                spool.write(chunk)
            except OSError as e:
                raise_if_full(e, registry.store.root)
                raise
        spool.seek(0)
        await asyncio.to_thread(registry.store.put_stream, iter(lambda: spool.read(CHUNK), b""), digest)
    return JSONResponse({"sha256": digest, "size": size}, status_code=201)


@router.post("/adapters/{namespace}/{name}/versions", dependencies=[Depends(namespace_writer)])
async def publish(namespace: str, name: str, body: PublishRequest, registry: RegistryDep):
    if body.id != f"{namespace}/{name}":
        raise RegistryError(f"the manifest is for {body.id}, the URL for {namespace}/{name}")
    info = await asyncio.to_thread(registry.commit, body)
    return JSONResponse(info.model_dump(mode="json"), status_code=201)


@router.post("/adapters/{namespace}/{name}/versions/{version}/yank", dependencies=[Depends(namespace_writer)])
async def yank(namespace: str, name: str, version: str, body: YankRequest, registry: RegistryDep):
    info = await asyncio.to_thread(registry.yank, f"{namespace}/{name}@{version}", body.reason, body.undo)
    return info.model_dump(mode="json")
