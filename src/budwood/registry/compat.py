"""Publish-time checks: the adapter loads in peft on the base it names, and will it load in vLLM.

The peft check builds the base on the meta device (no weights read, so a 70B base costs nothing),
wraps it with the adapter's LoraConfig and loads the adapter's safetensors into it: a missing,
unexpected or wrongly shaped tensor is an error, as it would be for anyone pulling the adapter.
"""
from __future__ import annotations

import warnings as warnings_module

from budwood.artifacts import AdapterDir
from budwood.registry.names import RegistryError


def check_publishable(adapter: AdapterDir) -> list[str]:
    """Raise if the adapter cannot load on its base; return warnings (vLLM, unrecorded base)."""
    import torch
    from peft import LoraConfig, PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    from budwood.models.fingerprint import model_fingerprint
    from budwood.models.load import resolve_model_path

    base = adapter.base_model
    warnings = []
    try:
        base_config = AutoConfig.from_pretrained(resolve_model_path(base))
    except (OSError, ValueError) as e:
        raise RegistryError(f"{adapter.path}: its base model {base!r} is not available here to check the adapter "
                            f"against ({e.__class__.__name__}); download it first") from None
    if adapter.base_fingerprint:
        actual = model_fingerprint(base)
        if actual != adapter.base_fingerprint:
            raise RegistryError(f"{adapter.path}: trained on a base with fingerprint {adapter.base_fingerprint[:19]}…, "
                                f"but {base!r} here is {actual[:19]}…; it would not reproduce on {base!r}")
    else:
        warnings.append("no base fingerprint recorded (not trained by budwood): the base is checked by shape only")
    try:
        lora = LoraConfig.from_pretrained(str(adapter.path))
    except (TypeError, ValueError) as e:
        raise RegistryError(f"{adapter.path / 'adapter_config.json'}: peft cannot read it ({e})") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(base_config)
    try:
        with warnings_module.catch_warnings():
            warnings_module.simplefilter("ignore", FutureWarning)  # transformers deprecations peft triggers
            model = PeftModel(model, lora, low_cpu_mem_usage=True)
            result = set_peft_model_state_dict(model, load_file(adapter.path / "adapter_model.safetensors"),
                                               low_cpu_mem_usage=True)
    except (RuntimeError, ValueError, KeyError) as e:
        raise RegistryError(f"{adapter.path}: does not load in peft on {base!r}: {str(e).strip()[:400]}") from None
    if result.unexpected_keys:
        raise RegistryError(f"{adapter.path}: tensors that {base!r} has no place for: "
                            f"{', '.join(result.unexpected_keys[:3])}")
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing:
        raise RegistryError(f"{adapter.path}: LoRA tensors missing from the weights: {', '.join(missing[:3])}")
    return warnings + [f"vLLM: {w}" for w in adapter.vllm_warnings()]
