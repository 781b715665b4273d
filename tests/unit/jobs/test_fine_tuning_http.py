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
              "validation_file", "estimated_finish", "integrations", "metadata", "user_provided_suffix", "method",
              "trained_assistant_tokens"}  # budwood's: trained_tokens is OpenAI's count (every token x epochs)
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


# -- the rest of OpenAI's fine-tuning surface --------------------------------------------------------------------
TRAIN = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
         for i in range(12)]


@pytest.fixture
def roomy(tmp_path) -> Iterator[Api]:
    """The app with room for several files and jobs, small Upload parts, and a second tenant `other`."""
    from budwood.jobs.service import Service
    from budwood.service_app import create_service_app

    service = Service(service_config(tmp_path / "home", quotas={"storage_bytes": 1 << 20, "file_bytes": 20_000,
                                                                "concurrent_jobs": 10, "upload_part_bytes": 1000,
                                                                "upload_parts": 20}))
    try:
        for tenant in ("acme", "other"):
            service.tenants.create(tenant)
        api = Api(TestClient(create_service_app(service), raise_server_exceptions=False), service,
                  service.tenants.issue_key("acme").key)
        api.other = service.tenants.issue_key("other").key
        yield api
    finally:
        service.close()


def openai_client(api: Api, key: str | None = None):
    """The official client over the app in process (TestClient is an httpx.Client)."""
    from openai import OpenAI

    return OpenAI(base_url="http://testserver/v1", api_key=key or api.headers["Authorization"][7:], max_retries=0,
                  http_client=api.client)


def finished_job(api: Api, status: str, steps=(5, 10), suffix: str = "sfx") -> tuple:
    """A job of acme's driven through the queue to `status` (succeeded or cancelled) with checkpoints at `steps`,
    each with an adapter file on disk as a worker leaves it. Returns (job row, its model name)."""
    from budwood.jobs.protocol import checkpoint_model, fine_tuned_model

    q, storage = api.service.queue, api.service.storage
    train = api.upload(TRAIN).json()["id"]
    job_id = api.post("/v1/fine_tuning/jobs", json={"model": "budwood-tiny", "training_file": train,
                                                    "suffix": suffix}).json()["id"]
    _, lease = q.claim("w1", lease_s=60, max_attempts=3)
    q.set_hyperparameters(lease, {"n_epochs": 1, "batch_size": 1, "learning_rate_multiplier": 1.0}, 12)
    q.start(lease, None)
    for step in steps:
        q.add_checkpoint(lease, step, {"train_loss": 1.0}, final=False)
        folder = storage.checkpoint_dir(job_id, step)
        folder.mkdir(parents=True)
        (folder / "adapter_model.safetensors").write_bytes(b"x")
    job = q.get_job("acme", job_id)
    if status == "cancelled":
        q.cancel("acme", job_id)
    else:
        q.finish(lease, "succeeded", "done", fine_tuned_model=fine_tuned_model(job))
    job = q.get_job("acme", job_id)
    return job, fine_tuned_model(job), [checkpoint_model(job, s) for s in steps]


def test_a_suffix_of_64_characters_is_accepted_as_openai_does(roomy):
    from budwood.jobs.protocol import registry_name
    from budwood.registry.names import parse_ref

    train = roomy.upload(TRAIN).json()["id"]
    body = {"model": "budwood-tiny", "training_file": train}
    job = roomy.post("/v1/fine_tuning/jobs", json={**body, "suffix": "s" * 64})
    assert job.status_code == 200, job.text
    assert job.json()["user_provided_suffix"] == "s" * 64
    parse_ref(registry_name(roomy.service.queue.get_job("acme", job.json()["id"])) + "@1.0.0")  # a valid name
    err = error_of(roomy.post("/v1/fine_tuning/jobs", json={**body, "suffix": "s" * 65}), 400)
    assert err["param"] == "suffix"


def test_files_expire_after_their_expires_after_and_are_gone_then(roomy):
    from sqlalchemy import text

    data = "".join(json.dumps(r) + "\n" for r in TRAIN).encode()
    client = openai_client(roomy)
    f = client.files.create(file=("train.jsonl", data), purpose="fine-tune",
                            expires_after={"anchor": "created_at", "seconds": 3600})
    assert f.expires_at == f.created_at + 3600
    keep = roomy.upload(TRAIN).json()
    assert keep["expires_at"] is None
    err = error_of(roomy.post("/v1/files", files={"file": ("t.jsonl", data)},
                              data={"purpose": "fine-tune", "expires_after[anchor]": "created_at",
                                    "expires_after[seconds]": "60"}), 400)
    assert err["param"] == "expires_after"
    with roomy.service.engine.begin() as c:  # an hour later
        c.execute(text("UPDATE ft_files SET expires_at = created_at - 1 WHERE id = :id"), {"id": f.id})
    assert error_of(roomy.get(f"/v1/files/{f.id}"), 404)["code"] == "file_not_found"
    err = error_of(roomy.post("/v1/fine_tuning/jobs", json={"model": "budwood-tiny", "training_file": f.id}), 400)
    assert err["code"] == "invalid_training_file"
    assert [x["id"] for x in roomy.get("/v1/files").json()["data"]] == [keep["id"]]
    assert not roomy.service.storage.file_path("acme", f.id).exists()  # purged, bytes and all


def test_jobs_are_listed_by_metadata_or_by_having_none(roomy):
    train = roomy.upload(TRAIN).json()["id"]
    body = {"model": "budwood-tiny", "training_file": train}
    tagged = roomy.post("/v1/fine_tuning/jobs", json={**body, "metadata": {"team": "a"}}).json()["id"]
    other = roomy.post("/v1/fine_tuning/jobs", json={**body, "metadata": {"team": "b"}}).json()["id"]
    bare = roomy.post("/v1/fine_tuning/jobs", json=body).json()["id"]
    client = openai_client(roomy)
    assert [j.id for j in client.fine_tuning.jobs.list(metadata={"team": "a"})] == [tagged]
    assert [j["id"] for j in roomy.get("/v1/fine_tuning/jobs?metadata=null").json()["data"]] == [bare]
    assert {j["id"] for j in roomy.get("/v1/fine_tuning/jobs").json()["data"]} == {tagged, other, bare}
    err = error_of(roomy.get("/v1/fine_tuning/jobs?metadata=null&metadata[team]=a"), 400)
    assert err["param"] == "metadata"


def test_trained_tokens_count_every_token_of_every_epoch_as_openai_bills():
    from budwood.jobs.worker import billed_tokens

    provenance = {"tokens_seen": 715 * 3, "trained_tokens": 179 * 3}  # 3 epochs of 715 tokens, 179 answered
    assert billed_tokens(provenance, "supervised") == {"trained_tokens": 2145, "trained_assistant_tokens": 537}
    assert billed_tokens(provenance, "dpo")["trained_assistant_tokens"] is None  # DPO's unit is a pair


def test_validation_loss_events_carry_the_training_loss():
    from budwood.jobs.heartbeat import JobProgress

    class Beat:
        def __init__(self):
            import threading

            self.events, self.lock, self.progress, self.estimated_finish = [], threading.Lock(), None, None

        def emit(self, message, level="info", type_="message", data=None):
            self.events.append((message, data))

    beat = Beat()
    progress = JobProgress(beat)
    progress.start(10, 0)
    progress.update({"step": 5, "loss": 2.5, "lr": 1e-3, "tokens_per_s": 10.0})
    progress.update({"step": 5, "val_loss": 2.0})
    assert beat.events[-1][1] == {"step": 5, "train_loss": 2.5, "valid_loss": 2.0, "total_steps": 10}
    progress.update({"step": 6, "loss": 2.4, "mean_token_accuracy": 0.5})  # where the recipe measures it
    assert beat.events[-1][1]["mean_token_accuracy"] == 0.5


def test_a_tenant_deletes_its_fine_tuned_model_and_it_is_served_no_more(roomy):
    from openai import NotFoundError

    from budwood.jobs.resolver import ServiceAccess
    from budwood.serve.auth import Caller

    job, model, checkpoints = finished_job(roomy, "succeeded")
    access = ServiceAccess(roomy.service.queue, roomy.service.registry)
    acme = Caller.of_tenant("acme")
    assert access.can_use(acme, model) and model in access.listed(acme)
    with pytest.raises(NotFoundError):
        openai_client(roomy, roomy.other).models.delete(model)  # another tenant's model does not exist for it
    deleted = openai_client(roomy).models.delete(model)
    assert (deleted.id, deleted.deleted) == (model, True)
    assert not access.can_use(acme, model) and model not in access.listed(acme)
    with pytest.raises(NotFoundError):
        openai_client(roomy).models.delete(model)
    assert access.can_use(acme, checkpoints[0])  # its checkpoints stay with the job
    assert error_of(roomy.client.delete(f"/v1/models/{checkpoints[0]}", headers=roomy.headers), 400)["param"] == "model"


def test_checkpoint_permissions_let_another_tenant_use_a_checkpoint(roomy):
    from openai import NotFoundError

    from budwood.jobs.resolver import ServiceAccess
    from budwood.serve.auth import Caller

    _, _, (ckpt, later) = finished_job(roomy, "succeeded")
    access, other = ServiceAccess(roomy.service.queue, roomy.service.registry), Caller.of_tenant("other")
    assert not access.can_use(other, ckpt)
    perms = openai_client(roomy).fine_tuning.checkpoints.permissions
    created = list(perms.create(ckpt, project_ids=["other"]))
    assert [(p.object, p.project_id) for p in created] == [("checkpoint.permission", "other")]
    assert [p.id for p in perms.create(ckpt, project_ids=["other"])] == [created[0].id]  # granted once
    assert [p.id for p in perms.list(ckpt)] == [created[0].id]
    assert access.can_use(other, ckpt) and not access.can_use(other, later)  # that checkpoint only
    with pytest.raises(NotFoundError):  # only the owner manages a checkpoint's permissions
        list(openai_client(roomy, roomy.other).fine_tuning.checkpoints.permissions.list(ckpt))
    err = error_of(roomy.post(f"/v1/fine_tuning/checkpoints/{ckpt}/permissions", json={"project_ids": ["../x"]}), 400)
    assert err["param"] == "project_ids"
    gone = perms.delete(created[0].id, fine_tuned_model_checkpoint=ckpt)
    assert (gone.id, gone.deleted) == (created[0].id, True)
    assert not access.can_use(other, ckpt)


def test_checkpoint_models_of_a_cancelled_job_are_served(roomy, tmp_path):
    from budwood.jobs.resolver import FineTunedResolver, ServiceAccess
    from budwood.serve.auth import Caller

    job, model, (ckpt, _) = finished_job(roomy, "cancelled")
    assert job.status == "cancelled"
    access = ServiceAccess(roomy.service.queue, roomy.service.registry)
    assert access.can_use(Caller.of_tenant("acme"), ckpt) and not access.can_use(Caller.of_tenant("other"), ckpt)
    assert not access.can_use(Caller.of_tenant("acme"), model)  # a cancelled job has no model of its own
    resolver = FineTunedResolver(roomy.service.queue, roomy.service.storage, roomy.service.registry, tmp_path)
    assert resolver.resolve(ckpt) == roomy.service.storage.checkpoint_dir(job.id, 5)


def test_a_file_sent_in_parts_through_the_uploads_api_becomes_a_validated_file(roomy):
    data = "".join(json.dumps(r) + "\n" for r in TRAIN).encode()
    assert 1000 < len(data) < 20_000  # in 4 parts of at most 300 bytes
    client = openai_client(roomy)
    upload = client.uploads.upload_file_chunked(file=data, filename="train.jsonl", bytes=len(data),
                                                mime_type="application/jsonl", purpose="fine-tune", part_size=300)
    assert upload.status == "completed" and upload.file.purpose == "fine-tune" and upload.file.bytes == len(data)
    assert roomy.get(f"/v1/files/{upload.file.id}/content").content == data
    job = client.fine_tuning.jobs.create(model="budwood-tiny", training_file=upload.file.id)
    assert job.status == "validating_files"

    def start(size=len(data)):
        return client.uploads.create(bytes=size, filename="t.jsonl", mime_type="application/jsonl",
                                     purpose="fine-tune")

    big = roomy.post(f"/v1/uploads/{start().id}/parts", files={"data": ("blob", b"x" * 1001)})
    assert error_of(big, 413)["code"] == "part_too_large"
    bad = start(len(b"{not json\n"))
    part = client.uploads.parts.create(bad.id, data=b"{not json\n")
    err = error_of(roomy.post(f"/v1/uploads/{bad.id}/complete", json={"part_ids": [part.id]}), 400)
    assert err["code"] == "invalid_file"  # validated as /v1/files validates
    err = error_of(roomy.post(f"/v1/uploads/{bad.id}/complete", json={"part_ids": [part.id, part.id]}), 400)
    assert err["param"] == "part_ids"
    cancelled = client.uploads.cancel(bad.id)
    assert cancelled.status == "cancelled"
    assert error_of(roomy.post(f"/v1/uploads/{bad.id}/parts", files={"data": ("b", b"x")}), 400)["param"] == \
        "upload_id"
    many = start(21)
    for _ in range(20):
        client.uploads.parts.create(many.id, data=b"x")
    assert error_of(roomy.post(f"/v1/uploads/{many.id}/parts", files={"data": ("b", b"x")}), 429)["code"] == \
        "too_many_parts"
    assert error_of(roomy.post("/v1/uploads", json={"bytes": 20_001, "filename": "t.jsonl",
                                                    "mime_type": "text/plain", "purpose": "fine-tune"}), 413)
    assert error_of(openai_get(roomy, roomy.other, f"/v1/uploads/{many.id}/cancel"), 404)  # acme's upload only


def start_upload(api: Api, size: int) -> dict:
    r = api.post("/v1/uploads", json={"bytes": size, "filename": "t.jsonl", "mime_type": "application/jsonl",
                                      "purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    return r.json()


def add_part(api: Api, upload_id: str, data: bytes):
    return api.post(f"/v1/uploads/{upload_id}/parts", files={"data": ("blob", data)})


def test_parts_of_uploads_not_completed_count_against_the_storage_quota(api):
    held = start_upload(api, 300)["id"]
    assert add_part(api, held, b"x" * 250).status_code == 200
    assert api.upload().status_code == 200  # 250 bytes of parts + a file of 108, of the 400 allowed
    err = error_of(add_part(api, held, b"x" * 50), 429)  # 358 + 50
    assert err["code"] == "storage_quota_exceeded" and "parts of uploads" in err["message"]
    assert error_of(api.upload(), 429)["code"] == "storage_quota_exceeded"  # a /v1/files upload counts them too
    assert api.post(f"/v1/uploads/{held}/cancel").json()["status"] == "cancelled"  # its parts count no more
    assert api.upload().status_code == 200  # 216 of 400
    data = "".join(json.dumps(r) + "\n" for r in ROWS).encode()
    done = start_upload(api, len(data))["id"]
    part = add_part(api, done, data).json()["id"]
    r = api.post(f"/v1/uploads/{done}/complete", json={"part_ids": [part]})  # 324: its parts not counted twice
    assert r.status_code == 200 and r.json()["status"] == "completed", r.text


def test_a_tenant_has_at_most_quotas_pending_uploads_pending_at_a_time(roomy):
    ids = [start_upload(roomy, 10)["id"] for _ in range(16)]  # the default quotas.pending_uploads
    r = roomy.post("/v1/uploads", json={"bytes": 10, "filename": "t.jsonl", "mime_type": "application/jsonl",
                                        "purpose": "fine-tune"})
    err = error_of(r, 429)
    assert err["code"] == "pending_uploads_limit" and "quotas.pending_uploads" in err["message"]
    other = roomy.client.post("/v1/uploads", headers={"Authorization": f"Bearer {roomy.other}"},
                              json={"bytes": 10, "filename": "t.jsonl", "mime_type": "text/plain",
                                    "purpose": "fine-tune"})
    assert other.status_code == 200  # per tenant
    roomy.post(f"/v1/uploads/{ids[0]}/cancel")
    assert start_upload(roomy, 10)["status"] == "pending"


def test_an_upload_expires_an_hour_after_creation_and_its_parts_are_deleted(roomy):
    from sqlalchemy import text

    upload = start_upload(roomy, 20)
    assert upload["expires_at"] == upload["created_at"] + 3600 and upload["status"] == "pending"
    part = add_part(roomy, upload["id"], b"x" * 10).json()["id"]
    parts = roomy.service.storage.part_path(upload["id"], part).parent
    assert parts.is_dir()
    with roomy.service.engine.begin() as c:  # an hour later
        c.execute(text("UPDATE ft_uploads SET expires_at = created_at - 1 WHERE id = :id"), {"id": upload["id"]})
    err = error_of(add_part(roomy, upload["id"], b"x" * 10), 400)
    assert err["code"] == "invalid_upload_state" and "expired" in err["message"]
    err = error_of(roomy.post(f"/v1/uploads/{upload['id']}/complete", json={"part_ids": [part]}), 400)
    assert err["code"] == "invalid_upload_state"
    start_upload(roomy, 10)  # the next upload created purges the expired one
    assert not parts.exists()
    with roomy.service.engine.begin() as c:
        status = c.execute(text("SELECT status FROM ft_uploads WHERE id = :id"), {"id": upload["id"]}).scalar()
        left = c.execute(text("SELECT count(*) FROM ft_upload_parts WHERE upload_id = :id"),
                         {"id": upload["id"]}).scalar()
    assert (status, left) == ("expired", 0)


def openai_get(api: Api, key: str, path: str):
    return api.client.post(path, headers={"Authorization": f"Bearer {key}"})


class Supervisor:
    def __init__(self, alive: int, expected: int):
        self.alive_, self.expected = alive, expected

    def alive(self) -> int:
        return self.alive_


def test_health_reports_workers_and_the_queue_and_is_not_ok_without_a_live_worker(roomy):
    from budwood.serve.protocol import Health

    class Serving:
        def health(self):
            return Health(model="budwood-tiny", in_flight=0)

    app = roomy.client.app
    app.state.openai_serving = Serving()
    train = roomy.upload(TRAIN).json()["id"]
    roomy.post("/v1/fine_tuning/jobs", json={"model": "budwood-tiny", "training_file": train})
    app.state.supervisor = Supervisor(alive=0, expected=1)
    r = roomy.client.get("/health")
    assert r.status_code == 503 and r.json()["status"] == "degraded"
    assert r.json()["workers"] == {"alive": 0, "expected": 1}
    assert r.json()["queue"]["waiting"] == 1 and r.json()["queue"]["oldest_age_s"] >= 0
    app.state.supervisor = Supervisor(alive=1, expected=1)
    r = roomy.client.get("/health")
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["workers"]["alive"] == 1


def test_job_bodies_are_read_under_the_servers_limits(api):
    """The service's JSON routes are held to the inference routes' body size and nesting limits (413 / 400)."""
    big = api.post("/v1/fine_tuning/jobs", content=b'{"model": "' + b"x" * (9 << 20) + b'"}',
                   headers={"Content-Type": "application/json"})
    assert big.status_code == 413, big.text
    deep = api.post("/v1/fine_tuning/jobs", content=b'{"metadata": ' + b"[" * 5000 + b"]" * 5000 + b"}",
                    headers={"Content-Type": "application/json"})
    assert error_of(deep, 400)["param"] == "body"
