"""/v1/files: upload, list, retrieve, delete and download a tenant's files (OpenAI's Files API).

The multipart body is parsed here, with the size limit applied while it arrives (a declared
Content-Length over it is refused before a byte is read); everything else is ServingFiles'.
"""
from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse
from starlette.formparsers import MultiPartException, MultiPartParser

from budwood.errors import BudwoodError
from budwood.jobs.protocol import FileDeleted, FileObject, Page
from budwood.jobs.routes.deps import FilesDep, TenantDep
from budwood.jobs.serving_files import PURPOSES, expires_after_of, too_large

router = APIRouter(prefix="/v1/files", tags=["files"])
SLACK = 64 << 10  # the multipart envelope around the file: field names, headers, the purpose
_UPLOAD_SCHEMA = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["file", "purpose"],
    "properties": {"file": {"type": "string", "format": "binary"},
                   "purpose": {"type": "string", "enum": [str(p) for p in PURPOSES]},
                   "expires_after[anchor]": {"type": "string", "enum": ["created_at"]},
                   "expires_after[seconds]": {"type": "integer", "minimum": 3600, "maximum": 2592000}}}}}}}


async def _limited(stream: AsyncIterator[bytes], limit: int) -> AsyncIterator[bytes]:
    total = 0
    async for chunk in stream:
        total += len(chunk)
        if total > limit + SLACK:
            raise too_large(limit)
        yield chunk


@router.post("", openapi_extra=_UPLOAD_SCHEMA, response_model=FileObject)
async def upload(request: Request, tenant: TenantDep, files: FilesDep) -> FileObject:
    """Upload a JSONL training or validation file (multipart: `file`, `purpose=fine-tune`, optionally
    `expires_after[anchor]=created_at` and `expires_after[seconds]`)."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise BudwoodError("expected a multipart/form-data body with fields 'file' and 'purpose'",
                           code="invalid_request", param="file")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > files.limit + SLACK:
        raise too_large(files.limit)
    try:
        form = await MultiPartParser(request.headers, _limited(request.stream(), files.limit),
                                     max_files=1, max_fields=8).parse()
    except MultiPartException as e:
        raise BudwoodError(f"the multipart body cannot be read: {e.message}", code="invalid_request",
                           param="file") from None
    try:
        return await files.upload(tenant, form.get("purpose"), form.get("file"), expires_after_of(dict(form)))
    finally:
        await form.close()


@router.get("", response_model=Page[FileObject])
async def list_files(tenant: TenantDep, files: FilesDep, purpose: str | None = None, after: str | None = None,
                     limit: int = Query(10000, ge=1, le=10000),
                     order: str = Query("desc", pattern="^(asc|desc)$")) -> Page[FileObject]:
    return await files.list(tenant, purpose, after, limit, order)


@router.get("/{file_id}", response_model=FileObject)
async def retrieve(file_id: str, tenant: TenantDep, files: FilesDep) -> FileObject:
    return await files.retrieve(tenant, file_id)


@router.delete("/{file_id}", response_model=FileDeleted)
async def delete(file_id: str, tenant: TenantDep, files: FilesDep) -> FileDeleted:
    return await files.delete(tenant, file_id)


@router.get("/{file_id}/content")
async def content(file_id: str, tenant: TenantDep, files: FilesDep) -> FileResponse:
    path, filename = await files.content(tenant, file_id)
    return FileResponse(path, media_type="application/octet-stream", filename=filename)
