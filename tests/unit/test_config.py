import pytest

from budwood.config import load_config
from budwood.errors import ConfigError


def _yaml(tmp_path, text):
    (tmp_path / "train.jsonl").write_text("")
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_loads_yaml_and_applies_overrides(tmp_path):
    p = _yaml(tmp_path, "base_model: budwood-tiny\ndata:\n  train: data/train.jsonl\nlora:\n  r: 4\n")
    cfg = load_config(p, ["training.max_steps=20", "lora.target_modules=[q_proj, v_proj]"])
    assert str(cfg.data.train) == "data/train.jsonl"
    assert cfg.training.max_steps == 20 and cfg.lora.r == 4
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert len(cfg.config_hash()) == 16
    assert cfg.config_hash() != load_config(p, ["training.max_steps=21"]).config_hash()


@pytest.mark.parametrize("text, expected", [
    ("data:\n  train: t.jsonl\ntraning:\n  epochs: 1\n", "unknown key 'traning' (did you mean 'training'?)"),
    ("data:\n  train: t.jsonl\nlora:\n  rank: 8\n", "unknown key 'lora.rank'"),
    ("data:\n  train: t.jsonl\ntraining:\n  learning_rat: 1e-4\n",
     "unknown key 'training.learning_rat' (did you mean 'learning_rate'?)"),
    ("data:\n  trian: t.jsonl\n", "unknown key 'data.trian' (did you mean 'train'?)"),
    ("data:\n  format: alpaca\n", "give data.train (one file) or data.sources (several, with weights), one of them"),
    ("lora:\n  r: 4\n", "missing required key 'data'"),
    ("data:\n  train: t.jsonl\nlora:\n  r: 0\n", "lora.r: Input should be greater than or equal to 1"),
    ("data:\n  train: t.jsonl\ntraining:\n  precision: fp16\n", "training.precision"),
    ("data:\n  train: t.jsonl\n  validation: v.jsonl\n  validation_split: 0.1\n", "not both"),
    ("- a\n- b\n", "expected a mapping"),
    ("data: [unclosed\n", "not valid YAML"),
])
def test_bad_configs_name_the_key(tmp_path, text, expected):
    with pytest.raises(ConfigError) as err:
        load_config(_yaml(tmp_path, text))
    assert expected in str(err.value)
    assert "c.yaml" in str(err.value)


def test_bad_override_and_missing_file(tmp_path):
    p = _yaml(tmp_path, "data:\n  train: t.jsonl\n")
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(p, ["training.max_steps"])
    with pytest.raises(ConfigError, match="unknown key 'training.max_step'"):
        load_config(p, ["training.max_step=3"])
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")


def test_set_values_are_checked_and_blamed_on_the_override(tmp_path):
    p = _yaml(tmp_path, "data:\n  train: t.jsonl\n")
    with pytest.raises(ConfigError, match=r"--set 'training.max_steps=\[1': the value is not valid YAML"):
        load_config(p, ["training.max_steps=[1"])
    with pytest.raises(ConfigError, match=r"^--set training.max_steps: training.max_steps: Input should be"):
        load_config(p, ["training.max_steps=abc"])
    with pytest.raises(ConfigError, match="training.device"):
        load_config(p, ["training.device=gpu"])
    with pytest.raises(ConfigError, match="did you mean 'alpaca'"):
        load_config(p, ["data.format=alpacca"])
    with pytest.raises(ConfigError, match="not a UTF-8 YAML file"):
        load_config(tmp_path)
    (tmp_path / "latin1.yaml").write_bytes(b"data:\n  train: caf\xe9.jsonl\n")
    with pytest.raises(ConfigError, match="not a UTF-8 YAML file"):
        load_config(tmp_path / "latin1.yaml")


def test_every_shipped_config_loads_and_the_service_one_sets_its_limits():
    """configs/*.yaml are what users copy: each must load as it is (a key renamed in code would break them)."""
    from pathlib import Path

    from budwood.jobs.service import load_service_config

    configs = Path(__file__).resolve().parents[2] / "configs"
    service = load_service_config(configs / "service.yaml")
    assert service.limits.max_body_bytes == 8 << 20 and service.quotas.upload_parts == 1000
    assert load_service_config(configs / "service.yaml", ["limits.max_n=8"]).limits.max_n == 8
    for path in sorted(configs.glob("*.yaml")):
        if path.name != "service.yaml":
            assert load_config(path).output_dir, path
