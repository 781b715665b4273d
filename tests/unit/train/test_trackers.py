"""logging.report_to: TensorBoard and MLflow (installed with the test extra) get the numbers metrics.jsonl gets,
at the same steps; W&B without its package is refused by name before training starts."""
from __future__ import annotations

import builtins
import json

import pytest

from budwood.errors import ConfigError
from budwood.train.recipe import train
from tests.conftest import chat_rows, tiny_train_config, write_jsonl


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("trk") / "train.jsonl", chat_rows(8, "Say {i}.", "{i}."))


def config(data, out, *extra):
    return tiny_train_config(data, out, "training.max_steps=3", *extra)


def test_tensorboard_and_mlflow_get_what_metrics_jsonl_gets(data, tmp_path):
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = train(config(data, tmp_path / "run", "logging.report_to=[tensorboard,mlflow]",
                       f"logging.mlflow_tracking_uri={uri}", "logging.mlflow_experiment=tiny",
                       "logging.run_name=first"))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [(m["step"], m["loss"]) for m in lines if "loss" in m]
    assert [s for s, _ in losses] == [1, 2, 3]

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert [(e.step, pytest.approx(e.value)) for e in events.Scalars("loss")] == losses

    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert run.info.run_name == "first" and run.info.status == "FINISHED"
    assert run.data.params["training.max_steps"] == "3" and run.data.params["base_model"] == "budwood-tiny"
    history = client.get_metric_history(run.info.run_id, "loss")
    assert sorted((m.step, pytest.approx(m.value)) for m in history) == losses


def test_a_tracker_that_is_not_installed_is_refused_by_name(data, tmp_path, monkeypatch):
    real = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(ConfigError, match=r"report_to wandb: install it \(pip install budwood\[trackers\]\)"):
        train(config(data, tmp_path / "w", "logging.wandb=true"))


def test_report_to_takes_only_known_trackers(data, tmp_path):
    with pytest.raises(Exception, match="report_to"):
        config(data, tmp_path, "logging.report_to=[comet]")
    assert config(data, tmp_path, "logging.report_to=[mlflow]", "logging.tensorboard=true").logging.trackers == \
        ["mlflow", "tensorboard"]
