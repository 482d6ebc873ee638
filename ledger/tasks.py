"""Celery tasks of the books: thin, idempotent, bounded."""

from __future__ import annotations

from celery import shared_task
from django.utils import timezone

from ledger import services

MONTHS_AHEAD = 2


@shared_task(acks_late=True, time_limit=60, soft_time_limit=50)
def periods_open_ahead() -> list[str]:
    """Open the current month's period and the next ones, so postings always find one."""
    today = timezone.now()
    opened = []
    for offset in range(MONTHS_AHEAD + 1):
        month_index = today.month - 1 + offset
        period = services.period_open(
            year=today.year + month_index // 12, month=month_index % 12 + 1
        )
        opened.append(f"{period.starts_at:%Y-%m}")
    return opened
