"""`budwood serve`: the base and every adapter behind an OpenAI-compatible API (or handed to vLLM)."""
from __future__ import annotations

from pathlib import Path

import typer

from budwood.errors import BudwoodError

app = typer.Typer()


@app.command("serve")
def serve_cmd(
    base: str = typer.Option("budwood-tiny", help="base model: budwood-tiny, a local HF folder or a hub id"),
    adapters: Path = typer.Option(None, help="folder of adapter directories; each subfolder is served by its name"),
    host: str = typer.Option("127.0.0.1", help="interface to listen on (0.0.0.0 for all)"),
    port: int = typer.Option(8000),
    api_key: str = typer.Option(None, envvar="BUDWOOD_API_KEY", help="require 'Authorization: Bearer KEY' on /v1"),
    precision: str = typer.Option("auto", help="auto, fp32 or bf16"),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1 ..."),
    quantization: str = typer.Option("none", "--quantization", "-q",
                                     help="hold the base quantised: int8 (cpu: torchao; cuda: bitsandbytes) or nf4 "
                                          "(cuda: bitsandbytes; vLLM's 'bitsandbytes' means nf4); "
                                          "docs/quantization.md"),
    max_loaded_adapters: int = typer.Option(8, help="adapters kept in memory (least recently used evicted)"),
    max_lora_rank: int = typer.Option(16, help="largest adapter rank served (a cat merge's rank is the sum of its "
                                                 "parents')"),
    max_num_seqs: int = typer.Option(64, help="sequences decoding at once"),
    kv_cache_tokens: int = typer.Option(65536, help="KV-cache capacity in tokens"),
    max_queue: int = typer.Option(256, help="requests in flight before the server answers 429"),
    engine: str = typer.Option("budwood", help="budwood, or vllm (GPU; hands the same adapter folders to vLLM)"),
    registry: str = typer.Option(None, envvar="BUDWOOD_REGISTRY",
                                 help="serve registry ids ORG/NAME@VERSION from this registry (a folder, database "
                                      "URL or http(s)://server); a local one is also offered at /v1/registry"),
    registry_key: str = typer.Option(None, envvar="BUDWOOD_REGISTRY_API_KEY", help="key of a remote --registry"),
    limit: list[str] = typer.Option([], "--limit", help="a request limit NAME=VALUE, repeatable (e.g. "
                                    "max_body_bytes=16777216, max_stop=8); the limits, their defaults and "
                                    "errors: docs/serving.md, Limits"),
    served_model_name: list[str] = typer.Option([], "--served-model-name", help="a name the base answers to, as "
                                                "vLLM's (repeatable; the first is listed); default: --base"),
    lora_modules: list[str] = typer.Option([], "--lora-modules", help="an adapter served by name, as vLLM's: "
                                           "name=path or JSON {\"name\": ..., \"path\": ...} (repeat the flag for "
                                           "more)"),
) -> None:
    """Serve the base and every adapter behind an OpenAI-compatible API.

    Example: budwood serve --base budwood-tiny --adapters runs/adapters --port 8000
    Registry ids: budwood serve --registry ~/.budwood then model="acme/support@1.0.0"
    then: OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="-").chat.completions.create(model="my-adapter", ...)
    """
    from budwood.serve.limits import ServeLimits

    limits = ServeLimits.from_options(limit)  # checked first: a typo is refused before a model is loaded
    quantization = serve_quantization(quantization)
    modules = dict(lora_module(spec, served_model_name or [base]) for spec in lora_modules)
    if engine == "vllm" and limit:
        raise BudwoodError("--limit applies to --engine budwood; vLLM has its own options")
    if engine == "vllm" and registry:
        raise BudwoodError("--registry works with --engine budwood; for vLLM, budwood pull the adapters into the "
                           "--adapters folder")
    if engine == "vllm":
        from budwood.serve.vllm import serve_vllm
        serve_vllm(base, adapters, host, port, api_key, max_loaded_adapters, served_model_name, modules, quantization)
        return
    if engine != "budwood":
        raise BudwoodError(f"--engine {engine!r}: expected budwood or vllm")
    from budwood.engine import EngineConfig

    config = EngineConfig(base=base, adapters=str(adapters) if adapters else None, precision=precision,
                          device=device, quantization=quantization, max_loaded_adapters=max_loaded_adapters,
                          max_lora_rank=max_lora_rank,
                          max_num_seqs=max_num_seqs,
                          kv_cache_tokens=kv_cache_tokens, max_queue=max_queue,
                          served_model_name=served_model_name, lora_modules=modules)
    if adapters is not None and not adapters.is_dir():
        raise BudwoodError(f"--adapters {adapters}: no such folder")

    from budwood.registry import open_registry
    from budwood.serve import serve

    serve(config, host, port, api_key, open_registry(registry, registry_key) if registry else None, limits)


def serve_quantization(value: str) -> str:
    """--quantization: none, nf4 or int8; vLLM's `bitsandbytes` (its in-flight 4-bit NF4) is read as nf4."""
    value = value.strip().lower()
    if value == "bitsandbytes":
        return "nf4"
    if value not in ("none", "nf4", "int8"):
        raise BudwoodError(f"--quantization {value!r}: expected none, nf4 or int8 (or vLLM's bitsandbytes, read as "
                           "nf4)")
    return value


def lora_module(spec: str, base_names: list[str]) -> tuple[str, str]:
    """One --lora-modules value in either of vLLM's forms: name=path, or JSON with "name" and "path"
    ("base_model_name", vLLM's, must be one of the base's names if given: one base is served)."""
    import json

    if spec.lstrip().startswith("{"):
        try:
            obj = json.loads(spec)
        except json.JSONDecodeError as e:
            raise BudwoodError(f"--lora-modules {spec!r}: not valid JSON ({e.msg})") from None
        unknown = set(obj) - {"name", "path", "base_model_name"}
        if unknown or not isinstance(obj.get("name"), str) or not isinstance(obj.get("path"), str):
            raise BudwoodError(f"--lora-modules {spec!r}: expected {{\"name\": ..., \"path\": ...}}"
                               + (f"; unknown key(s) {', '.join(sorted(unknown))}" if unknown else ""))
        if obj.get("base_model_name") not in (None, *base_names):
            raise BudwoodError(f"--lora-modules {spec!r}: base_model_name {obj['base_model_name']!r} is not the served "
                               f"base ({', '.join(base_names)})")
        return obj["name"], obj["path"]
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise BudwoodError(f"--lora-modules {spec!r}: expected name=path or JSON {{\"name\": ..., \"path\": ...}}")
    return name, path
