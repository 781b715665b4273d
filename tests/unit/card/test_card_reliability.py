"""The card's Reliability section: how the adapter was trained, the recipes applied, the calibrated threshold
and the before/after table, all from the files (fixture adapters written by hand, no model loaded)."""
import json

import pytest
from test_render import domain, grounding, make_adapter, render, write_eval

from budwood.card.render import render_card
from budwood.errors import BudwoodError
from budwood.eval.calibration import CALIBRATION_FILE, Calibration
from budwood.eval.results import DataRef, Metric
from budwood.models.fingerprint import adapter_fingerprint

ABSTAIN = "I don't know; that is not in the information I have."


def trained_with(adapter, method: dict | None = None, reliability: dict | None = None, report: dict | None = None):
    """Rewrite budwood.json as training writes it for a run with this method and these recipes."""
    prov = json.loads((adapter / "budwood.json").read_text())
    if method is not None:
        prov["method"] = method
    prov["config"]["reliability"] = reliability or {}
    prov["reliability"] = report or {}
    (adapter / "budwood.json").write_text(json.dumps(prov))
    return adapter


def calibrated(adapter, fingerprint: str | None = None, threshold: float = -1.2345, default: bool = True):
    ratio = lambda v, n: Metric(value=v, ci=(v - 0.1, v + 0.05), n=n)  # noqa: E731
    cal = Calibration(score="mean_logprob", threshold=threshold, target_precision=0.9, reached=True,
                      precision=ratio(0.92, 12), coverage=ratio(0.6, 20), n=20, answered=18, abstention=ABSTAIN,
                      default=default, adapter_fingerprint=fingerprint or adapter_fingerprint(adapter),
                      base="budwood-tiny", data=DataRef(name="validation", path="/data/support/validation.jsonl",
                                                        sha256="2" * 64), created="2026-01-03T00:00:00+00:00")
    (adapter / CALIBRATION_FILE).write_text(cal.model_dump_json())
    return adapter


@pytest.fixture
def adapter(tmp_path):
    out = make_adapter(tmp_path)
    write_eval(out, "adapted.json", [domain(0.5), grounding(correct=0.5, hallucination=0.2)])
    return out


def section(card: str, title: str) -> str:
    return card.split(f"### {title}\n", 1)[1].split("\n### ", 1)[0]


def test_plain_sft_without_recipes_says_so(adapter):
    trained = section(render(trained_with(adapter, {"type": "sft"})), "How it was trained")
    assert "Supervised fine-tuning (SFT)" in trained and "No reliability recipe was applied" in trained
    assert "Calibrated abstention" not in trained


def test_dpo_from_an_init_adapter_with_recipes_and_their_reports(adapter):
    trained_with(adapter, {"type": "dpo", "dpo": {"beta": 0.25, "loss_type": "ipo", "sft_weight": 0.5},
                           "init_adapter": {"ref": "acme/support@1.0.0", "fingerprint": "sha256:" + "9" * 64}},
                 {"abstention": {"enabled": True, "answer": ABSTAIN, "ratio": 0.3, "questions": None},
                  "counterfactual": {"enabled": False, "word_pairs": None, "share": 1.0},
                  "format_augmentation": {"enabled": True, "variants": 2, "forms": ["case", "template"]}},
                 {"abstention": {"built_questions": 17, "examples_before": 60, "examples_after": 77, "examples": [
                     {"question": "Who is the CFO?"}], "answer": ABSTAIN},
                  "format_augmentation": {"examples_before": 77, "examples_after": 231}})
    trained = section(render(adapter), "How it was trained")
    assert "Direct preference optimisation (DPO" in trained and "beta 0.25, loss `ipo`" in trained
    assert "SFT term on the preferred answer weighted 0.5" in trained
    assert "started from the adapter `acme/support@1.0.0` (fingerprint `999999999999`), which, frozen, was also " \
           "the reference policy" in trained
    rows = [line for line in trained.splitlines() if line.startswith("| ") and "recipe" not in line]
    assert rows == [
        f'| abstention | answer "{ABSTAIN}", ratio 0.3, questions null | built questions: 17, examples before: 60, '
        'examples after: 77 |',
        '| format_augmentation | variants 2, forms ["case", "template"] | examples before: 77, examples after: 231 |']
    assert "counterfactual" not in trained  # off: not applied, not shown


def test_the_calibrated_threshold_comes_from_calibration_json(adapter):
    trained = section(render(calibrated(trained_with(adapter, {"type": "sft"}))), "How it was trained")
    assert "below -1.234 is replaced by \"I don't know; that is not in the information I have.\"" in trained
    assert "budwood serve applies it unless a request turns it off" in trained
    assert "Fitted on 20 validation questions (`/data/support/validation.jsonl`) for a precision of 90%, reached: " \
           "precision 92% (95% interval 82-97%) at coverage 60% (50-65%)" in trained


def test_a_calibration_fitted_on_other_weights_is_refused(adapter):
    calibrated(adapter, fingerprint="sha256:" + "0" * 64)
    with pytest.raises(BudwoodError, match=r"calibration\.json: fitted on other weights"):
        render_card(adapter)


def test_before_and_after_has_every_side_with_intervals(adapter):
    write_eval(adapter, "base.json", [domain(0.1), grounding(correct=0.05, hallucination=0.9)], kind="base")
    write_eval(adapter, "baseline-plain.json", [domain(0.45), grounding(correct=0.55, hallucination=0.6)],
               adapter_fp="sha256:" + "7" * 64)
    card = render(adapter)
    table = section(card, "Before and after")
    assert "| suite | metric | base | plain | this adapter |" in table
    assert "| grounding | hallucination_rate ↓ | 0.9 [0.8, 1] | 0.6 [0.5, 0.7] | 0.2 [0.1, 0.3] |" in table
    assert "| grounding | answerable_correct ↑ | 0.05 [0, 0.15] | 0.55 [0.45, 0.65] | 0.5 [0.4, 0.6] |" in table
    assert "| domain | exact_match ↑ | 0.1 [-0.1, 0.3] | 0.45 [0.25, 0.65] | 0.5 [0.3, 0.7] |" in table
    assert "plain = adapter `plain` (another adapter on the same base, fingerprint `777777777777`; " \
           "`eval/baseline-plain.json`)" in table and "this adapter = `eval/adapted.json`" in table
    # and the Evaluation section's own tables get the column too
    assert "| answerable_correct | 0.5 | [0.4, 0.6] | 40 | 0.05 | 0.55 |" in card


def test_without_a_comparison_the_card_says_how_to_get_one(adapter):
    table = section(render(adapter), "Before and after")
    assert "No comparison in `eval/`" in table and "eval/baseline-LABEL.json" in table and "| suite |" not in table


@pytest.mark.parametrize("name", ["plain.json", "baseline-.json", "baseline-base.json"])
def test_another_adapters_results_are_a_column_only_when_named_as_a_baseline(adapter, name):
    write_eval(adapter, name, [grounding()], adapter_fp="sha256:" + "7" * 64)
    with pytest.raises(BudwoodError, match="results for other weights .* is named baseline-LABEL.json"):
        render_card(adapter)


def test_a_baseline_on_another_base_is_refused(adapter):
    write_eval(adapter, "baseline-plain.json", [grounding()], adapter_fp="sha256:" + "7" * 64,
               base_fp="sha256:" + "c" * 64)
    with pytest.raises(BudwoodError, match=r"baseline-plain\.json: results for other weights \(its base"):
        render_card(adapter)


@pytest.mark.parametrize(("provenance", "text"), [
    (None, "_Not recorded: the adapter came without budwood.json._"),
    ({"base_model": {"name": "budwood-tiny", "fingerprint": "sha256:" + "b" * 64}},
     "_Not recorded: its budwood.json does not say how it was trained._"),
    ({"base_model": {"name": "budwood-tiny", "fingerprint": "sha256:" + "b" * 64}, "merge": {
        "method": "linear", "rank": 8, "density": None, "seed": 0, "exact": True, "parents": []}},
     "Not trained: merged from the adapters under Lineage")])
def test_what_is_not_recorded_is_said_not_guessed(adapter, provenance, text):
    if provenance is None:
        (adapter / "budwood.json").unlink()
    else:
        (adapter / "budwood.json").write_text(json.dumps(provenance))
    trained = section(render(adapter), "How it was trained")
    assert text in trained and "SFT" not in trained
