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


def publish(adapter_dir: str | Path, ref: str, license: str, terms_file: str | Path | None = None,
            private: bool = False, registry=None, publisher: str | None = None):
    """Check that the adapter loads in peft on its base, then publish it. Returns (VersionInfo, warnings)."""
    from budwood.artifacts import AdapterDir
    from budwood.registry.compat import check_publishable
    from budwood.registry.names import parse_license

    adapter = AdapterDir.open(adapter_dir)
    terms = None
    if terms_file is not None:
        try:
            terms = Path(terms_file).expanduser().read_text()
        except (OSError, UnicodeDecodeError) as e:
            raise RegistryError(f"--terms {terms_file}: cannot read it ({e.__class__.__name__})") from None
        if not terms.strip():
            raise RegistryError(f"--terms {terms_file}: the file is empty")
    parse_ref(ref)
    parse_license(license, terms is not None)
    warnings = check_publishable(adapter)
    registry = registry if registry is not None else open_registry()
    return registry.publish(adapter.path, ref, license, terms, private, publisher), warnings


__all__ = ["publish", "AdapterRef", "NotFound", "RegistryError", "open_registry", "parse_ref"]
