"""DPO through the fine-tuning API in process (no worker), the job's training config, a job's evaluation planned
on the tenant's own data, its progress in the job's events, and the leaderboard's reliability table."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from budwood.data.formats import Conversation, Message
from tests.conftest import preference_rows, service_config

CHAT = [{"messages": [{"role": "user", "content": f"Where is office {i}?"},
                      {"role": "assistant", "content": f"Office {i} is in building {i}."}]} for i in range(12)]


# -- the API --------------------------------------------------------------------------------------------------
@pytest.fixture
def api(tmp_path) -> Iterator[tuple[TestClient, dict]]:
    from budwood.jobs.service import Service
    from budwood.service_app import create_service_app

    service = Service(service_config(tmp_path / "home", quotas={"concurrent_jobs": 20}))
    try:
        service.tenants.create("acme")
        headers = {"Authorization": f"Bearer {service.tenants.issue_key('acme').key}"}
        yield TestClient(create_service_app(service), raise_server_exceptions=False), headers
    finally:
        service.close()


def _upload(client: TestClient, headers: dict, rows: list[dict], name: str) -> dict:
    data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    r = client.post("/v1/files", headers=headers, files={"file": (name, data)}, data={"purpose": "fine-tune"})
    assert r.status_code == 200, r.text
    return r.json()


def _refusal(client: TestClient, headers: dict, body: dict) -> dict:
    r = client.post("/v1/fine_tuning/jobs", headers=headers, json=body)
    assert r.status_code == 400, r.text
    return r.json()["error"]


def test_a_dpo_job_is_created_from_a_preference_file_and_echoes_its_method(api, tmp_path):
    client, headers = api
    chat = Path(tmp_path / "chat.jsonl")
    chat.write_text("".join(json.dumps(r) + "\n" for r in CHAT))
    pairs = _upload(client, headers, preference_rows(chat), "pairs.jsonl")
    assert pairs["status"] == "processed"
    body = {"model": "budwood-tiny", "training_file": pairs["id"],
            "method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.25, "n_epochs": 2}}}}
    job = client.post("/v1/fine_tuning/jobs", headers=headers, json=body).json()
    assert job["method"]["type"] == "dpo" and job["method"].get("supervised") is None
    assert job["method"]["dpo"]["hyperparameters"] == {"beta": 0.25, "n_epochs": 2, "batch_size": "auto",
                                                       "learning_rate_multiplier": "auto"}
    assert job["hyperparameters"] == {"n_epochs": 2, "batch_size": "auto", "learning_rate_multiplier": "auto"}
    default = client.post("/v1/fine_tuning/jobs", headers=headers,
                          json={**body, "method": {"type": "dpo"}}).json()
    assert default["method"]["dpo"]["hyperparameters"]["beta"] == "auto"
    supervised = _upload(client, headers, CHAT, "chat.jsonl")
    listed = client.get("/v1/fine_tuning/jobs", headers=headers).json()["data"]
    assert [j["method"]["type"] for j in listed] == ["dpo", "dpo"]
    # each file kind trains only its method, refused when the job is created, naming the file
    err = _refusal(client, headers, {**body, "training_file": supervised["id"]})
    assert (err["code"], err["param"]) == ("invalid_training_file", "training_file")
    assert supervised["id"] in err["message"] and "preference pairs" in err["message"]
    err = _refusal(client, headers, {**body, "validation_file": supervised["id"]})
    assert (err["code"], err["param"]) == ("invalid_validation_file", "validation_file")
    err = _refusal(client, headers, {"model": "budwood-tiny", "training_file": pairs["id"]})
    assert (err["code"], err["param"]) == ("invalid_training_file", "training_file")


@pytest.mark.parametrize(("method", "extra", "param", "text"), [
    ({"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}, {}, "method.dpo.hyperparameters.beta", "greater than 0"),
    ({"type": "dpo", "dpo": {"hyperparameters": {"beta": "high"}}}, {}, "method.dpo.hyperparameters.beta", "high"),
    ({"type": "dpo", "dpo": {"hyperparameters": {"gamma": 1}}}, {}, "method.dpo.hyperparameters.gamma",
     "Extra inputs"),
    ({"type": "dpo", "dpo": {"beta": 0.1}}, {}, "method.dpo.beta", "Extra inputs"),
    ({"type": "dpo", "supervised": {}}, {}, "method.supervised", "method.type is 'dpo'"),
    ({"type": "dpo"}, {"hyperparameters": {"n_epochs": 2}}, "hyperparameters", "method.dpo.hyperparameters"),
    ({"type": "reinforcement", "reinforcement": {}}, {}, "method.type", "supervised and dpo"),
])
def test_bad_dpo_requests_name_their_parameter(api, method, extra, param, text):
    client, headers = api
    pairs = _upload(client, headers, [{"prompt": "q", "chosen": "a", "rejected": "b"}], "pairs.jsonl")
    err = _refusal(client, headers, {"model": "budwood-tiny", "training_file": pairs["id"], "method": method, **extra})
    assert err["param"] == param and text in err["message"], err


def test_the_job_trains_with_its_method_and_holds_out_data_without_a_validation_file(tmp_path):
    from budwood.jobs.worker import train_config

    config = service_config(tmp_path)
    job = SimpleNamespace(model="budwood-tiny", seed=3, validation_file=None,
                          hyperparameters={"method": "dpo", "beta": 0.3, "batch_size": 4, "n_epochs": 2,
                                           "learning_rate_multiplier": 2.0})
    dpo = train_config(config, job, tmp_path / "data", tmp_path / "adapter", 40)
    assert dpo.training.method == "dpo" and dpo.training.dpo.beta == 0.3
    assert dpo.training.learning_rate == pytest.approx(2 * config.training.dpo_learning_rate)
    assert dpo.data.validation is None and dpo.data.validation_split == config.training.validation_split > 0
    auto = train_config(config, SimpleNamespace(**{**vars(job), "hyperparameters": {"method": "dpo", "beta": "auto"}}),
                        tmp_path / "data", tmp_path / "adapter", None)
    assert auto.training.dpo.beta == 0.1  # still "auto" (paused before validation): budwood's default
    sft = train_config(config, SimpleNamespace(**{**vars(job), "validation_file": "file-v",
                                                  "hyperparameters": {"batch_size": 4}}),
                       tmp_path / "data", tmp_path / "adapter", 40)
    assert sft.training.method == "sft" and sft.training.dpo is None
    assert sft.training.learning_rate == config.training.learning_rate and sft.data.validation_split == 0
    assert sft.data.validation == tmp_path / "data" / "validation.jsonl"


def test_the_service_config_refuses_to_point_a_suite_at_other_data(tmp_path):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="grounding.data: a job's adapter is measured on its tenant's data"):
        service_config(tmp_path, evaluation={"settings": {"grounding": {"data": "/srv/questions.jsonl"}}})


# -- the evaluation plan --------------------------------------------------------------------------------------
def _conversation(question: str, answer: str) -> Conversation:
    return Conversation([Message("user", question), Message("assistant", answer)])


def test_the_held_out_split_is_rebuilt_as_training_made_it(tmp_path, tiny_tokenizer):
    from budwood.config import load_config
    from budwood.jobs.evaluation import tenant_data
    from budwood.train.data import prepare_data

    rows = preference_rows(_write(tmp_path / "chat.jsonl", CHAT))
    train = _write(tmp_path / "pairs.jsonl", rows)
    config = load_config(None, [], base={"data": {"train": str(train), "validation_split": 0.25},
                                         "training": {"method": "dpo", "seed": 5}})
    prepared = prepare_data(config, tiny_tokenizer)
    data = tenant_data(config, {"data": prepared.fingerprints})
    assert len(data.held_out) == len(prepared.validation) == 3 and len(data.training) == 9
    held = {c.messages[-1].content for c in data.held_out}  # a pair's prompt and preferred answer
    assert held <= {r["preferred_output"][0]["content"] for r in rows}
    assert not held & {c.messages[-1].content for c in data.training}
    with pytest.raises(RuntimeError, match="differs from the one training made"):
        tenant_data(config, {"data": {"validation": {**prepared.fingerprints["validation"], "fingerprint": "x"}}})


def test_a_jobs_suites_read_the_tenants_data_or_are_left_out_with_a_reason(tmp_path, monkeypatch):
    from budwood.eval.data import Question, read_questions
    from budwood.jobs import evaluation
    from budwood.jobs.evaluation import TenantData, plan_evaluation

    monkeypatch.setattr(evaluation, "unanswerable_questions", lambda training, n, seed: [
        Question(f"Where is office {i + 100}?", None) for i in range(n)])
    held, training = [_conversation(f"Where is office {i}?", f"In building {i}.") for i in range(3)], \
        [_conversation("Who runs office 7?", "Ada.")]
    suites = ["domain", "grounding", "truthfulqa", "bias", "reproducibility"]
    plan = plan_evaluation(suites, {"grounding": {"abstain_phrases": ["no idea"]}, "max_tokens": 8},
                           TenantData(held, training, "the job's validation file"), tmp_path, seed=0)
    assert plan.suites == suites and plan.left_out == {}
    questions = read_questions(plan.settings["grounding"]["data"])
    assert [q.answerable for q in questions] == [True] * 3 + [False] * 3
    assert questions[0].question == "Where is office 0?" and questions[0].reference == "In building 0."
    assert plan.settings["grounding"]["abstain_phrases"] == ["no idea"] and plan.settings["max_tokens"] == 8
    for suite in plan.suites:  # never None: the demo company is nobody's default here
        if suite in evaluation.DATA_SETTINGS:
            assert Path(plan.settings[suite][evaluation.DATA_SETTINGS[suite]]).parent == tmp_path
    assert len(Path(plan.settings["domain"]["data"]).read_text().splitlines()) == 3
    bare = plan_evaluation(suites, {}, TenantData([], training, "no held-out data"), tmp_path / "bare", seed=0)
    assert bare.suites == ["truthfulqa"]
    assert set(bare.left_out) == {"domain", "grounding", "bias", "reproducibility"}
    assert all("no held-out data" in why for why in bare.left_out.values())
    assert not any(key in bare.settings.get(suite, {}) for suite, key in evaluation.DATA_SETTINGS.items())
    with_tools = plan_evaluation([*suites, "tools"], {}, TenantData(held, training, "the job's validation file"),
                                 tmp_path / "plain", seed=0)
    assert with_tools.suites == suites and "no held-out example offers tools" in with_tools.left_out["tools"]


def test_held_out_tool_examples_become_the_tools_suites_items(tmp_path, monkeypatch):
    from budwood.data.demo_tools import make_tool_dataset
    from budwood.data.formats import read_dataset
    from budwood.eval.tools import read_items
    from budwood.jobs import evaluation
    from budwood.jobs.evaluation import TenantData, plan_evaluation

    monkeypatch.setattr(evaluation, "unanswerable_questions", lambda training, n, seed: [])
    files = make_tool_dataset(tmp_path / "data")
    held = read_dataset(files["validation"]).conversations
    plan = plan_evaluation(["domain", "tools"], {}, TenantData(held, [], "the job's validation file"),
                           tmp_path / "eval", seed=0)
    assert plan.suites == ["tools"]  # every held-out example offers tools: the domain suite has nothing to score
    assert "every held-out example uses tools" in plan.left_out["domain"]
    items, _, left_out = read_items(plan.settings["tools"]["data"])
    assert len(items) == sum(1 for c in held if c.tools) and left_out == 0
    assert {i.category for i in items} >= {"simple", "irrelevance"}


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# -- progress ---------------------------------------------------------------------------------------------------
class Beat:
    def __init__(self):
        self.events: list[tuple[str, dict]] = []

    def emit(self, message: str, level=None, type_=None, data=None):
        self.events.append((message, data))


def test_evaluation_progress_reaches_the_jobs_events_at_a_bounded_rate():
    from budwood.jobs.heartbeat import JobEvalProgress

    now = [0.0]
    beat = Beat()
    progress = JobEvalProgress(beat, clock=lambda: now[0])
    progress.start("grounding: answers", 100)
    assert beat.events[-1][0] == "Evaluating the adapter: grounding: answers (100)"
    for _ in range(100):  # a quick part: its start only
        progress.advance(1)
    assert len(beat.events) == 1
    progress.side = "base"
    progress.start("formats: answers", 1000)
    for _ in range(100):  # 10 s a tenth: one event per tenth
        now[0] += 1.0
        progress.advance(10)
    reported = [d["evaluation"]["done"] for _, d in beat.events[2:]]
    assert reported == list(range(100, 1001, 100))
    assert beat.events[-1][0] == "Evaluating the base model: formats: answers: 1,000 of 1,000"
    progress.start("determinism (greedy): alone", 10)
    now[0] += 45.0  # a slow request: reported after 30 s although no further tenth is done
    progress.advance(0)
    assert beat.events[-1][1]["evaluation"] == {"side": "base", "part": "determinism (greedy): alone", "done": 0,
                                                "total": 10}


# -- the leaderboard --------------------------------------------------------------------------------------------
def test_the_leaderboard_shows_reliability_metrics_with_their_intervals():
    from budwood.web.views import leaderboard

    def version(id_: str, **metrics):
        return SimpleNamespace(id=id_, version="1.0.0", base_model="budwood-tiny", metrics=metrics)

    rows = [version("a/plain", **{"grounding.hallucination_rate": 0.5, "grounding.answerable_correct": 0.4}),
            version("a/reliable", **{"grounding.hallucination_rate": 0.2, "grounding.answerable_correct": 0.38,
                                     "bias.counterfactual_changed": 0.05}),
            version("a/bare")]
    intervals = {("a/reliable", "1.0.0"): {"grounding.hallucination_rate": (0.1, 0.31)}}
    board = leaderboard(rows, "hallucination_rate", "asc", intervals)
    table = board["reliability"]["budwood-tiny"]
    assert [c.key for c in table["columns"]] == ["hallucination_rate", "answerable_correct", "counterfactual_changed"]
    cells = {v.id: cells for v, cells in table["rows"]}
    assert [v.id for v, _ in table["rows"]] == ["a/reliable", "a/plain", "a/bare"]  # the leaderboard's order
    assert cells["a/reliable"][0] == ("0.200", "[0.100, 0.310]") and cells["a/plain"][0] == ("0.500", "")
    assert cells["a/bare"] == [("—", "")] * 3
    assert leaderboard(rows, "hallucination_rate", "asc")["reliability"] == {}
