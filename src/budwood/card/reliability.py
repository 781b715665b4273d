"""The card's "Reliability" facts: how the adapter was trained, which reliability recipes changed its data,
the calibrated abstention threshold stored with it, and its reliability metrics beside every comparable run.

All of it is read from budwood.json (`method`, `config.reliability`, `reliability`), calibration.json and
the eval/ results already gathered for the card (facts.read_evaluations), never typed by hand.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

from budwood.card.facts import Run, SuiteRun
from budwood.errors import BudwoodError
from budwood.eval.calibration import CALIBRATION_FILE, Calibration, read_calibration
from budwood.eval.results import Metric

# the metrics a reliability table shows, by suite, in this order (those a run did not report are left out)
RELIABILITY_METRICS = {
    "grounding": ("hallucination_rate", "unanswerable_abstained", "answerable_correct", "calibrated_abstentions",
                  "aurc", "ece"),
    "reproducibility": ("format_spread", "format_agreement", "determinism_greedy", "option_order_agreement"),
    "bias": ("counterfactual_changed", "crows_pairs_stereotype", "bbq_bias_ambig", "bbq_bias_disambig"),
    "domain": ("exact_match", "token_f1", "rouge_l", "loss"),
    "truthfulqa": ("mc1", "mc2"),
}
THIS = "this adapter"
RECIPE_ORDER = ("abstention", "counterfactual", "format_augmentation", "calibration")
# what a recipe report holds that is worth a sentence; lists and examples stay in budwood.json
_REPORT_SKIP = {"examples", "answer", "ratio", "share", "protected_terms", "terms_swapped", "by_kind", "word_pairs",
                "subjects_kept"}


@dataclass
class Recipe:
    name: str
    settings: dict  # its config keys as training resolved them, `enabled` left out
    report: dict  # what it did to the data (scalars of the training report); {} for calibration


@dataclass
class Row:
    suite: str
    metric: str
    higher_is_better: bool | None
    cells: dict[str, Metric | None]  # column label -> that run's metric


@dataclass
class ReliabilityFacts:
    method: dict | None  # budwood.json's `method` (type, dpo settings, init_adapter); None when not recorded
    recipes: list[Recipe] = field(default_factory=list)
    calibration: Calibration | None = None
    columns: list[str] = field(default_factory=list)  # comparison labels first, THIS last
    rows: list[Row] = field(default_factory=list)
    runs: dict[str, Run] = field(default_factory=dict)  # a comparison label -> one of its runs (what it measured)
    own_files: list[str] = field(default_factory=list)  # the adapter's own results files in the table

    @property
    def compared(self) -> bool:
        return len(self.columns) > 1


def reliability_facts(adapter_dir: Path, provenance: dict, fingerprint: str,
                      suites: dict[str, SuiteRun]) -> ReliabilityFacts:
    method = provenance.get("method")
    if method is None and provenance.get("config") and not provenance.get("merge"):
        method = {"type": provenance["config"].get("training", {}).get("method", "sft")}  # before DPO existed
    facts = ReliabilityFacts(method=method, recipes=applied_recipes(provenance),
                             calibration=_calibration(adapter_dir, fingerprint))
    facts.columns, facts.rows = before_after(suites)
    shown = {row.suite for row in facts.rows}
    facts.runs = {label: run.columns[label] for run in reversed(suites.values()) for label in run.columns}
    facts.own_files = sorted({run.adapter.file for name, run in suites.items() if name in shown})
    return facts


def applied_recipes(provenance: dict) -> list[Recipe]:
    """The enabled recipes of the resolved config, each with the scalar parts of its training report."""
    configured = (provenance.get("config") or {}).get("reliability") or {}
    reports = provenance.get("reliability") or {}
    out = []
    for name in sorted(configured, key=lambda n: (RECIPE_ORDER.index(n) if n in RECIPE_ORDER else 99, n)):
        settings = configured[name]
        if not isinstance(settings, dict) or not settings.get("enabled"):
            continue
        report = {k: v for k, v in (reports.get(name) or {}).items()
                  if k not in _REPORT_SKIP and isinstance(v, int | float | str) and not isinstance(v, bool)}
        out.append(Recipe(name, {k: v for k, v in settings.items() if k != "enabled"}, report))
    return out


def _calibration(adapter_dir: Path, fingerprint: str) -> Calibration | None:
    """calibration.json, refused (as stale results are) when it was fitted on other weights."""
    found = read_calibration(adapter_dir)
    if found is not None and found.adapter_fingerprint != fingerprint:
        raise BudwoodError(f"{adapter_dir / CALIBRATION_FILE}: fitted on other weights ({found.adapter_fingerprint}) "
                           f"than this adapter's ({fingerprint}); a card must not state its threshold: run "
                           f"`budwood calibrate {adapter_dir}` again or remove the file")
    return found


def before_after(suites: dict[str, SuiteRun]) -> tuple[list[str], list[Row]]:
    """(columns, rows): every comparison label any suite has (the base, other adapters, endpoints), then this
    adapter; one row per reliability metric the adapter reported, a cell per column that ran it comparably."""
    labels = list(dict.fromkeys(label for run in suites.values() for label in run.columns))
    rows = []
    for suite, names in RELIABILITY_METRICS.items():
        run = suites.get(suite)
        if run is None:
            continue
        for name in names:
            mine = run.adapter.suite.metrics.get(name)
            if mine is None or mine.value is None or not math.isfinite(mine.value):
                continue
            cells = {label: (run.columns[label].suite.metrics.get(name) if label in run.columns else None)
                     for label in labels}
            rows.append(Row(suite, name, mine.higher_is_better, {**cells, THIS: mine}))
    return [*labels, THIS], rows
