"""What the registry answers with, local or over HTTP: the same pydantic shapes both ways."""
from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, Field


class FileEntry(BaseModel):
    path: str
    sha256: str
    size: int


class VersionInfo(BaseModel):
    id: str = Field(description="org/name")
    version: str
    license: str
    terms: str | None = None
    requires_acceptance: bool = False
    base_model: str
    base_fingerprint: str | None = None
    adapter_fingerprint: str
    rank: int | None = None
    description: str | None = None
    card: dict = {}
    metrics: dict[str, float] = Field({}, description="suite.metric -> value, from the adapter's own results")
    tags: list[str] = []
    signer: str | None = Field(None, description="key id of the attestation verified at publish; None: unsigned")
    publisher: str | None = None
    private: bool = False
    yanked: bool = False
    yank_reason: str | None = None
    created: datetime
    files: list[FileEntry] = []

    @property
    def ref(self) -> str:
        return f"{self.id}@{self.version}"


class AdapterInfo(BaseModel):
    id: str
    private: bool
    latest: VersionInfo | None = Field(description="newest version that is not yanked")
    versions: list[VersionInfo] = Field(description="oldest first")


class PublishRequest(BaseModel):
    """A version to commit, sent after its blobs are uploaded (remote) or stored (local)."""
    id: str
    version: str | None = None
    license: str
    terms: str | None = None
    private: bool = False
    publisher: str | None = None
    files: list[FileEntry]


class YankRequest(BaseModel):
    reason: str | None = None
    undo: bool = False
