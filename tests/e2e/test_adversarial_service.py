"""Probes of the fine-tuning service as an attacker would send them, in process (no engine, no worker):
every answer is a 4xx in OpenAI's shape, never a 500; another tenant's objects on the newer routes
(uploads, checkpoint permissions, model deletion) are 404 exactly as missing ones; ids from the request
never leave their folders; and property-based fuzzing (hypothesis) of the request bodies finds no 500."""
from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import service_config

ROWS = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
        for i in range(12)]
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner,
                                                                                max_size=4), max_leaves=12)


class Probe:
    def __init__(self, client: TestClient, service, keys: dict[str, str]):
        self.client, self.service, self.keys = client, service, keys

    def call(self, method: str, path: str, tenant: str = "acme", **kw):
        r = self.client.request(method, path, headers={"Authorization": f"Bearer {self.keys[tenant]}"}, **kw)
        assert r.status_code < 500, (method, path, r.status_code, r.text[:500])
        if r.status_code >= 400:
            assert set(r.json()["error"]) >= {"message", "type", "code", "param"}, r.text
            assert str(self.service.config.home) not in r.text, r.text  # no server path in any refusal
        return r


@pytest.fixture(scope="module")
def probe(tmp_path_factory) -> Iterator[Probe]:
    from budwood.jobs.service import Service
    from budwood.service_app import create_service_app

    home = tmp_path_factory.mktemp("adversarial") / "home"
    service = Service(service_config(home, quotas={"file_bytes": 20_000, "upload_part_bytes": 2000,
                                                   "upload_parts": 8, "concurrent_jobs": 100}))
    try:
        keys = {}
        for tenant in ("acme", "mallory"):
            service.tenants.create(tenant)
            keys[tenant] = service.tenants.issue_key(tenant).key
        yield Probe(TestClient(create_service_app(service), raise_server_exceptions=False), service, keys)
    finally:
        service.close()


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def test_another_tenants_uploads_checkpoints_and_models_are_answered_as_missing(probe):
    from budwood.jobs.protocol import checkpoint_model, fine_tuned_model

    data = jsonl(ROWS)
    upload = probe.call("POST", "/v1/uploads", json={"bytes": len(data), "filename": "t.jsonl",
                                                     "mime_type": "application/jsonl", "purpose": "fine-tune"}).json()
    part = probe.call("POST", f"/v1/uploads/{upload['id']}/parts", files={"data": ("p", data)}).json()
    for method, path, kw in (("POST", f"/v1/uploads/{upload['id']}/parts", {"files": {"data": ("p", b"x")}}),
                             ("POST", f"/v1/uploads/{upload['id']}/complete", {"json": {"part_ids": [part["id"]]}}),
                             ("POST", f"/v1/uploads/{upload['id']}/cancel", {})):
        assert probe.call(method, path, tenant="mallory", **kw).status_code == 404
    completed = probe.call("POST", f"/v1/uploads/{upload['id']}/complete", json={"part_ids": [part["id"]]}).json()
    file_id = completed["file"]["id"]
    assert probe.call("GET", f"/v1/files/{file_id}", tenant="mallory").status_code == 404
    # a succeeded job of acme's with a checkpoint
    q = probe.service.queue
    job_id = probe.call("POST", "/v1/fine_tuning/jobs", json={"model": "budwood-tiny",
                                                              "training_file": file_id}).json()["id"]
    while (claimed := q.claim("w", lease_s=60, max_attempts=3)) is not None and claimed[0].id != job_id:
        q.cancel(claimed[0].tenant, claimed[0].id)
    lease = claimed[1]
    q.set_hyperparameters(lease, {}, 12)
    q.start(lease, None)
    q.add_checkpoint(lease, 5, {}, False)
    job = q.get_job("acme", job_id)
    q.finish(lease, "succeeded", "done", fine_tuned_model=fine_tuned_model(job))
    ckpt = checkpoint_model(job, 5)
    missing = checkpoint_model(job, 6)
    for tenant, name in (("mallory", ckpt), ("acme", missing)):
        r = probe.call("GET", f"/v1/fine_tuning/checkpoints/{name}/permissions", tenant=tenant)
        assert r.status_code == 404 and r.json()["error"]["code"] == "checkpoint_not_found"
    r = probe.call("POST", f"/v1/fine_tuning/checkpoints/{ckpt}/permissions", tenant="mallory",
                   json={"project_ids": ["mallory"]})  # granting oneself another's checkpoint
    assert r.status_code == 404
    assert probe.call("DELETE", f"/v1/models/{fine_tuned_model(job)}", tenant="mallory").status_code == 404
    assert probe.call("DELETE", f"/v1/models/{fine_tuned_model(job)}").json()["deleted"] is True


@pytest.mark.parametrize("upload_id", ["../../etc", "upload_" + "a" * 24 + "/../x", "..%2F..%2Fetc", "upload_%00",
                                       "upload_" + "A" * 5000])
def test_ids_from_the_request_never_reach_a_path(probe, upload_id):
    before = sorted(p.name for p in probe.service.storage.root.iterdir())
    for action in ("parts", "complete", "cancel"):
        kw = {"files": {"data": ("p", b"x")}} if action == "parts" else \
            {"json": {"part_ids": ["../../x"]}} if action == "complete" else {}
        assert probe.call("POST", f"/v1/uploads/{upload_id}/{action}", **kw).status_code in (400, 404, 405)
    assert sorted(p.name for p in probe.service.storage.root.iterdir()) == before


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=JSON, path=st.sampled_from(["/v1/fine_tuning/jobs", "/v1/uploads",
                                        "/v1/fine_tuning/checkpoints/ft:budwood-tiny:acme::abc:ckpt-step-1/permissions",
                                        "/v1/uploads/upload_" + "a" * 24 + "/complete"]))
def test_fuzzed_request_bodies_are_refused_never_500(probe, body, path):
    r = probe.call("POST", path, json=body)
    assert r.status_code in (200, 400, 401, 404, 409, 413, 422, 429), r.text


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(anchor=st.text(max_size=12), seconds=st.text(max_size=12), extra=st.text(max_size=8))
def test_fuzzed_expires_after_fields_are_refused_by_name(probe, anchor, seconds, extra):
    r = probe.call("POST", "/v1/files", files={"file": ("t.jsonl", jsonl(ROWS))},
                   data={"purpose": "fine-tune", "expires_after[anchor]": anchor, "expires_after[seconds]": seconds,
                         f"expires_after[{extra}]": "1"})
    if r.status_code != 200:
        assert r.json()["error"]["param"] in ("expires_after", "file", "purpose"), r.text
