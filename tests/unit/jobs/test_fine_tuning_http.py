"""The fine-tuning routes in process (no engine, no worker): the queue's domain errors reach the client
with OpenAI's statuses, codes and params, and the responses keep OpenAI's fields."""
from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from tests.conftest import service_config

JOB_FIELDS = {"object", "id", "created_at", "error", "fine_tuned_model", "finished_at", "hyperparameters", "model",
              "organization_id", "result_files", "seed", "status", "trained_tokens", "training_file",
              "validation_file", "estimated_finish", "integrations", "metadata", "user_provided_suffix", "method"}
FILE_FIELDS = {"id", "object", "bytes", "created_at", "filename", "purpose", "status", "status_details", "expires_at"}
ROWS = [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(3)]


class Api:
    def __init__(self, client: TestClient, service, key: str):
        self.client, self.service, self.headers = client, service, {"Authorization": f"Bearer {key}"}

    def get(self, path: str, **kw):
        return self.client.get(path, headers=self.headers, **kw)

    def post(self, path: str, **kw):
        return self.client.post(path, headers={**self.headers, **kw.pop("headers", {})}, **kw)

    def upload(self, rows=ROWS, purpose="fine-tune", name="train.jsonl"):
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
        return self.post("/v1/files", files={"file": (name, data)}, data={"purpose": purpose})


@pytest.fixture
def api(tmp_path) -> Iterator[Api]:
    from budwood.jobs.service import Service
    from budwood.service_app import create_service_app

    service = Service(service_config(tmp_path / "home", quotas={"storage_bytes": 400, "file_bytes": 300,
                                                                "concurrent_jobs": 1}))
    try:
        service.tenants.create("acme")
        key = service.tenants.issue_key("acme").key
        yield Api(TestClient(create_service_app(service), raise_server_exceptions=False), service, key)
    finally:
        service.close()


def error_of(r, status: int) -> dict:
    assert r.status_code == status, r.text
    return r.json()["error"]


def test_files_answer_in_openais_shape_and_refusals_name_their_parameter(api):
    f = api.upload()
    assert f.status_code == 200 and set(f.json()) == FILE_FIELDS and f.json()["status"] == "processed"
    assert api.get(f"/v1/files/{f.json()['id']}").json() == f.json()
    listed = api.get("/v1/files").json()
    assert listed["object"] == "list" and listed["first_id"] == listed["last_id"] == f.json()["id"]
    missing = error_of(api.get("/v1/files/file-nothing"), 404)
    assert missing["code"] == "file_not_found" and missing["param"] == "file_id"
    assert "No such File object: file-nothing" in missing["message"]
    err = error_of(api.upload(purpose="batch"), 400)
    assert (err["code"], err["param"]) == ("invalid_value", "purpose")
    err = error_of(api.upload(rows=["{not json"]), 400)
    assert (err["code"], err["param"]) == ("invalid_file", "file") and "train.jsonl:1" in err["message"]
    err = error_of(api.upload(rows=ROWS * 20), 413)
    assert (err["code"], err["param"]) == ("file_too_large", "file")
    for _ in range(2):
        assert api.upload().status_code == 200  # 3 files of 108 bytes stored, of the 400 allowed
    err = error_of(api.upload(), 429)
    assert err["code"] == "storage_quota_exceeded" and err["type"] == "insufficient_quota"


def test_job_requests_are_refused_with_the_queues_codes(api):
    train = api.upload().json()["id"]
    body = {"model": "budwood-tiny", "training_file": train}
    job = api.post("/v1/fine_tuning/jobs", json=body, headers={"Idempotency-Key": "k"})
    assert job.status_code == 200 and set(job.json()) == JOB_FIELDS, job.text
    assert job.json()["status"] == "validating_files" and job.json()["hyperparameters"]["n_epochs"] == "auto"
    err = error_of(api.post("/v1/fine_tuning/jobs", json={**body, "seed": 3}, headers={"Idempotency-Key": "k"}), 409)
    assert err["code"] == "idempotency_key_reused"
    err = error_of(api.post("/v1/fine_tuning/jobs", json=body), 429)  # one job at a time for acme
    assert err["code"] == "concurrent_jobs_limit"
    err = error_of(api.post("/v1/fine_tuning/jobs", json={**body, "training_file": "file-nothing"}), 400)
    assert (err["code"], err["param"]) == ("invalid_training_file", "training_file")
    err = error_of(api.get("/v1/fine_tuning/jobs/ftjob-nothing"), 404)
    assert (err["code"], err["param"]) == ("job_not_found", "fine_tuning_job_id")
    job_id = job.json()["id"]
    assert api.post(f"/v1/fine_tuning/jobs/{job_id}/cancel").json()["status"] == "cancelled"
    err = error_of(api.post(f"/v1/fine_tuning/jobs/{job_id}/cancel"), 400)
    assert err["code"] == "job_not_cancellable" and "already cancelled" in err["message"]
    events = api.get(f"/v1/fine_tuning/jobs/{job_id}/events").json()
    assert [e["message"] for e in events["data"]][0] == "Job cancelled by user request"
    assert set(events["data"][0]) == {"object", "id", "created_at", "level", "message", "data", "type"}


def test_the_live_event_stream_ends_with_done_once_the_job_has_ended(api):
    train = api.upload().json()["id"]
    job_id = api.post("/v1/fine_tuning/jobs", json={"model": "budwood-tiny", "training_file": train}).json()["id"]
    api.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")
    with api.client.stream("GET", f"/v1/fine_tuning/jobs/{job_id}/events", params={"stream": "true"},
                           headers=api.headers) as r:
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    assert [json.loads(line)["message"] for line in lines[:-1]][-1] == "Job cancelled by user request"
    assert error_of(api.get("/v1/fine_tuning/jobs/ftjob-nothing/events", params={"stream": "true"}), 404)


def test_a_caller_without_a_tenant_is_refused(api):
    r = api.client.get("/v1/fine_tuning/jobs")
    assert error_of(r, 401)["code"] == "invalid_api_key"
