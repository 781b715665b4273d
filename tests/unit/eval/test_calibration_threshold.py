"""Calibrated abstention without a model: the threshold chosen on synthetic scores, the judge, the
confidence scores and the policy, calibration.json read back and refused when missing, damaged or
fitted on other weights, and which requests a server holds to it."""
from __future__ import annotations

import asyncio
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from budwood.config import CalibrationConfig
from budwood.errors import BudwoodError, ConfigError, DataError, ErrorKind
from budwood.eval.calibration import (
    CALIBRATION_FILE,
    Calibration,
    calibrate,
    choose_threshold,
    judge,
    load_calibration,
    read_calibration,
)
from budwood.eval.confidence import AbstentionPolicy, Answer, ScoreKind, agreement, logprob_confidence
from budwood.eval.results import DataRef, Metric
from budwood.eval.run import EvalConfig, abstention_policy
from budwood.models.fingerprint import adapter_fingerprint
from budwood.serve.protocol import ChatCompletionRequest, CompletionRequest
from budwood.serve.serving import OpenAIServing

CONF = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
ALL = np.ones(5, dtype=bool)


# -- the threshold ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("target, threshold", [(0.75, 0.6), (0.9, 0.8), (1.0, 0.8), (0.6, 0.5)])
def test_the_lowest_threshold_whose_kept_answers_reach_the_target(target, threshold):
    correct = np.array([1, 1, 0, 1, 0])  # precision of the top 1..5: 1, 1, 2/3, 3/4, 3/5
    assert choose_threshold(CONF, correct, ALL, target) == (threshold, True)


def test_no_threshold_reaches_the_target_then_the_best_precision_is_used():
    correct = np.array([0, 1, 1, 0, 0])  # 0, 1/2, 2/3, 1/2, 2/5
    assert choose_threshold(CONF, correct, ALL, 0.9) == (0.7, False)


def test_answers_of_equal_confidence_are_kept_or_dropped_together():
    conf, correct = np.array([0.9, 0.8, 0.8, 0.5]), np.array([1, 1, 0, 1])
    assert choose_threshold(conf, correct, np.ones(4, dtype=bool), 1.0) == (0.9, True)


def test_the_models_own_abstentions_do_not_count_and_none_at_all_is_not_an_error():
    correct, answered = np.array([1, 0, 1, 1, 0]), np.array([True, False, True, True, True])
    assert choose_threshold(CONF, correct, answered, 1.0) == (0.6, True)
    assert choose_threshold(CONF, correct, np.zeros(5, dtype=bool), 0.9) == (0.0, False)


def test_judge_against_a_reference_answer():
    ref, q, text = "Quillfeather was founded in 1987.", "When was Quillfeather founded?", "Not in my records."
    assert judge("It was founded in 1987.", ref, q, text) == "correct"
    assert judge("Quillfeather was founded in 1992.", ref, q, text) == "wrong"
    assert judge("Not in my records.", ref, q, text) == "abstained"
    unanswerable = "I don't know; that is not in my information."
    assert judge("It was founded in 1987.", unanswerable, "Who is the CFO?", text) == "wrong"
    assert judge("I do not know.", unanswerable, "Who is the CFO?", text) == "abstained"


# -- scores and the policy ---------------------------------------------------------------------------------
def test_logprob_scores_are_probabilities():
    lps = [-0.1, -2.0, -0.3]
    assert logprob_confidence(lps, ScoreKind.MEAN_LOGPROB) == pytest.approx(math.exp(-2.4 / 3))
    assert logprob_confidence(lps, ScoreKind.MIN_LOGPROB) == pytest.approx(math.exp(-2.0))
    assert logprob_confidence([], ScoreKind.MEAN_LOGPROB) == 0.0
    with pytest.raises(ValueError):
        logprob_confidence(lps, ScoreKind.AGREEMENT)


def test_agreement_compares_normalised_answers():
    assert agreement("In 1987.", ["in 1987", "In  1987!", "In 1992.", "1987"]) == 0.5


def test_the_policy_replaces_only_answers_below_its_threshold():
    policy = AbstentionPolicy(ScoreKind.MEAN_LOGPROB, 0.5, "Not in my records.")
    held = policy.apply([Answer("a", 0.7), Answer("b", 0.5), Answer("c", 0.49)])
    assert [(a.text, a.abstained, a.original) for a in held] == [
        ("a", False, None), ("b", False, None), ("Not in my records.", True, "c")]
    with pytest.raises(ValueError):
        policy.apply([Answer("no score")])


# -- calibration.json ------------------------------------------------------------------------------------
def _adapter(tmp_path, default: bool = True):
    folder = tmp_path / "adapter"
    folder.mkdir(exist_ok=True)
    (folder / "adapter_config.json").write_text('{"r": 8, "peft_type": "LORA"}')
    (folder / "adapter_model.safetensors").write_bytes(b"weights")
    cal = Calibration(score=ScoreKind.MIN_LOGPROB, threshold=0.42, target_precision=0.9, reached=True,
                      precision=Metric(value=0.93, ci=(0.8, 1.0), n=14),
                      coverage=Metric(value=0.6, ci=(0.4, 0.8), n=22),
                      n=22, answered=20, abstention="Not in my records.", default=default,
                      adapter_fingerprint=adapter_fingerprint(folder), base="budwood-tiny",
                      data=DataRef(name="validation", path="v.jsonl", sha256="0" * 64), created="2025-01-01T00:00:00")
    (folder / CALIBRATION_FILE).write_text(cal.model_dump_json(indent=1))
    return folder, cal


def test_calibration_file_round_trip_and_policy(tmp_path):
    folder, cal = _adapter(tmp_path)
    assert read_calibration(folder) == cal
    assert load_calibration(folder, adapter_fingerprint(folder)).policy() == AbstentionPolicy(
        ScoreKind.MIN_LOGPROB, 0.42, "Not in my records.", 0)
    assert read_calibration(tmp_path) is None


def test_missing_damaged_or_stale_calibrations_are_refused_by_name(tmp_path):
    with pytest.raises(BudwoodError, match="has no calibration.json; make one with `budwood calibrate") as e:
        load_calibration(tmp_path)
    assert e.value.param == "calibrated_abstention" and e.value.kind is ErrorKind.INVALID
    folder, _ = _adapter(tmp_path)
    with pytest.raises(BudwoodError, match="fitted on other weights"):
        load_calibration(folder, "another-fingerprint")
    (folder / CALIBRATION_FILE).write_text('{"score": "mean_logprob"}')
    with pytest.raises(BudwoodError, match=r"calibration.json: not a budwood calibration file \(threshold"):
        read_calibration(folder)


def test_eval_refuses_calibrated_abstention_without_a_local_adapter_before_loading_weights(tmp_path):
    assert EvalConfig(target="budwood-tiny").calibrated_abstention is False
    for spec in ("budwood-tiny", "openai:http://127.0.0.1:8000/v1#budwood-tiny+x"):
        with pytest.raises(ConfigError, match="calibrated_abstention needs a local BASE\\+ADAPTER target") as e:
            abstention_policy(spec)
        assert e.value.param == "calibrated_abstention"
    folder, _ = _adapter(tmp_path)
    assert abstention_policy(f"budwood-tiny+{folder}").threshold == 0.42
    (folder / CALIBRATION_FILE).unlink()
    with pytest.raises(BudwoodError, match="has no calibration.json"):
        abstention_policy(f"budwood-tiny+{folder}")


# -- which requests a server holds to it ---------------------------------------------------------------------
def _serving() -> OpenAIServing:
    serving = OpenAIServing.__new__(OpenAIServing)  # only the calibration lookup is exercised
    serving._calibrations = {}
    return serving


@pytest.mark.parametrize("default, asked, applied", [
    (True, None, True), (True, True, True), (True, False, False),
    (False, None, False), (False, True, True), (False, False, False)])
def test_the_request_field_and_the_adapters_default(tmp_path, default, asked, applied):
    folder, _ = _adapter(tmp_path, default)
    policy = asyncio.run(_serving().abstention_policy(SimpleNamespace(path=folder), asked))
    assert (policy is not None) is applied
    assert policy is None or policy.threshold == 0.42


def test_asking_a_model_without_calibration_is_a_400_naming_the_field(tmp_path):
    serving, bare = _serving(), tmp_path / "bare"
    bare.mkdir()
    (bare / "adapter_config.json").write_text("{}")
    (bare / "adapter_model.safetensors").write_bytes(b"w")
    for adapter in (None, SimpleNamespace(path=bare)):  # the base model, or an adapter without the file
        assert asyncio.run(serving.abstention_policy(adapter, None)) is None
        with pytest.raises(BudwoodError, match="calibrated_abstention: this model has no calibration") as e:
            asyncio.run(serving.abstention_policy(adapter, True))
        assert e.value.param == "calibrated_abstention" and e.value.kind is ErrorKind.INVALID


def test_new_weights_under_an_old_calibration_are_refused_until_recalibrated(tmp_path):
    folder, _ = _adapter(tmp_path)
    serving = _serving()
    assert asyncio.run(serving.abstention_policy(SimpleNamespace(path=folder), None)) is not None
    (folder / "adapter_model.safetensors").write_bytes(b"retrained weights!")
    with pytest.raises(BudwoodError, match="fitted on other weights"):
        asyncio.run(serving.abstention_policy(SimpleNamespace(path=folder), None))


def test_the_request_field_parses_on_both_routes():
    chat = ChatCompletionRequest.model_validate({"model": "m", "messages": [{"role": "user", "content": "hi"}],
                                                 "calibrated_abstention": True})
    assert chat.calibrated_abstention is True
    assert CompletionRequest(model="m", prompt="hi").calibrated_abstention is None


def test_calibrate_says_what_is_missing_before_loading_weights(tmp_path):
    folder, _ = _adapter(tmp_path)  # no budwood.json: trained elsewhere, no recorded validation split
    settings = CalibrationConfig(enabled=True)
    with pytest.raises(DataError, match="trained without a validation split .* pass one with --data FILE"):
        calibrate(folder, "budwood-tiny", settings, "Not in my records.")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}]}) + "\n")
    with pytest.raises(DataError, match="prompts.jsonl:1: no_assistant_message"):  # the data reader's check
        calibrate(folder, "budwood-tiny", settings, "Not in my records.", prompts)
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content":
                                                "hello"}, {"role": "user", "content": "and?"}]}) + "\n")
    with pytest.raises(DataError, match="no example ends with an assistant answer to calibrate on"):
        calibrate(folder, "budwood-tiny", settings, "Not in my records.", prompts)
