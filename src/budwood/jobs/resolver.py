"""Tenants' fine-tuned models as model names: `ft:<base>:<tenant>:<suffix>:<id>` (and its checkpoints,
`...:ckpt-step-N`) answer /v1/chat/completions the moment their job succeeds, with no restart, and
only for the tenant that owns them.
"""
from __future__ import annotations

import re
import threading
from pathlib import Path

from budwood.engine.adapters import AdapterError
from budwood.jobs.models import Job
from budwood.serve.auth import Caller, RegistryAccess

_CHECKPOINT = re.compile(r"^(ft:.+):ckpt-step-(\d{1,9})$")


def _split(model: str) -> tuple[str, int | None]:
    m = _CHECKPOINT.match(model)
    return (m[1], int(m[2])) if m else (model, None)


class ServiceAccess:
    """ModelAccess: a tenant uses its own ft: models, public registry adapters and its private ones."""

    def __init__(self, queue, registry):
        self.queue = queue
        self.registry_access = RegistryAccess(registry)

    def job_of(self, model: str) -> Job | None:
        return self.queue.find_model(_split(model)[0])

    def can_use(self, caller: Caller, model: str) -> bool:
        if model.startswith("ft:"):
            job = self.job_of(model)
            return job is not None and caller.tenant is not None and job.tenant == caller.tenant
        return self.registry_access.can_use(caller, model)

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
        model, step = _split(name)
        job = self.queue.find_model(model)
        if job is None:
            return None
        if step is not None:
            path = self.storage.checkpoint_dir(job.id, step)
            if not (path / "adapter_model.safetensors").exists():
                return None
        else:
            from budwood.registry.names import RegistryError

            try:
                info = self.registry.version_info(job.registry_ref)
                _, path = self.registry.pull(info.ref, self.pull_dir / info.id / info.version, accept_license=True)
            except RegistryError as e:
                raise AdapterError(f"{name}: {e}") from None
        with self.lock:
            self.paths[name] = path
        return path
