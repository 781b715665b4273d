"""Adapters by name: resolvers map a name to a directory, the cache keeps the loaded ones (LRU).

Clients never name paths: a name goes through a resolver (a folder of adapter directories today;
the registry adds `org/name@version` ids through the same interface). Loading reads only
`adapter_config.json` and `adapter_model.safetensors` and checks every tensor against the base, so a
bad upload is refused with a message and never reaches the model.
"""
from __future__ import annotations

import hashlib
import json
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import torch

from budwood.errors import BudwoodError, ErrorKind, NotFoundError, did_you_mean

ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@/-]{0,127}$")
# peft's key layout: base_model.model.<module path>.lora_A.weight
_KEY = re.compile(r"^base_model\.model\.(?:model\.)?layers\.(\d+)\.(self_attn|mlp)\.(\w+)"
                  r"\.lora_([AB])(?:\.default)?\.weight$")
TARGETS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


class AdapterError(BudwoodError):
    """An adapter that cannot be served: unknown name, bad config, wrong base, unsafe weights."""


class UnknownAdapter(AdapterError, NotFoundError):
    """No resolver knows the name: NOT_FOUND, where other AdapterErrors are INVALID."""

    kind = ErrorKind.NOT_FOUND


class AdapterResolver(Protocol):
    """Maps an adapter name to its directory. `names()` lists what can be served now."""

    def resolve(self, name: str) -> Path | None: ...

    def names(self) -> list[str]: ...


class FolderResolver:
    """Every subdirectory of `root` holding an adapter_config.json; new ones are seen at once."""

    def __init__(self, root: str | Path):
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise AdapterError(f"{root}: adapters folder does not exist")

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and (p / "adapter_config.json").exists() and ADAPTER_NAME.match(p.name))

    def resolve(self, name: str) -> Path | None:
        if not ADAPTER_NAME.match(name) or "/" in name or name in (".", ".."):
            return None
        path = self.root / name
        return path if (path / "adapter_config.json").exists() else None


class StaticResolver:
    """Names registered at run time (`POST /v1/load_lora_adapter`), each pointing at a directory."""

    def __init__(self):
        self.paths: dict[str, Path] = {}

    def names(self) -> list[str]:
        return sorted(self.paths)

    def resolve(self, name: str) -> Path | None:
        return self.paths.get(name)


@dataclass
class LoraModule:
    """One target linear of one layer: delta(x) = (x @ A.T) @ B.T * scale, in fp32 as peft computes it."""
    A: torch.Tensor  # [r, in]
    B: torch.Tensor  # [out, r]
    scale: float


@dataclass
class LoadedAdapter:
    name: str
    path: Path
    key: str  # content hash: a changed adapter under the same name never reuses cached KV
    rank: int
    modules: dict[tuple[int, str], LoraModule] = field(repr=False)
    chat_template: str | None = None
    base_fingerprint: str | None = None
    stamp: tuple = ()  # (mtime_ns, size) of the weights and config when loaded
    packed: dict = field(default_factory=dict, repr=False)  # the runner's padded, stacked form


def load_adapter(name: str, path: Path, shapes: dict[str, tuple[int, int]], num_layers: int,
                 device: torch.device, base_fingerprint: str | None = None) -> LoadedAdapter:
    """Read and check an adapter directory against the base's target shapes {module: (out, in)}."""
    cfg_path, weights = path / "adapter_config.json", path / "adapter_model.safetensors"
    if not weights.exists():
        found = sorted(p.name for p in path.glob("adapter_model.*"))
        raise AdapterError(f"adapter {name!r}: {path} has no adapter_model.safetensors"
                           + (f" (found {', '.join(found)}; only safetensors weights are loaded)" if found else ""))
    stamp = file_stamp(path)  # before reading: an edit while loading makes the next use reload
    r, scale = _read_lora_config(name, cfg_path)
    _check_base(name, path, base_fingerprint)
    modules = _read_lora_weights(name, weights, r, scale, shapes, num_layers, device)
    digest = hashlib.sha256(weights.read_bytes() + cfg_path.read_bytes()).hexdigest()[:16]
    return LoadedAdapter(name, path, f"{name}:{digest}", r, modules, _chat_template(name, path), base_fingerprint,
                         stamp)


def _read_lora_config(name: str, cfg_path: Path) -> tuple[int, float]:
    """(rank, scale) from adapter_config.json (read and checked as every stage reads it: no symlink, size and
    depth limits, finite rank and alpha), refusing the peft options the engine does not compute."""
    from budwood.artifacts import read_adapter_config
    from budwood.errors import BudwoodError

    try:
        cfg = read_adapter_config(cfg_path, links_allowed=True)  # the operator's folder: see read_adapter_config
    except OSError as e:
        raise AdapterError(f"adapter {name!r}: {cfg_path}: cannot be read ({e.__class__.__name__})") from None
    except BudwoodError as e:
        raise AdapterError(f"adapter {name!r}: {e}") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"adapter {name!r}: {cfg_path}: peft_type must be LORA")
    for key, ok in (("use_dora", False), ("fan_in_fan_out", False), ("modules_to_save", None),
                    ("rank_pattern", {}), ("alpha_pattern", {})):
        if cfg.get(key, ok) not in (ok, None, {}, [], False):
            raise AdapterError(f"adapter {name!r}: {cfg_path}: {key}={cfg[key]!r} is not supported by the engine")
    try:
        r, alpha = int(cfg["r"]), float(cfg.get("lora_alpha", cfg["r"]))
    except (KeyError, TypeError, ValueError):
        raise AdapterError(f"adapter {name!r}: {cfg_path}: field 'r' (an integer rank) is missing or invalid") from None
    if r < 1:
        raise AdapterError(f"adapter {name!r}: {cfg_path}: r must be >= 1, got {r}")
    return r, alpha / (r ** 0.5) if cfg.get("use_rslora") else alpha / r


def _read_lora_weights(name: str, weights: Path, r: int, scale: float, shapes: dict[str, tuple[int, int]],
                       num_layers: int, device: torch.device) -> dict[tuple[int, str], LoraModule]:
    """Every A/B pair in the safetensors file, each checked for its target, shape and finiteness."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"adapter {name!r}: {weights}: not a readable safetensors file ({e})") from None
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if not m:
            raise AdapterError(f"adapter {name!r}: {weights}: tensor {key!r} is not a LoRA A/B weight of a "
                               f"decoder layer's projection; the engine serves those only")
        layer, module = int(m[1]), m[3]
        if module not in TARGETS or layer >= num_layers:
            raise AdapterError(f"adapter {name!r}: tensor {key!r} targets {module} of layer {layer}, which the "
                               f"base does not have (wrong base model?)")
        parts.setdefault((layer, module), {})[m[4]] = t
    modules = {}
    for (layer, module), ab in sorted(parts.items()):
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"adapter {name!r}: layer {layer} {module} has lora_{next(iter(ab))} without its pair")
        out_f, in_f = shapes[module]
        a, b = ab["A"], ab["B"]
        if tuple(a.shape) != (r, in_f) or tuple(b.shape) != (out_f, r):
            raise AdapterError(f"adapter {name!r}: layer {layer} {module}: shapes A{tuple(a.shape)} B{tuple(b.shape)} "
                               f"do not fit the base (expected A({r}, {in_f}) B({out_f}, {r})): trained on another "
                               "base?")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise AdapterError(f"adapter {name!r}: layer {layer} {module} holds NaN or infinite weights")
        modules[(layer, module)] = LoraModule(a.float().to(device), b.float().to(device), scale)
    if not modules:
        raise AdapterError(f"adapter {name!r}: {weights} holds no LoRA weights")
    return modules


def _chat_template(name: str, path: Path) -> str | None:
    """The adapter's own chat template: chat_template.jinja, else tokenizer_config.json's, else None."""
    if (path / "chat_template.jinja").exists():
        return (path / "chat_template.jinja").read_text()
    if (path / "tokenizer_config.json").exists():
        try:
            return json.loads((path / "tokenizer_config.json").read_text()).get("chat_template")
        except json.JSONDecodeError:
            raise AdapterError(f"adapter {name!r}: {path / 'tokenizer_config.json'}: not valid JSON") from None
    return None


def file_stamp(path: Path) -> tuple:
    """Changes when any file a loaded adapter was read from is replaced or edited in place (weights,
    config, chat_template.jinja, tokenizer_config.json), or a template appears or goes: the adapter
    cache then reloads it on its next use. By stat alone, as this runs on every use: the change time
    (st_ctime) moves on any write or utime, so a template copied over another with its time kept (cp -p)
    is still seen, without reading the file."""
    def stamp(name: str) -> tuple | None:
        try:
            s = (path / name).stat()
        except OSError:
            return None
        return s.st_mtime_ns, s.st_ctime_ns, s.st_size

    required = (stamp("adapter_model.safetensors"), stamp("adapter_config.json"))
    if None in required:
        return ()
    return required + (stamp("chat_template.jinja"), stamp("tokenizer_config.json"))


def _check_base(name: str, path: Path, base_fingerprint: str | None) -> None:
    """budwood adapters record their base's fingerprint; a different base is refused, not guessed at."""
    prov = path / "budwood.json"
    if base_fingerprint is None or not prov.exists():
        return
    try:
        recorded = json.loads(prov.read_text()).get("base_model", {}).get("fingerprint")
    except (json.JSONDecodeError, AttributeError):
        raise AdapterError(f"adapter {name!r}: {prov}: not valid JSON") from None
    if recorded and recorded != base_fingerprint:
        raise AdapterError(f"adapter {name!r} was trained on another base model (fingerprint {recorded[:12]}…, "
                           f"serving {base_fingerprint[:12]}…)")


class AdapterCache:
    """Loaded adapters, least recently used evicted beyond `max_loaded`; safe across threads.

    An evicted adapter stays alive for the requests still holding it; only the cache forgets it.
    """

    def __init__(self, resolvers: list[AdapterResolver], loader, max_loaded: int = 8):
        if max_loaded < 1:
            raise ValueError("max_loaded must be >= 1")
        self.resolvers = resolvers
        self.loader = loader  # (name, path) -> LoadedAdapter
        self.max_loaded = max_loaded
        self.loaded: OrderedDict[str, LoadedAdapter] = OrderedDict()
        self.lock = threading.Lock()

    def names(self) -> list[str]:
        seen: dict[str, None] = {}
        for r in self.resolvers:
            seen.update(dict.fromkeys(r.names()))
        return list(seen)

    def resolve(self, name: str) -> Path:
        for r in self.resolvers:
            path = r.resolve(name)
            if path is not None:
                return path
        raise UnknownAdapter(f"The model `{name}` does not exist.{did_you_mean(name, self.names())}")

    def get(self, name: str) -> LoadedAdapter:
        """The adapter as its directory is now: a removed directory is unknown, a changed one reloads."""
        path = self.resolve(name)
        with self.lock:
            hit = self.loaded.get(name)
            if hit is not None and hit.path == path and hit.stamp == file_stamp(path):
                self.loaded.move_to_end(name)
                return hit
            self.loaded.pop(name, None)
        adapter = self.loader(name, path)
        with self.lock:
            self.loaded[name] = adapter
            self.loaded.move_to_end(name)
            while len(self.loaded) > self.max_loaded:
                self.loaded.popitem(last=False)
        return adapter

    def forget(self, name: str) -> None:
        with self.lock:
            self.loaded.pop(name, None)
