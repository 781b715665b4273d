"""Quantised bases (QLoRA): which library loads `quantization: nf4 | int8` on which device, or why none can.

One table, read by every stage that loads a base (training, the engine, so `generate`, eval and serve):

- CUDA, nf4: bitsandbytes 4-bit NF4 with double quantisation, computing in the run's dtype (bf16 on GPUs
  that have it), then peft's `prepare_model_for_kbit_training` before the LoRA layers: QLoRA as Dettmers
  et al. 2023 and the transformers/peft docs describe it.
- CUDA, int8: bitsandbytes LLM.int8() (`load_in_8bit`), prepared the same way.
- CPU, int8: torchao's weight-only int8 (per-row scales; `TorchAoConfig(Int8WeightOnlyConfig())`); peft wraps
  its linears in `TorchaoLoraLinear`, so LoRA trains on top of the int8 weights.
- CPU, nf4 (and MPS, any): refused by name. bitsandbytes 0.50 runs NF4 on CPU too, but about 12x slower than
  torchao's int8 on budwood-tiny (measured: docs/quantization.md); int8 is the CPU path.

Adapters stay plain PEFT files with float LoRA weights: quantisation only changes how the base is held.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch

from budwood.errors import ModelError

QUANTIZATIONS = ("none", "nf4", "int8")


@dataclass(frozen=True)
class QuantPlan:
    """How to load a base with `quantization` on `device`: the extra `from_pretrained` kwargs, and whether peft's
    k-bit preparation runs before LoRA (bitsandbytes only: it upcasts norms and enables input gradients)."""

    quantization: str
    library: str | None = None  # "bitsandbytes" | "torchao"; None for an ordinary base
    kwargs: dict = field(default_factory=dict)
    kbit_prep: bool = False

    @property
    def quantized(self) -> bool:
        return self.library is not None

    def describe(self) -> str | None:
        """"torchao 0.18.0", for provenance; None for an ordinary base."""
        return f"{self.library} {_version(self.library)}" if self.library else None


def check_quantization(quantization: str) -> str:
    if quantization not in QUANTIZATIONS:
        raise ModelError(f"quantization {quantization!r}: expected one of {', '.join(QUANTIZATIONS)}")
    return quantization


def quant_plan(quantization: str, device: str | torch.device, dtype: torch.dtype) -> QuantPlan:
    """The plan for (quantization, device, dtype), or a ModelError naming `quantization`, the device and what to
    use instead. Checks the library is importable here, so a missing package fails before any weights load."""
    check_quantization(quantization)
    if quantization == "none":
        return QuantPlan("none")
    device = torch.device(device)
    if device.type == "cuda":
        _require("bitsandbytes", quantization, "pip install 'budwood[quant]' (or pip install bitsandbytes)")
        device_map = {"": device.index if device.index is not None else torch.cuda.current_device()}
        return QuantPlan(quantization, "bitsandbytes",
                         {"quantization_config": bnb_config(quantization, dtype), "device_map": device_map},
                         kbit_prep=True)
    if device.type == "cpu" and quantization == "int8":
        _require("torchao", quantization, "pip install 'budwood[quant]' (or pip install torchao)")
        return QuantPlan(quantization, "torchao", {"quantization_config": torchao_int8_config(),
                                                    "device_map": {"": "cpu"}})
    if device.type == "cpu":
        raise ModelError("quantization 'nf4' needs a CUDA GPU (bitsandbytes); this run's device is cpu. On a CPU "
                         "use quantization: int8 (torchao weight-only int8), or none")
    raise ModelError(f"quantization {quantization!r}: no quantised path on device {device.type!r} (nf4 and int8 run on "
                     "CUDA with bitsandbytes; int8 on cpu with torchao); use quantization: none there")


def bnb_config(quantization: str, dtype: torch.dtype):
    """bitsandbytes' config as the QLoRA recipe sets it: NF4 with double quantisation, matmuls in `dtype` (bf16 on
    a GPU with it: fp16 compute overflows on some models); or LLM.int8() for int8."""
    from transformers import BitsAndBytesConfig

    if quantization == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype)
    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ModelError(f"quantization {quantization!r}: bitsandbytes loads nf4 or int8")


def torchao_int8_config():
    """torchao's weight-only int8 (symmetric, one scale per output row) behind transformers' TorchAoConfig."""
    from transformers import TorchAoConfig

    with _quiet("torchao"):
        from torchao.quantization import Int8WeightOnlyConfig
    return TorchAoConfig(Int8WeightOnlyConfig())


def prepare_for_kbit_training(model, plan: QuantPlan):
    """peft's k-bit preparation for bitsandbytes bases (freeze, non-quantised weights to fp32, input gradients);
    a torchao or ordinary base is returned as it is. Gradient checkpointing is left to the recipe, which turns it
    on (or not) the same way for every base."""
    if not plan.kbit_prep:
        return model
    from peft import prepare_model_for_kbit_training

    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


class _WeightOnlyLinear(torch.autograd.Function):
    """x @ W.T + b with W held quantised, whose backward multiplies by W again. Through torchao's own forward,
    autograd would save the float copy of W that its matmul makes: a full-precision weight per linear for the
    whole step, more than the unquantised base holds. W is frozen: only x gets a gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.weight = weight  # the quantised tensor itself, no copy
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        return grad @ ctx.weight.dequantize(grad.dtype), None, None


def _weight_only_forward(module: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return _WeightOnlyLinear.apply(x, module.weight, module.bias)
    return torch.nn.functional.linear(x, module.weight, module.bias)


def keep_quantized_in_backward(model: torch.nn.Module) -> None:
    """Route every torchao-quantised linear through _WeightOnlyLinear, so training holds int8 weights only."""
    from functools import partial

    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and is_quantized_linear(module) and hasattr(module.weight, "dequantize"):
            module.forward = partial(_weight_only_forward, module)


def release_freed_memory() -> None:
    """Hand the allocator's freed pages back to the system (glibc's malloc_trim). Quantising while loading frees a
    float copy of every weight in small pieces that glibc keeps: about 220 MB on an 82 M-parameter model, more than
    its int8 weights. A no-op where the C library has no malloc_trim."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def is_quantized_linear(module: torch.nn.Module) -> bool:
    """A linear whose weight is not a plain tensor (torchao's Int8Tensor, bitsandbytes' Params4bit/Int8Params):
    its own forward knows how to multiply by it; reading `.weight` as a matrix does not."""
    weight = getattr(module, "weight", None)
    return weight is not None and type(weight) not in (torch.Tensor, torch.nn.Parameter)


def linear_shape(module: torch.nn.Module) -> tuple[int, int]:
    """(out_features, in_features): bitsandbytes' 4-bit weight is stored packed, so its `.weight.shape` is not it."""
    if hasattr(module, "out_features") and hasattr(module, "in_features"):
        return int(module.out_features), int(module.in_features)
    return tuple(module.weight.shape)  # type: ignore[return-value]


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes the model's parameters and buffers hold, quantised ones counted by their stored data (int8 values
    and scales), a tied weight once."""
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        for part in _storage_parts(t):
            key = part.untyped_storage().data_ptr() if part.device.type != "meta" else id(part)
            if key not in seen:
                seen.add(key)
                total += part.untyped_storage().nbytes()
    return total


def _storage_parts(t: torch.Tensor) -> list[torch.Tensor]:
    names = getattr(t, "tensor_data_names", None)  # torchao subclasses list their inner tensors
    if names:
        parts = [getattr(t, n) for n in names + list(getattr(t, "optional_tensor_data_names", []))]
        return [p for p in parts if isinstance(p, torch.Tensor)]
    return [t]


def adapter_quantization(adapter_dir: str | Path) -> str:
    """The quantisation of the base an adapter was trained on, from its budwood.json ("none" when it has no
    provenance or none was used): evaluation loads the base the same way."""
    prov = Path(adapter_dir).expanduser() / "budwood.json"
    if not prov.is_file():
        return "none"
    try:
        base = json.loads(prov.read_text()).get("base_model") or {}
    except (OSError, ValueError, AttributeError):
        return "none"
    value = base.get("quantization", "none") if isinstance(base, dict) else "none"
    return value if value in QUANTIZATIONS else "none"


def _require(package: str, quantization: str, install: str) -> None:
    import importlib.util

    if importlib.util.find_spec(package) is None:
        raise ModelError(f"quantization {quantization!r} needs {package}, which is not installed: {install}")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"


class _quiet:
    """torchao logs a warning per CUDA kernel library it cannot load on a CPU build; they are not ours to act on."""

    def __init__(self, name: str):
        self.logger = logging.getLogger(name)

    def __enter__(self):
        self.level = self.logger.level
        self.logger.setLevel(logging.ERROR)

    def __exit__(self, *exc):
        self.logger.setLevel(self.level)
