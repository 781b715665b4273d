"""The fine-tuning API's shapes, as OpenAI's API and its official clients have them.

Requests are pydantic models that refuse unknown fields (OpenAI answers 400 to an unrecognised
argument); responses are plain dicts built from the database rows, field for field as the `openai`
package's `FileObject`, `FineTuningJob`, `FineTuningJobEvent` and `FineTuningJobCheckpoint`.
"""
from __future__ import annotations

import math
import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from budwood.jobs.models import Checkpoint, Job, JobEvent, StoredFile

SUFFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,39}$")
STATUSES = ("validating_files", "queued", "running", "pausing", "paused", "succeeded", "failed", "cancelled")
ACTIVE = ("validating_files", "queued", "running", "pausing")  # count against a tenant's concurrent jobs
TERMINAL = ("succeeded", "failed", "cancelled")


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    batch_size: Literal["auto"] | Annotated[int, Field(ge=1, le=256)] = "auto"
    learning_rate_multiplier: Literal["auto"] | Annotated[float, Field(gt=0, le=100)] = "auto"
    n_epochs: Literal["auto"] | Annotated[int, Field(ge=1, le=50)] = "auto"


class Supervised(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: Supervised | None = None
    dpo: dict | None = None
    reinforcement: dict | None = None


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=300)
    training_file: str = Field(min_length=1, max_length=64)
    validation_file: str | None = Field(None, max_length=64)
    suffix: str | None = Field(None, description="up to 40 letters, digits, '.', '_' or '-', in the model name")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = None
    hyperparameters: Hyperparameters | None = Field(None, description="deprecated by OpenAI: use method")
    method: Method | None = None
    integrations: list[dict] | None = None

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, value: str | None) -> str | None:
        if value is not None and (not SUFFIX.match(value) or ".." in value):
            raise ValueError("expected 1-40 letters, digits, '.', '_' or '-', starting with a letter or digit "
                             "(no '..')")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value is None:
            return None
        if len(value) > 16:
            raise ValueError(f"at most 16 keys, got {len(value)}")
        for k, v in value.items():
            if not 0 < len(k) <= 64 or len(v) > 512:
                raise ValueError(f"key {k[:70]!r}: keys are 1-64 characters, values at most 512")
        return value

    def requested_hyperparameters(self) -> Hyperparameters:
        if self.method is not None and self.method.supervised is not None:
            return self.method.supervised.hyperparameters
        return self.hyperparameters or Hyperparameters()


def resolve_auto(hp: dict, examples: int) -> dict:
    """OpenAI's "auto" made concrete from the data's size (docs/service.md): batch size about 0.2% of
    the examples (1 to 256), enough epochs that small sets are seen about a thousand times in all
    (3 to 10), and the learning rate multiplier 1 (of the service's LoRA learning rate)."""
    out = dict(hp)
    if out.get("batch_size", "auto") == "auto":
        out["batch_size"] = max(1, min(256, round(examples * 0.002)))
    if out.get("n_epochs", "auto") == "auto":
        out["n_epochs"] = max(3, min(10, math.ceil(1000 / max(examples, 1))))
    if out.get("learning_rate_multiplier", "auto") == "auto":
        out["learning_rate_multiplier"] = 1.0
    return out


def _ts(value: float | None) -> int | None:
    return None if value is None else int(value)


def file_object(f: StoredFile) -> dict:
    return {"id": f.id, "object": "file", "bytes": f.bytes, "created_at": int(f.created_at), "filename": f.filename,
            "purpose": f.purpose, "status": f.status, "status_details": f.status_details, "expires_at": None}


def job_object(job: Job) -> dict:
    hp = {k: job.hyperparameters.get(k, "auto") for k in ("batch_size", "learning_rate_multiplier", "n_epochs")}
    return {"object": "fine_tuning.job", "id": job.id, "created_at": int(job.created_at), "error": job.error,
            "fine_tuned_model": job.fine_tuned_model, "finished_at": _ts(job.finished_at), "hyperparameters": hp,
            "model": job.model, "organization_id": job.tenant, "result_files": list(job.result_files or []),
            "seed": job.seed, "status": job.status, "trained_tokens": job.trained_tokens,
            "training_file": job.training_file, "validation_file": job.validation_file,
            "estimated_finish": _ts(job.estimated_finish) if job.status == "running" else None,
            "integrations": [], "metadata": job.meta, "user_provided_suffix": job.suffix,
            "method": {"type": "supervised", "supervised": {"hyperparameters": hp}}}


def event_object(e: JobEvent) -> dict:
    return {"object": "fine_tuning.job.event", "id": e.id, "created_at": int(e.created_at), "level": e.level,
            "message": e.message, "data": e.data, "type": e.type}


def checkpoint_object(c: Checkpoint, job: Job) -> dict:
    return {"object": "fine_tuning.job.checkpoint", "id": c.id, "created_at": int(c.created_at),
            "fine_tuned_model_checkpoint": checkpoint_model(job, c.step), "fine_tuning_job_id": job.id,
            "metrics": {"step": c.step, **c.metrics}, "step_number": c.step}


def fine_tuned_model(job: Job) -> str:
    """`ft:<base>:<tenant>:<suffix>:<id>`, as OpenAI names them (an empty suffix leaves `::`)."""
    return f"ft:{job.model}:{job.tenant}:{job.suffix or ''}:{job.id.removeprefix('ftjob-')[:8].lower()}"


def checkpoint_model(job: Job, step: int) -> str:
    return f"{fine_tuned_model(job)}:ckpt-step-{step}"


def registry_name(job: Job) -> str:
    """The job's adapter in the tenant's registry namespace: `<tenant>/<suffix>-<id>` (lower case)."""
    short = job.id.removeprefix("ftjob-")[:8].lower()
    return f"{job.tenant}/{(job.suffix.lower() + '-') if job.suffix else 'ft-'}{short}"


def page(items: list[dict], has_more: bool) -> dict:
    return {"object": "list", "data": items, "has_more": has_more,
            "first_id": items[0]["id"] if items else None, "last_id": items[-1]["id"] if items else None}
