"""The fine-tuning service's config and `Service`, what both its server and its workers open.

Read top to bottom: the config (YAML, every field documented) -> `Service`: the database (the
registry's, with the service's tables), the registry, the queue, the tenants and the storage folder.
The server app that serves it all (inference, registry, fine-tuning, dashboard) is assembled in
budwood.service_app; the workers are jobs/worker.py.
"""
from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from budwood.config import LoraConfig, load_settings
from budwood.db import budwood_home
from budwood.engine import EngineConfig
from budwood.serve.limits import ServeLimits


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Quotas(_Strict):
    storage_bytes: int = Field(10 << 30, ge=0, description="a tenant's uploaded files, in bytes, unless set per "
                                                           "tenant (budwood tenants create --max-storage-bytes)")
    concurrent_jobs: int = Field(4, ge=0, description="a tenant's jobs that have not finished, at a time")
    file_bytes: int = Field(512 << 20, ge=1, description="largest single upload (a /v1/files upload, or all the "
                                                          "parts of an Upload together)")
    upload_part_bytes: int = Field(64 << 20, ge=1, description="largest part of an Upload (OpenAI's: 64 MiB)")
    upload_parts: int = Field(1000, ge=1, description="most parts an Upload may have")
    pending_uploads: int = Field(16, ge=1, description="a tenant's Uploads pending (neither completed, cancelled "
                                                        "nor expired) at a time")


class ServiceTraining(_Strict):
    """What every job is trained with; the job gives n_epochs, batch_size, the learning rate multiplier and
    (DPO) beta."""
    lora: LoraConfig = Field(default_factory=LoraConfig)
    learning_rate: float = Field(2e-4, gt=0, description="LoRA learning rate at learning_rate_multiplier 1")
    dpo_learning_rate: float = Field(5e-5, gt=0, description="a DPO job's LoRA learning rate at multiplier 1: "
                                     "preference tuning moves the policy from its reference in smaller steps")
    validation_split: float = Field(0.1, ge=0, lt=0.5, description="share of the training file held out when a "
                                    "job has no validation file: its validation loss, and the held-out data its "
                                    "adapter is evaluated on (0: train on every example; the suites that need "
                                    "held-out data are then left out)")
    scheduler: str = "cosine"
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    max_seq_len: int = Field(2048, ge=8)
    min_examples: int = Field(10, ge=1, description="fewer valid training examples than this fail validation "
                                                    "(OpenAI asks for at least 10)")
    checkpoint_every: int | None = Field(None, ge=1, description="optimizer steps between checkpoints "
                                                                 "(default: one per epoch)")
    precision: str = Field("auto", pattern="^(auto|fp32|bf16)$")
    device: str = "auto"
    compile: bool | str = "auto"


class ServiceEvaluation(_Strict):
    """The quick suites every finished adapter is measured with before it is published."""
    suites: list[str] = Field(default_factory=lambda: ["domain", "grounding", "truthfulqa", "bias", "reproducibility",
                                                          "tools"],
                              description="measured on the tenant's own domain (jobs/evaluation.py): domain on "
                                          "the held-out examples, grounding on questions from them plus "
                                          "unanswerable ones built from the training data, reproducibility and "
                                          "bias's counterfactual probes on the same questions, tools on the "
                                          "held-out examples that offer tools; a suite without "
                                          "such data is left out, its reason in the job's events")
    limit: int | None = Field(100, ge=1, description="examples per suite (per category for bias)")
    compare_base: bool = Field(True, description="also measure the base, so the card shows what the job changed")
    settings: dict = Field(default_factory=dict, description="per-suite settings as in budwood eval's config, "
                                                             "e.g. {reproducibility: {prompts: 8}}; the data each "
                                                             "suite reads is the job's, not set here")

    @field_validator("settings")
    @classmethod
    def _no_data(cls, settings: dict) -> dict:
        from budwood.jobs.evaluation import DATA_SETTINGS

        for suite, key in DATA_SETTINGS.items():
            if isinstance(settings.get(suite), dict) and key in settings[suite]:
                raise ValueError(f"{suite}.{key}: a job's adapter is measured on its tenant's data, which each job "
                                 "sets; remove it")
        return settings


class ServiceConfig(_Strict):
    home: Path = Field(default_factory=lambda: budwood_home() / "service",
                       description="files/, checkpoints/, blobs/, keys/; every worker must reach it")
    database: str | None = Field(None, description="SQLAlchemy URL; default sqlite:///HOME/service.db. "
                                                   "postgresql://HOST/DB for workers on several machines")
    host: str = "127.0.0.1"
    port: int = 8000
    public_url: str | None = Field(None, description="how users reach the service (in cards); default http://HOST:PORT")
    serving: EngineConfig = Field(default_factory=EngineConfig,
                                  description="the inference engine; serving.base is the model jobs fine-tune")
    workers: int = Field(1, ge=0, description="worker processes `budwood service` starts on this machine")
    work_dir: Path | None = Field(None, description="workers' scratch space, best on a local disk (default: the "
                                                    "system's temporary folder)")
    lease_s: float = Field(30.0, gt=0, description="a worker that has not renewed its lease for this long has lost "
                                                   "its job to another worker")
    heartbeat_s: float = Field(2.0, gt=0, description="how often a worker renews its lease and reads cancel/pause")
    poll_s: float = Field(1.0, gt=0, description="how often an idle worker looks for work")
    max_attempts: int = Field(3, ge=1, description="workers a job may lose before it fails")
    metrics_token: str | None = Field(None, description="bearer token for /metrics (Prometheus' bearer_token); "
                                                        "without one /metrics is off, as its labels name "
                                                        "tenants' models")
    key_cache_s: float = Field(5.0, ge=0, description="how long a server trusts a checked API key: a revoked key "
                                                      "stops working within this time")
    quotas: Quotas = Field(default_factory=Quotas)
    limits: ServeLimits = Field(default_factory=ServeLimits, description="per-request bounds of the inference "
                                "routes, as `budwood serve --limit` sets them (docs/serving.md, Limits)")
    training: ServiceTraining = Field(default_factory=ServiceTraining)
    evaluation: ServiceEvaluation = Field(default_factory=ServiceEvaluation)
    adapter_license: str = Field("LicenseRef-tenant-private", description="licence of published job adapters")
    adapter_terms: str = Field("This adapter was trained on its tenant's private data by a budwood service. It "
                               "belongs to that tenant; no one else may use or redistribute it.",
                               description="terms published with them")

    @model_validator(mode="after")
    def _heartbeat_within_lease(self) -> ServiceConfig:
        if self.heartbeat_s * 3 > self.lease_s:
            raise ValueError(f"heartbeat_s ({self.heartbeat_s}) must be at most a third of lease_s ({self.lease_s}), "
                             "so that a slow heartbeat does not lose a live worker its job")
        return self

    @property
    def database_url(self) -> str:
        return self.database or f"sqlite:///{self.home.expanduser().resolve() / 'service.db'}"

    @property
    def url(self) -> str:
        return self.public_url or f"http://{self.host}:{self.port}"


def load_service_config(path: str | Path | None = None, overrides: list[str] | None = None) -> ServiceConfig:
    return load_settings(ServiceConfig, path, overrides)


class Service:
    """What the app and the workers share, opened from one config."""

    def __init__(self, config: ServiceConfig):
        from budwood.jobs.queue import JobQueue
        from budwood.jobs.storage import Storage
        from budwood.jobs.tenants import Tenants
        from budwood.registry.local import LocalRegistry

        self.config = config
        home = config.home.expanduser()
        home.mkdir(parents=True, exist_ok=True)
        self.registry = LocalRegistry(database=config.database_url, blobs=home / "blobs")
        self.engine = self.registry.engine
        self.queue = JobQueue(self.engine, config.quotas.storage_bytes, config.quotas.concurrent_jobs)
        self.tenants = Tenants(self.engine)
        self.storage = Storage(home)
        self.key_path = home / "keys" / "service.pem"

    def ensure_key(self) -> Path:
        """The service's signing key (every worker signs with it); made once, never replaced."""
        from budwood.card.attest import AttestationError, create_key

        if not self.key_path.exists():
            try:
                create_key("service", folder=self.key_path.parent)
            except AttestationError:
                pass  # another process made it first
        return self.key_path

    def close(self) -> None:
        self.registry.close()

