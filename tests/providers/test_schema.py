"""The published OpenAPI document validates, matches the wire format, and fuzzing the
ingestion endpoints with schema-generated input never produces a 5xx."""

from __future__ import annotations

import json

import msgspec
import pytest
import schemathesis
from django.core import signals
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from django.test import Client
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from openapi_spec_validator import validate

from providers import openapi, schemas
from tests.providers import factories

FUZZ_EXAMPLES = 40


@pytest.fixture(scope="module")
def document() -> dict:
    response = Client().get("/api/schema/?format=json")
    assert response.status_code == 200
    return json.loads(response.content)


def test_the_openapi_document_validates(document: dict) -> None:
    validate(document)


def test_the_document_describes_auth_limits_and_errors(document: dict) -> None:
    post = document["paths"]["/api/v1/usage/reports"]["post"]
    assert post["security"] == [{"nodeApiKey": []}]
    assert document["components"]["securitySchemes"]["nodeApiKey"]["scheme"] == "bearer"
    assert "USAGE_RECORDS_PER_REPORT_MAX" in post["description"]
    assert "Retry-After" in post["description"]
    assert {"200", "201", "400", "401", "409", "413", "415", "429"} <= set(post["responses"])
    error = post["responses"]["400"]["content"]["application/json"]["schema"]["$ref"]
    assert error.endswith("/Error")
    example = post["requestBody"]["content"]["application/json"]["examples"]
    assert "OpenAI" in json.dumps(example)
    get = document["paths"]["/api/v1/usage/reports/{report_id}"]["get"]
    assert {"200", "401", "404"} <= set(get["responses"])


@pytest.mark.parametrize(
    ("serializer", "struct"),
    [
        (openapi.UsageReportSerializer, schemas.ReportIn),
        (openapi.WindowSerializer, schemas.WindowIn),
        (openapi.RecordSerializer, schemas.RecordIn),
        (openapi.TotalsSerializer, schemas.TotalsIn),
    ],
)
def test_the_documented_fields_are_the_parsed_fields(serializer, struct) -> None:
    fields = serializer().fields
    parsed = {field.name: field for field in msgspec.structs.fields(struct)}
    assert set(fields) == set(parsed)
    for name, field in parsed.items():
        assert fields[name].required == field.required, name


def test_the_example_is_a_valid_report() -> None:
    report = msgspec.json.decode(json.dumps(openapi.REPORT_EXAMPLE.value), type=schemas.ReportIn)
    assert report.records[0].input_tokens == 1200


# --- fuzzing -------------------------------------------------------------------------


@pytest.fixture
def api_schema(db: None):
    """The schema served by the real WSGI app, in-process, inside the test transaction.

    Django's WSGI handler closes a connection that is not in autocommit mode at the end
    of each request, which would end the test transaction: like django.test.Client, we
    detach that signal for the test.
    """
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    try:
        yield schemathesis.openapi.from_wsgi(
            "/api/schema/?format=json", get_wsgi_application()
        ).include(path_regex="^/api/v1/usage/")
    finally:
        signals.request_started.connect(close_old_connections)
        signals.request_finished.connect(close_old_connections)


@pytest.fixture
def fuzz_key(db: None) -> str:
    _, key_text = factories.key_make(factories.node_make(factories.provider_make("fuzz")))
    return key_text


def test_fuzzing_never_produces_a_server_error(api_schema, fuzz_key: str, settings) -> None:
    """Drive schemathesis' strategies with Hypothesis directly (its pytest plugin does not
    support pytest 9 yet), against the real app, inside the test transaction."""
    settings.USAGE_REPORTS_PER_MINUTE_PER_KEY = 10**6
    headers = {"Authorization": f"Bearer {fuzz_key}"}
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert {operation.label for operation in operations} == {
        "POST /api/v1/usage/reports",
        "GET /api/v1/usage/reports/{report_id}",
    }
    for operation in operations:

        @given(case=operation.as_strategy())
        @hypothesis_settings(
            max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck)
        )
        def call(case) -> None:
            response = case.call(headers=headers)
            assert response.status_code < 500, (case, response.status_code, response.text[:500])
            if response.status_code >= 400:
                assert set(response.json()) == {"code", "message", "extra"}, response.text

        call()
