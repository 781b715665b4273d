"""/v1/uploads: OpenAI's Uploads API (create, add parts, complete, cancel), what the `openai` package's
`uploads.upload_file_chunked` drives; a completed upload is a File, checked as a /v1/files upload is."""
from __future__ import annotations

from fastapi import APIRouter, Request
from starlette.formparsers import MultiPartException, MultiPartParser

from budwood.errors import BudwoodError, ErrorKind
from budwood.jobs.protocol import UploadComplete, UploadCreate, UploadObject, UploadPartObject
from budwood.jobs.routes.deps import TenantDep, UploadsDep
from budwood.jobs.routes.files import SLACK, _limited

router = APIRouter(prefix="/v1/uploads", tags=["uploads"])
_PART_SCHEMA = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": ["data"], "properties": {"data": {"type": "string", "format": "binary"}}}}}}}


@router.post("", response_model=UploadObject)
async def create(body: UploadCreate, tenant: TenantDep, uploads: UploadsDep) -> UploadObject:
    """An upload of `bytes` bytes, pending for an hour: add its parts, then complete it."""
    return await uploads.create(tenant, body)


@router.post("/{upload_id}/parts", openapi_extra=_PART_SCHEMA, response_model=UploadPartObject)
async def add_part(upload_id: str, request: Request, tenant: TenantDep, uploads: UploadsDep) -> UploadPartObject:
    """One part (multipart field `data`), at most quotas.upload_part_bytes, counted while it arrives."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise BudwoodError("expected a multipart/form-data body with the field 'data'", code="invalid_request",
                           param="data")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > uploads.part_limit + SLACK:
        raise BudwoodError(f"a part may have at most {uploads.part_limit:,} bytes", code="part_too_large",
                           param="data", kind=ErrorKind.TOO_LARGE)
    try:
        form = await MultiPartParser(request.headers, _limited(request.stream(), uploads.part_limit),
                                     max_files=1, max_fields=4).parse()
    except MultiPartException as e:
        raise BudwoodError(f"the multipart body cannot be read: {e.message}", code="invalid_request",
                           param="data") from None
    try:
        return await uploads.add_part(tenant, upload_id, form.get("data"))
    finally:
        await form.close()


@router.post("/{upload_id}/complete", response_model=UploadObject)
async def complete(upload_id: str, body: UploadComplete, tenant: TenantDep, uploads: UploadsDep) -> UploadObject:
    """The parts, in `part_ids`' order, become a File (validated as any upload); `md5` is checked if given."""
    return await uploads.complete(tenant, upload_id, body.part_ids, body.md5)


@router.post("/{upload_id}/cancel", response_model=UploadObject)
async def cancel(upload_id: str, tenant: TenantDep, uploads: UploadsDep) -> UploadObject:
    return await uploads.cancel(tenant, upload_id)
