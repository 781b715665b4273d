"""The facts a card states that files record: which results belong to the adapter, the base model's
licence, the training log, and an energy estimate.

Each reader either returns what the files say or says why it cannot; none guesses. Results that name
another adapter or base are refused, since a card must never show numbers for different weights.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from budwood import safeyaml
from budwood.errors import BudwoodError, ModelError
from budwood.eval.results import EvalResults, SuiteResult, load_results
from budwood.models.names import TINY_NAME, resolve_model_path

LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md")
BASELINE_PREFIX = "baseline-"  # eval/baseline-LABEL.json: another adapter's results, a comparison column LABEL

# Energy model: nominal board power (TDP, from the vendors' datasheets) of the accelerator, drawn for the
# whole training time, plus a constant per CPU thread torch used. First pattern that matches the device
# name wins; an unknown accelerator counts as GPU_FALLBACK_WATTS. See docs/cards.md.
CPU_WATTS_PER_THREAD = 10.0
GPU_FALLBACK_WATTS = 300.0
GPU_BOARD_WATTS = [
    (r"H100.*PCIE", 350.0), (r"H100|H200", 700.0), (r"A100.*PCIE", 300.0), (r"A100", 400.0),
    (r"L40S", 350.0), (r"L40", 300.0), (r"\bL4\b", 72.0), (r"A10G", 300.0), (r"\bA10\b", 150.0),
    (r"\bT4\b", 70.0), (r"V100", 300.0), (r"RTX 4090", 450.0), (r"RTX 3090", 350.0), (r"APPLE", 20.0),
]


@dataclass
class Run:
    """One suite from one results file."""

    results: EvalResults
    suite: SuiteResult
    file: str  # relative to the adapter directory


@dataclass
class SuiteRun:
    """A suite as the adapter ran it, beside comparable runs of the same suite (label -> run)."""

    name: str
    adapter: Run
    columns: dict[str, Run] = field(default_factory=dict)
    not_compared: dict[str, str] = field(default_factory=dict)  # label -> why its numbers are not shown


@dataclass
class BaseLicence:
    license: str | None = None
    license_name: str | None = None
    license_link: str | None = None
    license_file: bool = False
    card: str | None = None  # where the base model's own card is
    unknown_because: str | None = None


@dataclass
class Energy:
    kwh: float
    watts: float
    basis: str  # the devices counted, in words


def hub_model_id(name: object) -> str | None:
    """`name` where it is a Hugging Face Hub repository id of the form ORG/NAME, else None: budwood-tiny (it
    ships inside budwood and has no Hub id), a path, or a hub-shaped name that is a folder here (training
    loaded `models/llama` from disk when that folder exists). Only such an id may go in a card's YAML
    `base_model` or `datasets`, or in an exported adapter_config.json: the Hub rejects anything else, and no
    other machine can resolve a local name."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(name, str) or name.count("/") != 1 or name == TINY_NAME:
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return None if Path(name).expanduser().exists() else name


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BudwoodError(f"{path}: missing; a card is rendered from the files training writes") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BudwoodError(f"{path}: not a readable JSON file ({e})") from None
    if not isinstance(data, dict):
        raise BudwoodError(f"{path}: expected a JSON object")
    return data


def results_base_fingerprint(adapter_dir: Path, adapter_fp: str) -> str | None:
    """For an adapter that records no base fingerprint: the one its own evaluation measured, if any."""
    for path in sorted((adapter_dir / "eval").glob("*.json")):
        target = load_results(path).target
        if target.kind == "local" and target.adapter_fingerprint == adapter_fp:
            return target.base_fingerprint
    return None


def baseline_label(path: Path) -> str | None:
    """LABEL for a results file named eval/baseline-LABEL.json (another adapter on the same base, measured to
    compare with this one, e.g. the same data without a reliability recipe); None for any other name."""
    label = path.stem.removeprefix(BASELINE_PREFIX) if path.stem.startswith(BASELINE_PREFIX) else None
    return label if label and label not in ("base", "") else None


def _role(results: EvalResults, path: Path, adapter_fp: str, base_fp: str | None) -> tuple[str, str]:
    """(kind, label): ("adapter", ""), ("base", "base"), ("baseline", LABEL) or ("openai", model id);
    ValueError for results about other weights. Another adapter's results are a comparison only when their
    file says so by its name (baseline-LABEL.json): any other file with other weights is stale."""
    t = results.target
    if t.kind == "openai":
        return "openai", t.model or t.spec
    if t.base_fingerprint != base_fp:
        raise ValueError(f"its base has fingerprint {t.base_fingerprint}, this adapter's base {base_fp}")
    if t.adapter is None and t.adapter_fingerprint is None:
        return "base", "base"
    if t.adapter_fingerprint == adapter_fp:
        return "adapter", ""
    if baseline_label(path):
        return "baseline", baseline_label(path)
    raise ValueError(f"it evaluated adapter {t.adapter_fingerprint}, this adapter is {adapter_fp} (a results file "
                     f"about another adapter, kept to compare with, is named {BASELINE_PREFIX}LABEL.json)")


def _why_not_comparable(a: Run, b: Run) -> str | None:
    if a.suite.version != b.suite.version:
        return f"suite version {b.suite.version}, the adapter's {a.suite.version}"
    if sorted(d.sha256 for d in a.suite.data) != sorted(d.sha256 for d in b.suite.data):
        return "evaluated on different data"
    if a.suite.config != b.suite.config or a.results.config.get("limit") != b.results.config.get("limit"):
        return "evaluated with different suite settings"
    return None


def read_evaluations(adapter_dir: Path, adapter_fp: str, base_fp: str | None, order: list[str]) -> dict[str, SuiteRun]:
    """Every eval/*.json, by suite in `order` (then by name). Where several files ran one suite for the
    same target, the latest `created` wins; the base, baseline adapters' (baseline-LABEL.json) and endpoint
    runs become comparison columns when they ran the same suite version on the same data with the same
    settings."""
    runs: dict[tuple[str, str], dict[str, Run]] = {}  # role -> suite -> run
    loaded = [(load_results(p), p) for p in sorted((adapter_dir / "eval").glob("*.json"))]
    for results, path in sorted(loaded, key=lambda rp: (rp[0].created, rp[1].name)):
        try:
            role = _role(results, path, adapter_fp, base_fp)
        except ValueError as e:
            raise BudwoodError(f"{path}: results for other weights ({e}); stale results must not go in a card: "
                               "evaluate this adapter again or remove the file") from None
        for name, suite in results.suites.items():
            runs.setdefault(role, {})[name] = Run(results, suite, f"eval/{path.name}")
    mine = runs.pop(("adapter", ""), {})
    roles = sorted(runs)  # the base first, then baseline adapters and endpoints by label
    twice = sorted({label for _, label in roles if [r[1] for r in roles].count(label) > 1})
    if twice:
        raise BudwoodError(f"{adapter_dir / 'eval'}: two kinds of results are labelled {', '.join(twice)} (a baseline "
                           "adapter's file and an endpoint's model id); rename the baseline-LABEL.json file")
    out = {}
    for name in sorted(mine, key=lambda s: (order.index(s) if s in order else len(order), s)):
        run = out[name] = SuiteRun(name, mine[name])
        for role in roles:
            label, other = role[1], runs[role].get(name)
            if other is None:
                continue
            why = _why_not_comparable(run.adapter, other)
            if why:
                run.not_compared[label] = f"{why} ({other.file})"
            else:
                run.columns[label] = other
    return out


def base_licence(name: str) -> BaseLicence:
    """The licence the base model's own card states: a local folder's README.md, or a hub model's card
    if it is already in the local Hugging Face cache (a card is never fetched over the network)."""
    from huggingface_hub import try_to_load_from_cache

    try:
        where = resolve_model_path(name)
    except ModelError as e:
        return BaseLicence(unknown_because=str(e))
    if Path(where).is_dir():
        folder = Path(where)
        readme = folder / "README.md"
        has_file = any((folder / f).exists() for f in LICENSE_FILES)
        card = "`budwood/models/tiny/README.md` in the budwood package" if name == TINY_NAME else f"`{name}/README.md`"
        if not readme.exists():
            return BaseLicence(license_file=has_file, card=None, unknown_because=f"{name} has no README.md")
    else:
        cached = try_to_load_from_cache(name, "README.md")
        has_file = any(isinstance(try_to_load_from_cache(name, f), str) for f in LICENSE_FILES)
        card = f"https://huggingface.co/{name}"
        if not isinstance(cached, str):
            return BaseLicence(license_file=has_file, card=card,
                               unknown_because="its card is not in the local Hugging Face cache")
        readme = Path(cached)
    try:  # with budwood's YAML limits: a base's card is someone else's file
        meta = safeyaml.front_matter(readme.read_text(encoding="utf-8"), str(readme))
    except (OSError, UnicodeDecodeError, safeyaml.YamlError) as e:
        return BaseLicence(license_file=has_file, card=card,
                           unknown_because=f"its card's metadata cannot be read ({e.__class__.__name__})")
    found = BaseLicence(license=meta.get("license"), license_name=meta.get("license_name"),
                        license_link=meta.get("license_link"), license_file=has_file, card=card)
    if found.license is None:
        found.unknown_because = "its card states no licence"
    return found


def training_log(path: Path) -> dict | None:
    """What metrics.jsonl adds to budwood.json: how often validation loss was measured and its lowest point."""
    if not path.exists():
        return None
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    val = [r for r in rows if "val_loss" in r]
    best = min(val, key=lambda r: r["val_loss"]) if val else None
    return {"logged_steps": sum(1 for r in rows if "loss" in r), "val_points": len(val),
            "best_val_loss": best["val_loss"] if best else None, "best_val_step": best["step"] if best else None}


def accelerator_watts(name: str) -> float:
    upper = name.upper()
    return next((w for pattern, w in GPU_BOARD_WATTS if re.search(pattern, upper)), GPU_FALLBACK_WATTS)


def energy_estimate(hardware: dict, seconds: float | None) -> Energy | None:
    """kWh = (accelerator board power + CPU_WATTS_PER_THREAD x torch threads) x training time; an estimate,
    not a measurement (no metering, no data-centre overhead)."""
    if not seconds:
        return None
    threads = hardware.get("torch_threads") or hardware.get("cpu_count") or 1
    watts, parts = CPU_WATTS_PER_THREAD * threads, [f"{threads} CPU threads x {CPU_WATTS_PER_THREAD:g} W"]
    device = str(hardware.get("device", "cpu"))
    if not device.startswith("cpu"):
        accel = hardware.get("gpu") or ("Apple GPU" if device.startswith("mps") else f"{device} device")
        w = accelerator_watts(accel)
        watts += w
        parts.append(f"1 {accel} at {w:g} W")
    return Energy(kwh=watts * seconds / 3.6e6, watts=watts, basis=" + ".join(parts))
