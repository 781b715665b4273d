"""BUDWOOD_HOME: where the default registry database, pulled adapters and signing keys live."""
from __future__ import annotations

import os
from pathlib import Path


def budwood_home() -> Path:
    """$BUDWOOD_HOME, else ~/.budwood."""
    return Path(os.environ.get("BUDWOOD_HOME", Path.home() / ".budwood")).expanduser()
