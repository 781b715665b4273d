"""OpenAI's `integrations` (Weights & Biases) on a job: checked when the job is created, each refusal naming
its field; kept with the job on SQLite and PostgreSQL and answered as OpenAI answers it; and, on a worker,
either the recipe's wandb tracker settings or the reason this worker cannot log to W&B."""
from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import nullcontext

import openai
import pytest
from fastapi.testclient import TestClient

from budwood.jobs.integrations import end_open_run, wandb_run, wandb_unavailable
from budwood.jobs.models import Job
from tests.conftest import pg_schema, service_config

WANDB = {"type": "wandb", "wandb": {"project": "support", "name": "first-try", "entity": "acme-team",
                                    "tags": ["support", "v1"]}}
NO_KEY = ("this worker has no W&B API key (the service's operator sets WANDB_API_KEY or runs `wandb login` for "
          "its workers)")


@pytest.fixture
def acme(request, tmp_path) -> Iterator[tuple[openai.OpenAI, str]]:
    """The openai client of tenant acme against the service's app in process (no worker: jobs stay
    validating_files), with one uploaded training file; on SQLite unless a test names the backend."""
    from budwood.jobs.service import Service
    from budwood.service_app import create_service_app

    with nullcontext(None) if getattr(request, "param", "sqlite") == "sqlite" else pg_schema() as url:
        service = Service(service_config(tmp_path / "home", url))
        try:
            service.tenants.create("acme", max_concurrent_jobs=20)
            client = openai.OpenAI(base_url="http://testserver/v1", api_key=service.tenants.issue_key("acme").key,
                                   http_client=TestClient(create_service_app(service)), max_retries=0)
            train = client.files.create(file=("t.jsonl", b'{"prompt": "q", "completion": "a"}\n' * 10),
                                        purpose="fine-tune")
            yield client, train.id
        finally:
            service.close()


@pytest.mark.parametrize("acme", ["sqlite", "postgresql"], indirect=True)
def test_a_wandb_integration_is_kept_with_the_job_and_answered_as_openai_does(acme):
    client, train = acme
    job = client.fine_tuning.jobs.create(model="budwood-tiny", training_file=train, integrations=[WANDB])
    assert [i.model_dump() for i in job.integrations] == [WANDB]
    assert client.fine_tuning.jobs.retrieve(job.id).integrations == job.integrations
    assert next(j for j in client.fine_tuning.jobs.list() if j.id == job.id).integrations == job.integrations
    bare = client.fine_tuning.jobs.create(model="budwood-tiny", training_file=train,
                                          integrations=[{"type": "wandb", "wandb": {"project": "p"}}])
    assert bare.integrations[0].model_dump() == {"type": "wandb", "wandb": {"project": "p", "name": None,
                                                                           "entity": None, "tags": None}}
    assert client.fine_tuning.jobs.create(model="budwood-tiny", training_file=train).integrations == []


@pytest.mark.parametrize(("integrations", "param", "text"), [
    ([{"type": "slack", "wandb": {"project": "p"}}], "integrations.0.type", "the only integration is 'wandb'"),
    ([{"type": "wandb"}], "integrations.0.wandb", "Field required"),
    ([{"type": "wandb", "wandb": {}}], "integrations.0.wandb.project", "Field required"),
    ([{"type": "wandb", "wandb": {"project": ""}}], "integrations.0.wandb.project", "at least 1 character"),
    ([{"type": "wandb", "wandb": {"project": "a/b"}}], "integrations.0.wandb.project", "cannot contain /"),
    ([{"type": "wandb", "wandb": {"project": "p" * 129}}], "integrations.0.wandb.project", "at most 128"),
    ([{"type": "wandb", "wandb": {"project": "p", "tags": ["t" * 65]}}], "integrations.0.wandb.tags.0",
     "at most 64"),
    ([{"type": "wandb", "wandb": {"project": "p", "tags": [str(i) for i in range(51)]}}],
     "integrations.0.wandb.tags", "at most 50"),
    ([{"type": "wandb", "wandb": {"project": "p", "entity": ""}}], "integrations.0.wandb.entity",
     "at least 1 character"),
    ([{"type": "wandb", "wandb": {"project": "p", "team": "x"}}], "integrations.0.wandb.team", "Extra inputs"),
    ([WANDB, WANDB], "integrations", "one W&B integration per job"),
])
def test_bad_integrations_are_refused_naming_the_field(acme, integrations, param, text):
    client, train = acme
    with pytest.raises(openai.BadRequestError) as e:
        client.fine_tuning.jobs.create(model="budwood-tiny", training_file=train, integrations=integrations)
    assert e.value.body["param"] == param and text in e.value.body["message"], e.value.body
    assert list(client.fine_tuning.jobs.list()) == []


def job_with(integrations: list | None) -> Job:
    return Job(id="ftjob-abc", tenant="acme", model="budwood-tiny", integrations=integrations, created_at=time.time())


@pytest.fixture
def no_wandb_credentials(tmp_path, monkeypatch):
    """A worker's environment without any W&B key: an empty netrc, no key variables, no mode."""
    (tmp_path / "netrc").write_text("")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "WANDB_MODE"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path / "netrc"


def test_a_worker_needs_wandb_and_a_key_or_offline_mode(no_wandb_credentials, monkeypatch):
    assert wandb_unavailable() == NO_KEY
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert wandb_unavailable() is None
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_unavailable() == "W&B is turned off on this worker (WANDB_MODE=disabled)"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert wandb_unavailable() is None
    monkeypatch.delenv("WANDB_API_KEY")
    no_wandb_credentials.write_text("machine api.wandb.ai\n  login user\n  password " + "k" * 40 + "\n")
    assert wandb_unavailable() is None  # where `wandb login` keeps the key
    monkeypatch.setenv("WANDB_BASE_URL", "https://wandb.example.com")
    assert wandb_unavailable() == NO_KEY  # that key is for another W&B server
    monkeypatch.setitem(sys.modules, "wandb", None)
    assert wandb_unavailable() == ("the wandb package is not installed on this worker (the service's operator "
                                   "installs budwood[trackers])")


def test_a_jobs_integration_becomes_the_recipes_wandb_settings(no_wandb_credentials, monkeypatch):
    assert wandb_run(job_with(None)) is None and wandb_run(job_with([])) is None
    monkeypatch.setenv("WANDB_MODE", "offline")
    run = wandb_run(job_with([WANDB]))
    assert run.logging == {"report_to": ["wandb"], "wandb_project": "support", "run_name": "first-try",
                           "wandb_entity": "acme-team", "wandb_tags": ["support", "v1"]}
    assert run.message == ("Logging metrics to Weights & Biases: project support, run first-try (offline: kept on "
                           "the worker until the service's operator syncs it)")
    unnamed = wandb_run(job_with([{"type": "wandb", "wandb": {"project": "p", "name": None, "tags": None}}]))
    assert unnamed.logging["run_name"] == "ftjob-abc" and unnamed.logging["wandb_tags"] == []  # OpenAI's default
    monkeypatch.delenv("WANDB_MODE")
    refused = wandb_run(job_with([WANDB]))
    assert refused.logging is None and refused.message == (f"Metrics not logged to Weights & Biases: {NO_KEY}; the "
                                                           "job trains without it")
    assert refused.data == {"wandb": {"project": "support", "run": "first-try", "logged": False}}


def test_a_run_left_open_by_a_failed_training_is_ended_before_the_next_job(no_wandb_credentials, tmp_path,
                                                                           monkeypatch):
    import wandb

    for name in ("DIR", "CONFIG_DIR", "CACHE_DIR", "DATA_DIR"):
        monkeypatch.setenv(f"WANDB_{name}", str(tmp_path))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    try:
        left_open = wandb.init(project="tenant-a", name="job-a")
        assert wandb.init(project="tenant-b", name="job-b") is left_open  # what wandb does with an open run
        end_open_run()
        assert wandb.run is None
        nxt = wandb.init(project="tenant-b", name="job-b")
        assert nxt is not left_open and nxt.project == "tenant-b"
        nxt.finish()
        end_open_run()  # nothing open: nothing to do
    finally:
        wandb.teardown()
