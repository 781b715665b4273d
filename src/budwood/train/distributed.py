"""Training beyond one process: `torchrun --nproc_per_node N budwood train CONFIG` (and torchrun's
multi-node arguments). One process per device; gloo on CPU, nccl on GPUs.

Every rank reads the same data and plans the same epochs (the plan is a pure function of the seed),
so each optimizer step's examples are the ones a single process would use with the same batch size
and accumulation: the step's examples are dealt out across the ranks, each rank's share is split
into micro-batches (as many on every rank, a rank short of examples runs one with weight 0), and the
gradients are summed across ranks. The loss of a step is the sum over all its trained tokens
divided by their number, exactly as in one process, so the loss curve is the single-process one up
to float rounding.

  ddp   the whole model on every rank, DistributedDataParallel summing the LoRA gradients.
  fsdp  the base's frozen weights sharded across ranks (FSDP2 fully_shard, per decoder layer), for
        bases too large for one device; the LoRA weights, small, stay whole on every rank, their
        gradients summed by one all-reduce per step. Checkpoints and exact resume work the same way
        in both: every rank holds the same LoRA and optimizer state, and rank 0 writes it.

Only rank 0 writes outputs (checkpoints, metrics, the adapter); the others wait for it.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from budwood.errors import TrainingError


@dataclass
class Dist:
    world: int = 1
    rank: int = 0
    local_rank: int = 0
    strategy: str = "none"  # none | ddp | fsdp

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def sum(self, value: float) -> float:
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return float(t.item())

    def gather(self, obj) -> list:
        if not self.active:
            return [obj]
        out: list = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out


def setup(strategy: str, device: str) -> Dist:
    """The process group torchrun asks for (WORLD_SIZE > 1), or one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return Dist()
    if strategy == "none":
        raise TrainingError("training.distributed is none, but torchrun started several processes; set it to "
                            "ddp or fsdp (or auto)")
    dist = torch.distributed
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    gpu = torch.cuda.is_available() and device != "cpu"
    if gpu:
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():  # on GPUs, nccl for CUDA tensors and gloo for the CPU scalars summed per step
        dist.init_process_group("cpu:gloo,cuda:nccl" if gpu else "gloo")
    return Dist(world, rank, local_rank, "ddp" if strategy == "auto" else strategy)


def teardown(d: Dist, failed: bool = False) -> None:
    """After a run every rank meets once more; after an error a rank leaves at once (waiting for the
    others, which may be inside a collective, would hang them all), and torchrun stops the rest."""
    if d.active and not failed and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def device_for(d: Dist, device: torch.device) -> torch.device:
    """Each rank on its own GPU (LOCAL_RANK); CPU ranks share the CPU."""
    if d.active and device.type == "cuda":
        return torch.device("cuda", d.local_rank)
    return device


class LossModule(torch.nn.Module):
    """The causal LM as a module whose forward is the token losses, so that the data-parallel wrappers
    see the whole computation go through their forward."""

    def __init__(self, lm: torch.nn.Module):
        super().__init__()
        self.lm = lm

    def forward(self, input_ids, labels, position_ids, example_index):
        from budwood.data.pack import Batch
        from budwood.train.loss import token_losses

        return token_losses(self.lm, Batch(input_ids, labels, position_ids, example_index, 0))[0]


def wrap(d: Dist, lm: torch.nn.Module, device: torch.device, trainable: list[torch.nn.Parameter]):
    """(the module to run batches through, the number its losses are multiplied by before backward)."""
    module = LossModule(lm)
    if d.strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        # DDP averages gradients over ranks: a loss scaled by the world size makes that the sum
        return DistributedDataParallel(module, device_ids=ids), float(d.world)
    if d.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        ignored = set(trainable)  # LoRA weights stay whole on every rank (all_reduce_grads sums them)
        for layer in getattr(lm.get_decoder(), "layers", []):
            fully_shard(layer, ignored_params=ignored)
        # the root: embeddings, final norm and output head (often one tied weight), gathered for a forward
        fully_shard(module, ignored_params=ignored)
        return module, 1.0
    return module, 1.0


def reshard(d: Dist, module: torch.nn.Module) -> None:
    """Every FSDP module back to its shards, on every rank. A forward without backward (validation)
    leaves the root gathered, and reading a state dict on rank 0 alone (a checkpoint) would reshard it
    there only: the ranks' next all-gathers would then differ."""
    if d.strategy != "fsdp":
        return
    from torch.distributed.fsdp import FSDPModule

    for m in module.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def no_sync(wrapped, last: bool):
    """DDP's gradient sync only on a step's last micro-batch."""
    if not last and hasattr(wrapped, "no_sync"):
        return wrapped.no_sync()
    return nullcontext()


def all_reduce_grads(d: Dist, params: list[torch.nn.Parameter]) -> None:
    """Sum the LoRA gradients over ranks in one flat all-reduce (FSDP leaves them to us)."""
    if d.strategy != "fsdp" or not d.active:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    at = 0
    for p, g in zip(params, grads, strict=True):
        n = g.numel()
        p.grad = flat[at:at + n].view_as(g).clone()
        at += n


def chunk(indices: list[int], batch_size: int, lengths: list[int] | None = None, tokens: int | None = None,
          packed: bool = False) -> list[list[int]]:
    """Consecutive micro-batches of at most `batch_size` examples and, with `tokens`, at most that many
    tokens (padded rows: rows x longest; packed: the sum), as one process's plan caps them."""
    def fits(batch: list[int]) -> bool:
        if tokens is None or lengths is None:
            return True
        sizes = [lengths[j] for j in batch]
        return (sum(sizes) if packed else len(sizes) * max(sizes)) <= tokens

    out: list[list[int]] = []
    for i in indices:
        if out and len(out[-1]) < batch_size and fits(out[-1] + [i]):
            out[-1].append(i)
        else:
            out.append([i])
    return out


def share(d: Dist, example_indices: list[int], batch_size: int, lengths: list[int] | None = None,
          tokens: int | None = None, packed: bool = False) -> list[tuple[list[int], float]]:
    """This rank's micro-batches of one step: its share of the step's examples (dealt out in turn), in
    micro-batches capped as one process caps them (`chunk`); every rank runs as many, and a micro-batch
    with no example of its own repeats the step's first example with weight 0 (it must still run:
    collectives wait for every rank)."""
    if not d.active:
        raise AssertionError("share() is for several ranks")
    shares = [chunk(example_indices[r::d.world], batch_size, lengths, tokens, packed) for r in range(d.world)]
    mine = shares[d.rank]
    count = max(1, max(len(s) for s in shares))
    return [(mine[c], 1.0) if c < len(mine) else ([example_indices[0]], 0.0) for c in range(count)]
