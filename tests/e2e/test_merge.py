"""`budwood merge` and `budwood compose` end to end: adapter directories in, a normal adapter (or model) out."""
import json
import shutil
import subprocess
import sys

import pytest
import torch

from tests.conftest import make_random_adapter, write_jsonl


@pytest.fixture(scope="module")
def parents(tmp_path_factory):
    root = tmp_path_factory.mktemp("parents")
    return (make_random_adapter(root / "a", 31, 8), make_random_adapter(root / "b", 32, 4, ["q_proj", "v_proj"]))


def budwood(*args):
    return subprocess.run([sys.executable, "-m", "budwood", *map(str, args)], capture_output=True, text=True,
                          timeout=300)


def test_a_merge_is_a_normal_adapter_with_its_lineage(parents, tmp_path):
    from peft import PeftModel

    from budwood.artifacts import AdapterDir
    from budwood.card.render import CardInfo, render_card
    from budwood.engine import Engine, EngineConfig, SamplingParams
    from budwood.models.load import load_base

    done = budwood("merge", *parents, "--method", "cat", "--weights", "1,0.5", "--out", tmp_path / "ab")
    assert done.returncode == 0, done.stderr
    assert "merged (cat, rank 12, exact)" in done.stdout
    merged = AdapterDir.open(tmp_path / "ab")
    record = merged.provenance["merge"]
    assert record["method"] == "cat" and record["weights"] == [1.0, 0.5] and record["exact"]
    assert [p["adapter_fingerprint"] for p in record["parents"]] == [AdapterDir.open(p).fingerprint for p in parents]
    assert merged.config["r"] == 12 and merged.config["target_modules"] == sorted(merged.config["target_modules"])
    PeftModel.from_pretrained(load_base("budwood-tiny").model, str(merged.path))  # loads unchanged in peft
    engine = Engine(EngineConfig(precision="fp32", kv_cache_tokens=2048, max_lora_rank=16))
    engine.register_adapter("ab", merged.path)
    out = engine.generate([engine.chat_prompt([{"role": "user", "content": "Hi"}])],
                          SamplingParams(max_tokens=4, temperature=0), ["ab"])
    assert out[0].choices[0].token_ids
    card = render_card(merged.path, CardInfo(name="acme/ab", license="mit")).read_text()
    assert "## Lineage" in card and "merged by budwood" in card and str(parents[1]) in card
    assert "the exact weighted sum of the parents' deltas" in card


def test_into_base_gives_the_logits_of_base_plus_adapter(parents, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from budwood.merge.merge import merge_adapters, merge_into_base
    from budwood.models.load import load_base

    merged = merge_adapters([str(p) for p in parents], tmp_path / "ab", [0.8, 1.2], "cat").path
    full = merge_into_base(merged, tmp_path / "full")
    ids = torch.tensor([[1, 57, 900, 33, 2048, 7, 401, 12]])
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(full, dtype=torch.float32)(ids).logits
        peft = PeftModel.from_pretrained(load_base("budwood-tiny").model, str(merged))(ids).logits
    assert (plain - peft).abs().max().item() < 1e-4
    assert json.loads((full / "budwood.json").read_text())["merged_into_base"]["adapter"]["method"] == "cat"


def test_bad_merges_are_refused_by_name(parents, tmp_path):
    other = make_random_adapter(tmp_path / "other", 3, 4)
    cfg = json.loads((other / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M"
    (other / "adapter_config.json").write_text(json.dumps(cfg))
    cases = [([*parents, "--weights", "1", "--out", tmp_path / "x"], "1 number(s) for 2 adapter(s)"),
             ([*parents, "--method", "tie", "--out", tmp_path / "x"], "did you mean 'ties'"),
             ([*parents, "--method", "ties", "--out", tmp_path / "x"], "--density"),
             ([*parents, "--method", "cat", "--rank", "4", "--out", tmp_path / "x"], "cat keeps every parent's rank"),
             ([parents[0], other, "--out", tmp_path / "x"], "different base models"),
             ([parents[0], "acme/", "--out", tmp_path / "x"], "neither an adapter folder nor a registry id"),
             ([*parents, "--out", parents[0]], "not empty")]
    from typer.testing import CliRunner

    from budwood.cli import app

    for args, message in cases:  # in this process (fast); the command-line path itself is the first test's
        done = CliRunner().invoke(app, ["merge", *map(str, args)])
        assert done.exit_code == 2 and message in done.stderr, (args, done.stderr)
        assert done.exception is None or isinstance(done.exception, SystemExit), done.exception  # no traceback
    assert not (tmp_path / "x").exists()


def test_merges_are_evaluated_and_published_like_any_adapter(parents, tmp_path, budwood_home):
    from budwood.eval.run import EvalConfig, run_eval
    from budwood.merge.merge import merge_adapters
    from budwood.registry import open_registry, publish

    merged = merge_adapters([str(p) for p in parents], tmp_path / "ab", [1, 1], "ties", density=0.5).path
    results = run_eval(EvalConfig.model_validate({"target": f"budwood-tiny+{merged}", "suites": ["grounding"],
                                                  "limit": 3, "bootstrap": 0, "max_tokens": 8}))
    assert results.suites["grounding"].metrics["hallucination_rate"].value is not None
    registry = open_registry(str(tmp_path / "registry"))
    info, _ = publish(merged, "acme/merged@1.0.0", "MIT", registry=registry)
    _, pulled = registry.pull(info.ref, tmp_path / "pulled")
    assert json.loads((pulled / "budwood.json").read_text())["merge"]["method"] == "ties"
    registry.close()


def test_merging_registry_ids(parents, tmp_path, budwood_home):
    from budwood.merge.merge import merge_adapters
    from budwood.registry import open_registry

    registry = open_registry(str(tmp_path / "registry"))
    for name, path in zip(("alpha", "beta"), parents, strict=True):
        folder = shutil.copytree(path, tmp_path / name)
        (folder / "README.md").unlink(missing_ok=True)
        registry.publish(folder, f"acme/{name}@1.0.0", "MIT")
    result = merge_adapters(["acme/alpha@1.0.0", "acme/beta@1.0.0"], tmp_path / "ab", None, "svd", rank=4,
                            registry=registry)
    assert [p["registry_id"] for p in json.loads((result.path / "budwood.json").read_text())["merge"]["parents"]] \
        == ["acme/alpha@1.0.0", "acme/beta@1.0.0"]
    assert 0 < result.mean_error <= result.max_error < 1
    registry.close()


def test_compose_finds_the_adapter_that_fits_the_examples(parents, tmp_path):
    """Few-shot examples written by the second adapter: the search moves the weights towards it, and the
    composed adapter's loss on them is what compose reports."""
    from peft import PeftModel

    from budwood.engine import Engine, EngineConfig, SamplingParams
    from budwood.merge.compose import compose, few_shot_batches
    from budwood.models.load import load_base
    from budwood.train.loss import token_losses

    engine = Engine(EngineConfig(precision="fp32", kv_cache_tokens=4096))
    engine.register_adapter("b", parents[1])
    questions = ["Tell me about the sea.", "What is a lamp?", "Who wrote this?", "Describe a garden.",
                 "Why is the sky blue?", "Name a city."]
    outs = engine.generate([engine.chat_prompt([{"role": "user", "content": q}]) for q in questions],
                           SamplingParams(max_tokens=24, temperature=0), ["b"] * len(questions))
    few = write_jsonl(tmp_path / "few.jsonl", [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": o.choices[0].text}]}
        for q, o in zip(questions, outs, strict=True)])
    result = compose([str(p) for p in parents], few, tmp_path / "composed", steps=20)
    assert result.loss_final < result.loss_initial
    assert abs(result.weights[1]) > abs(result.weights[0]) and result.weights[1] > 0.5
    record = json.loads((tmp_path / "composed" / "budwood.json").read_text())["merge"]
    assert record["compose"]["loss_final"] == result.loss_final and record["weights"] == result.weights
    base = load_base("budwood-tiny")
    model = PeftModel.from_pretrained(base.model, str(tmp_path / "composed"))
    batches, _, _ = few_shot_batches(few, base.tokenizer, 1024)
    with torch.no_grad():
        losses = torch.cat([token_losses(model.get_base_model(), b)[0] for b in batches])
    assert losses.mean().item() == pytest.approx(result.loss_final, rel=1e-4)


@pytest.mark.slow
def test_a_cat_merge_of_two_domain_adapters_knows_both_domains(tmp_path):
    """Two fictional companies, one adapter each: the merge (cat, weight 0.6 each) gives the reference
    answers of both companies a higher likelihood than either parent does over the two; each parent
    alone knows only its own company. (Greedy exact match does not improve on budwood-tiny: docs/merge.md.)"""
    from budwood.config import load_config
    from budwood.data.company import make_domain_dataset
    from budwood.eval.run import EvalConfig, run_eval
    from budwood.merge.merge import merge_adapters
    from budwood.pipeline import DEMO_OVERRIDES
    from budwood.train.recipe import train

    data, adapters = {}, {}
    for s in (0, 1):
        data[s] = make_domain_dataset(tmp_path / f"company{s}", seed=s)
        adapters[s] = train(load_config(None, DEMO_OVERRIDES + [
            f"data.train={data[s]['train']}", f"data.validation={data[s]['validation']}", f"output_dir={tmp_path}/a{s}",
            "training.epochs=15", "training.eval_every=1000", "training.save_every=1000", "training.compile=false"]))
    merged = merge_adapters([str(adapters[0]), str(adapters[1])], tmp_path / "both", [0.6, 0.6], "cat").path

    def loss(adapter, s) -> float:
        config = {"target": f"budwood-tiny+{adapter}", "suites": ["domain"], "bootstrap": 0, "max_tokens": 4,
                  "domain": {"data": str(data[s]["validation"])}}
        return run_eval(EvalConfig.model_validate(config)).suites["domain"].metrics["loss"].value

    table = {name: [loss(path, s) for s in (0, 1)] for name, path in
             (("a0", adapters[0]), ("a1", adapters[1]), ("merged", merged))}
    assert table["merged"][1] < table["a0"][1] / 2 and table["merged"][0] < table["a1"][0] / 2, table
    assert sum(table["merged"]) < min(sum(table["a0"]), sum(table["a1"])) / 2, table
