"""Reads of the providers app."""

from __future__ import annotations

import re

from providers.exceptions import ReportNotFoundError
from providers.models import Provider, UsageReport
from providers.schemas import REPORT_ID_MAX_LENGTH, REPORT_ID_PATTERN, python_pattern

_REPORT_ID = re.compile(python_pattern(REPORT_ID_PATTERN))


def usage_report_get(*, provider: Provider, report_id: str) -> UsageReport:
    """Return `provider`'s report `report_id`; another provider's report is not found."""
    report = None
    # An id that could never have been stored (e.g. with a NUL, which PostgreSQL text
    # cannot hold) is simply not found.
    if len(report_id) <= REPORT_ID_MAX_LENGTH and _REPORT_ID.match(report_id):
        report = UsageReport.objects.filter(provider=provider, report_id=report_id).first()
    if report is None:
        raise ReportNotFoundError(f"No report {report_id!r} for this provider.")
    return report


def usage_report_status(*, report: UsageReport) -> dict[str, object]:
    """Return where `report` stands, in the shape of the ingestion answer plus details."""
    return {
        "report_id": report.report_id,
        "status": report.status,
        "hold_reason": report.hold_reason or None,
        "records": {
            "received": report.records_received,
            "accepted": report.records_accepted,
            "duplicate": report.records_duplicate,
            "conflict": report.records_conflict,
        },
        "received_at": report.received_at.isoformat().replace("+00:00", "Z"),
        "window": {
            "start": report.window_start.isoformat().replace("+00:00", "Z"),
            "end": report.window_end.isoformat().replace("+00:00", "Z"),
        },
        "signed": report.signed,
    }
