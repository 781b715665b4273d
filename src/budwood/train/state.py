"""The run state a checkpoint saves, what a resume must match, and why a run stopped.

No torch here: the fine-tuning service's worker compares stop reasons without loading the recipe.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from budwood.errors import TrainingError

if TYPE_CHECKING:
    from budwood.config import TrainConfig


class StopReason(StrEnum):
    """Why a run stopped short of its step budget (a nan loss is a TrainingError, not a stop). `train()`'s
    `stop` callback returns one of the requested ones (any other string is reported as given); each value
    is the word TrainingInterrupted's message starts with."""

    INTERRUPTED = "interrupted"  # Ctrl-C, or SIGTERM (the CLI turns it into Ctrl-C)
    # asked for by `stop` (the fine-tuning service's worker):
    CANCELLED = "cancelled"
    PAUSED = "paused"
    SHUTDOWN = "shutdown"  # the worker is shutting down; another continues the job
    LOSS_WATCHDOG = "loss watchdog"  # training.loss_watchdog_threshold: the loss stayed too high
    LEASE_LOST = "lease lost"  # the job's lease ran out or was taken: another worker has it


@dataclass
class RunState:
    """Where the run is after its last completed optimizer step: the only thing a checkpoint saves
    besides tensors (trainer_state.json). A step in flight never changes it, so an interrupt
    mid-step saves the step before.

    `epoch` and `cursor` are the position in the data plan (the next micro-batch of that epoch's
    plan); `elapsed_s` is the training time of the runs this one resumed (the clock adds its own)."""

    step: int = 0
    epoch: int = 0
    cursor: int = 0
    tokens_seen: int = 0  # every token of every example run, prompts included
    trained_tokens: int = 0  # tokens with a label: what the loss is averaged over
    elapsed_s: float = 0.0
    train_loss: float | None = None
    val_loss: float | None = None

    @classmethod
    def from_saved(cls, saved: dict) -> RunState:
        return cls(**{f.name: saved[f.name] for f in fields(cls)})

    def saved(self, identity: RunIdentity, elapsed_s: float) -> dict:
        """trainer_state.json's fields, in the order of every checkpoint written so far."""
        return dict(asdict(self), elapsed_s=elapsed_s, **identity.saved())


@dataclass(frozen=True)
class RunIdentity:
    """What a checkpoint must share with the run that resumes it: the data (by fingerprint), the base
    model's weights and the settings that shape training (`resume_hash`)."""

    data: dict = field(default_factory=dict)
    base_fingerprint: str = ""
    config_hash: str = ""

    def saved(self) -> dict:
        return {"data": self.data, "base_fingerprint": self.base_fingerprint, "config_hash": self.config_hash}

    def check(self, path: Path, saved: dict) -> None:
        """Raise TrainingError, naming what changed, unless the checkpoint at `path` is this run's."""
        if saved["config_hash"] != self.config_hash:
            raise TrainingError(f"{path}: the checkpoint was written with a different config; resume needs the "
                                "same model, data, LoRA and optimisation settings (the step budget may change)")
        if saved.get("base_fingerprint") != self.base_fingerprint:
            raise TrainingError(f"{path}: the base model's weights changed since the checkpoint")
        for split, info in self.data.items():
            if saved.get("data", {}).get(split, {}).get("fingerprint") != info["fingerprint"]:
                raise TrainingError(f"{path}: the {split} data ({info['path']}) changed since the checkpoint")


def resume_hash(config: TrainConfig) -> str:
    """What must match between a checkpoint and its resume: all but the step budget and bookkeeping.
    Paths are not part of it (the data is checked by its fingerprints), so a run resumes in a moved
    folder or on another machine, as the fine-tuning service's workers do."""
    resolved = config.resolved()
    for key in ("max_steps", "epochs", "save_every", "eval_every", "keep_checkpoints", "compile", "distributed",
                "evals_per_epoch", "saves_per_epoch", "loss_watchdog_threshold", "loss_watchdog_patience"):
        resolved["training"].pop(key, None)
    for key in ("train", "validation"):
        resolved["data"].pop(key, None)
    for source in resolved["data"].get("sources") or []:
        source.pop("path")  # checked by the data's fingerprints, as data.train is
    resolved.pop("logging", None)
    resolved.pop("output_dir", None)
    resolved.pop("init_adapter", None)  # checked by its fingerprint, as the data is
    # keys added since checkpoints were first written, at their defaults: those checkpoints still resume
    resolved["data"].pop("chat_template", None)  # a check before training, not a setting of it
    if resolved["data"].get("sources") == []:
        resolved["data"].pop("sources")
    if resolved.get("quantization") == "none":
        resolved.pop("quantization")
    if resolved["training"].get("method") == "sft" and resolved["training"].get("dpo") is None:
        resolved["training"].pop("method"), resolved["training"].pop("dpo")
    dpo = resolved["training"].get("dpo") or {}
    if dpo.get("share_prompt") is False:  # what DPO checkpoints written before the key did
        dpo.pop("share_prompt")
    if not any(recipe.get("enabled") for recipe in resolved.get("reliability", {}).values()):
        resolved.pop("reliability", None)
    return hashlib.sha256(json.dumps(resolved, sort_keys=True).encode()).hexdigest()[:16]
