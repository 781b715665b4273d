"""stream_response: a stream that fails at once is a plain error; one that fails later ends with the error."""
from __future__ import annotations

import json

from fastapi import FastAPI
from fastapi.testclient import TestClient

from budwood.errors import LimitExceeded, NotFoundError
from budwood.serve import install_error_handlers
from budwood.serve.sse import stream_response


def client_for(chunks) -> TestClient:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/stream")
    async def stream():
        return await stream_response(chunks())

    return TestClient(app)


def events(r) -> list[str]:
    return [line[len("data: "):] for line in r.text.splitlines() if line.startswith("data: ")]


def test_chunks_are_sent_as_compact_json_then_done():
    async def chunks():
        yield {"a": 1, "b": [1, 2]}
        yield {"a": 2}

    r = client_for(chunks).get("/stream")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert events(r) == ['{"a":1,"b":[1,2]}', '{"a":2}', "[DONE]"]


def test_a_stream_refused_before_its_first_chunk_gets_the_errors_status():
    async def chunks():
        raise LimitExceeded("the server is busy", code="rate_limit_exceeded")
        yield {}

    r = client_for(chunks).get("/stream")
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"


def test_a_stream_failing_midway_sends_the_error_object_then_done():
    async def chunks():
        yield {"a": 1}
        raise NotFoundError("the adapter went away", code="model_not_found", param="model")

    r = client_for(chunks).get("/stream")
    data = events(r)
    assert r.status_code == 200 and data[-1] == "[DONE]" and len(data) == 3
    assert json.loads(data[1]) == {"error": {"message": "the adapter went away", "type": "invalid_request_error",
                                             "param": "model", "code": "model_not_found"}}
