"""`torchrun --nproc_per_node 2 budwood train` on the CPU (gloo): the loss curve and the adapter of a
single process with the same global batch, for DDP and FSDP; checkpoints cross between the two."""
import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from budwood.config import load_config
from budwood.train.metrics import read_metrics
from budwood.train.recipe import TrainingInterrupted, train
from tests.conftest import torchrun, torchrun_config


def two_processes(config: Path, *args: str) -> str:
    code, output = torchrun(config, *args)
    assert code == 0, output[-4000:]
    return output


def losses(adapter: Path) -> tuple[dict[int, float], dict[int, float]]:
    records = read_metrics(adapter / "metrics.jsonl")
    return ({r["step"]: r["loss"] for r in records if "loss" in r},
            {r["step"]: r["val_loss"] for r in records if "val_loss" in r})


def weights_close(a: Path, b: Path) -> float:
    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert x.keys() == y.keys()
    return max((x[k] - y[k]).abs().max().item() for k in x)


@pytest.fixture(scope="module")
def single(tmp_path_factory, company_data):
    tmp = tmp_path_factory.mktemp("single")
    return train(load_config(torchrun_config(tmp, company_data, tmp / "single"))), tmp


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_processes_train_what_one_does(single, company_data, strategy):
    one, tmp = single
    out = tmp / strategy
    two_processes(torchrun_config(tmp, company_data, out, distributed=strategy))
    (train_one, val_one), (train_two, val_two) = losses(one), losses(out)
    assert train_one.keys() == train_two.keys() == set(range(1, 13)) and val_one.keys() == val_two.keys()
    for step in train_one:
        assert train_two[step] == pytest.approx(train_one[step], rel=1e-5, abs=1e-6), step
    for step in val_one:
        assert val_two[step] == pytest.approx(val_one[step], rel=1e-5), step
    assert weights_close(one, out) < 1e-5
    prov = json.loads((out / "budwood.json").read_text())
    assert prov["config"]["training"]["distributed"] == strategy and prov["steps"] == 12
    assert not list(out.glob("**/*.rank1*"))  # only rank 0 wrote


@pytest.mark.slow
def test_a_single_process_checkpoint_resumes_under_ddp(single, company_data):
    """Stopped after step 6 by one process, finished by two: the adapter of the uninterrupted run."""
    one, tmp = single
    out = tmp / "resumed"
    config = torchrun_config(tmp, company_data, out)
    with pytest.raises(TrainingInterrupted):
        train(load_config(config), stop=lambda: "stopped" if (out / "checkpoints" / "step-00000006").exists() else None)
    assert "resumed from" in two_processes(config, "--resume")
    assert weights_close(one, out) < 1e-5
    train_one, _ = losses(one)
    train_resumed, _ = losses(out)
    assert all(train_resumed[s] == pytest.approx(train_one[s], rel=1e-5) for s in range(7, 13))
    # the two processes' checkpoint holds both ranks' RNG streams, and one process resumes it
    rng = load_file(out / "checkpoints" / "step-00000012" / "rng.safetensors")
    assert {"torch", "torch.1"} <= set(rng)
