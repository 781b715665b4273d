"""Strategies: one process runs the plan as it is; several deal a step's examples out so that together
they run exactly the single process's examples, each rank as many micro-batches."""
import pytest

from budwood.train.distributed import DDP, FSDP, Chunking, Dist, Single, strategy_for


def test_one_process_runs_the_planned_micro_batches_and_every_collective_is_the_identity():
    s = Single()
    planned = [[3, 1], [0], [2, 4]]
    assert s.deal(planned, [3, 1, 0, 2, 4], Chunking([5] * 5, 2)) == [([3, 1], 1.0), ([0], 1.0), ([2, 4], 1.0)]
    assert s.sum(2.5) == 2.5 and s.gather("x") == ["x"] and s.from_main("paused") == "paused"
    assert s.is_main and s.saves_on_signal and s.grad_scale == 1.0 and s.name == "none"


@pytest.mark.parametrize("kind", [DDP, FSDP])
def test_several_ranks_share_a_step_once_each_under_the_same_caps(kind):
    lengths = [100, 400, 300, 100, 200, 50, 500]
    examples = [6, 1, 2, 4, 0, 3, 5]
    chunking = Chunking(lengths, batch_size=2, tokens=600)
    deals = [kind(Dist(3, r, r, kind.name)).deal([examples], examples, chunking) for r in range(3)]
    assert len({len(d) for d in deals}) == 1  # collectives wait for every rank: as many micro-batches each
    real = sorted(i for d in deals for indices, weight in d if weight == 1.0 for i in indices)
    assert real == sorted(examples)
    for d in deals:
        for indices, weight in d:
            assert weight in (0.0, 1.0) and len(indices) <= 2
            assert len(indices) * max(lengths[i] for i in indices) <= 600
    assert not kind(Dist(3, 0, 0, kind.name)).saves_on_signal  # a signal finds ranks at different points


def test_one_process_gets_the_single_strategy(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert isinstance(strategy_for("auto", "cpu"), Single)
