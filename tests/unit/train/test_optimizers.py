"""training.optimizer: each choice trains, is recorded in provenance, resumes exactly, and the ones that cannot
run here (8-bit, CUDA only) or settings that do not apply are refused by name."""
from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from budwood.errors import ConfigError
from budwood.train.recipe import train
from tests.conftest import chat_rows, tiny_train_config, write_jsonl


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rows = chat_rows(16, "What is code {i}?", "Code {i} is {x}.")
    return write_jsonl(tmp_path_factory.mktemp("opt") / "train.jsonl", rows)


def config(data, out, *extra):
    return tiny_train_config(data, out, "training.scheduler=constant", "training.warmup_steps=0",
                             "training.learning_rate=1e-2", "training.save_every=2", *extra)


@pytest.mark.parametrize("optimizer, extra", [("adamw", ["training.adam_beta2=0.99"]),
                                              ("sgd", ["training.momentum=0.9"]), ("adafactor", [])])
def test_each_optimizer_trains_is_recorded_and_resumes_exactly(data, tmp_path, optimizer, extra):
    opts = [f"training.optimizer={optimizer}", *extra]
    straight = train(config(data, tmp_path / "straight", "training.max_steps=4", *opts))
    prov = json.loads((straight / "budwood.json").read_text())
    assert prov["config"]["training"]["optimizer"] == optimizer
    losses = [json.loads(line)["loss"] for line in (straight / "metrics.jsonl").read_text().splitlines()
              if "loss" in json.loads(line)]
    assert losses[-1] < losses[0]  # it learns
    train(config(data, tmp_path / "split", "training.max_steps=2", *opts))
    resumed = train(config(data, tmp_path / "split", "training.max_steps=4", *opts), resume=True)
    a, b = load_file(straight / "adapter_model.safetensors"), load_file(resumed / "adapter_model.safetensors")
    assert all(a[k].equal(b[k]) for k in a), "resume must continue exactly, optimizer state included"


def test_8bit_optimizers_are_refused_off_cuda(data, tmp_path):
    with pytest.raises(ConfigError, match="CUDA only"):
        train(config(data, tmp_path / "x", "training.max_steps=1", "training.optimizer=adamw_8bit"))


@pytest.mark.parametrize("extra, says", [(["training.optimizer=sgd", "training.adam_beta1=0.8"], "adamw optimizers"),
                                         (["training.momentum=0.9"], "sgd only"),
                                         (["training.optimizer=lion"], "optimizer")])
def test_settings_that_do_not_apply_are_refused(data, tmp_path, extra, says):
    with pytest.raises(Exception, match=says):
        config(data, tmp_path, *extra)


def test_a_saved_config_with_another_optimizer_validates_again(data, tmp_path):
    from budwood.config import TrainConfig

    cfg = config(data, tmp_path, "training.optimizer=sgd")
    assert TrainConfig.model_validate(cfg.model_dump(mode="json")).training.optimizer == "sgd"
