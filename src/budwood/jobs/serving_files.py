"""What /v1/files does, without HTTP: a tenant's uploads checked, stored and listed.

Uploads are read as JSONL text and checked by the same validator as `budwood data check` before
they are accepted: chat examples in any supervised format, or preference pairs for DPO jobs (errors
name the line and the problem, and the client's file name, never the scratch copy's path); nothing
uploaded is ever executed or unpickled. The bytes are counted while they arrive and written beside
the store, then moved into place inside the transaction that checks the tenant's storage quota
(queue.add_file).
"""
from __future__ import annotations

import asyncio
import hashlib
import re
import shutil
from pathlib import Path
from typing import Protocol

from pydantic import ValidationError

from budwood.errors import BudwoodError, DataError, ErrorKind
from budwood.jobs.protocol import (
    ExpiresAfter,
    FileDeleted,
    FileObject,
    Page,
    UploadCreate,
    UploadObject,
    UploadPartObject,
)
from budwood.jobs.queue import JobQueue, new_id
from budwood.jobs.service import Service
from budwood.jobs.states import FilePurpose
from budwood.jobs.storage import Storage

PURPOSES = (FilePurpose.FINE_TUNE,)  # what a tenant may upload (results files are the service's own)
_UNSAFE = re.compile(r"[^A-Za-z0-9._ -]")


class Upload(Protocol):
    """A file part of a multipart body (starlette's UploadFile has this shape)."""

    filename: str | None

    async def read(self, size: int) -> bytes: ...


def safe_filename(name: str | None) -> str:
    """The client's file name, for display only: no folders, no control or odd characters."""
    base = (name or "upload.jsonl").replace("\\", "/").rsplit("/", 1)[-1]
    base = _UNSAFE.sub("_", base).strip(" .") or "upload.jsonl"
    return base[:200]


def too_large(limit: int, size: int | None = None) -> BudwoodError:
    message = f"the file has {size:,} bytes; this service's limit is {limit:,}" if size is not None else \
        f"the upload is larger than this service's limit of {limit:,} bytes per file"
    return BudwoodError(message, code="file_too_large", param="file", kind=ErrorKind.TOO_LARGE)


def expires_after_of(form: dict) -> int | None:
    """OpenAI's `expires_after` of a multipart upload (`expires_after[anchor]`, `expires_after[seconds]`): its
    seconds, or None; anything else about it is refused by name."""
    fields = {k[len("expires_after["):-1]: v for k, v in form.items()
              if k.startswith("expires_after[") and k.endswith("]")}
    if not fields:
        return None
    try:
        return ExpiresAfter.model_validate(fields).seconds
    except ValidationError as e:
        raise BudwoodError(f"expires_after: {e.errors()[0]['msg']} (anchor 'created_at', seconds 3600 to 2592000)",
                           code="invalid_value", param="expires_after") from None


def validate_upload(path: Path) -> tuple[str, int]:
    """(format, examples) of a training file, chat examples or preference pairs (a supervised or a DPO
    job's); its problems, every one, as a refusal naming lines."""
    from budwood.data.formats import read_dataset

    try:
        dataset = read_dataset(path, "auto", min_examples=1)
    except DataError as e:  # told by the client's file name, never the scratch copy's path
        issues = e.issues or []
        shown = "\n".join(str(i) for i in issues[:20]) if issues else str(e)
        shown = shown.replace(str(path), path.name).replace(str(path.parent) + "/", "")
        more = f"\n... and {len(issues) - 20} more" if len(issues) > 20 else ""
        head = f"{path.name}: {len([i for i in issues if i.level == 'error'])} error(s); nothing was stored:\n" \
            if issues else ""
        raise BudwoodError(head + shown + more, code="invalid_file", param="file") from None
    return dataset.format, len(dataset.examples)


class ServingFiles:
    """The files surface (held on `app.state.serving_files`); every method is scoped to one tenant."""

    def __init__(self, service: Service):
        self.queue, self.storage = service.queue, service.storage
        self.limit = service.config.quotas.file_bytes

    async def upload(self, tenant: str, purpose: object, upload: Upload | str | None,
                     expires_after: int | None = None) -> FileObject:
        if not isinstance(purpose, str) or purpose not in PURPOSES:
            raise BudwoodError(f"purpose {purpose!r} is not supported here; this service accepts "
                               f"{', '.join(PURPOSES)}", code="invalid_value", param="purpose")
        if upload is None or isinstance(upload, str):
            raise BudwoodError("the field 'file' must be a file", code="invalid_value", param="file")
        tmp = self.storage.tmp_dir()
        try:
            path = tmp / safe_filename(upload.filename)
            digest, size = hashlib.sha256(), 0
            with open(path, "wb") as out:
                while chunk := await upload.read(1 << 20):
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
            if size > self.limit:
                raise too_large(self.limit, size)
            format_, examples = await asyncio.to_thread(validate_upload, path)
            await asyncio.to_thread(self.purge)
            file_id = new_id("file-")
            row = await asyncio.to_thread(self.queue.add_file, tenant, file_id, path.name, purpose, size,
                                          digest.hexdigest(), format_, examples,
                                          lambda: self.storage.put_file(tenant, file_id, path),
                                          expires_after=expires_after)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return FileObject.of(row)

    def purge(self) -> int:
        """Expired files go (their rows, then their bytes); reads already treat them as gone. Expired
        uploads' parts go too (purge_uploads)."""
        return self.queue.purge_expired_files(self.storage.delete_file) + purge_uploads(self.queue, self.storage)

    async def list(self, tenant: str, purpose: str | None, after: str | None, limit: int, order: str
                   ) -> Page[FileObject]:
        await asyncio.to_thread(self.purge)
        rows, more = await asyncio.to_thread(self.queue.list_files, tenant, purpose, after, limit, order)
        return Page[FileObject].of([FileObject.of(r) for r in rows], more)

    async def retrieve(self, tenant: str, file_id: str) -> FileObject:
        return FileObject.of(await asyncio.to_thread(self.queue.get_file, tenant, file_id))

    async def delete(self, tenant: str, file_id: str) -> FileDeleted:
        await asyncio.to_thread(self.queue.delete_file, tenant, file_id,
                                lambda: self.storage.delete_file(tenant, file_id))
        return FileDeleted(id=file_id)

    async def content(self, tenant: str, file_id: str) -> tuple[Path, str]:
        """The stored bytes' path and the name the tenant gave the file."""
        row = await asyncio.to_thread(self.queue.get_file, tenant, file_id)
        return self.storage.file_path(tenant, row.id), row.filename


def purge_uploads(queue: JobQueue, storage: Storage) -> int:
    """Uploads pending past their expires_at (an hour after creation, as OpenAI's) become `expired`, and
    their parts' rows and bytes go: parts count against the storage quota only while they can be completed."""
    return queue.purge_expired_uploads(storage.delete_upload)


class ServingUploads:
    """OpenAI's Uploads API (held on `app.state.serving_uploads`): a file sent in parts (at most
    `quotas.upload_part_bytes` each, `quotas.upload_parts` in all, `quotas.file_bytes` together), which on
    completion is checked by the same validator as a /v1/files upload and becomes a File of the tenant's.
    The parts of uploads not completed count against `quotas.storage_bytes`; at most `quotas.pending_uploads`
    are pending at a time; an upload not completed within the hour expires and its parts are deleted (at the
    next upload created or files listed or uploaded)."""

    def __init__(self, service: Service):
        self.queue, self.storage = service.queue, service.storage
        quotas = service.config.quotas
        self.limit, self.part_limit, self.max_parts = quotas.file_bytes, quotas.upload_part_bytes, quotas.upload_parts
        self.max_pending = quotas.pending_uploads

    async def create(self, tenant: str, body: UploadCreate) -> UploadObject:
        if body.purpose not in PURPOSES:
            raise BudwoodError(f"purpose {body.purpose!r} is not supported here; this service accepts "
                               f"{', '.join(PURPOSES)}", code="invalid_value", param="purpose")
        if body.bytes > self.limit:
            raise too_large(self.limit, body.bytes)
        await asyncio.to_thread(purge_uploads, self.queue, self.storage)
        row = await asyncio.to_thread(self.queue.create_upload, tenant, safe_filename(body.filename), body.purpose,
                                      body.bytes, body.mime_type,
                                      body.expires_after.seconds if body.expires_after else None,
                                      max_pending=self.max_pending)
        return UploadObject.of(row)

    async def add_part(self, tenant: str, upload_id: str, data: Upload | str | None) -> UploadPartObject:
        if data is None or isinstance(data, str):
            raise BudwoodError("the field 'data' must be a file part", code="invalid_value", param="data")
        await asyncio.to_thread(self.queue.get_upload, tenant, upload_id)  # 404 before any byte is kept
        tmp = self.storage.tmp_dir()
        try:
            path, size = tmp / "part", 0
            with open(path, "wb") as out:
                while chunk := await data.read(1 << 20):
                    size += len(chunk)
                    if size > self.part_limit:
                        raise BudwoodError(f"a part may have at most {self.part_limit:,} bytes", code="part_too_large",
                                           param="data", kind=ErrorKind.TOO_LARGE)
                    out.write(chunk)
            part = await asyncio.to_thread(self.queue.add_part, tenant, upload_id, size, self.max_parts,
                                           lambda part_id: self.storage.put_part(upload_id, part_id, path))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return UploadPartObject.of(part)

    async def complete(self, tenant: str, upload_id: str, part_ids: list[str], md5: str | None) -> UploadObject:
        """The parts joined in `part_ids`' order, checked (md5, if given; then the validator), and stored as a
        File in the transaction that completes the upload."""
        upload, parts = await asyncio.to_thread(self.queue.upload_parts, tenant, upload_id, part_ids)
        tmp = self.storage.tmp_dir()
        try:
            path = tmp / upload.filename
            digest, check = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
            with open(path, "wb") as out:
                for part in parts:
                    with open(self.storage.part_path(upload_id, part.id), "rb") as f:
                        while chunk := f.read(1 << 20):
                            digest.update(chunk)
                            check.update(chunk)
                            out.write(chunk)
            if md5 and md5.lower() != check.hexdigest():
                raise BudwoodError(f"md5: the parts' checksum is {check.hexdigest()}, not {md5}", code="invalid_value",
                                   param="md5")
            format_, examples = await asyncio.to_thread(validate_upload, path)
            file_id = new_id("file-")
            values = {"file_id": file_id, "filename": upload.filename, "purpose": upload.purpose,
                      "size": upload.bytes, "sha256": digest.hexdigest(), "format": format_, "examples": examples}
            upload, row = await asyncio.to_thread(self.queue.complete_upload, tenant, upload_id, values,
                                                  lambda: self.storage.put_file(tenant, file_id, path))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        await asyncio.to_thread(self.storage.delete_upload, upload_id)
        return UploadObject.of(upload, row)

    async def cancel(self, tenant: str, upload_id: str) -> UploadObject:
        upload = await asyncio.to_thread(self.queue.cancel_upload, tenant, upload_id)
        await asyncio.to_thread(self.storage.delete_upload, upload_id)
        return UploadObject.of(upload)
