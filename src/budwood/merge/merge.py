"""`budwood merge`: adapters (folders or registry ids) on one base -> one adapter directory, or a full model.

Read top to bottom: resolve the parents -> check they share a base -> merge every layer (methods.py)
-> write a normal adapter directory (PEFT files + budwood.json with its lineage: parents, weights,
method, rank, the approximation error) -> optionally merge it into the base's weights.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import budwood
from budwood.artifacts import AdapterDir, staged_dir
from budwood.errors import BudwoodError
from budwood.merge.methods import Factors, merge_layer, method

# peft's key for one LoRA factor: base_model.model.<module path>.lora_A.weight
_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")


class MergeError(BudwoodError):
    pass


@dataclass
class Parent:
    source: str  # what the user named: a folder or a registry id
    path: Path
    config: dict
    fingerprint: str
    base_model: str
    base_fingerprint: str | None
    rank: int
    layers: dict[str, Factors] = field(repr=False)


@dataclass
class MergeResult:
    path: Path
    method: str
    rank: int
    weights: list[float]
    mean_error: float
    max_error: float
    parents: list[Parent]


def read_parent(source: str, path: Path) -> Parent:
    from safetensors.torch import load_file

    adapter = AdapterDir.open(path)
    config = adapter.config
    where = path / "adapter_config.json"
    if config.get("peft_type", "LORA") != "LORA":
        raise MergeError(f"{where}: peft_type {config.get('peft_type')!r}: only LoRA adapters merge")
    for key in ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise MergeError(f"{where}: {key}={config[key]!r} is not supported by budwood merge")
    rank, alpha = int(config["r"]), float(config.get("lora_alpha", config["r"]))
    scale = alpha / rank ** 0.5 if config.get("use_rslora") else alpha / rank
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(path / "adapter_model.safetensors")).items():
        m = _KEY.match(key)
        if not m:
            raise MergeError(f"{path / 'adapter_model.safetensors'}: tensor {key!r} is not a LoRA A/B weight")
        pairs.setdefault(m["module"], {})[m["ab"]] = tensor
    layers = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise MergeError(f"{path}: {module} has lora_{next(iter(ab))} without its pair")
        layers[module] = Factors(ab["A"], ab["B"], scale)
    return Parent(source, path, config, adapter.fingerprint, adapter.base_model, adapter.base_fingerprint, rank,
                  layers)


def resolve(source: str, registry=None, accept_license: bool = False) -> Path:
    """A folder, or a registry id (ORG/NAME[@VERSION]) pulled from `registry` (default: the local one)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    from budwood.registry import open_registry
    from budwood.registry.names import RegistryError, parse_ref

    try:
        parse_ref(source)
    except RegistryError:
        raise MergeError(f"{source}: neither an adapter folder nor a registry id ORG/NAME[@VERSION]") from None
    reg = registry if registry is not None else open_registry()
    return reg.pull(source, accept_license=accept_license)[1]


def check_same_base(parents: list[Parent]) -> tuple[str, str | None]:
    fingerprints = {p.base_fingerprint for p in parents if p.base_fingerprint}
    if len(fingerprints) > 1:
        raise MergeError("the adapters were trained on different base models: " + "; ".join(
            f"{p.source}: {p.base_model} ({(p.base_fingerprint or 'no fingerprint')[:12]})" for p in parents))
    if not fingerprints and len({p.base_model for p in parents}) > 1:
        raise MergeError("the adapters name different base models: " + ", ".join(
            f"{p.source}: {p.base_model}" for p in parents))
    return parents[0].base_model, next(iter(fingerprints), None)


def merge_adapters(sources: list[str], out: str | Path, weights: list[float] | None = None,
                   method_name: str = "cat", rank: int | None = None, density: float | None = None,
                   seed: int = 0, registry=None, accept_license: bool = False, extra: dict | None = None
                   ) -> MergeResult:
    """Merge adapters into a new adapter directory `out` (complete or absent, whatever interrupts it).
    `extra` goes into budwood.json's merge record (compose adds its search there)."""
    how = method(method_name)
    if len(sources) < 1:
        raise MergeError("give at least one adapter to merge")
    weights = list(weights) if weights is not None else [1.0] * len(sources)
    if len(weights) != len(sources):
        raise MergeError(f"{len(weights)} weight(s) for {len(sources)} adapter(s): give one weight per adapter")
    if how.density:
        if density is None or not 0 < density <= 1:
            raise MergeError(f"--density: {how.name} keeps that share of each delta's entries; give a number "
                             f"in (0, 1], e.g. 0.5 (got {density})")
    elif density is not None:
        raise MergeError(f"--density applies to ties, dare_linear and dare_ties, not {how.name}")
    if rank is not None and how.name == "cat":
        raise MergeError("--rank: cat keeps every parent's rank (their sum); use svd or linear to choose one")
    if rank is not None and rank < 1:
        raise MergeError(f"--rank must be at least 1, got {rank}")
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MergeError(f"{out} exists and is not empty; choose another output folder")

    parents = [read_parent(s, resolve(s, registry, accept_license)) for s in sources]
    base, base_fingerprint = check_same_base(parents)
    ranks = [p.rank for p in parents]
    new_rank = rank or (sum(ranks) if how.default_rank == "sum" else max(ranks))

    tensors, errors = {}, {}
    modules = sorted({m for p in parents for m in p.layers})
    for i, module in enumerate(modules):
        parts = [p.layers.get(module) for p in parents]
        present = next(p for p in parts if p is not None)
        shape = (present.B.shape[0], present.A.shape[1])
        for p, part in zip(parents, parts, strict=True):
            if part is not None and (part.B.shape[0], part.A.shape[1]) != shape:
                raise MergeError(f"{p.source}: {module} is {tuple(part.B.shape[:1]) + tuple(part.A.shape[1:])}, "
                                 f"another adapter's is {shape}: not the same base architecture")
        A, B, errors[module] = merge_layer(parts, weights, ranks, shape, how, new_rank, density, seed * 1_000_003 + i)
        tensors[f"base_model.model.{module}.lora_A.weight"] = A.float().contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = B.float().contiguous()

    targets = sorted({m.rsplit(".", 1)[-1] for m in modules})
    record = {
        "method": how.name, "weights": weights, "rank": new_rank, "density": density, "seed": seed,
        "exact": how.exact and rank in (None, sum(ranks)),
        "approximation_error": {"mean": sum(errors.values()) / len(errors), "max": max(errors.values()),
                                "note": "relative Frobenius error of each layer's merged delta against the "
                                        "combination the method computed (0: exact)"},
        "parents": [{"source": p.source, "adapter_fingerprint": p.fingerprint, "weight": w, "rank": p.rank,
                     "base_model": p.base_model, "base_fingerprint": p.base_fingerprint,
                     **_parent_ref(p.path)} for p, w in zip(parents, weights, strict=True)],
        **(extra or {})}
    provenance = {"budwood_version": budwood.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  "base_model": {"name": base, "fingerprint": base_fingerprint}, "merge": record,
                  "versions": _versions()}
    config = dict(parents[0].config, r=new_rank, lora_alpha=new_rank, use_rslora=False, target_modules=targets,
                  rank_pattern={}, alpha_pattern={}, lora_dropout=0.0, base_model_name_or_path=base)
    config.pop("revision", None)
    from safetensors.torch import save_file

    with staged_dir(out) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "budwood.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return MergeResult(out, how.name, new_rank, weights, record["approximation_error"]["mean"],
                       record["approximation_error"]["max"], parents)


def _parent_ref(path: Path) -> dict:
    """Where a parent came from: a registry pull records its id and version."""
    from budwood.registry.local import PULL_MARKER

    try:
        marker = json.loads((path / PULL_MARKER).read_text())
        return {"registry_id": f"{marker['id']}@{marker['version']}"}
    except (OSError, ValueError, KeyError):
        return {"path": str(path)}


def _versions() -> dict:
    from importlib.metadata import version

    return {"budwood": budwood.__version__, "torch": torch.__version__, "peft": version("peft"),
            "safetensors": version("safetensors")}


def merge_into_base(adapter_dir: str | Path, out: str | Path, dtype: torch.dtype = torch.float32) -> Path:
    """The base with the adapter's delta added into its weights, saved in Hugging Face format
    (safetensors, config, tokenizer): a plain model that needs neither peft nor the adapter."""
    from peft import PeftModel

    from budwood.models.load import load_base

    adapter = AdapterDir.open(adapter_dir)
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MergeError(f"{out} exists and is not empty; choose another output folder")
    base = load_base(adapter.base_model, dtype=dtype)
    merged = PeftModel.from_pretrained(base.model, str(adapter.path)).merge_and_unload()
    with staged_dir(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        base.tokenizer.save_pretrained(tmp)
        lineage = {"budwood_version": budwood.__version__, "merged_into_base": {
            "base_model": adapter.base_model, "base_fingerprint": adapter.base_fingerprint,
            "adapter_fingerprint": adapter.fingerprint, "adapter": adapter.provenance.get("merge")}}
        (tmp / "budwood.json").write_text(json.dumps(lineage, indent=2) + "\n")
    return out
