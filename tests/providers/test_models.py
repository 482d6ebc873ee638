"""Rules PostgreSQL enforces on usage: append-only records and conflicts, token checks."""

from __future__ import annotations

import pytest
from django.db import connection, transaction
from django.db.utils import DatabaseError, IntegrityError

from providers.models import UsageConflict, UsageRecord
from providers.services import node_key_create, usage_report_ingest
from tests.providers import factories


def _ingest(node, report) -> None:
    key, _ = node_key_create(node=node)
    usage_report_ingest(key=key, body=factories.body_of(report), signature=None)


def _sqlstate(exc: BaseException) -> str | None:
    return getattr(exc.__cause__, "sqlstate", None)


RECORD_CHANGES = [
    "UPDATE providers_usagerecord SET input_tokens = 1",
    "UPDATE providers_usagerecord SET report_id = report_id",
    "DELETE FROM providers_usagerecord",
    "TRUNCATE providers_usagerecord CASCADE",
]
CONFLICT_CHANGES = [
    "UPDATE providers_usageconflict SET request_id = 'x'",
    "DELETE FROM providers_usageconflict",
    "TRUNCATE providers_usageconflict",
]


def _assert_refused(sql: str, table: str) -> None:
    with pytest.raises(DatabaseError) as raised, transaction.atomic(), connection.cursor() as c:
        c.execute(sql)
    assert _sqlstate(raised.value) == "TP001", sql
    assert f"{table} is append-only" in str(raised.value)


@pytest.mark.django_db(transaction=True)
def test_usage_records_and_conflicts_are_append_only(node) -> None:
    """Triggers tested where they fire: committed rows, outside a test transaction."""
    _ingest(node, factories.report_make(2))
    changed = factories.report_make(1, report_id="report-2")
    changed["records"][0]["input_tokens"] = 1
    _ingest(node, changed)
    assert UsageConflict.objects.count() == 1

    for sql in RECORD_CHANGES:
        _assert_refused(sql, "providers_usagerecord")
    for sql in CONFLICT_CHANGES:
        _assert_refused(sql, "providers_usageconflict")

    assert sorted(UsageRecord.objects.values_list("input_tokens", flat=True)) == [1200, 1201]
    assert UsageConflict.objects.get().request_id == "req-0"


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("column", "value", "constraint"),
    [
        ("input_tokens", -1, "providers_usagerecord_tokens_nonnegative"),
        ("cache_write_tokens", -5, "providers_usagerecord_tokens_nonnegative"),
        ("reasoning_tokens", 351, "providers_usagerecord_reasoning_within_output"),
        ("service_tier", "'gold'", "providers_usagerecord_service_tier_valid"),
        ("request_id", "'req-0'", "providers_usagerecord_request_id_unique"),
    ],
)
def test_the_database_checks_each_record(node, column: str, value, constraint: str) -> None:
    _ingest(node, factories.report_make(1))
    record = UsageRecord.objects.get()
    values = {
        "report_id": record.report_id,
        "provider_id": record.provider_id,
        "node_id": record.node_id,
        "request_id": "'req-new'",
        "enterprise": "'acme'",
        "model": "'m'",
        "occurred_at": "now()",
        "input_tokens": 1,
        "output_tokens": 350,
        "cached_input_tokens": 0,
        "cache_write_tokens": 0,
        "reasoning_tokens": 0,
        "service_tier": "'standard'",
        "metadata": "'{}'",
        "content_sha256": "'\\x00'",
    }
    values[column] = value
    sql = (
        f"INSERT INTO providers_usagerecord ({', '.join(values)}) "
        f"VALUES ({', '.join(str(v) for v in values.values())})"
    )

    with pytest.raises(IntegrityError) as raised, transaction.atomic(), connection.cursor() as c:
        c.execute(sql)

    assert raised.value.__cause__.diag.constraint_name == constraint
    assert UsageRecord.objects.count() == 1
