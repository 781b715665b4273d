"""The reference policy's own answers, for DPO abstention pairs: what the model would confidently say to a
question the data cannot answer is the answer to prefer the abstention over."""
from __future__ import annotations

from pathlib import Path

from budwood.config import TrainConfig
from budwood.errors import ConfigError

MAX_TOKENS_CAP = 256


def reference_answers(config: TrainConfig, prompts: list[list[dict]], max_tokens: int,
                      init_adapter: Path | None = None) -> list[str]:
    """Greedy answers of the base (plus the run's init_adapter, as DPO's reference) in fp32 on the run's
    device, so the same data always gives the same pairs."""
    from budwood.engine import Engine, EngineConfig, SamplingParams

    adapter = init_adapter
    if adapter is None and config.init_adapter is not None:
        adapter = Path(config.init_adapter).expanduser()
        if not adapter.is_dir():
            raise ConfigError(f"init_adapter: {config.init_adapter!r} is not a folder; the abstention recipe needs "
                              "the reference adapter's folder to sample its answers", param="init_adapter")
    device = "auto" if config.training.device == "auto" else config.training.device
    engine = Engine(EngineConfig(base=config.base_model, precision="fp32", device=device))
    name = None
    if adapter is not None:
        engine.register_adapter("reference", adapter)
        name = "reference"
    lora = engine.adapter(name)
    ids = [engine.chat_prompt(p, lora) for p in prompts]
    params = SamplingParams(max_tokens=min(max_tokens, MAX_TOKENS_CAP), temperature=0.0)
    return [o.choices[0].text for o in engine.generate(ids, params, [name] * len(ids))]
