"""Concurrent clients, each with its own database connection and real commits."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from django.db import connection
from django.test import Client

from providers.models import UsageConflict, UsageRecord, UsageReport
from tests.providers import factories

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

THREADS = 6


def _at_once(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run `calls` in threads released together; return their results in order."""
    barrier = threading.Barrier(len(calls))
    results: list[Any] = [None] * len(calls)

    def run(index: int) -> None:
        try:
            barrier.wait()
            results[index] = calls[index]()
        except Exception as exc:  # reported by the assertion below
            results[index] = exc
        finally:
            connection.close()  # each thread has its own connection

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    return results


def _poster(key_text: str, body: bytes) -> Callable[[], Any]:
    def post():
        response = Client().post(
            factories.REPORTS_URL,
            data=body,
            content_type="application/json",
            HTTP_AUTHORIZATION=f"Bearer {key_text}",
        )
        return response.status_code, response.content

    return post


def test_the_same_report_sent_at_once_is_stored_exactly_once(key_text: str) -> None:
    body = factories.body_of(factories.report_make(200))

    results = _at_once([_poster(key_text, body) for _ in range(THREADS)])

    statuses = sorted(status for status, _ in results)
    assert statuses == [200] * (THREADS - 1) + [201], results
    assert len({content for _, content in results}) == 1  # every caller, the same answer
    assert UsageReport.objects.count() == 1
    assert UsageRecord.objects.count() == 200
    report = UsageReport.objects.get()
    assert (report.records_accepted, report.records_duplicate, report.records_conflict) == (
        200,
        0,
        0,
    )


def test_overlapping_reports_of_two_nodes_deduplicate_across_nodes(node) -> None:
    _, key_a = factories.key_make(node)
    _, key_b = factories.key_make(factories.node_make(node.provider, "node-2"))
    # node A: req-0..299; node B: req-150..449, the same values for the overlap.
    body_a = factories.body_of(factories.report_make(300, report_id="a-1"))
    body_b = factories.body_of(factories.report_make(300, report_id="b-1", first=150))

    results = _at_once([_poster(key_a, body_a), _poster(key_b, body_b)])

    assert [status for status, _ in results] == [201, 201], results
    assert UsageRecord.objects.count() == 450
    reports = {r.report_id: r for r in UsageReport.objects.all()}
    accepted = reports["a-1"].records_accepted + reports["b-1"].records_accepted
    duplicate = reports["a-1"].records_duplicate + reports["b-1"].records_duplicate
    assert (accepted, duplicate) == (450, 150)
    assert reports["a-1"].records_conflict == reports["b-1"].records_conflict == 0
    assert UsageConflict.objects.count() == 0
    for report in reports.values():
        assert UsageRecord.objects.filter(report=report).count() == report.records_accepted
