"""The dashboard's routes in process (no engine, no worker, no browser): signing in, scoping to the
tenant, and the job page's poll; the browser-driven checks are tests/e2e/test_dashboard.py."""
from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from tests.conftest import service_config

FILE = "file-" + "a" * 24


@pytest.fixture
def site(tmp_path) -> Iterator[tuple[TestClient, dict[str, str], str]]:
    """(client, tenant -> key, acme's job id); globex has no jobs."""
    from budwood.jobs.service import Service
    from budwood.service_app import create_service_app

    service = Service(service_config(tmp_path / "home"))
    try:
        keys = {}
        for tenant in ("acme", "globex"):
            service.tenants.create(tenant)
            keys[tenant] = service.tenants.issue_key(tenant).key
        service.queue.add_file("acme", FILE, "t.jsonl", "fine-tune", 10, "0" * 64, "openai", 10, lambda: None)
        job, _ = service.queue.create_job("acme", {"model": "budwood-tiny", "training_file": FILE,
                                                   "validation_file": None, "suffix": None, "seed": 1, "meta": None,
                                                   "hyperparameters": {}}, None, "h")
        yield TestClient(create_service_app(service), follow_redirects=False), keys, job.id
    finally:
        service.close()


def sign_in(client: TestClient, key: str) -> None:
    r = client.post("/dashboard/login", data={"api_key": key, "next": "/dashboard"})
    assert r.status_code == 303 and r.headers["location"] == "/dashboard"


def test_pages_send_a_stranger_to_the_login_form_and_back(site):
    client, keys, job_id = site
    r = client.get(f"/dashboard/jobs/{job_id}")
    assert r.status_code == 303 and r.headers["location"] == f"/dashboard/login?next=%2Fdashboard%2Fjobs%2F{job_id}"
    assert client.get(f"/dashboard/jobs/{job_id}/metrics.json").status_code == 401
    refused = client.post("/dashboard/login", data={"api_key": "bw-nope", "next": "https://evil.example/"})
    assert refused.status_code == 401 and "not valid" in refused.text
    r = client.post("/dashboard/login", data={"api_key": keys["acme"], "next": "https://evil.example/"})
    assert r.status_code == 303 and r.headers["location"] == "/dashboard"  # never another site
    assert "httponly" in r.headers["set-cookie"].lower() and "samesite=strict" in r.headers["set-cookie"].lower()


def test_a_tenant_sees_its_own_job_and_another_tenants_job_does_not_exist(site):
    client, keys, job_id = site
    sign_in(client, keys["acme"])
    page = client.get(f"/dashboard/jobs/{job_id}")
    assert page.status_code == 200 and job_id in page.text and "validating_files" in page.text
    assert page.headers["x-frame-options"] == "DENY" and "script-src 'self'" in page.headers["content-security-policy"]
    poll = client.get(f"/dashboard/jobs/{job_id}/metrics.json", params={"after": 0}).json()
    assert poll["status"] == "validating_files" and poll["after"] == poll["events"][-1]["seq"] > 0
    assert job_id in client.get("/dashboard").text
    other = TestClient(client.app, follow_redirects=False)
    sign_in(other, keys["globex"])
    assert other.get(f"/dashboard/jobs/{job_id}").status_code == 404
    assert other.get(f"/dashboard/jobs/{job_id}/metrics.json").status_code == 404
    assert other.post(f"/dashboard/jobs/{job_id}/cancel").status_code == 404
    assert job_id not in other.get("/dashboard").text


def test_cancel_from_the_page_cancels_and_returns_to_it(site):
    client, keys, job_id = site
    sign_in(client, keys["acme"])
    r = client.post(f"/dashboard/jobs/{job_id}/cancel")
    assert r.status_code == 303 and r.headers["location"] == f"/dashboard/jobs/{job_id}"
    assert client.get(f"/dashboard/jobs/{job_id}/metrics.json").json()["finished"] is True
    again = client.post(f"/dashboard/jobs/{job_id}/cancel")  # already ended: the page says how
    assert again.status_code == 303
    assert client.get("/dashboard/static/nothing.js").status_code == 404
    assert client.get("/dashboard/static/dashboard.js").headers["content-type"].startswith("text/javascript")
