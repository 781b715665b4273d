"""The registry on SQLite and on PostgreSQL: publish, immutability, latest, yank, search, licences, privacy."""
import json

import pytest
from conftest import copy_adapter
from sqlalchemy import text

from budwood.card.attest import create_key, sign
from budwood.registry import open_registry
from budwood.registry.local import LicenseNotAccepted
from budwood.registry.names import NotFound, RegistryError, VersionExists
from budwood.registry.schemas import FileEntry, PublishRequest


@pytest.fixture
def adapter(evaluated_adapter, tmp_path, budwood_home):
    return copy_adapter(evaluated_adapter, tmp_path / "adapter")


def test_publish_pull_roundtrip_is_byte_identical(registry_location, adapter, tmp_path):
    reg = open_registry(registry_location)
    info = reg.publish(adapter, "acme/support", "apache-2.0")
    assert info.ref == "acme/support@1.0.0" and info.license == "Apache-2.0" and info.signer is None
    assert info.base_model == "budwood-tiny" and info.rank == 8
    adapted = json.loads((adapter / "eval" / "adapted.json").read_text())
    rate = adapted["suites"]["grounding"]["metrics"]["hallucination_rate"]["value"]
    assert info.metrics["grounding.hallucination_rate"] == rate  # the adapter's own results, not the base's
    _, path = reg.pull("acme/support", tmp_path / "pulled")
    for f in info.files:
        assert (path / f.path).read_bytes() == (adapter / f.path).read_bytes()
    assert {f.path for f in info.files} == {"adapter_config.json", "adapter_model.safetensors", "budwood.json",
                                            "eval/adapted.json", "eval/base.json"}


def test_versions_are_immutable_and_latest_skips_yanked_and_prereleases(registry_location, adapter):
    reg = open_registry(registry_location)
    assert reg.publish(adapter, "acme/s", "MIT").version == "1.0.0"
    assert reg.publish(adapter, "acme/s", "MIT").version == "1.0.1"
    with pytest.raises(VersionExists, match="already published"):
        reg.publish(adapter, "acme/s@1.0.0", "MIT")
    reg.publish(adapter, "acme/s@2.0.0-rc.1", "MIT")
    assert reg.version_info("acme/s").version == "1.0.1"  # a pre-release is not the latest release
    reg.yank("acme/s@1.0.1", reason="wrong answers")
    assert reg.version_info("acme/s").version == "1.0.0"
    yanked = reg.version_info("acme/s@1.0.1")  # an exact version is still there, marked
    assert yanked.yanked and yanked.yank_reason == "wrong answers"
    assert [v.ref for v in reg.search()] == ["acme/s@1.0.0"]
    reg.yank("acme/s@1.0.1", undo=True)
    assert reg.version_info("acme/s").version == "1.0.1"
    for v in ("1.0.0", "1.0.1"):
        reg.yank(f"acme/s@{v}")
    assert reg.version_info("acme/s").version == "2.0.0-rc.1"  # only a pre-release left
    reg.yank("acme/s@2.0.0-rc.1")
    with pytest.raises(NotFound, match="every version is yanked"):
        reg.version_info("acme/s")
    with pytest.raises(NotFound, match="no such version"):
        reg.version_info("acme/s@9.9.9")
    with pytest.raises(NotFound, match="no such adapter"):
        reg.version_info("acme/none")


def test_search_by_text_base_tag_licence_and_metrics(registry_location, adapter, evaluated_adapter):
    reg = open_registry(registry_location)
    reg.publish(adapter, "acme/support", "apache-2.0")
    reg.publish(adapter, "other/legal-helper", "MIT")
    rate = json.loads((adapter / "eval" / "adapted.json").read_text())["suites"]["grounding"]["metrics"][
        "hallucination_rate"]["value"]
    ids = lambda **kw: [v.id for v in reg.search(**kw)]  # noqa: E731
    assert ids(text="legal") == ["other/legal-helper"]
    assert ids(text="ACME") == ["acme/support"]
    assert ids(base="budwood-tiny") == ["acme/support", "other/legal-helper"]
    assert ids(base="someone/else") == []
    assert ids(license="mit") == ["other/legal-helper"]
    assert ids(where=[f"hallucination_rate<={rate}"]) == ["acme/support", "other/legal-helper"]
    assert ids(where=[f"grounding.hallucination_rate<{rate}"]) == []
    assert ids(where=[f"domain.hallucination_rate<={rate}"]) == []  # the metric belongs to another suite
    assert ids(where=[f"hallucination_rate<={rate}", "exact_match>2"]) == []
    assert ids(tag="no-such-tag") == []


def test_custom_terms_must_be_accepted(registry_location, adapter, tmp_path):
    reg = open_registry(registry_location)
    terms = "ACME COMMERCIAL LICENCE\nUse in production needs a paid subscription."
    reg.publish(adapter, "acme/pro", "LicenseRef-acme-commercial", terms=terms)
    with pytest.raises(LicenseNotAccepted, match="paid subscription") as e:
        reg.pull("acme/pro", tmp_path / "p")
    assert e.value.terms == terms and not (tmp_path / "p").exists()
    _, path = reg.pull("acme/pro", tmp_path / "p", accept_license=True)
    assert (path / "adapter_model.safetensors").exists()


def test_private_adapters_are_hidden_from_anonymous_reads(registry_location, adapter):
    reg = open_registry(registry_location)
    reg.publish(adapter, "acme/secret", "MIT", private=True)
    assert [v.id for v in reg.search()] == ["acme/secret"]
    assert reg.search(include_private=False) == []
    with pytest.raises(NotFound):
        reg.version_info("acme/secret", include_private=False)
    with pytest.raises(NotFound):
        reg.show("acme/secret", include_private=False)
    blob = reg.version_info("acme/secret").files[0].sha256
    assert reg.blob_visible(blob, True) and not reg.blob_visible(blob, False)
    with pytest.raises(RegistryError, match="is private"):
        reg.publish(adapter, "acme/secret", "MIT")


def test_signed_adapters_are_verified_at_publish(registry_location, adapter):
    reg = open_registry(registry_location)
    key_id, _ = create_key()
    sign(adapter)
    assert reg.publish(adapter, "acme/signed", "MIT").signer == key_id
    with open(adapter / "eval" / "adapted.json", "r+b") as f:  # a result "improved" after signing
        f.seek(30)
        byte = f.read(1)
        f.seek(30)
        f.write(bytes([byte[0] ^ 1]))
    with pytest.raises(RegistryError, match="does not verify.*eval/adapted.json"):
        reg.publish(adapter, "acme/signed", "MIT")
    assert [v.version for v in reg.show("acme/signed").versions] == ["1.0.0"]


def test_manifests_naming_odd_paths_or_missing_blobs_are_refused(registry_location, adapter):
    reg = open_registry(registry_location)
    info = reg.publish(adapter, "acme/a", "MIT")
    files = list(info.files)
    for path in ["../../outside.json", "checkpoints/x.safetensors", "eval/../../x.json", "adapter.bin"]:
        bad = files + [FileEntry(path=path, sha256=files[0].sha256, size=1)]
        with pytest.raises(RegistryError, match="not a file an adapter version may hold"):
            reg.commit(PublishRequest(id="acme/a", license="MIT", files=bad))
    missing = [f if f.path != "budwood.json" else FileEntry(path=f.path, sha256="ab" * 32, size=1) for f in files]
    with pytest.raises(RegistryError, match="was not uploaded"):
        reg.commit(PublishRequest(id="acme/a", license="MIT", files=missing))
    with pytest.raises(RegistryError, match="named twice"):
        reg.commit(PublishRequest(id="acme/a", license="MIT", files=files + files[:1]))
    assert [v.version for v in reg.show("acme/a").versions] == ["1.0.0"]


def test_schema_is_managed_by_alembic(registry_location):
    reg = open_registry(registry_location)
    with reg.engine.connect() as c:
        assert c.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0002"
    open_registry(registry_location)  # opening again is a no-op, not a second CREATE TABLE
