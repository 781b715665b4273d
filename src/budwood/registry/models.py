"""The registry's tables (SQLAlchemy 2). Changing them means a new Alembic migration in budwood/db/migrations/.

A version is immutable once committed: its files, licence and results are written in the one
transaction that creates it; only `yanked` and `yank_reason` change later.
"""
from __future__ import annotations

from datetime import datetime

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Index, String, Text, UniqueConstraint
from sqlalchemy.orm import Mapped, mapped_column, relationship

from budwood.db import Base


class Adapter(Base):
    __tablename__ = "adapters"
    __table_args__ = (UniqueConstraint("namespace", "name", name="uq_adapter_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    namespace: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(64))
    private: Mapped[bool] = mapped_column(Boolean, default=False)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    versions: Mapped[list[Version]] = relationship(back_populates="adapter", order_by="Version.id")


class Version(Base):
    __tablename__ = "versions"
    __table_args__ = (UniqueConstraint("adapter_id", "version", name="uq_adapter_version"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"), index=True)
    version: Mapped[str] = mapped_column(String(64))
    license: Mapped[str] = mapped_column(String(200))
    terms: Mapped[str | None] = mapped_column(Text)
    requires_acceptance: Mapped[bool] = mapped_column(Boolean, default=False)
    base_model: Mapped[str] = mapped_column(String(300), index=True)
    base_fingerprint: Mapped[str | None] = mapped_column(String(80))
    adapter_fingerprint: Mapped[str] = mapped_column(String(64))
    rank: Mapped[int | None]
    description: Mapped[str | None] = mapped_column(Text)
    card: Mapped[dict] = mapped_column(JSON, default=dict)  # the card's YAML metadata
    provenance: Mapped[dict] = mapped_column(JSON, default=dict)  # budwood.json
    signer: Mapped[str | None] = mapped_column(String(80))  # key id of a verified attestation
    publisher: Mapped[str | None] = mapped_column(String(200))
    yanked: Mapped[bool] = mapped_column(Boolean, default=False)
    yank_reason: Mapped[str | None] = mapped_column(Text)
    created: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    adapter: Mapped[Adapter] = relationship(back_populates="versions")
    files: Mapped[list[File]] = relationship(cascade="all, delete-orphan", order_by="File.path")
    metrics: Mapped[list[Metric]] = relationship(cascade="all, delete-orphan")
    tags: Mapped[list[Tag]] = relationship(cascade="all, delete-orphan")


class File(Base):
    __tablename__ = "files"
    __table_args__ = (UniqueConstraint("version_id", "path", name="uq_version_file"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id", ondelete="CASCADE"), index=True)
    path: Mapped[str] = mapped_column(String(255))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    size: Mapped[int] = mapped_column(BigInteger)


class Metric(Base):
    """One evaluation number of a version, so `search --where hallucination_rate<0.1` is a SQL query."""

    __tablename__ = "metrics"
    __table_args__ = (Index("ix_metric_lookup", "suite", "name", "value"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id", ondelete="CASCADE"), index=True)
    suite: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(128))
    value: Mapped[float] = mapped_column(Float)


class Tag(Base):
    __tablename__ = "tags"
    __table_args__ = (UniqueConstraint("version_id", "tag", name="uq_version_tag"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id", ondelete="CASCADE"), index=True)
    tag: Mapped[str] = mapped_column(String(200), index=True)
