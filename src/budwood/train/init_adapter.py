"""Starting a run from an existing adapter (`init_adapter`): SFT continues it, DPO also keeps it as the
reference policy (the policy at step 0 is base + that adapter, and the reference log-probabilities are
computed from it before the first update, so no frozen copy is kept).

The adapter's own LoRA shape (rank, alpha, target modules) is the run's: a `lora` key set to something else
is refused by name, and the adapter must have been trained on this very base (fingerprints compared).
Weights are read from safetensors only.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from budwood.artifacts import AdapterDir
from budwood.config import LoraConfig, TrainConfig
from budwood.errors import BudwoodError, ConfigError
from budwood.models.fingerprint import adapter_fingerprint, model_fingerprint

AdapterResolver = Callable[[str], Path]  # a registry id -> the pulled adapter's folder

# adapter_config.json's key for each of budwood's lora keys
_PEFT_KEYS = {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "target_modules": "target_modules",
              "use_rslora": "use_rslora"}


@dataclass(frozen=True)
class InitAdapter:
    ref: str  # what the config named: a folder or a registry id
    path: Path
    fingerprint: str

    def provenance(self) -> dict:
        return {"ref": self.ref, "fingerprint": self.fingerprint}


def resolve_init_adapter(config: TrainConfig, resolve: AdapterResolver | None = None
                         ) -> tuple[TrainConfig, InitAdapter | None]:
    """The config with the init adapter's LoRA shape, and the adapter; (config, None) without one."""
    ref = config.init_adapter
    if ref is None:
        return config, None
    path = Path(ref).expanduser()
    if not path.is_dir():
        if resolve is None or "/" not in ref:
            raise ConfigError(f"init_adapter: {ref!r} is not an adapter folder" +
                              ("" if resolve is None else " nor a registry id ORG/NAME[@VERSION]"))
        path = resolve(ref)
    try:
        adapter = AdapterDir.open(path)
    except BudwoodError as e:
        raise ConfigError(f"init_adapter: {e}") from None
    peft = adapter.config
    if peft.get("peft_type", "LORA") != "LORA":
        raise ConfigError(f"init_adapter: {ref} is a {peft.get('peft_type')} adapter; only LoRA adapters continue")
    saved_base = adapter.base_fingerprint
    if saved_base and saved_base != model_fingerprint(config.base_model):
        raise ConfigError(f"init_adapter: {ref} was trained on another base ({adapter.base_model}), not "
                          f"{config.base_model}")
    shape = {key: peft[peft_key] for key, peft_key in _PEFT_KEYS.items() if peft_key in peft}
    if isinstance(shape.get("target_modules"), list):
        shape["target_modules"] = sorted(shape["target_modules"])
    for key in (k for k in LoraConfig.model_fields if k in config.lora.model_fields_set):
        given = getattr(config.lora, key)
        given = sorted(given) if key == "target_modules" and isinstance(given, list) else given
        if key in shape and given != shape[key]:
            raise ConfigError(f"lora.{key}: {given!r} disagrees with init_adapter {ref}'s {shape[key]!r}; leave "
                              "it out (the adapter's own LoRA shape is used) or match it")
    config = config.model_copy(update={"lora": LoraConfig(**{**config.lora.model_dump(), **shape})})
    return config, InitAdapter(ref, path.resolve(), adapter_fingerprint(path))


def load_init_weights(peft_model, init: InitAdapter) -> None:
    """The adapter's weights into the freshly built trainable LoRA layers; every layer must be covered."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    weights = load_file(init.path / "adapter_model.safetensors")
    result = set_peft_model_state_dict(peft_model, weights)
    unexpected = list(getattr(result, "unexpected_keys", []) or [])
    missing = [k for k in getattr(result, "missing_keys", []) or [] if "lora_" in k]
    if unexpected or missing:
        raise ConfigError(f"init_adapter: {init.ref}'s weights do not fit its own LoRA config "
                          f"({len(missing)} missing, {len(unexpected)} unexpected, e.g. "
                          f"{(missing + unexpected)[0]})")
