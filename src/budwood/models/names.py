"""Model names users type, without importing torch: the built-in tiny model, folders and hub ids."""
from __future__ import annotations

import re
from pathlib import Path

from budwood.errors import ModelError

TINY_NAME = "budwood-tiny"
TINY_DIR = Path(__file__).parent / "tiny"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}(/[\w.-]{1,96})?$")


def resolve_model_path(name: str) -> str:
    """Map a user's model name to what `from_pretrained` takes; reject names that are neither."""
    if name == TINY_NAME:
        return str(TINY_DIR)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise ModelError(f"{path}: not a Hugging Face model directory (no config.json)")
        return str(path)
    if name.startswith((".", "/", "~")) or not _HUB_ID.match(name) or ".." in name:
        raise ModelError(f"{name!r}: no such model directory, and not a hub id like 'org/model' "
                         f"(or use the built-in '{TINY_NAME}')")
    return name
