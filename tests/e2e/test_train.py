"""Recipe tests on budwood-tiny: a short run, plain-peft loading, exact resume after SIGKILL."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from budwood.allocator import find_tcmalloc
from budwood.config import load_config
from budwood.errors import TrainingError
from budwood.train.checkpoint import list_checkpoints
from budwood.train.recipe import train


def _config_file(tmp: Path, data: dict, out: Path, **training) -> Path:
    cfg = {
        "base_model": "budwood-tiny",
        "data": {"train": str(data["train"]), "validation": str(data["validation"])},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.1},
        "training": {"max_steps": 20, "batch_size": 8, "learning_rate": 1e-3, "precision": "fp32",
                     "save_every": 4, "eval_every": 10, "seed": 0, "max_seq_len": 256, **training},
        "output_dir": str(out),
    }
    path = tmp / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory, company_data):
    tmp = tmp_path_factory.mktemp("train")
    cfg = load_config(_config_file(tmp, company_data, tmp / "straight"))
    return train(cfg), tmp


def test_twenty_steps_write_a_peft_adapter_with_provenance(trained):
    adapter, _ = trained
    for name in ("adapter_config.json", "adapter_model.safetensors", "budwood.json", "metrics.jsonl"):
        assert (adapter / name).exists(), name
    prov = json.loads((adapter / "budwood.json").read_text())
    assert prov["steps"] == 20
    assert prov["base_model"]["fingerprint"].startswith("sha256:")
    assert prov["data"]["train"]["fingerprint"].startswith("sha256:")
    assert prov["config"]["training"]["max_steps"] == 20
    assert prov["tokens_seen"] > prov["trained_tokens"] > 0
    assert set(prov["versions"]) >= {"python", "torch", "transformers", "peft", "budwood"}
    steps = [json.loads(x) for x in (adapter / "metrics.jsonl").read_text().splitlines()]
    losses = [m["loss"] for m in steps if "loss" in m]
    assert len(losses) == 20 and losses[-1] < losses[0]
    assert [m["step"] for m in steps if "val_loss" in m] == [10, 20]


def test_adapter_loads_in_plain_peft_and_changes_output(trained):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from budwood.models.load import TINY_DIR

    adapter, _ = trained
    tok = AutoTokenizer.from_pretrained(TINY_DIR)
    base = AutoModelForCausalLM.from_pretrained(TINY_DIR, dtype=torch.float32)
    ids = tok.apply_chat_template([{"role": "user", "content": "Who runs the company?"}],
                                  add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        before = base(**ids).logits
        model = PeftModel.from_pretrained(base, str(adapter))
        after = model(**ids).logits
    assert (after - before).abs().max() > 1e-2


def test_resume_after_sigkill_is_exact(trained, company_data, tmp_path):
    straight, tmp = trained
    cfg_path = _config_file(tmp_path, company_data, tmp_path / "killed")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "budwood", "train", str(cfg_path)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if sum('"loss"' in x for x in lines) >= 11:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (tmp_path / "killed" / "budwood.json").exists(), "the run finished before it was killed"
    last = list_checkpoints(tmp_path / "killed" / "checkpoints")[-1]
    assert 0 < int(last.name.split("-")[1]) < 20

    train(load_config(cfg_path), resume=True)
    a = load_file(straight / "adapter_model.safetensors")
    b = load_file(tmp_path / "killed" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines() if '"loss"' in x]
    assert steps == list(range(1, 21))


def test_sigterm_saves_a_checkpoint_and_exits_cleanly(company_data, tmp_path):
    cfg_path = _config_file(tmp_path, company_data, tmp_path / "term", max_steps=2000, save_every=1000)
    proc = subprocess.Popen([sys.executable, "-m", "budwood", "train", str(cfg_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "term" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and '"loss"' in metrics.read_text()):
        time.sleep(0.05)
    if find_tcmalloc():  # the CLI re-executes itself under tcmalloc wherever it is installed
        assert "libtcmalloc" in Path(f"/proc/{proc.pid}/maps").read_text()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert "--resume" in err
    ckpts = list_checkpoints(tmp_path / "term" / "checkpoints")
    assert len(ckpts) == 1 and (ckpts[0] / "adapter_model.safetensors").exists()


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(company_data, tmp_path):
    cfg = load_config(_config_file(tmp_path, company_data, tmp_path / "nan", learning_rate=1e30,
                                   save_every=1, max_grad_norm=None, scheduler="constant"))
    with pytest.raises(TrainingError, match="loss became (nan|inf)") as err:
        train(cfg)
    good = list_checkpoints(tmp_path / "nan" / "checkpoints")
    assert good and str(good[-1]) in str(err.value)
    weights = load_file(good[-1] / "adapter_model.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_existing_checkpoints_need_resume(trained):
    adapter, tmp = trained
    cfg = load_config(tmp / "straight.yaml")
    with pytest.raises(TrainingError, match="--resume"):
        train(cfg)


def test_packed_batching_without_validation_data(company_data, tmp_path):
    cfg = load_config(_config_file(tmp_path, company_data, tmp_path / "packed", max_steps=3, batching="packed"),
                      ["data.validation=null"])
    adapter = train(cfg)
    prov = json.loads((adapter / "budwood.json").read_text())
    assert prov["steps"] == 3 and prov["final"]["val_loss"] is None and "validation" not in prov["data"]


@pytest.mark.slow
def test_compiled_layers_train_like_eager_ones(company_data, tmp_path):
    """training.compile fuses element-wise work; in fp32 it must not change what is learned."""
    eager = train(load_config(_config_file(tmp_path, company_data, tmp_path / "eager", max_steps=3,
                                           compile=False, gradient_checkpointing=True)))
    compiled = train(load_config(_config_file(tmp_path, company_data, tmp_path / "compiled", max_steps=3,
                                              compile=True, gradient_checkpointing=True)))
    losses = [[json.loads(x)["loss"] for x in (d / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
              for d in (eager, compiled)]
    assert losses[0][0] == pytest.approx(losses[1][0], rel=1e-5)  # same weights: same loss
    # later steps differ only by float reassociation (which Adam can amplify for near-zero gradients)
    assert losses[0] == pytest.approx(losses[1], rel=1e-3)
    assert losses[0][-1] < losses[0][0]


def test_interrupt_in_the_middle_of_a_step_resumes_exactly(company_data, tmp_path, monkeypatch):
    from budwood.train import loss, recipe

    settings = dict(max_steps=6, gradient_accumulation=2, save_every=100)
    straight = train(load_config(_config_file(tmp_path, company_data, tmp_path / "straight2", **settings)))
    cfg = load_config(_config_file(tmp_path, company_data, tmp_path / "interrupted", **settings))
    calls, original = [0], loss.trained_logits

    def interrupted_in_step_4(lm, batch):
        calls[0] += 1
        if calls[0] == 8:  # the second micro-batch of step 4
            raise KeyboardInterrupt
        return original(lm, batch)

    monkeypatch.setattr(loss, "trained_logits", interrupted_in_step_4)
    with pytest.raises(recipe.TrainingInterrupted, match="interrupted at step 3"):
        train(cfg)
    monkeypatch.undo()
    train(cfg, resume=True)
    a = load_file(straight / "adapter_model.safetensors")
    b = load_file(tmp_path / "interrupted" / "adapter_model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def test_resume_refuses_changed_data(company_data, tmp_path):
    data = dict(company_data, train=tmp_path / "train.jsonl")
    data["train"].write_text(company_data["train"].read_text())
    train(load_config(_config_file(tmp_path, data, tmp_path / "run", max_steps=2, save_every=1)))
    lines = data["train"].read_text().splitlines()
    data["train"].write_text("\n".join(lines[1:]) + "\n")
    with pytest.raises(TrainingError, match="train data .* changed"):
        train(load_config(_config_file(tmp_path, data, tmp_path / "run", max_steps=4)), resume=True)


def test_step_count_from_epochs_spans_accumulation_windows_across_epochs():
    from budwood.config import TrainingConfig
    from budwood.train.recipe import count_steps

    assert count_steps(TrainingConfig(epochs=3, gradient_accumulation=3), micro_per_epoch=5) == 5
    assert count_steps(TrainingConfig(epochs=2, gradient_accumulation=4), micro_per_epoch=5) == 3
    assert count_steps(TrainingConfig(epochs=1, gradient_accumulation=8), micro_per_epoch=2) == 1
    assert count_steps(TrainingConfig(max_steps=7, gradient_accumulation=8), micro_per_epoch=2) == 7


def test_refuses_an_output_dir_of_someone_elses_files(company_data, tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("precious")
    with pytest.raises(TrainingError, match="not empty"):
        train(load_config(_config_file(tmp_path, company_data, tmp_path / "mine", max_steps=1)))
    assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"
