"""An adapter trained here, exported with `--base-id`, loads on "another machine" with nothing but transformers
and peft: `AutoPeftModelForCausalLM.from_pretrained(export)` resolves the base by its Hub id from a Hugging Face
cache (offline, the base saved there under a made-up id) and gives the logits budwood gives for it."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from conftest import chat_rows, tiny_train_config, write_jsonl
from huggingface_hub import ModelCard

from budwood.artifacts import AdapterDir
from budwood.card.attest import create_key, sign, verify
from budwood.card.render import CardInfo, render_card
from budwood.models.names import TINY_DIR
from budwood.registry.export import export_hf
from budwood.train.recipe import train

HUB_ID = "budwood-test/budwood-tiny"
TOKENS = [[1, 15, 27, 301, 42, 7, 99, 5]]
AUTOPEFT = """
import sys, torch
from peft import AutoPeftModelForCausalLM
model = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
with torch.no_grad():
    torch.save(model(torch.tensor({tokens})).logits, sys.argv[2])
print(model.peft_config["default"].base_model_name_or_path, type(model.get_base_model()).__name__)
"""


def hub_cache_with(folder: Path, cache: Path, repo_id: str) -> Path:
    """The Hugging Face cache layout (refs/main -> snapshots/COMMIT/files) holding `folder` as `repo_id`."""
    commit = "a" * 40
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return cache


def budwood_logits(adapter_dir: Path) -> torch.Tensor:
    """The adapter as budwood loads it: its base by budwood.json's name, the weights with peft."""
    from peft import PeftModel

    from budwood.models.load import load_base

    base = load_base(AdapterDir.open(adapter_dir).base_model).model
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        return model(torch.tensor(TOKENS)).logits


def test_exported_adapter_loads_with_autopeft_from_the_hub_cache_with_budwoods_logits(tmp_path, budwood_home):
    data = write_jsonl(tmp_path / "train.jsonl", chat_rows(8, "Say {i}.", "{i}."))
    adapter = train(tiny_train_config(data, tmp_path / "run", "training.max_steps=4", "training.learning_rate=1e-2"))
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "budwood-tiny"
    render_card(adapter, CardInfo(name="acme/say", license="apache-2.0"))
    key_id, _ = create_key()
    sign(adapter)
    cache = hub_cache_with(TINY_DIR, tmp_path / "hub", HUB_ID)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("HF_", "BUDWOOD_"))},
           "BUDWOOD_HOME": str(budwood_home), "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_CACHE": str(cache),
           "HF_HUB_OFFLINE": "1", "COLUMNS": "200"}
    out = tmp_path / "export"
    r = subprocess.run([sys.executable, "-m", "budwood", "export", str(adapter), "--hf", str(out), "--base-id", HUB_ID,
                        "--key", "default"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"base {HUB_ID}, signed by {key_id}; rewritten: adapter_config.json, README.md" in r.stdout, r.stdout
    assert verify(out, {key_id}).ok
    assert ModelCard((out / "README.md").read_text()).data.base_model == HUB_ID

    logits = tmp_path / "logits.pt"
    loaded = subprocess.run([sys.executable, "-c", AUTOPEFT.format(tokens=TOKENS), str(out), str(logits)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert loaded.returncode == 0, loaded.stderr
    assert loaded.stdout.split() == [HUB_ID, "LlamaForCausalLM"]
    theirs, ours = torch.load(logits), budwood_logits(out)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)
    assert torch.equal(budwood_logits(adapter), ours)  # the export is the trained adapter
    from budwood.models.load import load_base

    with torch.no_grad():
        bare = load_base("budwood-tiny").model(torch.tensor(TOKENS)).logits
    assert (ours - bare).abs().max() > 1e-3  # the adapter is really applied, not silently dropped

    unresolvable = export_hf(adapter, tmp_path / "export-tiny")  # no --base-id: budwood-tiny, with a warning
    assert unresolvable.base_model == "budwood-tiny" and "--base-id ORG/NAME" in unresolvable.warnings[0]
    failed = subprocess.run([sys.executable, "-c", AUTOPEFT.format(tokens=TOKENS), str(unresolvable.path), str(logits)],
                            capture_output=True, text=True, env=env, timeout=300)
    # why --base-id exists: transformers looks "budwood-tiny" up on the Hub and finds nothing
    assert failed.returncode != 0 and "\nOSError: " in failed.stderr, failed.stderr[-2000:]
