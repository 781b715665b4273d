"""schemathesis against the service's own OpenAPI document: whatever it is sent, no route answers 5xx."""
from hypothesis import HealthCheck, given, settings

from tests.conftest import live_service, upload


def test_no_route_answers_a_server_error(tmp_path, company_data):
    import schemathesis
    from schemathesis.checks import not_a_server_error

    with live_service(tmp_path, workers=0) as live:
        key = live.tenant("fuzz", max_concurrent_jobs=1000)
        client = live.client(key)
        train = upload(client, company_data["train"])
        client.fine_tuning.jobs.create(model="budwood-tiny", training_file=train.id)  # something to find
        schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json")
        operations, failures = [], []
        for result in schema.get_all_operations():
            operation = result.ok()
            operations.append(f"{operation.method.upper()} {operation.path}")
            try:
                fuzzer(operation, key, not_a_server_error)()
            except Exception as e:  # collect them all: one report of every route that failed
                failures.append(f"{operations[-1]}: {str(e)[:2000]}")
        assert {"POST /v1/files", "POST /v1/fine_tuning/jobs", "GET /v1/fine_tuning/jobs/{job_id}/events",
                "POST /v1/chat/completions", "GET /v1/registry/adapters"} <= set(operations)
        assert not failures, "\n\n".join(failures)


def fuzzer(operation, key: str, check):
    @given(case=operation.as_strategy())
    @settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
    def fuzz(case):
        if operation.path in ("/v1/chat/completions", "/v1/completions") and isinstance(case.body, dict):
            case.body["model"] = "budwood-tiny"  # past the model check, into the sampling and the engine
            case.body["max_tokens"] = 4  # long generations would only cost time
            case.body.pop("max_completion_tokens", None)
            if isinstance(case.body.get("n"), int):
                case.body["n"] = min(case.body["n"], 2)
        case.call_and_validate(headers={"Authorization": f"Bearer {key}"}, checks=[check])

    return fuzz
