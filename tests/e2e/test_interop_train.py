"""Training straight from Axolotl's own example config, with budwood-tiny and local data mixed by weight."""
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from budwood.interop import load_train_config
from budwood.train.recipe import TrainingInterrupted, train

AXOLOTL = Path(__file__).resolve().parents[2] / "configs" / "examples" / "axolotl" / "lora-1b.yml"


def _sources(tmp_path: Path) -> list[dict]:
    (tmp_path / "alpaca.json").write_text(json.dumps(
        [{"instruction": f"What is {i} plus {i}?", "input": "", "output": f"{i} plus {i} is {2 * i}."}
         for i in range(16)]))
    with (tmp_path / "chat.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["messages"])
        for i in range(8):
            w.writerow([json.dumps([{"role": "user", "content": f"Spell {i}."},
                                    {"role": "assistant", "content": f"{i} is spelled {i}."}])])
    return [{"path": str(tmp_path / "alpaca.json"), "format": "alpaca"},
            {"path": str(tmp_path / "chat.csv"), "weight": 2}]


def _overrides(tmp_path: Path, *extra: str) -> list[str]:
    return ["base_model=budwood-tiny", f"data.sources={json.dumps(_sources(tmp_path))}",
            f"output_dir={tmp_path / 'out'}", "training.optimizer=adamw", "training.max_seq_len=64",
            "training.precision=fp32", "training.compile=false", *extra]


def test_axolotl_example_trains_with_its_own_settings(tmp_path):
    cfg, converted = load_train_config(AXOLOTL, _overrides(tmp_path, "training.loss_watchdog_threshold=null"))
    assert converted is not None
    out = train(cfg)
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 16 and adapter["lora_alpha"] == 32 and adapter["lora_dropout"] == 0.05
    assert sorted(adapter["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                                 "v_proj"]
    prov = json.loads((out / "budwood.json").read_text())
    sources = prov["data"]["train"]["sources"]
    assert [(Path(s["path"]).name, s["format"], s["weight"]) for s in sources] == [
        ("alpaca.json", "alpaca", 1.0), ("chat.csv", "openai", 2.0)]
    assert prov["data"]["train"]["examples"] == 14 + 2 * 7  # val_set_size 0.1 held out of each source
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    last = max(m["step"] for m in metrics)
    assert [m["step"] for m in metrics if "loss" in m] == list(range(1, last + 1))  # logging_steps: 1
    every = max(1, last // 4)  # num_epochs 1, evals_per_epoch 4 (and the last step)
    assert last >= 4 and [m["step"] for m in metrics if "val_loss" in m] == [
        s for s in range(1, last + 1) if s % every == 0 or s == last]


def test_loss_watchdog_stops_a_run_with_a_checkpoint(tmp_path):
    cfg, _ = load_train_config(AXOLOTL, _overrides(tmp_path, "training.loss_watchdog_threshold=0.01",
                                                   "training.loss_watchdog_patience=2"))
    with pytest.raises(TrainingInterrupted, match="^loss watchdog: the training loss stayed above 0.01 for 2 steps")\
            as e:
        train(cfg)
    assert e.value.step == 2 and e.value.checkpoint is not None and e.value.checkpoint.is_dir()


def test_budwood_train_reads_an_axolotl_file_and_says_how(tmp_path):
    r = subprocess.run([sys.executable, "-m", "budwood", "train", str(AXOLOTL), *[a for o in _overrides(
        tmp_path, "training.max_steps=2", "training.loss_watchdog_threshold=null") for a in ("--set", o)]],
        capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "COLUMNS": "200"})
    assert r.returncode == 0, r.stderr[-3000:]
    assert "read as axolotl config" in r.stderr and "flash_attention: True: budwood runs attention" in r.stderr
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
