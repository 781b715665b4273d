"""The routers, in process: thin routes that get their serving object and caller through dependencies.

A stand-in serving object replaces the engine, so these check the HTTP layer alone: which caller may
call what, how answers are shaped and how refusals are answered.
"""
from __future__ import annotations

import hmac
from types import SimpleNamespace

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from budwood.errors import NotFoundError
from budwood.registry.names import NotFound
from budwood.serve import Caller, create_app, install_error_handlers
from budwood.serve.auth import OPERATOR, AuthMiddleware
from budwood.serve.protocol import Health, ModelCard, ModelList
from budwood.serve.routes import registry as registry_routes

TENANT_KEY, OPERATOR_KEY = "sk-tenant", "sk-operator"


class Keys:
    """An Authenticator with one operator key and one tenant key; no anonymous callers."""

    anonymous = None

    def authenticate(self, token: str) -> Caller | None:
        if hmac.compare_digest(token, OPERATOR_KEY):
            return OPERATOR
        return Caller.of_tenant("acme") if hmac.compare_digest(token, TENANT_KEY) else None


class StandIn:
    """The methods of OpenAIServing that the routes call, recording what they were asked."""

    def __init__(self):
        self.calls: list[tuple] = []

    async def list_models(self, caller: Caller) -> ModelList:
        self.calls.append(("list_models", caller.tenant))
        return ModelList(data=[ModelCard(id="base", owned_by="budwood", root="base", parent=None, max_model_len=64)])

    async def model_card(self, caller: Caller, model: str) -> ModelCard:
        raise NotFoundError(f"The model `{model}` does not exist.", param="model", code="model_not_found")

    async def load_adapter(self, body) -> None:
        self.calls.append(("load", body.lora_name, body.lora_path))

    def unload_adapter(self, name: str) -> None:
        self.calls.append(("unload", name))

    def health(self) -> Health:
        return Health(model="base", in_flight=2)


@pytest.fixture
def served() -> tuple[TestClient, StandIn]:
    app = create_app(auth=Keys())
    stand_in = StandIn()
    app.state.openai_serving = stand_in  # what the lifespan would put there; the engine is never loaded
    return TestClient(app), stand_in


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def test_models_list_is_openai_shaped_and_scoped_to_the_caller(served):
    client, stand_in = served
    r = client.get("/v1/models", headers=bearer(TENANT_KEY))
    assert r.status_code == 200
    card = {"id": "base", "object": "model", "created": 0, "owned_by": "budwood", "root": "base", "parent": None,
            "max_model_len": 64}
    assert r.json() == {"object": "list", "data": [card]}
    assert stand_in.calls == [("list_models", "acme")]


def test_an_unknown_model_is_404_model_not_found(served):
    r = served[0].get("/v1/models/org/nope@1.0.0", headers=bearer(OPERATOR_KEY))
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert r.json()["error"]["param"] == "model"


@pytest.mark.parametrize("route", ["load_lora_adapter", "unload_lora_adapter"])
def test_a_tenant_may_not_load_or_unload_adapters(served, route):
    client, stand_in = served
    r = client.post(f"/v1/{route}", json={"lora_name": "x", "lora_path": "y"}, headers=bearer(TENANT_KEY))
    assert r.status_code == 403 and r.json()["error"] == {
        "message": "only the server's operator may load or unload adapters", "type": "permission_error",
        "param": None, "code": None}
    assert stand_in.calls == []
    bad_body = client.post(f"/v1/{route}", json={"nonsense": 1}, headers=bearer(TENANT_KEY))
    assert bad_body.status_code == 403  # refused before validation: a tenant learns nothing from it


def test_the_operator_loads_and_unloads_adapters_with_vllms_answers(served):
    client, stand_in = served
    r = client.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": "y"}, headers=bearer(OPERATOR_KEY))
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'x' added successfully."
    r = client.post("/v1/unload_lora_adapter", json={"lora_name": "x"}, headers=bearer(OPERATOR_KEY))
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'x' removed successfully."
    assert stand_in.calls == [("load", "x", "y"), ("unload", "x")]


def test_v1_needs_a_key_and_health_does_not(served):
    client = served[0]
    r = client.get("/v1/models")
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert client.get("/health").json() == {"status": "ok", "model": "base", "in_flight": 2}


@pytest.mark.parametrize("header", ["Bearer ", "Bearer", "Bearer anything", "Basic dXNlcjo=", ""])
def test_a_server_without_a_key_takes_any_authorization(header):
    """As vLLM without --api-key: lm-evaluation-harness sends 'Bearer ' (an empty key) by default."""
    app = create_app()
    app.state.openai_serving = StandIn()
    r = TestClient(app).get("/v1/models", headers={"Authorization": header} if header else {})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("header", ["Bearer ", "Bearer", "Basic dXNlcjo="])
def test_a_server_with_a_key_refuses_an_empty_or_other_authorization(served, header):
    r = served[0].get("/v1/models", headers={"Authorization": header})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


# -- the registry surface ---------------------------------------------------------------------------------
class Registry:
    """The LocalRegistry methods the read routes call: nothing exists."""

    store = SimpleNamespace(has=lambda digest: True)

    def show(self, ref: str, include_private=False):
        raise NotFound(f"{ref}: not found")

    def blob_visible(self, digest: str, private) -> bool:
        return False


def registry_client(caller: Caller) -> TestClient:
    app = FastAPI()
    app.add_middleware(AuthMiddleware, authenticator=SimpleNamespace(anonymous=caller))
    install_error_handlers(app)
    app.state.registry = Registry()
    app.include_router(registry_routes.router)
    return TestClient(app)


def test_registry_not_found_is_404_not_found():
    r = registry_client(Caller()).get("/v1/registry/adapters/acme/missing")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    assert registry_client(Caller()).get(f"/v1/registry/blobs/{'0' * 64}").status_code == 404


@pytest.mark.parametrize("caller", [Caller(), Caller.of_tenant("acme")], ids=["keyless", "tenant"])
def test_registry_writes_are_refused_read_only(caller):
    client = registry_client(caller)
    r = client.put(f"/v1/registry/blobs/{'0' * 64}", content=b"x")
    assert r.status_code == 403 and r.json()["error"]["code"] == "read_only"
    r = client.post("/v1/registry/adapters/acme/x/versions/1.0.0/yank", json={})
    assert r.status_code == 403 and r.json()["error"]["code"] == "read_only"
    assert client.head(f"/v1/registry/blobs/{'0' * 64}").status_code == 403


def test_a_tenant_may_not_publish_in_another_namespace():
    r = registry_client(Caller("acme", frozenset({"acme"}), frozenset({"acme"}))).post(
        "/v1/registry/adapters/other/x/versions", json={"id": "other/x", "license": "MIT", "files": []})
    assert r.status_code == 403 and "acme" in r.json()["error"]["message"]


def test_a_publish_that_is_not_an_adapter_does_not_reveal_the_servers_folders(tmp_path, monkeypatch):
    """A manifest whose files are not an adapter is refused (400) naming the version, never the server's
    temporary folder where its blobs were staged."""
    import hashlib

    from budwood.registry.local import LocalRegistry

    monkeypatch.setenv("BUDWOOD_HOME", str(tmp_path / "home"))
    registry = LocalRegistry(f"sqlite:///{tmp_path / 'r.db'}", tmp_path / "blobs")
    client = TestClient(create_app(api_key="k", registry=registry))
    readme = b"# not an adapter\n"
    digest = hashlib.sha256(readme).hexdigest()
    assert client.put(f"/v1/registry/blobs/{digest}", content=readme, headers=bearer("k")).status_code == 201
    r = client.post("/v1/registry/adapters/acme/x/versions", headers=bearer("k"),
                    json={"id": "acme/x", "version": "1.0.0", "license": "apache-2.0",
                          "files": [{"path": "README.md", "sha256": digest, "size": len(readme)}]})
    assert r.status_code == 400 and "acme/x" in r.json()["error"]["message"], r.text
    assert str(tmp_path) not in r.text, r.text
    registry.close()
