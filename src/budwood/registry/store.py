"""Content-addressed blobs: a file is stored once under its sha256, whoever publishes it.

A blob appears under its final name only complete and verified (written to a temporary file, hashed,
fsynced, renamed), so a publish killed midway leaves at most an unreferenced blob, never a bad one. A
blob damaged on disk later is replaced by the next upload of the same content (put_stream checks the
stored copy), and a full disk is said as such with nothing half-written kept.
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from budwood.errors import ErrorKind
from budwood.hashing import CHUNK, sha256_file
from budwood.registry.names import NotFound, RegistryError

SHA256 = re.compile(r"^[0-9a-f]{64}$")


def raise_if_full(error: OSError, where: Path) -> None:
    """A full disk or quota, said as such (the caller removes what it had half-written)."""
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        raise RegistryError(f"no space left on the device of {where} ({os.strerror(error.errno)}); nothing was "
                            "kept, free some space and try again", code="no_space", kind=ErrorKind.UNAVAILABLE) \
            from None


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

    def intact(self, digest: str) -> bool:
        """Whether the stored blob's content still hashes to its name (a disk or a hand may have damaged it)."""
        try:
            return sha256_file(self.path(digest)) == digest
        except FileNotFoundError:
            return False

    def discard(self, digest: str) -> None:
        """Remove a (damaged) blob, so that the next upload of its content stores it afresh."""
        self.path(digest).unlink(missing_ok=True)

    def put_file(self, source: Path) -> tuple[str, int]:
        """Store a local file; (sha256, size)."""
        with open(source, "rb") as f:
            return self.put_stream(iter(lambda: f.read(CHUNK), b""))

    def put_stream(self, chunks: Iterable[bytes], expected: str | None = None) -> tuple[str, int]:
        """Store bytes as they arrive; with `expected`, refuse content whose hash differs (an upload
        that was cut short or altered). A stored copy that no longer hashes to its name is replaced."""
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
            if not final.exists() or not self._same(final, size, digest):
                final.parent.mkdir(parents=True, exist_ok=True)
                os.replace(tmp, final)
            return digest, size
        except OSError as e:
            raise_if_full(e, self.root)
            raise
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    @staticmethod
    def _same(final: Path, size: int, digest: str) -> bool:
        """The stored copy is whole: the size first (cheap), then the hash."""
        try:
            return final.stat().st_size == size and sha256_file(final) == digest
        except OSError:
            return False

    def read(self, digest: str) -> Iterator[bytes]:
        path = self.path(digest)
        if not path.is_file():
            raise NotFound(f"blob {digest} is not in the store {self.root}")
        with open(path, "rb") as f:
            yield from iter(lambda: f.read(CHUNK), b"")

    def copy_to(self, digest: str, dest: Path) -> None:
        """Copy a blob out, checking its hash on the way (a blob damaged on disk is never handed on)."""
        h = hashlib.sha256()
        try:
            with open(dest, "wb") as out:
                for chunk in self.read(digest):
                    h.update(chunk)
                    out.write(chunk)
        except OSError as e:
            dest.unlink(missing_ok=True)
            raise_if_full(e, dest.parent)
            raise
        if h.hexdigest() != digest:
            dest.unlink()
            raise RegistryError(f"blob {digest} in {self.root} is damaged (its content hashes to {h.hexdigest()})")

    def link_to(self, digest: str, dest: Path) -> None:
        """Place a blob at `dest` without copying where the filesystem allows (read-only use)."""
        try:
            os.link(self.path(digest), dest)
        except OSError:
            self.copy_to(digest, dest)
