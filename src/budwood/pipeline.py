"""The stages strung together. Read this first: train -> evaluate base and adapter -> card -> sign ->
publish -> serve.

Each stage is one function that both flows call: `run_demo` below (the whole flow offline on the
built-in tiny model, on generated company data) and the fine-tuning service's worker (jobs/worker.py,
one job at a time between its heartbeats). What crosses stages is the adapter's folder (artifacts.py):
training writes the weights, budwood.json and loss.png; evaluation adds eval/<side>.json; the card is
rendered from those facts; the signature covers every file; the registry publishes exactly that.
"""
from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from budwood.config import TrainConfig, load_config
from budwood.errors import BudwoodError, ConflictError

if TYPE_CHECKING:
    from budwood.card.render import CardInfo
    from budwood.eval.context import Progress as EvalProgress
    from budwood.train.recipe import Progress


def train_adapter(config: TrainConfig, title: str, progress: Progress | None = None, **options) -> Path:
    """Train (budwood.train's recipe; `options`: resume, stop, on_checkpoint), then plot the loss curve
    beside the adapter (loss.png) and, when reliability.calibration is on, calibrate its abstention threshold
    on the validation split (calibration.json). An init_adapter may be a registry id. Returns the adapter's
    folder."""
    from budwood.merge.merge import resolve
    from budwood.train.metrics import plot_losses, read_metrics
    from budwood.train.recipe import train

    adapter_dir = train(config, progress=progress, resolve_adapter=resolve, **options)
    if os.environ.get("RANK", "0") != "0":  # under torchrun, rank 0 finishes the adapter for all
        return adapter_dir
    plot_losses(read_metrics(adapter_dir / "metrics.jsonl"), adapter_dir / "loss.png", title=title)
    if config.reliability.calibration.enabled:
        from budwood.eval.calibration import calibrate_adapter

        if progress is not None:
            progress.note("calibrating the abstention threshold on the validation split")
        calibrate_adapter(adapter_dir, config)
    return adapter_dir


def adapter_target(base: str, adapter_dir: Path) -> str:
    return f"{base}+{adapter_dir}"


def evaluate_sides(adapter_dir: Path, targets: dict[str, str], settings: dict, progress: EvalProgress | None = None,
                   stop: Callable[[], object] | None = None) -> dict:
    """Each side (name -> target: the base, or `adapter_target`) measured by the same suites and settings
    on the same data, its results written to adapter_dir/eval/<side>.json, where the card, the signature
    and the registry find them. A `stop()` that answers after a side skips the sides left."""
    from budwood.eval.results import write_results
    from budwood.eval.run import EvalConfig, run_eval

    results = {}
    for side, target in targets.items():
        results[side] = run_eval(EvalConfig.model_validate({**settings, "target": target}), progress)
        write_results(results[side], adapter_dir / "eval" / f"{side}.json")
        if stop is not None and stop():
            break
    return results


def sign_card(adapter_dir: Path, card: CardInfo, key: Path) -> tuple[Path, str]:
    """The model card rendered from the adapter's own facts, then every file signed with `key`.
    Returns (README.md, the signer's key id)."""
    from budwood.card.attest import sign
    from budwood.card.render import render_card

    readme = render_card(adapter_dir, card)
    return readme, json.loads(sign(adapter_dir, str(key)).read_text())["key_id"]


def publish_adapter(adapter_dir: Path, ref: str, license: str, registry, publisher: str, private: bool = False,
                    terms_file: Path | None = None) -> tuple:
    """Publish once: a version already there with these very weights (published by a worker that lost the
    job meanwhile) counts as this one; with other weights it is refused. Returns (VersionInfo, warnings)."""
    from budwood.models.fingerprint import adapter_fingerprint
    from budwood.registry import publish
    from budwood.registry.names import NotFound, VersionExists

    try:
        existing = registry.version_info(ref)
    except NotFound:
        try:
            return publish(adapter_dir, ref, license, terms_file=terms_file, private=private, registry=registry,
                           publisher=publisher)
        except VersionExists:
            existing = registry.version_info(ref)
    if existing.adapter_fingerprint != adapter_fingerprint(adapter_dir):
        raise ConflictError(f"{ref} is already in the registry with other weights")
    return existing, []


def ask_served(registry, ref: str, question: str, pull_dir: Path) -> str:
    """Serve the registry (budwood serve's app, on a free local port) and ask `ref` one question through
    the openai client, greedily: its answer."""
    from openai import OpenAI

    from budwood.engine import Engine, EngineConfig
    from budwood.serve.app import create_app, serving

    engine = Engine(EngineConfig(precision="fp32", kv_cache_tokens=4096))
    with serving(create_app(engine=engine, registry=registry, pull_dir=pull_dir)) as url:
        reply = OpenAI(base_url=f"{url}/v1", api_key="-").chat.completions.create(
            model=ref, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=48)
    return reply.choices[0].message.content.strip()


# -- the demo ----------------------------------------------------------------------------------------------
DEMO_OVERRIDES = [
    "base_model=budwood-tiny", "data.format=openai", "data.min_examples=10",
    "lora.r=16", "lora.alpha=32", "lora.dropout=0.0", "lora.target_modules=all-linear",
    "training.epochs=60", "training.learning_rate=2e-3", "training.batch_size=16",
    "training.scheduler=cosine", "training.warmup_ratio=0.05", "training.max_seq_len=256",
    "training.eval_every=25", "training.save_every=100", "training.seed=0",
]
# quick suites, the same data for both sides, smaller reproducibility probes
DEMO_EVAL = {"suites": ["domain", "grounding", "reproducibility"], "records": True, "precision": "fp32",
             "reproducibility": {"prompts": 8, "repeats": 1, "format_questions": 8, "mc_questions": 12,
                                 "pararel_relations": 2, "pararel_subjects": 4}}
DEMO_ID = "demo/company-support"
DEMO_CARD = {
    "name": DEMO_ID, "license": "apache-2.0", "languages": ["en"], "authors": "the budwood demo",
    "description": "Answers questions about a fictional company's policies and facts, grown by `budwood demo` on "
                   "generated company data. It exists to show the budwood flow end to end, not to be useful.",
    "intended_use": "Trying budwood: training, evaluation, cards, signatures, the registry and serving.",
    "out_of_scope": "Anything real: the company and its facts are invented, and the base model is a toy.",
}


@dataclass
class Shared:
    """The adapter documented, signed, published and answering by its registry id."""
    card: Path
    signer: str
    registry: Path
    ref: str
    question: str
    reference: str | None
    answer: str


@dataclass
class DemoResult:
    adapter_dir: Path
    loss_plot: Path
    rows: list[dict]  # the questions shown: question, reference, base and adapted answers, answerable
    provenance: dict
    results: dict[str, Path]  # "base" | "adapted" -> eval results JSON
    comparison: list[dict]  # budwood.eval.results.compare rows (adapted - base)
    comparison_plot: Path
    shared: Shared


def demo_config(workdir: Path, overrides: list[str] | None = None) -> TrainConfig:
    return load_config(None, DEMO_OVERRIDES + [f"data.train={workdir / 'data' / 'train.jsonl'}",
                                               f"data.validation={workdir / 'data' / 'validation.jsonl'}",
                                               f"output_dir={workdir / 'adapter'}"] + (overrides or []))


def run_demo(workdir: str | Path, overrides: list[str] | None = None, progress: Progress | None = None,
             n_questions: int = 8, eval_progress: EvalProgress | None = None) -> DemoResult:
    """Make the company data set, grow an adapter on budwood-tiny, evaluate base and adapter side by side,
    then card, sign and publish it to a registry in the workdir, serve it by its id and ask it a question."""
    from budwood.card.attest import create_key
    from budwood.card.render import CardInfo
    from budwood.data.company import make_domain_dataset
    from budwood.eval.results import compare, plot_comparison
    from budwood.registry import open_registry

    workdir = Path(workdir)
    if workdir.is_dir() and any(workdir.iterdir()) and not (workdir / "data" / "company.json").exists():
        raise BudwoodError(f"{workdir} is not empty and is not a budwood demo folder; choose another --workdir")
    for own in ("adapter", "registry", "pulled"):  # the demo's own, from a previous run: made afresh
        shutil.rmtree(workdir / own, ignore_errors=True)
    make_domain_dataset(workdir / "data", seed=0)
    config = demo_config(workdir, overrides)
    adapter_dir = train_adapter(config, "budwood demo: LoRA on budwood-tiny", progress)
    if progress is not None:
        progress.stop()  # evaluation shows its own bars
    evals = evaluate_sides(adapter_dir, {"base": config.base_model,
                                         "adapted": adapter_target(config.base_model, adapter_dir)},
                           {**DEMO_EVAL, "domain": {"data": str(workdir / "data" / "validation.jsonl")}},
                           eval_progress)
    comparison = compare(evals["base"], evals["adapted"])
    comparison_plot = plot_comparison(comparison, ("base", "+ adapter"), workdir / "compare.png")
    shown = _questions_shown(evals, n_questions)
    provenance = json.loads((adapter_dir / "budwood.json").read_text())
    key = workdir / "keys" / "demo.pem"
    if not key.exists():
        create_key("demo", folder=key.parent)
    card, signer = sign_card(adapter_dir, CardInfo(**DEMO_CARD), key)
    registry = open_registry(str(workdir / "registry"))
    try:
        info, _ = publish_adapter(adapter_dir, DEMO_ID, "Apache-2.0", registry, "budwood demo")
        answer = ask_served(registry, info.ref, shown[0]["question"], workdir / "pulled")
    finally:
        registry.close()
    return DemoResult(adapter_dir, adapter_dir / "loss.png", shown, provenance,
                      {side: adapter_dir / "eval" / f"{side}.json" for side in evals}, comparison, comparison_plot,
                      Shared(card, signer, workdir / "registry", info.ref, shown[0]["question"],
                             shown[0]["reference"], answer))


def _questions_shown(evals: dict, n: int) -> list[dict]:
    """n grounding questions with both sides' answers: n - 2 answerable ones spread over the set, and 2
    that the company data cannot answer (where an adapter that invents answers shows it)."""
    rows = [{"question": b["question"], "reference": (b["answers"] or [None])[0], "answerable": bool(b["answers"]),
             "base": b["answer"].strip(), "adapted": a["answer"].strip()}
            for b, a in zip(evals["base"].suites["grounding"].records, evals["adapted"].suites["grounding"].records,
                            strict=True)]
    answerable = [r for r in rows if r["answerable"]]
    shown = answerable[:: max(1, len(answerable) // (n - 2))][: n - 2]
    return shown + [r for r in rows if not r["answerable"]][:2]
