"""The `budwood` command as a user runs it (a real subprocess, so the tcmalloc re-exec is included)."""
import json
import subprocess
import sys
from pathlib import Path

from conftest import write_jsonl


def budwood(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "budwood", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def test_demo_runs_end_to_end(tmp_path):
    r = budwood("demo", "--workdir", str(tmp_path / "demo"), "--set", "training.epochs=4")
    assert r.returncode == 0, r.stderr[-3000:]
    assert "held-out questions" in r.stdout and "loss curve:" in r.stdout
    assert "hallucination_rate" in r.stdout and "determinism_greedy" in r.stdout and "B = budwood-tiny + adapter" \
        in r.stdout
    adapter = tmp_path / "demo" / "adapter"
    results = {side: json.loads((adapter / "eval" / f"{side}.json").read_text())
               for side in ("base", "adapted")}
    assert results["adapted"]["target"]["adapter_fingerprint"] and not results["base"]["target"]["adapter"]
    for res in results.values():
        assert set(res["suites"]) == {"domain", "grounding", "reproducibility"}
        # both sides scored the same data
        assert res["suites"]["domain"]["data"] == results["base"]["suites"]["domain"]["data"]
        assert res["suites"]["reproducibility"]["metrics"]["determinism_greedy"]["value"] == 1.0
    assert (tmp_path / "demo" / "compare.png").stat().st_size > 10_000
    assert (adapter / "loss.png").stat().st_size > 10_000
    prov = json.loads((adapter / "budwood.json").read_text())
    assert prov["final"]["val_loss"] is not None and prov["final"]["train_loss"] < 6
    for split in ("train", "validation", "heldout"):
        assert (tmp_path / "demo" / "data" / f"{split}.jsonl").exists()
    # card -> signed -> published -> served by its registry id
    card = (adapter / "README.md").read_text()
    assert card.startswith("---\n") and "library_name: peft" in card and "hallucination_rate" in card
    assert "published:  demo/company-support@1.0.0" in r.stdout and "\n  A: " in r.stdout
    answer = r.stdout.split("\n  A: ")[1].split("\n")[0]
    assert answer.strip()
    v = budwood("verify", str(adapter))
    assert v.returncode == 0 and "files match" in v.stdout, v.stdout + v.stderr
    s = budwood("show", "demo/company-support", "--registry", str(tmp_path / "demo" / "registry"))
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
