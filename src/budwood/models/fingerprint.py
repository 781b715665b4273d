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


# the files besides config and weights that change what an adapter does: its own chat template and
# tokenizer (budwood.artifacts.TEMPLATE_FILES, repeated here because models sits below artifacts)
BEHAVIOUR_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json", "tokenizer.json",
                   "tokenizer.model", "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt",
                   "merges.txt")


def adapter_fingerprint(adapter_dir: Path) -> str:
    """sha256 over adapter_config.json, the weights, and the chat template and tokenizer files it has: what
    evaluation results and cards name an adapter by. An adapter without template or tokenizer files keeps
    the fingerprint it always had (config and weights bytes only); each such file adds its name and hash."""
    adapter_dir = Path(adapter_dir)
    digest = hashlib.sha256()
    if (adapter_dir / "adapter_config.json").exists():
        digest.update(_config_bytes(adapter_dir))
    if (adapter_dir / "adapter_model.safetensors").exists():
        with open(adapter_dir / "adapter_model.safetensors", "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    for name in BEHAVIOUR_FILES:
        if os.path.lexists(adapter_dir / name):
            # a symlink counts by its target's name, never its target's bytes (AdapterDir refuses it anyway)
            content = os.readlink(adapter_dir / name).encode() if os.path.islink(adapter_dir / name) else \
                hashlib.sha256((adapter_dir / name).read_bytes()).hexdigest().encode()
            digest.update(b"\0" + name.encode() + b"\0" + content)
    return digest.hexdigest()


def _config_bytes(adapter_dir: Path) -> bytes:
    """adapter_config.json as trained: an export that rewrote base_model_name_or_path (budwood export --base-id)
    keeps the fingerprint its results and calibration name. Training writes sorted keys, indent 2, and
    budwood.json's base name, so an unexported adapter hashes its file's bytes exactly as before."""
    raw = (adapter_dir / "adapter_config.json").read_bytes()
    try:
        trained = json.loads((adapter_dir / "budwood.json").read_text())["base_model"]["name"]
        cfg = json.loads(raw)
    except (OSError, ValueError, KeyError, TypeError):
        return raw
    if not isinstance(cfg, dict) or cfg.get("base_model_name_or_path") in (None, trained):
        return raw
    return (json.dumps({**cfg, "base_model_name_or_path": trained}, indent=2, sort_keys=True) + "\n").encode()
