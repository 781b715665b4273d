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


def test_storing_the_same_bytes_again_repairs_a_damaged_blob(tmp_path):
    store = BlobStore(tmp_path / "blobs")
    (tmp_path / "f").write_bytes(b"abc" * 100)
    digest, _ = store.put_file(tmp_path / "f")
    store.path(digest).write_bytes(b"abd" * 100)  # bit rot, same size
    assert not store.intact(digest)
    assert store.put_file(tmp_path / "f") == (digest, 300)
    assert store.intact(digest) and store.path(digest).read_bytes() == b"abc" * 100
    store.path(digest).write_bytes(b"ab")  # truncated
    store.put_stream([b"abc" * 100], expected=digest)  # an upload of the same content repairs it too
    store.copy_to(digest, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == b"abc" * 100
    assert list((tmp_path / "blobs" / "tmp").iterdir()) == []


def test_a_full_disk_while_storing_or_copying_out_is_a_clear_error_and_leaves_nothing(tmp_path, monkeypatch):
    import errno
    import os

    import budwood.registry.store as store_module

    store = BlobStore(tmp_path / "blobs")
    (tmp_path / "f").write_bytes(b"abc" * 100)
    digest, _ = store.put_file(tmp_path / "f")
    real_fdopen = os.fdopen

    def full_fdopen(fd, *args, **kwargs):
        f = real_fdopen(fd, *args, **kwargs)
        f.write = lambda data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))
        return f

    monkeypatch.setattr(store_module.os, "fdopen", full_fdopen)
    (tmp_path / "g").write_bytes(b"other content")
    with pytest.raises(RegistryError, match="no space left on the device") as e:
        store.put_file(tmp_path / "g")
    assert e.value.code == "no_space"
    assert not store.has(hashlib.sha256(b"other content").hexdigest())
    assert list((tmp_path / "blobs" / "tmp").iterdir()) == []
    monkeypatch.undo()

    real_open = open

    def full_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        if "w" in mode:
            f.write = lambda data: (_ for _ in ()).throw(OSError(errno.ENOSPC, "No space left on device"))
        return f

    monkeypatch.setattr("builtins.open", full_open)
    with pytest.raises(RegistryError, match="no space left on the device"):
        store.copy_to(digest, tmp_path / "out")
    monkeypatch.undo()
    assert not (tmp_path / "out").exists()
