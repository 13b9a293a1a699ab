"""Schemathesis over the server's own OpenAPI schema (issue 19, item 10), against a real uvicorn on loopback:
requests generated from the schema (valid ones, and invalid ones in negative mode) never get a 5xx, every
status and media type answered is one the schema documents, and the server is healthy and idle after.

Bounded for CI: a fixed number of examples per operation and mode, derandomized (the same examples on
every run), on a tiny model with a 64-token context (no generation runs long).
"""
import pytest

pytest.importorskip("fastapi")
schemathesis = pytest.importorskip("schemathesis")
httpx = pytest.importorskip("httpx")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.test_server import MODEL, _engine, _metric, _running_server, _wait_idle  # noqa: E402
from tests.tiny_models import make_tiny_checkpoint  # noqa: E402

EXAMPLES = {schemathesis.GenerationMode.POSITIVE: 25, schemathesis.GenerationMode.NEGATIVE: 15}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]


@pytest.fixture(scope="module")
def url(tmp_path_factory):
    ckpt = make_tiny_checkpoint("qwen3_moe", tmp_path_factory.mktemp("qwen3"), max_position_embeddings=64)
    with _running_server(_engine(ckpt), body_timeout_s=10.0) as base:
        yield base


def test_schemathesis_finds_no_server_error(url):
    schema = schemathesis.openapi.from_url(f"{url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.label for op in operations} == {"POST /v1/completions", "POST /v1/chat/completions", "GET /v1/models",
                                              "GET /health", "GET /metrics"}
    calls = []
    for operation in operations:
        for mode, examples in EXAMPLES.items():
            if mode is schemathesis.GenerationMode.NEGATIVE and operation.method.upper() == "GET":
                continue  # no parameters: nothing to make invalid
            @settings(max_examples=examples, derandomize=True, database=None, deadline=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode))
            def check(case):
                response = case.call(base_url=url, timeout=60)
                calls.append((case.operation.label, response.status_code))
                case.validate_response(response, checks=CHECKS)

            check()
    for label in ("POST /v1/completions", "POST /v1/chat/completions"):  # both valid and refused bodies were sent
        statuses = {status for op, status in calls if op == label}
        assert 200 in statuses and 400 in statuses, (label, sorted(statuses))
    assert all(status < 500 for _, status in calls)
    # healthy after: nothing left running or waiting, no KV block held, and it still serves
    samples = _wait_idle(url, timeout=60)
    assert _metric(samples, "light_moe_requests_finished_total", finish_reason="error") == 0
    assert httpx.get(f"{url}/health").status_code == 200
    ok = httpx.post(f"{url}/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 3,
                                                   "ignore_eos": True}, timeout=30)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
