"""What a run writes into output_dir besides checkpoints and metrics: the lock that keeps one run per
folder, the adapter's portable config, and the provenance (budwood.json) with versions and hardware."""
from __future__ import annotations

import json
import os
import platform
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

import budwood
from budwood.errors import TrainingError


@contextmanager
def locked_output_dir(out: Path) -> Iterator[None]:
    """One training process per output_dir (a second one would interleave checkpoints), and never
    into a folder of someone else's files."""
    import fcntl

    if out.exists() and not out.is_dir():
        raise TrainingError(f"output_dir {out} is a file, expected a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "checkpoints").exists() and not (out / ".lock").exists():
        raise TrainingError(f"output_dir {out} is not empty and was not made by budwood; choose an empty folder")
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / ".lock", "w")
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TrainingError(f"{out} is in use by another training process") from None
        yield


def portable_config(adapter_config: Path, base_model: str) -> None:
    """peft records the local path it loaded from: record the name others can load instead. peft also
    writes "all-linear" as a list in set order, which changes with Python's hash seed: sort it, so the
    same training gives the same file (and adapter fingerprint) in every process."""
    cfg = json.loads(adapter_config.read_text())
    cfg["base_model_name_or_path"] = base_model
    if isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = sorted(cfg["target_modules"])
    adapter_config.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def write_provenance(out: Path, provenance: dict) -> None:
    """budwood.json, replaced whole: a reader never sees half of it."""
    tmp = out / "budwood.json.tmp"
    tmp.write_text(json.dumps(provenance, indent=2) + "\n")
    os.replace(tmp, out / "budwood.json")


def hardware() -> dict:
    info = {"platform": platform.platform(), "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def versions() -> dict:
    import peft
    import safetensors
    import tokenizers
    import transformers

    return {"budwood": budwood.__version__, "python": sys.version.split()[0], "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "tokenizers": tokenizers.__version__, "safetensors": safetensors.__version__}
