"""The registry on SQLite and on PostgreSQL: publish, immutability, latest, yank, search, licences, privacy."""
import json
import os

import pytest
from conftest import copy_adapter
from sqlalchemy import text

from budwood.card.attest import create_key, sign
from budwood.errors import BudwoodError
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
    for wrong in (0, 1, 10**12):  # a size other than the stored blob's, named by the file
        lying = [f if f.path != "budwood.json" else FileEntry(path=f.path, sha256=f.sha256, size=wrong) for f in files]
        with pytest.raises(RegistryError, match=r"budwood\.json is [0-9,]+ bytes .*not the") as e:
            reg.commit(PublishRequest(id="acme/a", license="MIT", files=lying))
        assert e.value.code == "size_mismatch"
    assert [v.version for v in reg.show("acme/a").versions] == ["1.0.0"]


def test_schema_is_managed_by_alembic(registry_location):
    reg = open_registry(registry_location)
    with reg.engine.connect() as c:
        assert c.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0004"  # the newest migration
    open_registry(registry_location)  # opening again is a no-op, not a second CREATE TABLE


# -- issue 17: what a publish or pull must refuse, and races ----------------------------------------------

def test_parallel_publishes_without_a_version_all_get_one(registry_location, adapter, monkeypatch):
    """8 publishes of one adapter at once, none naming a version: each gets its own (on PostgreSQL a
    publish used to lose after 3 collisions with "already published")."""
    import threading

    from budwood.registry.local import LocalRegistry

    reg = open_registry(registry_location)
    reg.publish(adapter, "acme/race", "MIT")
    request = reg.version_info("acme/race@1.0.0")
    files = request.files
    barrier, record = threading.Barrier(8), LocalRegistry._record

    def together(self, *args, **kwargs):  # every publish reads the versions at the same moment
        try:
            barrier.wait(timeout=2)
        except threading.BrokenBarrierError:
            pass
        return record(self, *args, **kwargs)

    monkeypatch.setattr(LocalRegistry, "_record", together)
    results, errors = [], []

    def publish():
        try:
            results.append(reg.commit(PublishRequest(id="acme/race", license="MIT", files=files)).version)
        except Exception as e:  # noqa: BLE001 - collected and asserted on below
            errors.append(e)

    threads = [threading.Thread(target=publish) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert errors == []
    assert sorted(results, key=lambda v: tuple(map(int, v.split(".")))) == [f"1.0.{i}" for i in range(1, 9)]


def test_build_metadata_does_not_make_another_version(registry_location, adapter):
    reg = open_registry(registry_location)
    reg.publish(adapter, "acme/one@1.0.0", "MIT")
    (adapter / "budwood.json").write_text(json.dumps({**json.loads((adapter / "budwood.json").read_text()),
                                                      "evil": True}))
    with pytest.raises(VersionExists, match=r"acme/one@1.0.0\+evil has the same precedence as the published "
                                            r"acme/one@1.0.0"):
        reg.publish(adapter, "acme/one@1.0.0+evil", "MIT")
    reg.publish(adapter, "acme/two@2.0.0+build.1", "MIT")
    with pytest.raises(VersionExists, match=r"same precedence as the published acme/two@2.0.0\+build.1"):
        reg.publish(adapter, "acme/two@2.0.0", "MIT")
    assert [v.version for v in reg.show("acme/one").versions] == ["1.0.0"]


def test_a_symlinked_or_special_file_is_refused_by_publish_and_pull(registry_location, adapter, tmp_path):
    reg = open_registry(registry_location)
    secret = tmp_path / "key.pem"
    secret.write_text("PRIVATE KEY")
    (adapter / "loss.png").symlink_to(secret)
    with pytest.raises(BudwoodError, match=r"loss.png: a symlink"):
        reg.publish(adapter, "acme/link", "MIT")
    (adapter / "loss.png").unlink()
    os.mkfifo(adapter / "metrics.jsonl")
    with pytest.raises(BudwoodError, match=r"metrics.jsonl: a fifo"):
        reg.publish(adapter, "acme/link", "MIT")
    (adapter / "metrics.jsonl").unlink()
    with pytest.raises(NotFound):
        reg.version_info("acme/link")
    reg.publish(adapter, "acme/link", "MIT")
    _, pulled = reg.pull("acme/link", tmp_path / "pulled")
    (pulled / "budwood.json").unlink()
    (pulled / "budwood.json").symlink_to(secret)  # a pulled folder whose file now points elsewhere
    with pytest.raises(RegistryError, match=r"budwood.json: a symlink"):
        reg.pull("acme/link", tmp_path / "pulled")


def test_a_nan_or_absurd_adapter_config_is_refused_at_publish(registry_location, adapter):
    reg = open_registry(registry_location)
    config = json.loads((adapter / "adapter_config.json").read_text())
    for value, fragment in (("NaN", "lora_alpha must be a finite number"), ("1e308", "lora_alpha must be a finite")):
        text = json.dumps({**config, "lora_alpha": 0}).replace('"lora_alpha": 0', f'"lora_alpha": {value}')
        (adapter / "adapter_config.json").write_text(text)
        with pytest.raises(BudwoodError, match=fragment):
            reg.publish(adapter, "acme/nan", "MIT")
    (adapter / "adapter_config.json").write_text(json.dumps(config).replace(f'"r": {config["r"]}', '"r": 1e999'))
    with pytest.raises(BudwoodError, match="r must be an integer rank"):
        reg.publish(adapter, "acme/nan", "MIT")


YAML_BOMB = "\n".join(["---", "license: mit", 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]',
                       *(f"{n}: &{n} [{','.join([f'*{p}'] * 9)}]" for p, n in zip("abcdefgh", "bcdefghi")),
                       "---", "# card"])


def test_a_yaml_alias_bomb_in_the_card_is_refused_before_it_expands(registry_location, adapter):
    assert len(YAML_BOMB) < 600
    (adapter / "README.md").write_text(YAML_BOMB)
    reg = open_registry(registry_location)
    with pytest.raises(RegistryError, match="README.md metadata: refused YAML: more than"):
        reg.publish(adapter, "acme/bomb", "MIT")
    (adapter / "README.md").write_text("---\nlicense: mit\nx: &x [1]\ny: &y [*y]\n---\n")
    with pytest.raises(RegistryError, match="recursive alias"):
        reg.publish(adapter, "acme/bomb", "MIT")


def test_a_blob_damaged_on_disk_is_repaired_by_publishing_the_same_bytes(registry_location, adapter, tmp_path):
    reg = open_registry(registry_location)
    info = reg.publish(adapter, "acme/rot", "MIT")
    weights = next(f for f in info.files if f.path == "adapter_model.safetensors")
    path = reg.store.path(weights.sha256)
    damaged = bytearray(path.read_bytes())
    damaged[100] ^= 1
    path.write_bytes(bytes(damaged))
    with pytest.raises(RegistryError, match="damaged"):
        reg.pull("acme/rot@1.0.0", tmp_path / "before")
    assert reg.publish(adapter, "acme/rot", "MIT").version == "1.0.1"
    for version in ("1.0.0", "1.0.1"):  # both versions pull again
        _, pulled = reg.pull(f"acme/rot@{version}", tmp_path / version)
        weights_file = "adapter_model.safetensors"
        assert (pulled / weights_file).read_bytes() == (adapter / weights_file).read_bytes()
    path.write_bytes(b"rot")  # a commit naming a damaged blob (a remote publish) removes it and says so
    with pytest.raises(RegistryError, match="damaged on disk and removed; publish again") as e:
        reg.commit(PublishRequest(id="acme/rot", license="MIT", files=info.files))
    assert e.value.code == "damaged_blob" and not reg.store.has(weights.sha256)


@pytest.mark.parametrize("bad", ["x<1.2.3", "x<1e999", "x<--1", "x<.", "x<" + "9" * 300, "x<1e", "x<nan"])
def test_a_malformed_where_is_a_registry_error_not_a_crash(registry_location, bad):
    with pytest.raises(RegistryError, match="bad metric condition") as e:
        open_registry(registry_location).search(where=[bad])
    assert e.value.param == "where"


def test_a_full_disk_during_pull_is_a_clear_error_and_leaves_no_partial_folder(registry_location, adapter, tmp_path,
                                                                                 monkeypatch):
    import errno

    reg = open_registry(registry_location)
    reg.publish(adapter, "acme/full", "MIT")
    copy_to, calls = reg.store.copy_to, []

    def full_after_one(digest, dest):
        calls.append(dest)
        copy_to(digest, dest)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(reg.store, "copy_to", full_after_one)
    with pytest.raises(RegistryError, match="no space left on the device"):
        reg.pull("acme/full", tmp_path / "pulls" / "full")
    assert list((tmp_path / "pulls").iterdir()) == []  # neither the folder nor its staging sibling


def test_a_pull_cleans_what_a_killed_pull_left(registry_location, adapter, tmp_path):
    import subprocess
    import sys

    from budwood.artifacts import _HOST

    reg = open_registry(registry_location)
    reg.publish(adapter, "acme/killed", "MIT")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()

    out = tmp_path / "pulls" / "1.0.0"
    left = out.parent / f".1.0.0.partial-{dead.pid}.{_HOST}-abc123"
    live = out.parent / f".1.0.0.partial-{os.getpid()}.{_HOST}-def456"  # another pull, still running
    for d in (left, live):
        d.mkdir(parents=True)
        (d / "adapter_model.safetensors").write_bytes(b"half")
    reg.pull("acme/killed", out)
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(["1.0.0", live.name])
