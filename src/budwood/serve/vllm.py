"""`budwood serve --engine vllm`: the same base and adapter folders, served by vLLM on a GPU.

vLLM loads PEFT adapter directories unchanged; budwood only translates its options to vLLM's
OpenAI server (`vllm serve`), so clients see the same model names and routes, and tool calls read with the
parser that matches the base's chat template (vLLM's `--tool-call-parser`, as budwood's engine picks it).
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

from budwood.engine.tools import ToolFormat, template_tool_format
from budwood.errors import BudwoodError
from budwood.models.load import resolve_model_path


def vllm_command(base: str, adapters: Path | None, host: str, port: int, api_key: str | None,
                 max_loras: int, served_model_name: list[str] | None = None,
                 lora_modules: dict[str, str] | None = None, quantization: str = "none") -> list[str]:
    """The `vllm serve` command line for these options (a folder's adapters named by their folder names, then
    `lora_modules` by theirs)."""
    cmd = ["vllm", "serve", resolve_model_path(base), "--served-model-name", *(served_model_name or [base]),
           "--host", host, "--port", str(port), "--enable-lora", "--max-loras", str(max_loras)]
    cmd += vllm_quantization_args(quantization)
    modules = {}
    if adapters is not None:
        modules = {p.name: p for p in sorted(Path(adapters).iterdir()) if (p / "adapter_config.json").exists()}
    modules |= {name: Path(path) for name, path in (lora_modules or {}).items()}
    if modules:
        import json
        ranks = [json.loads((p / "adapter_config.json").read_text()).get("r", 16) for p in modules.values()]
        cmd += ["--max-lora-rank", str(max(ranks)), "--lora-modules", *[f"{n}={p}" for n, p in modules.items()]]
    fmt = _tool_format(resolve_model_path(base))
    if fmt is not None:  # tool_choice auto, as budwood serves it; required and named need no flag in vLLM
        cmd += ["--enable-auto-tool-choice", "--tool-call-parser", fmt.value]
    if api_key:
        cmd += ["--api-key", api_key]
    return cmd


def vllm_quantization_args(quantization: str) -> list[str]:
    """budwood's --quantization in vLLM's words: nf4 is vLLM's in-flight bitsandbytes quantisation (4-bit NF4, as
    QLoRA trains); vLLM quantises an unquantised checkpoint in flight to 4 bits only, so int8 is refused by name."""
    if quantization == "none":
        return []
    if quantization == "nf4":
        return ["--quantization", "bitsandbytes"]
    if quantization == "int8":
        raise BudwoodError("--quantization int8 with --engine vllm: vLLM quantises a checkpoint in flight to 4 bits "
                           "only (bitsandbytes); use --quantization nf4 there, or --engine budwood for int8")
    raise BudwoodError(f"--quantization {quantization!r}: expected none, nf4 or int8")


def _tool_format(model_dir: str) -> ToolFormat | None:
    """The tool-call format the base's chat template teaches (its chat_template.jinja, else the template in its
    tokenizer_config.json)."""
    import json

    folder = Path(model_dir)
    template = None
    if (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text()
    elif (folder / "tokenizer_config.json").is_file():
        template = json.loads((folder / "tokenizer_config.json").read_text()).get("chat_template")
    return template_tool_format(template if isinstance(template, str) else None)


def serve_vllm(base: str, adapters: Path | None, host: str, port: int, api_key: str | None, max_loras: int,
               served_model_name: list[str] | None = None, lora_modules: dict[str, str] | None = None,
               quantization: str = "none") -> None:
    cmd = vllm_command(base, adapters, host, port, api_key, max_loras, served_model_name, lora_modules,
                       quantization)  # first: an option vLLM cannot honour is refused even where it is missing
    if shutil.which("vllm") is None:
        raise BudwoodError("--engine vllm: vLLM is not installed (pip install vllm, on a machine with a GPU)")
    env = dict(os.environ, VLLM_ALLOW_RUNTIME_LORA_UPDATING="True")  # load/unload_lora_adapter, as budwood has
    sys.stdout.flush()
    os.execvpe(cmd[0], cmd, env)
