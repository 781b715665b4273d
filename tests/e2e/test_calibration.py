"""Calibrated abstention end to end: an adapter trained quickly on the demo company's data (the demo's
settings, fewer epochs), calibrated on its validation split, then held to the threshold by `budwood eval`
(the grounding suite with and without calibrated_abstention, on the same adapter) and by `budwood serve`
(the request field, through the openai client), and `budwood calibrate` on an adapter that exists.

One training, one calibration, two evaluations and one server for the module.
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from conftest import running
from typer.testing import CliRunner

from budwood.config import TrainConfig, load_config
from budwood.engine import Engine, EngineConfig
from budwood.errors import BudwoodError
from budwood.eval.calibration import CALIBRATION_FILE, calibrate_adapter, read_calibration
from budwood.eval.results import EvalResults
from budwood.eval.run import EvalConfig, run_eval
from budwood.pipeline import DEMO_OVERRIDES
from budwood.serve.app import create_app

NAME = "company"  # the adapter's name on the server


@pytest.fixture(scope="module")
def trained(company_data, tmp_path_factory) -> tuple[Path, TrainConfig]:
    from budwood.train.recipe import train

    root = tmp_path_factory.mktemp("calibration")
    config = load_config(None, DEMO_OVERRIDES + [
        f"data.train={company_data['train']}", f"data.validation={company_data['validation']}",
        f"output_dir={root / 'adapters' / NAME}", "training.epochs=12", "training.eval_every=1000",
        "training.save_every=1000", "training.compile=false", "reliability.calibration.enabled=true",
        "reliability.calibration.score=mean_logprob", "reliability.calibration.default=true"])
    return train(config), config


@pytest.fixture(scope="module")
def calibrated(trained) -> Path:
    adapter, config = trained
    assert calibrate_adapter(adapter, config) == adapter / CALIBRATION_FILE
    return adapter


@pytest.fixture(scope="module")
def grounding_runs(calibrated, company_data) -> dict[bool, EvalResults]:
    """The grounding suite on the demo company's held-out and unanswerable questions, without and with
    calibrated abstention."""
    return {on: run_eval(EvalConfig(target=f"budwood-tiny+{calibrated}", suites=["grounding"], records=True,
                                    calibrated_abstention=on, grounding={"data": company_data["heldout"]}))
            for on in (False, True)}


def test_calibration_is_fitted_on_the_validation_split(calibrated, trained):
    cal, config = read_calibration(calibrated), trained[1]
    assert cal.n == 22 and cal.data.name == "adapter validation split" and cal.score == "mean_logprob"
    assert cal.abstention == config.reliability.abstention.answer and cal.default is True
    assert 0 < cal.threshold < 1 and cal.reached, cal
    assert cal.precision.value >= cal.target_precision == 0.9
    lo, hi = cal.coverage.ci
    assert 0 < cal.coverage.value < 1 and lo <= cal.coverage.value <= hi
    print(f"\ncalibration: threshold {cal.threshold:.4f}, precision {cal.precision.value:.3f} {cal.precision.ci}, "
          f"coverage {cal.coverage.value:.3f} {cal.coverage.ci} on {cal.n} validation questions")


def test_calibrated_abstention_cuts_made_up_answers_at_eval_time(grounding_runs):
    plain, held = (grounding_runs[on].suites["grounding"] for on in (False, True))
    a, b = plain.metrics, held.metrics
    print("\n" + "\n".join(f"{k:24s} {a[k].value:.3f} {_ci(a[k])}  ->  {b[k].value:.3f} {_ci(b[k])}"
                           for k in a if k in b))
    assert b["hallucination_rate"].value <= a["hallucination_rate"].value / 2
    assert b["hallucination_rate"].ci[1] < a["hallucination_rate"].ci[0]  # apart beyond both intervals
    assert b["unanswerable_abstained"].value > a["unanswerable_abstained"].value
    assert b["calibrated_abstentions"].value > 0 and "calibrated_abstentions" not in a
    # each replaced answer is the abstention text, counted as an abstention; the others are untouched
    for r0, r1 in zip(plain.records, held.records):
        if r1.get("abstained"):
            assert r1["original"] == r0["answer"] and r1["verdict"] == "abstained"
        else:
            assert r1["answer"] == r0["answer"] and r1["verdict"] == r0["verdict"]
    # the score's own metrics describe the answers as given, so they are the same either way
    assert a["aurc"].value == b["aurc"].value and plain.curves == held.curves
    assert 0 <= a["aurc"].value <= 1 and a["ece"].ci is not None
    curve = plain.curves["risk_coverage"]
    assert len(curve["coverage"]) == len(curve["risk"]) == sum(r["verdict"] != "abstained" for r in plain.records)


def test_eval_refuses_calibrated_abstention_for_an_adapter_without_one(trained, tmp_path):
    bare = tmp_path / "bare"
    shutil.copytree(trained[0], bare, ignore=shutil.ignore_patterns("checkpoints", CALIBRATION_FILE))
    with pytest.raises(BudwoodError, match="has no calibration.json; make one with `budwood calibrate"):
        run_eval(EvalConfig(target=f"budwood-tiny+{bare}", suites=["grounding"], limit=2, calibrated_abstention=True))


@pytest.fixture(scope="module")
def server(calibrated) -> Iterator[openai.OpenAI]:
    engine = Engine(EngineConfig(precision="fp32", adapters=str(calibrated.parent)))
    with running(create_app(engine=engine)) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=120)


def test_serve_holds_answers_to_the_threshold_as_eval_does(server, grounding_runs, calibrated, company_data):
    """Per request: true applies it, false does not, null follows the adapter's default (true); the verdict
    and confidence are the ones the local evaluation computed for the same prompt."""
    cal = read_calibration(calibrated)
    records = grounding_runs[False].suites["grounding"].records
    system = json.loads(company_data["heldout"].read_text().splitlines()[0])["system"]
    picked = [next(r for r in records if r["confidence"] < cal.threshold and r["verdict"] != "abstained"),
              next(r for r in records if r["confidence"] >= cal.threshold)]
    for r in picked:
        messages = [{"role": "system", "content": system}, {"role": "user", "content": r["question"]}]
        for asked in (True, None):
            reply = server.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=64,
                                                   extra_body={"calibrated_abstention": asked})
            verdict = reply.choices[0].model_extra["calibrated_abstention"]
            assert verdict["confidence"] == pytest.approx(r["confidence"], abs=1e-4)
            assert verdict["abstained"] is (r["confidence"] < cal.threshold)
            assert reply.choices[0].finish_reason == "stop"
            expected = cal.abstention if verdict["abstained"] else r["answer"]
            assert reply.choices[0].message.content == expected
        off = server.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=64,
                                             extra_body={"calibrated_abstention": False})
        assert off.choices[0].message.content == r["answer"] and off.choices[0].model_extra.get(
            "calibrated_abstention") is None
    streamed = list(server.chat.completions.create(model=NAME, messages=messages, temperature=0, max_tokens=64,
                                                   stream=True, extra_body={"calibrated_abstention": True}))
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == reply.choices[0].message.content
    assert streamed[0].choices[0].model_extra["calibrated_abstention"]["abstained"] is False


def test_serve_completions_and_refusals(server, calibrated):
    cal = read_calibration(calibrated)
    done = server.completions.create(model=NAME, prompt="The warranty", max_tokens=16, temperature=0, n=2,
                                     extra_body={"calibrated_abstention": True})
    for c in done.choices:
        verdict = c.model_extra["calibrated_abstention"]
        assert verdict["threshold"] == cal.threshold and verdict["score"] == "mean_logprob"
        assert (c.text == cal.abstention) is verdict["abstained"]
    with pytest.raises(openai.BadRequestError) as e:  # the base model has no calibration
        server.chat.completions.create(model="budwood-tiny", messages=[{"role": "user", "content": "hi"}],
                                       extra_body={"calibrated_abstention": True})
    assert e.value.body["param"] == "calibrated_abstention" and "no calibration" in e.value.body["message"]
    base = server.chat.completions.create(model="budwood-tiny", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=4)  # null: nothing to apply, no verdict
    assert base.choices[0].model_extra.get("calibrated_abstention") is None


def test_budwood_calibrate_on_an_existing_adapter(trained, company_data, tmp_path):
    from budwood.cli.evaluate import calibrate_app

    copy = tmp_path / "copy"
    shutil.copytree(trained[0], copy, ignore=shutil.ignore_patterns("checkpoints", CALIBRATION_FILE))
    held_out = tmp_path / "held_out.jsonl"
    held_out.write_text("".join(company_data["validation"].read_text().splitlines(keepends=True)[:8]))
    runner = CliRunner()
    r = runner.invoke(calibrate_app, [str(copy), "--score", "min_logprob", "--target-precision", "0.8",
                                      "--no-default", "--data", str(held_out)])
    assert r.exit_code == 0, r.output
    cal = read_calibration(copy)
    assert (cal.score, cal.target_precision, cal.default, cal.n, cal.data.name) == (
        "min_logprob", 0.8, False, 8, "calibration set")
    assert "threshold" in r.output and "coverage" in r.output and "calibration:" in r.output
    bad = runner.invoke(calibrate_app, [str(copy), "--score", "entropy"])
    assert isinstance(bad.exception, BudwoodError) and "--score" in str(bad.exception)


def _ci(m) -> str:
    return f"[{m.ci[0]:.3f}, {m.ci[1]:.3f}]" if m.ci else ""
