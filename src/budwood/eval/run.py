"""`budwood eval`: open the target, run the chosen suites in order, write one results file.

Read top to bottom: config -> target -> each suite (its own timing and data hashes) -> results.
"""
from __future__ import annotations

import platform
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from budwood.config import load_settings
from budwood.errors import ConfigError, did_you_mean
from budwood.eval import bias, domain, grounding, reproducibility, tools, truthfulqa
from budwood.eval.bias import BiasConfig
from budwood.eval.confidence import AbstentionPolicy
from budwood.eval.context import EvalContext, NoProgress, Progress
from budwood.eval.domain import DomainConfig
from budwood.eval.grounding import GroundingConfig
from budwood.eval.reproducibility import ReproducibilityConfig
from budwood.eval.results import EvalResults
from budwood.eval.targets import open_target
from budwood.eval.tools import ToolsConfig
from budwood.eval.truthfulqa import TruthfulQAConfig

SUITES = {"domain": domain, "grounding": grounding, "truthfulqa": truthfulqa,
          "reproducibility": reproducibility, "bias": bias, "tools": tools}
QUICK = ["domain", "grounding", "reproducibility"]


class EvalConfig(BaseModel):
    """Everything that decides the numbers; stored whole in the results file."""
    model_config = ConfigDict(extra="forbid")
    target: str = Field(description="budwood-tiny | MODEL_PATH | BASE+ADAPTER_DIR | openai:BASE_URL#MODEL")
    suites: list[str] = Field(default_factory=lambda: list(QUICK))
    limit: int | None = Field(None, ge=1, description="examples per suite (per category for bias), for quick runs")
    records: bool = Field(False, description="keep per-example records in the results")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "fp32", description="fp32 by default: batch-invariant on CPUs, so numbers repeat exactly")
    device: str = "auto"
    seed: int = 0
    bootstrap: int = Field(1000, ge=0, description="bootstrap resamples for the 95% intervals (0: none)")
    max_tokens: int = Field(64, ge=1, description="answer length for generated answers")
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding a remote target's key")
    concurrency: int = Field(8, ge=1, description="requests in flight to a remote target")
    calibrated_abstention: bool = Field(
        False, description="answer with the adapter's abstention text wherever an answer's confidence is below the "
        "threshold in its calibration.json (budwood calibrate); local BASE+ADAPTER targets")
    domain: DomainConfig = Field(default_factory=DomainConfig)
    grounding: GroundingConfig = Field(default_factory=GroundingConfig)
    truthfulqa: TruthfulQAConfig = Field(default_factory=TruthfulQAConfig)
    reproducibility: ReproducibilityConfig = Field(default_factory=ReproducibilityConfig)
    bias: BiasConfig = Field(default_factory=BiasConfig)
    tools: ToolsConfig = Field(default_factory=ToolsConfig)

    @field_validator("suites")
    @classmethod
    def _known_suites(cls, suites: list[str]) -> list[str]:
        for name in suites:
            if name not in SUITES:
                raise ValueError(f"unknown suite {name!r}{did_you_mean(name, SUITES)}; choose from {', '.join(SUITES)}")
        return suites


def load_eval_config(path: Path | None, values: dict, overrides: list[str] | None = None,
                     labels: dict[str, str] | None = None) -> EvalConfig:
    """A YAML eval config, then `values` (dotted keys, typed: the CLI's options, named in errors by `labels`),
    then `--set key=value`."""
    return load_settings(EvalConfig, path, overrides, values=values, labels=labels)


def abstention_policy(spec: str) -> AbstentionPolicy:
    """The calibrated abstention of a local BASE+ADAPTER target, checked to be fitted on its weights before
    any weights are loaded."""
    from budwood.eval.calibration import load_calibration
    from budwood.models.fingerprint import adapter_fingerprint

    _, _, adapter = spec.partition("+")
    if spec.startswith("openai:") or not adapter:
        raise ConfigError("calibrated_abstention needs a local BASE+ADAPTER target (its calibration.json); an "
                          "adapter served by budwood serve applies it per request (field calibrated_abstention)",
                          param="calibrated_abstention")
    folder = Path(adapter).expanduser()
    return load_calibration(folder, adapter_fingerprint(folder)).policy()


def run_eval(config: EvalConfig, progress: Progress | None = None) -> EvalResults:
    import torch
    import transformers

    from budwood import __version__

    started = time.perf_counter()
    policy = abstention_policy(config.target) if config.calibrated_abstention else None
    target = open_target(config.target, config.precision, config.device, config.api_key_env, config.concurrency)
    results = {}
    for name in config.suites:
        ctx = EvalContext(target, seed=config.seed, bootstrap=config.bootstrap, max_tokens=config.max_tokens,
                          progress=progress or NoProgress(), policy=policy)
        suite = SUITES[name].run(ctx, getattr(config, name), config.limit, config.records)
        suite.timing = ctx.timing()
        results[name] = suite
    return EvalResults(
        target=target.info, config=config.model_dump(mode="json"),
        software={"budwood": __version__, "torch": torch.__version__, "transformers": transformers.__version__,
                  "python": platform.python_version()},
        created=datetime.now(UTC).isoformat(timespec="seconds"), seconds=round(time.perf_counter() - started, 3),
        suites=results)
