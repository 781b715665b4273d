"""The registry and artefacts surface as an attacker meets it (issue 17): property-based fuzzing of the
`--where` parser, adapter_config.json loading and the YAML loader (every input is answered or refused with
a BudwoodError, never another exception), and the CLI's answer to hostile input (exit 2, no traceback).
The unit probes of each confirmed finding live beside their modules (tests/unit/registry, card, models).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from budwood import safeyaml
from budwood.artifacts import confined_path, read_adapter_config
from budwood.errors import BudwoodError
from budwood.registry.local import parse_condition

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

conditions = st.one_of(
    st.text(max_size=80),
    st.builds(lambda s, m, op, v: f"{s}{m}{op}{v}", st.sampled_from(["", "grounding.", "a.b.", "X."]),
              st.from_regex(r"[A-Za-z0-9_]{0,12}", fullmatch=True), st.sampled_from(["<", "<=", "==", "=", "~", ""]),
              st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr),
                        st.text("0123456789.e-+", max_size=12))),
)


@FUZZ
@given(conditions)
def test_the_where_parser_answers_or_refuses_every_input(text):
    try:
        suite, metric, op, value = parse_condition(text)
    except BudwoodError as e:
        assert "bad metric condition" in str(e) and e.param == "where"
        return
    assert op in {"<", "<=", ">", ">=", "="} and value == value and abs(value) != float("inf")
    assert metric and (suite is None or suite.isidentifier())


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20)
configs = st.fixed_dictionaries({}, optional={
    "r": json_values, "lora_alpha": json_values, "rank_pattern": json_values, "alpha_pattern": json_values,
    "lora_dropout": json_values, "target_modules": json_values})


@FUZZ
@given(configs | json_values)
def test_adapter_config_loading_answers_or_refuses_every_json(tmp_path_factory, config):
    path = Path(tmp_path_factory.mktemp("cfg")) / "adapter_config.json"
    path.write_text(json.dumps(config))  # NaN and Infinity written as json.dumps does, as a hostile file may
    try:
        loaded = read_adapter_config(path)
    except BudwoodError:
        return
    r = loaded.get("r", 1)
    assert isinstance(r, int | float) and 1 <= r <= 65536
    alpha = loaded.get("lora_alpha", 0)
    assert alpha == alpha and abs(alpha) <= 1e6


@FUZZ
@given(st.text(max_size=400) | st.builds(lambda n, a: "a: &a [1]\n" + "\n".join(f"k{i}: [{','.join(['*a'] * a)}]"
                                                                                  for i in range(n)),
                                          st.integers(0, 20), st.integers(0, 20)))
def test_the_yaml_loader_answers_or_refuses_every_text(text):
    try:
        safeyaml.load(text, "fuzz")
    except BudwoodError:
        pass


@FUZZ
@given(st.text(max_size=60))
def test_confined_paths_never_climb_out(name):
    if confined_path(name):
        assert not name.startswith("/") and ".." not in name.split("/") and "\\" not in name and "\0" not in name


def _cli(*args: str | Path, home: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUDWOOD_")}
    return subprocess.run([sys.executable, "-m", "budwood", *map(str, args)], capture_output=True, text=True,
                          env={**env, "BUDWOOD_HOME": str(home), "COLUMNS": "200"}, timeout=300)


@pytest.mark.parametrize("where", ["x<1.2.3", "x<1e999", "hallucination_rate<--1"])
def test_cli_search_with_a_malformed_where_exits_2_without_a_traceback(tmp_path, where):
    r = _cli("search", "--where", where, "--registry", tmp_path / "registry", home=tmp_path / "home")
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "bad metric condition" in r.stderr
