"""The bookkeeping every foreign config reader shares: which keys were read, what each became, what cannot
be honoured and why. A key is consumed exactly once; whatever is left at the end is refused by name, so no
key of an Axolotl or LLaMA-Factory file is ever silently dropped."""
from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from budwood.errors import ConfigError, did_you_mean


class Dialect(StrEnum):
    AXOLOTL = "axolotl"
    LLAMA_FACTORY = "llama-factory"


@dataclass
class Converted:
    """A foreign config read into budwood's own form: `native` validates as TrainConfig; `notes` say how each
    key that is not a plain renaming was honoured (printed by `budwood train` and `budwood config convert`)."""

    dialect: Dialect
    source: str
    native: dict[str, Any]
    notes: list[str] = field(default_factory=list)


def unset(value: Any) -> bool:
    """Axolotl and LLaMA-Factory write empty keys (`wandb_project:`) and false flags to mean "not used"."""
    return value is None or value is False or value == "" or value == [] or value == {}


class KeyReader:
    """Reads a foreign mapping key by key into a nested native dict, collecting notes and refusals."""

    def __init__(self, raw: dict[str, Any], source: str, dialect: Dialect):
        self.raw, self.source, self.dialect = raw, source, dialect
        self.native: dict[str, Any] = {}
        self.notes: list[str] = []
        self.refusals: list[str] = []
        self.seen: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self.raw and not unset(self.raw[key])

    def take(self, key: str, default: Any = None) -> Any:
        self.seen.add(key)
        value = self.raw.get(key)
        return default if unset(value) else value

    def flag(self, key: str, default: Any = None) -> Any:
        """The value as written, false included (take() reads false as "not used"): for keys whose false
        asks for something."""
        self.seen.add(key)
        value = self.raw.get(key)
        return default if value is None else value

    def integer(self, key: str, value: Any) -> int | None:
        """`value` as an int, or None after refusing `key` by name."""
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            self.fail(key, f"{value!r}: expected a whole number")
            return None
        try:
            number = float(value)
        except ValueError:
            self.fail(key, f"{value!r}: expected a whole number")
            return None
        if not number.is_integer():
            self.fail(key, f"{value!r}: expected a whole number")
            return None
        return int(number)

    def set(self, dotted: str, value: Any) -> None:
        node = self.native
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value

    def get(self, dotted: str, default: Any = None) -> Any:
        node: Any = self.native
        for p in dotted.split("."):
            if not isinstance(node, dict) or p not in node:
                return default
            node = node[p]
        return node

    def rename(self, key: str, dotted: str, convert=None) -> None:
        """`key` -> `dotted` when the file sets it."""
        value = self.take(key)
        if value is not None:
            self.set(dotted, convert(value) if convert else value)

    def choose(self, key: str, dotted: str, choices: dict[str, str] | tuple[str, ...]) -> None:
        """`key` -> `dotted` when its value is one budwood has (a dict maps the dialect's names to budwood's)."""
        value = self.take(key)
        if value is None:
            return
        if isinstance(value, (str, int, float)) and value in choices:
            self.set(dotted, choices[value] if isinstance(choices, dict) else value)
        else:
            self.fail(key, f"{value!r}: budwood has {', '.join(sorted(choices))}")

    def note(self, key: str, text: str) -> None:
        """A key honoured other than by renaming (or with no effect on the result): said, never silent."""
        value = self.take(key)
        if value is not None:
            self.notes.append(f"{key}: {value!r}: {text}")

    def refuse(self, key: str, text: str, *, unless=None) -> None:
        """A key budwood cannot honour: an error naming it and what to do (unless it is unset or `unless(value)`
        holds, which means the value asks for what budwood does anyway)."""
        value = self.take(key)
        if value is None or (unless is not None and unless(value)):
            return
        self.refusals.append(f"{key}: {value!r}: {text}")

    def fail(self, key: str, text: str) -> None:
        self.refusals.append(f"{key}: {text}")

    def one_of(self, keys: tuple[str, ...], dotted: str, convert=None) -> None:
        """Keys that say the same thing (rl_beta and dpo_beta): the one given, and a refusal if they disagree."""
        values = {k: self.take(k) for k in keys}
        given = {k: v for k, v in values.items() if v is not None}
        if len({repr(v) for v in given.values()}) > 1:
            self.fail(" and ".join(given), f"{', '.join(f'{v!r}' for v in given.values())}: they say the same thing "
                      "differently; give one")
        elif given:
            value = next(iter(given.values()))
            self.set(dotted, convert(value) if convert else value)

    def finish(self, known: tuple[str, ...] = ()) -> Converted:
        """Refuse every key not read (with a did-you-mean among the keys this reader knows), then raise all
        refusals at once, or return the conversion."""
        for key in sorted(k for k in self.raw if k not in self.seen):
            if unset(self.raw[key]):
                continue  # an empty key asks for nothing
            hint = did_you_mean(key, known)
            self.refusals.append(f"{key}: budwood does not know this {self.dialect.value} key{hint}; remove it, "
                                 "or say in budwood's own config what it should do (budwood config convert writes "
                                 "that config)")
        if self.refusals:
            lines = "\n".join(f"  {self.source}: {r}" for r in self.refusals)
            raise ConfigError(f"{self.source}: read as {self.dialect.value} config; {len(self.refusals)} key(s) "
                              f"budwood cannot honour:\n{lines}")
        return Converted(self.dialect, self.source, self.native, self.notes)


def as_list(value: Any) -> list:
    if isinstance(value, str):
        return [v.strip() for v in value.split(",") if v.strip()]
    return list(value) if isinstance(value, (list, tuple)) else [value]


def as_float(value: Any) -> Any:
    """YAML reads 2e-4 as a string (PyYAML follows YAML 1.1); Axolotl and LLaMA-Factory accept it as a number."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


PRECISION = {"auto": "auto", True: "bf16", "true": "bf16", False: "fp32", "false": "fp32"}

OPTIMIZERS = {"adamw_torch": "adamw", "adamw_torch_fused": "adamw", "adamw": "adamw", "adamw_hf": "adamw",
              "adamw_bnb_8bit": "adamw_8bit", "adamw_8bit": "adamw_8bit", "paged_adamw_8bit": "paged_adamw_8bit",
              "sgd": "sgd", "adafactor": "adafactor"}
SCHEDULERS = ("linear", "cosine", "constant", "constant_with_warmup")
TRACKERS = ("tensorboard", "wandb", "mlflow")
