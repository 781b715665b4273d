"""Training beyond one process: `torchrun --nproc_per_node N budwood train CONFIG` (and torchrun's
multi-node arguments). One process per device; gloo on CPU, nccl on GPUs.

Every rank reads the same data and plans the same epochs (the plan is a pure function of the seed),
so each optimizer step's examples are the ones a single process would use with the same batch size
and accumulation: the step's examples are dealt out across the ranks, each rank's share is split
into micro-batches (as many on every rank, a rank short of examples runs one with weight 0), and the
gradients are summed across ranks. The loss of a step is the sum over all its trained tokens
divided by their number, exactly as in one process, so the loss curve is the single-process one up
to float rounding.

The recipe sees all of this through a `Strategy`, called at a few fixed points (place and wrap the
model, deal out a step, reduce, checkpoint on the main rank, teardown), and reads as if it ran in
one process:

  Single  one process: every call is the identity or does nothing.
  DDP     the whole model on every rank, DistributedDataParallel summing the LoRA gradients.
  FSDP    the base's frozen weights sharded across ranks (FSDP2 fully_shard, per decoder layer), for
          bases too large for one device; the LoRA weights, small, stay whole on every rank, their
          gradients summed by one all-reduce per step. Checkpoints and exact resume work the same way
          in both: every rank holds the same LoRA and optimizer state, and rank 0 writes it.

Only rank 0 writes outputs (checkpoints, metrics, the adapter); the others wait for it.
"""
from __future__ import annotations

import os
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from budwood.errors import TrainingError
from budwood.train.loss import LossModule

MicroBatch = tuple[list[int], float]  # example indices, and the weight of their losses (0: a filler)


@dataclass
class Dist:
    """The process group torchrun started: this process's place in it and the strategy asked for."""

    world: int = 1
    rank: int = 0
    local_rank: int = 0
    strategy: str = "none"  # none | ddp | fsdp

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


@dataclass(frozen=True)
class Chunking:
    """How one process caps a micro-batch: at most `batch_size` examples and, with `tokens`, at most
    that many tokens (padded rows: rows x longest; packed: the sum). `lengths` are the examples'."""

    lengths: list[int]
    batch_size: int
    tokens: int | None = None
    packed: bool = False


class Strategy(Protocol):
    """Where a recipe meets the processes it runs in. One instance per run: `wrap` is called once,
    and the calls after it act on what it wrapped."""

    name: str  # none | ddp | fsdp, as provenance records it
    rank: int
    world: int
    grad_scale: float  # what a step's loss is multiplied by before backward
    saves_on_signal: bool  # whether Ctrl-C or SIGTERM may checkpoint (all ranks must be at the same point)

    @property
    def is_main(self) -> bool:
        """The rank that writes outputs and reports progress."""
        ...

    def place(self, device: torch.device) -> torch.device:
        """The device this rank trains on."""
        ...

    def wrap(self, module: LossModule, device: torch.device, trainable: list[torch.nn.Parameter]) -> torch.nn.Module:
        """The module to run training batches through (validation runs `module` itself)."""
        ...

    def deal(self, planned: list[list[int]], examples: list[int], chunking: Chunking) -> list[MicroBatch]:
        """This rank's micro-batches of one step: `planned` is how one process runs it, `examples` the
        step's examples in the order several ranks deal them out."""
        ...

    def accumulate(self, last: bool) -> AbstractContextManager:
        """Around a micro-batch's forward and backward; `last` is the step's last micro-batch."""
        ...

    def reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        """After a step's backward passes: every rank's gradients become their sum."""
        ...

    def sum(self, value: float) -> float:
        """`value` summed over ranks."""
        ...

    def gather(self, obj: Any) -> list:
        """Every rank's `obj`, in rank order."""
        ...

    def from_main(self, obj: Any) -> Any:
        """Rank 0's `obj` on every rank: what one rank decides for all, or they would part ways."""
        ...

    def reshard(self) -> None:
        """Back to the state every rank's next collective expects (after validation, before a checkpoint)."""
        ...

    def barrier(self) -> None: ...

    def teardown(self, failed: bool = False) -> None:
        """After a run every rank meets once more; after an error a rank leaves at once (waiting for the
        others, which may be inside a collective, would hang them all), and torchrun stops the rest."""
        ...


class Single:
    """One process: the recipe as written."""

    name = "none"
    rank, world, is_main = 0, 1, True
    grad_scale = 1.0
    saves_on_signal = True

    def place(self, device: torch.device) -> torch.device:
        return device

    def wrap(self, module: LossModule, device: torch.device, trainable: list[torch.nn.Parameter]) -> torch.nn.Module:
        return module

    def deal(self, planned: list[list[int]], examples: list[int], chunking: Chunking) -> list[MicroBatch]:
        return [(indices, 1.0) for indices in planned]

    def accumulate(self, last: bool) -> AbstractContextManager:
        return nullcontext()

    def reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        pass

    def sum(self, value: float) -> float:
        return value

    def gather(self, obj: Any) -> list:
        return [obj]

    def from_main(self, obj: Any) -> Any:
        return obj

    def reshard(self) -> None:
        pass

    def barrier(self) -> None:
        pass

    def teardown(self, failed: bool = False) -> None:
        pass


class _Ranks:
    """What DDP and FSDP share: a process group, each rank on its own GPU, a step's examples dealt out.
    A signal finds the ranks at different points: they keep the last periodic checkpoint."""

    grad_scale, saves_on_signal = 1.0, False

    def __init__(self, dist: Dist):
        self.dist, self.rank, self.world = dist, dist.rank, dist.world

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def place(self, device: torch.device) -> torch.device:
        """Each rank on its own GPU (LOCAL_RANK); CPU ranks share the CPU."""
        return torch.device("cuda", self.dist.local_rank) if device.type == "cuda" else device

    def deal(self, planned: list[list[int]], examples: list[int], chunking: Chunking) -> list[MicroBatch]:
        return share(self.dist, examples, chunking.batch_size, chunking.lengths, chunking.tokens, chunking.packed)

    def accumulate(self, last: bool) -> AbstractContextManager:
        return nullcontext()

    def reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        pass

    def sum(self, value: float) -> float:
        return self.dist.sum(value)

    def gather(self, obj: Any) -> list:
        return self.dist.gather(obj)

    def from_main(self, obj: Any) -> Any:
        return self.dist.gather(obj)[0]

    def reshard(self) -> None:
        pass

    def barrier(self) -> None:
        self.dist.barrier()

    def teardown(self, failed: bool = False) -> None:
        if not failed and torch.distributed.is_initialized():
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()


class DDP(_Ranks):
    """The whole model on every rank; DistributedDataParallel sums the gradients in the last backward."""

    name = "ddp"

    def wrap(self, module: LossModule, device: torch.device, trainable: list[torch.nn.Parameter]) -> torch.nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        ids = [device.index] if device.type == "cuda" else None
        self.grad_scale = float(self.world)  # DDP averages gradients over ranks: a loss scaled by the world sums
        self.wrapped = DistributedDataParallel(module, device_ids=ids)
        return self.wrapped

    def accumulate(self, last: bool) -> AbstractContextManager:
        """DDP's gradient sync only on a step's last micro-batch."""
        return nullcontext() if last else self.wrapped.no_sync()


class FSDP(_Ranks):
    """The base's frozen weights sharded per decoder layer; the LoRA weights whole on every rank."""

    name = "fsdp"

    def wrap(self, module: LossModule, device: torch.device, trainable: list[torch.nn.Parameter]) -> torch.nn.Module:
        from torch.distributed.fsdp import fully_shard

        ignored = set(trainable)  # LoRA weights stay whole on every rank (reduce_grads sums them)
        for layer in getattr(module.lm.get_decoder(), "layers", []):
            fully_shard(layer, ignored_params=ignored)
        # the root: embeddings, final norm and output head (often one tied weight), gathered for a forward
        fully_shard(module, ignored_params=ignored)
        self.module = module
        return module

    def reduce_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the LoRA gradients over ranks in one flat all-reduce (FSDP leaves them to us)."""
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        at = 0
        for p, g in zip(params, grads, strict=True):
            n = g.numel()
            p.grad = flat[at:at + n].view_as(g).clone()
            at += n

    def reshard(self) -> None:
        """Every FSDP module back to its shards, on every rank. A forward without backward (validation)
        leaves the root gathered, and reading a state dict on rank 0 alone (a checkpoint) would reshard it
        there only: the ranks' next all-gathers would then differ."""
        from torch.distributed.fsdp import FSDPModule

        for m in self.module.modules():
            if isinstance(m, FSDPModule):
                m.reshard()


def strategy_for(requested: str, device: str) -> Strategy:
    """The strategy for this process: Single unless torchrun started several (training.distributed)."""
    dist = setup(requested, device)
    if not dist.active:
        return Single()
    return FSDP(dist) if dist.strategy == "fsdp" else DDP(dist)


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
          tokens: int | None = None, packed: bool = False) -> list[MicroBatch]:
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
