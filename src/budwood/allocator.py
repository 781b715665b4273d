"""Run the CLI under tcmalloc when it is installed.

With glibc malloc, CPU training spends 20-28 % of its time in page faults: large activation buffers
are returned to the kernel and faulted in again every step. tcmalloc keeps them, which measured
+22-77 % tokens/s with bit-identical losses (shared/anchors/RESULTS.md section 4). An allocator can
only be chosen before the process starts, so the CLI re-executes itself once with LD_PRELOAD set.
BUDWOOD_ALLOCATOR=system turns this off.
"""
from __future__ import annotations

import glob
import os
import sys

LIB = "libtcmalloc_minimal.so.4"
_DIRS = ("/usr/lib/x86_64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/usr/lib64", "/usr/lib", "/usr/local/lib")


def find_tcmalloc() -> str | None:
    for d in _DIRS:
        hits = glob.glob(os.path.join(d, LIB))
        if hits:
            return hits[0]
    return None


def reexec_with_tcmalloc() -> None:
    """Replace this process with itself under tcmalloc, unless already there, disabled or absent."""
    if os.environ.get("BUDWOOD_ALLOCATOR", "tcmalloc") == "system" or "tcmalloc" in os.environ.get("LD_PRELOAD", ""):
        return
    lib = find_tcmalloc()
    if lib is None or not sys.platform.startswith("linux"):
        return
    env = dict(os.environ, LD_PRELOAD=" ".join(filter(None, [lib, os.environ.get("LD_PRELOAD")])))
    os.execve(sys.executable, [sys.executable, "-m", "budwood", *sys.argv[1:]], env)
