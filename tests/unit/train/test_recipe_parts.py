"""The recipe's parts that need no model: the epoch cursor, the objective seam and the loop's stop logic."""
from pathlib import Path

import pytest
import torch

from budwood.config import TrainConfig
from budwood.data.pack import Batch
from budwood.data.template import IGNORE, Encoded
from budwood.train.data import EpochCursor, PreparedData
from budwood.train.distributed import Single
from budwood.train.loss import SFT, LossModule
from budwood.train.recipe import StepResult, Stopped, StopReason, TrainingInterrupted, TrainingRun


def test_the_cursor_runs_an_accumulation_window_across_an_epochs_end():
    plans = {0: [[0], [1], [2]], 1: [[2], [0], [1]]}
    cursor = EpochCursor(plans.__getitem__, epoch=0, cursor=2)
    assert cursor.take(2) == [[2], [2]]
    assert (cursor.epoch, cursor.cursor) == (1, 1) and cursor.epochs == round(1 + 1 / 3, 4)


def test_sft_counts_a_unit_per_trained_next_token():
    example = Encoded(input_ids=[1, 2, 3, 4, 5], labels=[IGNORE, IGNORE, 3, 4, IGNORE], source="x")
    assert SFT().units(example) == 2  # the first label is never a target


def test_the_loss_module_runs_whatever_objective_setup_chose():
    class Doubled:
        name = "doubled"

        def losses(self, lm, batch: Batch) -> torch.Tensor:
            return lm(batch.input_ids.float()).sum(-1) * 2

        def units(self, example) -> int:
            return 1

    module = LossModule(torch.nn.Identity(), Doubled())
    ids = torch.tensor([[1, 2], [3, 4]])
    batch = Batch(ids, ids, None, ids, 4)
    assert module.run(batch).tolist() == [6.0, 14.0]


class _Run(TrainingRun):
    """The loop without a model: step() only advances the state; checkpoints are recorded."""

    def __init__(self, tmp: Path, total: int, stop=None, interrupt_at: int | None = None, **training):
        config = TrainConfig.model_validate({"data": {"train": "t.jsonl"}, "output_dir": str(tmp),
                                             "training": {"save_every": 2, "eval_every": 100, **training}})
        super().__init__(config, Single(), _Silent(), stop)
        self.lengths, self.total_steps, self.interrupt_at = [1, 1, 1], total, interrupt_at
        self.eval_every, self.save_every, self.high_loss_steps = 100, 2, 0  # what setup() resolves
        self.data = PreparedData([], [], {})
        self.saved_at: list[int] = []

    def _plan(self, epoch):
        return [[0], [1], [2]]

    def step(self):
        if self.state.step + 1 == self.interrupt_at:
            raise KeyboardInterrupt
        self.position.take(1)
        self.state.step += 1
        return StepResult(1.0, 0.5)

    def _log_step(self, result):
        pass

    def checkpoint(self):
        self.saved_at.append(self.state.step)
        return Path(f"step-{self.state.step}")


class _Silent:
    def start(self, total_steps, first_step): ...
    def update(self, record): ...
    def note(self, message): ...
    def stop(self): ...


def test_the_loop_runs_to_the_budget_checkpointing_on_schedule_but_not_at_the_end(tmp_path):
    run = _Run(tmp_path, total=5)
    assert run.train() is None  # the budget spent: nothing stopped it
    assert run.state.step == 5 and run.saved_at == [2, 4]  # finish() writes the last one


def test_a_stop_reason_ends_the_loop_after_the_step_and_checkpoints_it(tmp_path):
    run = _Run(tmp_path, total=10, stop=lambda: StopReason.PAUSED if run.state.step == 3 else None)
    stopped = run.train()
    assert stopped == Stopped(StopReason.PAUSED, signal=False) and run.state.step == 3
    with pytest.raises(TrainingInterrupted, match="^paused at step 3; checkpoint saved to step-3") as e:
        run.interrupt(stopped)
    assert e.value.reason is StopReason.PAUSED and e.value.step == 3 and run.saved_at == [2, 3]


@pytest.mark.parametrize("reason", [StopReason.INTERRUPTED, "any words", "finished"])
def test_whatever_a_stop_callback_answers_stops_the_run_and_is_not_a_signal(tmp_path, reason):
    """Any answer of `stop` ends the run short of its budget (never as if it had finished), and is not taken
    for Ctrl-C: under DDP/FSDP a stop, decided by rank 0, finds the ranks together, so it is checkpointed."""
    run = _Run(tmp_path, total=10, stop=lambda: reason if run.state.step == 3 else None)
    assert run.train() == Stopped(reason, signal=False) and run.state.step == 3


def test_the_loss_watchdog_stops_after_patience_steps_above_its_threshold(tmp_path):
    """Axolotl's loss_watchdog_threshold/patience: every step's loss here is 1.0."""
    run = _Run(tmp_path, total=10, loss_watchdog_threshold=0.5, loss_watchdog_patience=3)
    stopped = run.train()
    assert run.state.step == 3 and stopped.reason is StopReason.LOSS_WATCHDOG and not stopped.signal
    assert stopped.detail.startswith("the training loss stayed above 0.5 for 3 steps")
    with pytest.raises(TrainingInterrupted, match="^loss watchdog: the training loss stayed above 0.5 for 3 steps.*"
                                                  "lower the learning rate") as e:
        run.interrupt(stopped)
    assert e.value.reason is StopReason.LOSS_WATCHDOG
    assert _Run(tmp_path, total=4, loss_watchdog_threshold=2.0).train() is None  # never above it


def test_ctrl_c_in_a_step_saves_the_step_before(tmp_path):
    run = _Run(tmp_path, total=10, interrupt_at=4)
    stopped = run.train()
    assert stopped == Stopped(StopReason.INTERRUPTED, signal=True) and run.state.step == 3
    with pytest.raises(TrainingInterrupted, match="^interrupted at step 3; checkpoint saved"):
        run.interrupt(stopped)


def test_ctrl_c_before_the_first_step_has_nothing_to_save(tmp_path):
    run = _Run(tmp_path, total=10, interrupt_at=1)
    stopped = run.train()
    assert stopped.signal
    with pytest.raises(TrainingInterrupted, match="nothing to save yet"):
        run.interrupt(stopped)
    assert run.saved_at == []
