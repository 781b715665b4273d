"""The queue and the worker through pauses, resumes, shutdowns, lost workers and database blips: quotas hold,
files are validated, attempts are counted right, and no failure names a server path."""
import threading

import pytest
from sqlalchemy import text
from sqlalchemy.exc import OperationalError

from budwood.errors import BudwoodError, LimitExceeded
from tests.conftest import queue_service


@pytest.fixture(params=["sqlite", "postgresql"])
def service(request, tmp_path):
    with queue_service(request.param, tmp_path / "home", {"concurrent_jobs": 2, "storage_bytes": 10_000},
                       {"acme": "file-" + "a" * 24}) as svc:
        yield svc


def job_values(**extra) -> dict:
    return {"model": "budwood-tiny", "training_file": "file-" + "a" * 24, "validation_file": None, "suffix": None,
            "seed": 1, "meta": None,
            "hyperparameters": {"n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"},
            **extra}


def create(svc, tenant="acme"):
    return svc.queue.create_job(tenant, job_values(), None, "b")[0]


def expire(svc):
    with svc.engine.begin() as c:
        c.execute(text("UPDATE ft_jobs SET lease_expires = 0 WHERE lease_expires IS NOT NULL"))


def start_running(q):
    """The queued job claimed by worker w1, validated and started: its lease."""
    _, lease = q.claim("w1", lease_s=60, max_attempts=3)
    q.set_hyperparameters(lease, {"n_epochs": 1, "batch_size": 1, "learning_rate_multiplier": 1.0}, 10)
    q.start(lease, None)
    return lease


def test_resume_does_not_bypass_the_concurrent_jobs_quota(service):
    """Paused jobs do not count as active, and resume never checks the quota: a tenant with a limit of
    2 gets any number of jobs running by pausing waiting ones, creating more, then resuming."""
    q = service.queue
    first = [create(service) for _ in range(2)]
    for job in first:
        q.pause("acme", job.id)  # waiting jobs pause at once and stop counting
    [create(service) for _ in range(2)]  # the quota is free again
    resumed = 0
    for job in first:
        try:
            q.resume("acme", job.id)
            resumed += 1
        except LimitExceeded as e:
            assert e.code == "concurrent_jobs_limit"
    active = [j for j in q.list_jobs("acme", limit=100)[0] if j.status in ("validating_files", "queued", "running")]
    assert len(active) <= 2, f"{len(active)} active jobs for a tenant whose limit is 2 (resumed {resumed})"


def test_a_job_paused_before_its_files_were_validated_is_validated_after_resume(service):
    """pause() of a validating_files job, then resume(), puts it in `queued`: the worker then skips
    validation (worker.py: `if self.job.status == "validating_files"`), "auto" is never resolved and the
    job trains with the fallbacks (batch 8, 3 epochs) while reporting "auto"."""
    q = service.queue
    job = create(service)
    _, lease = q.claim("w1", lease_s=60, max_attempts=3)  # a worker is validating it
    q.pause("acme", job.id)
    q.resume("acme", job.id)
    claimed, _ = q.claim("w2", lease_s=60, max_attempts=3)
    assert claimed.id == job.id
    assert claimed.status == "validating_files" or claimed.hyperparameters["batch_size"] != "auto", \
        f"resumed as {claimed.status!r} with hyperparameters {claimed.hyperparameters}: validation is skipped"


def test_pause_and_resume_do_not_count_as_lost_workers(service):
    """Every claim raises `attempt`, and claim() fails a running job whose lease ran out once
    attempt >= max_attempts: two pause/resume cycles and one worker death fail the job as
    worker_lost ("stopped responding 3 times") though only one worker died."""
    q = service.queue
    job = create(service)
    lease = start_running(q)
    for i in range(2):
        q.pause("acme", job.id)
        assert q.finish(lease, "paused", "paused")
        q.resume("acme", job.id)
        _, lease = q.claim(f"w{i + 2}", lease_s=60, max_attempts=3)
        q.start(lease, 1)
    expire(service)  # the one worker that dies
    claimed = q.claim("w9", lease_s=60, max_attempts=3)
    got = q.get_job("acme", job.id)
    assert claimed is not None and got.status == "running", (got.status, got.error)


def test_a_worker_shutdown_does_not_count_as_a_lost_worker(service):
    """Same with release() (SIGTERM, a deploy): three graceful restarts and the next crash fails the job."""
    q = service.queue
    job = create(service)
    lease = start_running(q)
    for i in range(2):
        q.release(lease, "shutting down")
        _, lease = q.claim(f"w{i + 2}", lease_s=60, max_attempts=3)
        q.start(lease, 1)
    expire(service)
    q.claim("w9", lease_s=60, max_attempts=3)
    got = q.get_job("acme", job.id)
    assert got.status == "running", (got.status, got.error)


def test_a_job_that_kills_its_workers_while_validating_eventually_fails(service):
    """max_attempts is only applied to `running` jobs: a job whose validation kills its worker (OOM on a
    huge file) is claimed again forever, each time killing another worker."""
    q = service.queue
    job = create(service)
    for _ in range(6):
        claimed = q.claim("w", lease_s=60, max_attempts=3)
        if claimed is None:
            break
        expire(service)  # the worker died while validating
    got = q.get_job("acme", job.id)
    assert got.status == "failed", f"after 6 worker deaths while validating: {got.status}, attempt {got.attempt}"


def test_a_file_deleted_while_its_job_is_created_is_refused(service, tmp_path):
    """The API checks the files (jobs_router.check_file) outside the transaction that creates the job, and
    create_job() does not check them again: a DELETE /v1/files/ID in between is allowed (no job uses the
    file yet) and the job is created on a file that no longer exists."""
    q = service.queue
    fid = "file-" + "b" * 24
    q.add_file("acme", fid, "t.jsonl", "fine-tune", 10, "0" * 64, "openai", 10, lambda: None)
    q.get_file("acme", fid, "training_file")  # the API's check_file passes
    q.delete_file("acme", fid, lambda: None)  # a concurrent DELETE /v1/files/ID
    with pytest.raises(BudwoodError):
        q.create_job("acme", job_values(training_file=fid), None, "b")


def test_a_worker_failure_does_not_leak_server_paths(service):
    """A job whose bytes are missing (the race above, or a restore whose folder is gone) fails as
    internal_error with the exception text, which names the service's HOME on the server."""
    from budwood.jobs.worker import JobRun

    q = service.queue
    job = create(service)  # its training file has no bytes
    claimed, lease = q.claim("w1", lease_s=60, max_attempts=3)
    JobRun(service, claimed, lease, threading.Event()).run()
    failed = q.get_job("acme", job.id)
    assert failed.status == "failed"
    home = str(service.config.home)
    assert home not in failed.error["message"], failed.error["message"]


def test_a_worker_survives_a_database_blip_while_polling(service, monkeypatch):
    """run_worker() calls queue.claim() with no error handling: one OperationalError (PostgreSQL restarted,
    SQLite 'database is locked' past the timeout) ends the worker process for good."""
    from budwood.jobs.queue import JobQueue
    from budwood.jobs.worker import run_worker

    shutdown = threading.Event()
    calls = {"n": 0}
    original = JobQueue.claim

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise OperationalError("SELECT ...", {}, Exception("server closed the connection unexpectedly"))
        shutdown.set()
        return original(self, *args, **kwargs)

    monkeypatch.setattr(JobQueue, "claim", flaky)
    config = service.config.model_copy(update={"poll_s": 0.01})
    run_worker(config, "w1", shutdown)
    assert calls["n"] >= 2


def test_a_training_failure_does_not_leak_the_workers_paths(service, monkeypatch):
    """The recipe's NaN error names the last good checkpoint by its path in the worker's scratch folder
    ("Last good checkpoint: HOME/work/ftjob-...-1/adapter/checkpoints/step-00000005"); JobRun._public only
    replaces the data files' paths, so the job's error shows the tenant the worker's folders."""
    import budwood.train.recipe as recipe
    from budwood.errors import TrainingError
    from budwood.jobs.worker import JobRun

    q = service.queue
    fid = "file-" + "d" * 24
    src = service.storage.tmp_dir() / "t.jsonl"
    src.write_text('{"prompt": "q", "completion": "a"}\n' * 10)
    q.add_file("acme", fid, "t.jsonl", "fine-tune", src.stat().st_size, "0" * 64, "prompt_completion", 10,
               lambda: service.storage.put_file("acme", fid, src))
    job = q.create_job("acme", job_values(training_file=fid), None, "b")[0]
    claimed, lease = q.claim("w1", lease_s=60, max_attempts=3)
    q.set_hyperparameters(lease, {"n_epochs": 1, "batch_size": 1, "learning_rate_multiplier": 1.0}, 10)
    claimed.status = "queued"
    run = JobRun(service, claimed, lease, threading.Event())

    def nan_train(config, **kwargs):  # what recipe._train raises when the loss becomes NaN at step 6
        kept = run.adapter_dir / "checkpoints" / "step-00000005"
        raise TrainingError(f"loss became nan at step 6; stopped without applying the update. Last good "
                            f"checkpoint: {kept}. Lower training.learning_rate (or use precision fp32) and start "
                            "again in a new output_dir.")

    monkeypatch.setattr(recipe, "train", nan_train)
    run.run()
    failed = q.get_job("acme", job.id)
    assert failed.status == "failed" and failed.error["code"] == "training_failed"
    assert str(service.config.home) not in failed.error["message"], failed.error["message"]


def test_events_never_show_the_workers_paths_after_a_takeover(service):
    """A takeover resumes from a restored checkpoint, and the recipe notes "resumed from <the worker's scratch
    folder>/adapter/checkpoints/step-N": every event passes through JobRun's public filter, so the tenant sees
    the step, never the folder (nor the service's HOME)."""
    from budwood.jobs.heartbeat import JobProgress
    from budwood.jobs.worker import JobRun

    q = service.queue
    create(service)
    start_running(q)
    expire(service)  # the first worker died: the second takes the job over
    claimed, lease = q.claim("w2", lease_s=60, max_attempts=3)
    run = JobRun(service, claimed, lease, threading.Event())
    restored = run.adapter_dir / "checkpoints" / "step-00000005"
    JobProgress(run.beat).note(f"resumed from {restored} (step 5)")
    run.beat.emit(f"warning: {service.config.home.expanduser()}/checkpoints/{claimed.id}/step-00000005 is slow",
                  data={"where": str(restored)})
    run.beat.flush()
    events = q.events("acme", claimed.id, limit=100)[0]
    shown = " ".join(e.message + " " + str(e.data) for e in events)
    assert "resumed from step-00000005 (step 5)" in shown
    for root in (str(run.workdir.parent), str(service.config.home), "/tmp"):
        assert root not in shown, shown
