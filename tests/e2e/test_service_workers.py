"""`budwood service` and three `budwood worker` processes on PostgreSQL; one worker is SIGKILLed mid-training."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from openai import OpenAI

from tests.conftest import SERVICE_TEST_CONFIG, pg_schema, upload

BUDWOOD = [sys.executable, "-m", "budwood"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_health(base: str, process: subprocess.Popen, log: Path, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline and process.poll() is None, log.read_text()[-3000:]
        time.sleep(0.3)


def cli(config: Path, *args: str) -> str:
    done = subprocess.run(BUDWOOD + list(args) + ["--config", str(config)], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.slow
def test_ten_jobs_three_workers_one_killed_all_succeed_once(tmp_path, company_data):
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    procs: dict[str, subprocess.Popen] = {}
    with pg_schema() as url:
        config = tmp_path / "service.yaml"
        config.write_text(yaml.safe_dump({**json.loads(json.dumps(SERVICE_TEST_CONFIG)), "home": str(tmp_path / "home"),
                                          "database": url, "port": port, "workers": 0}))
        cli(config, "tenants", "create", "acme", "--max-concurrent-jobs", "10")
        key = cli(config, "keys", "issue", "acme").strip().splitlines()[-1]
        assert key.startswith("bw-")
        try:
            procs["service"] = subprocess.Popen(BUDWOOD + ["service", "--config", str(config)], env=env,
                                                stdout=subprocess.DEVNULL, stderr=open(tmp_path / "service.log", "w"))
            base = f"http://127.0.0.1:{port}"
            wait_for_health(base, procs["service"], tmp_path / "service.log")
            client = OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
            train = upload(client, company_data["train"])
            # the same data, seed and settings for all ten: exact resume means ten identical adapters
            jobs = [client.fine_tuning.jobs.create(model="budwood-tiny", training_file=train.id, seed=3, suffix=f"j{i}",
                                                   hyperparameters={"n_epochs": 2, "batch_size": 8}).id
                    for i in range(10)]
            for i in range(3):
                procs[f"w{i}"] = subprocess.Popen(BUDWOOD + ["worker", "--config", str(config), "--id", f"w{i}"],
                                                  env=env, stdout=subprocess.DEVNULL,
                                                  stderr=open(tmp_path / f"w{i}.log", "w"))
            # kill the worker of the first job that is past its first checkpoint (step 5)
            from budwood.jobs.service import Service, load_service_config

            service = Service(load_service_config(config))
            victim = None
            deadline = time.monotonic() + 180
            while victim is None:
                assert time.monotonic() < deadline, "no job reached step 7"
                for job_id in jobs:
                    job = service.queue.get_job(None, job_id)
                    if job.status == "running" and (job.progress or {}).get("step", 0) >= 7:
                        victim = job
                        break
                time.sleep(0.1)
            procs[victim.lease_owner].send_signal(signal.SIGKILL)
            killed_at = victim.progress["step"]
            # every job ends, each exactly once
            deadline = time.monotonic() + 400
            while not all(service.queue.get_job(None, j).status in ("succeeded", "failed", "cancelled") for j in jobs):
                assert time.monotonic() < deadline, [service.queue.get_job(None, j).status for j in jobs]
                time.sleep(0.5)
            finals = [client.fine_tuning.jobs.retrieve(j) for j in jobs]
            assert [f.status for f in finals] == ["succeeded"] * 10, [f.error for f in finals]
            assert len({f.fine_tuned_model for f in finals}) == 10
            fingerprints = set()
            for f in finals:
                events = list(client.fine_tuning.jobs.list_events(f.id, limit=100))
                messages = [e.message for e in events]
                assert messages.count("The job has successfully completed") == 1
                assert len({e.id for e in events}) == len(events)
                # 78 examples less the 8 held out for evaluation (no validation file) / batch 8: 9 steps an epoch
                assert {e.data["step"] for e in events if e.type == "metrics"} == set(range(1, 19))
                checkpoints = list(client.fine_tuning.jobs.checkpoints.list(f.id))
                assert sorted(c.step_number for c in checkpoints) == [5, 10, 15, 18]
                for c in checkpoints:  # every checkpoint the API lists is whole in the storage
                    assert (service.storage.checkpoint_dir(f.id, c.step_number) / "trainer_state.json").exists()
                info = service.registry.version_info(f"acme/j{jobs.index(f.id)}-{f.id[6:14].lower()}@1.0.0")
                fingerprints.add(info.adapter_fingerprint)
                if f.id == victim.id:
                    assert any(f"{victim.lease_owner} stopped responding" in m for m in messages), messages
                    resumed = [m for m in messages if "resumed from its checkpoint at step" in m]
                    assert resumed and int(resumed[0].rsplit(" ", 1)[1]) in (5, 10, 15) and killed_at >= 7
            assert len(fingerprints) == 1, "a resumed job trained other weights than the uninterrupted ones"
            # the server process answers with a model that a worker process made, without a restart
            reply = client.chat.completions.create(model=finals[0].fine_tuned_model, max_tokens=8,
                                                   messages=[{"role": "user", "content": "Who founded Corvidworth?"}])
            assert reply.choices[0].message.content is not None
            with service.engine.connect() as c:  # nothing half-written: no job row still holds a lease
                from sqlalchemy import text

                assert c.execute(text("SELECT count(*) FROM ft_jobs WHERE lease_expires IS NOT NULL")).scalar() == 0
            service.close()
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.send_signal(signal.SIGTERM)
            for p in procs.values():
                try:
                    p.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    p.kill()


def test_tenants_and_keys_from_the_command_line(tmp_path):
    config = tmp_path / "service.yaml"
    config.write_text(yaml.safe_dump({"home": str(tmp_path / "home")}))
    cli(config, "tenants", "create", "acme", "--max-storage-bytes", "5000")
    failed = subprocess.run(BUDWOOD + ["tenants", "create", "Bad/Name", "--config", str(config)],
                            capture_output=True, text=True, timeout=120)
    assert failed.returncode == 2 and "bad tenant name" in failed.stderr and "Traceback" not in failed.stderr
    listing = cli(config, "tenants", "list")
    assert "acme" in listing and "0 / 5,000" in listing
    key = cli(config, "keys", "issue", "acme", "--name", "ci").strip().splitlines()[-1]
    key_id = key.split("-", 2)[1]
    issued = cli(config, "keys", "issued")
    assert key_id in issued and "active" in issued and key.split("-", 2)[2] not in issued
    cli(config, "keys", "revoke", key_id)
    assert "revoked" in cli(config, "keys", "issued", "--tenant", "acme")


@pytest.mark.slow
def test_the_service_s_own_workers_stop_with_it(tmp_path):
    import psutil

    port = free_port()
    config = tmp_path / "service.yaml"
    config.write_text(yaml.safe_dump({"home": str(tmp_path / "home"), "port": port, "workers": 1,
                                      "serving": {"precision": "fp32", "kv_cache_tokens": 4096}}))
    service = subprocess.Popen(BUDWOOD + ["service", "--config", str(config)], stdout=subprocess.DEVNULL,
                               stderr=open(tmp_path / "service.log", "w"))
    try:
        wait_for_health(f"http://127.0.0.1:{port}", service, tmp_path / "service.log")
        workers = [p for p in psutil.Process(service.pid).children(recursive=True)
                   if "spawn_main" in " ".join(p.cmdline())]
        assert len(workers) == 1
        service.send_signal(signal.SIGTERM)
        service.wait(timeout=60)
        gone, alive = psutil.wait_procs(workers, timeout=20)
        assert not alive, "the worker outlived the service"
    finally:
        if service.poll() is None:
            service.kill()


@pytest.mark.slow
def test_a_killed_worker_is_restarted_and_its_job_still_finishes(tmp_path):
    """`workers: 1`: SIGKILL the only worker while it trains; `budwood service` starts another (its job's lease
    released at once), which takes the job over and finishes it, and /health counts the new worker."""
    port = free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    raw = json.loads(json.dumps(SERVICE_TEST_CONFIG))
    raw["training"]["checkpoint_every"] = 1
    raw["evaluation"] = {"suites": []}
    config = tmp_path / "service.yaml"
    config.write_text(yaml.safe_dump({**raw, "home": str(tmp_path / "home"), "port": port, "workers": 1}))
    cli(config, "tenants", "create", "acme")
    key = cli(config, "keys", "issue", "acme").strip().splitlines()[-1]
    rows = [{"messages": [{"role": "user", "content": f"What is item {i}?"},
                          {"role": "assistant", "content": f"Item {i} is a widget."}]} for i in range(12)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    service = subprocess.Popen(BUDWOOD + ["service", "--config", str(config)], env=env, stdout=subprocess.DEVNULL,
                               stderr=open(tmp_path / "service.log", "w"))
    try:
        base = f"http://127.0.0.1:{port}"
        wait_for_health(base, service, tmp_path / "service.log")
        client = OpenAI(base_url=f"{base}/v1", api_key=key, max_retries=0)
        train = upload(client, data)  # 11 examples train (one held out), batch 4: 3 steps
        job_id = client.fine_tuning.jobs.create(model="budwood-tiny", training_file=train.id, seed=1,
                                                hyperparameters={"n_epochs": 1, "batch_size": 4}).id
        from budwood.jobs.service import Service, load_service_config

        queue_service = Service(load_service_config(config))
        deadline = time.monotonic() + 180
        while (job := queue_service.queue.get_job(None, job_id)).status != "running":
            assert time.monotonic() < deadline and job.status in ("validating_files", "queued"), job.status
            time.sleep(0.05)
        victim = job.lease_owner
        os.kill(int(victim.split(":")[1]), signal.SIGKILL)
        deadline = time.monotonic() + 400
        while (job := queue_service.queue.get_job(None, job_id)).status not in ("succeeded", "failed", "cancelled"):
            assert time.monotonic() < deadline, job.status
            time.sleep(0.5)
        assert job.status == "succeeded", job.error
        assert job.lease_owner != victim  # another worker finished it
        messages = [e.message for e in client.fine_tuning.jobs.list_events(job_id, limit=100)]
        assert any(f"{victim} stopped responding" in m for m in messages), messages
        health = httpx.get(f"{base}/health", timeout=10).json()
        assert health["status"] == "ok" and health["workers"] == {"alive": 1, "expected": 1}, health
        assert health["queue"]["waiting"] == 0
        queue_service.close()
    finally:
        if service.poll() is None:
            service.send_signal(signal.SIGTERM)
        try:
            service.wait(timeout=60)
        except subprocess.TimeoutExpired:
            service.kill()
