"""The ingestion contract: POST /api/v1/usage/reports over the real stack and database."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from providers.exceptions import BodyTooLargeError
from providers.models import InferenceNode, UsageConflict, UsageRecord, UsageReport
from providers.services import node_key_create, usage_report_ingest
from tests.providers import factories

pytestmark = pytest.mark.django_db


def stored() -> tuple[int, int, int]:
    return (
        UsageReport.objects.count(),
        UsageRecord.objects.count(),
        UsageConflict.objects.count(),
    )


def answer(
    report_id: str,
    received: int,
    accepted: int,
    duplicate: int = 0,
    conflict: int = 0,
    *,
    status: str = "accepted",
    hold_reason: str | None = None,
    received_at: str,
) -> dict[str, Any]:
    return {
        "report_id": report_id,
        "status": status,
        "hold_reason": hold_reason,
        "records": {
            "received": received,
            "accepted": accepted,
            "duplicate": duplicate,
            "conflict": conflict,
        },
        "received_at": received_at,
    }


def test_a_new_report_is_stored_whole_and_answered_201(post, node: InferenceNode) -> None:
    report = factories.report_make(3)

    response = post(report)

    assert response.status_code == 201, response.content
    body = response.json()
    assert body == answer("report-1", 3, 3, received_at=body["received_at"])
    stored_report = UsageReport.objects.get()
    assert (stored_report.provider_id, stored_report.node_id) == (node.provider_id, node.pk)
    assert (stored_report.status, stored_report.hold_reason) == ("accepted", "")
    assert stored_report.records_accepted == 3
    assert stored_report.signed is False
    rows = list(UsageRecord.objects.order_by("request_id").values())
    assert [row["request_id"] for row in rows] == ["req-0", "req-1", "req-2"]
    first = rows[0]
    assert first["report_id"] == stored_report.pk
    assert first["provider_id"] == node.provider_id
    assert first["node_id"] == node.pk
    assert first["enterprise"] == "acme"
    assert first["model"] == "qwen3-235b-a22b"
    assert first["occurred_at"] == datetime.fromisoformat(report["records"][0]["occurred_at"])
    assert (
        first["input_tokens"],
        first["output_tokens"],
        first["cached_input_tokens"],
        first["cache_write_tokens"],
        first["reasoning_tokens"],
    ) == (1200, 350, 800, 0, 10)
    assert first["service_tier"] == "standard"
    assert first["metadata"] == {}


def test_optional_fields_default_and_are_stored(post) -> None:
    report = factories.report_make(1)
    record = report["records"][0]
    for field in ("cached_input_tokens", "cache_write_tokens", "reasoning_tokens"):
        del record[field]
    record["service_tier"] = "batch"
    record["metadata"] = {"region": "eu-west", "stream": True, "attempt": 2, "note": None}

    response = post(report)

    assert response.status_code == 201, response.content
    row = UsageRecord.objects.get()
    assert (row.cached_input_tokens, row.cache_write_tokens, row.reasoning_tokens) == (0, 0, 0)
    assert row.service_tier == "batch"
    assert row.metadata == {"region": "eu-west", "stream": True, "attempt": 2, "note": None}


def test_a_replay_answers_200_with_the_identical_body_and_stores_nothing(post) -> None:
    report = factories.report_make(3)
    first = post(report)

    again = post(report)

    assert again.status_code == 200
    assert again.content == first.content
    assert stored() == (1, 3, 0)


def test_a_replay_with_other_spelling_of_the_same_content_is_a_replay(post) -> None:
    """Content is compared after parsing: key order, whitespace and UTC offsets do not count."""
    report = factories.report_make(2)
    first = post(report)
    respelled = json.loads(json.dumps(report))
    start = datetime.fromisoformat(respelled["window"]["start"])
    respelled["window"]["start"] = start.astimezone(timezone_plus_one()).isoformat()
    respelled["records"][0] = dict(reversed(list(respelled["records"][0].items())))

    again = post(json.dumps(respelled, indent=2).encode())

    assert again.status_code == 200, again.content
    assert again.content == first.content


def timezone_plus_one():
    from datetime import timezone

    return timezone(timedelta(hours=1))


def test_the_same_report_id_with_other_content_is_409_and_stores_nothing(post) -> None:
    post(factories.report_make(3))
    changed = factories.report_make(3)
    changed["records"][1]["output_tokens"] = 351

    response = post(changed)

    assert response.status_code == 409
    assert response.json() == {
        "code": "report_conflict",
        "message": "report_id 'report-1' was already used for a report with different "
        "content; a corrected report needs a new report_id.",
        "extra": {"report_id": "report-1", "retryable": False},
    }
    assert stored() == (1, 3, 0)
    assert UsageRecord.objects.get(request_id="req-1").output_tokens == 350


def test_a_record_seen_before_is_a_duplicate_counted_and_not_stored_again(post) -> None:
    post(factories.report_make(3))
    overlapping = factories.report_make(3, report_id="report-2", first=2)  # req-2 again

    response = post(overlapping)

    assert response.status_code == 201
    body = response.json()
    assert body == answer("report-2", 3, 2, duplicate=1, received_at=body["received_at"])
    assert stored() == (2, 5, 0)
    second = UsageReport.objects.get(report_id="report-2")
    assert (second.records_accepted, second.records_duplicate, second.records_conflict) == (
        2,
        1,
        0,
    )
    assert UsageRecord.objects.get(request_id="req-2").report.report_id == "report-1"


def test_a_record_seen_before_with_other_counts_is_a_conflict_for_review(post) -> None:
    post(factories.report_make(3))
    overlapping = factories.report_make(2, report_id="report-2", first=2)
    overlapping["records"][0]["input_tokens"] = 9999  # req-2 with other counts

    response = post(overlapping)

    assert response.status_code == 201
    body = response.json()
    assert body == answer("report-2", 2, 1, conflict=1, received_at=body["received_at"])
    assert stored() == (2, 4, 1)
    conflict = UsageConflict.objects.get()
    existing = UsageRecord.objects.get(request_id="req-2")
    assert conflict.report.report_id == "report-2"
    assert conflict.request_id == "req-2"
    assert conflict.existing_record == existing
    assert existing.input_tokens == 1202  # the first fact stands
    assert conflict.incoming["input_tokens"] == 9999
    assert conflict.incoming["enterprise"] == "acme"
    assert conflict.incoming["request_id"] == "req-2"


def test_a_metadata_difference_alone_is_a_duplicate(post) -> None:
    post(factories.report_make(1))
    again = factories.report_make(1, report_id="report-2")
    again["records"][0]["metadata"] = {"attempt": 2}

    response = post(again)

    assert response.json()["records"] == {
        "received": 1,
        "accepted": 0,
        "duplicate": 1,
        "conflict": 0,
    }


def test_matching_totals_are_accepted(post) -> None:
    response = post(factories.report_make(3, totals=True))

    assert response.status_code == 201
    assert response.json()["status"] == "accepted"
    assert UsageReport.objects.get().totals == {
        "records": 3,
        "input_tokens": 3603,
        "output_tokens": 1050,
        "cached_input_tokens": None,
        "cache_write_tokens": None,
        "reasoning_tokens": None,
    }


@pytest.mark.parametrize(
    ("field", "value"),
    [("records", 4), ("input_tokens", 3604), ("output_tokens", 1), ("reasoning_tokens", 0)],
)
def test_mismatching_totals_store_the_report_held(post, field: str, value: int) -> None:
    report = factories.report_make(3, totals=True)
    report["totals"][field] = value

    response = post(report)

    assert response.status_code == 201
    body = response.json()
    assert body == answer(
        "report-1",
        3,
        3,
        status="held",
        hold_reason="totals_mismatch",
        received_at=body["received_at"],
    )
    stored_report = UsageReport.objects.get()
    assert (stored_report.status, stored_report.hold_reason) == ("held", "totals_mismatch")
    assert stored() == (1, 3, 0)


def test_an_empty_report_is_accepted(post) -> None:
    response = post(factories.report_make(0))

    assert response.status_code == 201
    assert response.json()["records"]["received"] == 0
    assert stored() == (1, 0, 0)


# --- rejections: 4xx, every problem listed, nothing stored ------------------------------


def assert_invalid(response, fields: list[dict[str, str]]) -> None:
    assert response.status_code == 400, response.content
    assert response.json() == {
        "code": "invalid",
        "message": "The usage report is invalid and was not stored; see extra.fields.",
        "extra": {"fields": fields, "retryable": False},
    }
    assert stored() == (0, 0, 0)


def test_every_type_problem_is_listed_with_its_path(post) -> None:
    report = factories.report_make(4)
    report["records"][0]["input_tokens"] = 1.0
    report["records"][0]["output_tokens"] = True
    report["records"][1]["cached_input_tokens"] = -1
    report["records"][1]["cache_write_tokens"] = 10**12
    del report["records"][2]["model"]
    report["records"][2]["colour"] = "blue"
    report["records"][3]["occurred_at"] = "2026-11-22T10:01:07"
    report["records"][3]["service_tier"] = "gold"
    report["surprise"] = 1

    response = post(report)

    assert_invalid(
        response,
        [
            {"path": "$.surprise", "message": "Unknown field `surprise`"},
            {"path": "$.records[0].input_tokens", "message": "Expected `int`, got `float`"},
            {"path": "$.records[0].output_tokens", "message": "Expected `int`, got `bool`"},
            {"path": "$.records[1].cached_input_tokens", "message": "Expected `int` >= 0"},
            {"path": "$.records[1].cache_write_tokens", "message": "Expected `int` <= 100000000"},
            {"path": "$.records[2].colour", "message": "Unknown field `colour`"},
            {"path": "$.records[2].model", "message": "Missing required field `model`"},
            {
                "path": "$.records[3].occurred_at",
                "message": "Expected `datetime` with a timezone component",
            },
            {"path": "$.records[3].service_tier", "message": "Invalid enum value 'gold'"},
        ],
    )


def test_malformed_json_is_invalid_at_the_root(post) -> None:
    response = post(b'{"report_id": "r", "records": [')

    assert_invalid(response, [{"path": "$", "message": "Malformed JSON: Input data was truncated"}])


def test_a_missing_window_and_records_are_listed(post) -> None:
    response = post({"report_id": "r-1"})

    assert_invalid(
        response,
        [
            {"path": "$.window", "message": "Missing required field `window`"},
            {"path": "$.records", "message": "Missing required field `records`"},
        ],
    )


def test_every_rule_of_time_and_identity_is_listed(post) -> None:
    report = factories.report_make(5)
    start = datetime.fromisoformat(report["window"]["start"])
    report["records"][0]["occurred_at"] = (start - timedelta(seconds=1)).isoformat()
    report["records"][1]["occurred_at"] = (start + timedelta(minutes=6)).isoformat()
    report["records"][2]["reasoning_tokens"] = 351
    report["records"][3]["request_id"] = "req-1"
    report["records"][4]["metadata"] = {f"k{index}": "x" * 100 for index in range(12)}

    response = post(report)

    window = f"[{start.isoformat()}, {(start + timedelta(minutes=5)).isoformat()}]"
    assert_invalid(
        response,
        [
            {
                "path": "$.records[0].occurred_at",
                "message": f"occurred_at {(start - timedelta(seconds=1)).isoformat()} is outside "
                f"the report window {window}",
            },
            {
                "path": "$.records[1].occurred_at",
                "message": f"occurred_at {(start + timedelta(minutes=6)).isoformat()} is outside "
                f"the report window {window}",
            },
            {
                "path": "$.records[2].reasoning_tokens",
                "message": "reasoning_tokens is a part of output_tokens and cannot exceed it",
            },
            {
                "path": "$.records[3].request_id",
                "message": "request_id 'req-1' repeats $.records[1]",
            },
            {"path": "$.records[4].metadata", "message": "metadata exceeds 1024 bytes as JSON"},
        ],
    )


def test_usage_far_in_the_future_is_refused(post, settings) -> None:
    settings.USAGE_FUTURE_SKEW_SECONDS_MAX = 60
    start = datetime.now(UTC).replace(microsecond=0) + timedelta(minutes=10)
    report = factories.report_make(1)
    report["window"] = {
        "start": start.isoformat(),
        "end": (start + timedelta(minutes=5)).isoformat(),
    }
    report["records"][0]["occurred_at"] = (start + timedelta(minutes=1)).isoformat()

    response = post(report)

    assert_invalid(
        response,
        [
            {"path": "$.window.start", "message": "window.start is too far in the future"},
            {"path": "$.records[0].occurred_at", "message": "occurred_at is too far in the future"},
        ],
    )


def test_a_window_that_ends_before_it_starts_is_refused(post) -> None:
    report = factories.report_make(0)
    report["window"]["start"], report["window"]["end"] = (
        report["window"]["end"],
        report["window"]["start"],
    )

    assert_invalid(
        post(report),
        [
            {"path": "$.window.end", "message": "window.end must be after window.start"},
        ],
    )


def test_more_records_than_the_limit_is_413(post, settings) -> None:
    settings.USAGE_RECORDS_PER_REPORT_MAX = 2

    response = post(factories.report_make(3))

    assert response.status_code == 413
    assert response.json() == {
        "code": "too_many_records",
        "message": "A report may hold at most 2 records; this one has 3. Split it into "
        "several reports.",
        "extra": {"records_max": 2, "records_received": 3, "retryable": False},
    }
    assert stored() == (0, 0, 0)


def test_more_records_than_the_limit_is_413_even_when_they_are_malformed(post, settings) -> None:
    settings.USAGE_RECORDS_PER_REPORT_MAX = 2

    response = post({"report_id": "r", "records": [{}, {}, {}]})

    assert response.status_code == 413
    assert response.json()["code"] == "too_many_records"


def test_a_body_over_the_limit_is_413_from_its_content_length(post, settings) -> None:
    body = factories.body_of(factories.report_make(3))
    settings.USAGE_REPORT_BODY_BYTES_MAX = len(body) - 1

    response = post(body)

    assert response.status_code == 413
    assert response.json() == {
        "code": "body_too_large",
        "message": f"A report body may be at most {len(body) - 1} bytes.",
        "extra": {"body_bytes_max": len(body) - 1, "retryable": False},
    }
    assert stored() == (0, 0, 0)


def test_the_service_checks_the_body_size_again_on_the_bytes(node, settings) -> None:
    key, _ = node_key_create(node=node)
    body = factories.body_of(factories.report_make(1))
    settings.USAGE_REPORT_BODY_BYTES_MAX = len(body) - 1

    with pytest.raises(BodyTooLargeError, match="at most"):
        usage_report_ingest(key=key, body=body, signature=None)
    assert stored() == (0, 0, 0)


def test_a_body_that_is_not_json_is_415(post) -> None:
    response = post(b"report_id=r-1", content_type="application/x-www-form-urlencoded")

    assert response.status_code == 415
    assert response.json() == {
        "code": "unsupported_media_type",
        "message": "Send the report as Content-Type: application/json.",
        "extra": {"retryable": False},
    }
    assert stored() == (0, 0, 0)


def test_json_with_a_charset_is_accepted(post) -> None:
    response = post(factories.report_make(1), content_type="application/json; charset=utf-8")

    assert response.status_code == 201
