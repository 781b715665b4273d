"""Preference fine-tuning through the hosted service, with the official openai client, as OpenAI's API does it:
a preference file uploaded, a DPO job run by a worker, its method echoed and its adapter measured on the
tenant's own data, never the demo company's."""
import json
import math
from pathlib import Path

import httpx
import openai
import pytest

from budwood.eval.results import load_results
from tests.conftest import live_service, upload


def _blob(live, job, path: str) -> Path:
    """A file of the job's published adapter, in the registry's blob store."""
    info = live.service.registry.version_info(f"acme/prefs-{job.id[6:14].lower()}@1.0.0")
    return live.service.registry.store.path(next(f.sha256 for f in info.files if f.path == path))


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    with live_service(tmp_path_factory.mktemp("service-dpo"), workers=1) as svc:
        yield svc


@pytest.fixture(scope="module")
def acme(live):
    return live.client(live.tenant("acme", max_concurrent_jobs=20))


@pytest.fixture(scope="module")
def finished(live, acme, preference_data):
    """A DPO job of acme's, with a validation file, run to its end."""
    train, valid = upload(acme, preference_data["train"]), upload(acme, preference_data["validation"])
    job = acme.fine_tuning.jobs.create(
        model="budwood-tiny", training_file=train.id, validation_file=valid.id, suffix="prefs", seed=5,
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 1, "batch_size": 16}}})
    assert job.status == "validating_files" and job.method.type == "dpo" and job.method.supervised is None
    assert job.method.dpo.hyperparameters.beta == 0.2 and job.method.dpo.hyperparameters.learning_rate_multiplier \
        == "auto"
    return live.wait(acme, job.id), train, valid


def test_a_dpo_job_trains_on_preference_pairs_and_echoes_its_method(live, acme, finished):
    job, train, _ = finished
    assert job.status == "succeeded", job.error
    assert acme.files.retrieve(train.id).purpose == "fine-tune"
    hp = job.method.dpo.hyperparameters  # resolved, as OpenAI answers once the files are validated
    assert (hp.beta, hp.n_epochs, hp.batch_size, hp.learning_rate_multiplier) == (0.2, 1, 16, 1.0)
    assert job.hyperparameters.batch_size == 16 and job.fine_tuned_model.startswith("ft:budwood-tiny:acme:prefs:")
    events = list(acme.fine_tuning.jobs.list_events(job.id, limit=100))
    steps = {e.data["step"]: e.data["train_loss"] for e in events if e.type == "metrics" and "train_loss" in e.data}
    assert sorted(steps) == [1, 2, 3, 4, 5]  # 78 pairs / batch 16
    assert steps[1] == pytest.approx(math.log(2), abs=1e-4)  # DPO's loss before the policy moves: ln 2
    training = json.loads(_blob(live, job, "budwood.json").read_text())["config"]["training"]
    assert training["method"] == "dpo" and training["dpo"]["beta"] == 0.2
    assert training["learning_rate"] == live.service.config.training.dpo_learning_rate
    reply = acme.chat.completions.create(model=job.fine_tuned_model, max_tokens=8, temperature=0,
                                         messages=[{"role": "user", "content": "Who founded Corvidworth?"}])
    assert reply.choices[0].message.content is not None


def test_the_adapter_is_measured_on_the_tenants_data_with_progress_in_the_events(live, acme, finished):
    job, *_ = finished
    messages = [e.message for e in acme.fine_tuning.jobs.list_events(job.id, limit=200)][::-1]
    start = next(i for i, m in enumerate(messages) if m.startswith("Evaluating on the tenant's data"))
    assert "22 held-out examples from the job's validation file" in messages[start]
    evaluated = next(i for i, m in enumerate(messages) if m.startswith("Evaluated: "))
    parts = [m for m in messages[start:evaluated] if m.startswith("Evaluating the adapter: ")]
    assert any(m.startswith("Evaluating the adapter: grounding: answers (") for m in parts)
    assert any(m.startswith("Evaluating the adapter: domain: answers (") for m in parts)
    results = load_results(_blob(live, job, "eval/adapted.json"))
    grounding, domain = results.suites["grounding"], results.suites["domain"]
    assert [d.path.rsplit("/", 1)[-1] for d in grounding.data] == ["questions.jsonl"]  # the job's, not the demo's
    assert [d.path.rsplit("/", 1)[-1] for d in domain.data] == ["held_out.jsonl"]
    assert grounding.metrics["answerable_correct"].n > 0 and grounding.metrics["unanswerable_abstained"].n > 0
    info = live.service.registry.version_info(f"acme/prefs-{job.id[6:14].lower()}@1.0.0")
    assert info.metrics["grounding.hallucination_rate"] == grounding.metrics["hallucination_rate"].value
    # and the leaderboard shows the reliability numbers with their intervals
    with httpx.Client(base_url=live.url) as browser:
        assert browser.post("/dashboard/login", data={"api_key": acme.api_key}).status_code == 303
        page = browser.get("/dashboard/leaderboard").text
    assert 'data-reliability="budwood-tiny"' in page and 'data-metric="unanswerable_abstained"' in page
    low, high = grounding.metrics["hallucination_rate"].ci
    assert f"[{low:.3f}, {high:.3f}]" in page


def test_bad_dpo_requests_are_refused_as_openai_does(live, acme, finished, company_data, preference_data):
    _, pairs, _ = finished
    chat = upload(acme, company_data["train"])
    cases = [({"training_file": chat.id}, "training_file", "invalid_training_file"),
             ({"method": {"type": "supervised"}}, "training_file", "invalid_training_file"),
             ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1, "gamma": 2}}}},
              "method.dpo.hyperparameters.gamma", "invalid_value"),
             ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": -0.5}}}},
              "method.dpo.hyperparameters.beta", "invalid_value"),
             ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}},
              "method.dpo.hyperparameters.beta", "invalid_value")]
    for change, param, code in cases:
        body = {"model": "budwood-tiny", "training_file": pairs.id, "method": {"type": "dpo"}, **change}
        with pytest.raises(openai.BadRequestError) as e:
            acme.fine_tuning.jobs.create(**body)
        assert (e.value.body["param"], e.value.body["code"]) == (param, code), (change, e.value.body)
    assert all(j.id == finished[0].id for j in acme.fine_tuning.jobs.list())  # nothing was created
