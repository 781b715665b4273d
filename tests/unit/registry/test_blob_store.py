"""Content-addressed blobs: stored once, complete or not at all, checked on the way out."""
import hashlib

import pytest

from budwood.registry.names import NotFound, RegistryError
from budwood.registry.store import BlobStore


def test_identical_content_is_stored_once(tmp_path):
    store = BlobStore(tmp_path / "blobs")
    (tmp_path / "a").write_bytes(b"weights" * 1000)
    (tmp_path / "b").write_bytes(b"weights" * 1000)
    d1, size = store.put_file(tmp_path / "a")
    d2, _ = store.put_file(tmp_path / "b")
    assert d1 == d2 == hashlib.sha256(b"weights" * 1000).hexdigest() and size == 7000
    assert len(list((tmp_path / "blobs" / "sha256").rglob("*"))) == 2  # one folder, one blob
    assert list((tmp_path / "blobs" / "tmp").iterdir()) == []


def test_content_that_does_not_match_its_id_is_refused_and_not_kept(tmp_path):
    store = BlobStore(tmp_path / "blobs")
    claimed = hashlib.sha256(b"the real file").hexdigest()
    with pytest.raises(RegistryError, match="does not match its id"):
        store.put_stream([b"the real f", b"ILE"], expected=claimed)
    assert not store.has(claimed)
    assert list((tmp_path / "blobs" / "tmp").iterdir()) == []


def test_a_damaged_blob_is_never_handed_on(tmp_path):
    store = BlobStore(tmp_path / "blobs")
    (tmp_path / "f").write_bytes(b"abc" * 100)
    digest, _ = store.put_file(tmp_path / "f")
    store.path(digest).write_bytes(b"abd" * 100)  # bit rot
    with pytest.raises(RegistryError, match="damaged"):
        store.copy_to(digest, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(NotFound):
        list(store.read("0" * 64))


@pytest.mark.parametrize("bad", ["../../etc/passwd", "ABC", "0" * 63, "g" * 64])
def test_blob_ids_are_checked(tmp_path, bad):
    with pytest.raises(RegistryError, match="bad blob id"):
        BlobStore(tmp_path).path(bad)
