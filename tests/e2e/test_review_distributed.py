"""Review of training under torchrun: each test states a documented promise that the code breaks."""
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from budwood.data.pack import plan_epoch
from budwood.train import distributed


def config_file(tmp: Path, data: dict, out: Path, **training) -> Path:
    cfg = {"base_model": "budwood-tiny",
           "data": {"train": str(data["train"]), "validation": str(data["validation"])},
           "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
           "training": {"max_steps": 4, "batch_size": 8, "gradient_accumulation": 2, "learning_rate": 1e-3,
                        "precision": "fp32", "compile": False, "save_every": 2, "eval_every": 2, "seed": 0,
                        "max_seq_len": 256, **training},
           "output_dir": str(out)}
    path = tmp / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def torchrun(config: Path, *args: str, timeout: float) -> tuple[int | None, str]:
    """(exit code, or None if it was still running after `timeout` s and was killed; its output).
    torchrun starts each worker in a session of its own, so on a timeout the workers are killed by pid."""
    import psutil

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_port", str(port), "-m", "budwood", "train", str(config), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        return proc.returncode, output
    except subprocess.TimeoutExpired:
        workers = psutil.Process(proc.pid).children(recursive=True)
        for w in workers:
            w.kill()
        proc.kill()
        output, _ = proc.communicate()
        return None, output


@pytest.mark.slow
def test_an_error_on_rank_0_alone_ends_every_rank(tmp_path, company_data):
    """output_dir holds someone else's files: only rank 0 checks (locked_output_dir), raises, and waits in
    teardown's barrier while rank 1 trains on into DDP's first collective: both hang until killed
    (a 4-step run takes ~10 s; correct code exits with the error message)."""
    out = tmp_path / "foreign"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    started = time.monotonic()
    code, output = torchrun(config_file(tmp_path, company_data, out), timeout=60)
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
