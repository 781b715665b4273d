"""The `budwood` command as a user runs it (a real subprocess, so the tcmalloc re-exec is included)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import write_jsonl

from budwood.models.fingerprint import adapter_fingerprint


def budwood(*args: str, cwd: Path | None = None, columns: int | None = None,
            timeout: float = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": str(columns)} if columns else None  # rich's width when not on a terminal
    return subprocess.run([sys.executable, "-m", "budwood", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout, env=env)


def test_demo_runs_end_to_end(tmp_path):
    r = budwood("demo", "--workdir", str(tmp_path / "demo"), "--set", "training.epochs=4", "--eval-set", "limit=8",
                "--tool-steps", "20", columns=160, timeout=1800)  # ~2 min; room for a slow or busy machine
    assert r.returncode == 0, r.stderr[-3000:]
    assert "held-out questions" in r.stdout and "loss curve:" in r.stdout
    assert "vs plain" in r.stdout and "determinism_greedy" in r.stdout
    for metric in ("hallucination_rate", "unanswerable_abstained", "answerable_correct", "format_spread",
                   "exact_match"):
        row = next(line for line in r.stdout.splitlines() if f" {metric} " in line)
        assert len(re.findall(r"(?<![\d.,\[])-?\d+\.\d\d\b", row)) == 4, row  # base, plain, reliable, the difference
    row = next(line for line in r.stdout.splitlines() if " hallucination_rate " in line)
    assert row.count("[") == 3, row  # each with its 95% interval (n = 8 here; one-question metrics have none)
    demo = tmp_path / "demo"
    adapter, plain = demo / "adapter", demo / "plain"
    results = {side: json.loads((adapter / "eval" / f"{side}.json").read_text())
               for side in ("base", "baseline-plain", "adapted")}
    assert not results["base"]["target"]["adapter"]
    assert results["baseline-plain"]["target"]["adapter_fingerprint"] == adapter_fingerprint(plain)
    assert results["adapted"]["target"]["adapter_fingerprint"] == adapter_fingerprint(adapter)
    for res in results.values():
        assert set(res["suites"]) == {"domain", "grounding", "reproducibility"}
        # every side scored the same data
        assert res["suites"]["domain"]["data"] == results["base"]["suites"]["domain"]["data"]
        assert res["suites"]["grounding"]["data"] == results["base"]["suites"]["grounding"]["data"]
        assert res["suites"]["reproducibility"]["metrics"]["determinism_greedy"]["value"] == 1.0
    assert (demo / "compare.png").stat().st_size > 10_000
    assert (adapter / "loss.png").stat().st_size > 10_000
    prov, plain_prov = (json.loads((d / "budwood.json").read_text()) for d in (adapter, plain))
    assert prov["final"]["val_loss"] is not None and prov["final"]["train_loss"] < 6
    assert prov["steps"] == plain_prov["steps"]  # the same step budget
    assert prov["reliability"]["abstention"]["examples_added"] > 0 and not plain_prov["reliability"]
    assert prov["data"]["train"]["fingerprint"] == plain_prov["data"]["train"]["fingerprint"]  # and data
    for split in ("train", "validation", "heldout"):
        assert (demo / "data" / f"{split}.jsonl").exists()
    # card -> signed -> published -> served by its registry id
    card = (adapter / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: peft" in card and "hallucination_rate" in card
    assert "| abstention |" in card and "| suite | metric | base | plain | this adapter |" in card
    assert "published:  demo/company-support@1.0.0" in r.stdout
    # the served answers are the table's: the same messages (system prompt + question) as the grounding suite's
    records = {rec["question"]: rec for rec in results["adapted"]["suites"]["grounding"]["records"]}
    served = r.stdout.split("with the table's messages:\n")[1].split("\nadapter:")[0]
    # the tool-calling stage: base and tool adapter by the tools suite on the same items, carded, served with tools
    tools_dir = demo / "tools"
    sides = {side: json.loads((tools_dir / "eval" / f"{side}.json").read_text()) for side in ("base", "adapted")}
    assert {s_["suites"]["tools"]["data"][0]["sha256"] for s_ in sides.values()} == \
        {sides["base"]["suites"]["tools"]["data"][0]["sha256"]}
    assert sides["adapted"]["target"]["adapter_fingerprint"] == adapter_fingerprint(tools_dir)
    assert "tool calling: the tools suite" in r.stdout
    row = next(line for line in r.stdout.splitlines() if " ast_match " in line)
    assert len(re.findall(r"(?<![\d.,\[])-?\d+\.\d\d\b", row)) == 2, row  # base and the tool adapter
    assert "ast_match" in (tools_dir / "README.md").read_text()
    assert re.search(r"  calls: .*\n  \(the data's: (order_status|request_refund)\(", r.stdout), r.stdout[-2000:]
    asked = re.findall(r"  system: (.*)\n  Q: (.*)\n  A: (.*)\n  \((.*?);", served)
    assert len(asked) == 2, served
    for system, question, answer, same in asked:
        assert system.startswith("You answer questions about ") and question in records
        assert answer == records[question]["answer"].strip() and same == "the same as the table's answer", served
    assert {records[q]["answers"] is None for _, q, _, _ in asked} == {True, False}  # one of each kind
    v = budwood("verify", str(adapter))
    assert v.returncode == 0 and "files match" in v.stdout, v.stdout + v.stderr
    s = budwood("show", "demo/company-support", "--registry", str(demo / "registry"))
    assert s.returncode == 0 and "1.0.0" in s.stdout and "ed25519:" in s.stdout, s.stdout + s.stderr

    g = budwood("generate", "--adapter", str(adapter), "--max-new-tokens", "20", "Who runs the company?")
    assert g.returncode == 0 and g.stdout.strip()


def test_data_check_lists_every_problem_and_exits_1(tmp_path, company_data):
    bad = write_jsonl(tmp_path / "bad.jsonl", [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "asistant", "content": "yo"}]},
        "{not json",
        {"messages": [{"role": "user", "content": "q"}]},
    ])
    r = budwood("data", "check", str(bad), "--min-examples", "1")
    assert r.returncode == 1
    assert f"{bad}:1: unknown_role" in r.stdout and "did you mean 'assistant'" in r.stdout
    assert f"{bad}:2: invalid_json" in r.stdout
    assert f"{bad}:3: no_assistant_message" in r.stdout

    ok = budwood("data", "check", str(company_data["train"]))
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "0 error(s)" in ok.stdout and "tokens per epoch" in ok.stdout


def test_config_errors_are_one_clear_line_not_a_traceback(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("data:\n  train: t.jsonl\ntraning:\n  epochs: 1\n")
    r = budwood("train", str(cfg))
    assert r.returncode == 2
    assert "unknown key 'traning' (did you mean 'training'?)" in r.stderr
    assert "Traceback" not in r.stderr
