"""Content fingerprints of a base model: sha256 over config.json and the safetensors weights.

A fingerprint names exactly which base an adapter was grown on, whatever the model was called.
Hashing a multi-GB model takes a while, so results are cached by (path, size, mtime).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from budwood.errors import ModelError
from budwood.models.names import resolve_model_path

CACHE = Path(os.environ.get("BUDWOOD_CACHE", Path.home() / ".cache" / "budwood")) / "fingerprints.json"


WEIGHT_PATTERNS = ["config.json", "model.safetensors", "model.safetensors.index.json", "model-*-of-*.safetensors"]


def _model_dir(name: str) -> Path:
    path = Path(resolve_model_path(name))
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(name, allow_patterns=WEIGHT_PATTERNS))


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files transformers loads: the shards an index names, or model.safetensors."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        return [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    if (folder / "model.safetensors").exists():
        return [folder / "model.safetensors"]
    raise ModelError(f"{folder}: no model.safetensors (or index) to fingerprint")


def model_fingerprint(name: str) -> str:
    folder = _model_dir(name)
    files = [folder / "config.json"] + weight_files(folder)
    key = json.dumps([[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files])
    cache = json.loads(CACHE.read_text()) if CACHE.exists() else {}
    if key in cache:
        return cache[key]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    digest = "sha256:" + h.hexdigest()
    cache[key] = digest
    try:
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        tmp = CACHE.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, CACHE)
    except OSError:
        pass  # a read-only home still gets the right fingerprint, just uncached
    return digest


def adapter_fingerprint(adapter_dir: Path) -> str:
    """sha256 over adapter_config.json and the weights: what evaluation results and cards name an adapter by."""
    digest = hashlib.sha256()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        if (adapter_dir / name).exists():
            digest.update((adapter_dir / name).read_bytes())
    return digest.hexdigest()
