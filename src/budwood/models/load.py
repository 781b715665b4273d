"""Load a base model + tokenizer from `budwood-tiny`, a local HF directory, or a hub id.

The hub path is the ordinary `from_pretrained` one, so a user with a network gets any HF model;
tests and the demo use the tiny model that ships inside this package.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from budwood.errors import ModelError
from budwood.models.names import TINY_DIR, TINY_NAME, resolve_model_path  # noqa: F401  (re-exported)

log = logging.getLogger(__name__)

def bf16_is_fast(device: torch.device) -> bool:
    """bf16 pays off on GPUs that have it and on CPUs with AMX or AVX512-BF16 units."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
        return "amx_bf16" in flags or "avx512_bf16" in flags
    return False


def pick_device(spec: str = "auto") -> torch.device:
    if spec != "auto":
        device = torch.device(spec)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ModelError(f"device {spec!r}: this torch build or machine has no CUDA GPU")
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ModelError(f"device {spec!r}: MPS is not available here")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(precision: str, device: torch.device) -> torch.dtype:
    if precision == "fp32":
        return torch.float32
    if precision == "bf16":
        return torch.bfloat16
    if precision == "auto":
        return torch.bfloat16 if bf16_is_fast(device) else torch.float32
    raise ModelError(f"precision {precision!r}: expected auto, fp32 or bf16")


@dataclass
class Base:
    model: torch.nn.Module
    tokenizer: object
    name: str
    path: str
    quantization: str = "none"  # how the linear weights are held: none, nf4 or int8 (models/quant.py)


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    path = resolve_model_path(name)
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelError(f"{name}: could not load its tokenizer: {str(e).splitlines()[0]}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None):
        raise ModelError(f"{name}: the tokenizer has no chat template; budwood trains chat models "
                         "(use an instruct model or add a chat_template to tokenizer_config.json)")
    return tok


def load_base(name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
              tokenizer=None, quantization: str = "none") -> Base:
    """Load weights from safetensors only: a pickled checkpoint could run code on load.
    Pass `tokenizer` when it is already loaded (training reads the data before the weights).
    `quantization` (none, nf4, int8) loads the linear layers' weights quantised, placed on `device` as they load
    (models/quant.py says which library runs which on which device, and refuses the rest by name)."""
    from transformers import AutoModelForCausalLM

    from budwood.models.quant import quant_plan

    plan = quant_plan(quantization, device, dtype)  # a refused combination fails before the weights load
    path = resolve_model_path(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, use_safetensors=True, **plan.kwargs)
    except (OSError, ValueError) as e:
        raise ModelError(f"{name}: could not load a safetensors causal LM: {str(e).splitlines()[0]}") from None
    except ImportError as e:  # a quantisation library too old or broken for transformers
        raise ModelError(f"{name}: quantization {quantization!r}: {str(e).splitlines()[0]}") from None
    if not plan.quantized:  # quantised weights were placed by device_map; bitsandbytes' refuse .to()
        model.to(device)
    elif plan.library == "torchao":  # bitsandbytes' own autograd functions already keep its weights packed
        from budwood.models.quant import keep_quantized_in_backward, release_freed_memory

        keep_quantized_in_backward(model)
        release_freed_memory()
    return Base(model=model, tokenizer=tokenizer or load_tokenizer(name), name=name, path=path,
                quantization=quantization)
