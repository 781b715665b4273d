"""The fine-tuning API's shapes, as OpenAI's API and its official clients have them.

Requests are pydantic models that refuse unknown fields (OpenAI answers 400 to an unrecognised
argument); responses are pydantic models built from the database rows (`.of(row)`), field for field
as the `openai` package's `FileObject`, `FineTuningJob`, `FineTuningJobEvent` and
`FineTuningJobCheckpoint`, every field present (None where OpenAI has null).
"""
from __future__ import annotations

import math
import re
from typing import Annotated, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, field_validator

from budwood.jobs.models import Checkpoint, CheckpointPermission, Job, JobEvent, StoredFile, Upload, UploadPart
from budwood.jobs.states import JobStatus

SUFFIX = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # OpenAI allows 64 characters
WANDB_PROJECT_FORBIDDEN = "/\\#?%:"  # W&B refuses these in a project's name (and names over 128 characters)


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    batch_size: Literal["auto"] | Annotated[int, Field(ge=1, le=256)] = "auto"
    learning_rate_multiplier: Literal["auto"] | Annotated[float, Field(gt=0, le=100)] = "auto"
    n_epochs: Literal["auto"] | Annotated[int, Field(ge=1, le=50)] = "auto"


class DpoHyperparameters(Hyperparameters):
    """OpenAI's DPO hyperparameters: the supervised ones and beta (budwood's training.dpo.beta)."""

    beta: Literal["auto"] | Annotated[float, Field(gt=0)] = "auto"


class Supervised(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class Dpo(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: DpoHyperparameters = Field(default_factory=DpoHyperparameters)


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: Supervised | None = None
    dpo: Dpo | None = None
    reinforcement: dict | None = None


class WandbIntegration(BaseModel):
    """OpenAI's `integrations[].wandb`: the W&B run a job's training metrics go to. The bounds are W&B's own
    (a project of 1-128 characters without / \\ # ? % :, tags of 1-64 characters), so a job W&B would refuse
    is refused when it is created, not when a worker starts its run; the other bounds are budwood's."""

    model_config = ConfigDict(extra="forbid")
    project: str = Field(min_length=1, max_length=128)
    name: str | None = Field(None, min_length=1, max_length=128, description="the run's name (default: the job id)")
    entity: str | None = Field(None, min_length=1, max_length=128, description="the W&B team or user (default: "
                               "the key's)")
    tags: list[Annotated[str, Field(min_length=1, max_length=64)]] | None = Field(None, max_length=50)

    @field_validator("project")
    @classmethod
    def _project(cls, value: str) -> str:
        found = sorted({c for c in value if c in WANDB_PROJECT_FORBIDDEN})
        if found:
            raise ValueError(f"a W&B project's name cannot contain {' '.join(found)}")
        return value


class Integration(BaseModel):
    """OpenAI's one kind of integration: Weights & Biases."""

    model_config = ConfigDict(extra="forbid")
    type: str
    wandb: WandbIntegration

    @field_validator("type")
    @classmethod
    def _type(cls, value: str) -> str:
        if value != "wandb":
            raise ValueError("the only integration is 'wandb' (Weights & Biases), as in OpenAI's API")
        return value


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str = Field(min_length=1, max_length=300)
    training_file: str = Field(min_length=1, max_length=64)
    validation_file: str | None = Field(None, max_length=64)
    suffix: str | None = Field(None, description="up to 64 letters, digits, '.', '_' or '-', in the model name")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = None
    hyperparameters: Hyperparameters | None = Field(None, description="deprecated by OpenAI: use method")
    method: Method | None = None
    integrations: list[Integration] | None = None

    @field_validator("integrations")
    @classmethod
    def _integrations(cls, value: list[Integration] | None) -> list[Integration] | None:
        if value is not None and len(value) > 1:
            raise ValueError(f"one W&B integration per job (its metrics go to one run), got {len(value)}")
        return value

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, value: str | None) -> str | None:
        if value is not None and (not SUFFIX.match(value) or ".." in value):
            raise ValueError("expected 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit "
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

    @property
    def method_type(self) -> str:
        return self.method.type if self.method is not None else "supervised"

    def requested_hyperparameters(self) -> Hyperparameters:
        """The method's hyperparameters as asked: under method.dpo or method.supervised, else the deprecated
        top-level ones (supervised only, as OpenAI has them)."""
        if self.method_type == "dpo":
            return self.method.dpo.hyperparameters if self.method.dpo is not None else DpoHyperparameters()
        if self.method is not None and self.method.supervised is not None:
            return self.method.supervised.hyperparameters
        return self.hyperparameters or Hyperparameters()


def method_of(job: Job) -> str:
    """"supervised" or "dpo". The method is kept in the job's hyperparameters column (rows from before
    DPO have none: supervised), so it travels with the values that training reads."""
    return job.hyperparameters.get("method", "supervised")


def resolve_auto(hp: dict, examples: int) -> dict:
    """OpenAI's "auto" made concrete from the data's size (docs/service.md): batch size about 0.2% of
    the examples (1 to 256), enough epochs that small sets are seen about a thousand times in all
    (3 to 10), and the learning rate multiplier 1 (of the service's LoRA learning rate for the method);
    for DPO, beta as budwood train's default (TRL's, 0.1). `examples` are pairs for DPO."""
    from budwood.config import DPOConfig

    out = dict(hp)
    if out.get("method") == "dpo" and out.get("beta", "auto") == "auto":
        out["beta"] = DPOConfig().beta
    if out.get("batch_size", "auto") == "auto":
        out["batch_size"] = max(1, min(256, round(examples * 0.002)))
    if out.get("n_epochs", "auto") == "auto":
        out["n_epochs"] = max(3, min(10, math.ceil(1000 / max(examples, 1))))
    if out.get("learning_rate_multiplier", "auto") == "auto":
        out["learning_rate_multiplier"] = 1.0
    return out


def _ts(value: float | None) -> int | None:
    return None if value is None else int(value)


# -- responses ------------------------------------------------------------------------------------------------
class FileObject(BaseModel):
    id: str
    object: Literal["file"] = "file"
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str
    status_details: str | None = None
    expires_at: int | None = None

    @classmethod
    def of(cls, f: StoredFile) -> FileObject:
        return cls(id=f.id, bytes=f.bytes, created_at=int(f.created_at), filename=f.filename, purpose=f.purpose,
                   status=f.status, status_details=f.status_details, expires_at=_ts(f.expires_at))


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"] = "file"
    deleted: bool = True


class JobHyperparameters(BaseModel):
    """As asked ("auto") until the files are validated, then the values training uses."""

    batch_size: Literal["auto"] | int = "auto"
    learning_rate_multiplier: Literal["auto"] | float = "auto"
    n_epochs: Literal["auto"] | int = "auto"


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class JobDpoHyperparameters(JobHyperparameters):
    beta: Literal["auto"] | float = "auto"


class JobSupervised(BaseModel):
    hyperparameters: JobHyperparameters


class JobDpo(BaseModel):
    hyperparameters: JobDpoHyperparameters


class JobMethod(BaseModel):
    """The method with its hyperparameters, as asked until the files are validated, then resolved; only the
    member of the job's type is set, as OpenAI answers."""

    type: Literal["supervised", "dpo"] = "supervised"
    supervised: JobSupervised | None = None
    dpo: JobDpo | None = None

    @classmethod
    def of(cls, job: Job) -> JobMethod:
        if method_of(job) == "dpo":
            fields = JobDpoHyperparameters.model_fields
            return cls(type="dpo", dpo=JobDpo(hyperparameters=JobDpoHyperparameters(
                **{k: job.hyperparameters.get(k, "auto") for k in fields})))
        return cls(supervised=JobSupervised(hyperparameters=_hyperparameters(job)))


def _hyperparameters(job: Job) -> JobHyperparameters:
    return JobHyperparameters(**{k: job.hyperparameters.get(k, "auto") for k in JobHyperparameters.model_fields})


class FineTuningJob(BaseModel):
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    id: str
    created_at: int
    error: JobError | None
    fine_tuned_model: str | None
    finished_at: int | None
    hyperparameters: JobHyperparameters
    model: str
    organization_id: str
    result_files: list[str]
    seed: int
    status: JobStatus
    trained_tokens: int | None
    training_file: str
    validation_file: str | None
    estimated_finish: int | None
    trained_assistant_tokens: int | None = Field(None, description="budwood's: the tokens the loss was taken on "
                                                 "(assistant tokens x epochs); trained_tokens is every token x epochs")
    integrations: list[dict] = Field(default_factory=list, description="as asked: OpenAI's type and wandb "
                                     "settings (null fields included, as OpenAI answers)")
    metadata: dict[str, str] | None
    user_provided_suffix: str | None
    method: JobMethod

    @classmethod
    def of(cls, job: Job) -> FineTuningJob:
        hp = _hyperparameters(job)  # OpenAI's deprecated top-level field: the values every method shares
        return cls(id=job.id, created_at=int(job.created_at), error=job.error, fine_tuned_model=job.fine_tuned_model,
                   finished_at=_ts(job.finished_at), hyperparameters=hp, model=job.model, organization_id=job.tenant,
                   result_files=list(job.result_files or []), seed=job.seed, status=job.status,
                   trained_tokens=job.trained_tokens, trained_assistant_tokens=job.trained_assistant_tokens,
                   training_file=job.training_file,
                   validation_file=job.validation_file,
                   estimated_finish=_ts(job.estimated_finish) if job.status == JobStatus.RUNNING else None,
                   integrations=list(job.integrations or []), metadata=job.meta, user_provided_suffix=job.suffix,
                   method=JobMethod.of(job))


class FineTuningJobEvent(BaseModel):
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    id: str
    created_at: int
    level: str
    message: str
    data: dict | None
    type: str

    @classmethod
    def of(cls, e: JobEvent) -> FineTuningJobEvent:
        return cls(id=e.id, created_at=int(e.created_at), level=e.level, message=e.message, data=e.data, type=e.type)


class FineTuningJobCheckpoint(BaseModel):
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    id: str
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: dict  # step, train_loss, valid_loss, full_valid_loss (and mean_token_accuracy where trained with it)
    step_number: int

    @classmethod
    def of(cls, c: Checkpoint, job: Job) -> FineTuningJobCheckpoint:
        return cls(id=c.id, created_at=int(c.created_at), fine_tuned_model_checkpoint=checkpoint_model(job, c.step),
                   fine_tuning_job_id=job.id, metrics={"step": c.step, **c.metrics}, step_number=c.step)


class ExpiresAfter(BaseModel):
    """OpenAI's expiration policy of a file (or an upload): `seconds` after its creation, 1 hour to 30 days."""

    model_config = ConfigDict(extra="forbid")
    anchor: Literal["created_at"]
    seconds: int = Field(ge=3600, le=2_592_000)


class ModelDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool = True


class PermissionCreate(BaseModel):
    """project_ids: the tenants (OpenAI's projects) that may use the checkpoint's model."""

    model_config = ConfigDict(extra="forbid")
    project_ids: list[str] = Field(min_length=1, max_length=100)


class CheckpointPermissionObject(BaseModel):
    id: str
    object: Literal["checkpoint.permission"] = "checkpoint.permission"
    created_at: int
    project_id: str

    @classmethod
    def of(cls, p: CheckpointPermission) -> CheckpointPermissionObject:
        return cls(id=p.id, created_at=int(p.created_at), project_id=p.project_id)


class CheckpointPermissionDeleted(BaseModel):
    id: str
    object: Literal["checkpoint.permission"] = "checkpoint.permission"
    deleted: bool = True


class UploadCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bytes: int = Field(ge=1)
    filename: str = Field(min_length=1, max_length=255)
    mime_type: str = Field(min_length=1, max_length=255)
    purpose: str
    expires_after: ExpiresAfter | None = None


class UploadComplete(BaseModel):
    model_config = ConfigDict(extra="forbid")
    part_ids: list[str] = Field(max_length=100_000)
    md5: str | None = Field(None, max_length=64)


class UploadObject(BaseModel):
    id: str
    object: Literal["upload"] = "upload"
    bytes: int
    created_at: int
    expires_at: int
    filename: str
    purpose: str
    status: Literal["pending", "completed", "cancelled", "expired"]
    file: FileObject | None = None

    @classmethod
    def of(cls, u: Upload, file: StoredFile | None = None, now: float | None = None) -> UploadObject:
        status = "expired" if u.status == "pending" and now is not None and now >= u.expires_at else u.status
        return cls(id=u.id, bytes=u.bytes, created_at=int(u.created_at), expires_at=int(u.expires_at),
                   filename=u.filename, purpose=u.purpose, status=status,
                   file=FileObject.of(file) if file is not None else None)


class UploadPartObject(BaseModel):
    id: str
    object: Literal["upload.part"] = "upload.part"
    created_at: int
    upload_id: str

    @classmethod
    def of(cls, p: UploadPart) -> UploadPartObject:
        return cls(id=p.id, created_at=int(p.created_at), upload_id=p.upload_id)


Item = TypeVar("Item", FileObject, FineTuningJob, FineTuningJobEvent, FineTuningJobCheckpoint,
               CheckpointPermissionObject)


class Page(BaseModel, Generic[Item]):
    """OpenAI's list object: one page, and whether there is another (ask again with after=last_id)."""

    object: Literal["list"] = "list"
    data: list[Item]
    has_more: bool
    first_id: str | None
    last_id: str | None

    @classmethod
    def of(cls, items: list[Item], has_more: bool) -> Page[Item]:
        return cls(data=items, has_more=has_more, first_id=items[0].id if items else None,
                   last_id=items[-1].id if items else None)


# -- names ------------------------------------------------------------------------------------------------------
def fine_tuned_model(job: Job) -> str:
    """`ft:<base>:<tenant>:<suffix>:<id>`, as OpenAI names them (an empty suffix leaves `::`)."""
    return f"ft:{job.model}:{job.tenant}:{job.suffix or ''}:{job.id.removeprefix('ftjob-')[:8].lower()}"


def checkpoint_model(job: Job, step: int) -> str:
    return f"{fine_tuned_model(job)}:ckpt-step-{step}"


def registry_name(job: Job) -> str:
    """The job's adapter in the tenant's registry namespace: `<tenant>/<suffix>-<id>` (lower case)."""
    short = job.id.removeprefix("ftjob-")[:8].lower()  # a registry name has at most 64 characters: 55 + '-' + 8
    return f"{job.tenant}/{(job.suffix.lower()[:55] + '-') if job.suffix else 'ft-'}{short}"


CHECKPOINT_MODEL = re.compile(r"^(ft:.+):ckpt-step-(\d{1,9})$")


def split_model(model: str) -> tuple[str, int | None]:
    """`ft:...:ckpt-step-N` -> (`ft:...`, N); a job's own model name -> (name, None)."""
    m = CHECKPOINT_MODEL.match(model)
    return (m[1], int(m[2])) if m else (model, None)


def parse_model(model: str) -> tuple[str, str, str | None, str] | None:
    """`ft:<base>:<tenant>:<suffix>:<short id>` -> (base, tenant, suffix, short id); the base may hold ':'
    (neither a tenant nor a suffix can), so the name is split from the right."""
    if not model.startswith("ft:") or model.count(":") < 4:
        return None
    base, tenant, suffix, short = model[3:].rsplit(":", 3)
    return base, tenant, suffix or None, short
