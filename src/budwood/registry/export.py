"""`budwood export DIR --hf OUT`: the adapter as a Hugging Face Hub model repository, ready to upload
(`huggingface-cli upload ORG/NAME OUT` or `HfApi().upload_folder`).

The Hub layout is the PEFT layout: adapter_config.json and adapter_model.safetensors at the root,
README.md with the card's YAML metadata, plus budwood's provenance, results and attestation so that
anyone who downloads it can run `budwood verify`. Binary files go through LFS (.gitattributes), as
the Hub requires.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from budwood.artifacts import ATTESTATION, AdapterDir, staged_dir
from budwood.errors import BudwoodError

GITATTRIBUTES = """*.safetensors filter=lfs diff=lfs merge=lfs -text
*.bin filter=lfs diff=lfs merge=lfs -text
*.png filter=lfs diff=lfs merge=lfs -text
"""


def export_hf(adapter_dir: str | Path, out: str | Path) -> Path:
    from budwood.card.attest import verify
    from budwood.card.render import read_card_metadata
    from budwood.registry.local import check_card_yaml

    adapter = AdapterDir.open(adapter_dir)
    names = adapter.published_files()  # refuses symlinks and special files by name, before anything is written
    out = Path(out).expanduser()
    if out.exists() and any(out.iterdir()):
        raise BudwoodError(f"{out} exists and is not empty; choose an empty or new folder")
    if not (adapter.path / "README.md").is_file():
        raise BudwoodError(f"{adapter.path}: no model card (README.md); write one first: budwood card {adapter.path}")
    check_card_yaml(adapter.path / "README.md")
    meta = read_card_metadata(adapter.path / "README.md")
    if meta.get("library_name") != "peft" or not meta.get("base_model"):
        raise BudwoodError(f"{adapter.path / 'README.md'}: not a budwood card (no library_name: peft / base_model "
                           f"in its metadata); write one: budwood card {adapter.path}")
    signed = os.path.lexists(adapter.path / ATTESTATION)
    if signed:
        check = verify(adapter.path)
        if not check.ok:
            raise BudwoodError(f"{adapter.path}: the attestation does not verify ({'; '.join(check.problems)}"
                               f"{'; unsigned: ' + ', '.join(check.unsigned) if check.unsigned else ''}); "
                               "re-sign it or remove attestation.json")
    with staged_dir(out) as tmp:
        for name in names:
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(adapter.path / name, tmp / name)
        (tmp / ".gitattributes").write_text(GITATTRIBUTES)
    return out
