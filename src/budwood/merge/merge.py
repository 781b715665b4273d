"""`budwood merge`: adapters (folders or registry ids) on one base -> one adapter directory, or a full model.

Read top to bottom: resolve the parents -> check they share a base -> merge every layer (methods.py)
-> write a normal adapter directory (PEFT files + budwood.json with its lineage: parents, weights,
method, rank, the approximation error) -> optionally merge it into the base's weights.
"""
from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

import budwood
from budwood.artifacts import MAX_SERVED_RANK, AdapterDir, staged_dir
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
    exact: bool = False
    warnings: list[str] = field(default_factory=list)


def read_parent(source: str, path: Path) -> Parent:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    adapter = AdapterDir.open(path)
    config = adapter.config
    where = path / "adapter_config.json"
    if config.get("peft_type", "LORA") != "LORA":
        raise MergeError(f"{where}: peft_type {config.get('peft_type')!r}: only LoRA adapters merge")
    for key in ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern"):
        if config.get(key):
            raise MergeError(f"{where}: {key}={config[key]!r} is not supported by budwood merge")
    try:
        rank, alpha = int(config["r"]), float(config.get("lora_alpha", 8))  # peft's default alpha is 8
    except (KeyError, TypeError, ValueError):
        raise MergeError(f"{where}: field 'r' (an integer rank) is missing or invalid") from None
    if rank < 1:
        raise MergeError(f"{where}: r must be >= 1, got {rank}")
    scale = alpha / rank ** 0.5 if config.get("use_rslora") else alpha / rank
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    try:
        tensors = load_file(str(path / "adapter_model.safetensors"))
    except (SafetensorError, OSError, ValueError) as e:
        raise MergeError(f"{path / 'adapter_model.safetensors'}: not a readable safetensors file ({e})") from None
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        if not m:
            raise MergeError(f"{path / 'adapter_model.safetensors'}: tensor {key!r} is not a LoRA A/B weight")
        pairs.setdefault(m["module"], {})[m["ab"]] = tensor
    layers = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise MergeError(f"{path}: {module} has lora_{next(iter(ab))} without its pair")
        a, b = ab["A"], ab["B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != rank or b.shape[1] != rank:
            raise MergeError(f"{path}: {module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not fit rank "
                             f"{rank}")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise MergeError(f"{path}: {module} holds NaN or infinite weights")
        layers[module] = Factors(a, b, scale)
    return Parent(source, path.resolve(), config, adapter.fingerprint, adapter.base_model, adapter.base_fingerprint,
                  rank, layers)


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


def _model_key(name: str) -> str:
    """One spelling per model: a local or built-in model by its resolved folder, a hub id as written."""
    from budwood.models.names import resolve_model_path

    try:
        path = Path(resolve_model_path(name))
    except BudwoodError:
        return name
    return str(path.resolve()) if path.is_dir() else name


def check_same_base(parents: list[Parent]) -> tuple[str, str | None]:
    """Recorded base fingerprints must agree; a parent without one must name the same base as the rest."""
    fingerprints = {p.base_fingerprint for p in parents if p.base_fingerprint}
    if len(fingerprints) > 1:
        raise MergeError("the adapters were trained on different base models: " + "; ".join(
            f"{p.source}: {p.base_model} ({(p.base_fingerprint or 'no fingerprint')[:12]})" for p in parents))
    unfingerprinted = [p for p in parents if not p.base_fingerprint]
    if unfingerprinted and len({_model_key(p.base_model) for p in parents}) > 1:
        raise MergeError("the adapters name different base models: " + ", ".join(
            f"{p.source}: {p.base_model}" for p in parents))
    named = next((p for p in parents if p.base_fingerprint), parents[0])
    return named.base_model, next(iter(fingerprints), None)


def check_new_folder(out: Path, what: str = "output folder") -> Path:
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MergeError(f"{out} exists and is not empty; choose another {what}")
    return out


def _checked_weights(how, sources: list[str], weights: list[float] | None, rank: int | None,
                     density: float | None, seed: int) -> list[float]:
    """The merge's options checked before any parent is read; the weights, one per adapter (1 each by default)."""
    if len(sources) < 1:
        raise MergeError("give at least one adapter to merge")
    weights = list(weights) if weights is not None else [1.0] * len(sources)
    if len(weights) != len(sources):
        raise MergeError(f"{len(weights)} weight(s) for {len(sources)} adapter(s): give one weight per adapter")
    if not all(math.isfinite(w) for w in weights):
        raise MergeError(f"--weights {weights}: every weight must be a finite number")
    if how.density:
        if density is None or not 0 < density <= 1:
            raise MergeError(f"--density: {how.name} keeps that share of each delta's entries; give a number "
                             f"in (0, 1], e.g. 0.5 (got {density})")
    elif density is not None:
        raise MergeError(f"--density applies to ties, dare_linear and dare_ties, not {how.name}")
    if rank is not None and how.name == "cat":
        raise MergeError("--rank: cat keeps every parent's rank (their sum); use svd or linear to choose one")
    if rank is not None and not 1 <= rank <= MAX_SERVED_RANK:
        raise MergeError(f"--rank must be between 1 and {MAX_SERVED_RANK} (the largest rank budwood serve and vLLM "
                         f"load), got {rank}")
    if not 0 <= seed < 2**31:
        raise MergeError(f"--seed must be between 0 and 2**31 - 1, got {seed}")
    return weights


def merge_adapters(sources: list[str], out: str | Path, weights: list[float] | None = None,
                   method_name: str = "cat", rank: int | None = None, density: float | None = None,
                   seed: int = 0, registry=None, accept_license: bool = False, extra: dict | None = None
                   ) -> MergeResult:
    """Merge adapters into a new adapter directory `out` (complete or absent, whatever interrupts it).
    `extra` goes into budwood.json's merge record (compose adds its search there)."""
    how = method(method_name)
    weights = _checked_weights(how, sources, weights, rank, density, seed)
    out = check_new_folder(out)

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
        A, B, errors[module] = merge_layer(parts, weights, ranks, shape, how, new_rank, density,
                                           (seed * 1_000_003 + i) % 2**63)
        tensors[f"base_model.model.{module}.lora_A.weight"] = A.float().contiguous()
        tensors[f"base_model.model.{module}.lora_B.weight"] = B.float().contiguous()

    warnings = []
    if new_rank > MAX_SERVED_RANK:
        warnings.append(f"rank {new_rank} is above the largest rank budwood serve and vLLM load ({MAX_SERVED_RANK}): "
                        "use the merge with --into-base, or merge with --method svd --rank N")
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
    # a fresh config (nothing of a parent's such as layers_to_transform or init_lora_weights=False, which
    # would make peft build other layers than the file holds): scale 1, exactly the merged modules
    config = {"peft_type": "LORA", "task_type": parents[0].config.get("task_type") or "CAUSAL_LM",
              "base_model_name_or_path": base, "r": new_rank, "lora_alpha": new_rank, "lora_dropout": 0.0,
              "use_rslora": False, "bias": "none", "fan_in_fan_out": False, "init_lora_weights": True,
              "inference_mode": True, "target_modules": target_modules(modules, _num_layers(base)),
              "modules_to_save": None}
    from safetensors.torch import save_file

    with staged_dir(out) as tmp:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        (tmp / "budwood.json").write_text(json.dumps(provenance, indent=2) + "\n")
    return MergeResult(out, how.name, new_rank, weights, record["approximation_error"]["mean"],
                       record["approximation_error"]["max"], parents, record["exact"], warnings)


def target_modules(modules: list[str], num_layers: int | None) -> list[str]:
    """peft's target_modules for exactly these module paths: the leaf names (q_proj, ...), as peft writes
    them, when every leaf is in every layer; else the full paths, so that peft builds no layer the file
    has no weights for."""
    by_leaf: dict[str, set[str]] = {}
    for m in modules:
        parent, _, leaf = m.rpartition(".")
        by_leaf.setdefault(leaf, set()).add(re.sub(r"\.(self_attn|mlp)$", "", parent))
    sizes = {len(layers) for layers in by_leaf.values()}
    same = all(layers == next(iter(by_leaf.values())) for layers in by_leaf.values())
    if same and (num_layers is None or sizes == {num_layers}):
        return sorted(by_leaf)
    return sorted(modules)


def _num_layers(base: str) -> int | None:
    """The base's decoder layers, when its config is at hand (a built-in or local model)."""
    from budwood.models.names import resolve_model_path

    try:
        config = Path(resolve_model_path(base)) / "config.json"
        return int(json.loads(config.read_text())["num_hidden_layers"])
    except (BudwoodError, OSError, KeyError, ValueError, TypeError):
        return None


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

    from budwood.models.fingerprint import model_fingerprint
    from budwood.models.load import load_base

    adapter = AdapterDir.open(adapter_dir)
    out = check_new_folder(out, "--into-base folder")
    if adapter.base_fingerprint and model_fingerprint(adapter.base_model) != adapter.base_fingerprint:
        raise MergeError(f"{adapter.base_model}'s weights are not the ones {adapter.path} was made on (fingerprint "
                         f"{adapter.base_fingerprint[:12]}…)")
    base = load_base(adapter.base_model, dtype=dtype)
    merged = PeftModel.from_pretrained(base.model, str(adapter.path)).merge_and_unload()
    with staged_dir(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        base.tokenizer.save_pretrained(tmp)
        lineage = {"budwood_version": budwood.__version__, "merged_into_base": {
            "base_model": adapter.base_model, "base_fingerprint": adapter.base_fingerprint,
            "adapter_path": str(adapter.path.resolve()), "adapter_fingerprint": adapter.fingerprint,
            "adapter": adapter.provenance.get("merge")}}
        (tmp / "budwood.json").write_text(json.dumps(lineage, indent=2) + "\n")
    return out
