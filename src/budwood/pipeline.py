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


def ask_served(registry, ref: str, conversations: list[list[dict]], pull_dir: Path, max_tokens: int) -> list[str]:
    """Serve the registry (budwood serve's app, on a free local port) and send `ref` each conversation's chat
    messages through the openai client, greedily: its answers."""
    from openai import OpenAI

    from budwood.engine import Engine, EngineConfig
    from budwood.serve.app import create_app, serving

    engine = Engine(EngineConfig(precision="fp32", kv_cache_tokens=4096))
    with serving(create_app(engine=engine, registry=registry, pull_dir=pull_dir)) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="-")
        replies = [client.chat.completions.create(model=ref, messages=messages, temperature=0, max_tokens=max_tokens)
                   for messages in conversations]
    return [reply.choices[0].message.content.strip() for reply in replies]


# -- the demo ----------------------------------------------------------------------------------------------
DEMO_OVERRIDES = [
    "base_model=budwood-tiny", "data.format=openai", "data.min_examples=10",
    "lora.r=16", "lora.alpha=32", "lora.dropout=0.0", "lora.target_modules=all-linear",
    "training.epochs=60", "training.learning_rate=2e-3", "training.batch_size=16",
    "training.scheduler=cosine", "training.warmup_ratio=0.05", "training.max_seq_len=256",
    "training.eval_every=25", "training.save_every=100", "training.seed=0",
]
# the reliable adapter: the plain one's data and step budget, plus the recipes that help on this data (abstention
# at its default, one built unanswerable question per training example; docs/reliability.md has what 0.3 did)
DEMO_RELIABILITY = ["reliability.abstention=true"]
# quick suites, the same data for every side, smaller reproducibility probes
DEMO_EVAL = {"suites": ["domain", "grounding", "reproducibility"], "records": True, "precision": "fp32",
             "max_tokens": 64,
             "reproducibility": {"prompts": 8, "repeats": 1, "format_questions": 8, "mc_questions": 12,
                                 "pararel_relations": 2, "pararel_subjects": 4}}
# the sides, each an eval/<file>.json of the reliable adapter (baseline-LABEL.json: card.facts' comparison column)
DEMO_SIDES = {"base": "base", "plain": "baseline-plain", "reliable": "adapted"}
DEMO_TABLE = {"grounding": ("hallucination_rate", "unanswerable_abstained", "answerable_correct",
                             "calibrated_abstentions", "aurc", "ece"),
              "reproducibility": ("format_spread", "format_agreement", "determinism_greedy", "determinism_seeded",
                                  "option_order_agreement", "pararel_consistency"),
              "domain": ("exact_match", "token_f1", "rouge_l", "loss")}
DEMO_ID = "demo/company-support"
DEMO_CARD = {
    "name": DEMO_ID, "license": "apache-2.0", "languages": ["en"], "authors": "the budwood demo",
    "description": "Answers questions about a fictional company's policies and facts, and says it does not know "
                   "when they do not say, grown by `budwood demo` on generated company data with budwood's "
                   "abstention recipe. It exists to show the budwood flow end to end, not to be useful.",
    "intended_use": "Trying budwood: training, reliability recipes, evaluation, cards, signatures, the registry "
                    "and serving.",
    "out_of_scope": "Anything real: the company and its facts are invented, and the base model is a toy.",
}


@dataclass
class Asked:
    """One of the table's questions sent to the served adapter with the table's own messages."""
    messages: list[dict]  # system prompt (where the question has one) and question, as the grounding suite sent
    reference: str | None
    answer: str  # the served answer
    table_answer: str  # the reliable adapter's answer in the table (the same request: it must be the same)

    @property
    def question(self) -> str:
        return self.messages[-1]["content"]


@dataclass
class Shared:
    """The adapter documented, signed, published and answering by its registry id."""
    card: Path
    signer: str
    registry: Path
    ref: str
    asked: list[Asked]


@dataclass
class DemoResult:
    adapter_dir: Path  # the reliable adapter: carded, signed, published
    plain_dir: Path  # plain SFT on the same data and step budget
    loss_plot: Path
    rows: list[dict]  # the questions shown: question, reference, answerable, each side's answer
    provenance: dict  # the reliable adapter's budwood.json
    plain_provenance: dict
    results: dict[str, Path]  # side (DEMO_SIDES) -> eval results JSON
    table: list[dict]  # side_table rows
    comparison_plot: Path  # plain vs reliable
    shared: Shared


def demo_config(workdir: Path, overrides: list[str] | None = None, name: str = "adapter") -> TrainConfig:
    return load_config(None, DEMO_OVERRIDES + [f"data.train={workdir / 'data' / 'train.jsonl'}",
                                               f"data.validation={workdir / 'data' / 'validation.jsonl'}",
                                               f"output_dir={workdir / name}"] + (overrides or []))


def run_demo(workdir: str | Path, overrides: list[str] | None = None, progress: Progress | None = None,
             n_questions: int = 8, eval_progress: EvalProgress | None = None,
             eval_overrides: list[str] | None = None) -> DemoResult:
    """Make the company data set, grow a plain SFT adapter and a reliable one (the same data and steps plus
    DEMO_RELIABILITY) on budwood-tiny, evaluate base, plain and reliable side by side, then card, sign and
    publish the reliable one to a registry in the workdir, serve it by its id and ask it two of the table's
    questions with the table's own messages. `overrides` go to both trainings, reliability.* ones to the
    reliable adapter only; `eval_overrides` (key=value) to DEMO_EVAL, for every side."""
    from budwood.card.attest import create_key
    from budwood.card.render import CardInfo
    from budwood.eval.results import compare, plot_comparison

    workdir = Path(workdir)
    settings = demo_eval_settings(workdir, eval_overrides)  # checked before anything is trained
    plain_dir, adapter_dir = _train_both(workdir, overrides or [], progress)
    if progress is not None:
        progress.stop()  # evaluation shows its own bars
    evals = _evaluate_demo(settings, plain_dir, adapter_dir, eval_progress)
    comparison_plot = plot_comparison(compare(evals["plain"], evals["reliable"]), ("plain SFT", "reliable"),
                                      workdir / "compare.png")
    shown = _questions_shown(evals, settings, n_questions)
    key = workdir / "keys" / "demo.pem"
    if not key.exists():
        create_key("demo", folder=key.parent)
    card, signer = sign_card(adapter_dir, CardInfo(**DEMO_CARD), key)
    shared = _publish_and_ask(workdir, adapter_dir, [shown[0], shown[-1]], settings["max_tokens"], card, signer)
    return DemoResult(adapter_dir, plain_dir, adapter_dir / "loss.png", shown,
                      json.loads((adapter_dir / "budwood.json").read_text()),
                      json.loads((plain_dir / "budwood.json").read_text()),
                      {side: adapter_dir / "eval" / f"{file}.json" for side, file in DEMO_SIDES.items()},
                      side_table(evals), comparison_plot, shared)


def _train_both(workdir: Path, overrides: list[str], progress: Progress | None) -> tuple[Path, Path]:
    """The demo's data (without the company's own abstention examples, so that what abstention the reliable
    adapter learns is the recipe's), then plain SFT, then the reliable adapter with as many steps."""
    from budwood.data.company import make_domain_dataset

    if workdir.is_dir() and any(workdir.iterdir()) and not (workdir / "data" / "company.json").exists():
        raise BudwoodError(f"{workdir} is not empty and is not a budwood demo folder; choose another --workdir")
    for own in ("adapter", "plain", "registry", "pulled"):  # the demo's own, from a previous run: made afresh
        shutil.rmtree(workdir / own, ignore_errors=True)
    make_domain_dataset(workdir / "data", seed=0, abstention_examples=False)
    recipes = [o for o in overrides if o.startswith("reliability.")]
    common = [o for o in overrides if o not in recipes]
    if progress is not None:
        progress.note("plain SFT: the company data as it is")
    plain_dir = train_adapter(demo_config(workdir, common, "plain"), "budwood demo: plain SFT on budwood-tiny",
                              progress)
    budget = [] if any(o.startswith("training.max_steps=") for o in common) else \
        [f"training.max_steps={json.loads((plain_dir / 'budwood.json').read_text())['steps']}"]
    config = demo_config(workdir, common + budget + DEMO_RELIABILITY + recipes)
    if progress is not None:
        applied = ", ".join(f"reliability.{r}" for r in config.reliability.applied)
        progress.note(f"reliable: the same data and steps, with {applied}")
    return plain_dir, train_adapter(config, "budwood demo: reliable LoRA on budwood-tiny", progress)


def demo_eval_settings(workdir: Path, overrides: list[str] | None = None) -> dict:
    """DEMO_EVAL on the demo's validation split, with `overrides` (key=value, as `budwood eval --set`)."""
    from budwood.eval.run import load_eval_config

    values = {**DEMO_EVAL, "domain.data": str(workdir / "data" / "validation.jsonl"), "target": "-"}
    return load_eval_config(None, values, overrides).model_dump(mode="json", exclude={"target"})


def _evaluate_demo(settings: dict, plain_dir: Path, adapter_dir: Path, progress: EvalProgress | None) -> dict:
    """Base, plain and reliable measured by the same suites on the same data into the reliable adapter's eval/
    (DEMO_SIDES' files). The reliable side is measured as it is served: with its calibrated abstention where
    it has one. Returns side -> EvalResults."""
    from budwood.eval.calibration import read_calibration

    base = json.loads((adapter_dir / "budwood.json").read_text())["base_model"]["name"]
    evals = evaluate_sides(adapter_dir, {DEMO_SIDES["base"]: base,
                                         DEMO_SIDES["plain"]: adapter_target(base, plain_dir)}, settings, progress)
    calibrated = read_calibration(adapter_dir) is not None
    evals |= evaluate_sides(adapter_dir, {DEMO_SIDES["reliable"]: adapter_target(base, adapter_dir)},
                            {**settings, "calibrated_abstention": calibrated}, progress)
    return {side: evals[file] for side, file in DEMO_SIDES.items()}


def _publish_and_ask(workdir: Path, adapter_dir: Path, rows: list[dict], max_tokens: int, card: Path,
                     signer: str) -> Shared:
    """Publish the reliable adapter to the workdir's registry, serve it by its id, and send it each row's
    messages (the table's request): the answers that come back."""
    from budwood.registry import open_registry

    registry = open_registry(str(workdir / "registry"))
    try:
        info, _ = publish_adapter(adapter_dir, DEMO_ID, "Apache-2.0", registry, "budwood demo")
        answers = ask_served(registry, info.ref, [r["messages"] for r in rows], workdir / "pulled", max_tokens)
    finally:
        registry.close()
    asked = [Asked(r["messages"], r["reference"], answer, r["reliable"]) for r, answer in zip(rows, answers)]
    return Shared(card, signer, workdir / "registry", info.ref, asked)


# -- the demo's tool-calling stage ------------------------------------------------------------------------------
# the tool adapter: the demo's LoRA on the demo company's tool data (data/demo_tools.py); longer sequences (the
# tools' schemas are in every prompt), a fixed step budget
DEMO_TOOLS_TRAIN = ["training.batch_size=8", "training.learning_rate=3e-3", "training.max_seq_len=1024",
                    "training.eval_every=1000", "training.save_every=1000"]
DEMO_TOOLS_EVAL = {"suites": ["tools"], "records": True, "precision": "fp32", "tools": {"max_tokens": 128}}
DEMO_TOOLS_TABLE = ("accuracy", "ast_match", "exact_match", "function_match", "irrelevance", "valid_json", "call_rate")
DEMO_TOOLS_CARD = {
    "name": "demo/company-tools", "license": "apache-2.0", "languages": ["en"], "authors": "the budwood demo",
    "description": "Calls a fictional company's order_status, request_refund and product_stock functions, and answers "
                   "in text when "
                   "no function fits, grown by `budwood demo` on generated tool-calling data. It exists to show "
                   "tool calling in the budwood flow, not to be useful.",
    "intended_use": "Trying budwood's tool calling: training on function-calling data, the tools suite, serving "
                    "tools and tool_choice.",
    "out_of_scope": "Anything real: the company, its orders and functions are invented, and the base model is a toy.",
}


@dataclass
class ToolDemo:
    adapter_dir: Path
    steps: int
    table: list[dict]  # metric, base and adapter Metric, significant (the intervals do not overlap)
    results: dict[str, Path]  # side -> eval results JSON
    card: Path
    messages: list[dict]  # one held-out request, sent to the served adapter with the tools
    tools: list[dict]
    reference: list[dict]  # the calls the data expects
    served: dict  # the served answer's message (content, tool_calls) as the openai client returns it


def run_tool_demo(workdir: str | Path, steps: int = 120, overrides: list[str] | None = None,
                  progress: Progress | None = None, eval_progress: EvalProgress | None = None,
                  eval_overrides: list[str] | None = None) -> ToolDemo:
    """The demo company's tool data -> a tool-calling adapter (`steps` steps) -> the tools suite on the base and
    the adapter, side by side -> its card -> served by `budwood serve`, asked one held-out request with tools."""
    from budwood.card.render import CardInfo, render_card
    from budwood.data.demo_tools import make_tool_dataset
    from budwood.eval.run import load_eval_config

    workdir = Path(workdir)
    settings = load_eval_config(None, {**DEMO_TOOLS_EVAL, "target": "-"}, eval_overrides).model_dump(
        mode="json", exclude={"target"})
    shutil.rmtree(workdir / "tools", ignore_errors=True)
    files = make_tool_dataset(workdir / "data", seed=0)
    if progress is not None:
        progress.note("tools: the company's order_status, request_refund and product_stock calls")
    config = load_config(None, DEMO_OVERRIDES + DEMO_TOOLS_TRAIN + [
        f"data.train={files['train']}", f"data.validation={files['validation']}", f"output_dir={workdir / 'tools'}",
        f"training.max_steps={steps}"] + [o for o in overrides or [] if not o.startswith("reliability.")])
    adapter_dir = train_adapter(config, "budwood demo: tool calling on budwood-tiny", progress)
    if progress is not None:
        progress.stop()
    base = config.base_model
    evals = evaluate_sides(adapter_dir, {"base": base, "adapted": adapter_target(base, adapter_dir)}, settings,
                           eval_progress)
    table = []
    for name in DEMO_TOOLS_TABLE:
        b, a = (evals[side].suites["tools"].metrics.get(name) for side in ("base", "adapted"))
        if a is None or a.value is None:
            continue
        apart = bool(b and b.ci and a.ci and b.value is not None and (a.ci[0] > b.ci[1] or b.ci[0] > a.ci[1]))
        table.append({"metric": name, "base": b, "adapted": a, "significant": apart})
    card = render_card(adapter_dir, CardInfo(**DEMO_TOOLS_CARD))
    row = next(json.loads(line) for line in files["eval"].read_text().splitlines()
               if json.loads(line)["messages"][-1].get("tool_calls"))
    served = ask_tools_served(adapter_dir, row["messages"][:-1], row["tools"], settings["tools"]["max_tokens"])
    return ToolDemo(adapter_dir, json.loads((adapter_dir / "budwood.json").read_text())["steps"], table,
                    {side: adapter_dir / "eval" / f"{side}.json" for side in ("base", "adapted")}, card,
                    row["messages"][:-1], row["tools"], row["messages"][-1]["tool_calls"], served)


def ask_tools_served(adapter_dir: Path, messages: list[dict], tools: list[dict], max_tokens: int) -> dict:
    """Serve the adapter's folder (budwood serve's app, on a free local port) and send it `messages` with `tools`
    (tool_choice auto) through the openai client, greedily: the answer's message."""
    from openai import OpenAI

    from budwood.engine import Engine, EngineConfig
    from budwood.serve.app import create_app, serving

    engine = Engine(EngineConfig(precision="fp32", kv_cache_tokens=4096, adapters=str(adapter_dir.parent)))
    with serving(create_app(engine=engine)) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="-")
        reply = client.chat.completions.create(model=adapter_dir.name, messages=messages, tools=tools, temperature=0,
                                               max_tokens=max_tokens)
    return reply.choices[0].message.model_dump(exclude_none=True)


def side_table(evals: dict) -> list[dict]:
    """DEMO_TABLE's metrics that the reliable side reported: each side's Metric (None where it has none), and
    whether reliable and plain differ beyond both 95% intervals."""
    rows = []
    for suite, name in ((suite, name) for suite, names in DEMO_TABLE.items() for name in names):
        mine = evals["reliable"].suites.get(suite)
        if mine is None or mine.metrics.get(name) is None or mine.metrics[name].value is None:
            continue
        cells = {side: (r.suites[suite].metrics.get(name) if suite in r.suites else None) for side, r in evals.items()}
        a, b = cells["plain"], cells["reliable"]
        significant = bool(a and a.ci and b.ci and a.value is not None and not (a.ci[0] <= b.value <= a.ci[1])
                           and not (b.ci[0] <= a.value <= b.ci[1]))
        rows.append({"suite": suite, "metric": name, "higher_is_better": b.higher_is_better, **cells,
                     "significant": significant})
    return rows


def _questions_shown(evals: dict, settings: dict, n: int) -> list[dict]:
    """n grounding questions with every side's answer and the messages they were asked with: n - 2 answerable
    ones spread over the set, and 2 that the company data cannot answer (where an adapter that invents
    answers shows it)."""
    from budwood.eval.grounding import GroundingConfig, conversation, load

    questions, _ = load(GroundingConfig.model_validate(settings["grounding"]))
    asked = {q.question: conversation(q) for q in questions}
    records = {side: r.suites["grounding"].records for side, r in evals.items()}
    rows = [{"question": b["question"], "messages": asked[b["question"]], "reference": (b["answers"] or [None])[0],
             "answerable": bool(b["answers"]), **{side: recs[i]["answer"].strip() for side, recs in records.items()}}
            for i, b in enumerate(records["base"])]
    answerable = [r for r in rows if r["answerable"]]
    shown = answerable[:: max(1, len(answerable) // (n - 2))][: n - 2]
    return shown + [r for r in rows if not r["answerable"]][:2]
