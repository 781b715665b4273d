"""The job queue on SQLite and PostgreSQL: leases, fencing, transitions, idempotency, quotas, tenants."""
import threading
import time

import pytest
from sqlalchemy import text

from budwood.errors import BudwoodError, ConflictError, LimitExceeded, NotFoundError
from budwood.jobs.queue import Lease, LeaseLost
from budwood.jobs.tenants import TenantError
from tests.conftest import queue_service


@pytest.fixture(params=["sqlite", "postgresql"])
def service(request, tmp_path):
    with queue_service(request.param, tmp_path / "home", {"concurrent_jobs": 3, "storage_bytes": 1000},
                       {"acme": TRAIN, "other": OTHER_TRAIN}) as svc:
        yield svc


TRAIN, OTHER_TRAIN = "file-" + "a" * 24, "file-" + "o" * 24


def job_values(**extra) -> dict:
    return {"model": "budwood-tiny", "training_file": TRAIN, "validation_file": None, "suffix": None,
            "seed": 1, "meta": None, "hyperparameters": {"n_epochs": 1}, **extra}


def create(svc, tenant="acme", key=None, body="b", **extra):
    extra.setdefault("training_file", TRAIN if tenant == "acme" else OTHER_TRAIN)
    job, created = svc.queue.create_job(tenant, job_values(**extra), key, body)
    return job


def test_a_job_is_claimed_once_and_its_lease_fences_every_write(service):
    q = service.queue
    job = create(service)
    claimed, lease = q.claim("w1", lease_s=60, max_attempts=3)
    assert claimed.id == job.id and lease.attempt == 1
    assert q.claim("w2", lease_s=60, max_attempts=3) is None  # held
    q.set_hyperparameters(lease, {"n_epochs": 1, "batch_size": 2, "learning_rate_multiplier": 1.0}, 10)
    assert q.start(lease, None).status == "running"
    assert q.heartbeat(lease, 60) == "running"
    stale = Lease(job.id, "w1", 0)
    for write in (lambda: q.heartbeat(stale, 60), lambda: q.emit(stale, [("info", "message", "x", None)]),
                  lambda: q.add_checkpoint(stale, 1, {}, False), lambda: q.finish(stale, "succeeded", "done")):
        with pytest.raises(LeaseLost):
            write()
    assert q.finish(lease, "succeeded", "done", fine_tuned_model="ft:x") is True
    assert q.finish(lease, "succeeded", "done again") is False  # an outcome is written once
    assert q.get_job("acme", job.id).status == "succeeded"


def test_an_expired_lease_passes_the_job_to_another_worker_and_locks_the_first_out(service):
    q = service.queue
    job = create(service)
    _, first = q.claim("w1", lease_s=60, max_attempts=3)
    q.set_hyperparameters(first, {}, 10)
    q.start(first, None)
    q.add_checkpoint(first, 5, {"train_loss": 1.0}, False)
    with service.engine.begin() as c:  # the worker went silent: its lease ran out
        c.execute(text("UPDATE ft_jobs SET lease_expires = 0"))
    claimed, second = q.claim("w2", lease_s=60, max_attempts=3)
    assert claimed.id == job.id and second.attempt == 2
    assert q.latest_checkpoint(job.id).step == 5
    with pytest.raises(LeaseLost):
        q.heartbeat(first, 60)
    with pytest.raises(LeaseLost):
        q.finish(first, "succeeded", "zombie")
    q.start(second, 5)
    assert q.finish(second, "succeeded", "done")
    events = [e.message for e in q.events("acme", job.id, limit=100)[0]]
    assert any("w1 stopped responding; w2 takes the job over" in m for m in events)
    assert sum(m == "done" for m in events) == 1 and "zombie" not in events


def test_a_job_that_loses_too_many_workers_fails(service):
    q = service.queue
    job = create(service)
    for _ in range(2):
        _, lease = q.claim("w", lease_s=60, max_attempts=2)
        q.start(lease, None) if lease.attempt > 1 else (q.set_hyperparameters(lease, {}, 10), q.start(lease, None))
        with service.engine.begin() as c:
            c.execute(text("UPDATE ft_jobs SET lease_expires = 0"))
    assert q.claim("w", lease_s=60, max_attempts=2) is None
    failed = q.get_job("acme", job.id)
    assert failed.status == "failed" and failed.error["code"] == "worker_lost"


def test_concurrent_claims_take_each_job_exactly_once(service):
    q = service.queue
    service.tenants.update("acme", max_concurrent_jobs=50)
    ids = {create(service).id for _ in range(12)}
    taken: list[str] = []
    lock = threading.Lock()

    def worker(name):
        while (claimed := q.claim(name, lease_s=60, max_attempts=3)) is not None:
            with lock:
                taken.append(claimed[0].id)

    threads = [threading.Thread(target=worker, args=(f"w{i}",)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(taken) == sorted(ids)


def test_cancel_pause_and_resume_follow_the_job_states(service):
    q = service.queue
    waiting = create(service)
    assert q.pause("acme", waiting.id).status == "paused"
    assert q.claim("w1", lease_s=60, max_attempts=3) is None  # paused jobs wait
    with pytest.raises(BudwoodError, match="only a paused job can be resumed"):
        q.resume("acme", create(service).id)
    assert q.resume("acme", waiting.id).status == "validating_files"  # paused before its files were checked
    _, lease = q.claim("w1", lease_s=60, max_attempts=3)
    q.set_hyperparameters(lease, {}, 10)
    q.start(lease, None)
    assert q.pause("acme", waiting.id).status == "pausing"
    assert q.heartbeat(lease, 60) == "pausing"  # the worker reads it at its next heartbeat
    assert q.finish(lease, "paused", "paused at step 3")
    assert q.cancel("acme", waiting.id).status == "cancelled"
    with pytest.raises(BudwoodError, match="already cancelled"):
        q.cancel("acme", waiting.id)
    with pytest.raises(NotFoundError) as e:
        q.cancel("other", waiting.id)  # another tenant's job does not exist for it
    assert e.value.code == "job_not_found"


def test_a_running_job_cancelled_tells_its_worker_and_cannot_succeed(service):
    q = service.queue
    job = create(service)
    _, lease = q.claim("w1", lease_s=60, max_attempts=3)
    q.set_hyperparameters(lease, {}, 10)
    q.start(lease, None)
    q.cancel("acme", job.id)
    assert q.heartbeat(lease, 60) == "cancelled"
    assert q.finish(lease, "succeeded", "too late") is False
    assert q.get_job("acme", job.id).status == "cancelled"


def test_idempotency_keys_return_the_first_job(service):
    q = service.queue
    first = create(service, key="k1", body="h1")
    again, created = q.create_job("acme", job_values(), "k1", "h1")
    assert again.id == first.id and not created
    with pytest.raises(ConflictError, match="different request") as e:
        q.create_job("acme", job_values(), "k1", "h2")
    assert e.value.code == "idempotency_key_reused"
    other, created = q.create_job("other", job_values(training_file=OTHER_TRAIN), "k1", "h1")  # keys are per tenant
    assert created and other.id != first.id


def test_concurrent_creates_with_one_idempotency_key_make_one_job(service):
    results = []

    def go():
        results.append(service.queue.create_job("acme", job_values(), "same", "h")[0].id)

    threads = [threading.Thread(target=go) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4 and len(set(results)) == 1


def test_concurrent_job_quota(service):
    for _ in range(3):
        create(service)
    with pytest.raises(LimitExceeded, match="limit is 3") as e:
        create(service)
    assert e.value.code == "concurrent_jobs_limit"
    create(service, tenant="other")  # quotas are per tenant


def test_storage_quota_counts_uploads_and_holds_under_races(service, tmp_path):
    stored = []

    def add(i):
        try:
            service.queue.add_file("acme", f"file-{i:024d}", "x.jsonl", "fine-tune", 300, "0" * 64, "openai", 1,
                                   lambda: None)
            stored.append(i)
        except LimitExceeded as e:
            assert e.code == "storage_quota_exceeded" and "storage quota" in str(e)

    threads = [threading.Thread(target=add, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(stored) == 3  # 10 + 3 x 300 <= 1000 < 10 + 4 x 300


def test_pagination_is_newest_first_with_after(service):
    service.tenants.update("acme", max_concurrent_jobs=50)
    ids = [create(service).id for _ in range(5)]
    page1, more = service.queue.list_jobs("acme", limit=2)
    assert [j.id for j in page1] == ids[::-1][:2] and more
    page2, more = service.queue.list_jobs("acme", after=page1[-1].id, limit=10)
    assert [j.id for j in page2] == ids[::-1][2:] and not more
    assert service.queue.list_jobs("other")[0] == []


def test_api_keys_are_kept_only_as_salted_hashes(service):
    issued = service.tenants.issue_key("acme", "ci")
    assert service.tenants.tenant_of(issued.key) == "acme"
    prefix = f"bw-{issued.id}-"  # the secret is url-safe base64, which may itself contain '-'
    assert issued.key.startswith(prefix)
    secret = issued.key[len(prefix):]
    assert len(secret) == 43
    with service.engine.connect() as c:
        dump = " ".join(str(v) for row in c.execute(text("SELECT * FROM api_keys")) for v in row)
    assert secret not in dump and issued.id in dump
    assert service.tenants.tenant_of(issued.key[:-1] + ("A" if issued.key[-1] != "A" else "B")) is None
    assert service.tenants.tenant_of("bw-nothing") is None
    service.tenants.revoke_key(issued.id)
    assert service.tenants.tenant_of(issued.key) is None
    with pytest.raises(TenantError, match="bad tenant name"):
        service.tenants.create("../evil")
    with pytest.raises(TenantError, match="already exists"):
        service.tenants.create("acme")


def test_database_time_decides_leases(service):
    """Lease expiry is read on the database's clock: a worker's own clock never matters."""
    from budwood.jobs.queue import db_now

    with service.queue.sessions() as s:
        assert abs(db_now(s) - time.time()) < 5


def test_the_migrations_build_exactly_the_declared_tables(service):
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    import budwood.jobs.models  # noqa: F401  (both table sets share db.Base)
    import budwood.registry.models  # noqa: F401
    from budwood.db import Base

    with service.engine.connect() as c:
        diff = compare_metadata(MigrationContext.configure(c), Base.metadata)
    assert diff == []


def test_uploads_permissions_expiry_and_model_deletion_on_both_databases(service):
    """The queue's side of the newer OpenAI calls, on SQLite and PostgreSQL alike."""
    from budwood.jobs.protocol import checkpoint_model, fine_tuned_model

    q = service.queue
    upload = q.create_upload("acme", "t.jsonl", "fine-tune", 30, "application/jsonl", 3600)
    parts = [q.add_part("acme", upload.id, 10, 3, lambda part_id: None) for _ in range(3)]
    with pytest.raises(LimitExceeded):
        q.add_part("acme", upload.id, 1, 3, lambda part_id: None)
    with pytest.raises(NotFoundError):
        q.add_part("other", upload.id, 1, 10, lambda part_id: None)
    with pytest.raises(BudwoodError, match="each once"):
        q.upload_parts("acme", upload.id, [parts[0].id, parts[0].id, parts[1].id])
    q.upload_parts("acme", upload.id, [p.id for p in reversed(parts)])
    values = {"file_id": "file-" + "u" * 24, "filename": "t.jsonl", "purpose": "fine-tune", "size": 30,
              "sha256": "0" * 64, "format": "openai", "examples": 10}
    done, row = q.complete_upload("acme", upload.id, values, lambda: None)
    assert done.status == "completed" and done.file_id == row.id and row.expires_at == row.created_at + 3600
    with pytest.raises(BudwoodError, match="is completed"):
        q.cancel_upload("acme", upload.id)
    with service.engine.begin() as c:
        c.execute(text("UPDATE ft_files SET expires_at = 1 WHERE id = :id"), {"id": row.id})
    with pytest.raises(NotFoundError):
        q.get_file("acme", row.id)
    removed = []
    assert q.purge_expired_files(lambda tenant, file_id: removed.append(file_id)) == 1 and removed == [row.id]

    job = create(service, suffix="s")
    _, lease = q.claim("w1", lease_s=60, max_attempts=3)
    q.set_hyperparameters(lease, {}, 10)
    q.start(lease, None)
    q.add_checkpoint(lease, 5, {}, False)
    ckpt = checkpoint_model(job, 5)
    assert q.find_checkpoint_job(ckpt) is None  # not before the job has ended
    q.finish(lease, "succeeded", "done", fine_tuned_model=fine_tuned_model(job))
    assert q.find_checkpoint_job(ckpt)[0].id == job.id
    granted = q.grant("acme", ckpt, ["other", "other"])
    assert len(granted) == 1 and q.may_use_checkpoint("other", job, 5)
    with pytest.raises(NotFoundError):
        q.grant("other", ckpt, ["other"])
    q.revoke_permission("acme", ckpt, granted[0].id)
    assert not q.may_use_checkpoint("other", job, 5)
    with pytest.raises(NotFoundError):
        q.delete_model("other", fine_tuned_model(job))
    q.delete_model("acme", fine_tuned_model(job))
    assert q.find_model(fine_tuned_model(job)) is None and q.models("acme") == []
