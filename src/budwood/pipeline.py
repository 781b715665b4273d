"""The stages strung together. Read this first: data -> train -> evaluate -> card -> sign -> publish -> serve.

The demo runs the whole flow offline on the built-in tiny model: company data, an adapter grown on
it, base and adapter measured by the same suites, a model card written from those facts, the adapter
signed and published to a registry, then served by its registry id and asked a question through the
openai client. The hosted service's workers call the same functions.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from budwood.config import TrainConfig, load_config
from budwood.errors import BudwoodError
from budwood.eval.context import Progress as EvalProgress
from budwood.train.recipe import Progress, train

DEMO_OVERRIDES = [
    "base_model=budwood-tiny", "data.format=openai", "data.min_examples=10",
    "lora.r=16", "lora.alpha=32", "lora.dropout=0.0", "lora.target_modules=all-linear",
    "training.epochs=60", "training.learning_rate=2e-3", "training.batch_size=16",
    "training.scheduler=cosine", "training.warmup_ratio=0.05", "training.max_seq_len=256",
    "training.eval_every=25", "training.save_every=100", "training.seed=0",
]


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


# the demo's evaluation: quick suites, same data for both sides, smaller reproducibility probes
DEMO_EVAL = {"suites": ["domain", "grounding", "reproducibility"], "records": True, "precision": "fp32",
             "reproducibility": {"prompts": 8, "repeats": 1, "format_questions": 8, "mc_questions": 12,
                                 "pararel_relations": 2, "pararel_subjects": 4}}


def demo_config(workdir: Path, overrides: list[str] | None = None) -> TrainConfig:
    return load_config(None, DEMO_OVERRIDES + [f"data.train={workdir / 'data' / 'train.jsonl'}",
                                               f"data.validation={workdir / 'data' / 'validation.jsonl'}",
                                               f"output_dir={workdir / 'adapter'}"] + (overrides or []))


def run_demo(workdir: str | Path, overrides: list[str] | None = None, progress: Progress | None = None,
             n_questions: int = 8, eval_progress: EvalProgress | None = None) -> DemoResult:
    """Make the company data set, grow an adapter on budwood-tiny, evaluate base and adapter side by side."""
    from budwood.data.company import make_domain_dataset
    from budwood.eval.results import compare, plot_comparison, write_results
    from budwood.eval.run import EvalConfig, run_eval
    from budwood.train.metrics import plot_losses, read_metrics

    workdir = Path(workdir)
    if workdir.is_dir() and any(workdir.iterdir()) and not (workdir / "data" / "company.json").exists():
        raise BudwoodError(f"{workdir} is not empty and is not a budwood demo folder; choose another --workdir")
    shutil.rmtree(workdir / "adapter", ignore_errors=True)  # the demo's own previous adapter
    make_domain_dataset(workdir / "data", seed=0)
    config = demo_config(workdir, overrides)
    adapter_dir = train(config, progress=progress)
    if progress is not None:
        progress.stop()  # evaluation shows its own bars

    # base and adapter evaluated by the same suites on the same data; the numbers land in the adapter's
    # eval/ folder, where the card, the signature and the registry find them
    evals, paths = {}, {}
    for side, target in (("base", config.base_model), ("adapted", f"{config.base_model}+{adapter_dir}")):
        cfg = EvalConfig.model_validate({**DEMO_EVAL, "target": target,
                                         "domain": {"data": str(workdir / "data" / "validation.jsonl")}})
        evals[side] = run_eval(cfg, eval_progress)
        paths[side] = write_results(evals[side], adapter_dir / "eval" / f"{side}.json")
    comparison = compare(evals["base"], evals["adapted"])
    compare_plot = plot_comparison(comparison, ("base", "+ adapter"), workdir / "compare.png")
    rows = [{"question": b["question"], "reference": (b["answers"] or [None])[0], "answerable": bool(b["answers"]),
             "base": b["answer"].strip(), "adapted": a["answer"].strip()}
            for b, a in zip(evals["base"].suites["grounding"].records, evals["adapted"].suites["grounding"].records,
                            strict=True)]
    answerable = [r for r in rows if r["answerable"]]
    shown = answerable[:: max(1, len(answerable) // (n_questions - 2))][: n_questions - 2]
    shown += [r for r in rows if not r["answerable"]][:2]
    metrics = read_metrics(adapter_dir / "metrics.jsonl")
    plot = plot_losses(metrics, adapter_dir / "loss.png", title="budwood demo: LoRA on budwood-tiny")
    provenance = json.loads((adapter_dir / "budwood.json").read_text())
    shared = share(workdir, adapter_dir, shown[0]["question"], shown[0]["reference"])
    return DemoResult(adapter_dir, plot, shown, provenance, paths, comparison, compare_plot, shared)


DEMO_ID = "demo/company-support"
DEMO_CARD = {
    "name": DEMO_ID, "license": "apache-2.0", "languages": ["en"], "authors": "the budwood demo",
    "description": "Answers questions about a fictional company's policies and facts, grown by `budwood demo` on "
                   "generated company data. It exists to show the budwood flow end to end, not to be useful.",
    "intended_use": "Trying budwood: training, evaluation, cards, signatures, the registry and serving.",
    "out_of_scope": "Anything real: the company and its facts are invented, and the base model is a toy.",
}


def share(workdir: Path, adapter_dir: Path, question: str, reference: str | None) -> Shared:
    """Card -> sign -> publish to a registry in the workdir -> serve it by id -> ask through the openai client."""
    from openai import OpenAI

    from budwood.card.attest import create_key, sign
    from budwood.card.render import CardInfo, render_card
    from budwood.engine import Engine, EngineConfig
    from budwood.registry import open_registry, publish
    from budwood.serve.app import create_app, serving

    card = render_card(adapter_dir, CardInfo(**DEMO_CARD))
    key = workdir / "keys" / "demo.pem"
    if not key.exists():
        create_key("demo", folder=key.parent)
    signer = json.loads(sign(adapter_dir, str(key)).read_text())["key_id"]
    shutil.rmtree(workdir / "registry", ignore_errors=True)  # the demo's own registry, fresh each run
    shutil.rmtree(workdir / "pulled", ignore_errors=True)
    registry = open_registry(str(workdir / "registry"))
    try:
        info, _ = publish(adapter_dir, DEMO_ID, "Apache-2.0", registry=registry, publisher="budwood demo")
        engine = Engine(EngineConfig(precision="fp32", kv_cache_tokens=4096))
        with serving(create_app(engine=engine, registry=registry, pull_dir=workdir / "pulled")) as url:
            client = OpenAI(base_url=f"{url}/v1", api_key="-")
            reply = client.chat.completions.create(model=info.ref, messages=[{"role": "user", "content": question}],
                                                   temperature=0, max_tokens=48)
    finally:
        registry.close()
    answer = reply.choices[0].message.content.strip()
    return Shared(card, signer, workdir / "registry", info.ref, question, reference, answer)
