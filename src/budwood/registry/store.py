"""Content-addressed blobs: a file is stored once under its sha256, whoever publishes it.

A blob appears under its final name only complete and verified (written to a temporary file, hashed,
fsynced, renamed), so a publish killed midway leaves at most an unreferenced blob, never a bad one.
"""
from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from budwood.hashing import CHUNK
from budwood.registry.names import NotFound, RegistryError

SHA256 = re.compile(r"^[0-9a-f]{64}$")


def check_digest(digest: str) -> str:
    if not isinstance(digest, str) or not SHA256.match(digest):
        raise RegistryError(f"bad blob id {digest!r}: expected 64 lower-case hex digits (sha256)")
    return digest


class BlobStore:
    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser()
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)

    def path(self, digest: str) -> Path:
        check_digest(digest)
        return self.root / "sha256" / digest[:2] / digest

    def has(self, digest: str) -> bool:
        return self.path(digest).is_file()

    def put_file(self, source: Path) -> tuple[str, int]:
        """Store a local file; (sha256, size)."""
        with open(source, "rb") as f:
            return self.put_stream(iter(lambda: f.read(CHUNK), b""))

    def put_stream(self, chunks: Iterable[bytes], expected: str | None = None) -> tuple[str, int]:
        """Store bytes as they arrive; with `expected`, refuse content whose hash differs (an upload
        that was cut short or altered)."""
        h, size = hashlib.sha256(), 0
        fd, tmp = tempfile.mkstemp(dir=self.root / "tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    h.update(chunk)
                    size += len(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            digest = h.hexdigest()
            if expected is not None and digest != expected:
                raise RegistryError(f"blob content does not match its id: expected sha256 {expected}, got {digest}")
            final = self.path(digest)
            if not final.exists():
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, final)
            return digest, size
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def read(self, digest: str) -> Iterator[bytes]:
        path = self.path(digest)
        if not path.is_file():
            raise NotFound(f"blob {digest} is not in the store {self.root}")
        with open(path, "rb") as f:
            yield from iter(lambda: f.read(CHUNK), b"")

    def copy_to(self, digest: str, dest: Path) -> None:
        """Copy a blob out, checking its hash on the way (a blob damaged on disk is never handed on)."""
        h = hashlib.sha256()
        with open(dest, "wb") as out:
            for chunk in self.read(digest):
                h.update(chunk)
                out.write(chunk)
        if h.hexdigest() != digest:
            dest.unlink()
            raise RegistryError(f"blob {digest} in {self.root} is damaged (its content hashes to {h.hexdigest()})")

    def link_to(self, digest: str, dest: Path) -> None:
        """Place a blob at `dest` without copying where the filesystem allows (read-only use)."""
        try:
            os.link(self.path(digest), dest)
        except OSError:
            self.copy_to(digest, dest)
