"""What an adapter folder may hold (issue 17): regular files only, a sane adapter_config.json, its template
and tokenizer files in its fingerprint, and staging folders a killed process left behind cleaned up."""
import json
import math
import os
import subprocess
import sys
import time

import pytest

from budwood.artifacts import (
    STALE_PARTIAL_S,
    AdapterDir,
    check_adapter_config,
    clean_stale_partials,
    confined_path,
    read_adapter_config,
    staged_dir,
)
from budwood.errors import BudwoodError
from budwood.models.fingerprint import adapter_fingerprint


def _adapter(path, config: dict | None = None):
    path.mkdir(parents=True, exist_ok=True)
    (path / "adapter_config.json").write_text(json.dumps(config or {"r": 8, "lora_alpha": 16}))
    (path / "adapter_model.safetensors").write_bytes(b"weights")
    return path


@pytest.mark.parametrize("name", ["loss.png", "metrics.jsonl", "README.md", "eval/x.json", "chat_template.jinja",
                                  "adapter_model.safetensors"])
def test_a_symlinked_artefact_file_is_refused_by_name(tmp_path, name):
    adapter = _adapter(tmp_path / "a")
    secret = tmp_path / "signing-key.pem"
    secret.write_text("PRIVATE KEY")
    (adapter / name).parent.mkdir(exist_ok=True)
    (adapter / name).unlink(missing_ok=True)
    (adapter / name).symlink_to(secret)
    with pytest.raises(BudwoodError, match=rf"{name}: a symlink .*signing-key.pem"):
        AdapterDir.open(adapter).files()


def test_a_fifo_or_a_symlinked_eval_folder_is_refused_and_nothing_blocks(tmp_path):
    adapter = _adapter(tmp_path / "a")
    os.mkfifo(adapter / "metrics.jsonl")
    with pytest.raises(BudwoodError, match=r"metrics.jsonl: a fifo, not a regular file"):
        AdapterDir.open(adapter).files()
    (adapter / "metrics.jsonl").unlink()
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "x.json").write_text("{}")
    (adapter / "eval").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(BudwoodError, match=r"eval: a symlink or not a folder"):
        AdapterDir.open(adapter).files()
    (adapter / "eval").unlink()
    (adapter / "notes.txt").symlink_to(tmp_path / "elsewhere" / "x.json")  # local clutter stays allowed
    assert AdapterDir.open(adapter).files() == ["adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize(("config", "fragment"), [
    ({"r": 8, "lora_alpha": math.nan}, "lora_alpha must be a finite number"),
    ({"r": 8, "lora_alpha": 1e308}, "lora_alpha must be a finite number"),
    ({"r": 8, "lora_alpha": math.inf}, "lora_alpha must be a finite number"),
    ({"r": 1e999}, "r must be an integer rank"),
    ({"r": 0}, "r must be an integer rank"),
    ({"r": 8.5}, "r must be an integer rank"),
    ({"r": True}, "r must be an integer rank"),
    ({"r": "8"}, "r must be an integer rank"),
    ({"r": 8, "rank_pattern": {"q_proj": 10**9}}, r"rank_pattern\['q_proj'\] must be an integer rank"),
    ({"r": 8, "alpha_pattern": {"q_proj": math.nan}}, r"alpha_pattern\['q_proj'\] must be a finite"),
    ({"r": 8, "lora_dropout": 1.5}, "lora_dropout must be a number in"),
])
def test_absurd_ranks_and_scales_in_adapter_config_are_refused(tmp_path, config, fragment):
    adapter = tmp_path / "a"
    adapter.mkdir()
    # json.dumps writes NaN / Infinity, which json.loads (and peft) accept: exactly what a hostile file holds
    (adapter / "adapter_config.json").write_text(json.dumps(config).replace("1e+999", "1e999"))
    (adapter / "adapter_model.safetensors").write_bytes(b"w")
    with pytest.raises(BudwoodError, match=fragment):
        AdapterDir.open(adapter)
    with pytest.raises(BudwoodError, match=fragment):
        read_adapter_config(adapter / "adapter_config.json")


def test_adapter_config_as_written_by_1e999_text_and_deep_nesting_is_refused(tmp_path):
    path = tmp_path / "adapter_config.json"
    path.write_text('{"r": 1e999, "lora_alpha": 16}')
    with pytest.raises(BudwoodError, match="r must be an integer rank from 1 to 65536, got inf"):
        read_adapter_config(path)
    path.write_text('{"x": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(BudwoodError, match="nested too deeply|not valid JSON"):
        read_adapter_config(path)
    assert check_adapter_config({"r": 16, "lora_alpha": 32.0, "rank_pattern": {"q": 4}}, "x")["r"] == 16


def test_template_and_tokenizer_files_are_artefact_files_and_in_the_fingerprint(tmp_path):
    adapter = _adapter(tmp_path / "a")
    before = adapter_fingerprint(adapter)
    (adapter / "chat_template.jinja").write_text("{{ messages }}")
    with_template = adapter_fingerprint(adapter)
    assert with_template != before
    (adapter / "chat_template.jinja").write_text("{{ messages }} edited")
    assert adapter_fingerprint(adapter) not in (before, with_template)
    (adapter / "tokenizer_config.json").write_text("{}")
    assert AdapterDir.open(adapter).files() == ["adapter_config.json", "adapter_model.safetensors",
                                                "chat_template.jinja", "tokenizer_config.json"]
    (adapter / "chat_template.jinja").unlink()
    (adapter / "tokenizer_config.json").unlink()
    assert adapter_fingerprint(adapter) == before  # adapters without them keep the fingerprint they had


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "eval/../../x.json", "eval\\x.json",
                                  "README.md\0", "", "./README.md", "eval//x.json", "notes.txt"])
def test_paths_outside_the_adapter_are_not_confined(name):
    assert not confined_path(name)


def test_confined_paths():
    assert all(map(confined_path, ["README.md", "eval/base.json", "chat_template.jinja", "attestation.json"]))


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_staging_removes_what_a_killed_process_left_but_not_a_live_ones(tmp_path):
    dest = tmp_path / "adapters" / "acme" / "x" / "1.0.0"
    with staged_dir(dest) as tmp:  # the name carries this process's id and host
        live_name = tmp.name
        (tmp / "f").write_text("x")
    prefix = live_name.rsplit("-", 1)[0]  # .1.0.0.partial-PID.HOST
    live = dest.parent / f"{prefix}-live"
    dead = dest.parent / (prefix.replace(f"-{os.getpid()}.", f"-{_dead_pid()}.") + "-dead")
    old = dest.parent / ".1.0.0.partial-abcdef"  # before names carried a pid: removed once old
    fresh_unknown = dest.parent / ".1.0.0.partial-ghijkl"
    other = dest.parent / ".2.0.0.partial-xyz"
    for d in (live, dead, old, fresh_unknown, other):
        d.mkdir()
        (d / "half").write_bytes(b"x" * 10)
    os.utime(old, (time.time() - STALE_PARTIAL_S - 60,) * 2)
    os.utime(other, (time.time() - STALE_PARTIAL_S - 60,) * 2)
    removed = clean_stale_partials(dest)
    assert sorted(p.name for p in removed) == sorted([dead.name, old.name])
    assert live.exists() and fresh_unknown.exists() and other.exists() and not dead.exists() and not old.exists()
