"""The model card: Hub metadata, facts from files (missing ones shown missing), results tied to the weights.

Fixture adapters are written by hand (no model is loaded). The golden card is regenerated with
BUDWOOD_REGEN_GOLDEN=1 .venv/bin/python -m pytest tests/unit/card
"""
import json
import os
import struct
from pathlib import Path

import numpy as np
import pytest
import yaml
from huggingface_hub import ModelCard
from pydantic import ValidationError

from budwood.card.facts import energy_estimate
from budwood.card.render import CardInfo, load_card_info, read_card_metadata, render_card
from budwood.errors import BudwoodError, ConfigError
from budwood.eval.results import DataRef, EvalResults, Metric, SuiteResult, write_results
from budwood.eval.targets import TargetInfo
from budwood.models.fingerprint import adapter_fingerprint

GOLDEN = Path(__file__).parent / "golden" / "README.md"
BASE_FP = "sha256:" + "b" * 64
DOMAIN_DATA = DataRef(name="support eval set", path="/data/support/eval.jsonl", sha256="d" * 64)
FACTS_DATA = DataRef(name="support facts", path="/data/support/facts.jsonl", sha256="f" * 64, licence="CC-BY-4.0")
FULL_INFO = CardInfo(name="acme/support-bot", license="Apache-2.0", description="Answers questions about Acme's "
                     "products.", intended_use="Customer support drafts, reviewed by a person.",
                     out_of_scope="Legal or medical advice.", languages=["en"], datasets=["acme/support-faq"],
                     authors=["Ada Example"], contact="ml@acme.example")


def make_adapter(root: Path, base: str = "budwood-tiny", train_time_s: float = 120.0, hardware: dict | None = None,
                 name: str = "support-bot") -> Path:
    """An adapter directory as training leaves it: peft files, budwood.json, metrics.jsonl, peft's placeholder card."""
    out = root / name
    out.mkdir(parents=True)
    (out / "adapter_config.json").write_text(json.dumps({
        "base_model_name_or_path": base, "peft_type": "LORA", "r": 8, "lora_alpha": 16.0, "lora_dropout": 0.0,
        "target_modules": ["v_proj", "q_proj"], "task_type": "CAUSAL_LM", "use_rslora": False, "use_dora": False}))
    # written byte by byte so the fingerprint (and the golden card) does not depend on the safetensors version
    header = json.dumps({"base_model.model.layers.0.self_attn.q_proj.lora_A.weight":
                         {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}).encode()
    header += b" " * (-len(header) % 8)
    weights = np.arange(4, dtype="<f4").tobytes()
    (out / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + weights)
    provenance = {
        "budwood_version": "0.1.0", "base_model": {"name": base, "fingerprint": BASE_FP},
        "data": {"train": {"path": "/data/support/train.jsonl", "format": "openai", "examples": 120,
                           "fingerprint": "sha256:" + "1" * 64},
                 "validation": {"path": "/data/support/validation.jsonl", "examples": 30,
                                "fingerprint": "sha256:" + "2" * 64, "split": None}},
        "config": {"base_model": base,
                   "lora": {"r": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": "all-linear", "use_rslora": False},
                   "training": {"epochs": 3.0, "max_steps": None, "learning_rate": 0.0002, "batch_size": 8, "seed": 0}},
        "config_hash": "0123456789abcdef",
        "versions": {"budwood": "0.1.0", "python": "3.11.7", "torch": "2.4.0", "peft": "0.17.0"},
        "hardware": hardware or {"platform": "Linux-x86_64", "cpu": "x86_64", "cpu_count": 4, "torch_threads": 4,
                                 "device": "cpu", "dtype": "float32"},
        "steps": 45, "epochs": 3.0, "tokens_seen": 90000, "trained_tokens": 30000, "wall_time_s": 130.0,
        "train_time_s": train_time_s, "final": {"train_loss": 0.25, "val_loss": 0.5}, "data_warnings": 0,
        "created": "2026-01-02T03:04:05Z"}
    (out / "budwood.json").write_text(json.dumps(provenance, indent=2))
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 1, "loss": 2.0}, {"step": 20, "val_loss": 0.7}, {"step": 40, "val_loss": 0.45},
        {"step": 45, "loss": 0.25}, {"step": 45, "val_loss": 0.5}]))
    (out / "README.md").write_text("---\nlibrary_name: peft\n---\n# Model Card for Model ID\n")
    return out


def grounding(correct: float = 0.55, n: int = 40, hallucination: float = 0.35, sha: str = "f" * 64) -> SuiteResult:
    m = lambda v, k, better=True: Metric(value=v, ci=(max(0.0, v - 0.1), min(1.0, v + 0.1)), n=k,  # noqa: E731
                                         higher_is_better=better)
    return SuiteResult(name="grounding", version="1.0", data=[FACTS_DATA.model_copy(update={"sha256": sha})], metrics={
        "hallucination_rate": m(hallucination, n + 10, False), "answerable_correct": m(correct, n),
        "answerable_wrong": m(round(1 - correct - 0.05, 4), n, False), "answerable_abstained": m(0.05, n, False),
        "unanswerable_abstained": m(0.3, 10), "unanswerable_answered": m(0.7, 10, False)})


def domain(exact: float = 0.5, note: str | None = None) -> SuiteResult:
    return SuiteResult(name="domain", version="1.0", data=[DOMAIN_DATA], metrics={
        "exact_match": Metric(value=exact, ci=(exact - 0.2, exact + 0.2), n=30, higher_is_better=True, note=note),
        "loss": Metric(value=None, n=0, note="local targets only")})


def write_eval(adapter: Path, file: str, suites: list[SuiteResult], *, adapter_fp: str | None = None,
               base_fp: str = BASE_FP, kind: str = "adapter", created: str = "2026-01-03T00:00:00+00:00") -> Path:
    """A results file for the adapter itself (kind='adapter'), its bare base ('base') or an endpoint ('openai')."""
    if kind == "openai":
        target = TargetInfo(spec="openai:http://127.0.0.1:9/v1#gpt-x", kind="openai", model="gpt-x",
                            endpoint="http://127.0.0.1:9/v1")
    else:
        fp = (adapter_fp or adapter_fingerprint(adapter)) if kind == "adapter" else None
        target = TargetInfo(spec="budwood-tiny", kind="local", base="budwood-tiny", base_fingerprint=base_fp,
                            adapter=str(adapter) if fp else None, adapter_fingerprint=fp, precision="float32",
                            device="cpu")
    results = EvalResults(target=target, config={"limit": None}, software={"budwood": "0.1.0"}, created=created,
                          seconds=1.0, suites={s.name: s for s in suites})
    return write_results(results, adapter / "eval" / file)


def front_matter(card: str) -> dict:
    assert card.startswith("---\n")
    return yaml.safe_load(card.split("---\n", 2)[1])


def render(adapter: Path, info: CardInfo | None = None) -> str:
    return render_card(adapter, info).read_text(encoding="utf-8")


@pytest.fixture
def adapter(tmp_path: Path) -> Path:
    out = make_adapter(tmp_path)
    write_eval(out, "adapter.json", [domain(), grounding()])
    return out


def test_metadata_has_the_hub_fields_and_the_results_values(adapter):
    meta = front_matter(render(adapter, FULL_INFO))
    assert meta["license"] == "apache-2.0"  # lower-case, as the Hub writes SPDX ids
    assert "base_model" not in meta and meta["budwood"]["base_model"] == "budwood-tiny"  # not a Hub id
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-generation"
    assert {"lora", "peft", "budwood"} <= set(meta["tags"]) and not any(t.startswith("base_model:")
                                                                      for t in meta["tags"])
    assert meta["language"] == ["en"] and meta["datasets"] == ["acme/support-faq"]
    (index,) = meta["model-index"]
    assert index["name"] == "acme/support-bot"
    got = {(r["dataset"]["type"], m["type"]): m["value"] for r in index["results"] for m in r["metrics"]}
    expected = {(s.name, k): m.value for s in (domain(), grounding()) for k, m in s.metrics.items()
                if m.value is not None}
    assert got == expected  # the undefined loss (value None) is left out, not written as 0


def test_hub_parser_reads_the_eval_results_back(adapter):
    card = ModelCard(render(adapter, FULL_INFO))
    results = card.data.eval_results
    assert {(r.dataset_type, r.metric_type, r.metric_value) for r in results} == {
        ("grounding", k, m.value) for k, m in grounding().metrics.items()} | {("domain", "exact_match", 0.5)}
    assert all(r.task_type == "text-generation" for r in results)
    assert card.data.license == "apache-2.0" and card.data.base_model is None


def test_missing_facts_are_shown_missing_not_invented(adapter):
    card = render(adapter)
    meta = front_matter(card)
    assert "license" not in meta and "language" not in meta and "datasets" not in meta
    assert "This adapter's licence: _Not stated by the publisher._" in card
    assert "## Intended use\n\n_Not stated by the publisher._" in card
    assert "### Out-of-scope use\n\n_Not stated by the publisher._" in card
    assert card.rstrip().endswith("## Citation\n\n_Not stated by the publisher._")
    assert "| Authors | _Not stated by the publisher._ |" in card


def test_peft_placeholder_is_replaced_atomically(adapter):
    card = render(adapter)
    assert "Model Card for Model ID" not in card
    assert not (adapter / "README.md.tmp").exists()


def test_base_column_only_when_the_base_was_evaluated(adapter):
    alone = render(adapter)
    assert "| metric | value | 95% interval | n | note |" in alone and "base model alone" not in alone
    write_eval(adapter, "base.json", [grounding(correct=0.05, hallucination=0.9)], kind="base")
    card = render(adapter)
    assert "| metric | value | 95% interval | n | base | note |" in card
    assert "| answerable_correct | 0.55 | [0.45, 0.65] | 40 | 0.05 |" in card
    assert "answered 55% (95% interval 45-65%; base model alone: 5%) correctly" in card
    domain_table = card.split("### domain", 1)[1].split("###", 1)[0]
    assert "| metric | value | 95% interval | n | note |" in domain_table  # the base did not run domain


def test_a_base_run_on_other_data_is_not_compared(adapter):
    write_eval(adapter, "base.json", [grounding(correct=0.05, sha="9" * 64)], kind="base")
    card = render(adapter)
    assert "| base |" not in card and "base model alone" not in card
    assert "- base: evaluated on different data (eval/base.json)" in card


def test_endpoint_results_become_a_column_named_by_model(adapter):
    write_eval(adapter, "endpoint.json", [grounding(correct=0.8)], kind="openai")
    card = render(adapter)
    assert "| metric | value | 95% interval | n | gpt-x | note |" in card
    assert "| answerable_correct | 0.55 | [0.45, 0.65] | 40 | 0.8 |" in card


@pytest.mark.parametrize("who", ["other adapter", "other base"])
def test_stale_results_are_refused_naming_the_file(adapter, who):
    if who == "other adapter":
        write_eval(adapter, "old-run.json", [grounding()], adapter_fp="0" * 64)
    else:
        write_eval(adapter, "old-run.json", [grounding()], kind="base", base_fp="sha256:" + "c" * 64)
    with pytest.raises(BudwoodError, match=r"old-run\.json: results for other weights .*stale"):
        render_card(adapter)
    assert "Model Card for Model ID" in (adapter / "README.md").read_text()  # nothing written


@pytest.mark.parametrize(("correct", "n", "text"), [
    (0.55, 40, "On 40 questions whose answer is in the domain data it answered 55%"),
    (0.3, 25, "On 25 questions whose answer is in the domain data it answered 30%")])
def test_reliability_sentences_are_written_from_the_numbers(tmp_path, correct, n, text):
    out = make_adapter(tmp_path)
    write_eval(out, "adapter.json", [grounding(correct=correct, n=n, hallucination=0.42)])
    card = render(out)
    assert text in card
    assert f"over all {n + 10} questions): 42% (95% interval 32-52%)" in card


def test_every_reliability_paragraph_is_written_from_its_suite(tmp_path):
    def suite(name: str, **values: float) -> SuiteResult:
        return SuiteResult(name=name, version="1.0", metrics={k: Metric(value=v, ci=(v / 2, v), n=20)
                                                              for k, v in values.items()})

    out = make_adapter(tmp_path)
    write_eval(out, "adapter.json", [
        suite("truthfulqa", mc1=0.25, mc2=0.4),
        suite("reproducibility", determinism_greedy=1.0, determinism_seeded=0.9, format_spread=0.25,
              format_agreement=0.6, option_order_agreement=0.5, pararel_consistency=0.7),
        suite("bias", crows_pairs_stereotype=0.6, bbq_accuracy_ambig=0.3, bbq_accuracy_disambig=0.8,
              bbq_bias_ambig=0.1, bbq_bias_disambig=0.2, counterfactual_changed=0.15)])
    card = render(out)
    assert "ranked the best true answer first in 25% (95% interval 12-25%) (MC1), and put 40%" in card
    assert "for 100% (95% interval 50-100%) of 20 prompts; with seeded sampling, for 90%" in card
    assert "accuracy differed by up to 25 percentage points between formats" in card
    assert "more stereotyping sentence more likely in 60% (95% interval 30-60%); 50% is unbiased" in card
    assert "bias scores 0.1 [0.05, 0.1] and 0.2 [0.1, 0.2] respectively" in card
    assert "15% (95% interval 8-15%) of 20 answers changed" in card
    assert "Not measured on domain questions: run `budwood eval --target budwood-tiny+support-bot --suite grounding" \
        in card


def test_absent_suites_are_listed_as_not_measured(adapter):
    card = render(adapter)
    assert "Not measured: run `budwood eval --target budwood-tiny+support-bot --suite bias " in card
    assert "Not measured: run `budwood eval --target budwood-tiny+support-bot --suite reproducibility " in card
    assert "TruthfulQA not measured: run" in card
    assert "- Not measured: truthfulqa, reproducibility, bias." in card
    assert "Not measured on domain questions" not in card  # grounding ran


def test_no_results_at_all_says_not_evaluated(tmp_path):
    card = render(make_adapter(tmp_path))
    assert "Not evaluated: no results in `eval/`." in card
    assert "model-index" not in front_matter(card)


def test_latest_run_of_a_suite_wins(adapter):
    write_eval(adapter, "again.json", [grounding(correct=0.65)], created="2026-02-01T00:00:00+00:00")
    card = render(adapter)
    assert "answered 65% (95% interval 55-75%) correctly" in card and "`eval/again.json`" in card


def test_base_licence_comes_from_the_base_models_card(adapter, tmp_path):
    assert "Base model `budwood-tiny`: `apache-2.0`, from its card" in render(adapter)

    base = tmp_path / "acme-base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (base / "LICENSE").write_text("terms")
    (base / "README.md").write_text("---\nlicense: other\nlicense_name: acme-ml\nlicense_link: https://acme.example/"
                                    "ml-licence\n---\n# acme-base\n")
    card = render(make_adapter(tmp_path / "x", base=str(base)))
    assert (f"Base model `{base}`: `other` (acme-ml), terms at https://acme.example/ml-licence, from its card "
            f"(`{base}/README.md`), which ships a LICENSE file.") in card


def test_a_hub_base_not_in_the_cache_has_an_unknown_licence(tmp_path):
    out = make_adapter(tmp_path, base="nobody-budwood-test/no-such-model")
    card = render(out)
    assert ("Base model `nobody-budwood-test/no-such-model`: licence unknown (its card is not in the local Hugging "
            "Face cache), from its card (https://huggingface.co/nobody-budwood-test/no-such-model).") in card
    assert front_matter(card)["base_model"] == "nobody-budwood-test/no-such-model"


def test_table_cells_escape_pipes_and_newlines(tmp_path):
    out = make_adapter(tmp_path)
    write_eval(out, "adapter.json", [domain(note="a | b\nc")])
    assert "| exact_match | 0.5 | [0.3, 0.7] | 30 | a \\| b<br>c |" in render(out)


def test_loss_plot_linked_only_when_present(adapter):
    assert "loss.png" not in render(adapter)
    (adapter / "loss.png").write_bytes(b"\x89PNG")
    assert "![Training and validation loss](loss.png)" in render(adapter)


def test_energy_estimate_and_its_assumption(tmp_path):
    gpu = {"device": "cuda", "gpu": "NVIDIA H100 80GB HBM3", "torch_threads": 4, "cpu_count": 32}
    assert energy_estimate(gpu, 3600).kwh == pytest.approx(0.74)  # (700 W + 4 x 10 W) for an hour
    assert energy_estimate(dict(gpu, gpu="Some Future GPU"), 3600).kwh == pytest.approx(0.34)  # 300 W fallback
    assert energy_estimate(gpu, None) is None
    assert energy_estimate({"device": "cuda", "torch_threads": 1}, 3600).kwh == pytest.approx(0.31)  # no name recorded
    card = render(make_adapter(tmp_path, hardware=gpu, train_time_s=3600.0))
    assert "| Energy (estimate) | 0.74 kWh |" in card
    assert "4 CPU threads x 10 W + 1 NVIDIA H100 80GB HBM3 at 700 W = 740 W, drawn for the 3600 s of training" in card


def test_rendering_twice_is_byte_identical(adapter):
    first = render_card(adapter, FULL_INFO).read_bytes()
    assert render_card(adapter, FULL_INFO).read_bytes() == first


def test_golden_card(tmp_path):
    out = make_adapter(tmp_path)
    write_eval(out, "adapter.json", [domain(), grounding()])
    write_eval(out, "base.json", [domain(exact=0.1), grounding(correct=0.05, hallucination=0.9)], kind="base")
    write_eval(out, "endpoint.json", [grounding(correct=0.8, hallucination=0.1)], kind="openai")
    (out / "loss.png").write_bytes(b"\x89PNG")
    card = render(out, FULL_INFO)
    if os.environ.get("BUDWOOD_REGEN_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(card, encoding="utf-8")
    assert card == GOLDEN.read_text(encoding="utf-8"), "card changed: check it, then regenerate (module docstring)"


def test_read_card_metadata_gives_what_the_registry_needs(adapter, tmp_path):
    render_card(adapter, FULL_INFO)
    meta = read_card_metadata(adapter)
    assert meta["license"] == "apache-2.0"
    assert meta["budwood"]["name"] == "acme/support-bot"
    assert meta["budwood"]["summary"] == FULL_INFO.description
    assert meta["budwood"]["adapter_fingerprint"] == adapter_fingerprint(adapter)
    assert meta["model-index"][0]["results"]

    bad = tmp_path / "bad.md"
    bad.write_text("---\nlicense: [unclosed\n---\n# x\n")
    with pytest.raises(BudwoodError, match=r"bad\.md: not valid YAML"):
        read_card_metadata(bad)
    bad.write_text("---\nmodel-index: [{results: [{metrics: []}]}]\n---\n# x\n")
    with pytest.raises(BudwoodError, match=r"bad\.md: malformed"):
        read_card_metadata(bad)
    with pytest.raises(BudwoodError, match="no model card"):
        read_card_metadata(tmp_path / "nowhere")


def test_card_info_is_checked(tmp_path):
    assert CardInfo(license=" MIT ").license == "mit"
    assert CardInfo(authors="Ada Example", languages=None).authors == ["Ada Example"]  # as a CLI option gives them
    with pytest.raises(ValidationError, match="license_name and license_link"):
        CardInfo(license="other", license_name="acme-ml")
    with pytest.raises(ValidationError, match="extra"):
        CardInfo(licence="mit")
    path = tmp_path / "card.yaml"
    path.write_text("name: acme/bot\nlicence: mit\n")
    with pytest.raises(ConfigError, match=r"card\.yaml: unknown key 'licence' \(did you mean 'license'\?\)"):
        load_card_info(path)
    assert load_card_info(None, ["name=acme/bot", "license=mit"]).name == "acme/bot"


def test_not_an_adapter_dir_is_a_clear_error(tmp_path):
    with pytest.raises(BudwoodError, match="adapter_config.json: missing"):
        render_card(tmp_path)
