"""Checkpoints that survive SIGKILL: written to a temporary folder, then renamed into place.

A checkpoint holds everything that makes resume exact: the adapter, the optimizer and scheduler
states, every rank's RNG state, and the data cursor (state.py's RunState). Tensors go to
safetensors (no pickle); the rest to JSON.
Only folders named step-NNNNNNNN are checkpoints; a half-written `.tmp-*` folder is never read.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from budwood.errors import TrainingError


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def optimizer_to_files(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_files(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(root: Path, step: int, peft_model, opt, scheduler, rng: dict, trainer_state: dict,
                    keep: int, reference: torch.Tensor | None = None) -> Path:
    """`reference`: DPO's reference log-probabilities ([pairs, 2]), kept so a resume need not recompute them."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    if (final / "trainer_state.json").exists():  # the same step's state is the same: never rewrite a good one
        return final
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    peft_model.save_pretrained(tmp)
    tensors, meta = optimizer_to_files(opt)
    save_file(tensors, tmp / "optimizer.safetensors")
    save_file({k: v.contiguous() for k, v in rng.items()}, tmp / "rng.safetensors")
    if reference is not None:
        save_file({"logps": reference.contiguous()}, tmp / "reference.safetensors")
    state = dict(trainer_state, optimizer=meta, scheduler=scheduler.state_dict())
    (tmp / "trainer_state.json").write_text(json.dumps(state))
    for f in tmp.iterdir():
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    shutil.rmtree(final, ignore_errors=True)  # a folder without trainer_state.json is not a checkpoint
    os.replace(tmp, final)
    _fsync_dir(root)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(root: Path) -> list[Path]:
    if not root.exists():
        return []
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    return sorted(p for p in root.glob("step-*") if p.is_dir() and (p / "trainer_state.json").exists())


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's RNG state: what makes dropout after a resume draw what it would have drawn."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def all_ranks_rng(states: list[dict]) -> dict:
    """Every rank's RNG state in one checkpoint: rank 0's under its own keys, rank r's as `key.r`."""
    return {**states[0], **{f"{k}.{r}": v for r, s in enumerate(states[1:], start=1) for k, v in s.items()}}


def rank_rng(states: dict, rank: int) -> dict:
    """This rank's RNG state from a checkpoint; a rank the checkpoint has none for (it was written by
    fewer processes) keeps its seeded stream."""
    if rank == 0:
        return {k: v for k, v in states.items() if "." not in k}
    mine = {k.rsplit(".", 1)[0]: v for k, v in states.items() if k.endswith(f".{rank}")}
    return mine or rng_state(torch.device("cpu"))


def load_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict, dict]:
    """(adapter weights, optimizer tensors, rng tensors, trainer state)."""
    try:
        return (load_file(path / "adapter_model.safetensors"), load_file(path / "optimizer.safetensors"),
                load_file(path / "rng.safetensors"), json.loads((path / "trainer_state.json").read_text()))
    except (OSError, ValueError) as e:
        raise TrainingError(f"{path}: unreadable checkpoint: {e}") from None


def load_reference(path: Path) -> torch.Tensor | None:
    """DPO's reference log-probabilities saved with a checkpoint, if it has them."""
    file = path / "reference.safetensors"
    if not file.exists():
        return None
    try:
        return load_file(file)["logps"]
    except (OSError, ValueError, KeyError) as e:
        raise TrainingError(f"{file}: unreadable reference log-probabilities: {e}") from None
