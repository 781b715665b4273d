"""`budwood eval` end to end: the command as a user runs it (a real subprocess), its results file against
`budwood eval schema`, `budwood eval compare`, clear errors for bad inputs, an OpenAI-compatible target
(a live `budwood serve` on loopback, with an API key) measured against the local engine, and training
refusing the evaluation sets.

The server (fp32, key required) and a local fp32 target are loaded once for the module.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import jsonschema
import pytest
import yaml
from conftest import make_random_adapter, running, write_jsonl

from budwood.config import TrainConfig
from budwood.engine import EngineConfig
from budwood.errors import DataError
from budwood.eval import grounding, truthfulqa
from budwood.eval.context import EvalContext
from budwood.eval.data import DATA_DIR, is_eval_only
from budwood.eval.targets import EvalTargetError, LocalTarget, OpenAITarget, open_target
from budwood.serve.app import create_app
from budwood.train.data import prepare_data

API_KEY = "sk-budwood-eval-test"
KEY_ENV = "BUDWOOD_EVAL_TEST_KEY"
PARAREL = DATA_DIR / "pararel" / "patterns.jsonl"


def budwood(*args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "budwood", *args], capture_output=True, text=True, cwd=cwd,
                          env={**os.environ, **(env or {})}, timeout=600)


def remote_eval(url: str, *args: str) -> subprocess.CompletedProcess:
    """`budwood eval` against the served model: no weights to load before the data is read."""
    return budwood("eval", "--target", f"openai:{url}/v1#budwood-tiny", "--api-key-env", KEY_ENV, *args,
                   env={KEY_ENV: API_KEY})


@pytest.fixture(scope="module")
def served() -> Iterator[str]:
    """`budwood serve` of budwood-tiny in fp32, wanting API_KEY; yields the base URL (no /v1)."""
    with running(create_app(EngineConfig(precision="fp32"), api_key=API_KEY)) as url:
        yield url


@pytest.fixture(scope="module")
def local() -> LocalTarget:
    return LocalTarget("budwood-tiny", precision="fp32")


@pytest.fixture(scope="module")
def remote(served) -> OpenAITarget:
    with pytest.MonkeyPatch.context() as mp:  # the client reads the key once, here
        mp.setenv(KEY_ENV, API_KEY)
        return OpenAITarget(f"openai:{served}/v1#budwood-tiny", api_key_env=KEY_ENV)


@pytest.fixture(scope="module")
def base_results(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("eval") / "base.json"
    r = budwood("eval", "--target", "budwood-tiny", "--suite", "grounding", "--limit", "4", "--precision", "fp32",
                "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "hallucination_rate" in r.stdout and "results:" in r.stdout
    return out


def assert_clear_error(r: subprocess.CompletedProcess, *needles: str) -> None:
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-3000:])
    assert "Traceback" not in r.stderr and "error:" in r.stderr, r.stderr[-3000:]
    for needle in needles:
        assert needle in r.stderr, (needle, r.stderr[-3000:])


# -- the command, the schema, compare ----------------------------------------------------------------
def test_results_file_validates_against_the_printed_schema(base_results):
    r = budwood("eval", "schema")
    assert r.returncode == 0, r.stderr
    schema = json.loads(r.stdout)
    results = json.loads(base_results.read_text())
    jsonschema.validate(results, schema)

    assert results["schema_version"] == "budwood.eval/1"
    assert results["target"]["spec"] == "budwood-tiny" and results["target"]["kind"] == "local"
    assert results["target"]["base_fingerprint"].startswith("sha256:")
    assert set(results["software"]) >= {"budwood", "torch", "transformers", "python"}
    g = results["suites"]["grounding"]
    assert g["metrics"]["hallucination_rate"]["n"] == 4 and g["timing"]["requests"] == 4
    assert g["data"][0]["path"] == "budwood:data/company.py#seed=0" and len(g["data"][0]["sha256"]) == 64
    assert g["records"] is None  # only with --records
    # the schema is strict enough to catch a broken file
    broken = dict(results)
    del broken["target"]
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)
    broken = json.loads(base_results.read_text())
    broken["suites"]["grounding"]["metrics"]["hallucination_rate"]["n"] = "four"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


def test_compare_base_with_an_adapter_prints_a_table_and_writes_the_plot(base_results, tmp_path, company_data,
                                                                          tiny_tokenizer):
    adapter = make_random_adapter(tmp_path / "adapter", seed=11)
    # provenance as training writes it: the domain suite then scores the adapter's own held-out split
    train_cfg = TrainConfig.model_validate({"data": {"train": str(company_data["train"]), "validation_split": 0.1},
                                            "training": {"seed": 7}})
    prepared = prepare_data(train_cfg, tiny_tokenizer)
    (adapter / "budwood.json").write_text(json.dumps({"data": prepared.fingerprints, "config": train_cfg.resolved()}))
    adapted = tmp_path / "adapted.json"
    r = budwood("eval", "--target", f"budwood-tiny+{adapter}", "--suite", "grounding,domain", "--limit", "4",
                "--precision", "fp32", "--records", "--out", str(adapted))
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(adapted.read_text())
    assert res["target"]["adapter"] == str(adapter) and len(res["target"]["adapter_fingerprint"]) == 64
    assert len(res["suites"]["grounding"]["records"]) == 4
    dom = res["suites"]["domain"]
    assert dom["data"][0]["name"] == "adapter validation split (split 0.1)"
    assert dom["data"][0]["path"] == str(company_data["train"].resolve())
    held_out = [tiny_tokenizer.decode(e.input_ids) for e in prepared.validation]  # as training split them
    assert len(dom["records"]) == 4 and len(held_out) >= 4
    for rec in dom["records"]:
        assert any(rec["prompt"][-1]["content"] in text and rec["reference"] in text for text in held_out), rec

    c = budwood("eval", "compare", str(base_results), str(adapted))
    assert c.returncode == 0, c.stderr[-3000:]
    assert "A = budwood-tiny" in c.stdout and "B =" in c.stdout and "B - A" in c.stdout
    for metric in ("hallucination_rate", "answerable_correct", "unanswerable_abstained"):
        assert metric in c.stdout
    png = tmp_path / "adapted-compare.png"  # the default: next to B
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


# -- bad inputs: exit code 2 and a message that names the problem ----------------------------------------
def test_unknown_suite_suggests_the_close_name():
    r = budwood("eval", "--target", "budwood-tiny", "--suite", "grounding,truthfulq")
    assert_clear_error(r, "unknown suite 'truthfulq'", "did you mean 'truthfulqa'?")


def test_missing_target():
    assert_clear_error(budwood("eval", "--suite", "grounding"), "--target is required")


def test_missing_grounding_file(served, tmp_path):
    missing = tmp_path / "nope.jsonl"
    r = remote_eval(served, "--suite", "grounding", "--set", f"grounding.data={missing}")
    assert_clear_error(r, str(missing), "no such file")


def test_malformed_grounding_jsonl_names_the_line(served, tmp_path):
    bad = write_jsonl(tmp_path / "q.jsonl", [{"question": "Who wrote Emma?", "answer": "Jane Austen"}, "{oops",
                                             {"question": "q", "answer": None}])
    r = remote_eval(served, "--suite", "grounding", "--set", f"grounding.data={bad}")
    assert_clear_error(r, f"{bad}:2:", "not valid JSON")


def test_adapter_dir_without_adapter_config(tmp_path):
    (tmp_path / "adapter").mkdir()
    r = budwood("eval", "--target", f"budwood-tiny+{tmp_path / 'adapter'}", "--suite", "grounding")
    assert_clear_error(r, str(tmp_path / "adapter"), "no adapter_config.json")


def test_unreachable_endpoint():
    r = budwood("eval", "--target", "openai:http://127.0.0.1:9/v1#x", "--suite", "grounding")
    assert_clear_error(r, "cannot reach http://127.0.0.1:9/v1")


@pytest.mark.parametrize("spec", ["openai:127.0.0.1:8000/v1#x", "openai:http://127.0.0.1:9/v1", ""])
def test_malformed_target_spec(spec):
    with pytest.raises(EvalTargetError, match="bad target"):
        open_target(spec)


def test_compare_refuses_a_file_that_is_not_json(base_results, tmp_path):
    text = tmp_path / "notes.json"
    text.write_text("these are my notes\n")
    assert_clear_error(budwood("eval", "compare", str(base_results), str(text)), str(text),
                       "not a budwood eval results file", "Invalid JSON")
    assert_clear_error(budwood("eval", "compare", str(tmp_path / "gone.json"), str(base_results)),
                       "no such results file")


def test_compare_refuses_a_binary_file(base_results, tmp_path):
    """The plot compare writes sits next to the results; passing it by mistake must not be a traceback."""
    png = tmp_path / "base-compare.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    assert_clear_error(budwood("eval", "compare", str(base_results), str(png)), str(png))


# -- an OpenAI-compatible endpoint: a live `budwood serve` -------------------------------------------------
def test_remote_target_measures_what_the_local_engine_measures(served, local, tmp_path):
    out = tmp_path / "remote.json"
    r = budwood("eval", "--target", f"openai:{served}/v1#budwood-tiny", "--api-key-env", KEY_ENV,
                "--suite", "grounding,truthfulqa,domain", "--limit", "3", "--records", "--out", str(out),
                env={KEY_ENV: API_KEY})
    assert r.returncode == 0, r.stderr[-3000:]
    remote = json.loads(out.read_text())
    assert remote["target"]["kind"] == "openai" and remote["target"]["model"] == "budwood-tiny"
    assert remote["target"]["endpoint"] == f"{served}/v1"
    assert remote["target"]["system_fingerprint"].startswith("fp_")
    assert "loss" in remote["suites"]["domain"]["skipped"] and "loss" not in remote["suites"]["domain"]["metrics"]

    ctx = EvalContext(local, bootstrap=1000)  # the CLI's defaults: 64 answer tokens, seed 0
    tqa = truthfulqa.run(ctx, truthfulqa.TruthfulQAConfig(), 3, True)
    rt = remote["suites"]["truthfulqa"]
    assert len(rt["records"]) == len(tqa.records) == 3
    for a, b in zip(rt["records"], tqa.records):
        assert a["question"] == b["question"]
        for key in ("mc1_logliks", "mc2_logliks"):
            assert len(a[key]) == len(b[key])
            assert a[key] == pytest.approx(b[key], abs=1e-3), (a["question"], key)
    for m in ("mc1", "mc2"):
        assert rt["metrics"][m]["value"] == pytest.approx(tqa.metrics[m].value, abs=1e-6)

    gr = grounding.run(ctx, grounding.GroundingConfig(), 3, True)
    rg = remote["suites"]["grounding"]
    assert [x["answer"] for x in rg["records"]] == [x["answer"] for x in gr.records]
    assert [x["verdict"] for x in rg["records"]] == [x["verdict"] for x in gr.records]
    assert rg["metrics"]["hallucination_rate"]["value"] == gr.metrics["hallucination_rate"].value


@pytest.mark.parametrize("context, continuation", [
    ("Q: Is the sky blue?\nA:", " Yes, it is."),
    # lm-evaluation-harness moves a context's trailing spaces to the continuation; so do both targets
    ("Q: Is the sky blue?\nA: ", "Yes, it is."),
], ids=["plain", "trailing-space"])
def test_remote_scores_the_same_tokens_as_local(remote, local, context, continuation):
    assert remote.can_score
    [got], [expected] = remote.loglikelihood([(context, continuation)]), local.loglikelihood([(context, continuation)])
    assert got.n_tokens == expected.n_tokens
    assert got.logprob == pytest.approx(expected.logprob, abs=1e-3)


def test_remote_scoring_from_an_empty_context_leaves_out_the_first_token(remote, local):
    """Locally (as lm-evaluation-harness) the first word is conditioned on BOS/EOS and counts; an endpoint's
    echo gives the first token no log-probability, so remote scores lack exactly that term (documented)."""
    sentence = "The poor are really ignorant about how to handle the money they do have."
    [got], [expected] = remote.loglikelihood([("", sentence)]), local.loglikelihood([("", sentence)])
    tail = local.engine.score_continuations([(local.engine.encode(sentence)[:1], local.engine.encode(sentence)[1:])])
    assert got.n_tokens == expected.n_tokens - 1
    assert got.logprob == pytest.approx(tail[0].logprob, abs=1e-3)


def test_remote_api_key_from_the_named_variable(served, monkeypatch):
    spec = f"openai:{served}/v1#budwood-tiny"
    r = budwood("eval", "--target", spec, "--api-key-env", KEY_ENV, "--suite", "grounding", "--limit", "2",
                env={KEY_ENV: "sk-wrong"})
    assert_clear_error(r, f"{served}/v1/models answered 401", "API key")
    monkeypatch.delenv(KEY_ENV, raising=False)  # no key at all
    with pytest.raises(EvalTargetError, match="answered 401"):
        OpenAITarget(spec, api_key_env=KEY_ENV)
    monkeypatch.setenv(KEY_ENV, API_KEY)
    assert OpenAITarget(spec, api_key_env=KEY_ENV).info.model == "budwood-tiny"
    with pytest.raises(EvalTargetError, match=r"does not serve model 'budwood-tiyn' \(did you mean 'budwood-tiny'\?\)"):
        OpenAITarget(f"openai:{served}/v1#budwood-tiyn", api_key_env=KEY_ENV)


# -- training refuses the evaluation sets ----------------------------------------------------------------
def test_prepare_data_refuses_files_inside_the_eval_data(tmp_path, tiny_tokenizer, company_data):
    link = tmp_path / "innocent.jsonl"
    link.symlink_to(PARAREL)
    dotted = DATA_DIR / "pararel" / ".." / "crows_pairs" / "crows_pairs_anonymized.csv"
    for path in (PARAREL, link, dotted):
        assert is_eval_only(path)
        cfg = TrainConfig.model_validate({"data": {"train": str(path)}, "output_dir": str(tmp_path / "out")})
        with pytest.raises(DataError, match="one of budwood's evaluation sets"):
            prepare_data(cfg, tiny_tokenizer)
    cfg = TrainConfig.model_validate({"data": {"train": str(company_data["train"]), "validation": str(PARAREL)}})
    with pytest.raises(DataError, match="evaluation sets"):
        prepare_data(cfg, tiny_tokenizer)
    # the guard is about where a file lives, not a blanket refusal
    assert not is_eval_only(company_data["train"])
    ok = TrainConfig.model_validate({"data": {"train": str(company_data["train"]),
                                              "validation": str(company_data["validation"])}})
    assert len(prepare_data(ok, tiny_tokenizer).train) > 0


def test_budwood_train_refuses_an_eval_set(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"base_model": "budwood-tiny", "data": {"train": str(PARAREL)},
                                   "training": {"max_steps": 2, "precision": "fp32"},
                                   "output_dir": str(tmp_path / "out")}))
    r = budwood("train", str(cfg))
    assert_clear_error(r, str(PARAREL), "one of budwood's evaluation sets")
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()
