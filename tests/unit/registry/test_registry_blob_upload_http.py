"""PUT /v1/registry/blobs/{digest} when the disk fills while the body is spooled: the registry's `no_space`
(503), as the blob store says it, and no temporary file left behind."""
from __future__ import annotations

import errno
import hashlib
import tempfile

from fastapi.testclient import TestClient

from budwood.registry.local import LocalRegistry
from budwood.serve import create_app


def test_a_full_disk_while_spooling_a_blob_is_no_space_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    monkeypatch.setenv("BUDWOOD_HOME", str(tmp_path / "home"))
    registry = LocalRegistry(f"sqlite:///{tmp_path / 'r.db'}", tmp_path / "blobs")
    spools: list[tempfile.SpooledTemporaryFile] = []

    class FullDisk(tempfile.SpooledTemporaryFile):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            spools.append(self)

        def write(self, data):
            self.rollover()  # on disk, as a body past 16 MiB would be, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tempfile, "SpooledTemporaryFile", FullDisk)
    try:
        client = TestClient(create_app(api_key="k", registry=registry), raise_server_exceptions=False)
        body = b"weights"
        r = client.put(f"/v1/registry/blobs/{hashlib.sha256(body).hexdigest()}", content=body,
                       headers={"Authorization": "Bearer k"})
        assert r.status_code == 503, r.text
        assert r.json()["error"]["code"] == "no_space" and "no space left" in r.json()["error"]["message"]
        assert len(spools) == 1 and spools[0].closed  # the spooled file closed, and so removed
        assert list((tmp_path / "blobs" / "tmp").iterdir()) == []
        assert not registry.store.has(hashlib.sha256(body).hexdigest())
    finally:
        registry.close()
