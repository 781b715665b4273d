"""Tenants' fine-tuned models as model names: `ft:<base>:<tenant>:<suffix>:<id>` answers
/v1/chat/completions the moment its job succeeds, with no restart, and only for the tenant that owns it
(until the tenant deletes it); its checkpoints, `...:ckpt-step-N`, once the job has succeeded or was
cancelled, for the owner and the tenants it granted the checkpoint (checkpoint permissions).
"""
from __future__ import annotations

import threading
from pathlib import Path

from budwood.engine.adapters import AdapterError
from budwood.jobs.protocol import split_model
from budwood.serve.auth import Caller, RegistryAccess


class ServiceAccess:
    """ModelAccess: a tenant uses its own ft: models, public registry adapters and its private ones."""

    def __init__(self, queue, registry):
        self.queue = queue
        self.registry_access = RegistryAccess(registry)

    def can_use(self, caller: Caller, model: str) -> bool:
        """Read on every request, so a deleted model or a revoked permission stops at once."""
        if not model.startswith("ft:"):
            return self.registry_access.can_use(caller, model)
        if caller.tenant is None:
            return False
        if split_model(model)[1] is None:
            job = self.queue.find_model(model)
            return job is not None and job.tenant == caller.tenant
        found = self.queue.find_checkpoint_job(model)
        return found is not None and self.queue.may_use_checkpoint(caller.tenant, *found)

    def listed(self, caller: Caller) -> list[str]:
        return self.queue.models(caller.tenant) if caller.tenant else []


class FineTunedResolver:
    """AdapterResolver for ft: names: the job's published version (pulled once into `pull_dir`,
    hash-checked, its terms accepted on the owner's behalf) or one of its stored checkpoints."""

    def __init__(self, queue, storage, registry, pull_dir: Path):
        self.queue, self.storage, self.registry, self.pull_dir = queue, storage, registry, pull_dir
        self.paths: dict[str, Path] = {}
        self.lock = threading.Lock()

    def names(self) -> list[str]:
        return []  # listed per tenant by ServiceAccess, never to everyone

    def resolve(self, name: str) -> Path | None:
        if not name.startswith("ft:"):
            return None
        with self.lock:
            hit = self.paths.get(name)
        if hit is not None:
            return hit
        model, step = split_model(name)
        if step is not None:
            found = self.queue.find_checkpoint_job(name)
            if found is None:
                return None
            path = self.storage.checkpoint_dir(found[0].id, step)
            if not (path / "adapter_model.safetensors").exists():
                return None
        else:
            job = self.queue.find_model(model)
            if job is None:
                return None
            from budwood.registry.names import RegistryError

            try:
                info = self.registry.version_info(job.registry_ref)
                _, path = self.registry.pull(info.ref, self.pull_dir / info.id / info.version, accept_license=True)
            except RegistryError as e:
                raise AdapterError(f"{name}: {e}") from None
        with self.lock:
            self.paths[name] = path
        return path
