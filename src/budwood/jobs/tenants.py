"""Tenants and their API keys.

A tenant is a namespace: its files, jobs, checkpoints and models, and its registry namespace of the
same name. A key is `bw-<id>-<secret>` with 256 random bits of secret; only a salted SHA-256 of the
secret is stored (a slow password hash buys nothing against a 256-bit secret and would cost every
request), compared in constant time. Revoked keys stop working at once.
"""
from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from budwood.db import session_makers
from budwood.errors import BudwoodError, ErrorKind
from budwood.jobs.models import ApiKey, Tenant
from budwood.registry.names import RegistryError, check_part
from budwood.serve.auth import Caller

_KEY = re.compile(r"^bw-([0-9a-f]{16})-([A-Za-z0-9_-]{43})$")


class TenantError(BudwoodError):
    """A tenant or key the operator named is wrong (bad name, unknown, already there)."""


@dataclass
class IssuedKey:
    id: str
    tenant: str
    key: str  # shown once, never stored


def check_tenant_name(name: str) -> str:
    """Tenant names are registry namespaces: lower-case letters, digits, '.', '_', '-'."""
    try:
        check_part(name, "tenant name", name)
    except RegistryError:
        raise TenantError(f"bad tenant name {name!r}: use 1-64 lower-case letters, digits, '.', '_' or '-', "
                          "starting and ending with a letter or digit (it is also the registry namespace)") from None
    return name


def _digest(salt: str, secret: str) -> str:
    return hashlib.sha256(bytes.fromhex(salt) + secret.encode()).hexdigest()


class Tenants:
    def __init__(self, engine):
        self.sessions, self.writes = session_makers(engine)

    def create(self, name: str, max_storage_bytes: int | None = None, max_concurrent_jobs: int | None = None
               ) -> Tenant:
        check_tenant_name(name)
        for what, value in (("max storage", max_storage_bytes), ("max concurrent jobs", max_concurrent_jobs)):
            if value is not None and value < 0:
                raise TenantError(f"{what}: expected a number >= 0, got {value}")
        try:
            with self.writes.begin() as s:
                row = Tenant(name=name, created_at=time.time(), max_storage_bytes=max_storage_bytes,
                             max_concurrent_jobs=max_concurrent_jobs)
                s.add(row)
        except IntegrityError:
            raise TenantError(f"tenant {name!r} already exists", kind=ErrorKind.CONFLICT) from None
        return row

    def update(self, name: str, max_storage_bytes: int | None = None, max_concurrent_jobs: int | None = None
               ) -> Tenant:
        with self.writes.begin() as s:
            row = s.get(Tenant, name)
            if row is None:
                raise TenantError(f"no tenant {name!r}", kind=ErrorKind.NOT_FOUND)
            if max_storage_bytes is not None:
                row.max_storage_bytes = max_storage_bytes
            if max_concurrent_jobs is not None:
                row.max_concurrent_jobs = max_concurrent_jobs
        return row

    def list(self) -> list[Tenant]:
        with self.sessions() as s:
            return list(s.scalars(select(Tenant).order_by(Tenant.name)))

    def get(self, name: str) -> Tenant:
        with self.sessions() as s:
            row = s.get(Tenant, name)
        if row is None:
            raise TenantError(f"no tenant {name!r} (budwood tenants list shows them)", kind=ErrorKind.NOT_FOUND)
        return row

    def issue_key(self, tenant: str, name: str | None = None) -> IssuedKey:
        self.get(tenant)
        key_id, secret, salt = secrets.token_hex(8), secrets.token_urlsafe(32), secrets.token_hex(16)
        with self.writes.begin() as s:
            s.add(ApiKey(id=key_id, tenant=tenant, name=name, salt=salt, digest=_digest(salt, secret),
                         created_at=time.time()))
        return IssuedKey(key_id, tenant, f"bw-{key_id}-{secret}")

    def revoke_key(self, key_id: str) -> ApiKey:
        key_id = key_id.removeprefix("bw-").split("-")[0]
        with self.writes.begin() as s:
            row = s.get(ApiKey, key_id)
            if row is None:
                raise TenantError(f"no API key {key_id!r} (budwood keys list shows them)", kind=ErrorKind.NOT_FOUND)
            if row.revoked_at is None:
                row.revoked_at = time.time()
        return row

    def keys(self, tenant: str | None = None) -> list[ApiKey]:
        query = select(ApiKey).order_by(ApiKey.tenant, ApiKey.created_at)
        if tenant:
            query = query.where(ApiKey.tenant == tenant)
        with self.sessions() as s:
            return list(s.scalars(query))

    def tenant_of(self, key: str) -> str | None:
        """The tenant a live key belongs to, else None."""
        match = _KEY.match(key)
        if not match:
            return None
        key_id, secret = match.groups()
        with self.sessions() as s:
            row = s.get(ApiKey, key_id)
        if row is None or row.revoked_at is not None:
            return None
        return row.tenant if hmac.compare_digest(row.digest, _digest(row.salt, secret)) else None


class TenantAuth:
    """serve.auth.Authenticator for the service: every /v1 request names its tenant by its key.
    Answers are cached for a few seconds, so a revocation takes effect within `ttl_s`."""

    anonymous = None

    def __init__(self, tenants: Tenants, ttl_s: float = 5.0):
        self.tenants, self.ttl_s = tenants, ttl_s
        self.cache: dict[str, tuple[str | None, float]] = {}
        self.lock = threading.Lock()

    def authenticate(self, token: str) -> Caller | None:
        now, digest = time.monotonic(), hashlib.sha256(token.encode()).hexdigest()
        with self.lock:
            hit = self.cache.get(digest)
        if hit is None or now - hit[1] > self.ttl_s:
            hit = (self.tenants.tenant_of(token), now)
            with self.lock:
                if len(self.cache) > 10_000:
                    self.cache.clear()
                self.cache[digest] = hit
        return Caller.of_tenant(hit[0]) if hit[0] else None
