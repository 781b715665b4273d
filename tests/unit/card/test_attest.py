"""Attestations: an ed25519 signature over every file of an adapter, checked file by file, and the re-run
of its recorded evaluations.

One signed adapter (with a card, so README.md is covered too) is made per module and copied by each test
that changes it; only the two re-run tests load the tiny model.
"""
import base64
import hashlib
import json
import os
import re
import stat
from pathlib import Path

import pytest
from conftest import copy_adapter, make_random_adapter
from cryptography.hazmat.primitives import serialization

from budwood.card.attest import (
    Attestation,
    AttestationError,
    create_key,
    list_keys,
    load_key,
    rerun,
    sign,
    verify,
)
from budwood.card.render import CardInfo, render_card
from budwood.errors import BudwoodError

SIGNED_FILES = ["README.md", "adapter_config.json", "adapter_model.safetensors", "budwood.json", "eval/adapted.json",
                "eval/base.json"]


@pytest.fixture(scope="module")
def signed_template(evaluated_adapter, tmp_path_factory) -> tuple[Path, str, Path]:
    """(a carded, signed copy of the evaluated adapter, its signer's key id, that key's PEM file)."""
    root = tmp_path_factory.mktemp("signed")
    adapter = copy_adapter(evaluated_adapter, root / "adapter")
    render_card(adapter, CardInfo(name="acme/attested", license="mit"))
    key_id, pem = create_key("signer", folder=root / "keys")
    sign(adapter, str(pem))
    return adapter, key_id, pem


@pytest.fixture
def signed(signed_template, tmp_path) -> Path:
    return copy_adapter(signed_template[0], tmp_path / "adapter")


def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def edit_attestation(adapter: Path, **changes) -> None:
    path = adapter / "attestation.json"
    att = json.loads(path.read_text())
    att.update(changes)
    path.write_text(json.dumps(att))


# -- keys -------------------------------------------------------------------------------------------

def test_key_id_is_the_hash_of_the_public_key_and_the_private_key_is_mode_600(budwood_home):
    key_id, path = create_key()
    assert path == budwood_home / "keys" / "default.pem"
    assert re.fullmatch(r"ed25519:[0-9a-f]{16}", key_id)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert not path.with_suffix(".tmp").exists()
    # the id is derived from the published half, so anyone holding the .pub can check it
    public = serialization.load_ssh_public_key(path.with_suffix(".pub").read_bytes().split(b" budwood:")[0])
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    assert key_id == "ed25519:" + hashlib.sha256(raw).hexdigest()[:16]
    assert list_keys() == [("default", key_id)]
    assert b"ENCRYPTED" not in path.read_bytes()


def test_a_key_is_never_overwritten_without_force(budwood_home):
    key_id, path = create_key("team")
    before = path.read_bytes()
    with pytest.raises(AttestationError, match="never overwritten.*--force"):
        create_key("team")
    assert path.read_bytes() == before
    new_id, _ = create_key("team", force=True)
    assert new_id != key_id and path.read_bytes() != before
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    with pytest.raises(AttestationError, match="bad key name"):
        create_key("../escape")


def test_a_passphrase_encrypts_the_key_and_is_needed_to_sign(budwood_home, signed, monkeypatch):
    monkeypatch.setenv("BUDWOOD_KEY_PASSPHRASE", "correct horse")
    key_id, path = create_key("locked")
    assert b"ENCRYPTED PRIVATE KEY" in path.read_bytes()
    sign(signed, "locked")
    assert verify(signed, {key_id}).ok
    monkeypatch.delenv("BUDWOOD_KEY_PASSPHRASE")
    with pytest.raises(AttestationError, match="cannot read the key.*BUDWOOD_KEY_PASSPHRASE"):
        load_key("locked")
    with pytest.raises(AttestationError, match="BUDWOOD_KEY_PASSPHRASE"):
        sign(signed, "locked")
    monkeypatch.setenv("BUDWOOD_KEY_PASSPHRASE", "wrong horse")
    with pytest.raises(AttestationError, match="BUDWOOD_KEY_PASSPHRASE"):
        load_key("locked")
    with pytest.raises(AttestationError, match="no signing key 'nobody'.*budwood keys create nobody"):
        load_key("nobody")


# -- sign and verify ------------------------------------------------------------------------------------

def test_sign_then_verify(signed_template):
    adapter, key_id, _ = signed_template
    att = Attestation.model_validate_json((adapter / "attestation.json").read_text())
    assert sorted(att.files) == SIGNED_FILES  # every artefact file, so the parametrised tests below cover them all
    for name, digest in att.files.items():
        assert digest == hashlib.sha256((adapter / name).read_bytes()).hexdigest()
    assert att.key_id == key_id and att.base_model == "budwood-tiny"
    assert att.base_fingerprint == json.loads((adapter / "budwood.json").read_text())["base_model"]["fingerprint"]
    check = verify(adapter)
    assert check.ok and check.problems == [] and check.unsigned == []
    assert check.key_id == key_id and check.files == len(SIGNED_FILES)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", check.signed_at)


@pytest.mark.parametrize("name", SIGNED_FILES)
def test_one_flipped_byte_in_any_signed_file_is_reported(signed, name):
    flip_byte(signed / name)
    check = verify(signed)
    assert not check.ok
    assert check.problems == [f"{name}: changed since it was signed (sha256 differs)"]
    assert check.unsigned == []


@pytest.mark.parametrize("name", ["README.md", "budwood.json", "eval/base.json"])
def test_a_deleted_file_is_reported_missing(signed, name):
    (signed / name).unlink()
    check = verify(signed)
    assert not check.ok and check.problems == [f"{name}: signed but missing"]


def test_files_added_after_signing_are_unsigned_but_local_clutter_is_ignored(signed):
    (signed / "eval" / "new.json").write_text("{}")
    (signed / "notes.txt").write_text("not part of the artefact")
    (signed / "checkpoints").mkdir()
    (signed / "checkpoints" / "step-10.safetensors").write_bytes(b"x")
    check = verify(signed)
    assert check.problems == [] and check.unsigned == ["eval/new.json"] and not check.ok
    (signed / "eval" / "new.json").unlink()
    assert verify(signed).ok


def _other_public_key(tmp_path: Path) -> str:
    _, pem = create_key("other", folder=tmp_path / "other-keys")
    public = load_key(str(pem)).public_key()
    return base64.b64encode(public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)).decode()


@pytest.mark.parametrize("tamper", ["file_hash", "dropped_file", "key_id", "public_key", "signature_not_base64",
                                    "signature_truncated", "signature_empty", "public_key_garbage", "signed_at",
                                    "adapter_fingerprint"])
def test_a_tampered_attestation_is_detected(signed, tmp_path, tamper):
    att = json.loads((signed / "attestation.json").read_text())
    files = dict(att["files"])
    changes = {
        "file_hash": lambda: {"files": {**files, "eval/adapted.json": "0" * 64}},
        "dropped_file": lambda: {"files": {k: v for k, v in files.items() if k != "eval/base.json"}},
        "key_id": lambda: {"key_id": "ed25519:" + "0" * 16},
        "public_key": lambda: {"public_key": _other_public_key(tmp_path)},
        "signature_not_base64": lambda: {"signature": "@@ not base64 @@"},
        "signature_truncated": lambda: {"signature": base64.b64encode(base64.b64decode(att["signature"])[:40])
                                        .decode()},
        "signature_empty": lambda: {"signature": ""},
        "public_key_garbage": lambda: {"public_key": base64.b64encode(b"short").decode()},
        "signed_at": lambda: {"signed_at": "2020-01-01T00:00:00Z"},
        "adapter_fingerprint": lambda: {"adapter_fingerprint": "f" * 64},
    }[tamper]()
    edit_attestation(signed, **changes)
    check = verify(signed)
    assert not check.ok and check.problems, check


def test_an_attestation_re_signed_by_another_key_cannot_claim_the_first_keys_id(signed_template, signed, tmp_path):
    """The forger signs a valid attestation with their own key but names the real signer's id."""
    _, real_id, _ = signed_template
    _, pem = create_key("forger", folder=tmp_path / "forger")
    forger = load_key(str(pem))
    att = Attestation.model_validate_json((signed / "attestation.json").read_text())
    att.key_id = real_id
    att.public_key = base64.b64encode(forger.public_key().public_bytes(serialization.Encoding.Raw,
                                                                       serialization.PublicFormat.Raw)).decode()
    att.signature = base64.b64encode(forger.sign(att.payload())).decode()
    (signed / "attestation.json").write_text(att.model_dump_json())
    for trusted in (None, {real_id}):
        check = verify(signed, trusted)
        assert not check.ok
        assert any("does not belong to the public key" in p for p in check.problems), check.problems


@pytest.mark.parametrize("content", ["not json at all", "[]", '{"key_id": 3}'])
def test_an_unreadable_attestation_is_a_clear_error(signed, content):
    (signed / "attestation.json").write_text(content)
    with pytest.raises(AttestationError, match="not a budwood attestation"):
        verify(signed)


def test_unsigned_adapter_is_a_clear_error(evaluated_adapter):
    with pytest.raises(AttestationError, match="not signed.*budwood sign"):
        verify(evaluated_adapter)


def test_trusted_keys_pin_the_signer(signed_template, tmp_path):
    adapter, key_id, _ = signed_template
    other_id, _ = create_key("stranger", folder=tmp_path / "keys")
    check = verify(adapter, {other_id})
    assert not check.ok
    assert check.problems == [f"signed by {key_id}, which is not among the trusted keys {[other_id]}"]
    assert verify(adapter, {other_id, key_id}).ok
    assert verify(adapter, {key_id}).ok


def test_signing_writes_no_temporary_files_and_re_signing_covers_new_files(signed, signed_template):
    _, _, pem = signed_template
    (signed / "eval" / "extra.json").write_text("{}")
    sign(signed, str(pem))
    assert sorted(os.listdir(signed)) == ["README.md", "adapter_config.json", "adapter_model.safetensors",
                                          "attestation.json", "budwood.json", "eval"]
    check = verify(signed)
    assert check.ok and check.files == len(SIGNED_FILES) + 1


# -- rerun --------------------------------------------------------------------------------------------

def test_rerun_reproduces_every_recorded_number(evaluated_adapter, tmp_path):
    adapter = copy_adapter(evaluated_adapter, tmp_path / "adapter")
    result = rerun(adapter)
    recorded = {f"eval/{side}.json": json.loads((adapter / "eval" / f"{side}.json").read_text())
                for side in ("adapted", "base")}
    expected = {(f, s, m) for f, res in recorded.items() for s, sr in res["suites"].items() for m in sr["metrics"]}
    assert {(r.file, r.suite, r.metric) for r in result.rows} == expected and expected
    assert all(r.same for r in result.rows), [r for r in result.rows if not r.same]
    assert result.ok and result.notes == []


def test_rerun_reports_an_edited_number(evaluated_adapter, tmp_path):
    adapter = copy_adapter(evaluated_adapter, tmp_path / "adapter")
    (adapter / "eval" / "base.json").unlink()  # one file is enough here
    path = adapter / "eval" / "adapted.json"
    results = json.loads(path.read_text())
    metric = results["suites"]["domain"]["metrics"]["token_f1"]
    original = metric["value"]
    metric["value"] = original + 0.25
    path.write_text(json.dumps(results))
    result = rerun(adapter)
    changed = [r for r in result.rows if not r.same]
    assert [(r.file, r.suite, r.metric, r.recorded, r.now) for r in changed] == [
        ("eval/adapted.json", "domain", "token_f1", original + 0.25, original)]
    assert len(result.rows) > 1 and not result.ok


def test_rerun_repeats_a_baseline_adapter_while_its_weights_are_there(evaluated_adapter, tmp_path):
    """eval/baseline-LABEL.json (another adapter, the card's comparison column) is re-run from the folder it
    names, checked by fingerprint; where that folder is gone or holds other weights it is a note, not a pass."""
    from budwood.eval.results import load_results, write_results
    from budwood.eval.run import EvalConfig, run_eval

    adapter = copy_adapter(evaluated_adapter, tmp_path / "adapter")
    (adapter / "eval" / "base.json").unlink()  # the base's re-run is tested above
    plain = make_random_adapter(tmp_path / "plain", seed=11, r=8)
    recorded = load_results(adapter / "eval" / "adapted.json").config
    write_results(run_eval(EvalConfig.model_validate({**recorded, "suites": ["grounding"],
                                                      "target": f"budwood-tiny+{plain}"})),
                  adapter / "eval" / "baseline-plain.json")
    result = rerun(adapter)
    again = [r for r in result.rows if r.file == "eval/baseline-plain.json"]
    assert {r.metric for r in again} >= {"hallucination_rate", "answerable_correct", "unanswerable_abstained"}
    assert all(r.same for r in again) and result.ok and result.notes == []
    make_random_adapter(tmp_path / "other", seed=12, r=8)
    (plain / "adapter_model.safetensors").write_bytes((tmp_path / "other" / "adapter_model.safetensors").read_bytes())
    (adapter / "eval" / "adapted.json").unlink()
    result = rerun(adapter)
    assert result.rows == [] and not result.ok
    assert result.notes == [f"eval/baseline-plain.json: the adapter at {plain} is no longer the baseline that was "
                            "measured (other weights); not re-run"]


# -- issue 17: what a signature covers, and what an attestation may name ----------------------------------

@pytest.mark.parametrize("name", ["chat_template.jinja", "tokenizer_config.json"])
def test_a_template_or_tokenizer_file_added_or_edited_after_signing_fails_verify(signed, signed_template, name):
    (signed / name).write_text("{{ 'a template added after signing' }}")
    check = verify(signed)
    assert check.unsigned == [name] and not check.ok
    sign(signed, str(signed_template[2]))
    assert verify(signed).ok and name in json.loads((signed / "attestation.json").read_text())["files"]
    (signed / name).write_text("{{ 'edited' }}")
    assert verify(signed).problems == [f"{name}: changed since it was signed (sha256 differs)"]


def test_sign_refuses_a_symlinked_file_by_name(signed, signed_template, tmp_path):
    (signed / "loss.png").symlink_to(signed_template[2])  # the signing key's PEM
    with pytest.raises(BudwoodError, match=r"loss.png: a symlink"):
        sign(signed, str(signed_template[2]))
    with pytest.raises(BudwoodError, match=r"loss.png: a symlink"):
        verify(signed)


@pytest.mark.parametrize("outside", ["../../etc/passwd", "/etc/passwd", "eval/../../../etc/hostname",
                                     "..\\..\\x", "README.md\0.png"])
def test_an_attestation_naming_a_path_outside_the_adapter_is_refused_without_reading_it(signed, signed_template,
                                                                                        outside, monkeypatch):
    att = Attestation.model_validate_json((signed / "attestation.json").read_text())
    att.files[outside] = "0" * 64
    private = load_key(str(signed_template[2]))
    att.signature = base64.b64encode(private.sign(att.payload())).decode()
    (signed / "attestation.json").write_text(att.model_dump_json())
    looked = []
    import budwood.card.attest as attest_module

    real = attest_module._sha256
    monkeypatch.setattr(attest_module, "_sha256", lambda p: looked.append(p) or real(p))
    check = verify(signed)
    assert not check.ok and check.problems == [f"{outside!r}: not a file inside the adapter; an attestation may name "
                                               "only the adapter's own files"]
    assert looked == []  # no file was hashed, so nothing tells whether the outside file exists or matches
