"""What one tenant of a live service can learn of another or of the server (one live service, no worker: every
test is quick): no server paths, no other tenant's model names or private adapters, quotas that pause cannot dodge."""
import httpx
import openai
import pytest

from tests.conftest import live_service, make_random_adapter, upload, write_jsonl


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    with live_service(tmp_path_factory.mktemp("service"), workers=0) as svc:
        yield svc


def test_a_refused_upload_does_not_name_server_paths(live, tmp_path):
    """validate_upload() answers with str(issue), whose file is the upload's scratch copy under
    HOME/tmp/tmpXXXX/: every invalid upload tells the client where the service keeps its data."""
    client = live.client(live.tenant("pathco"))
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": [{"role": "asistant", "content": "x"}]}])
    with pytest.raises(openai.BadRequestError) as e:
        upload(client, bad)
    message = e.value.body["message"]
    assert "bad.jsonl:1: unknown_role" in message
    home = str(live.service.config.home.expanduser())
    assert home not in message and "/tmp" not in message, message


def _succeeded_job_with_checkpoint(live, tenant: str, suffix: str, tmp_path):
    """A job of `tenant` that succeeded, with a servable checkpoint at step 5 (as a worker leaves it)."""
    q = live.service.queue
    q.add_file(tenant, "file-" + "c" * 24, "t.jsonl", "fine-tune", 10, "0" * 64, "openai", 10, lambda: None)
    job, _ = q.create_job(tenant, {"model": "budwood-tiny", "training_file": "file-" + "c" * 24,
                                   "validation_file": None, "suffix": suffix, "seed": 1, "meta": None,
                                   "hyperparameters": {"n_epochs": 1}}, None, "h")
    while True:  # other tests' waiting jobs may come first
        claimed, lease = q.claim("w", lease_s=60, max_attempts=3)
        if claimed.id == job.id:
            break
    q.set_hyperparameters(lease, {"n_epochs": 1, "batch_size": 1, "learning_rate_multiplier": 1.0}, 10)
    q.start(lease, None)
    q.add_checkpoint(lease, 5, {"train_loss": 1.0}, False)
    from budwood.jobs.protocol import fine_tuned_model

    model = fine_tuned_model(job)
    make_random_adapter(live.service.storage.checkpoint_dir(job.id, 5), seed=3, r=4)
    assert q.finish(lease, "succeeded", "done", fine_tuned_model=model, registry_ref=f"{tenant}/x@1.0.0")
    return model


def test_metrics_do_not_tell_anyone_a_tenants_model_names(live, tmp_path):
    """/metrics needs no key (AuthMiddleware guards /v1/ only) and labels every request by the model
    name the client asked for: anyone who reaches the port reads every tenant's ft: model names
    (tenant, suffix, job id) and how much each is used."""
    key = live.tenant("secretive")
    model = _succeeded_job_with_checkpoint(live, "secretive", "merger-talks", tmp_path)
    client = live.client(key)
    reply = client.chat.completions.create(model=f"{model}:ckpt-step-5", max_tokens=2,
                                           messages=[{"role": "user", "content": "hi"}])
    assert reply.choices
    anonymous = httpx.get(f"{live.url}/metrics")
    assert anonymous.status_code == 401 or "merger-talks" not in anonymous.text, \
        [line for line in anonymous.text.splitlines() if "merger-talks" in line][:2]


def test_a_job_paused_while_validating_reports_concrete_hyperparameters_after_resume(live, tmp_path,
                                                                                      company_data):
    """Through the API: pause a job that is still validating_files, resume it, and it is `queued` with
    "auto" hyperparameters (a worker will skip validation and train with its fallbacks)."""
    client = live.client(live.tenant("pauser"))
    train = upload(client, company_data["train"])
    job = client.fine_tuning.jobs.create(model="budwood-tiny", training_file=train.id)
    assert job.status == "validating_files"
    assert client.fine_tuning.jobs.pause(job.id).status == "paused"
    resumed = client.fine_tuning.jobs.resume(job.id)
    assert resumed.status == "validating_files" or resumed.hyperparameters.batch_size != "auto", \
        (resumed.status, resumed.hyperparameters)


def test_pausing_is_not_a_way_around_the_concurrent_jobs_limit(live, company_data):
    client = live.client(live.tenant("sneaky", max_concurrent_jobs=1))
    train = upload(client, company_data["train"])
    jobs = []
    for _ in range(3):
        job = client.fine_tuning.jobs.create(model="budwood-tiny", training_file=train.id)
        client.fine_tuning.jobs.pause(job.id)
        jobs.append(job)
    resumed = 0
    for job in jobs:
        try:
            client.fine_tuning.jobs.resume(job.id)
            resumed += 1
        except openai.RateLimitError:
            pass
    assert resumed <= 1, f"{resumed} jobs waiting for workers at once under a limit of 1"


def _publish_private(live, ref: str, folder):
    import json

    from budwood.models.fingerprint import model_fingerprint

    make_random_adapter(folder, seed=5, r=4)
    (folder / "README.md").unlink(missing_ok=True)
    (folder / "budwood.json").write_text(json.dumps({
        "budwood_version": "0.1.0", "created": "2026-11-01T00:00:00Z",
        "base_model": {"name": "budwood-tiny", "fingerprint": model_fingerprint("budwood-tiny")}}))
    live.service.registry.publish(folder, ref, "MIT", private=True)


def test_model_not_found_does_not_suggest_another_tenants_private_adapters(live, tmp_path):
    """RegistryResolver.names() lists every registry id this server has pulled, private ones too, and the
    engine's UnknownAdapter message suggests the closest of them (did_you_mean): once acme has used its
    private adapter, any tenant asking for a name like 'acme/a@1.0.0' is told its real name."""
    acme = live.client(live.tenant("hushco"))
    _publish_private(live, "hushco/secret-merger@1.0.0", tmp_path / "adapter")
    acme.chat.completions.create(model="hushco/secret-merger@1.0.0", max_tokens=2,
                                 messages=[{"role": "user", "content": "hi"}])
    other = live.client(live.tenant("nosyco"))
    with pytest.raises(openai.NotFoundError) as e:
        other.chat.completions.create(model="hushco/a@1.0.0", max_tokens=2,
                                      messages=[{"role": "user", "content": "hi"}])
    assert "secret-merger" not in e.value.body["message"], e.value.body["message"]


def test_another_tenants_private_adapter_is_answered_exactly_as_one_that_does_not_exist(live, tmp_path):
    """resolve() answers a hidden registry id with "does not exist or you do not have access to it", and an
    id that does not exist with the engine's "does not exist." (plus suggestions): the two messages tell a
    tenant which of another tenant's private adapters (and versions) exist."""
    _publish_private(live, "quietco/roadmap@1.0.0", tmp_path / "adapter")
    other = live.client(live.tenant("probeco"))

    def message(model):
        with pytest.raises(openai.NotFoundError) as e:
            other.chat.completions.create(model=model, max_tokens=2, messages=[{"role": "user", "content": "hi"}])
        return e.value.body["message"].replace(model, "MODEL")

    assert message("quietco/roadmap@1.0.0") == message("quietco/zzzzzzzzzzzzzzzzzzzzzz@1.0.0")


def test_registry_blob_uploads_count_against_the_tenants_storage_quota(live):
    """PUT /v1/registry/blobs/{digest} is open to every tenant (may_write(None) is True) and stores any
    bytes, up to 64 GiB a request, counted by no quota and never collected if no version names them:
    a tenant whose storage quota is 1 kB stores megabytes."""
    import hashlib
    import os

    key = live.tenant("hoarder", max_storage_bytes=1000)
    stored = 0
    for _ in range(3):
        data = os.urandom(1 << 20)
        r = httpx.put(f"{live.url}/v1/registry/blobs/{hashlib.sha256(data).hexdigest()}", content=data,
                      headers={"Authorization": f"Bearer {key}"})
        if r.status_code == 201:
            stored += len(data)
    assert stored <= 1000, f"a tenant with a 1,000-byte quota stored {stored:,} bytes of blobs"


def test_a_tenant_can_use_its_own_job_adapter_by_its_registry_id(live, tmp_path):
    """Job adapters are published with the service's terms (requires_acceptance); RegistryResolver pulls
    without accepting them, so the owner asking for `<tenant>/<suffix>-<id>@1.0.0` gets 400 "must be
    accepted first: run budwood pull ... on the server" (unless its ft: name was served first)."""
    import json

    from budwood.models.fingerprint import model_fingerprint

    client = live.client(live.tenant("ownco"))
    folder = make_random_adapter(tmp_path / "adapter", seed=6, r=4)
    (folder / "README.md").unlink(missing_ok=True)
    (folder / "budwood.json").write_text(json.dumps({
        "budwood_version": "0.1.0", "created": "2026-11-01T00:00:00Z",
        "base_model": {"name": "budwood-tiny", "fingerprint": model_fingerprint("budwood-tiny")}}))
    config = live.service.config
    live.service.registry.publish(folder, "ownco/support-abcd1234@1.0.0", config.adapter_license,
                                  terms=config.adapter_terms, private=True, publisher="budwood service")
    reply = client.chat.completions.create(model="ownco/support-abcd1234@1.0.0", max_tokens=2,
                                           messages=[{"role": "user", "content": "hi"}])
    assert reply.choices
