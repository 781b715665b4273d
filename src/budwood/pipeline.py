"""The stages strung together. Read this first: data -> train -> look at the adapter.

The demo runs the whole flow offline on the built-in tiny model; later stages (evaluate, card,
publish) join here as they land, and the hosted service's workers call the same functions.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from budwood.config import TrainConfig, load_config
from budwood.errors import BudwoodError
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
    scores: dict  # {"base"|"adapted": {"exact": share of answerable held-out questions answered
    #              word for word, "abstained": share of unanswerable ones declined}}


def demo_config(workdir: Path, overrides: list[str] | None = None) -> TrainConfig:
    return load_config(None, DEMO_OVERRIDES + [f"data.train={workdir / 'data' / 'train.jsonl'}",
                                               f"data.validation={workdir / 'data' / 'validation.jsonl'}",
                                               f"output_dir={workdir / 'adapter'}"] + (overrides or []))


def run_demo(workdir: str | Path, overrides: list[str] | None = None, progress: Progress | None = None,
             n_questions: int = 8) -> DemoResult:
    """Make the company data set, grow an adapter on budwood-tiny, answer held-out questions."""
    from budwood.data.company import make_domain_dataset
    from budwood.engine import Engine, EngineConfig, SamplingParams
    from budwood.train.metrics import plot_losses, read_metrics

    workdir = Path(workdir)
    if workdir.is_dir() and any(workdir.iterdir()) and not (workdir / "data" / "company.json").exists():
        raise BudwoodError(f"{workdir} is not empty and is not a budwood demo folder; choose another --workdir")
    shutil.rmtree(workdir / "adapter", ignore_errors=True)  # the demo's own previous adapter
    paths = make_domain_dataset(workdir / "data", seed=0)
    config = demo_config(workdir, overrides)
    adapter_dir = train(config, progress=progress)

    system = json.loads((workdir / "data" / "company.json").read_text())["system"]
    heldout = [json.loads(x) for x in paths["heldout"].read_text().splitlines()]
    # base and adapted answers come from one engine, in one batch: rows pick their adapter
    engine = Engine(EngineConfig(base=config.base_model, precision="fp32", device="cpu"))
    engine.register_adapter("demo", adapter_dir)
    prompts = [engine.chat_prompt([{"role": "system", "content": system}, {"role": "user", "content": h["question"]}])
               for h in heldout]
    outs = engine.generate(prompts * 2, SamplingParams(max_tokens=64, temperature=0),
                           ["demo"] * len(prompts) + [None] * len(prompts))
    answers = [o.choices[0].text.strip() for o in outs]
    adapted, base = answers[:len(prompts)], answers[len(prompts):]
    rows = [{"question": h["question"], "reference": h["answer"], "answerable": h["answerable"],
             "base": b, "adapted": a} for h, b, a in zip(heldout, base, adapted, strict=True)]
    scores = {side: _score(rows, side) for side in ("base", "adapted")}
    answerable = [r for r in rows if r["answerable"]]
    shown = answerable[:: max(1, len(answerable) // (n_questions - 2))][: n_questions - 2]
    shown += [r for r in rows if not r["answerable"]][:2]
    metrics = read_metrics(adapter_dir / "metrics.jsonl")
    plot = plot_losses(metrics, adapter_dir / "loss.png", title="budwood demo: LoRA on budwood-tiny")
    provenance = json.loads((adapter_dir / "budwood.json").read_text())
    return DemoResult(adapter_dir, plot, shown, provenance, scores)


def _score(rows: list[dict], side: str) -> dict:
    """A first look only; `budwood eval` owns the real hallucination metrics."""
    norm = lambda text: " ".join(text.lower().split()).rstrip(".")  # noqa: E731
    answerable = [r for r in rows if r["answerable"]]
    unanswerable = [r for r in rows if not r["answerable"]]
    return {"exact": sum(norm(r[side]) == norm(r["reference"]) for r in answerable) / max(1, len(answerable)),
            "abstained": sum("don't know" in r[side].lower() for r in unanswerable) / max(1, len(unanswerable))}
