"""Quick-look generation with a base model and, optionally, an adapter (the engine comes later).

Prompts go through the tokenizer's chat template, and generation stops at the end-of-turn token.
"""
from __future__ import annotations

from pathlib import Path

import torch

from budwood.errors import ModelError
from budwood.models.load import Base, load_base, pick_device


def load_for_generation(base_name: str, adapter_dir: str | Path | None = None, device: str = "auto"):
    """(model, tokenizer); with an adapter the model is a PeftModel, so `disable_adapter()` gives the base."""
    dev = pick_device(device)
    base: Base = load_base(base_name, dtype=torch.float32, device=dev)
    model = base.model
    if adapter_dir is not None:
        from peft import PeftModel

        adapter_dir = Path(adapter_dir)
        for name in ("adapter_config.json", "adapter_model.safetensors"):  # never a pickled adapter
            if not (adapter_dir / name).exists():
                raise ModelError(f"{adapter_dir}: not a safetensors adapter directory (no {name})")
        try:
            model = PeftModel.from_pretrained(model, str(adapter_dir))
        except (RuntimeError, ValueError, KeyError) as e:
            raise ModelError(f"{adapter_dir}: does not fit base model {base_name!r} (was it trained on another "
                             f"base?): {str(e).splitlines()[0]}") from None
    model.eval()
    return model, base.tokenizer


@torch.no_grad()
def chat_generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 64, system: str | None = None,
                  temperature: float = 0.0, seed: int = 0) -> list[str]:
    """Greedy (temperature 0) or sampled answers, one per prompt, without the end-of-turn token."""
    texts = [tokenizer.apply_chat_template(([{"role": "system", "content": system}] if system else []) +
                                           [{"role": "user", "content": p}],
                                           tokenize=False, add_generation_prompt=True) for p in prompts]
    tokenizer.padding_side = "left"
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    enc = {k: v.to(model.device) for k, v in enc.items()}
    torch.manual_seed(seed)
    # the model's generation config may list several end-of-turn tokens; only fill in a missing one
    # (an explicit eos_token_id=None would switch stopping off)
    stop = {} if model.generation_config.eos_token_id is not None else {"eos_token_id": tokenizer.eos_token_id}
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                         temperature=temperature if temperature > 0 else None, top_p=None, top_k=None,
                         pad_token_id=tokenizer.pad_token_id, **stop)
    new = out[:, enc["input_ids"].shape[1]:]
    return [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]
