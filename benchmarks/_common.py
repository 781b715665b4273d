"""What the benchmark scripts share; each still runs on its own (`python benchmarks/NAME.py`).

Kept apart from the budwood package on purpose: importing budwood would set its environment (e.g.
MKL_DYNAMIC) in the harness, and the anchors' processes must run as their authors ran them.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

HERE = Path(__file__).resolve().parent


def git_state() -> str | None:
    """HEAD's short hash, with '+dirty' when src/ has uncommitted changes (the code may be mid-edit)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "src"], cwd=HERE.parent, capture_output=True,
                               text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+dirty" if dirty else "")


def emit_records(records: list[dict], results: str | Path, save: bool) -> None:
    """Print each record as a JSON line and, unless told not to, append them to the results file."""
    for rec in records:
        print(json.dumps(rec))
    if save:
        with open(results, "a") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
        print(f"appended {len(records)} line(s) to {results}")
