"""The fine-tuning service through the official openai client, against a live server and real workers."""
import json
import pickle

import httpx
import openai
import pytest

from tests.conftest import live_service, pg_schema, upload, write_jsonl


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def live(request, tmp_path_factory):
    home = tmp_path_factory.mktemp("service")
    if request.param == "sqlite":
        with live_service(home, workers=1) as svc:
            yield svc
    else:
        with pg_schema() as url, live_service(home, url, workers=1) as svc:
            yield svc


@pytest.fixture(scope="module")
def acme(live):
    return live.client(live.tenant("acme", max_concurrent_jobs=20))


@pytest.fixture(scope="module")
def finished(live, acme, company_data):
    """One job of acme's, run to success with a validation file, a suffix and metadata."""
    train, valid = upload(acme, company_data["train"]), upload(acme, company_data["validation"])
    job = acme.fine_tuning.jobs.create(
        model="budwood-tiny", training_file=train.id, validation_file=valid.id, suffix="support", seed=11,
        metadata={"team": "support"},
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 8}}})
    assert job.status == "validating_files" and job.hyperparameters.n_epochs == 1
    return live.wait(acme, job.id), train, valid


def test_a_job_runs_to_a_served_evaluated_signed_adapter(live, acme, finished):
    job, train, valid = finished
    assert job.status == "succeeded", job.error
    assert job.fine_tuned_model == f"ft:budwood-tiny:acme:support:{job.id[6:14].lower()}"
    assert job.trained_tokens > 0 and job.finished_at >= job.created_at
    # trained_tokens as OpenAI bills them: every token of every example (prompts too), not only the answers
    assert job.trained_tokens > job.model_extra["trained_assistant_tokens"] > 0
    assert job.hyperparameters.batch_size == 8 and job.hyperparameters.learning_rate_multiplier == 1.0
    assert job.organization_id == "acme" and job.seed == 11 and job.metadata == {"team": "support"}
    # the fine-tuned model answers at once, by its ft: name, and is listed for its owner
    reply = acme.chat.completions.create(model=job.fine_tuned_model, max_tokens=12, temperature=0,
                                         messages=[{"role": "user", "content": "Who is the CEO of Corvidworth?"}])
    assert reply.choices[0].message.content and reply.model == job.fine_tuned_model
    assert job.fine_tuned_model in [m.id for m in acme.models.list()]
    # events: newest first, paginated, in OpenAI's shape; the whole story is there, once
    events = list(acme.fine_tuning.jobs.list_events(job.id, limit=7))  # the client follows `after`
    messages = [e.message for e in events]
    assert messages[0] == "The job has successfully completed" and messages[-1].startswith("Created fine-tuning job")
    assert messages.count("The job has successfully completed") == 1
    assert [e.created_at for e in events] == sorted((e.created_at for e in events), reverse=True)
    steps = [e.data["step"] for e in events if e.type == "metrics" and "valid_loss" not in e.data]
    assert sorted(steps) == list(range(1, 11))  # 78 examples / batch 8 = 10 steps, one event each
    assert any("validation loss" in m for m in messages)
    assert all(e.data["train_loss"] > 0 for e in events if e.type == "metrics" and "valid_loss" in e.data)
    # checkpoints every 5 steps and at the end, newest first, with their metrics and model names
    ckpts = list(acme.fine_tuning.jobs.checkpoints.list(job.id))
    assert [c.step_number for c in ckpts] == [10, 5]
    assert ckpts[0].fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-10"
    assert ckpts[0].metrics.train_loss > 0 and ckpts[0].metrics.valid_loss > 0
    early = acme.chat.completions.create(model=ckpts[1].fine_tuned_model_checkpoint, max_tokens=4,
                                         messages=[{"role": "user", "content": "Hello"}])
    assert early.choices[0].message.content is not None
    # the results file: OpenAI's per-step CSV, one of the tenant's files
    results = acme.files.retrieve(job.result_files[0])
    assert results.purpose == "fine-tune-results"
    csv = acme.files.content(results.id).text.splitlines()
    assert csv[0] == "step,train_loss,train_accuracy,valid_loss" and len(csv) == 11
    # evaluated, carded, signed by the service and published privately in the tenant's namespace
    info = live.service.registry.version_info(f"acme/support-{job.id[6:14].lower()}@1.0.0")
    assert info.private and info.signer and info.publisher == "budwood service"
    assert {"domain.exact_match", "grounding.hallucination_rate"} <= set(info.metrics)
    assert {"README.md", "attestation.json", "eval/adapted.json"} <= {f.path for f in info.files}


def test_jobs_list_and_retrieve_with_pagination_and_metadata(live, acme, finished, company_data):
    job, train, _ = finished
    second = acme.fine_tuning.jobs.create(model="budwood-tiny", training_file=train.id,
                                          hyperparameters={"n_epochs": 1, "batch_size": 16})
    assert acme.fine_tuning.jobs.retrieve(second.id).id == second.id
    first_page = acme.fine_tuning.jobs.list(limit=1)
    assert [j.id for j in first_page.data] == [second.id] and first_page.has_more
    assert [j.id for j in acme.fine_tuning.jobs.list(limit=1, after=second.id).data] == [job.id]
    assert [j.id for j in acme.fine_tuning.jobs.list(metadata={"team": "support"})] == [job.id]
    done = live.wait(acme, second.id)
    assert done.status == "succeeded" and done.fine_tuned_model.startswith("ft:budwood-tiny:acme::")
    assert done.validation_file is None


def test_the_events_stream_live_until_the_job_ends(live, acme, finished, company_data):
    _, train, _ = finished
    job = acme.fine_tuning.jobs.create(model="budwood-tiny", training_file=train.id,
                                       hyperparameters={"n_epochs": 1, "batch_size": 16})
    seen = []
    with httpx.stream("GET", f"{live.url}/v1/fine_tuning/jobs/{job.id}/events", params={"stream": "true"},
                      headers={"Authorization": f"Bearer {acme.api_key}"}, timeout=240) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data: "):
                if line == "data: [DONE]":
                    break
                seen.append(json.loads(line[6:]))
    messages = [e["message"] for e in seen]
    assert messages[0].startswith("Created fine-tuning job") and messages[-1] == "The job has successfully completed"
    assert any(e["type"] == "metrics" for e in seen)
    assert len({e["id"] for e in seen}) == len(seen)  # each event once


def test_tenants_never_see_each_others_files_jobs_checkpoints_or_models(live, acme, finished):
    job, train, _ = finished
    other = live.client(live.tenant("globex"))
    not_found = openai.NotFoundError
    for call in (lambda: other.files.retrieve(train.id), lambda: other.files.content(train.id),
                 lambda: other.files.delete(train.id), lambda: other.fine_tuning.jobs.retrieve(job.id),
                 lambda: other.fine_tuning.jobs.cancel(job.id), lambda: other.fine_tuning.jobs.pause(job.id),
                 lambda: other.fine_tuning.jobs.list_events(job.id),
                 lambda: other.fine_tuning.jobs.checkpoints.list(job.id),
                 lambda: other.chat.completions.create(model=job.fine_tuned_model,
                                                       messages=[{"role": "user", "content": "hi"}]),
                 lambda: other.chat.completions.create(model=f"{job.fine_tuned_model}:ckpt-step-5",
                                                       messages=[{"role": "user", "content": "hi"}])):
        with pytest.raises(not_found):
            call()
    assert list(other.files.list()) == [] and list(other.fine_tuning.jobs.list()) == []
    assert job.fine_tuned_model not in [m.id for m in other.models.list()]
    with pytest.raises(openai.BadRequestError, match="does not exist"):  # nor use its files in a job
        other.fine_tuning.jobs.create(model="budwood-tiny", training_file=train.id)
    ref = f"acme/support-{job.id[6:14].lower()}"
    headers = {"Authorization": f"Bearer {other.api_key}"}
    assert httpx.get(f"{live.url}/v1/registry/adapters/{ref}", headers=headers).status_code == 404
    mine = httpx.get(f"{live.url}/v1/registry/adapters/{ref}", headers={"Authorization": f"Bearer {acme.api_key}"})
    assert mine.status_code == 200 and mine.json()["private"]
    with pytest.raises(not_found):  # the registry id, too, is the owner's only
        other.chat.completions.create(model=f"{ref}@1.0.0", messages=[{"role": "user", "content": "hi"}])
    # and tenants publish nothing themselves (their adapters come from their jobs), nor store blobs
    manifest = {"id": "acme/planted", "license": "MIT", "files": []}
    r = httpx.post(f"{live.url}/v1/registry/adapters/acme/planted/versions", json=manifest, headers=headers)
    assert r.status_code == 403 and "its adapters are published by its fine-tuning jobs" in r.json()["error"]["message"]
    blob = httpx.put(f"{live.url}/v1/registry/blobs/{'0' * 64}", content=b"x", headers=headers)
    assert blob.status_code == 403


def test_uploads_are_checked_before_anything_is_stored(live, acme, tmp_path, company_data):
    bad = write_jsonl(tmp_path / "bad.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
        {"messages": [{"role": "asistant", "content": "x"}]}, "{not json"])
    with pytest.raises(openai.BadRequestError) as e:
        upload(acme, bad)
    err = e.value.body
    assert err["code"] == "invalid_file" and err["param"] == "file"
    assert "bad.jsonl:2: unknown_role" in err["message"] and "bad.jsonl:3: invalid_json" in err["message"]
    pickled = tmp_path / "weights.jsonl"
    pickled.write_bytes(pickle.dumps({"a": 1}))  # never unpickled: it is not JSONL text, so refused
    with pytest.raises(openai.BadRequestError, match="invalid_encoding|invalid_json"):
        upload(acme, pickled)
    with pytest.raises(openai.BadRequestError, match="purpose 'batch' is not supported"):
        acme.files.create(file=open(company_data["train"], "rb"), purpose="batch")
    assert [f.filename for f in acme.files.list()].count("bad.jsonl") == 0
    # deleting: gone for good, and a file a job still needs cannot be deleted
    tmp = upload(acme, company_data["validation"])
    assert acme.files.delete(tmp.id).deleted
    with pytest.raises(openai.NotFoundError):
        acme.files.retrieve(tmp.id)


def test_size_and_storage_limits_are_clear_errors(live, company_data, tmp_path):
    small = live.client(live.tenant("smallco", max_storage_bytes=25_000))
    upload(small, company_data["train"])  # 17 kB
    with pytest.raises(openai.RateLimitError, match="storage quota exceeded") as e:
        upload(small, company_data["train"])
    assert e.value.body["code"] == "storage_quota_exceeded"
    big = tmp_path / "big.jsonl"
    line = json.dumps({"prompt": "x" * 1000, "completion": "y"}) + "\n"
    big.write_text(line * (live.service.config.quotas.file_bytes // len(line) + 100))
    with pytest.raises(openai.APIStatusError) as e:
        upload(small, big)
    assert e.value.status_code == 413 and e.value.body["code"] == "file_too_large"


def test_bad_job_requests_are_refused_with_the_parameter_named(live, acme, finished):
    _, train, _ = finished
    cases = [({"model": "gpt-4o-mini"}, "model", "not available for fine-tuning"),
             ({"training_file": "file-doesnotexist"}, "training_file", "does not exist"),
             ({"validation_file": "file-doesnotexist"}, "validation_file", "does not exist"),
             ({"suffix": "bad suffix!"}, "suffix", "letters, digits"),
             ({"method": {"type": "reinforcement", "reinforcement": {}}}, "method.type", "supervised and dpo"),
             ({"method": {"type": "dpo"}}, "training_file", "method 'dpo' needs preference pairs"),
             ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs", "greater than or equal to 1"),
             ({"integrations": [{"type": "wandb", "wandb": {"project": "a/b"}}]}, "integrations.0.wandb.project",
              "cannot contain /"),
             ({"metadata": {f"k{i}": "v" for i in range(17)}}, "metadata", "at most 16 keys")]
    for change, param, text in cases:
        body = {"model": "budwood-tiny", "training_file": train.id, **change}
        with pytest.raises(openai.BadRequestError) as e:
            acme.fine_tuning.jobs.create(**body)
        assert e.value.body["param"] == param and text in e.value.body["message"], (change, e.value.body)
    results_file = acme.fine_tuning.jobs.retrieve(finished[0].id).result_files[0]
    with pytest.raises(openai.BadRequestError, match="purpose 'fine-tune-results'"):
        acme.fine_tuning.jobs.create(model="budwood-tiny", training_file=results_file)


def test_keys_are_required_checked_and_revocable(live):
    key = live.tenant("initech")
    anonymous = httpx.get(f"{live.url}/v1/fine_tuning/jobs")
    assert anonymous.status_code == 401 and anonymous.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        live.client(key[:-2] + "xx").fine_tuning.jobs.list()
    assert list(live.client(key).fine_tuning.jobs.list()) == []
    live.service.tenants.revoke_key(key.split("-")[1])
    import time

    time.sleep(live.service.config.key_cache_s + 0.1)  # how long a server trusts a key it checked
    with pytest.raises(openai.AuthenticationError):
        live.client(key).fine_tuning.jobs.list()


def test_idempotency_key_gives_back_the_same_job(live, acme, finished):
    _, train, _ = finished
    body = {"model": "budwood-tiny", "training_file": train.id, "hyperparameters": {"n_epochs": 1, "batch_size": 16}}
    first = acme.fine_tuning.jobs.create(**body, extra_headers={"Idempotency-Key": "retry-1"})
    again = acme.fine_tuning.jobs.create(**body, extra_headers={"Idempotency-Key": "retry-1"})
    assert again.id == first.id
    with pytest.raises(openai.ConflictError):
        acme.fine_tuning.jobs.create(**{**body, "seed": 3}, extra_headers={"Idempotency-Key": "retry-1"})
    assert live.wait(acme, first.id).status == "succeeded"


def test_a_file_that_cannot_be_trained_on_fails_the_job_naming_it(live, acme, tmp_path):
    few = write_jsonl(tmp_path / "few.jsonl", [{"prompt": f"q{i}", "completion": f"a{i}"} for i in range(3)])
    f = upload(acme, few)
    job = acme.fine_tuning.jobs.create(model="budwood-tiny", training_file=f.id)
    failed = live.wait(acme, job.id)
    assert failed.status == "failed" and failed.error.code == "invalid_training_file"
    assert failed.error.param == "training_file" and f.id in failed.error.message
    assert "tmp" not in failed.error.message  # no worker paths leak out


def wait_for_step(live, client, job_id: str, step: int, timeout: float = 120) -> None:
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = live.service.queue.get_job(None, job_id)
        if (job.progress or {}).get("step", 0) >= step:
            return
        assert job.status not in ("succeeded", "failed", "cancelled"), job.status
        time.sleep(0.1)
    raise AssertionError(f"{job_id} did not reach step {step}")


def test_cancel_reaches_a_running_job_within_seconds(live, acme, finished):
    import time

    _, train, _ = finished
    job = acme.fine_tuning.jobs.create(model="budwood-tiny", training_file=train.id,
                                       hyperparameters={"n_epochs": 50, "batch_size": 8})
    wait_for_step(live, acme, job.id, 3)
    assert acme.fine_tuning.jobs.retrieve(job.id).estimated_finish > time.time()
    t0 = time.monotonic()
    assert acme.fine_tuning.jobs.cancel(job.id).status == "cancelled"
    while not any(e.message.startswith("Training stopped") for e in acme.fine_tuning.jobs.list_events(job.id)):
        assert time.monotonic() - t0 < 10, "the worker did not stop within 10 s"
        time.sleep(0.1)
    stopped = next(e for e in acme.fine_tuning.jobs.list_events(job.id) if e.message.startswith("Training stopped"))
    events = acme.fine_tuning.jobs.list_events(job.id, limit=1000)
    last_step = max(e.data["step"] for e in events if e.type == "metrics")
    assert f"at step {last_step}" in stopped.message and last_step < 500
    final = acme.fine_tuning.jobs.retrieve(job.id)
    assert final.status == "cancelled" and final.fine_tuned_model is None
    with pytest.raises(openai.BadRequestError, match="already cancelled"):
        acme.fine_tuning.jobs.cancel(job.id)


def test_a_paused_job_resumes_to_the_adapter_an_uninterrupted_run_makes(live, acme, finished):
    _, train, _ = finished
    body = {"model": "budwood-tiny", "training_file": train.id, "seed": 5,
            "hyperparameters": {"n_epochs": 2, "batch_size": 8}}
    paused = acme.fine_tuning.jobs.create(**body, suffix="paused")
    wait_for_step(live, acme, paused.id, 7)
    assert acme.fine_tuning.jobs.pause(paused.id).status == "pausing"
    assert live.wait(acme, paused.id, ("paused",), timeout=30).status == "paused"
    with pytest.raises(openai.ConflictError, match="has not finished"):  # its data stays while it may resume
        acme.files.delete(train.id)
    step = max(c.step_number for c in acme.fine_tuning.jobs.checkpoints.list(paused.id))
    assert 7 <= step < 20
    assert acme.fine_tuning.jobs.resume(paused.id).status == "queued"
    straight = acme.fine_tuning.jobs.create(**body, suffix="straight")
    a, b = live.wait(acme, paused.id), live.wait(acme, straight.id)
    assert a.status == b.status == "succeeded"
    assert any(f"resumed from its checkpoint at step {step}" in e.message
               for e in acme.fine_tuning.jobs.list_events(paused.id, limit=100))
    reg = live.service.registry
    assert reg.version_info(f"acme/paused-{a.id[6:14].lower()}@1.0.0").adapter_fingerprint == \
        reg.version_info(f"acme/straight-{b.id[6:14].lower()}@1.0.0").adapter_fingerprint


def test_a_worker_shutting_down_gives_its_job_back_to_continue_elsewhere(tmp_path, company_data):
    import threading

    from budwood.jobs.worker import run_worker

    with live_service(tmp_path, workers=0) as live:
        client = live.client(live.tenant("acme"))
        train = upload(client, company_data["train"])
        job = client.fine_tuning.jobs.create(model="budwood-tiny", training_file=train.id,
                                             hyperparameters={"n_epochs": 2, "batch_size": 8})
        first = threading.Event()
        thread = threading.Thread(target=run_worker, args=(live.service.config, "leaving", first))
        thread.start()
        wait_for_step(live, client, job.id, 6)
        first.set()  # what SIGTERM does
        thread.join(timeout=60)
        back = client.fine_tuning.jobs.retrieve(job.id)
        assert back.status == "queued" and not thread.is_alive()
        assert any("leaving shut down at step" in e.message for e in client.fine_tuning.jobs.list_events(job.id))
        second = threading.Event()
        thread = threading.Thread(target=run_worker, args=(live.service.config, "arriving", second))
        thread.start()
        try:
            done = live.wait(client, job.id)
        finally:
            second.set()
            thread.join(timeout=60)
        assert done.status == "succeeded"
        events = [e.message for e in client.fine_tuning.jobs.list_events(job.id, limit=100)]
        assert any("resumed from its checkpoint at step" in m for m in events)
