"""The typed run state: what a checkpoint saves, what a resume must match, and why a run stops."""
import json
from pathlib import Path

import pytest

from budwood.config import TrainConfig
from budwood.errors import TrainingError
from budwood.train.state import RunIdentity, RunState, StopReason, resume_hash


def test_stop_reasons_are_the_words_the_worker_and_the_messages_use():
    assert {r.value for r in StopReason} == {"interrupted", "cancelled", "paused", "shutdown",
                                             "lease lost", "loss watchdog"}
    assert StopReason.LEASE_LOST == "lease lost" and f"{StopReason.PAUSED} at step 3" == "paused at step 3"
    assert StopReason("shutdown") is StopReason.SHUTDOWN


def test_a_checkpoints_trainer_state_keeps_its_field_order_and_round_trips():
    state = RunState(step=4, epoch=1, cursor=2, tokens_seen=900, trained_tokens=300, elapsed_s=1.5,
                     train_loss=2.25, val_loss=None)
    identity = RunIdentity({"train": {"path": "t.jsonl", "fingerprint": "sha256:x"}}, "sha256:base", "abc")
    saved = state.saved(identity, elapsed_s=7.0)
    assert list(saved) == ["step", "epoch", "cursor", "tokens_seen", "trained_tokens", "elapsed_s", "train_loss",
                           "val_loss", "data", "base_fingerprint", "config_hash"]
    assert saved["elapsed_s"] == 7.0 and state.elapsed_s == 1.5  # the clock's time, the state untouched
    back = RunState.from_saved(json.loads(json.dumps(dict(saved, optimizer={}, scheduler={}))))
    assert back == RunState(4, 1, 2, 900, 300, 7.0, 2.25, None)


@pytest.mark.parametrize(("change", "message"), [
    ({"config_hash": "other"}, "different config"),
    ({"base_fingerprint": "sha256:other"}, "base model's weights changed"),
    ({"data": {"train": {"fingerprint": "sha256:y"}}}, r"train data \(t.jsonl\) changed"),
])
def test_a_checkpoint_of_another_run_is_refused_naming_what_changed(change, message):
    identity = RunIdentity({"train": {"path": "t.jsonl", "fingerprint": "sha256:x"}}, "sha256:base", "abc")
    saved = dict(identity.saved(), **change)
    with pytest.raises(TrainingError, match=message):
        identity.check(Path("ckpt"), saved)
    identity.check(Path("ckpt"), identity.saved())


def test_resume_hash_ignores_the_budget_and_the_paths_but_not_the_optimisation():
    base = TrainConfig.model_validate({"data": {"train": "a.jsonl"}, "output_dir": "one"})
    moved = TrainConfig.model_validate({"data": {"train": "elsewhere/a.jsonl"}, "output_dir": "two",
                                        "training": {"max_steps": 99, "save_every": 3, "distributed": "ddp"}})
    faster = TrainConfig.model_validate({"data": {"train": "a.jsonl"}, "training": {"learning_rate": 1e-3}})
    assert resume_hash(base) == resume_hash(moved)
    assert resume_hash(base) != resume_hash(faster)
