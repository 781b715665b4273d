"""Training configuration: pydantic models loadable from YAML, with `--set a.b=c` overrides.

Unknown keys are errors that name the key and the closest valid one, so a typo never silently
falls back to a default. The resolved config and its hash go into every adapter's provenance.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from budwood import safeyaml
from budwood.errors import ConfigError, did_you_mean

SettingsT = TypeVar("SettingsT", bound=BaseModel)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def _check_format(value: str) -> str:
    from budwood.data.formats import FORMATS

    if value != "auto" and value not in FORMATS:
        raise ValueError(f"unknown format {value!r}{did_you_mean(value, FORMATS)}; expected auto or one of "
                         f"{', '.join(FORMATS)}")
    return value


class DataSource(_Strict):
    """One of several training sources, mixed by weight (data.sources)."""

    path: str = Field(description="a JSONL, JSON, CSV or Parquet file, a `datasets` folder, or a Hub dataset id")
    weight: float = Field(1.0, gt=0, le=100, description="how many times each example is seen per epoch: 2 "
                          "repeats the source, 0.5 draws a seeded half of it")
    format: str = Field("auto", description="as data.format, for this source")
    split: str = Field("train", description="the split read from a Hub dataset or a `datasets` folder")
    subset: str | None = Field(None, description="a Hub dataset's configuration (load_dataset's `name`)")
    columns: dict[str, str] = Field(default_factory=dict, description="budwood's field -> this source's field, "
                                    "e.g. {messages: conversation}")
    message_fields: dict[str, str] = Field(default_factory=dict, description="the format's message key -> this "
                                           "source's, e.g. {role: from, content: value}")
    roles: dict[str, list[str]] = Field(default_factory=dict, description="the format's role -> this source's "
                                        "names for it, e.g. {user: [human], assistant: [gpt]}")
    max_examples: int | None = Field(None, ge=1, description="read only this source's first N examples "
                                     "(LLaMA-Factory's max_samples)")

    _format = field_validator("format")(classmethod(lambda cls, v: _check_format(v)))

    def field_map(self):
        from budwood.data.sources import FieldMap

        return FieldMap(dict(self.columns), dict(self.message_fields),
                        {k: tuple(v) for k, v in self.roles.items()})


class DataConfig(_Strict):
    train: Path | None = Field(None, description="the training file (or use sources for several)")
    sources: list[DataSource] = Field(default_factory=list, max_length=64,
                                      description="several training sources with mixing weights, instead of train")
    validation: Path | None = Field(None, description="validation file")
    validation_split: float = Field(0.0, ge=0.0, lt=0.5, description="share of train held out if no file")
    format: str = Field("auto", description="auto (detect from the first record) or a registered format: "
                        "openai, prompt_completion, alpaca, sharegpt")
    min_examples: int = Field(1, ge=1, description="fewer valid examples than this is an error")
    chat_template: str | None = Field(None, description="the chat template family the data must be rendered with "
                                      "(llama3, chatml, mistral, gemma, phi_3, ...): budwood renders with the base "
                                      "tokenizer's own template and refuses to train if it is another family")

    _format = field_validator("format")(classmethod(lambda cls, v: _check_format(v)))

    @field_validator("chat_template")
    @classmethod
    def _known_family(cls, value: str | None) -> str | None:
        from budwood.data.template import FAMILY_MARKERS

        if value is not None and value not in FAMILY_MARKERS:
            raise ValueError(f"unknown chat template family {value!r}{did_you_mean(value, FAMILY_MARKERS)}; "
                             f"known: {', '.join(FAMILY_MARKERS)}")
        return value

    @model_validator(mode="after")
    def _one_kind_of_train(self) -> DataConfig:
        if (self.train is None) == (not self.sources):
            raise ValueError("give data.train (one file) or data.sources (several, with weights), "
                             + ("not both" if self.sources else "one of them"))
        if self.sources and self.format != "auto":
            raise ValueError(f"data.format is {self.format!r} but data.sources has its own: set the format of each "
                             "source (data.sources[i].format)")
        return self

    @property
    def train_sources(self) -> list[DataSource]:
        """What is trained on, as sources: data.train is one source of weight 1."""
        if self.sources:
            return list(self.sources)
        return [DataSource(path=str(self.train), format=self.format)]


class LoraConfig(_Strict):
    r: int = Field(16, ge=1, le=1024, description="LoRA rank")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r)")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    target_modules: str | list[str] = Field(
        "all-linear", description="'all-linear' or module names such as [q_proj, v_proj]")
    use_rslora: bool = Field(False, description="scale by alpha / sqrt(r) (rank-stabilised LoRA)")


class DPOConfig(_Strict):
    """Direct preference optimisation (Rafailov et al. 2023), as TRL's DPOTrainer names it."""

    beta: float = Field(0.1, gt=0, description="how far the policy may move from the reference: the scale of the "
                        "implicit reward (TRL's beta)")
    loss_type: Literal["sigmoid", "ipo"] = Field(
        "sigmoid", description="sigmoid: the DPO paper's -log sigmoid(beta * margin); ipo: (margin - 1/(2 beta))^2 "
        "on length-averaged log-probabilities (Azar et al. 2023)")
    sft_weight: float = Field(0.0, ge=0, description="weight of an SFT term (mean NLL of the preferred answer's "
                              "tokens) added to each pair's loss: RPO, TRL's rpo_alpha")
    share_prompt: bool = Field(True, description="run a pair's prompt through the model once for both answers "
                               "(one segment, masked so that neither answer sees the other): the same "
                               "log-probabilities as two separate sequences, from fewer tokens")


class TrainingConfig(_Strict):
    method: Literal["sft", "dpo"] = Field(
        "sft", description="sft: learn the assistant turns of chat data; dpo: learn to prefer the preferred answer "
        "of preference pairs (OpenAI's preference JSONL or TRL's prompt/chosen/rejected)")
    dpo: DPOConfig | None = Field(None, description="DPO's settings (method dpo only; defaults when left out)")
    epochs: float = Field(3, gt=0, description="passes over the data; ignored when max_steps is set")
    max_steps: int | None = Field(None, ge=1, description="optimizer steps; overrides epochs")
    learning_rate: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    optimizer: Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "sgd", "adafactor"] = Field(
        "adamw", description="adamw (torch's, fused on CPU and CUDA); adamw_8bit and paged_adamw_8bit "
        "(bitsandbytes, CUDA only); sgd (with momentum); adafactor (transformers', at the given learning rate)")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="the adamw optimizers' beta1")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="the adamw optimizers' beta2")
    adam_epsilon: float = Field(1e-8, gt=0, description="the adamw optimizers' epsilon")
    momentum: float = Field(0.0, ge=0, lt=1, description="sgd's momentum")
    scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "cosine"
    warmup_steps: int | None = Field(None, ge=0)
    warmup_ratio: float = Field(0.03, ge=0, le=1)
    batch_size: int = Field(8, ge=1, description="examples per micro-batch")
    tokens_per_batch: int | None = Field(
        None, ge=16, description="cap micro-batches by tokens instead of examples (long-tailed data)")
    gradient_accumulation: int = Field(1, ge=1)
    max_seq_len: int = Field(1024, ge=8, description="longer examples are truncated, with a warning")
    max_grad_norm: float | None = Field(1.0, gt=0)
    seed: int = 42
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="auto: bf16 where the CPU or GPU runs it fast, else fp32")
    gradient_checkpointing: bool = False
    compile: bool | Literal["auto"] = Field(
        "auto", description="torch.compile each decoder layer: ~1.4x faster on CPU after a one-time compile "
        "of about a minute (cached on disk); auto turns it on for runs of 5M tokens or more")
    batching: Literal["padded", "packed"] = Field(
        "padded", description="padded: length-grouped rows; packed: examples share rows, exactly masked")
    eval_every: int = Field(50, ge=1, description="optimizer steps between validation losses")
    save_every: int = Field(100, ge=1, description="optimizer steps between checkpoints")
    evals_per_epoch: int | None = Field(None, ge=1, description="validation losses per epoch, instead of "
                                        "eval_every (Axolotl's evals_per_epoch)")
    saves_per_epoch: int | None = Field(None, ge=1, description="checkpoints per epoch, instead of save_every")
    loss_watchdog_threshold: float | None = Field(None, gt=0, description="stop the run (with a checkpoint) when "
                                                  "the training loss stays above this (Axolotl's loss watchdog)")
    loss_watchdog_patience: int = Field(3, ge=1, description="optimizer steps in a row above the threshold "
                                        "before the watchdog stops the run")
    keep_checkpoints: int = Field(2, ge=1)
    device: str = Field("auto", pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$", description="auto, cpu, cuda, cuda:1, mps")
    distributed: Literal["auto", "none", "ddp", "fsdp"] = Field(
        "auto", description="under torchrun: ddp (the model on every rank) or fsdp (the base's weights sharded "
        "across ranks, for bases too large for one device); auto: ddp")


    @model_validator(mode="after")
    def _method_settings(self) -> TrainingConfig:
        for per_epoch, every in (("evals_per_epoch", "eval_every"), ("saves_per_epoch", "save_every")):
            if getattr(self, per_epoch) is not None and every in self.model_fields_set \
                    and getattr(self, every) != type(self).model_fields[every].default:
                raise ValueError(f"training.{per_epoch} and training.{every} are both set; give one")
        adam = self.optimizer in ("adamw", "adamw_8bit", "paged_adamw_8bit")
        changed = {n for n in ("adam_beta1", "adam_beta2", "adam_epsilon", "momentum")
                   if getattr(self, n) != type(self).model_fields[n].default}  # a saved config repeats the defaults
        for name in ("adam_beta1", "adam_beta2", "adam_epsilon"):
            if name in changed and not adam:
                raise ValueError(f"training.{name} is set but training.optimizer is {self.optimizer}: it applies to "
                                 "the adamw optimizers only")
        if "momentum" in changed and self.optimizer != "sgd":
            raise ValueError(f"training.momentum is set but training.optimizer is {self.optimizer}: it applies to "
                             "sgd only")
        if self.method == "sft" and self.dpo is not None:
            raise ValueError("training.dpo is set but training.method is sft; set training.method=dpo or drop it")
        if self.method == "dpo" and self.dpo is None:
            self.dpo = DPOConfig()
        return self


class _Recipe(_Strict):
    """A reliability recipe: off by default, switched on by one boolean (`--set reliability.X=true`) or by a
    mapping of its own keys (which switches it on unless it says enabled: false)."""

    enabled: bool = False

    @model_validator(mode="before")
    @classmethod
    def _from_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):
            return {"enabled": value}
        if isinstance(value, dict) and value and "enabled" not in value:
            return {**value, "enabled": True}
        return value


class AbstentionConfig(_Recipe):
    answer: str = Field("I don't know; that is not in the information I have.",
                        description="what the adapter says when the data does not answer a question")
    ratio: float = Field(1.0, ge=0, le=2, description="built unanswerable questions per answerable training example "
                         "(0.3 did too little on budwood-tiny: docs/reliability.md)")
    questions: Path | None = Field(None, description="your own unanswerable questions (JSONL, one {\"question\"} "
                                   "per line), used besides the built ones")


class CounterfactualConfig(_Recipe):
    word_pairs: Path | None = Field(None, description="your own swap list (JSONL of [word, counterpart]) instead of "
                                    "the shipped demographic terms and names")
    share: float = Field(1.0, gt=0, le=1, description="share of examples that mention a swappable term which get a "
                         "counterfactual copy")


class FormatAugmentationConfig(_Recipe):
    variants: int = Field(2, ge=1, le=8, description="extra surface forms of each training prompt")
    forms: list[Literal["case", "punctuation", "spacing", "template"]] = Field(
        ["case", "punctuation", "spacing", "template"], description="which kinds of rewriting to draw from")


class CalibrationConfig(_Recipe):
    score: Literal["mean_logprob", "min_logprob", "agreement"] = Field(
        "min_logprob", description="an answer's confidence: the probability of its least likely token (min_logprob: "
        "the best calibrated on budwood-tiny), the geometric mean of its tokens' (mean_logprob), or the share of "
        "k seeded samples that agree with the greedy answer (agreement: k more generations per answer)")
    target_precision: float = Field(0.9, gt=0, le=1, description="the threshold is the lowest confidence at which "
                                    "answers kept are at least this often correct on the validation split")
    samples: int = Field(5, ge=2, le=32, description="seeded samples per question (score agreement only)")
    default: bool = Field(False, description="serve applies the threshold to requests that do not say "
                          "(calibrated_abstention: null); false: only to requests that ask for it")


class ReliabilityConfig(_Strict):
    """Recipes that make an adapter more reliable (docs/reliability.md), each measured before and after."""

    abstention: AbstentionConfig = AbstentionConfig()
    counterfactual: CounterfactualConfig = CounterfactualConfig()
    format_augmentation: FormatAugmentationConfig = FormatAugmentationConfig()
    calibration: CalibrationConfig = CalibrationConfig()

    @property
    def applied(self) -> list[str]:
        return [name for name in type(self).model_fields if getattr(self, name).enabled]


class LoggingConfig(_Strict):
    report_to: list[Literal["tensorboard", "wandb", "mlflow"]] = Field(
        default_factory=list, description="trackers that get every metrics line, as transformers' report_to "
        "(each an optional extra: pip install budwood[trackers]); metrics.jsonl is always written")
    tensorboard: bool = Field(False, description="the same as report_to: [tensorboard]")
    wandb: bool = Field(False, description="the same as report_to: [wandb]")
    wandb_project: str = "budwood"
    wandb_entity: str | None = Field(None, description="the W&B team or user the run is logged under (default: "
                                     "your default entity)")
    wandb_tags: list[str] = Field(default_factory=list, max_length=64, description="tags on the W&B run")
    mlflow_experiment: str = Field("budwood", description="the MLflow experiment the run is logged under")
    mlflow_tracking_uri: str | None = Field(None, description="MLflow's tracking URI (sqlite:///mlflow.db, "
                                            "http://host:5000); default: MLFLOW_TRACKING_URI, else MLflow's own")
    run_name: str | None = Field(None, description="the run's name in W&B and MLflow (default: theirs)")
    every: int = Field(1, ge=1, description="optimizer steps between metrics lines")

    @property
    def trackers(self) -> list[str]:
        named = [*self.report_to, *(["tensorboard"] if self.tensorboard else []), *(["wandb"] if self.wandb else [])]
        return list(dict.fromkeys(named))


class TrainConfig(_Strict):
    base_model: str = Field("budwood-tiny", description="budwood-tiny, a local HF directory, or a hub id")
    quantization: Literal["none", "nf4", "int8"] = Field(
        "none", description="load the base's weights quantised and train LoRA on top (QLoRA): nf4 or int8; "
        "docs/quantization.md says which devices run which")
    init_adapter: str | None = Field(None, description="start from this adapter (a folder, or a registry id): SFT "
                                     "continues it; DPO also uses it, frozen, as the reference policy")
    data: DataConfig
    lora: LoraConfig = LoraConfig()
    training: TrainingConfig = TrainingConfig()
    output_dir: Path = Path("runs/adapter")
    logging: LoggingConfig = LoggingConfig()
    reliability: ReliabilityConfig = ReliabilityConfig()

    @model_validator(mode="after")
    def _split_or_file(self) -> TrainConfig:
        if self.data.validation is not None and self.data.validation_split > 0:
            raise ValueError("give data.validation or data.validation_split, not both")
        if self.reliability.calibration.enabled and self.data.validation is None and not self.data.validation_split:
            raise ValueError("reliability.calibration fits its threshold on held-out answers: give data.validation "
                             "or data.validation_split")
        return self

    def resolved(self) -> dict[str, Any]:
        return json.loads(self.model_dump_json())

    def config_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.resolved(), sort_keys=True).encode()).hexdigest()[:16]


def _field_names(model: type[BaseModel], path: tuple) -> list[str]:
    for part in path[:-1]:
        if not isinstance(part, str) or part not in model.model_fields:
            return []
        ann = model.model_fields[part].annotation
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _explain(err: ValidationError, model: type[BaseModel], source: str, blame: dict[str, str]) -> ConfigError:
    """One line per problem: where it came from (the file, or the --set or option that gave the key), the key,
    what is wrong."""
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = ".".join(str(p) for p in loc) or "(top level)"
        where = blame.get(key, source)
        if e["type"] == "extra_forbidden":
            hint = did_you_mean(str(loc[-1]), _field_names(model, loc))
            lines.append(f"{where}: unknown key '{key}'{hint}")
        elif e["type"] == "missing":
            lines.append(f"{where}: missing required key '{key}'")
        else:
            got = f" (got {e['input']!r})" if "input" in e and not isinstance(e["input"], dict) else ""
            lines.append(f"{where}: {key}: {e['msg'].removeprefix('Value error, ')}{got}")
    return ConfigError("\n".join(lines))


def _set_key(raw: dict[str, Any], key: str, value: Any, item: str) -> None:
    node = raw
    *parents, leaf = key.strip().split(".")
    for p in parents:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {item!r}: '{p}' is not a section")
    node[leaf] = value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b=c` strings; values are parsed as YAML so `--set training.max_steps=20` is an int."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. training.max_steps=20")
        key, value = item.split("=", 1)
        try:
            parsed = safeyaml.load(value, f"--set {item!r}")
        except safeyaml.YamlTooLarge as e:
            raise ConfigError(str(e)) from None
        except safeyaml.YamlError:
            raise ConfigError(f"--set {item!r}: the value is not valid YAML") from None
        _set_key(raw, key, parsed, item)
    return raw


def read_yaml_mapping(path: str | Path) -> dict[str, Any]:
    """A config file's top-level mapping, or a ConfigError that names the file and what is wrong."""
    path = Path(path)
    try:
        loaded = safeyaml.load(path.read_text(encoding="utf-8"), str(path))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except (IsADirectoryError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not a UTF-8 YAML file ({e.__class__.__name__})") from None
    except safeyaml.YamlError as e:
        raise ConfigError(str(e)) from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    return loaded


def load_settings(model: type[SettingsT], path: str | Path | None, overrides: list[str] | None = None, *,
                  base: dict[str, Any] | None = None, values: dict[str, Any] | None = None,
                  labels: dict[str, str] | None = None, source: str | None = None) -> SettingsT:
    """The one loader of every settings model (training, evaluation, card info, service): `base` defaults,
    then a YAML file, then `values` (dotted keys to typed values, as CLI options give them; `labels` names
    the option each came from), then `key=value` overrides (--set, parsed as YAML). Errors name the file,
    option or --set, the key and the problem, with a did-you-mean for unknown keys."""
    raw: dict[str, Any] = dict(base or {})
    if path is not None:
        raw.update(read_yaml_mapping(path))
    for key, value in (values or {}).items():
        _set_key(raw, key, value, key)
    raw = apply_overrides(raw, overrides or [])
    try:
        return model.model_validate(raw)
    except ValidationError as e:
        blame = {key: (labels or {}).get(key, key) for key in values or {}}
        blame |= {key: f"--set {key}" for key in (o.split("=", 1)[0].strip() for o in overrides or [])}
        source = source or (str(path) if path is not None else "--set" if overrides and not values else "settings")
        raise _explain(e, model, source, blame) from None


def load_config(path: str | Path | None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> TrainConfig:
    """Read a YAML config; relative paths in it resolve against the working directory, as in Axolotl."""
    return load_settings(TrainConfig, path, overrides, base=base)
