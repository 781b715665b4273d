"""The results file: what was evaluated, on which data, with what numbers; and comparing two of them.

The schema is the pydantic model below (`budwood eval schema` prints it as JSON Schema; docs/evaluation.md
explains each field). Every metric carries its 95% bootstrap interval where one is defined.
"""
from __future__ import annotations

import math
from pathlib import Path

from pydantic import BaseModel, Field, ValidationError

from budwood.artifacts import AdapterDir
from budwood.errors import BudwoodError
from budwood.eval.targets import TargetInfo

SCHEMA_VERSION = "budwood.eval/1"


class Metric(BaseModel):
    value: float | None = Field(description="None where undefined (e.g. no example of that kind)")
    ci: tuple[float, float] | None = Field(None, description="95% percentile bootstrap interval")
    n: int = Field(description="examples the value is computed over")
    higher_is_better: bool | None = None
    note: str | None = None


class DataRef(BaseModel):
    name: str
    path: str
    sha256: str
    licence: str | None = None
    eval_only: bool = False


class Timing(BaseModel):
    seconds: float
    requests: int = Field(description="generations + scored continuations sent to the target")


class SuiteResult(BaseModel):
    name: str
    version: str
    data: list[DataRef] = []
    config: dict = {}
    metrics: dict[str, Metric] = {}
    skipped: dict[str, str] = Field({}, description="parts not run, with the reason")
    timing: Timing | None = None
    records: list[dict] | None = Field(None, description="per-example records (--records)")
    curves: dict[str, dict] = Field({}, description="curves behind a metric, as lists of points: risk_coverage "
                                    "(grounding: coverage, risk and threshold at each answer kept, and the score)")


class EvalResults(BaseModel):
    schema_version: str = SCHEMA_VERSION
    target: TargetInfo
    config: dict
    software: dict[str, str]
    created: str
    seconds: float
    suites: dict[str, SuiteResult]


def load_results(path: str | Path) -> EvalResults:
    path = Path(path)
    try:
        return EvalResults.model_validate_json(path.read_text())
    except FileNotFoundError:
        raise BudwoodError(f"{path}: no such results file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BudwoodError(f"{path}: cannot read a results file there ({e.__class__.__name__})") from None
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise BudwoodError(f"{path}: not a budwood eval results file ({where}: {first['msg']})") from None


def own_results(adapter: AdapterDir) -> list[EvalResults]:
    """The eval results files measured on this adapter's exact weights (others are a baseline or stale)."""
    mine = adapter.fingerprint
    results = [load_results(adapter.path / f) for f in adapter.files() if f.startswith("eval/")]
    return [r for r in results if r.target.adapter_fingerprint == mine]


def write_results(results: EvalResults, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(results.model_dump_json(indent=1) + "\n")
    tmp.replace(path)  # a crash never leaves half a results file
    return path


def json_schema() -> dict:
    return EvalResults.model_json_schema()


def compare(a: EvalResults, b: EvalResults) -> list[dict]:
    """One row per metric present in both: values, delta (b - a), and whether the change is outside both
    intervals (b's value outside a's interval and a's outside b's)."""
    rows = []
    for suite, sa in a.suites.items():
        sb = b.suites.get(suite)
        if sb is None:
            continue
        for name, ma in sa.metrics.items():
            mb = sb.metrics.get(name)
            if mb is None or ma.value is None or mb.value is None:
                continue
            if math.isnan(ma.value) or math.isnan(mb.value):
                continue
            outside = (ma.ci is not None and mb.ci is not None
                       and not (ma.ci[0] <= mb.value <= ma.ci[1]) and not (mb.ci[0] <= ma.value <= mb.ci[1]))
            rows.append({"suite": suite, "metric": name, "a": ma.value, "b": mb.value, "delta": mb.value - ma.value,
                         "a_ci": ma.ci, "b_ci": mb.ci, "significant": outside,
                         "higher_is_better": ma.higher_is_better})
    return rows


def plot_comparison(rows: list[dict], labels: tuple[str, str], path: str | Path) -> Path:
    """Side-by-side bars with interval whiskers, one panel per suite."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # rates and scores in [-1, 1] share a panel per suite; losses, perplexities and the like get their own
    panels: dict[str, list[dict]] = {}
    for r in rows:
        bounded = all(-1 <= v <= 1 for v in (r["a"], r["b"]))
        panels.setdefault(r["suite"] if bounded else f"{r['suite']} (own scale)", []).append(r)
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 1.2 + 0.45 * max(len(rows), 1) + 0.6 * len(panels)),
                             squeeze=False)
    for ax, (title, mine) in zip(axes[:, 0], panels.items()):
        ys = range(len(mine))
        for k, (side, color) in enumerate((("a", "#9aa5b1"), ("b", "#2f6f4f"))):
            vals = [r[side] for r in mine]
            err = [[max(0, v - (r[f"{side}_ci"] or (v, v))[0]) for v, r in zip(vals, mine)],
                   [max(0, (r[f"{side}_ci"] or (v, v))[1] - v) for v, r in zip(vals, mine)]]
            ax.barh([y + (0.2 if k == 0 else -0.2) for y in ys], vals, height=0.38, xerr=err, color=color,
                    label=labels[k], error_kw={"elinewidth": 0.8, "capsize": 2})
        ax.set_yticks(list(ys), [r["metric"] + (" *" if r["significant"] else "") for r in mine], fontsize=8)
        ax.invert_yaxis()
        if title.endswith("(own scale)") and all(r[s] > 0 for r in mine for s in ("a", "b")):
            ax.set_xscale("log")
        ax.set_title(title, fontsize=10, loc="left")
    axes[0, 0].legend(fontsize=8, loc="lower right")
    fig.suptitle("budwood eval compare (* = outside both 95% intervals)", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def summary_rows(results: EvalResults) -> list[tuple[str, str, str, str]]:
    """(suite, metric, value, interval) strings for printing."""
    rows = []
    for suite, s in results.suites.items():
        for name, m in s.metrics.items():
            value = "n/a" if m.value is None else f"{m.value:.4g}"
            ci = f"[{m.ci[0]:.3g}, {m.ci[1]:.3g}]" if m.ci else ""
            rows.append((suite, name, value, ci))
        for part, why in s.skipped.items():
            rows.append((suite, part, "skipped", why))
    return rows

