"""The results file and `compare` (pure: hand-built results, no model)."""
import json

import pytest

from budwood.errors import BudwoodError
from budwood.eval.results import (
    EvalResults,
    Metric,
    SuiteResult,
    compare,
    json_schema,
    load_results,
    plot_comparison,
    summary_rows,
    write_results,
)
from budwood.eval.targets import TargetInfo


def results(spec: str, metrics: dict[str, Metric], skipped: dict | None = None) -> EvalResults:
    return EvalResults(target=TargetInfo(spec=spec, kind="local"), config={"target": spec}, software={"budwood": "x"},
                       created="2026-01-01T00:00:00+00:00", seconds=1.0,
                       suites={"grounding": SuiteResult(name="grounding", version="1.0", metrics=metrics,
                                                        skipped=skipped or {})})


def M(value, ci=None, higher=True) -> Metric:  # noqa: N802
    return Metric(value=value, ci=ci, n=10, higher_is_better=higher)


def test_compare_rows_deltas_and_significance():
    a = results("base", {"apart": M(0.2, (0.1, 0.3)), "overlap": M(0.2, (0.1, 0.5)), "no_ci": M(0.2),
                         "only_a": M(0.5, (0.4, 0.6)), "undefined": M(None), "nan": M(float("nan"), (0, 1)),
                         "lower": M(0.9, (0.85, 0.95), higher=False)})
    b = results("adapted", {"apart": M(0.8, (0.7, 0.9)), "overlap": M(0.45, (0.35, 0.55)), "no_ci": M(0.9),
                            "undefined": M(0.3), "nan": M(0.5, (0, 1)), "lower": M(0.1, (0.05, 0.15), higher=False),
                            "only_b": M(0.1)})
    rows = {r["metric"]: r for r in compare(a, b)}
    assert set(rows) == {"apart", "overlap", "no_ci", "lower"}  # in both, defined, a number
    assert rows["apart"]["delta"] == pytest.approx(0.6) and rows["apart"]["significant"]
    # b (0.45) inside a's interval: not outside both
    assert rows["overlap"]["delta"] == pytest.approx(0.25) and not rows["overlap"]["significant"]
    assert not rows["no_ci"]["significant"]
    assert rows["lower"]["significant"] and rows["lower"]["higher_is_better"] is False
    assert rows["apart"]["a_ci"] == (0.1, 0.3) and rows["apart"]["b_ci"] == (0.7, 0.9)
    assert all(r["suite"] == "grounding" for r in rows.values())


def test_write_and_load_round_trip(tmp_path):
    r = results("base", {"x": M(0.5, (0.25, 0.75))}, {"loss": "local targets only"})
    path = write_results(r, tmp_path / "deep" / "r.json")
    assert [p.name for p in path.parent.iterdir()] == ["r.json"]  # no temporary left behind
    assert load_results(path) == r
    assert json.loads(path.read_text())["schema_version"] == "budwood.eval/1"
    assert summary_rows(r) == [("grounding", "x", "0.5", "[0.25, 0.75]"), ("grounding", "loss", "skipped",
                                                                        "local targets only")]
    assert set(json_schema()["required"]) >= {"target", "config", "software", "created", "seconds", "suites"}


def test_load_results_errors_name_the_file_and_the_field(tmp_path):
    with pytest.raises(BudwoodError, match="no such results file"):
        load_results(tmp_path / "gone.json")
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2")
    with pytest.raises(BudwoodError, match=r"bad.json: not a budwood eval results file .*Invalid JSON"):
        load_results(bad)
    doc = json.loads(results("base", {"x": M(0.5)}).model_dump_json())
    doc["suites"]["grounding"]["metrics"]["x"]["n"] = "ten"
    bad.write_text(json.dumps(doc))
    with pytest.raises(BudwoodError, match=r"suites\.grounding\.metrics\.x\.n"):
        load_results(bad)


def test_plot_comparison_writes_a_png(tmp_path):
    a = results("base", {"x": M(0.2, (0.1, 0.3)), "y": M(0.5)})
    b = results("adapted", {"x": M(0.8, (0.7, 0.9)), "y": M(0.4)})
    path = plot_comparison(compare(a, b), ("base", "adapted"), tmp_path / "c.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5_000
