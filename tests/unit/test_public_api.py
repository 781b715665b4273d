"""The Python entry points the README documents are what they say, in a fresh interpreter as a user starts."""
from __future__ import annotations

import json
import subprocess
import sys


def test_from_budwood_import_the_documented_verbs(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Question {i}?"},
                                                     {"role": "assistant", "content": f"Answer {i}."}]}) + "\n"
                            for i in range(12)))
    script = f"""
import budwood.train.recipe  # imported first, as the CLI and other modules do: the name must still work
from budwood import train, TrainConfig, read_dataset, load_base
assert callable(train) and isinstance(TrainConfig, type) and callable(read_dataset) and callable(load_base)
assert len(read_dataset({str(data)!r}).examples) == 12
from budwood.config import load_config
config = load_config(None, ["base_model=budwood-tiny", "data.train={data}", "data.validation_split=0",
                            "output_dir={tmp_path / 'out'}", "training.max_steps=1", "training.precision=fp32",
                            "data.min_examples=1"])
out = train(config)
print(out)
"""
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert (tmp_path / "out" / "adapter_model.safetensors").exists()
