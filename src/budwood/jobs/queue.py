"""The job queue, in the database: files, jobs, events and checkpoints, scoped by tenant.

Workers claim jobs with a lease that they renew by heartbeat. A claim is one transaction: on
PostgreSQL `SELECT ... FOR UPDATE SKIP LOCKED`, so workers never wait on each other's rows; on
SQLite the write lock taken at BEGIN (BEGIN IMMEDIATE) makes the select-and-update atomic. Each claim
raises the job's `attempt`, and every write a worker makes afterwards (heartbeat, event, checkpoint,
outcome) is conditioned on (owner, attempt): a worker whose lease expired and whose job another
worker took can never write to it again. Times come from the database's clock, so workers on
machines whose clocks disagree still agree on when a lease ran out.

Refusals are budwood.errors types with OpenAI's `code` and `param`; the HTTP layer maps their kind
to a status (serve/errors.py), so the queue is as usable from the CLI and the workers as from a route.
"""
from __future__ import annotations

import hashlib
import json
import secrets
import string
import time
from dataclasses import dataclass

from sqlalchemy import Select, delete, func, or_, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from budwood.db import session_makers
from budwood.errors import BudwoodError, ConflictError, ErrorKind, LimitExceeded, NotFoundError
from budwood.jobs.models import Checkpoint, CheckpointPermission, Job, JobEvent, StoredFile, Tenant, Upload, UploadPart
from budwood.jobs.protocol import fine_tuned_model as model_name_of
from budwood.jobs.protocol import parse_model, split_model
from budwood.jobs.states import (
    ACTIVE,
    HELD,
    TERMINAL,
    UNFINISHED,
    WAITING,
    EventLevel,
    EventType,
    FilePurpose,
    FileStatus,
    JobStatus,
)

_ALPHABET = string.ascii_letters + string.digits


def new_id(prefix: str, n: int = 24) -> str:
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(n))


def _live(now: float):
    """Files that have not expired."""
    return or_(StoredFile.expires_at.is_(None), StoredFile.expires_at > now)


class LeaseLost(Exception):
    """This worker no longer holds the job: another worker took it, or the job was deleted."""


@dataclass(frozen=True)
class Lease:
    job_id: str
    owner: str
    attempt: int


def db_now(s: Session) -> float:
    """Seconds since the epoch on the database server's clock."""
    if s.bind.dialect.name == "postgresql":
        return float(s.execute(text("SELECT extract(epoch from clock_timestamp())")).scalar())
    return float(s.execute(text("SELECT (julianday('now') - 2440587.5) * 86400.0")).scalar())


def request_hash(body: dict) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, default=str).encode()).hexdigest()


class JobQueue:
    def __init__(self, engine, default_storage_bytes: int, default_concurrent_jobs: int):
        self.engine = engine
        self.postgres = engine.dialect.name == "postgresql"
        self.sessions, self.writes = session_makers(engine)
        self.default_storage_bytes = default_storage_bytes
        self.default_concurrent_jobs = default_concurrent_jobs

    def _lock(self, query: Select, skip_locked: bool = False) -> Select:
        return query.with_for_update(skip_locked=skip_locked) if self.postgres else query

    def _tenant(self, s: Session, name: str) -> Tenant:
        """The tenant's row, locked on PostgreSQL so that quota checks of one tenant run one at a time."""
        row = s.scalars(self._lock(select(Tenant).where(Tenant.name == name))).one_or_none()
        if row is None:
            raise BudwoodError(f"tenant {name!r} does not exist", code="invalid_api_key",
                               kind=ErrorKind.UNAUTHENTICATED)
        return row

    # -- files ------------------------------------------------------------------------------------------
    def add_file(self, tenant: str, file_id: str, filename: str, purpose: str, size: int, sha256: str,
                 format: str | None, examples: int | None, store, quota: bool = True,
                 expires_after: int | None = None) -> StoredFile:
        """Record an upload whose bytes `store()` moves into place, inside the transaction that checks
        the tenant's storage quota: the quota holds however many uploads race. Uploads count against
        the quota; the service's own results files (`quota=False`) do not. `expires_after`: seconds after
        which the file is gone (OpenAI's expires_after)."""
        with self.writes.begin() as s:
            return self._add_file(s, tenant, file_id, filename, purpose, size, sha256, format, examples, store,
                                  quota, expires_after)

    def _add_file(self, s: Session, tenant: str, file_id: str, filename: str, purpose: str, size: int, sha256: str,
                  format: str | None, examples: int | None, store, quota: bool, expires_after: int | None,
                  completing: str | None = None) -> StoredFile:
        t = self._tenant(s, tenant)
        now = time.time()
        if quota:
            self._check_storage(s, t, size, "this file", now, but_upload=completing)
        row = StoredFile(id=file_id, tenant=tenant, filename=filename, purpose=purpose, bytes=size,
                         sha256=sha256, created_at=now, status=FileStatus.PROCESSED, format=format,
                         examples=examples, expires_at=now + expires_after if expires_after else None)
        s.add(row)
        s.flush()
        store()
        return row

    def _check_storage(self, s: Session, t: Tenant, size: int, what: str, now: float,
                       but_upload: str | None = None) -> None:
        """Refuse `size` more bytes over the tenant's storage quota, which counts its live uploaded files and
        the parts of its uploads not yet completed (bytes on disk as much as a file's); `but_upload`: the
        upload being completed, whose parts become the file and are not counted twice."""
        limit = t.max_storage_bytes if t.max_storage_bytes is not None else self.default_storage_bytes
        files = s.scalar(select(func.coalesce(func.sum(StoredFile.bytes), 0)).where(
            StoredFile.tenant == t.name, StoredFile.purpose != FilePurpose.RESULTS, _live(now)))
        pending = select(func.coalesce(func.sum(UploadPart.bytes), 0)).join(Upload, Upload.id == UploadPart.upload_id) \
            .where(Upload.tenant == t.name, Upload.status == "pending")
        if but_upload is not None:
            pending = pending.where(Upload.id != but_upload)
        used = files + s.scalar(pending)
        if used + size > limit:
            raise LimitExceeded(f"storage quota exceeded: tenant {t.name!r} stores {used:,} bytes of "
                                f"{limit:,} (files, and parts of uploads not completed); {what} has {size:,}. "
                                "Delete files (DELETE /v1/files/ID), cancel uploads, or ask for a larger quota",
                                code="storage_quota_exceeded", kind=ErrorKind.QUOTA)

    def get_file(self, tenant: str, file_id: str, param: str = "file_id") -> StoredFile:
        """The tenant's file; an expired one is answered as one that does not exist (OpenAI deletes them)."""
        with self.sessions() as s:
            row = s.scalars(select(StoredFile).where(StoredFile.id == file_id, StoredFile.tenant == tenant,
                                                     _live(time.time()))).first()
        if row is None:
            raise NotFoundError(f"No such File object: {file_id}", code="file_not_found", param=param)
        return row

    def list_files(self, tenant: str, purpose: str | None, after: str | None, limit: int, order: str
                   ) -> tuple[list[StoredFile], bool]:
        query = select(StoredFile).where(StoredFile.tenant == tenant, _live(time.time()))
        if purpose:
            query = query.where(StoredFile.purpose == purpose)
        with self.sessions() as s:
            if after:
                anchor = s.scalar(select(StoredFile.seq).where(StoredFile.id == after, StoredFile.tenant == tenant))
                if anchor is None:
                    raise BudwoodError(f"after: no file {after!r}", code="invalid_value", param="after")
                query = query.where(StoredFile.seq > anchor if order == "asc" else StoredFile.seq < anchor)
            query = query.order_by(StoredFile.seq.asc() if order == "asc" else StoredFile.seq.desc())
            rows = list(s.scalars(query.limit(limit + 1)))
        return rows[:limit], len(rows) > limit

    def delete_file(self, tenant: str, file_id: str, remove) -> None:
        with self.writes.begin() as s:
            row = s.scalars(self._lock(select(StoredFile).where(StoredFile.id == file_id,
                                                                StoredFile.tenant == tenant))).first()
            if row is None:
                raise NotFoundError(f"No such File object: {file_id}", code="file_not_found", param="file_id")
            users = s.scalars(select(Job.id).where(Job.tenant == tenant, Job.status.in_(UNFINISHED),
                                                   or_(Job.training_file == file_id,
                                                       Job.validation_file == file_id))).all()
            if users:
                raise ConflictError(f"{file_id} is used by fine-tuning job {users[0]}, which has not finished; "
                                    "cancel it first", code="file_in_use", param="file_id")
            s.delete(row)
        remove()  # after the commit: a crash in between leaves bytes no row names, never a row without bytes

    def purge_expired_files(self, remove) -> int:
        """Delete the files whose expires_at has passed (`remove(tenant, file_id)` their bytes, after the
        commit), except those a job that has not finished still trains on: they go once it has."""
        with self.writes.begin() as s:
            expired = list(s.scalars(self._lock(select(StoredFile).where(StoredFile.expires_at.is_not(None),
                                                                         ~_live(time.time()))).limit(1000)))
            busy = set(s.scalars(select(Job.training_file).where(Job.status.in_(UNFINISHED)))) | \
                set(s.scalars(select(Job.validation_file).where(Job.status.in_(UNFINISHED))))
            gone = [(f.tenant, f.id) for f in expired if f.id not in busy]
            for f in expired:
                if f.id not in busy:
                    s.delete(f)
        for tenant, file_id in gone:
            remove(tenant, file_id)
        return len(gone)

    def usage(self) -> dict[str, dict]:
        """Per tenant: files, bytes stored (uploads), jobs and jobs not yet finished."""
        out: dict[str, dict] = {}
        with self.sessions() as s:
            for tenant, n, size in s.execute(select(StoredFile.tenant, func.count(), func.sum(StoredFile.bytes))
                                             .where(StoredFile.purpose != FilePurpose.RESULTS)
                                             .group_by(StoredFile.tenant)):
                out.setdefault(tenant, {}).update(files=n, bytes=int(size or 0))
            for tenant, status, n in s.execute(select(Job.tenant, Job.status, func.count())
                                               .group_by(Job.tenant, Job.status)):
                u = out.setdefault(tenant, {})
                u["jobs"] = u.get("jobs", 0) + n
                if status in ACTIVE:
                    u["active"] = u.get("active", 0) + n
        return out

    # -- jobs: the API's side -------------------------------------------------------------------------------
    def create_job(self, tenant: str, values: dict, idempotency_key: str | None, body_hash: str) -> tuple[Job, bool]:
        """A new job in validating_files, or (with an idempotency key seen before) the job it made.
        Its files are checked again in the transaction that creates it, their rows locked, so a file
        deleted meanwhile is refused rather than trained on. Returns (job, created)."""
        for attempt in range(2):
            try:
                with self.writes.begin() as s:
                    t = self._tenant(s, tenant)
                    if idempotency_key:
                        seen = s.scalars(select(Job).where(Job.tenant == tenant,
                                                           Job.idempotency_key == idempotency_key)).first()
                        if seen is not None:
                            if seen.request_hash != body_hash:
                                raise ConflictError("this Idempotency-Key was used with a different request; use "
                                                    "a new key for a new job", code="idempotency_key_reused")
                            return seen, False
                    self._check_concurrency(s, t)
                    for param in ("training_file", "validation_file"):
                        self._usable_file(s, tenant, values.get(param), param)
                    job = Job(id=new_id("ftjob-"), tenant=tenant, status=JobStatus.VALIDATING_FILES,
                              created_at=time.time(),
                              idempotency_key=idempotency_key, request_hash=body_hash, attempt=0, lost=0,
                              result_files=[], progress={}, **values)
                    s.add(job)
                    s.flush()
                    self._event(s, job.id, f"Created fine-tuning job: {job.id}", attempt=0)
                    self._event(s, job.id, f"Validating training file: {job.training_file}"
                                + (f" and validation file: {job.validation_file}" if job.validation_file else ""),
                                attempt=0)
                return job, True
            except IntegrityError:
                if attempt or not idempotency_key:  # a concurrent create with the same key won: return its job
                    raise
        raise AssertionError("unreachable")

    def check_file(self, tenant: str, file_id: str | None, param: str) -> StoredFile | None:
        """create_job's file check made ahead of it, no row locked (refusals come in OpenAI's order): the row."""
        with self.sessions() as s:
            return self._usable_file(s, tenant, file_id, param, lock=False)

    def _usable_file(self, s: Session, tenant: str, file_id: str | None, param: str, lock=True) -> StoredFile | None:
        if file_id is None:
            return None
        query = select(StoredFile).where(StoredFile.id == file_id, StoredFile.tenant == tenant)
        row = s.scalars(self._lock(query) if lock else query).first()
        if row is None or (row.expires_at is not None and row.expires_at <= time.time()):
            raise BudwoodError(f"invalid {param}: {file_id} does not exist", code=f"invalid_{param}", param=param)
        if row.purpose != FilePurpose.FINE_TUNE:
            raise BudwoodError(f"invalid {param}: {file_id} has purpose {row.purpose!r}; upload it with purpose "
                               f"'{FilePurpose.FINE_TUNE}'", code=f"invalid_{param}", param=param)
        return row

    def get_job(self, tenant: str | None, job_id: str) -> Job:
        query = select(Job).where(Job.id == job_id)
        if tenant is not None:
            query = query.where(Job.tenant == tenant)
        with self.sessions() as s:
            row = s.scalars(query).first()
        if row is None:
            raise NotFoundError(f"No fine-tuning job found with id {job_id!r}", code="job_not_found",
                                param="fine_tuning_job_id")
        return row

    def list_jobs(self, tenant: str | None, after: str | None = None, limit: int = 20,
                  metadata: dict[str, str] | None = None, no_metadata: bool = False) -> tuple[list[Job], bool]:
        """Newest first. `tenant` None lists every tenant's (the operator's dashboard). `metadata`: only the
        jobs whose metadata has each key with its value; `no_metadata`: only those without metadata (OpenAI's
        `metadata=null`)."""
        if no_metadata:
            metadata = None
        query = select(Job)
        if tenant is not None:
            query = query.where(Job.tenant == tenant)
        with self.sessions() as s:
            if after:
                anchor = s.scalar(select(Job.seq).where(Job.id == after, *([Job.tenant == tenant] if tenant else [])))
                if anchor is None:
                    raise BudwoodError(f"after: no fine-tuning job {after!r}", code="invalid_value", param="after")
                query = query.where(Job.seq < anchor)
            query = query.order_by(Job.seq.desc())
            rows = list(s.scalars(query if metadata or no_metadata else query.limit(limit + 1)))
        if metadata:  # JSON containment differs per database; a tenant's jobs are few enough to filter here
            rows = [j for j in rows if all((j.meta or {}).get(k) == v for k, v in metadata.items())]
        elif no_metadata:
            rows = [j for j in rows if not j.meta]
        return rows[:limit], len(rows) > limit

    def cancel(self, tenant: str, job_id: str) -> Job:
        with self.writes.begin() as s:
            job = self._own_job(s, tenant, job_id)
            if job.status in TERMINAL:
                raise BudwoodError(f"Job {job_id} has already {job.status}; it cannot be cancelled",
                                   code="job_not_cancellable", param="fine_tuning_job_id")
            job.status, job.finished_at, job.estimated_finish = JobStatus.CANCELLED, time.time(), None
            self._event(s, job_id, "Job cancelled by user request", attempt=job.attempt)
        return job

    def pause(self, tenant: str, job_id: str) -> Job:
        """A running job checkpoints and stops (pausing -> paused); a waiting one is paused at once."""
        with self.writes.begin() as s:
            job = self._own_job(s, tenant, job_id)
            if job.status == JobStatus.RUNNING:
                job.status = JobStatus.PAUSING
                self._event(s, job_id, "Pausing: the job stops at its next step and saves a checkpoint",
                            attempt=job.attempt)
            elif job.status in WAITING:
                job.status, job.lease_owner, job.lease_expires = JobStatus.PAUSED, None, None
                self._event(s, job_id, "Job paused", attempt=job.attempt)
            else:
                raise BudwoodError(f"Job {job_id} is {job.status}; only a running or waiting job can be paused",
                                   code="job_not_pausable", param="fine_tuning_job_id")
        return job

    def resume(self, tenant: str, job_id: str) -> Job:
        """Paused -> waiting again (validating_files if its files were never validated), within the
        tenant's concurrent-jobs limit: pausing is no way around it."""
        with self.writes.begin() as s:
            t = self._tenant(s, tenant)
            job = self._own_job(s, tenant, job_id)
            if job.status != JobStatus.PAUSED:
                raise BudwoodError(f"Job {job_id} is {job.status}; only a paused job can be resumed",
                                   code="job_not_resumable", param="fine_tuning_job_id")
            self._check_concurrency(s, t)
            job.status = JobStatus.QUEUED if job.train_examples is not None else JobStatus.VALIDATING_FILES
            self._event(s, job_id, "Job resumed; it continues from its last checkpoint", attempt=job.attempt)
        return job

    def _check_concurrency(self, s: Session, t: Tenant) -> None:
        limit = t.max_concurrent_jobs if t.max_concurrent_jobs is not None else self.default_concurrent_jobs
        active = s.scalar(select(func.count()).select_from(Job).where(Job.tenant == t.name, Job.status.in_(ACTIVE)))
        if active >= limit:
            raise LimitExceeded(f"tenant {t.name!r} has {active} fine-tuning jobs waiting or running; its limit is "
                                f"{limit} at a time. Wait for one to finish, or cancel or pause one",
                                code="concurrent_jobs_limit")

    def _own_job(self, s: Session, tenant: str, job_id: str) -> Job:
        job = s.scalars(self._lock(select(Job).where(Job.id == job_id, Job.tenant == tenant))).first()
        if job is None:
            raise NotFoundError(f"No fine-tuning job found with id {job_id!r}", code="job_not_found",
                                param="fine_tuning_job_id")
        return job

    def events(self, tenant: str | None, job_id: str, after: str | None = None, limit: int = 20,
               newer_than: int | None = None) -> tuple[list[JobEvent], bool]:
        """Newest first, as OpenAI lists them; `newer_than` (an event seq) gives the ones after it,
        oldest first, for live streams. NotFoundError unless the tenant has the job."""
        return self.events_of(self.get_job(tenant, job_id), after, limit, newer_than)

    def events_of(self, job: Job, after: str | None = None, limit: int = 20, newer_than: int | None = None
                  ) -> tuple[list[JobEvent], bool]:
        """events() of a job the caller has already read (so its tenant is checked): no second look-up."""
        query = select(JobEvent).where(JobEvent.job_id == job.id)
        with self.sessions() as s:
            if newer_than is not None:
                return list(s.scalars(query.where(JobEvent.seq > newer_than).order_by(JobEvent.seq))), False
            if after:
                anchor = s.scalar(select(JobEvent.seq).where(JobEvent.id == after, JobEvent.job_id == job.id))
                if anchor is None:
                    raise BudwoodError(f"after: no event {after!r} in this job", code="invalid_value", param="after")
                query = query.where(JobEvent.seq < anchor)
            rows = list(s.scalars(query.order_by(JobEvent.seq.desc()).limit(limit + 1)))
        return rows[:limit], len(rows) > limit

    def checkpoints(self, tenant: str | None, job_id: str, after: str | None = None, limit: int = 10
                    ) -> tuple[list[Checkpoint], bool]:
        return self.checkpoints_of(self.get_job(tenant, job_id), after, limit)

    def checkpoints_of(self, job: Job, after: str | None = None, limit: int = 10) -> tuple[list[Checkpoint], bool]:
        """checkpoints() of a job the caller has already read, newest first."""
        query = select(Checkpoint).where(Checkpoint.job_id == job.id)
        with self.sessions() as s:
            if after:
                anchor = s.scalar(select(Checkpoint.seq).where(Checkpoint.id == after, Checkpoint.job_id == job.id))
                if anchor is None:
                    raise BudwoodError(f"after: no checkpoint {after!r} in this job", code="invalid_value",
                                       param="after")
                query = query.where(Checkpoint.seq < anchor)
            rows = list(s.scalars(query.order_by(Checkpoint.step.desc()).limit(limit + 1)))
        return rows[:limit], len(rows) > limit

    def find_model(self, fine_tuned_model: str) -> Job | None:
        """The succeeded job whose model has this name (whoever owns it: callers check the tenant)."""
        with self.sessions() as s:
            return s.scalars(select(Job).where(Job.fine_tuned_model == fine_tuned_model,
                                               Job.status == JobStatus.SUCCEEDED,
                                               Job.model_deleted_at.is_(None))).first()

    def models(self, tenant: str) -> list[str]:
        with self.sessions() as s:
            return list(s.scalars(select(Job.fine_tuned_model).where(Job.tenant == tenant,
                                                                       Job.status == JobStatus.SUCCEEDED,
                                                                       Job.model_deleted_at.is_(None))
                                  .order_by(Job.seq)))

    def delete_model(self, tenant: str, model: str) -> Job:
        """DELETE /v1/models/ft:...: the tenant's own fine-tuned model is served no more (its job, events,
        checkpoints and their models stay, as OpenAI keeps a job after its model is deleted)."""
        with self.writes.begin() as s:
            job = s.scalars(self._lock(select(Job).where(Job.fine_tuned_model == model, Job.tenant == tenant,
                                                         Job.status == JobStatus.SUCCEEDED,
                                                         Job.model_deleted_at.is_(None)))).first()
            if job is None:
                raise NotFoundError(f"The model '{model}' does not exist", code="model_not_found", param="model")
            job.model_deleted_at = time.time()
            self._event(s, job.id, f"Fine-tuned model {model} deleted", attempt=job.attempt)
        return job

    def find_checkpoint_job(self, model: str) -> tuple[Job, int] | None:
        """The job and step of a checkpoint model `ft:...:ckpt-step-N` (whoever owns it: callers check),
        once the job has succeeded or was cancelled (its checkpoints are then final), and the step stored."""
        name, step = split_model(model)
        parts = parse_model(name) if step is not None else None
        if parts is None:
            return None
        base, tenant, suffix, short = parts
        with self.sessions() as s:
            jobs = s.scalars(select(Job).where(Job.tenant == tenant, Job.model == base, Job.suffix == suffix
                                               if suffix else Job.suffix.is_(None),
                                               Job.status.in_((JobStatus.SUCCEEDED, JobStatus.CANCELLED)))).all()
            job = next((j for j in jobs if model_name_of(j) == name), None)
            if job is None or s.scalar(select(Checkpoint.id).where(Checkpoint.job_id == job.id,
                                                                   Checkpoint.step == step)) is None:
                return None
        return job, step

    # -- checkpoint permissions ------------------------------------------------------------------------------
    def _own_checkpoint(self, tenant: str, checkpoint: str) -> tuple[Job, int]:
        found = self.find_checkpoint_job(checkpoint)
        if found is None or found[0].tenant != tenant:
            raise NotFoundError(f"No fine-tuned model checkpoint {checkpoint!r}", code="checkpoint_not_found",
                                param="fine_tuned_model_checkpoint")
        return found

    def grant(self, tenant: str, checkpoint: str, project_ids: list[str]) -> list[CheckpointPermission]:
        """Let these tenants (OpenAI's projects) use the checkpoint's model; a grant made before is kept as it
        is. Tenant names are checked for form only, so a grant tells no one which tenants exist."""
        from budwood.jobs.tenants import check_tenant_name

        job, step = self._own_checkpoint(tenant, checkpoint)
        for p in project_ids:
            try:
                check_tenant_name(p)
            except BudwoodError:
                raise BudwoodError(f"project_ids: {p[:70]!r} is not a tenant name", code="invalid_value",
                                   param="project_ids") from None
        out = []
        with self.writes.begin() as s:
            for p in dict.fromkeys(project_ids):
                row = s.scalars(select(CheckpointPermission).where(
                    CheckpointPermission.job_id == job.id, CheckpointPermission.step == step,
                    CheckpointPermission.project_id == p)).first()
                if row is None:
                    row = CheckpointPermission(id=new_id("cp_"), job_id=job.id, step=step, project_id=p,
                                               created_at=time.time())
                    s.add(row)
                    s.flush()
                out.append(row)
        return out

    def permissions(self, tenant: str, checkpoint: str, project_id: str | None, after: str | None, limit: int,
                    order: str) -> tuple[list[CheckpointPermission], bool]:
        job, step = self._own_checkpoint(tenant, checkpoint)
        query = select(CheckpointPermission).where(CheckpointPermission.job_id == job.id,
                                                   CheckpointPermission.step == step)
        if project_id:
            query = query.where(CheckpointPermission.project_id == project_id)
        asc = order == "ascending"
        with self.sessions() as s:
            if after:
                anchor = s.scalar(select(CheckpointPermission.seq).where(CheckpointPermission.id == after,
                                                                         CheckpointPermission.job_id == job.id))
                if anchor is None:
                    raise BudwoodError(f"after: no permission {after!r}", code="invalid_value", param="after")
                query = query.where(CheckpointPermission.seq > anchor if asc else CheckpointPermission.seq < anchor)
            query = query.order_by(CheckpointPermission.seq.asc() if asc else CheckpointPermission.seq.desc())
            rows = list(s.scalars(query.limit(limit + 1)))
        return rows[:limit], len(rows) > limit

    def revoke_permission(self, tenant: str, checkpoint: str, permission_id: str) -> None:
        job, step = self._own_checkpoint(tenant, checkpoint)
        with self.writes.begin() as s:
            row = s.scalars(select(CheckpointPermission).where(
                CheckpointPermission.id == permission_id, CheckpointPermission.job_id == job.id,
                CheckpointPermission.step == step)).first()
            if row is None:
                raise NotFoundError(f"No permission {permission_id!r} on this checkpoint", code="permission_not_found",
                                    param="permission_id")
            s.delete(row)

    def may_use_checkpoint(self, tenant: str, job: Job, step: int) -> bool:
        """The owner, or a tenant the owner granted this checkpoint."""
        if job.tenant == tenant:
            return True
        with self.sessions() as s:
            return s.scalar(select(CheckpointPermission.id).where(
                CheckpointPermission.job_id == job.id, CheckpointPermission.step == step,
                CheckpointPermission.project_id == tenant)) is not None

    # -- uploads (OpenAI's Uploads API) ------------------------------------------------------------------------
    def create_upload(self, tenant: str, filename: str, purpose: str, size: int, mime_type: str,
                      file_expires_after: int | None, expires_s: float = 3600.0,
                      max_pending: int | None = None) -> Upload:
        """A pending upload, expiring `expires_s` after creation (OpenAI's: an hour); at most `max_pending`
        (quotas.pending_uploads) of a tenant's are pending at a time, counted under the tenant's lock."""
        with self.writes.begin() as s:
            self._tenant(s, tenant)
            now = time.time()
            if max_pending is not None:
                n = s.scalar(select(func.count()).select_from(Upload).where(
                    Upload.tenant == tenant, Upload.status == "pending", Upload.expires_at > now))
                if n >= max_pending:
                    raise LimitExceeded(f"tenant {tenant!r} has {n} uploads pending; its limit is {max_pending} at "
                                        "a time (quotas.pending_uploads). Complete or cancel one, or wait for one "
                                        "to expire", code="pending_uploads_limit")
            row = Upload(id=new_id("upload_"), tenant=tenant, filename=filename, purpose=purpose, bytes=size,
                         mime_type=mime_type, created_at=now, expires_at=now + expires_s, status="pending",
                         file_expires_after=file_expires_after)
            s.add(row)
        return row

    def get_upload(self, tenant: str, upload_id: str) -> Upload:
        with self.sessions() as s:
            row = s.scalars(select(Upload).where(Upload.id == upload_id, Upload.tenant == tenant)).first()
        if row is None:
            raise NotFoundError(f"No such Upload object: {upload_id}", code="upload_not_found", param="upload_id")
        return row

    def _pending_upload(self, s: Session, tenant: str, upload_id: str) -> Upload:
        row = s.scalars(self._lock(select(Upload).where(Upload.id == upload_id, Upload.tenant == tenant))).first()
        if row is None:
            raise NotFoundError(f"No such Upload object: {upload_id}", code="upload_not_found", param="upload_id")
        status = "expired" if row.status == "pending" and time.time() >= row.expires_at else row.status
        if status != "pending":
            raise BudwoodError(f"Upload {upload_id} is {status}; only a pending upload takes parts or is completed "
                               "or cancelled", code="invalid_upload_state", param="upload_id")
        return row

    def add_part(self, tenant: str, upload_id: str, size: int, max_parts: int, store) -> UploadPart:
        """A part of `size` bytes, which `store(part_id)` moves into place, inside the transaction that checks
        that the upload is pending and that its parts stay within its declared bytes and `max_parts`."""
        with self.writes.begin() as s:
            upload = self._pending_upload(s, tenant, upload_id)
            t = self._tenant(s, tenant)  # after the upload, as complete_upload locks them: one order, no deadlock
            n, total = s.execute(select(func.count(), func.coalesce(func.sum(UploadPart.bytes), 0))
                                 .where(UploadPart.upload_id == upload_id)).one()
            if n >= max_parts:
                raise LimitExceeded(f"Upload {upload_id} has {n} parts, this service's limit", code="too_many_parts",
                                    param="data")
            if total + size > upload.bytes:
                raise BudwoodError(f"the parts would hold {total + size:,} bytes; the upload was created for "
                                   f"{upload.bytes:,}", code="invalid_value", param="data")
            self._check_storage(s, t, size, "this part", time.time())
            part = UploadPart(id=new_id("part_"), upload_id=upload_id, bytes=size, created_at=time.time())
            s.add(part)
            s.flush()
            store(part.id)
        return part

    def upload_parts(self, tenant: str, upload_id: str, part_ids: list[str]) -> tuple[Upload, list[UploadPart]]:
        """The pending upload and the parts `part_ids` names, in that order: each of its own, each once, adding
        up to its declared bytes."""
        with self.sessions() as s:
            upload = self._pending_upload(s, tenant, upload_id)
            parts = {p.id: p for p in s.scalars(select(UploadPart).where(UploadPart.upload_id == upload_id))}
        if len(set(part_ids)) != len(part_ids) or any(p not in parts for p in part_ids):
            raise BudwoodError("part_ids must name parts of this upload, each once", code="invalid_value",
                               param="part_ids")
        total = sum(parts[p].bytes for p in part_ids)
        if total != upload.bytes:
            raise BudwoodError(f"the parts hold {total:,} bytes; the upload was created for {upload.bytes:,}",
                               code="invalid_value", param="part_ids")
        return upload, [parts[p] for p in part_ids]

    def complete_upload(self, tenant: str, upload_id: str, file_values: dict, store) -> tuple[Upload, StoredFile]:
        """The upload's File recorded (under the storage quota, as any upload) and the upload completed, in one
        transaction: a cancel racing the completion sees one or the other."""
        with self.writes.begin() as s:
            upload = self._pending_upload(s, tenant, upload_id)
            row = self._add_file(s, tenant, store=store, quota=True, expires_after=upload.file_expires_after,
                                 completing=upload_id, **file_values)
            upload.status, upload.file_id = "completed", row.id
        return upload, row

    def cancel_upload(self, tenant: str, upload_id: str) -> Upload:
        with self.writes.begin() as s:
            upload = self._pending_upload(s, tenant, upload_id)
            upload.status = "cancelled"
        return upload

    def purge_expired_uploads(self, remove) -> int:
        """Pending uploads past their expires_at become `expired` and their parts go (the rows, then
        `remove(upload_id)` their bytes, after the commit), as OpenAI's uploads expire an hour after creation."""
        with self.writes.begin() as s:
            ids = list(s.scalars(self._lock(select(Upload.id).where(Upload.status == "pending",
                                                                    Upload.expires_at <= time.time())).limit(1000)))
            if ids:
                s.execute(update(Upload).where(Upload.id.in_(ids)).values(status="expired"))
                s.execute(delete(UploadPart).where(UploadPart.upload_id.in_(ids)))
        for upload_id in ids:
            remove(upload_id)
        return len(ids)

    def backlog(self) -> tuple[int, float | None]:
        """Jobs waiting for a worker, and the age in seconds of the oldest (for /health)."""
        with self.sessions() as s:
            n, oldest = s.execute(select(func.count(), func.min(Job.created_at))
                                  .where(Job.status.in_(WAITING))).one()
        return int(n), (max(0.0, time.time() - oldest) if oldest is not None else None)

    # -- jobs: the workers' side --------------------------------------------------------------------------
    def claim(self, owner: str, lease_s: float, max_attempts: int) -> tuple[Job, Lease] | None:
        """Take the oldest job that is waiting, or whose worker's lease ran out. A lease that ran out
        is a worker lost (pauses and shutdowns give jobs back without one); a job that has lost
        `max_attempts` workers fails, and one whose worker died while pausing is paused."""
        for _ in range(100):
            with self.writes.begin() as s:
                now = db_now(s)
                expired = (Job.lease_expires.is_(None)) | (Job.lease_expires < now)
                query = select(Job).where(or_(Job.status.in_(WAITING) & expired,
                                              Job.status.in_((JobStatus.RUNNING, JobStatus.PAUSING))
                                              & (Job.lease_expires < now)))
                job = s.scalars(self._lock(query.order_by(Job.seq).limit(1), skip_locked=True)).first()
                if job is None:
                    return None
                previous = job.lease_owner
                died = job.lease_expires is not None  # held by a worker that stopped renewing it
                if died:
                    job.lost += 1
                if job.status == JobStatus.PAUSING:  # its worker died while pausing: paused at its last checkpoint
                    job.status, job.lease_expires = JobStatus.PAUSED, None
                    self._event(s, job.id, f"Worker {previous} stopped responding while pausing; the job is "
                                           "paused at its last checkpoint", EventLevel.WARN, attempt=job.attempt)
                    continue
                if died and job.lost >= max_attempts:
                    job.status, job.finished_at, job.lease_expires = JobStatus.FAILED, time.time(), None
                    job.error = {"code": "worker_lost", "param": None,
                                 "message": f"the job's worker stopped responding {job.lost} times (last: "
                                            f"{previous}); the job may be too large for the workers' memory"}
                    self._event(s, job.id, job.error["message"], EventLevel.ERROR, attempt=job.attempt)
                    continue
                if died:
                    self._event(s, job.id, f"Worker {previous} stopped responding; {owner} takes the job over"
                                + (" from its last checkpoint" if job.status == JobStatus.RUNNING else ""),
                                EventLevel.WARN, attempt=job.attempt + 1)
                job.attempt += 1
                job.lease_owner, job.lease_expires = owner, now + lease_s
                return job, Lease(job.id, owner, job.attempt)
        return None

    def expire_leases_of(self, owner: str) -> int:
        """A worker known dead (its supervisor saw its process end): its leases run out now, so its job is
        taken over at once rather than after lease_s; the takeover counts it as a lost worker."""
        with self.writes.begin() as s:
            now = db_now(s)
            return s.execute(update(Job).where(Job.lease_owner == owner, Job.status.in_(HELD),
                                               Job.lease_expires.is_not(None), Job.lease_expires > now)
                             .values(lease_expires=now - 1)).rowcount

    def heartbeat(self, lease: Lease, lease_s: float, progress: dict | None = None,
                  estimated_finish: float | None = None) -> str:
        """Renew the lease; returns the job's status (a user may have cancelled or paused it)."""
        with self.writes.begin() as s:
            now = db_now(s)
            values: dict = {"lease_expires": now + lease_s}
            if progress is not None:
                values["progress"] = progress
                values["estimated_finish"] = estimated_finish
            done = s.execute(update(Job).where(Job.id == lease.job_id, Job.lease_owner == lease.owner,
                                               Job.attempt == lease.attempt, Job.status.in_(HELD))
                             .values(**values)).rowcount
            if done:
                return s.scalar(select(Job.status).where(Job.id == lease.job_id))
            row = s.execute(select(Job.status, Job.lease_owner, Job.attempt).where(Job.id == lease.job_id)).first()
        if row is not None and row.lease_owner == lease.owner and row.attempt == lease.attempt:
            return row.status  # cancelled (or another end) while this worker held it
        raise LeaseLost(lease.job_id)

    def _fenced(self, s: Session, lease: Lease) -> Job:
        job = s.scalars(self._lock(select(Job).where(Job.id == lease.job_id))).first()
        if job is None or job.lease_owner != lease.owner or job.attempt != lease.attempt:
            raise LeaseLost(lease.job_id)
        return job

    def emit(self, lease: Lease, events: list[tuple[str, str, str, dict | None]]) -> None:
        """Append (level, type, message, data) events, only while this worker holds the job."""
        if not events:
            return
        with self.writes.begin() as s:
            self._fenced(s, lease)
            for level, type_, message, data in events:
                self._event(s, lease.job_id, message, level, type_, data, lease.attempt)

    def _event(self, s: Session, job_id: str, message: str, level: str = EventLevel.INFO,
               type_: str = EventType.MESSAGE, data: dict | None = None, attempt: int = 0) -> None:
        s.add(JobEvent(id=new_id("ftevent-"), job_id=job_id, created_at=time.time(), level=level, type=type_,
                       message=message, data=data, attempt=attempt))

    def set_hyperparameters(self, lease: Lease, hyperparameters: dict, examples: int) -> None:
        """Validation done: the "auto" values resolved; the job moves to queued and on to running."""
        with self.writes.begin() as s:
            job = self._fenced(s, lease)
            if job.status != JobStatus.VALIDATING_FILES:
                raise LeaseLost(lease.job_id)
            job.hyperparameters, job.status, job.train_examples = hyperparameters, JobStatus.QUEUED, examples
            self._event(s, job.id, "Files validated, moving job to queued state", attempt=lease.attempt)

    def start(self, lease: Lease, resumed_from: int | None) -> Job:
        with self.writes.begin() as s:
            job = self._fenced(s, lease)
            if job.status == JobStatus.PAUSING:  # paused while a takeover restored its checkpoint: paused now
                job.status, job.lease_expires = JobStatus.PAUSED, None
                self._event(s, job.id, "Job paused", attempt=lease.attempt)
            if job.status not in (JobStatus.QUEUED, JobStatus.RUNNING):  # running: taken over from a dead worker
                raise LeaseLost(lease.job_id)
            job.status = JobStatus.RUNNING
            job.started_at = job.started_at or time.time()
            self._event(s, job.id, "Fine-tuning job started" if resumed_from is None else
                        f"Fine-tuning job resumed from its checkpoint at step {resumed_from}", attempt=lease.attempt)
        return job

    def add_checkpoint(self, lease: Lease, step: int, metrics: dict, final: bool) -> Checkpoint:
        with self.writes.begin() as s:
            self._fenced(s, lease)
            row = s.scalars(select(Checkpoint).where(Checkpoint.job_id == lease.job_id, Checkpoint.step == step)
                            ).first()
            if row is None:
                row = Checkpoint(id=new_id("ftckpt_"), job_id=lease.job_id, step=step, created_at=time.time(),
                                 metrics=metrics, attempt=lease.attempt, final=final)
                s.add(row)
                self._event(s, lease.job_id, f"Checkpoint created at step {step}", data={"step": step},
                            attempt=lease.attempt)
        return row

    def latest_checkpoint(self, job_id: str) -> Checkpoint | None:
        with self.sessions() as s:
            return s.scalars(select(Checkpoint).where(Checkpoint.job_id == job_id).order_by(Checkpoint.step.desc())
                             ).first()

    def finish(self, lease: Lease, status: JobStatus, message: str, level: EventLevel = EventLevel.INFO,
               **values) -> bool:
        """The job's outcome, written once: only by the worker holding it, only while it is in progress.
        Returns False if the job had already ended (cancelled meanwhile) or was taken over."""
        with self.writes.begin() as s:
            job = self._fenced(s, lease)
            if job.status not in HELD:
                return False
            job.status, job.lease_expires = status, None  # the owner stays on record: who ended it
            if status in TERMINAL:
                job.finished_at, job.estimated_finish = time.time(), None
            for key, value in values.items():
                setattr(job, key, value)
            self._event(s, job.id, message, level, attempt=lease.attempt)
        return True

    def release(self, lease: Lease, message: str) -> None:
        """Give a job back (worker shutting down): waiting again, to resume from its last checkpoint."""
        with self.writes.begin() as s:
            job = self._fenced(s, lease)
            if job.status in HELD:
                job.status = JobStatus.PAUSED if job.status == JobStatus.PAUSING else \
                    JobStatus.VALIDATING_FILES if job.status == JobStatus.VALIDATING_FILES else JobStatus.QUEUED
                job.lease_owner, job.lease_expires = None, None
                self._event(s, job.id, message, EventLevel.WARN, attempt=lease.attempt)
