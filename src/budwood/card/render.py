"""`budwood card`: the adapter's model card (README.md), rendered from the files beside the weights.

Hugging Face format: YAML metadata built with huggingface_hub's ModelCardData and EvalResult (so the Hub
reads `license`, `base_model`, `library_name: peft` and `model-index` as it reads its own), and a body
from templates/README.md.j2 with the sections of Mitchell et al. 2019, "Model Cards for Model Reporting".
Every statement comes from budwood.json, adapter_config.json, metrics.jsonl, eval/*.json, the base
model's own card, or what a person supplies in CardInfo; a fact none of them holds is shown as missing.
No clock is read: the same inputs give a byte-identical card.
"""
from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import jinja2
import yaml
from huggingface_hub import EvalResult, ModelCard, ModelCardData
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from budwood.card.facts import (
    BaseLicence,
    Energy,
    SuiteRun,
    base_licence,
    energy_estimate,
    hub_model_id,
    read_evaluations,
    read_json,
    results_base_fingerprint,
    training_log,
)
from budwood.card.reliability import ReliabilityFacts, reliability_facts
from budwood.config import load_settings
from budwood.errors import BudwoodError
from budwood.eval.results import Metric
from budwood.models.fingerprint import adapter_fingerprint
from budwood.models.names import TINY_NAME

MISSING = "_Not stated by the publisher._"
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts


class CardInfo(BaseModel):
    """What a person knows and no file records. Every field is optional: a missing one is shown as
    missing in the card, never filled in."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, description="registry / hub id, e.g. acme/support-bot")
    license: str | None = Field(None, description="the adapter's licence: an SPDX id as the Hub writes it "
                                                  "(apache-2.0, mit, cc-by-4.0), or 'other'")
    license_name: str | None = Field(None, description="short id of a custom licence (with license: other)")
    license_link: str | None = Field(None, description="URL or relative path of the licence or terms text")
    description: str | None = Field(None, description="what the adapter does, in a paragraph")
    intended_use: str | None = None
    out_of_scope: str | None = Field(None, description="uses it is not meant or not fit for")
    languages: list[str] = Field([], description="ISO 639-1 codes of the languages it was trained for, e.g. en")
    datasets: list[str] = Field([], description="hub ids of the training data, where it is published")
    authors: list[str] = []
    contact: str | None = None
    citation: str | None = Field(None, description="BibTeX to cite the adapter by")

    @field_validator("license")
    @classmethod
    def _hub_form(cls, value: str | None) -> str | None:
        return value.strip().lower() if value else None

    @field_validator("authors", "languages", "datasets", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        """A single value (as a CLI option gives it) is a list of one; None is none."""
        return [] if value is None else [value] if isinstance(value, str) else value

    @field_validator("datasets")
    @classmethod
    def _hub_datasets(cls, value: list[str]) -> list[str]:
        """The card's YAML `datasets` links to Hub data sets: a path or bare name would be refused by the Hub
        (local training files are listed under Training data from budwood.json anyway)."""
        bad = [d for d in value if hub_model_id(d) is None]
        if bad:
            raise ValueError(f"{', '.join(map(repr, bad))}: not a Hugging Face Hub data set id ORG/NAME (only "
                             "published data sets are named here; the training files are listed from budwood.json)")
        return value

    @model_validator(mode="after")
    def _custom_licence_is_named(self) -> CardInfo:
        if self.license == "other" and not (self.license_name and self.license_link):
            raise ValueError("license 'other' needs license_name and license_link (the Hub asks for both)")
        if self.license_name and self.license != "other":
            raise ValueError("license_name names a custom licence: set license to 'other' with it")
        return self


def load_card_info(path: str | Path | None = None, overrides: list[str] | None = None) -> CardInfo:
    """CardInfo from a YAML file and/or `key=value` overrides, as the CLI takes it."""
    return load_settings(CardInfo, path, overrides)


@dataclass
class CardFacts:
    """Everything the card states, gathered before anything is written."""

    adapter_dir: Path
    info: CardInfo
    provenance: dict  # budwood.json; {} for an adapter not trained by budwood
    base: str
    base_fingerprint: str | None
    adapter_config: dict
    adapter_fingerprint: str
    training_log: dict | None
    suites: dict[str, SuiteRun]
    absent_suites: list[str]
    base_licence: BaseLicence
    energy: Energy | None
    loss_plot: bool
    reliability: ReliabilityFacts

    @property
    def dirname(self) -> str:
        """The folder's name: what `budwood serve` and the examples call the adapter."""
        return self.adapter_dir.resolve().name

    @property
    def max_lora_rank(self) -> int:
        ranks = [self.adapter_config.get("r") or 0, *(self.adapter_config.get("rank_pattern") or {}).values()]
        return next((v for v in VLLM_LORA_RANKS if v >= max(ranks)), max(ranks))

    @property
    def citation_key(self) -> str:
        return re.sub(r"\W+", "_", self.info.name or self.dirname).strip("_").lower()

    def metric(self, suite: str, name: str, column: str | None = None) -> Metric | None:
        """The adapter's metric (or a comparison column's), None where that suite or metric was not run."""
        run = self.suites.get(suite)
        if run is None:
            return None
        side = run.adapter if column is None else run.columns.get(column)
        return side.suite.metrics.get(name) if side else None


def collect_facts(adapter_dir: str | Path, info: CardInfo | None = None) -> CardFacts:
    """Read the adapter directory; refuse results that do not belong to these weights."""
    from budwood.eval.run import SUITES

    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise BudwoodError(f"{adapter_dir}: no such adapter directory")
    # an adapter made elsewhere (plain peft) has no budwood.json: its card says what is not recorded
    provenance = read_json(adapter_dir / "budwood.json") if (adapter_dir / "budwood.json").exists() else {}
    config = read_json(adapter_dir / "adapter_config.json")
    recorded = provenance.get("base_model") if isinstance(provenance.get("base_model"), dict) else {}
    base = recorded.get("name") or config.get("base_model_name_or_path")
    if not base:
        raise BudwoodError(f"{adapter_dir}: names no base model (budwood.json base_model.name or "
                           "adapter_config.json base_model_name_or_path)")
    fingerprint = adapter_fingerprint(adapter_dir)
    base_fp = recorded.get("fingerprint") or results_base_fingerprint(adapter_dir, fingerprint)
    suites = read_evaluations(adapter_dir, fingerprint, base_fp, list(SUITES))
    return CardFacts(
        adapter_dir=adapter_dir, info=info or CardInfo(), provenance=provenance, base=base, base_fingerprint=base_fp,
        adapter_config=config, adapter_fingerprint=fingerprint,
        training_log=training_log(adapter_dir / "metrics.jsonl"), suites=suites,
        absent_suites=[s for s in SUITES if s not in suites and _applies(SUITES[s], provenance)],
        base_licence=base_licence(base),
        energy=energy_estimate(provenance.get("hardware") or {}, provenance.get("train_time_s")),
        loss_plot=(adapter_dir / "loss.png").exists(),
        reliability=reliability_facts(adapter_dir, provenance, fingerprint, suites))


def _applies(suite, provenance: dict) -> bool:
    """Whether a suite not run counts as missing from the card: a suite that measures only some adapters (the
    tools suite: those trained on tool calls) says so with `applies(provenance)`."""
    applies = getattr(suite, "applies", None)
    return applies is None or bool(applies(provenance))


def card_data(facts: CardFacts) -> ModelCardData:
    """The YAML metadata: one EvalResult per adapter metric that has a value, grouped by suite. `base_model`
    (and its `base_model:adapter:` tag) only where the base is a Hub id ORG/NAME: the Hub refuses
    budwood-tiny or a local path there; the body and `budwood.base_model` still name it."""
    results = []
    for run in facts.suites.values():
        suite = run.adapter.suite
        data = ", ".join(dict.fromkeys(d.name for d in suite.data)) or suite.name
        for name, m in suite.metrics.items():
            if m.value is None or not math.isfinite(m.value):
                continue
            ci = f", 95% CI [{m.ci[0]:.4g}, {m.ci[1]:.4g}]" if m.ci else ""
            results.append(EvalResult(task_type="text-generation", task_name=f"budwood {suite.name} v{suite.version}",
                                      dataset_type=suite.name, dataset_name=data, metric_type=name,
                                      metric_value=m.value, metric_name=f"{name} (n={m.n}{ci})"))
    info = facts.info
    own = {"name": info.name, "summary": info.description, "base_model": facts.base,
           "adapter_fingerprint": facts.adapter_fingerprint, "base_fingerprint": facts.base_fingerprint}
    hub_base = hub_model_id(facts.base)
    return ModelCardData(
        license=info.license, license_name=info.license_name, license_link=info.license_link,
        base_model=hub_base, library_name="peft", pipeline_tag="text-generation",
        tags=[*([f"base_model:adapter:{hub_base}"] if hub_base else []), "lora", "peft", "budwood"],
        datasets=info.datasets or None,
        language=info.languages or None, model_name=info.name or facts.dirname, eval_results=results or None,
        budwood={k: v for k, v in own.items() if v is not None})


def _cell(value: object) -> str:
    """A markdown table cell: a `|` would end the cell and a newline the row."""
    return str(value).replace("|", "\\|").replace("\r\n", "<br>").replace("\n", "<br>")


def _num(value: object) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return str(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:.4g}"


def _measured(m: Metric | None) -> str:
    """A before/after cell: the value and its 95% interval, or n/a where that side did not measure it."""
    if m is None or m.value is None:
        return "n/a"
    return f"{m.value:.3g} [{m.ci[0]:.3g}, {m.ci[1]:.3g}]" if m.ci else f"{m.value:.3g}"


def _setting(value: object) -> str:
    """A config value as YAML writes it, so the table reads like the config file."""
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).removesuffix("\n...\n").strip()


_ENV = jinja2.Environment(loader=jinja2.PackageLoader("budwood.card", "templates"), autoescape=False,
                          undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                          keep_trailing_newline=True)
_ENV.filters.update(
    cell=_cell, num=_num, setting=_setting, measured=_measured,
    json=lambda v: json.dumps(v, ensure_ascii=False),  # a setting's value, strings quoted: no ambiguous "; "
    pct=lambda v: "n/a" if v is None else f"{100 * v:.0f}%",
    points=lambda v: "n/a" if v is None else f"{100 * v:.0f} percentage points",
    interval=lambda ci: f"[{ci[0]:.4g}, {ci[1]:.4g}]" if ci else "",
    pct_interval=lambda ci: f"{100 * ci[0]:.0f}-{100 * ci[1]:.0f}%" if ci else "",
    short=lambda fp: str(fp).removeprefix("sha256:")[:12] if fp else "n/a",
    known=lambda v: "_not recorded_" if v is None else v)


def render_text(facts: CardFacts) -> str:
    body = _ENV.get_template("README.md.j2").render(f=facts, info=facts.info, prov=facts.provenance,
                                                    MISSING=MISSING, TINY_NAME=TINY_NAME)
    return f"---\n{card_data(facts).to_yaml()}\n---\n\n{body}"


def render_card(adapter_dir: str | Path, info: CardInfo | None = None) -> Path:
    """Write ADAPTER_DIR/README.md (replacing peft's placeholder or an older card) in one atomic step."""
    facts = collect_facts(adapter_dir, info)
    content = render_text(facts)
    ModelCard(content)  # the Hub's own parser must read back what is written
    path = facts.adapter_dir / "README.md"
    tmp = path.with_name("README.md.tmp")
    tmp.write_text(content, encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_card_metadata(path_or_dir: str | Path) -> dict:
    """An existing card's YAML metadata (license, base_model, model-index, budwood.name / summary, ...),
    read with huggingface_hub's parser; {} when the card has none."""
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / "README.md"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BudwoodError(f"{path}: no model card there") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BudwoodError(f"{path}: cannot read the model card ({e.__class__.__name__})") from None
    if not text.lstrip().startswith("---"):
        return {}
    from budwood.safeyaml import front_matter

    front_matter(text, str(path))  # size, depth and alias limits before huggingface_hub's parser expands anything
    try:
        return ModelCard(text).data.to_dict()
    except (ValueError, yaml.YAMLError) as e:
        raise BudwoodError(f"{path}: malformed YAML metadata: {str(e).splitlines()[0]}") from None
