"""OpenAI's `integrations` through the hosted service, with the official openai client: a job with a W&B
integration logs its training metrics to a W&B run (offline here: the run's file in WANDB_DIR is read back),
and a worker that cannot log to W&B (no wandb, no key, a key wandb refuses) trains the job all the same,
its events saying why."""
import glob
import json
import struct
import sys
from pathlib import Path

import pytest
import wandb
from wandb.proto import wandb_internal_pb2

from tests.conftest import chat_rows, live_service, upload, write_jsonl

WANDB = {"type": "wandb", "wandb": {"project": "budwood-tests", "name": "support-run", "entity": "acme-team",
                                    "tags": ["support", "tiny"]}}


def wandb_records(path: Path) -> list:
    """The records of a W&B run file (`run-<id>.wandb`): LevelDB's log format (32 KiB blocks of records,
    each with a 7-byte header: CRC, length, kind) after W&B's 7-byte file header, each record a protobuf."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, chunk, records = 7, b"", []
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if kind == 0:  # the rest of the block is padding
            pos += left
            continue
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last part of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


@pytest.fixture(scope="module")
def wandb_env(tmp_path_factory):
    """W&B's folders in the test's tmp (nothing in the user's home); each test sets its mode and key."""
    root = tmp_path_factory.mktemp("wandb")
    with pytest.MonkeyPatch.context() as mp:
        for name in ("DIR", "CONFIG_DIR", "CACHE_DIR", "DATA_DIR", "ARTIFACT_DIR"):
            mp.setenv(f"WANDB_{name}", str(root / name.lower()))
            (root / name.lower()).mkdir()
        mp.setenv("WANDB_SILENT", "true")
        mp.setenv("NETRC", str(root / "netrc"))  # an empty netrc: no key but the one a test sets
        (root / "netrc").write_text("")
        for name in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_BASE_URL", "WANDB_ENTITY", "WANDB_PROJECT"):
            mp.delenv(name, raising=False)
        yield root


@pytest.fixture(autouse=True)
def fresh_wandb():
    """wandb keeps the settings it read from the environment for the life of the process; each test changes
    them (a worker process keeps one environment for all its jobs)."""
    yield
    wandb.teardown()


@pytest.fixture(scope="module")
def live(tmp_path_factory, wandb_env):
    with live_service(tmp_path_factory.mktemp("service-integrations"), workers=1,
                      evaluation={"suites": []}) as svc:
        yield svc


@pytest.fixture(scope="module")
def acme(live):
    return live.client(live.tenant("acme", max_concurrent_jobs=20))


@pytest.fixture(scope="module")
def train_file(acme, tmp_path_factory):
    rows = chat_rows(18, "What is the code of item {i}?", "Item {i} has code C-{x}.")
    return upload(acme, write_jsonl(tmp_path_factory.mktemp("data") / "train.jsonl", rows))


def run_job(live, acme, train_file, integrations=(WANDB,)):
    job = acme.fine_tuning.jobs.create(
        model="budwood-tiny", training_file=train_file.id, seed=3, integrations=list(integrations),
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 4}}})
    assert [i.model_dump() for i in job.integrations] == [WANDB]  # as asked, in OpenAI's shape
    done = live.wait(acme, job.id)
    assert done.status == "succeeded", done.error
    return done, list(acme.fine_tuning.jobs.list_events(job.id, limit=100))[::-1]


def test_a_wandb_integration_logs_the_jobs_metrics_to_its_run(live, acme, train_file, wandb_env, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    job, events = run_job(live, acme, train_file)
    assert job.integrations[0].wandb.project == "budwood-tests"
    logging = [e for e in events if "Weights & Biases" in e.message]
    assert len(logging) == 1 and logging[0].message.startswith(
        "Logging metrics to Weights & Biases: project budwood-tests, run support-run (offline: kept on the worker")
    assert logging[0].data["wandb"] == {"project": "budwood-tests", "run": "support-run", "logged": True,
                                        "offline": True}
    runs = glob.glob(str(wandb_env / "dir" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(runs) == 1
    records = wandb_records(Path(runs[0]))
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.project, run.display_name, run.entity, list(run.tags)) == ("budwood-tests", "support-run",
                                                                           "acme-team", ["support", "tiny"])
    logged = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
            if "loss" in items:
                logged[items["_step"]] = items["loss"]
    reported = {e.data["step"]: e.data["train_loss"] for e in events if e.type == "metrics" and "valid_loss" not in
                e.data}
    assert sorted(reported) == [1, 2, 3, 4]  # 16 training examples (18 less the 10 % held out) / batch 4
    assert logged == pytest.approx(reported, rel=1e-6)  # the job's every training loss, at its step


def test_a_worker_without_a_wandb_key_trains_the_job_and_says_why(live, acme, train_file, wandb_env, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    before = set(glob.glob(str(wandb_env / "dir" / "wandb" / "*run-*")))
    job, events = run_job(live, acme, train_file)
    said = [e for e in events if "Weights & Biases" in e.message]
    assert [(e.level, e.message) for e in said] == [(
        "warn", "Metrics not logged to Weights & Biases: this worker has no W&B API key (the service's operator "
                "sets WANDB_API_KEY or runs `wandb login` for its workers); the job trains without it")]
    assert said[0].data["wandb"]["logged"] is False
    assert any(e.type == "metrics" for e in events) and job.trained_tokens > 0
    assert set(glob.glob(str(wandb_env / "dir" / "wandb" / "*run-*"))) == before  # no run was started


def test_a_worker_without_the_wandb_package_trains_the_job_and_says_why(live, acme, train_file, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError, as where it is not installed
    _, events = run_job(live, acme, train_file)
    said = [e.message for e in events if "Weights & Biases" in e.message]
    assert said == ["Metrics not logged to Weights & Biases: the wandb package is not installed on this worker (the "
                    "service's operator installs budwood[trackers]); the job trains without it"]


def test_a_key_wandb_refuses_is_reported_and_the_job_trains_without_it(live, acme, train_file, monkeypatch):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_API_KEY", "not-a-key")  # wandb refuses it before reaching any server
    job, events = run_job(live, acme, train_file)
    said = [e.message for e in events if "Weights & Biases" in e.message]
    assert said[0].startswith("Logging metrics to Weights & Biases: project budwood-tests, run support-run")
    assert said[1].startswith("Metrics not logged to Weights & Biases: wandb could not log the run "
                              "(AuthenticationError: ") and "WANDB_API_KEY" in said[1]
    assert said[1].endswith("; the job trains without it") and len(said) == 2
    assert sorted(e.data["step"] for e in events if e.type == "metrics" and "valid_loss" not in e.data) == [1, 2, 3, 4]
