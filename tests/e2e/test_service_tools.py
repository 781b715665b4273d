"""The hosted service on tool data: a job trains on OpenAI's fine-tuning format with tools, is measured by the
tools suite on its own held-out examples, and its ft: model serves tool calls through the openai client."""
import json

import pytest

from budwood.data.demo_tools import make_tool_dataset
from tests.conftest import live_service, upload

TRAIN_ROWS = 48  # of the demo's examples: a short job (that an adapter learns to call is tests/e2e/test_tools_e2e.py's)


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    files = make_tool_dataset(tmp_path_factory.mktemp("tools"), seed=0)
    rows = files["train"].read_text().splitlines()
    files["train"].write_text("\n".join(rows[::len(rows) // TRAIN_ROWS][:TRAIN_ROWS]) + "\n")
    evaluation = {"suites": ["domain", "tools"], "limit": 16, "compare_base": False,
                  "settings": {"max_tokens": 96, "bootstrap": 20}}
    with live_service(tmp_path_factory.mktemp("service"), workers=1, evaluation=evaluation) as live:
        client = live.client(live.tenant("shop"))
        train, valid = upload(client, files["train"]), upload(client, files["validation"])
        created = client.fine_tuning.jobs.create(
            model="budwood-tiny", training_file=train.id, validation_file=valid.id, suffix="tools", seed=3,
            method={"type": "supervised", "supervised": {"hyperparameters": {
                "n_epochs": 1, "batch_size": 8, "learning_rate_multiplier": 3.0}}})
        done = live.wait(client, created.id, timeout=900)
        yield live, client, done, files


def _held_out(files, category_test) -> list[dict]:
    rows = [json.loads(line) for line in files["validation"].read_text().splitlines()]
    return [r for r in rows if category_test(r)]


def test_a_job_on_tool_data_is_measured_on_its_own_tool_examples(job):
    live, client, done, _ = job
    assert done.status == "succeeded", done.error
    events = [e.message for e in client.fine_tuning.jobs.list_events(done.id, limit=100)]
    assert any("held-out examples that offer tools" in m for m in events), events
    info = live.service.registry.version_info(f"shop/tools-{done.id[6:14].lower()}@1.0.0")
    assert {"tools.ast_match", "tools.accuracy", "tools.irrelevance"} <= set(info.metrics)


def test_the_ft_model_serves_tool_calls(job):
    _, client, done, files = job
    rows = _held_out(files, lambda r: r["messages"][-1].get("tool_calls"))
    row = rows[0]
    prompt = [m for m in row["messages"][:-1]]
    names = {t["function"]["name"] for t in row["tools"]}
    forced = client.chat.completions.create(model=done.fine_tuned_model, messages=prompt, tools=row["tools"],
                                            tool_choice="required", parallel_tool_calls=False, max_tokens=96,
                                            temperature=0)
    call = forced.choices[0].message.tool_calls[0]
    assert call.function.name in names and isinstance(json.loads(call.function.arguments), dict)
    assert forced.choices[0].finish_reason == "tool_calls"
    # unforced (tool_choice auto), streamed: whatever it writes comes back as text or as calls, finish_reason to match
    chunks = list(client.chat.completions.create(model=done.fine_tuned_model, messages=prompt, tools=row["tools"],
                                                 max_tokens=64, temperature=0, stream=True))
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    called = any(c.choices[0].delta.tool_calls for c in chunks if c.choices)
    assert len(finish) == 1 and finish[0] in (("tool_calls", "length") if called else ("stop", "length"))
