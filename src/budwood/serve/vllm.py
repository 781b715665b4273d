"""`budwood serve --engine vllm`: the same base and adapter folders, served by vLLM on a GPU.

vLLM loads PEFT adapter directories unchanged; budwood only translates its options to vLLM's
OpenAI server (`vllm serve`), so clients see the same model names and routes.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from budwood.errors import BudwoodError
from budwood.models.load import resolve_model_path


def vllm_command(base: str, adapters: Path | None, host: str, port: int, api_key: str | None,
                 max_loras: int) -> list[str]:
    """The `vllm serve` command line for these options (adapters named by their folder names)."""
    cmd = ["vllm", "serve", resolve_model_path(base), "--served-model-name", base, "--host", host,
           "--port", str(port), "--enable-lora", "--max-loras", str(max_loras)]
    if adapters is not None:
        subdirs = sorted(p for p in Path(adapters).iterdir() if (p / "adapter_config.json").exists())
        if subdirs:
            import json
            ranks = [json.loads((p / "adapter_config.json").read_text()).get("r", 16) for p in subdirs]
            cmd += ["--max-lora-rank", str(max(ranks)), "--lora-modules",
                    *[f"{p.name}={p}" for p in subdirs]]
    if api_key:
        cmd += ["--api-key", api_key]
    return cmd


def serve_vllm(base: str, adapters: Path | None, host: str, port: int, api_key: str | None, max_loras: int) -> None:
    if shutil.which("vllm") is None:
        raise BudwoodError("--engine vllm: vLLM is not installed (pip install vllm, on a machine with a GPU)")
    cmd = vllm_command(base, adapters, host, port, api_key, max_loras)
    env = dict(os.environ, VLLM_ALLOW_RUNTIME_LORA_UPDATING="True")  # load/unload_lora_adapter, as budwood has
    sys.stdout.flush()
    os.execvpe(cmd[0], cmd, env)
