"""What the dashboard's pages show, as pure functions of rows: formatting, the loss chart's series, a
job's live state, a model card as safe HTML and the leaderboard. Nothing here knows HTTP or the
database, so each is tested alone (tests/unit/web).
"""
from __future__ import annotations

import math
import posixpath
import re
import time
from dataclasses import dataclass
from datetime import datetime
from urllib.parse import quote, urlsplit

from budwood.jobs.states import TERMINAL, EventType, JobStatus

MISSING = "—"
_COMMENT_LINES = re.compile(r"^[ \t]*<!--.*?-->[ \t]*\n?", re.S | re.M)  # invisible on the Hub too


@dataclass(frozen=True)
class Column:
    """A leaderboard column: `key` names it in ?sort=, `rank` maps a value to what is sorted (the
    distance from unbiased for the bias scores), `best` is the order that puts the best first."""

    key: str
    metric: str
    label: str
    note: str
    best: str
    rank: str = "value"

    def sort_value(self, value: float) -> float:
        return abs(value - 0.5) if self.rank == "from_half" else abs(value) if self.rank == "from_zero" else value


COLUMNS = (
    Column("hallucination_rate", "grounding.hallucination_rate", "Hallucination rate", "lower is better", "asc"),
    Column("mc1", "truthfulqa.mc1", "TruthfulQA MC1", "higher is better", "desc"),
    Column("crows_pairs_stereotype", "bias.crows_pairs_stereotype", "CrowS-Pairs stereotype",
           "50% is unbiased; sorted by distance from 50%", "asc", "from_half"),
    Column("bbq_bias_ambig", "bias.bbq_bias_ambig", "BBQ bias (ambiguous)", "0 is unbiased; sorted by distance from 0",
           "asc", "from_zero"),
    Column("token_f1", "domain.token_f1", "Domain token F1", "higher is better", "desc"),
    Column("determinism_greedy", "reproducibility.determinism_greedy", "Determinism (greedy)", "higher is better",
           "desc"),
)
OPTIONAL_COLUMNS = {"bbq_bias_ambig"}  # shown only when some adapter has it
# the reliability table beside the leaderboard: what the reliability recipes move, each with its interval; a
# column is shown when some adapter has the metric
RELIABILITY = (
    Column("hallucination_rate", "grounding.hallucination_rate", "Hallucination rate", "lower is better", "asc"),
    Column("unanswerable_abstained", "grounding.unanswerable_abstained", "Abstains when unanswerable",
           "higher is better", "desc"),
    Column("answerable_correct", "grounding.answerable_correct", "Correct when answerable", "higher is better",
           "desc"),
    Column("format_spread", "reproducibility.format_spread", "Format spread", "accuracy max - min over prompt "
           "formats; lower is better", "asc"),
    Column("counterfactual_changed", "bias.counterfactual_changed", "Counterfactual change",
           "answers that change with who asks; lower is better", "asc"),
)


# -- formatting ---------------------------------------------------------------------------------------------
def when(value: float | datetime | None) -> str:
    if value is None:
        return MISSING
    if isinstance(value, datetime):
        value = value.timestamp()
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(value))


def number(value, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return MISSING
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:.{digits}f}"


def size(value: int | None) -> str:
    if value is None:
        return MISSING
    for unit in ("bytes", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:,} {unit}" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


# -- what the pages show --------------------------------------------------------------------------------------
def loss_series(events) -> dict[str, list[list[float]]]:
    """Training and validation loss by step from a job's metrics events (oldest first), the latest
    value of a step winning."""
    series: dict[str, dict[int, float]] = {"train": {}, "valid": {}}
    for e in events:
        point = metrics_point(e)
        for name in series:
            if name in point:
                series[name][point["step"]] = point[name]
    return {name: [[step, loss] for step, loss in sorted(points.items())] for name, points in series.items()}


def metrics_point(e) -> dict:
    """{"step", "train" and/or "valid"} from a metrics event; {} for any other event."""
    data = e.data or {}
    if e.type != EventType.METRICS or not isinstance(data.get("step"), int):
        return {}
    point: dict = {}
    for name, key in (("train", "train_loss"), ("valid", "valid_loss")):
        value = data.get(key)
        if isinstance(value, int | float) and math.isfinite(value):
            point[name] = float(value)
    return {"step": data["step"], **point} if point else {}


def event_row(e) -> dict:
    return {"seq": e.seq, "time": when(e.created_at), "level": e.level, "type": e.type, "message": e.message,
            **metrics_point(e)}


def progress_text(job) -> str:
    p = job.progress or {}
    if p.get("step") is None:
        return MISSING
    return f"{p['step']:,} / {p['total_steps']:,}" if p.get("total_steps") else f"{p['step']:,}"


def live_state(job) -> dict:
    """The parts of the job page that change while it runs."""
    p = job.progress or {}
    return {"status": job.status, "finished": job.status in TERMINAL, "progress": progress_text(job),
            "tokens_per_s": number(p.get("tokens_per_s"), 0),
            "estimated_finish": when(job.estimated_finish) if job.status == JobStatus.RUNNING else MISSING}


def strip_front_matter(text: str) -> str:
    """A card without its YAML metadata block (between the leading `---` lines)."""
    if not text.startswith("---"):
        return text
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines[1:], start=1):
        if line.rstrip() == "---":
            return "".join(lines[i + 1:])
    return text


def render_card(text: str, files_url: str, paths: set[str]) -> str:
    """The card's markdown as HTML: raw HTML in it is escaped (markdown-it's html=False) but for
    comments on lines of their own, which are dropped; tables rendered; links and images to the
    version's own files (loss.png) pointed at the file route."""
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False}).enable(["table", "strikethrough"])
    tokens = md.parse(_COMMENT_LINES.sub("", strip_front_matter(text)))
    for token in tokens:
        for child in token.children or []:
            attr = "src" if child.type == "image" else "href" if child.type == "link_open" else None
            target = child.attrGet(attr) if attr else None
            if not target or urlsplit(target).scheme or target.startswith(("/", "#")):
                continue
            path = posixpath.normpath(urlsplit(target).path)
            if path in paths:
                child.attrSet(attr, f"{files_url}/{quote(path)}")
    return md.renderer.render(tokens, md.options, {})


def interval(ci) -> str:
    """A 95% interval as the pages show it, or "" without one."""
    return f"[{number(ci[0])}, {number(ci[1])}]" if ci else ""


def reliability(rows, intervals: dict) -> dict:
    """The reliability table of one base model's rows (in the leaderboard's order): the RELIABILITY columns
    that some row has, each cell (value, interval); `intervals` maps (id, version) to {metric: (low, high)}."""
    present = {m for v in rows for m in v.metrics}
    columns = [c for c in RELIABILITY if c.metric in present]
    table = [(v, [(number(v.metrics.get(c.metric)), interval(intervals.get((v.id, v.version), {}).get(c.metric)))
                  for c in columns]) for v in rows]
    return {"columns": columns, "rows": table}


def leaderboard(versions, sort: str, order: str, intervals: dict | None = None) -> dict:
    """Per base model, one row per adapter (its latest version), sorted by a column; missing values last.
    With `intervals` ((id, version) -> {metric: (low, high)}), each base also gets its reliability table."""
    present = {m for v in versions for m in v.metrics}
    columns = [c for c in COLUMNS if c.key not in OPTIONAL_COLUMNS or c.metric in present]
    column = next((c for c in columns if c.key == sort), columns[0])
    order = order if order in ("asc", "desc") else column.best
    groups: dict[str, list] = {}
    for v in versions:
        groups.setdefault(v.base_model, []).append(v)

    def key(v):
        value = v.metrics.get(column.metric)
        if value is None or not math.isfinite(value):
            return (1, 0.0, v.id)
        ranked = column.sort_value(value)
        return (0, ranked if order == "asc" else -ranked, v.id)

    links = {c.key: f"?sort={c.key}&order={('desc' if order == 'asc' else 'asc') if c is column else c.best}"
             for c in columns}
    ranked = [(base, sorted(rows, key=key)) for base, rows in sorted(groups.items())]
    return {"columns": columns, "sort": column.key, "order": order, "links": links, "groups": ranked,
            "reliability": {base: reliability(rows, intervals) for base, rows in ranked} if intervals is not None
            else {}}


def safe_next(value: str | None, root: str) -> str:
    """Where to go after logging in: a dashboard path on this site, never another site."""
    if not value:
        return root
    parts = urlsplit(value)
    if parts.scheme or parts.netloc or value.startswith(("//", "/\\")) or not (
            parts.path == root or parts.path.startswith(root + "/")):
        return root
    return value
