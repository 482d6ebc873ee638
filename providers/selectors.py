"""Reads of the providers app."""

from __future__ import annotations

from providers.exceptions import ReportNotFoundError
from providers.models import Provider, UsageReport


def usage_report_get(*, provider: Provider, report_id: str) -> UsageReport:
    """Return `provider`'s report `report_id`; another provider's report is not found."""
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
