"""The fine-tuning service's tables (SQLAlchemy 2), in the registry's database and migration chain.

Every row that a tenant owns carries its tenant, and every query filters on it. Jobs carry their
lease: `lease_owner`, `lease_expires` (seconds on the database's clock) and `attempt`, the fencing
token that a worker's every write is conditioned on, so that a worker that lost its job can never
finish it, checkpoint it or add to its events.
"""
from __future__ import annotations

from sqlalchemy import JSON, BigInteger, Boolean, Float, ForeignKey, Index, Integer, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column

from budwood.db import Base


class Tenant(Base):
    __tablename__ = "tenants"

    name: Mapped[str] = mapped_column(String(64), primary_key=True)
    created_at: Mapped[float] = mapped_column(Float)
    max_storage_bytes: Mapped[int | None] = mapped_column(BigInteger)  # None: the service's default
    max_concurrent_jobs: Mapped[int | None] = mapped_column(Integer)


class ApiKey(Base):
    """`bw-<id>-<secret>`: the id finds the row, the secret is kept only as a salted SHA-256."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    tenant: Mapped[str] = mapped_column(ForeignKey("tenants.name", ondelete="CASCADE"), index=True)
    name: Mapped[str | None] = mapped_column(String(200))
    salt: Mapped[str] = mapped_column(String(64))
    digest: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)
    revoked_at: Mapped[float | None] = mapped_column(Float)


class StoredFile(Base):
    __tablename__ = "ft_files"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    tenant: Mapped[str] = mapped_column(ForeignKey("tenants.name", ondelete="CASCADE"), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)
    sha256: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[float] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(16))
    status_details: Mapped[str | None] = mapped_column(Text)
    format: Mapped[str | None] = mapped_column(String(32))
    examples: Mapped[int | None] = mapped_column(Integer)
    expires_at: Mapped[float | None] = mapped_column(Float)  # expires_after: unusable (and purged) from then on


class Job(Base):
    __tablename__ = "ft_jobs"
    __table_args__ = (UniqueConstraint("tenant", "idempotency_key", name="uq_job_idempotency"),
                      Index("ix_job_claim", "status", "seq"))

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    tenant: Mapped[str] = mapped_column(ForeignKey("tenants.name", ondelete="CASCADE"), index=True)
    status: Mapped[str] = mapped_column(String(24))
    model: Mapped[str] = mapped_column(String(300))
    training_file: Mapped[str] = mapped_column(String(64))
    validation_file: Mapped[str | None] = mapped_column(String(64))
    suffix: Mapped[str | None] = mapped_column(String(64))
    seed: Mapped[int] = mapped_column(BigInteger)
    meta: Mapped[dict | None] = mapped_column("metadata", JSON)
    hyperparameters: Mapped[dict] = mapped_column(JSON)  # as asked ("auto" allowed), resolved once validated
    integrations: Mapped[list | None] = mapped_column(JSON)  # OpenAI's `integrations` as asked (W&B's run settings)
    fine_tuned_model: Mapped[str | None] = mapped_column(String(400), unique=True)
    registry_ref: Mapped[str | None] = mapped_column(String(200))
    error: Mapped[dict | None] = mapped_column(JSON)
    result_files: Mapped[list] = mapped_column(JSON, default=list)
    progress: Mapped[dict] = mapped_column(JSON, default=dict)  # step, total_steps, losses, tokens/s
    created_at: Mapped[float] = mapped_column(Float)
    started_at: Mapped[float | None] = mapped_column(Float)
    finished_at: Mapped[float | None] = mapped_column(Float)
    trained_tokens: Mapped[int | None] = mapped_column(BigInteger)
    estimated_finish: Mapped[float | None] = mapped_column(Float)
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    request_hash: Mapped[str | None] = mapped_column(String(64))
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_expires: Mapped[float | None] = mapped_column(Float)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    lost: Mapped[int] = mapped_column(Integer, default=0)  # workers that died holding it (not pauses, not shutdowns)
    train_examples: Mapped[int | None] = mapped_column(Integer)  # set once the files are validated
    # trained_tokens is OpenAI's billing count (every token x epochs); this is the tokens the loss was taken on
    trained_assistant_tokens: Mapped[int | None] = mapped_column(BigInteger)
    model_deleted_at: Mapped[float | None] = mapped_column(Float)  # DELETE /v1/models/ft:...: served no more


class JobEvent(Base):
    __tablename__ = "ft_events"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("ft_jobs.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[float] = mapped_column(Float)
    level: Mapped[str] = mapped_column(String(8))
    type: Mapped[str] = mapped_column(String(16))
    message: Mapped[str] = mapped_column(Text)
    data: Mapped[dict | None] = mapped_column(JSON)
    attempt: Mapped[int] = mapped_column(Integer, default=0)


class Checkpoint(Base):
    __tablename__ = "ft_checkpoints"
    __table_args__ = (UniqueConstraint("job_id", "step", name="uq_checkpoint_step"),)

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("ft_jobs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[float] = mapped_column(Float)
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)
    attempt: Mapped[int] = mapped_column(Integer, default=0)
    final: Mapped[bool] = mapped_column(Boolean, default=False)


class CheckpointPermission(Base):
    """A checkpoint's owner lets another tenant (OpenAI's project) use that checkpoint's model."""

    __tablename__ = "ft_checkpoint_permissions"
    __table_args__ = (UniqueConstraint("job_id", "step", "project_id", name="uq_checkpoint_permission"),)

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    job_id: Mapped[str] = mapped_column(ForeignKey("ft_jobs.id", ondelete="CASCADE"), index=True)
    step: Mapped[int] = mapped_column(Integer)
    project_id: Mapped[str] = mapped_column(String(64), index=True)  # the tenant granted
    created_at: Mapped[float] = mapped_column(Float)


class Upload(Base):
    """OpenAI's Uploads API: a file sent in parts, which becomes a File when completed."""

    __tablename__ = "ft_uploads"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    tenant: Mapped[str] = mapped_column(ForeignKey("tenants.name", ondelete="CASCADE"), index=True)
    filename: Mapped[str] = mapped_column(String(255))
    purpose: Mapped[str] = mapped_column(String(32))
    bytes: Mapped[int] = mapped_column(BigInteger)  # as declared at creation; the parts must add up to it
    mime_type: Mapped[str] = mapped_column(String(255))
    created_at: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(16))
    file_id: Mapped[str | None] = mapped_column(String(64))
    file_expires_after: Mapped[int | None] = mapped_column(Integer)  # the File's expires_after, in seconds


class UploadPart(Base):
    __tablename__ = "ft_upload_parts"

    seq: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    id: Mapped[str] = mapped_column(String(64), unique=True)
    upload_id: Mapped[str] = mapped_column(ForeignKey("ft_uploads.id", ondelete="CASCADE"), index=True)
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[float] = mapped_column(Float)
