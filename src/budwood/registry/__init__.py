"""The adapter registry: versioned, licensed, signed adapters that can be found, pulled and served.

`open_registry(location)` gives the same interface for every kind of location:
  None                  BUDWOOD_REGISTRY, else the local registry under BUDWOOD_HOME
  http(s)://HOST[:PORT] a remote registry (the server app's /v1/registry routes), key from BUDWOOD_API_KEY
  sqlite:/// postgresql://...   metadata in that database, blobs under BUDWOOD_HOME/blobs (or BUDWOOD_BLOBS)
  a folder              a self-contained registry: FOLDER/registry.db and FOLDER/blobs
"""
from __future__ import annotations

import os
from pathlib import Path

from budwood.registry.names import AdapterRef, NotFound, RegistryError, parse_ref


def open_registry(location: str | None = None, api_key: str | None = None):
    from budwood.registry.local import LocalRegistry

    location = location or os.environ.get("BUDWOOD_REGISTRY")
    if not location:
        return LocalRegistry()
    if location.startswith(("http://", "https://")):
        from budwood.registry.remote import RemoteRegistry

        return RemoteRegistry(location, api_key or os.environ.get("BUDWOOD_API_KEY"))
    if "://" in location:
        return LocalRegistry(database=location)
    folder = Path(location).expanduser()
    return LocalRegistry(database=f"sqlite:///{folder.resolve() / 'registry.db'}", blobs=folder / "blobs")


__all__ = ["AdapterRef", "NotFound", "RegistryError", "open_registry", "parse_ref"]
