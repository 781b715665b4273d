"""Experiment trackers, named as transformers' `report_to` names them: tensorboard, wandb, mlflow.

Each is an optional extra and a thin adapter over its own library's client (SummaryWriter, wandb.init, an
MlflowClient run): metrics.jsonl stays the record budwood reads, and a tracker gets the same numbers at the
same steps. No maintained library unifies the three outside transformers' Trainer callbacks, which need a
Trainer; so this module is the one interface, and asking for a tracker that is not installed is an error
naming the extra to install, before training starts.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from budwood.errors import ConfigError

TRACKERS = ("tensorboard", "wandb", "mlflow")
MLFLOW_PARAM_CHARS = 6000  # MLflow's limit on one parameter's value


class Tracker(Protocol):
    def log(self, numbers: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class TensorBoard:
    def __init__(self, folder: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ConfigError("logging.report_to tensorboard: install it (pip install budwood[trackers])") from None
        self.writer = SummaryWriter(str(folder / "tensorboard"))

    def log(self, numbers: dict[str, float], step: int) -> None:
        for k, v in numbers.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class WandB:
    def __init__(self, project: str, run_name: str | None, run_config: dict, entity: str | None = None,
                 tags: list[str] | None = None):
        try:
            import wandb
        except ImportError:
            raise ConfigError("logging.report_to wandb: install it (pip install budwood[trackers])") from None
        self.run = wandb.init(project=project, name=run_name, config=run_config, resume="allow", entity=entity,
                              tags=tags or None)

    def log(self, numbers: dict[str, float], step: int) -> None:
        self.run.log(numbers, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflow:
    """One MLflow run per training (a resumed training starts a new run, tagged with the step it resumed
    from); the resolved config as flattened parameters. `tracking_uri` None: MLflow's own default
    (MLFLOW_TRACKING_URI, else its own)."""

    def __init__(self, experiment: str, run_name: str | None, run_config: dict, tracking_uri: str | None,
                 resume_step: int | None):
        try:
            from mlflow import MlflowClient
        except ImportError:
            raise ConfigError("logging.report_to mlflow: install it (pip install budwood[trackers])") from None
        self.client = MlflowClient(tracking_uri=tracking_uri)
        found = self.client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else self.client.create_experiment(experiment)
        tags = {"budwood.resumed_from_step": str(resume_step)} if resume_step is not None else {}
        self.run_id = self.client.create_run(experiment_id, run_name=run_name, tags=tags).info.run_id
        for key, value in _flatten(run_config).items():
            self.client.log_param(self.run_id, key, value[:MLFLOW_PARAM_CHARS])

    def log(self, numbers: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in numbers.items()])

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _flatten(config: dict, prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out |= _flatten(value, f"{name}.")
        else:
            out[name] = value if isinstance(value, str) else json.dumps(value)
    return out


def open_trackers(logging, folder: Path, run_config: dict, resume_step: int | None) -> list[Tracker]:
    """The trackers `logging.report_to` names (logging.tensorboard / logging.wandb add theirs), opened."""
    names = logging.trackers
    trackers: list[Tracker] = []
    try:
        for name in names:
            if name == "tensorboard":
                trackers.append(TensorBoard(folder))
            elif name == "wandb":
                trackers.append(WandB(logging.wandb_project, logging.run_name, run_config, logging.wandb_entity,
                                      logging.wandb_tags))
            else:
                trackers.append(MLflow(logging.mlflow_experiment, logging.run_name, run_config,
                                       logging.mlflow_tracking_uri, resume_step))
    except BaseException:
        for t in trackers:
            t.close()
        raise
    return trackers
