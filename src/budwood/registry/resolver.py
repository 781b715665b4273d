"""Serving registry ids: `org/name@1.2.0` (or `org/name` for the latest) as a model name.

The first request for an id pulls the version into BUDWOOD_HOME/adapters or `pull_dir` (hash-checked);
later ones find it there. An id without a version follows the latest release, looked up again after
`ttl_s` so that a new publish is served without a restart.
"""
from __future__ import annotations

import threading
import time
from pathlib import Path

from budwood.engine.adapters import AdapterError
from budwood.registry.local import LicenseNotAccepted
from budwood.registry.names import NotFound, RegistryError, parse_ref


class RegistryResolver:
    def __init__(self, registry, pull_dir: Path | None = None, include_private: bool = False, ttl_s: float = 30.0,
                 accept_private_terms: bool = False):
        """`pull_dir`: where pulled versions go (default BUDWOOD_HOME/adapters). `include_private`: serve
        private adapters too (the server's ModelAccess decides which caller may use which).
        `accept_private_terms`: a private adapter's terms bind only its owner, who alone may use it
        (the fine-tuning service's tenants and their job adapters)."""
        self.registry = registry
        self.accept_private_terms = accept_private_terms
        self.pull_dir = pull_dir
        self.include_private = include_private
        self.ttl_s = ttl_s
        self.paths: dict[str, tuple[Path, float]] = {}
        self.lock = threading.Lock()

    def names(self) -> list[str]:
        with self.lock:
            return sorted(self.paths)

    def resolve(self, name: str) -> Path | None:
        if "/" not in name:
            return None
        try:
            ref = parse_ref(name)
        except RegistryError:
            return None
        with self.lock:
            hit = self.paths.get(name)
        if hit and (ref.version or time.monotonic() - hit[1] < self.ttl_s):
            return hit[0]
        try:
            info = self.registry.version_info(name, include_private=self.include_private)
            out = self.pull_dir / info.id / info.version if self.pull_dir else None
            _, path = self.registry.pull(info.ref, out, include_private=self.include_private,
                                         accept_license=self.accept_private_terms and info.private)
        except NotFound:
            return None
        except LicenseNotAccepted:
            raise AdapterError(f"{name} has licence terms that must be accepted first: run budwood pull {name} "
                               "--accept-license on the server") from None
        except RegistryError as e:
            raise AdapterError(str(e)) from None
        with self.lock:
            self.paths[name] = (path, time.monotonic())
        return path
