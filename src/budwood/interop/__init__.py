"""Configs from the tools practitioners already use (Axolotl, LLaMA-Factory), read as budwood's own.

`load_train_config` is what `budwood train` calls: a budwood config loads as before; an Axolotl or
LLaMA-Factory file is recognised by its keys, converted (interop/axolotl.py, interop/llamafactory.py) and
validated as a TrainConfig, with --set overrides in budwood's names applied afterwards. `to_yaml` writes the
converted config with the notes as comments (`budwood config convert`).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from budwood.config import TrainConfig, apply_overrides, load_settings, read_yaml_mapping
from budwood.interop import axolotl, llamafactory
from budwood.interop.keys import Converted, Dialect

__all__ = ["Converted", "Dialect", "detect", "convert", "load_train_config", "to_yaml"]

READERS = {Dialect.AXOLOTL: axolotl, Dialect.LLAMA_FACTORY: llamafactory}


def detect(raw: dict[str, Any]) -> Dialect | None:
    """The foreign dialect of a config mapping, or None for budwood's own (which has a `data:` section)."""
    if "data" in raw and isinstance(raw["data"], dict):
        return None
    for dialect, reader in READERS.items():
        if reader.looks_like(raw):
            return dialect
    return None


def convert(path: str | Path, dialect: Dialect | None = None) -> Converted:
    """A foreign config file in budwood's form; ConfigError naming every key budwood cannot honour."""
    raw = read_yaml_mapping(path)
    dialect = dialect or detect(raw)
    if dialect is None:
        return Converted(None, str(path), raw)  # type: ignore[arg-type]  (already budwood's own)
    return READERS[dialect].convert(raw, str(path))


def load_train_config(path: str | Path | None, overrides: list[str] | None = None
                      ) -> tuple[TrainConfig, Converted | None]:
    """A TrainConfig from budwood's own YAML or an Axolotl/LLaMA-Factory one (with how it was read); --set
    overrides use budwood's names and apply after the conversion."""
    if path is None:
        return load_settings(TrainConfig, None, overrides), None
    converted = convert(path)
    if converted.dialect is None:
        return load_settings(TrainConfig, path, overrides), None
    config = load_settings(TrainConfig, None, overrides, base=converted.native,
                           source=f"{path} (read as {converted.dialect.value} config)")
    return config, converted


def to_yaml(converted: Converted, overrides: list[str] | None = None) -> str:
    """budwood's own YAML for a converted config, headed by how each key was read; validated first, so what is
    written always loads."""
    native = apply_overrides(dict(converted.native), overrides or [])
    load_settings(TrainConfig, None, base=native, source=f"{converted.source} (converted)")
    head = [f"# budwood config converted from {converted.dialect.value} config {converted.source}",
            "# run: budwood train THIS_FILE   (override: --set training.max_steps=20)"]
    head += [f"# {line}" for note in converted.notes for line in _wrap(note)]
    return "\n".join(head) + "\n" + yaml.safe_dump(native, sort_keys=False, allow_unicode=True)


def _wrap(text: str, width: int = 116) -> list[str]:
    import textwrap

    return textwrap.wrap(text, width, subsequent_indent="  ") or [""]
