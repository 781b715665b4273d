"""The registry end to end: real processes racing and dying mid-publish (SQLite and PostgreSQL), the HTTP
registry and registry ids served over loopback, the CLI as a user runs it, and publish-time checks.

One server (fp32 engine, API key, a folder registry) is shared by the module; tests that need it publish
under their own ids. CLI commands that do not depend on each other run as parallel processes.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import yaml
from conftest import copy_adapter, make_random_adapter, running
from safetensors.torch import load_file, save_file

from budwood.artifacts import AdapterDir
from budwood.card.attest import create_key, sign, verify
from budwood.card.render import CardInfo, render_card
from budwood.engine import Engine, EngineConfig
from budwood.hashing import sha256_file
from budwood.models.fingerprint import model_fingerprint
from budwood.registry import open_registry, publish
from budwood.registry.local import LocalRegistry
from budwood.registry.names import NotFound, RegistryError, VersionExists
from budwood.registry.remote import RemoteRegistry
from budwood.serve.app import create_app

KEY = "sk-registry-test"
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "budwood.json", "eval/adapted.json",
                 "eval/base.json"]


def start_child(script: str, *args: str | Path, home: Path, stderr: Path) -> subprocess.Popen:
    """`python -c SCRIPT ARGS` with the test's BUDWOOD_HOME; stdout piped (READY, results), stderr to a file."""
    with stderr.open("wb") as err:
        return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdout=subprocess.PIPE,
                                stderr=err, env={**os.environ, "BUDWOOD_HOME": str(home)})


def wait_for_ready(proc: subprocess.Popen, stderr: Path, timeout: float = 120) -> bytes:
    """Read the child's stdout until it prints READY (it is then paused where the test wants it)."""
    seen, deadline, fd = b"", time.monotonic() + timeout, proc.stdout.fileno()
    while b"READY\n" not in seen:
        left = deadline - time.monotonic()
        assert left > 0, f"child not ready after {timeout}s: {seen!r}"
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 4096)
            assert chunk, f"child exited before READY: {seen!r}\n{stderr.read_text()[-3000:]}"
            seen += chunk
    return seen


def assert_blobs_are_whole(registry) -> None:
    """Every blob under its final name holds exactly the bytes its name promises."""
    for blob in (registry.store.root / "sha256").rglob("*"):
        if blob.is_file():
            assert sha256_file(blob) == blob.name, f"{blob} is damaged"


def assert_same_files(pulled: Path, source: Path, names: list[str]) -> None:
    for name in names:
        assert (pulled / name).read_bytes() == (source / name).read_bytes(), name


# -- races and crashes ------------------------------------------------------------------------------------

RACE = """
import sys, time
from pathlib import Path
from budwood.registry import open_registry
import budwood.eval.results  # publish imports it; loaded first, both children reach the database together
location, adapter, go = sys.argv[1:4]
registry = open_registry(location)
print("READY", flush=True)
while not Path(go).exists():
    time.sleep(0.001)
try:
    print("OK", registry.publish(adapter, "acme/race@1.0.0", "MIT").ref, flush=True)
except Exception as e:
    print("ERROR", type(e).__name__, e, flush=True)
"""


def test_two_processes_publishing_one_version_exactly_one_wins(registry_location, evaluated_adapter, tmp_path,
                                                              budwood_home):
    children = [start_child(RACE, registry_location, evaluated_adapter, tmp_path / "go", home=budwood_home,
                            stderr=tmp_path / f"err{i}") for i in range(2)]
    outputs = [wait_for_ready(p, tmp_path / f"err{i}") for i, p in enumerate(children)]
    (tmp_path / "go").touch()
    for i, p in enumerate(children):
        out, _ = p.communicate(timeout=120)
        outputs[i] = (outputs[i] + out).decode()
    wins = [o for o in outputs if "OK acme/race@1.0.0" in o]
    losses = [o for o in outputs if "ERROR VersionExists" in o and "already published" in o]
    assert len(wins) == 1 and len(losses) == 1, outputs
    registry = open_registry(registry_location)
    versions = registry.show("acme/race").versions
    assert [v.version for v in versions] == ["1.0.0"]
    assert sorted(f.path for f in versions[0].files) == ADAPTER_FILES
    assert all(registry.store.has(f.sha256) for f in versions[0].files)
    assert_blobs_are_whole(registry)
    _, pulled = registry.pull("acme/race@1.0.0", tmp_path / "pulled")
    assert_same_files(pulled, evaluated_adapter, ADAPTER_FILES)


KILLED = """
import sys, time
from pathlib import Path
from budwood.registry import open_registry
location, adapter, where = sys.argv[1:4]

def pause():
    print("READY", flush=True)
    time.sleep(600)

if where == "storing blobs":
    from budwood.registry.store import BlobStore
    put_file, calls = BlobStore.put_file, []

    def paused_put_file(self, source):
        calls.append(source)
        if len(calls) < 2:
            return put_file(self, source)

        def chunks():  # half of the second file reaches the store's temporary file, then the kill
            data = Path(source).read_bytes()
            yield data[: len(data) // 2]
            pause()
        return self.put_stream(chunks())
    BlobStore.put_file = paused_put_file
else:
    from sqlalchemy.orm import Session
    from budwood.registry import models as m
    flush = Session.flush

    def paused_flush(self, *args, **kwargs):
        flush(self, *args, **kwargs)
        if any(isinstance(row, m.Version) for row in self.identity_map.values()):
            pause()  # the version's rows are written inside the transaction, not committed
    Session.flush = paused_flush
open_registry(location).publish(adapter, "acme/killed@1.0.0", "MIT")
print("FINISHED", flush=True)
"""


@pytest.mark.parametrize("where", ["storing blobs", "inside the transaction"])
def test_a_publish_killed_midway_leaves_nothing_half_done(registry_location, evaluated_adapter, tmp_path, where,
                                                          budwood_home):
    child = start_child(KILLED, registry_location, evaluated_adapter, where, home=budwood_home,
                        stderr=tmp_path / "err")
    try:
        wait_for_ready(child, tmp_path / "err")
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    registry = open_registry(registry_location)
    with pytest.raises(NotFound):
        registry.version_info("acme/killed@1.0.0")
    with pytest.raises(NotFound):
        registry.show("acme/killed")
    assert registry.search() == []
    assert_blobs_are_whole(registry)
    weights = sha256_file(evaluated_adapter / "adapter_model.safetensors")
    if where == "storing blobs":
        assert not registry.store.has(weights)  # killed half-way through it: never under its final name
    info = registry.publish(evaluated_adapter, "acme/killed@1.0.0", "MIT")
    assert info.version == "1.0.0" and [v.ref for v in registry.search()] == ["acme/killed@1.0.0"]
    _, pulled = registry.pull("acme/killed@1.0.0", tmp_path / "pulled")
    assert_same_files(pulled, evaluated_adapter, ADAPTER_FILES)


WRITER = """
import sys, time
from budwood.registry import open_registry
from budwood.registry.names import parse_ref
registry = open_registry(sys.argv[1])
with registry.writes.begin() as s:  # a publish's transaction (write lock taken), held open
    registry._adapter_row(s, parse_ref("acme/slow"), False)
    s.flush()
    print("READY", flush=True)
    time.sleep(600)
"""


def test_readers_do_not_wait_for_a_writer_inside_its_transaction(registry_location, tmp_path, budwood_home):
    """db.py promises WAL "so readers never block": rows not yet committed are invisible, not a lock on reads."""
    open_registry(registry_location).close()  # the schema exists before the writer starts
    child = start_child(WRITER, registry_location, home=budwood_home, stderr=tmp_path / "err")
    found: list = []
    reader = threading.Thread(target=lambda: found.append(open_registry(registry_location).search()), daemon=True)
    try:
        wait_for_ready(child, tmp_path / "err")
        reader.start()
        reader.join(timeout=3)
        blocked = reader.is_alive()
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait(timeout=60)
    reader.join(timeout=60)
    assert not blocked, "opening and searching the registry waited for another process's open transaction"
    assert found == [[]]


# -- the registry over HTTP ---------------------------------------------------------------------------

@dataclass
class Server:
    url: str
    registry: LocalRegistry
    engine: Engine
    root: Path

    def remote(self, key: str | None = KEY) -> RemoteRegistry:
        return RemoteRegistry(self.url, key)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def server(evaluated_adapter, tmp_path_factory) -> Iterator[Server]:
    """A server with an API key over a folder registry; the evaluated adapter is also in its adapters
    folder as `plain`, the reference for what a registry id must generate."""
    root = tmp_path_factory.mktemp("server")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("BUDWOOD_HOME", str(root / "home"))
        for var in ("BUDWOOD_REGISTRY", "BUDWOOD_DATABASE_URL", "BUDWOOD_API_KEY", "BUDWOOD_KEY_PASSPHRASE"):
            mp.delenv(var, raising=False)
        copy_adapter(evaluated_adapter, root / "folder" / "plain")
        engine = Engine(EngineConfig(precision="fp32", kv_cache_tokens=2048, adapters=str(root / "folder")))
        registry = open_registry(str(root / "registry"))
        app = create_app(engine=engine, api_key=KEY, registry=registry, pull_dir=root / "pulled")
        with running(app) as url:
            yield Server(url, registry, engine, root)


def chat(client: openai.OpenAI, model: str) -> tuple[str, str]:
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Who runs the company?"}],
                                       temperature=0, max_tokens=8)
    return r.choices[0].message.content, r.model


def unique_copy(evaluated_adapter: Path, dest: Path, note: str) -> Path:
    """A copy whose budwood.json (so one blob) no other version shares."""
    adapter = copy_adapter(evaluated_adapter, dest)
    prov = json.loads((adapter / "budwood.json").read_text())
    (adapter / "budwood.json").write_text(json.dumps({**prov, "note": note}))
    return adapter


def test_remote_publish_pull_search_show_yank(server, evaluated_adapter, tmp_path):
    adapter = copy_adapter(evaluated_adapter, tmp_path / "adapter")
    key_id, pem = create_key("remote", folder=tmp_path / "keys")
    sign(adapter, str(pem))
    remote = server.remote()
    info = remote.publish(adapter, "acme/remote@1.0.0", "MIT")
    assert info.ref == "acme/remote@1.0.0" and info.signer == key_id and info.license == "MIT"
    assert sorted(f.path for f in info.files) == sorted([*ADAPTER_FILES, "attestation.json"])
    _, pulled = remote.pull("acme/remote@1.0.0", tmp_path / "pulled")
    assert_same_files(pulled, adapter, [f.path for f in info.files])
    assert verify(pulled, {key_id}).ok
    rate = info.metrics["grounding.hallucination_rate"]
    assert [v.ref for v in remote.search("remote", where=[f"grounding.hallucination_rate<={rate}"])] == [info.ref]
    assert remote.search("remote", where=[f"hallucination_rate<{rate}"]) == []
    assert "acme/remote" in [v.id for v in remote.search(base="budwood-tiny", license="mit")]
    shown = remote.show("acme/remote")
    assert shown.latest.ref == info.ref and [v.version for v in shown.versions] == ["1.0.0"]
    with pytest.raises(VersionExists, match="already published"):
        remote.publish(adapter, "acme/remote@1.0.0", "MIT")
    assert remote.publish(adapter, "acme/remote", "MIT").version == "1.0.1"
    yanked = remote.yank("acme/remote@1.0.1", reason="superseded")
    assert yanked.yanked and yanked.yank_reason == "superseded"
    assert [v.ref for v in remote.search("remote")] == ["acme/remote@1.0.0"]
    assert server.registry.version_info("acme/remote@1.0.1").yanked  # the server's own registry saw it
    remote.close()


def test_a_wrong_api_key_is_refused_and_named(server, evaluated_adapter):
    for key in ("sk-wrong", None):
        remote = server.remote(key)
        with pytest.raises(RegistryError, match="(Incorrect|provide an) API key.*BUDWOOD_API_KEY"):
            remote.search()
        with pytest.raises(RegistryError, match="API key"):
            remote.publish(evaluated_adapter, "acme/wrongkey@1.0.0", "MIT")
    with pytest.raises(NotFound):
        server.registry.version_info("acme/wrongkey")


def test_a_server_without_api_key_serves_public_reads_only(server, evaluated_adapter, tmp_path):
    server.registry.publish(evaluated_adapter, "acme/open@1.0.0", "MIT")
    hidden = unique_copy(evaluated_adapter, tmp_path / "hidden", "private")
    secret = server.registry.publish(hidden, "acme/hidden@1.0.0", "MIT", private=True)
    secret_blob = next(f.sha256 for f in secret.files if f.path == "budwood.json")
    # its own engine: the module server's engine already holds that server's registry resolver
    keyless = create_app(engine=Engine(EngineConfig(precision="fp32", kv_cache_tokens=2048)),
                         registry=server.registry, pull_dir=tmp_path / "keyless-pulled")
    with running(keyless) as url:
        anon = RemoteRegistry(url)
        with pytest.raises(RegistryError, match="no API key configured.*--api-key"):
            anon.publish(evaluated_adapter, "acme/open@2.0.0", "MIT")
        put = httpx.put(f"{url}/v1/registry/blobs/{'0' * 64}", content=b"x")
        assert put.status_code == 403 and put.json()["error"]["code"] == "read_only"
        assert httpx.post(f"{url}/v1/registry/adapters/acme/open/versions/1.0.0/yank", json={}).status_code == 403
        # public reads
        assert anon.version_info("acme/open@1.0.0").ref == "acme/open@1.0.0"
        assert [v.id for v in anon.search("open")] == ["acme/open"]
        _, pulled = anon.pull("acme/open@1.0.0", tmp_path / "open")
        assert_same_files(pulled, evaluated_adapter, ADAPTER_FILES)
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="anyone", max_retries=0, timeout=120)
        assert chat(client, "acme/open@1.0.0")[1] == "acme/open@1.0.0"
        # a private adapter does not exist for it, by any route
        with pytest.raises(NotFound):
            anon.version_info("acme/hidden@1.0.0")
        with pytest.raises(NotFound):
            anon.show("acme/hidden")
        assert anon.search("hidden") == []
        assert httpx.get(f"{url}/v1/registry/blobs/{secret_blob}").status_code == 404
        with pytest.raises(openai.NotFoundError) as e:
            chat(client, "acme/hidden@1.0.0")
        assert e.value.code == "model_not_found"
        assert "acme/hidden@1.0.0" not in [m.id for m in client.models.list().data]
        assert not (tmp_path / "keyless-pulled" / "acme" / "hidden").exists()
    # the server with a key shows it to its key holders
    assert server.remote().version_info("acme/hidden@1.0.0").private
    blob = httpx.get(f"{server.url}/v1/registry/blobs/{secret_blob}", headers={"Authorization": f"Bearer {KEY}"})
    assert blob.status_code == 200 and hashlib.sha256(blob.content).hexdigest() == secret_blob


def test_a_blob_damaged_on_the_server_is_refused_by_pull(server, evaluated_adapter, tmp_path):
    adapter = unique_copy(evaluated_adapter, tmp_path / "adapter", "bit rot")
    info = server.remote().publish(adapter, "acme/rot@1.0.0", "MIT")
    blob = server.registry.store.path(next(f.sha256 for f in info.files if f.path == "budwood.json"))
    original = blob.read_bytes()
    damaged = bytearray(original)
    damaged[len(damaged) // 2] ^= 0x20
    blob.write_bytes(bytes(damaged))
    try:
        with pytest.raises(RegistryError, match="another hash"):
            server.remote().pull("acme/rot@1.0.0", tmp_path / "out")
    finally:
        blob.write_bytes(original)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]  # no out/, no partial folder


def test_uploads_are_checked_against_their_hash(server):
    auth = {"Authorization": f"Bearer {KEY}"}
    promised, sent = b"the bytes promised", b"some other bytes"
    digest = hashlib.sha256(promised).hexdigest()
    r = httpx.put(f"{server.url}/v1/registry/blobs/{digest}", content=sent, headers=auth)
    assert r.status_code == 400 and "does not match its id" in r.json()["error"]["message"]
    store = server.registry.store
    assert not store.has(digest) and not store.has(hashlib.sha256(sent).hexdigest())
    assert list((store.root / "tmp").iterdir()) == []
    assert httpx.head(f"{server.url}/v1/registry/blobs/{digest}", headers=auth).status_code == 404
    assert httpx.put(f"{server.url}/v1/registry/blobs/{'Z' * 64}", content=sent, headers=auth).status_code == 400
    ok = httpx.put(f"{server.url}/v1/registry/blobs/{digest}", content=promised, headers=auth)
    assert ok.status_code == 201 and store.has(digest)
    assert httpx.head(f"{server.url}/v1/registry/blobs/{digest}", headers=auth).status_code == 200
    # stored, but served only as part of a committed version
    assert httpx.get(f"{server.url}/v1/registry/blobs/{digest}", headers=auth).status_code == 404


def test_manifests_naming_paths_outside_an_adapter_are_refused(server, evaluated_adapter):
    auth = {"Authorization": f"Bearer {KEY}"}
    files = []
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        path = evaluated_adapter / name
        digest = sha256_file(path)
        assert httpx.put(f"{server.url}/v1/registry/blobs/{digest}", content=path.read_bytes(),
                         headers=auth).status_code == 201
        files.append({"path": name, "sha256": digest, "size": path.stat().st_size})
    url = f"{server.url}/v1/registry/adapters/acme/manifest/versions"
    for bad in ("../x", "../../home/x.json", "eval/../../x.json", "/etc/passwd"):
        body = {"id": "acme/manifest", "license": "MIT", "files": [*files, {**files[0], "path": bad}]}
        r = httpx.post(url, json=body, headers=auth)
        assert r.status_code == 400 and "not a file an adapter version may hold" in r.json()["error"]["message"], bad
    r = httpx.post(url, json={"id": "acme/other", "license": "MIT", "files": files}, headers=auth)
    assert r.status_code == 400 and "the manifest is for acme/other" in r.json()["error"]["message"]
    with pytest.raises(NotFound):
        server.registry.show("acme/manifest")
    assert not (server.registry.store.root.parent / "x").exists()


# -- registry ids as model names ----------------------------------------------------------------------------

def test_a_registry_id_generates_what_the_same_adapter_from_a_folder_does(server, evaluated_adapter):
    server.registry.publish(evaluated_adapter, "acme/x@1.0.0", "MIT")
    client = server.client()
    text, model = chat(client, "acme/x@1.0.0")
    assert model == "acme/x@1.0.0"
    assert text == chat(client, "plain")[0]
    assert text != chat(client, "budwood-tiny")[0]  # the adapter really is applied
    assert chat(client, "acme/x")[0] == text  # no version: the latest
    ids = [m.id for m in client.models.list().data]
    assert "acme/x@1.0.0" in ids and "plain" in ids
    pulled = server.root / "pulled" / "acme" / "x" / "1.0.0"
    assert_same_files(pulled, evaluated_adapter, ADAPTER_FILES)


def test_unknown_and_unaccepted_registry_ids_are_refused(server, evaluated_adapter):
    client = server.client()
    with pytest.raises(openai.NotFoundError) as e:
        chat(client, "acme/nope@1.0.0")
    assert e.value.code == "model_not_found"
    server.registry.publish(evaluated_adapter, "acme/eula@1.0.0", "LicenseRef-acme-eula",
                            terms="ACME EULA: no production use without a contract.")
    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "acme/eula@1.0.0")
    assert "must be accepted" in e.value.message and "--accept-license" in e.value.message
    assert not (server.root / "pulled" / "acme" / "eula").exists()
    assert "acme/eula@1.0.0" not in [m.id for m in client.models.list().data]


# -- the CLI ---------------------------------------------------------------------------------------------------

def cli_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BUDWOOD_")}
    return {**env, "BUDWOOD_HOME": str(home), "COLUMNS": "200"}


def budwood(*commands: list[str | Path], env: dict[str, str]) -> list[subprocess.CompletedProcess]:
    """Run `budwood ARGS...` for each command, all at once; their results in order."""
    procs = [subprocess.Popen([sys.executable, "-m", "budwood", *map(str, args)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env=env) for args in commands]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=300)
        results.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    return results


def assert_refused(r: subprocess.CompletedProcess, *fragments: str) -> None:
    assert r.returncode == 2, (r.args, r.stdout, r.stderr)
    assert "Traceback" not in r.stderr and "error:" in r.stderr, r.stderr
    for fragment in fragments:
        assert fragment in r.stderr, (fragment, r.stderr)


def test_cli_sign_verify_publish_search_show_yank_pull_export(evaluated_adapter, tmp_path, budwood_home):
    env, registry = cli_env(budwood_home), str(tmp_path / "registry")
    adapter = copy_adapter(evaluated_adapter, tmp_path / "adapter")
    render_card(adapter, CardInfo(name="acme/cli", license="apache-2.0"))
    uncarded = copy_adapter(evaluated_adapter, tmp_path / "uncarded")
    terms = tmp_path / "EULA.txt"
    terms.write_text("ACME EULA\nNo production use without a contract.\n")
    publish(uncarded, "acme/terms@1.0.0", "LicenseRef-acme-eula", terms, registry=open_registry(registry))

    keys, pull_terms = budwood(["keys", "create"],
                               ["pull", "acme/terms", "--out", tmp_path / "terms-out", "--registry", registry], env=env)
    assert keys.returncode == 0, keys.stderr
    key_id = re.search(r"ed25519:[0-9a-f]{16}", keys.stdout)[0]
    assert_refused(pull_terms, "No production use without a contract", "--accept-license")
    assert not (tmp_path / "terms-out").exists()

    signed, export_uncarded = budwood(["sign", adapter], ["export", uncarded, "--hf", tmp_path / "hf-uncarded"],
                                      env=env)
    assert signed.returncode == 0 and "attestation.json" in signed.stdout, signed.stderr
    assert_refused(export_uncarded, "no model card")
    assert not (tmp_path / "hf-uncarded").exists()
    tampered = copy_adapter(adapter, tmp_path / "tampered")
    data = bytearray((tampered / "eval" / "adapted.json").read_bytes())
    data[100] ^= 0x01
    (tampered / "eval" / "adapted.json").write_bytes(bytes(data))

    ok, bad, published, exported, export_tampered = budwood(
        ["verify", adapter],
        ["verify", tampered],
        ["publish", adapter, "--name", "acme/cli", "--license", "apache-2.0", "--registry", registry],
        ["export", adapter, "--hf", tmp_path / "hf"],
        ["export", tampered, "--hf", tmp_path / "hf-tampered"], env=env)
    assert ok.returncode == 0 and "files match" in ok.stdout and key_id in ok.stdout, ok.stdout + ok.stderr
    assert bad.returncode == 1 and "eval/adapted.json: changed since it was signed" in bad.stdout, bad.stdout
    assert published.returncode == 0, published.stderr
    assert "published acme/cli@1.0.0" in published.stdout and f"signed by {key_id}" in published.stdout
    assert exported.returncode == 0, exported.stderr
    hf = tmp_path / "hf"
    assert sorted(p.name for p in hf.iterdir()) == [".gitattributes", "README.md", "adapter_config.json",
                                                    "adapter_model.safetensors", "attestation.json", "budwood.json",
                                                    "eval"]
    meta = yaml.safe_load((hf / "README.md").read_text().split("---\n")[1])
    assert meta["library_name"] == "peft" and meta["license"] == "apache-2.0"
    assert "base_model" not in meta and meta["budwood"]["base_model"] == "budwood-tiny"
    assert "*.safetensors filter=lfs diff=lfs merge=lfs -text" in (hf / ".gitattributes").read_text().splitlines()
    assert verify(hf, {key_id}).ok  # the export can still be verified by whoever downloads it
    assert_refused(export_tampered, "attestation does not verify", "eval/adapted.json")
    assert not (tmp_path / "hf-tampered").exists()

    search, no_match, show = budwood(["search", "--where", "hallucination_rate<2", "--registry", registry],
                                     ["search", "--where", "grounding.hallucination_rate<0", "--registry", registry],
                                     ["show", "acme/cli", "--registry", registry], env=env)
    assert search.returncode == 0 and "2 match(es)" in search.stdout, search.stdout + search.stderr
    assert "acme/cli" in search.stdout and "acme/terms" in search.stdout
    assert no_match.returncode == 0 and "0 match(es)" in no_match.stdout
    assert show.returncode == 0 and "1.0.0" in show.stdout and "Apache-2.0" in show.stdout, show.stderr
    assert f"signature: verified at publish, key {key_id}" in show.stdout

    [yank] = budwood(["yank", "acme/cli@1.0.0", "--reason", "wrong answers", "--registry", registry], env=env)
    assert yank.returncode == 0 and "acme/cli@1.0.0: yanked" in yank.stdout, yank.stderr
    latest, exact = budwood(["pull", "acme/cli", "--out", tmp_path / "latest", "--registry", registry],
                            ["pull", "acme/cli@1.0.0", "--out", tmp_path / "exact", "--registry", registry], env=env)
    assert_refused(latest, "every version is yanked")
    assert exact.returncode == 0 and "yanked: wrong answers" in exact.stderr, exact.stderr
    assert_same_files(tmp_path / "exact", adapter, [*ADAPTER_FILES, "README.md", "attestation.json"])
    assert verify(tmp_path / "exact", {key_id}).ok


def test_search_where_filters_on_the_reliability_metrics_and_names_a_typo(evaluated_adapter, tmp_path, budwood_home):
    from budwood.eval.results import load_results

    registry = str(tmp_path / "registry")
    publish(copy_adapter(evaluated_adapter, tmp_path / "adapter"), "acme/reliable@1.0.0", "MIT",
            registry=open_registry(registry))
    reg = open_registry(registry)
    grounding = load_results(evaluated_adapter / "eval" / "adapted.json").suites["grounding"].metrics
    aurc, ece = grounding["aurc"].value, grounding["ece"].value

    def ids(*where: str) -> list[str]:
        return [v.id for v in reg.search(where=list(where))]

    assert ids(f"aurc<={aurc}", f"grounding.ece<={ece}", "unanswerable_abstained>=0", "answerable_correct>=0",
               "hallucination_rate<=1") == ["acme/reliable"]
    assert ids(f"aurc<{aurc}") == [] and ids(f"grounding.ece>{ece}") == []
    assert ids("format_spread<1") == []  # a reliability metric no version records yet: no match, not an error
    with pytest.raises(RegistryError, match=r"'halucination_rate<0.5': no published version records a metric "
                                            r"'halucination_rate' \(did you mean 'hallucination_rate'\?\)"):
        reg.search(where=["halucination_rate<0.5"])
    with pytest.raises(RegistryError, match=r"no suite 'grundig' \(did you mean 'grounding'\?\)"):
        reg.search(where=["grundig.aurc<0.5"])
    [typo] = budwood(["search", "--where", "grounding.aurcc<0.5", "--registry", registry], env=cli_env(budwood_home))
    assert_refused(typo, "no published version records a metric 'aurcc' (did you mean 'aurc'?)")


def test_cli_refuses_bad_input_with_exit_2_and_no_traceback(evaluated_adapter, tmp_path):
    env, registry = cli_env(tmp_path / "home"), str(tmp_path / "registry")
    adapter = copy_adapter(evaluated_adapter, tmp_path / "adapter")
    common = ["--registry", registry]
    runs = budwood(["publish", adapter, "--name", "../x", "--license", "MIT", *common],
                   ["publish", adapter, "--name", "Acme/X", "--license", "MIT", *common],
                   ["publish", adapter, "--name", "acme/x", "--version", "1.0", "--license", "MIT", *common],
                   ["publish", adapter, "--name", "acme/x", "--license", "apache2", *common],
                   ["card", adapter, "--license", "other"], env=env)
    expected = [("bad adapter id '../x'", "lower-case"), ("bad adapter id 'Acme/X'", "lower-case"),
                ("bad version '1.0'", "X.Y.Z"), ("'apache2': not a valid SPDX",),
                ("license 'other' needs", "license_name", "license_link")]
    for r, fragments in zip(runs, expected, strict=True):
        assert_refused(r, *fragments)
    assert not (adapter / "README.md").exists()
    assert open_registry(registry).search() == []


def test_cli_card_with_a_custom_licence_takes_its_name_and_link(evaluated_adapter, tmp_path):
    """CardInfo needs license_name and license_link with license 'other' (the Hub asks for both), so the command
    must offer them."""
    adapter = copy_adapter(evaluated_adapter, tmp_path / "adapter")
    [r] = budwood(["card", adapter, "--license", "other", "--license-name", "acme-eula", "--license-link",
                   "LICENSE.md"], env=cli_env(tmp_path / "home"))
    assert r.returncode == 0, r.stderr
    meta = yaml.safe_load((adapter / "README.md").read_text().split("---\n")[1])
    assert (meta["license"], meta["license_name"], meta["license_link"]) == ("other", "acme-eula", "LICENSE.md")


# -- publish-time compatibility ------------------------------------------------------------------------------

def test_publish_refuses_an_adapter_trained_on_another_base(evaluated_adapter, tmp_path, budwood_home):
    adapter = copy_adapter(evaluated_adapter, tmp_path / "adapter")
    prov = json.loads((adapter / "budwood.json").read_text())
    recorded = "sha256:" + "ab" * 32
    prov["base_model"]["fingerprint"] = recorded
    (adapter / "budwood.json").write_text(json.dumps(prov))
    registry = open_registry(str(tmp_path / "registry"))
    with pytest.raises(RegistryError) as e:
        publish(adapter, "acme/wrong-base@1.0.0", "MIT", registry=registry)
    assert recorded[:19] in str(e.value) and model_fingerprint("budwood-tiny")[:19] in str(e.value)
    assert registry.search() == []


def test_publish_refuses_tensors_the_base_has_no_place_for(evaluated_adapter, tmp_path, budwood_home):
    adapter = copy_adapter(evaluated_adapter, tmp_path / "adapter")
    weights = load_file(adapter / "adapter_model.safetensors")
    layers = 1 + max(int(m[1]) for k in weights if (m := re.search(r"\.layers\.(\d+)\.", k)))
    extra = next(k for k in weights if ".layers.0.self_attn.q_proj.lora_A" in k)
    weights[extra.replace(".layers.0.", f".layers.{layers}.")] = weights[extra].clone()
    save_file(weights, adapter / "adapter_model.safetensors")
    registry = open_registry(str(tmp_path / "registry"))
    with pytest.raises(RegistryError, match=rf"has no place for: .*layers\.{layers}\.self_attn\.q_proj"):
        publish(adapter, "acme/extra@1.0.0", "MIT", registry=registry)
    assert registry.search() == []


def test_publish_says_which_max_lora_rank_vllm_needs(tmp_path, budwood_home):
    adapter = make_random_adapter(tmp_path / "wide", seed=3, r=32)
    info, warnings = publish(adapter, "acme/wide@1.0.0", "MIT", registry=open_registry(str(tmp_path / "registry")))
    assert info.rank == 32
    assert "vLLM: rank 32: start vLLM with --max-lora-rank 32 (its default is 16)" in warnings


def test_vllm_warnings_follow_the_adapter_config(evaluated_adapter, tmp_path):
    adapter = copy_adapter(evaluated_adapter, tmp_path / "adapter")
    assert AdapterDir.open(adapter).vllm_warnings() == []
    config = json.loads((adapter / "adapter_config.json").read_text())

    def warnings_for(**changes) -> list[str]:
        (adapter / "adapter_config.json").write_text(json.dumps({**config, **changes}))
        return AdapterDir.open(adapter).vllm_warnings()

    assert warnings_for(r=600) == ["rank 600 is above vLLM's largest max_lora_rank (512)"]
    assert warnings_for(rank_pattern={"q_proj": 600}) == ["rank 600 is above vLLM's largest max_lora_rank (512)"]
    assert warnings_for(r=8, rank_pattern={"q_proj": 64}) == [
        "rank 64: start vLLM with --max-lora-rank 64 (its default is 16)"]
    assert warnings_for(use_dora=True) == ["DoRA adapters (use_dora) are not supported by vLLM"]
