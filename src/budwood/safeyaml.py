"""YAML from users and adapters, parsed with limits: a size cap, a nesting-depth cap, and a cap on aliases and
on the size the document would have with every alias expanded, all checked while the node graph is composed,
before any Python object is built.

PyYAML's safe loader refuses code but not an "alias bomb": a few hundred bytes whose aliases expand to
billions of nodes once anything walks the result (a JSON dump, a card's metadata copy), and a recursive
alias (`&a [*a]`) makes every walk endless. Every parse of YAML that budwood did not write itself goes
through `load` (configs, --set values, card front matter), so one place holds the limits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from budwood.errors import BudwoodError, ErrorKind


@dataclass(frozen=True)
class YamlLimits:
    """max_bytes: the text's size; max_depth: nesting of mappings and sequences; max_aliases: `*name`
    references; max_nodes: nodes with every alias expanded (what a walk of the result visits)."""

    max_bytes: int = 1 << 20
    max_depth: int = 64
    max_aliases: int = 100
    max_nodes: int = 100_000


DEFAULT_LIMITS = YamlLimits()
# a model card's front matter: metadata, not documents (the Hub's biggest model-index cards are a few KiB)
FRONT_MATTER_LIMITS = YamlLimits(max_bytes=256 << 10, max_depth=32, max_aliases=32, max_nodes=20_000)


class YamlError(BudwoodError):
    """YAML that is malformed or over a limit; the message names where it came from."""


class YamlTooLarge(YamlError):
    kind = ErrorKind.TOO_LARGE


class _LimitedLoader(yaml.SafeLoader):
    """SafeLoader whose composer counts aliases, depth and expanded size as it builds the node graph."""

    def __init__(self, stream: str, limits: YamlLimits):
        super().__init__(stream)
        self.limits = limits
        self.aliases = 0
        self.depth = 0
        self.expanded: dict[int, int] = {}  # id(node) -> nodes under it with aliases expanded (complete nodes)

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > self.limits.max_aliases:
                raise YamlTooLarge(f"more than {self.limits.max_aliases} aliases")
            node = super().compose_node(parent, index)
            if id(node) not in self.expanded:  # its anchor is still being composed: a cycle
                raise YamlError(f"a recursive alias (line {node.start_mark.line + 1})")
            return node
        self.depth += 1
        if self.depth > self.limits.max_depth:
            raise YamlTooLarge(f"nested deeper than {self.limits.max_depth} levels")
        try:
            node = super().compose_node(parent, index)
        finally:
            self.depth -= 1
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = node.value
        else:
            children = []
        size = 1 + sum(self.expanded[id(c)] for c in children)
        if size > self.limits.max_nodes:
            raise YamlTooLarge(f"more than {self.limits.max_nodes} nodes once its aliases are expanded")
        self.expanded[id(node)] = size
        return node


def load(text: str | bytes, where: str, limits: YamlLimits = DEFAULT_LIMITS) -> Any:
    """Parse one YAML document safely within `limits`; errors name `where` (a file, an option)."""
    size = len(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)
    if size > limits.max_bytes:
        raise YamlTooLarge(f"{where}: {size} bytes of YAML, over the limit of {limits.max_bytes}")
    loader = None
    try:
        loader = _LimitedLoader(text, limits)  # the reader already refuses control characters here
        return loader.get_single_data()
    except YamlError as e:
        raise type(e)(f"{where}: refused YAML: {e}") from None
    except yaml.YAMLError as e:
        raise YamlError(f"{where}: not valid YAML: {e}") from None
    except RecursionError:  # flow collections PyYAML's parser nests before the composer sees them
        raise YamlTooLarge(f"{where}: refused YAML: nested too deeply to parse") from None
    finally:
        if loader is not None:
            loader.dispose()


def front_matter(text: str, where: str, limits: YamlLimits = FRONT_MATTER_LIMITS) -> dict:
    """A Markdown file's YAML front matter (between the leading `---` lines) as a mapping; {} if it has none."""
    stripped = text.lstrip()
    if not stripped.startswith("---"):
        return {}
    lines = stripped.split("\n")
    end = next((i for i, line in enumerate(lines[1:], 1) if line.rstrip() == "---"), None)
    if end is None:
        raise YamlError(f"{where}: the front matter starts with '---' but has no closing '---'")
    data = load("\n".join(lines[1:end]), where, limits)
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise YamlError(f"{where}: the front matter is not a mapping of keys")
    return data
