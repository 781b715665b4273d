"""`budwood export --hf`: a copy that resolves its base on another machine, a card the Hub accepts, a signature
that verifies or is not shipped, and `--push` through huggingface_hub to a stand-in Hub (a local HTTP server
speaking the Hub's create-repo, preupload, LFS batch and commit routes, set as HF_ENDPOINT)."""
import base64
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import copy_adapter, make_random_adapter, running
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from huggingface_hub import ModelCard
from pydantic import ValidationError

from budwood.card.attest import create_key, sign, verify
from budwood.card.facts import hub_model_id
from budwood.card.render import CardInfo, render_card
from budwood.errors import BudwoodError
from budwood.models.fingerprint import model_fingerprint
from budwood.models.names import TINY_DIR
from budwood.registry.export import NOTE_HEADING, export_hf, push_hf


def front_matter(path: Path) -> dict:
    return yaml.safe_load(path.read_text().split("---\n")[1])


def carded_adapter(folder: Path, base: str = "budwood-tiny", base_fp: str | None = None, **info) -> Path:
    """A random LoRA on budwood-tiny, its config and budwood.json naming `base`, with a budwood card."""
    path = make_random_adapter(folder, seed=3, r=4, targets=["q_proj", "v_proj"])
    cfg = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": base}, indent=2,
                                                         sort_keys=True) + "\n")
    (path / "budwood.json").write_text(json.dumps({"budwood_version": "0.1.0", "base_model": {
        "name": base, "fingerprint": base_fp or model_fingerprint("budwood-tiny")}}))
    render_card(path, CardInfo(name="acme/support", license="apache-2.0", **info))
    return path


@pytest.fixture(scope="module")
def tiny_adapter(tmp_path_factory) -> Path:
    return carded_adapter(tmp_path_factory.mktemp("export") / "adapter")


# -- card metadata ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, hub", [("acme/support-faq", True), ("meta-llama/Llama-3.2-1B", True),
                                       ("budwood-tiny", False), ("gpt2", False), ("/data/models/llama", False),
                                       ("./models/llama", False), ("~/llama", False), ("a/b/c", False),
                                       ("acme/..", False), ("acme/x--y", False), ("", False), (None, False)])
def test_hub_ids_are_org_slash_name_as_huggingface_hub_validates_them(name, hub):
    assert hub_model_id(name) == (name if hub else None)


def test_a_hub_shaped_name_that_is_a_folder_here_is_not_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "llama").mkdir(parents=True)
    assert hub_model_id("models/llama") is None and hub_model_id("models/other") == "models/other"


def test_card_names_no_base_model_for_budwood_tiny_but_its_text_and_budwood_block_do(tiny_adapter):
    meta = front_matter(tiny_adapter / "README.md")
    assert "base_model" not in meta and not any(t.startswith("base_model:") for t in meta["tags"])
    assert meta["budwood"]["base_model"] == "budwood-tiny"
    assert "A LoRA adapter for `budwood-tiny`" in (tiny_adapter / "README.md").read_text()
    assert ModelCard((tiny_adapter / "README.md").read_text()).data.base_model is None  # the Hub's parser agrees


def test_card_names_a_hub_base_model_and_tags_it(tmp_path):
    path = carded_adapter(tmp_path / "a", base="meta-llama/Llama-3.2-1B")
    meta = front_matter(path / "README.md")
    assert meta["base_model"] == "meta-llama/Llama-3.2-1B"
    assert "base_model:adapter:meta-llama/Llama-3.2-1B" in meta["tags"]


def test_card_names_no_local_folder_as_base_model(tmp_path):
    path = carded_adapter(tmp_path / "a", base=str(TINY_DIR))
    meta = front_matter(path / "README.md")
    assert "base_model" not in meta and meta["budwood"]["base_model"] == str(TINY_DIR)


def test_card_datasets_must_be_hub_ids():
    assert CardInfo(datasets=["acme/support-faq"]).datasets == ["acme/support-faq"]
    for bad in ("data/train.jsonl/x", "support-faq", "/data/train.jsonl"):
        with pytest.raises(ValidationError, match="not a Hugging Face Hub data set id ORG/NAME"):
            CardInfo(datasets=[bad])


def test_cli_card_refuses_a_local_dataset_by_its_option(tiny_adapter, tmp_path):
    adapter = copy_adapter(tiny_adapter, tmp_path / "a")
    r = subprocess.run([sys.executable, "-m", "budwood", "card", str(adapter), "--dataset", "./train.jsonl"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--datasets" in r.stderr and "'./train.jsonl'" in r.stderr, r.stderr


# -- export ------------------------------------------------------------------------------------------------

def test_budwood_tiny_exports_unchanged_with_a_warning_and_keeps_its_signature(tiny_adapter, tmp_path, budwood_home):
    adapter = copy_adapter(tiny_adapter, tmp_path / "a")
    key_id, _ = create_key()
    sign(adapter)
    result = export_hf(adapter, tmp_path / "hf")
    hf = result.path
    assert result.base_model == "budwood-tiny" and result.rewritten == [] and result.signer == key_id
    assert "--base-id ORG/NAME" in result.warnings[0]
    for name in ("adapter_config.json", "README.md", "adapter_model.safetensors", "budwood.json"):
        assert (hf / name).read_bytes() == (adapter / name).read_bytes()
    assert verify(hf, {key_id}).ok


def test_base_id_rewrites_config_and_card_and_without_key_leaves_the_attestation_out(tiny_adapter, tmp_path,
                                                                                     budwood_home):
    adapter = copy_adapter(tiny_adapter, tmp_path / "a")
    create_key()
    sign(adapter)
    result = export_hf(adapter, tmp_path / "hf", base_id="acme/budwood-tiny")
    hf = result.path
    assert result.rewritten == ["adapter_config.json", "README.md"]
    assert result.signer is None and result.attestation_left_out and "pass --key" in result.warnings[-1]
    assert not (hf / "attestation.json").exists() and (adapter / "attestation.json").exists()
    cfg, original = (json.loads((d / "adapter_config.json").read_text()) for d in (hf, adapter))
    assert cfg["base_model_name_or_path"] == "acme/budwood-tiny"
    assert {k: v for k, v in cfg.items() if k != "base_model_name_or_path"} == \
        {k: v for k, v in original.items() if k != "base_model_name_or_path"}
    assert json.loads((hf / "budwood.json").read_text())["base_model"]["name"] == "budwood-tiny"  # the record
    meta = front_matter(hf / "README.md")
    assert meta["base_model"] == "acme/budwood-tiny" and "base_model:adapter:acme/budwood-tiny" in meta["tags"]
    untouched = {k: v for k, v in front_matter(adapter / "README.md").items() if k != "tags"}
    assert {k: v for k, v in meta.items() if k not in ("tags", "base_model")} == untouched
    text = (hf / "README.md").read_text()
    note = text[text.index(NOTE_HEADING):text.index("## Model details")]
    assert "trained on `budwood-tiny`" in note and "`attestation.json` is not part of this copy" in note
    assert (hf / "adapter_model.safetensors").read_bytes() == (adapter / "adapter_model.safetensors").read_bytes()


def test_key_signs_the_rewritten_copy_and_it_verifies(tiny_adapter, tmp_path, budwood_home):
    adapter = copy_adapter(tiny_adapter, tmp_path / "a")
    create_key()
    sign(adapter)
    other, _ = create_key("exporter")
    result = export_hf(adapter, tmp_path / "hf", base_id="acme/budwood-tiny", key="exporter")
    assert result.signer == other and not result.attestation_left_out
    check = verify(result.path, {other})
    assert check.ok and check.files == len([p for p in result.path.rglob("*") if p.is_file()]) - 2
    assert "attestation.json" not in (result.path / "README.md").read_text()


def test_a_local_folder_base_is_refused_without_base_id(tmp_path):
    adapter = carded_adapter(tmp_path / "a", base=str(TINY_DIR))
    with pytest.raises(BudwoodError, match="not a Hub id but a folder or path of this machine.*--base-id") as e:
        export_hf(adapter, tmp_path / "hf")
    assert e.value.param == "base_id" and not (tmp_path / "hf").exists()
    hf = export_hf(adapter, tmp_path / "hf", base_id="acme/budwood-tiny").path
    assert json.loads((hf / "adapter_config.json").read_text())["base_model_name_or_path"] == "acme/budwood-tiny"
    assert front_matter(hf / "README.md")["base_model"] == "acme/budwood-tiny"


def test_a_hub_base_travels_unchanged(tmp_path):
    adapter = carded_adapter(tmp_path / "a", base="meta-llama/Llama-3.2-1B")
    result = export_hf(adapter, tmp_path / "hf")
    assert result.base_model == "meta-llama/Llama-3.2-1B" and result.rewritten == [] and result.warnings == []
    assert (result.path / "README.md").read_bytes() == (adapter / "README.md").read_bytes()


def test_an_old_card_naming_budwood_tiny_as_base_model_is_fixed_in_the_copy(tiny_adapter, tmp_path):
    adapter = copy_adapter(tiny_adapter, tmp_path / "a")
    card = ModelCard((adapter / "README.md").read_text())
    card.data.base_model, card.data.datasets = "budwood-tiny", ["acme/faq", "./train.jsonl"]
    card.data.tags = ["base_model:adapter:budwood-tiny", *card.data.tags]
    (adapter / "README.md").write_text(card.content)
    result = export_hf(adapter, tmp_path / "hf")
    meta = front_matter(result.path / "README.md")
    assert result.rewritten == ["README.md"]
    assert "base_model" not in meta and meta["datasets"] == ["acme/faq"]
    assert not any(t.startswith("base_model:") for t in meta["tags"])
    text = (result.path / "README.md").read_text()
    assert "has no Hugging Face Hub id" in text and "not Hub ids, left out of the metadata: ./train.jsonl" in text


@pytest.mark.parametrize("base_id", ["budwood-tiny", "/models/tiny", "acme/a/b", "acme/-x"])
def test_a_base_id_that_is_not_a_hub_id_is_refused(tiny_adapter, tmp_path, base_id):
    with pytest.raises(BudwoodError, match="--base-id .*not a Hugging Face Hub model id ORG/NAME"):
        export_hf(tiny_adapter, tmp_path / "hf", base_id=base_id)
    assert not (tmp_path / "hf").exists()


def test_a_base_id_whose_cached_weights_are_another_model_is_refused(tiny_adapter, tmp_path, monkeypatch):
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--other" / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    (cache / "models--acme--other" / "refs").mkdir()
    (cache / "models--acme--other" / "refs" / "main").write_text("0" * 40)
    (snapshot / "config.json").write_bytes((TINY_DIR / "config.json").read_bytes())
    (snapshot / "model.safetensors").write_bytes(b"not the tiny weights")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    with pytest.raises(BudwoodError, match="--base-id acme/other: the copy in the local Hugging Face cache"):
        export_hf(tiny_adapter, tmp_path / "hf", base_id="acme/other")
    export_hf(tiny_adapter, tmp_path / "hf", base_id="acme/not-cached")  # nothing to compare with: accepted


def test_a_missing_key_is_refused_before_anything_is_written(tiny_adapter, tmp_path, budwood_home):
    with pytest.raises(BudwoodError, match="no signing key 'nobody'"):
        export_hf(tiny_adapter, tmp_path / "hf", key="nobody")
    assert not (tmp_path / "hf").exists()


def test_peft_placeholder_card_is_not_a_budwood_card(tmp_path):
    path = make_random_adapter(tmp_path / "a", seed=1, r=4, targets=["q_proj"])
    assert "library_name: peft" in (path / "README.md").read_text()  # peft's own card
    with pytest.raises(BudwoodError, match="not a budwood card"):
        export_hf(path, tmp_path / "hf")


# -- push to a stand-in Hub ---------------------------------------------------------------------------------

class StandInHub:
    """The Hub's upload routes as huggingface_hub's HfApi calls them (create_repo, repo_info, the card's
    validate-yaml, preupload, the LFS batch API with basic transfer, commit), keeping what arrives:
    repo -> path -> bytes."""

    def __init__(self, token: str):
        self.token, self.repos, self.blobs, self.app = token, {}, {}, FastAPI()
        self.private: dict[str, bool] = {}
        self.validated: list[str] = []
        app = self.app

        def auth(request: Request) -> None:
            if request.headers.get("authorization") != f"Bearer {self.token}":
                raise HTTPException(401, "Invalid credentials in Authorization header")

        @app.post("/api/repos/create")
        async def create(request: Request):
            auth(request)
            body = await request.json()
            repo = f"{body['organization']}/{body['name']}"
            url = f"{request.base_url}{repo}"
            if repo in self.repos:  # the Hub names the existing repository in its conflict
                return JSONResponse({"error": "You already created this model repo", "url": url}, 409)
            self.repos[repo], self.private[repo] = {}, body.get("visibility") == "private"
            return {"url": url, "name": repo, "id": repo}

        @app.get("/api/models/{org}/{name}")
        async def info(org: str, name: str, request: Request):
            auth(request)
            return {"id": f"{org}/{name}", "private": self.private[f"{org}/{name}"], "sha": "0" * 40}

        @app.post("/api/validate-yaml")
        async def validate_yaml(request: Request):
            """The Hub refuses a card whose base_model or datasets are not repository ids ORG/NAME."""
            content = (await request.json())["content"]
            self.validated.append(content)
            meta = yaml.safe_load(content.split("---\n")[1])
            bad = [v for key in ("base_model", "datasets") for v in ([meta[key]] if isinstance(meta.get(key), str)
                                                                     else meta.get(key) or []) if not hub_model_id(v)]
            if bad:
                return JSONResponse({"errors": [{"message": f"{v!r} is not a valid repo id"} for v in bad]}, 400)
            return {"warnings": []}

        @app.post("/api/models/{org}/{name}/preupload/{rev}")
        async def preupload(org: str, name: str, rev: str, request: Request):
            auth(request)
            files = (await request.json())["files"]
            return {"files": [{"path": f["path"], "shouldIgnore": False,
                               "uploadMode": "lfs" if f["path"].endswith((".safetensors", ".png")) else "regular"}
                              for f in files]}

        @app.post("/{org}/{name}.git/info/lfs/objects/batch")
        async def batch(org: str, name: str, request: Request):
            auth(request)
            objects = (await request.json())["objects"]
            return {"transfer": "basic", "objects": [
                {"oid": o["oid"], "size": o["size"],
                 "actions": {"upload": {"href": f"{request.base_url}lfs/{o['oid']}"}}} for o in objects]}

        @app.put("/lfs/{oid}")
        async def lfs(oid: str, request: Request):
            data = await request.body()
            assert hashlib.sha256(data).hexdigest() == oid
            self.blobs[oid] = data
            return {}

        @app.post("/api/models/{org}/{name}/commit/{rev}")
        async def commit(org: str, name: str, rev: str, request: Request):
            auth(request)
            repo = f"{org}/{name}"
            for line in (await request.body()).splitlines():
                item = json.loads(line)
                value = item["value"]
                if item["key"] == "file":
                    self.repos[repo][value["path"]] = base64.b64decode(value["content"])
                elif item["key"] == "lfsFile":
                    self.repos[repo][value["path"]] = self.blobs[value["oid"]]
            return {"commitUrl": f"{request.base_url}{repo}/commit/{'1' * 40}", "commitOid": "1" * 40}


def exported_files(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_cli_export_pushes_every_file_to_the_hub_with_the_token_from_hf_token(tiny_adapter, tmp_path):
    hub = StandInHub("hf_test_token")
    env = {**os.environ, "HF_TOKEN": "hf_test_token", "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf-home"),
           "BUDWOOD_HOME": str(tmp_path / "home"), "COLUMNS": "200"}
    with running(hub.app) as url:
        env["HF_ENDPOINT"] = url
        r = subprocess.run([sys.executable, "-m", "budwood", "export", str(tiny_adapter), "--hf", str(tmp_path / "hf"),
                            "--base-id", "acme/budwood-tiny", "--push", "acme/support", "--private"],
                           capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        again = subprocess.run([sys.executable, "-m", "budwood", "export", str(tiny_adapter), "--hf",
                                str(tmp_path / "hf2"), "--push", "acme/support"], capture_output=True, text=True,
                               env={**env, "HF_TOKEN": "wrong"}, timeout=300)
    assert f"pushed: {url}/acme/support/commit/" in r.stdout and "base acme/budwood-tiny" in r.stdout
    arrived, sent = hub.repos["acme/support"], exported_files(tmp_path / "hf")
    assert hub.private == {"acme/support": True} and set(hub.validated) == {sent["README.md"].decode()}
    assert arrived == sent and {"adapter_model.safetensors", "adapter_config.json", "README.md", ".gitattributes",
                                "budwood.json"} <= set(arrived)
    assert json.loads(arrived["adapter_config.json"])["base_model_name_or_path"] == "acme/budwood-tiny"
    assert again.returncode == 2 and "--push acme/support: the Hub refused (401)" in again.stderr, again.stderr
    assert (tmp_path / "hf2" / "README.md").exists()  # the export itself was made; only the upload failed


def test_push_needs_a_token_and_private_refuses_an_existing_public_repo(tiny_adapter, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    hf = export_hf(tiny_adapter, tmp_path / "hf").path
    with pytest.raises(BudwoodError, match="no Hugging Face token; set HF_TOKEN"):
        push_hf(hf, "acme/support")
    hub = StandInHub("t")
    with running(hub.app) as url:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", url)
        push_hf(hf, "acme/public", token="t")
        with pytest.raises(BudwoodError, match="--private: acme/public already exists on the Hub and is public"):
            push_hf(hf, "acme/public", private=True, token="t")
        with pytest.raises(BudwoodError, match="not a Hugging Face Hub repository id"):
            push_hf(hf, "acme/a/b", token="t")
    assert hub.repos["acme/public"] == exported_files(hf) and hub.private == {"acme/public": False}
