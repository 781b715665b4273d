"""The adapter directory, the one artefact that crosses stages: what it holds and what is published.

Signing, publishing and exporting all work on the same file set, defined here once: the PEFT pair
(adapter_config.json, adapter_model.safetensors), the provenance (budwood.json), the card
(README.md), evaluation results (eval/*.json), the training log and loss plot, and the calibrated
abstention threshold (calibration.json) that serving applies. Checkpoints and
anything else in the folder stay local.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from budwood.errors import BudwoodError

ATTESTATION = "attestation.json"
REQUIRED = ("adapter_config.json", "adapter_model.safetensors")
OPTIONAL = ("budwood.json", "README.md", "metrics.jsonl", "loss.png", "calibration.json")
# the only paths a published version may hold: a manifest naming anything else is refused
ARTIFACT_PATH = re.compile(r"^(adapter_config\.json|adapter_model\.safetensors|budwood\.json|README\.md|"
                           r"metrics\.jsonl|loss\.png|calibration\.json|"
                           r"attestation\.json|eval/[A-Za-z0-9][A-Za-z0-9_.-]{0,99}\.json)$")
# vLLM's LoRAConfig accepts max_lora_rank only from this list; an adapter needs one at least its rank
VLLM_MAX_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
MAX_SERVED_RANK = VLLM_MAX_RANKS[-1]  # also budwood's engine's largest max_lora_rank
VLLM_TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "gate_proj", "up_proj", "down_proj",
                "gate_up_proj", "c_attn", "c_proj", "c_fc", "query_key_value", "dense", "dense_h_to_4h",
                "dense_4h_to_h", "w1", "w2", "w3", "wq", "wk", "wv", "wo"}


@dataclass
class AdapterDir:
    path: Path

    @classmethod
    def open(cls, path: str | Path) -> AdapterDir:
        path = Path(path).expanduser()
        if not path.is_dir():
            raise BudwoodError(f"{path}: no such adapter directory")
        missing = [f for f in REQUIRED if not (path / f).is_file()]
        if missing:
            raise BudwoodError(f"{path}: not an adapter directory (missing {', '.join(missing)})")
        return cls(path)

    def files(self) -> list[str]:
        """Relative paths of the artefact's files, sorted (POSIX separators)."""
        names = [*REQUIRED, *(f for f in OPTIONAL if (self.path / f).is_file())]
        names += [f"eval/{p.name}" for p in (self.path / "eval").glob("*.json") if p.is_file()]
        return sorted(n for n in names if ARTIFACT_PATH.match(n))

    def _json(self, name: str) -> dict:
        try:
            data = json.loads((self.path / name).read_text())
        except json.JSONDecodeError as e:
            raise BudwoodError(f"{self.path / name}: not valid JSON (line {e.lineno}: {e.msg})") from None
        if not isinstance(data, dict):
            raise BudwoodError(f"{self.path / name}: expected a JSON object")
        return data

    @property
    def config(self) -> dict:
        return self._json("adapter_config.json")

    @property
    def provenance(self) -> dict:
        """budwood.json, or {} for an adapter made elsewhere (plain peft)."""
        return self._json("budwood.json") if (self.path / "budwood.json").is_file() else {}

    @property
    def base_model(self) -> str:
        name = self.provenance.get("base_model", {}).get("name") or self.config.get("base_model_name_or_path")
        if not name:
            raise BudwoodError(f"{self.path}: names no base model (budwood.json base_model.name or "
                               "adapter_config.json base_model_name_or_path)")
        return name

    @property
    def base_fingerprint(self) -> str | None:
        return self.provenance.get("base_model", {}).get("fingerprint")

    @property
    def fingerprint(self) -> str:
        from budwood.models.fingerprint import adapter_fingerprint

        return adapter_fingerprint(self.path)

    def vllm_warnings(self) -> list[str]:
        """Why vLLM (`--enable-lora`) would refuse this adapter or need settings; empty if it loads as is."""
        cfg, warnings = self.config, []
        rank = max([cfg.get("r", 0), *(cfg.get("rank_pattern") or {}).values()])
        if rank > VLLM_MAX_RANKS[-1]:
            warnings.append(f"rank {rank} is above vLLM's largest max_lora_rank ({VLLM_MAX_RANKS[-1]})")
        elif rank > 16:
            need = next(r for r in VLLM_MAX_RANKS if r >= rank)
            warnings.append(f"rank {rank}: start vLLM with --max-lora-rank {need} (its default is 16)")
        if cfg.get("use_dora"):
            warnings.append("DoRA adapters (use_dora) are not supported by vLLM")
        if cfg.get("lora_bias") or cfg.get("bias", "none") != "none":
            warnings.append("LoRA bias terms are not supported by vLLM")
        if cfg.get("modules_to_save"):
            warnings.append(f"modules_to_save {cfg['modules_to_save']} is not supported by vLLM")
        targets = cfg.get("target_modules") or []
        if isinstance(targets, str):
            warnings.append(f"target_modules is a pattern ({targets!r}); vLLM matches module names, check it loads")
        else:
            odd = sorted({t.rsplit(".", 1)[-1] for t in targets} - VLLM_TARGETS)  # full paths too
            if odd:
                warnings.append(f"target modules {odd} are not linear projections vLLM applies LoRA to")
        return warnings


@contextmanager
def staged_dir(dest: Path) -> Iterator[Path]:
    """Fill a temporary sibling of `dest`, then rename it into place: `dest` appears complete or not at
    all, whatever kills the process midway. `dest` must not exist or be empty."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.partial-"))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
        if dest.exists():
            dest.rmdir()
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
