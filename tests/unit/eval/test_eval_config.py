"""`budwood eval` configuration: YAML file + --set overrides -> EvalConfig, with errors a person can act on."""
from pathlib import Path

import pytest

from budwood.errors import ConfigError
from budwood.eval.run import QUICK, EvalConfig, load_eval_config


def test_overrides_nest_into_the_suite_configs(tmp_path):
    cfg_file = tmp_path / "eval.yaml"
    cfg_file.write_text("target: budwood-tiny\nsuites: [grounding]\ngrounding:\n  abstain_phrases: [ask us]\n")
    cfg = load_eval_config(cfg_file, {"limit": 3, "grounding.data": "q.jsonl", "reproducibility.prompts": 2})
    assert cfg.target == "budwood-tiny" and cfg.suites == ["grounding"] and cfg.limit == 3
    assert cfg.grounding.data == Path("q.jsonl") and cfg.grounding.abstain_phrases == ["ask us"]
    assert cfg.reproducibility.prompts == 2
    assert EvalConfig(target="x").suites == QUICK


def test_unknown_suite_is_refused_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"unknown suite 'grounding2' \(did you mean 'grounding'\?\)"):
        load_eval_config(None, {"target": "budwood-tiny", "suites": ["grounding2"]})


def test_bad_values_name_the_key():
    with pytest.raises(ConfigError, match="limit"):
        load_eval_config(None, {"target": "budwood-tiny", "limit": 0})
    with pytest.raises(ConfigError, match="precision"):
        load_eval_config(None, {"target": "budwood-tiny", "precision": "fp64"})
    with pytest.raises(ConfigError, match="target"):
        load_eval_config(None, {})


@pytest.mark.parametrize("key", ["grounding.dta", "limt", "reproducibility.prompt"])
def test_a_misspelt_key_is_an_error_not_silently_ignored(key):
    """`--set grounding.dta=mine.jsonl` must not evaluate the default data as if nothing were wrong
    (training's config refuses unknown keys the same way)."""
    with pytest.raises(ConfigError, match=key.split(".")[-1]):
        load_eval_config(None, {"target": "budwood-tiny", key: "3"})


def test_missing_or_invalid_config_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_eval_config(tmp_path / "gone.yaml", {})
    bad = tmp_path / "bad.yaml"
    bad.write_text("target: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_eval_config(bad, {})


def test_a_config_that_is_not_a_mapping_with_overrides(tmp_path):
    listed = tmp_path / "list.yaml"
    listed.write_text("- grounding\n- domain\n")
    with pytest.raises(ConfigError, match="list.yaml"):
        load_eval_config(listed, {"target": "budwood-tiny"})


def test_a_config_path_that_is_a_directory(tmp_path):
    with pytest.raises(ConfigError, match=str(tmp_path)):
        load_eval_config(tmp_path, {"target": "budwood-tiny"})
