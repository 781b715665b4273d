"""Training under torchrun when things go wrong: an error on one rank ends all ranks, token caps per rank, and the
process group on GPUs."""
import time

import pytest

from budwood.data.pack import plan_epoch
from budwood.train import distributed
from tests.conftest import torchrun, torchrun_config


@pytest.mark.slow
def test_an_error_on_rank_0_alone_ends_every_rank(tmp_path, company_data):
    """output_dir holds someone else's files: only rank 0 checks (locked_output_dir), raises, and waits in
    teardown's barrier while rank 1 trains on into DDP's first collective: both hang until killed
    (a 4-step run takes ~10 s; correct code exits with the error message)."""
    out = tmp_path / "foreign"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    started = time.monotonic()
    config = torchrun_config(tmp_path, company_data, out, max_steps=4, save_every=2, eval_every=2)
    code, output = torchrun(config, timeout=60)
    assert code is not None, f"still running after {time.monotonic() - started:.0f} s: the ranks deadlocked"
    assert code != 0 and "not made by budwood" in output


def test_tokens_per_batch_caps_the_micro_batches_of_several_ranks_too():
    """training.tokens_per_batch 'caps micro-batches by tokens'. One process honours it (plan_epoch); under
    torchrun distributed.share re-chunks a step's examples by batch_size alone, so a rank's micro-batch
    holds up to batch_size long examples (here 4 x 500 tokens against a cap of 1000): the memory bound the
    setting exists for is gone on exactly the long-tailed data it is for."""
    lengths = [500] * 16
    batch_size, tokens_per_batch, accumulation = 8, 1000, 4
    plan = plan_epoch(lengths, "padded", batch_size, tokens_per_batch, 0, 0)
    assert all(max(lengths[i] for i in b) * len(b) <= tokens_per_batch for b in plan)  # one process: capped
    step = [i for b in plan[:accumulation] for i in b]
    for rank in range(2):
        shares = distributed.share(distributed.Dist(2, rank, rank, "ddp"), step, batch_size, lengths, tokens_per_batch)
        for indices, _ in shares:
            padded = max(lengths[i] for i in indices) * len(indices)
            assert padded <= tokens_per_batch, f"rank {rank}: a micro-batch of {padded} tokens"



def test_the_process_group_made_on_gpus_can_sum_the_loss(monkeypatch):
    """On GPUs setup() calls init_process_group("nccl"), whose backend serves CUDA tensors only (torch's
    Backend.backend_capability: nccl -> ["cuda"]). Dist.sum all-reduces a CPU float64 tensor every step
    (the train loss) and every validation: 'No backend type associated with device type cpu' on the
    first step of any GPU run. Emulated on the CPU: setup() sees a GPU, and the group it asks for is built
    with gloo standing in for each backend on the same devices (nccl -> cuda only)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.distributed_c10d import Backend, BackendConfig

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: None)
    real = dist.init_process_group

    def emulated(backend=None, **kwargs):
        devices = BackendConfig(Backend(backend)).get_device_backend_map()
        real(",".join(f"{device}:gloo" for device in devices), rank=0, world_size=1, store=dist.HashStore())

    monkeypatch.setattr(dist, "init_process_group", emulated)
    d = distributed.setup("ddp", "auto")
    try:
        assert d.sum(1.5) == 1.5
    finally:
        dist.destroy_process_group()
