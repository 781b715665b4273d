"""A registry on another machine, through the server app's /v1/registry routes (API-key auth).

Same methods as LocalRegistry. Publishing uploads only the blobs the server lacks (HEAD first), each
checked by the server against its sha256, then commits the version; pulling checks every blob's
hash as it streams in.
"""
from __future__ import annotations

import hashlib
from pathlib import Path
from urllib.parse import quote

import httpx

from budwood.artifacts import AdapterDir
from budwood.hashing import CHUNK, sha256_file
from budwood.registry.local import materialize
from budwood.registry.names import NotFound, RegistryError, VersionExists, parse_ref
from budwood.registry.schemas import AdapterInfo, FileEntry, PublishRequest, VersionInfo, YankRequest


class RemoteRegistry:
    def __init__(self, url: str, api_key: str | None = None, timeout: float = 60.0):
        self.url = url.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(base_url=self.url + "/v1/registry", headers=headers, timeout=timeout)

    def close(self) -> None:
        self.http.close()

    def _call(self, method: str, path: str, **kwargs) -> httpx.Response:
        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.HTTPError as e:
            raise RegistryError(f"registry {self.url} cannot be reached: {e}") from None
        if response.status_code >= 400 and method != "HEAD":
            _raise(response, self.url)
        return response

    def publish(self, adapter_dir: str | Path, ref: str, license: str, terms: str | None = None,
                private: bool = False, publisher: str | None = None) -> VersionInfo:
        adapter = AdapterDir.open(adapter_dir)
        parsed = parse_ref(ref)
        names = adapter.published_files()
        for attempt in range(2):  # the server removes a blob it finds damaged on disk: upload it again, once
            files = []
            for name in names:
                path = adapter.path / name
                digest = sha256_file(path)
                if self._call("HEAD", f"/blobs/{digest}").status_code != 200:
                    with open(path, "rb") as f:
                        self._call("PUT", f"/blobs/{digest}", content=iter(lambda: f.read(CHUNK), b""),
                                   headers={"Content-Type": "application/octet-stream"})
                files.append(FileEntry(path=name, sha256=digest, size=path.stat().st_size))
            request = PublishRequest(id=parsed.id, version=parsed.version, license=license, terms=terms,
                                     private=private, publisher=publisher, files=files)
            try:
                body = self._call("POST", f"/adapters/{parsed.id}/versions", content=request.model_dump_json(),
                                  headers={"Content-Type": "application/json"}).json()
            except RegistryError as e:
                if e.code == "damaged_blob" and attempt == 0:
                    continue
                raise
            return VersionInfo.model_validate(body)

    def version_info(self, ref: str, include_private: bool = True) -> VersionInfo:
        parsed = parse_ref(ref)
        version = quote(parsed.version or "latest", safe="")
        return VersionInfo.model_validate(self._call("GET", f"/adapters/{parsed.id}/versions/{version}").json())

    def show(self, ref: str, include_private: bool = True) -> AdapterInfo:
        return AdapterInfo.model_validate(self._call("GET", f"/adapters/{parse_ref(ref).id}").json())

    def search(self, text: str | None = None, base: str | None = None, tag: str | None = None,
               license: str | None = None, where: list[str] | None = None,
               include_private: bool = True) -> list[VersionInfo]:
        params = [(k, v) for k, v in (("q", text), ("base", base), ("tag", tag), ("license", license)) if v]
        params += [("where", w) for w in where or []]
        data = self._call("GET", "/adapters", params=params).json()["data"]
        return [VersionInfo.model_validate(v) for v in data]

    def list(self, include_private: bool = True) -> list[VersionInfo]:
        return self.search()

    def yank(self, ref: str, reason: str | None = None, undo: bool = False) -> VersionInfo:
        parsed = parse_ref(ref, version_required=True)
        body = self._call("POST", f"/adapters/{parsed.id}/versions/{parsed.version}/yank",
                          content=YankRequest(reason=reason, undo=undo).model_dump_json(),
                          headers={"Content-Type": "application/json"}).json()
        return VersionInfo.model_validate(body)

    def pull(self, ref: str, out: str | Path | None = None, accept_license: bool = False,
             include_private: bool = True) -> tuple[VersionInfo, Path]:
        info = self.version_info(ref)
        return info, materialize(info, self._fetch, out, accept_license)

    def _fetch(self, digest: str, dest: Path) -> None:
        h = hashlib.sha256()
        try:
            with self.http.stream("GET", f"/blobs/{digest}") as response:
                if response.status_code >= 400:
                    response.read()
                    _raise(response, self.url)
                with open(dest, "wb") as f:
                    for chunk in response.iter_bytes(CHUNK):
                        h.update(chunk)
                        f.write(chunk)
        except httpx.HTTPError as e:
            raise RegistryError(f"registry {self.url}: download of blob {digest[:12]}… failed: {e}") from None
        if h.hexdigest() != digest:
            raise RegistryError(f"registry {self.url}: blob {digest[:12]}… arrived with another hash "
                                f"({h.hexdigest()[:12]}…); nothing was written")


def _raise(response: httpx.Response, url: str):
    try:
        error = response.json()["error"]
        message, code = error["message"], error.get("code")
    except (ValueError, KeyError, TypeError, AttributeError):
        message, code = response.text[:300] or response.reason_phrase, None
    kind = {404: NotFound, 409: VersionExists}.get(response.status_code, RegistryError)
    if response.status_code == 401:
        message += " (set BUDWOOD_API_KEY or pass --api-key)"
    raise kind(f"registry {url}: {message}", code=code if isinstance(code, str) else None)
