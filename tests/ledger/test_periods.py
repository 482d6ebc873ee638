"""Closing a period while postings dated in it are in flight.

period_close locks the transactions table against new inserts for the instant of the
close and waits for those in flight, so every posting dated in the period either
committed before the close or is refused with PeriodClosed; none slips in after.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime

from django.db import connection

from ledger.exceptions import PeriodClosed
from ledger.models import Period, Transaction
from ledger.services import period_close, period_open
from tests.ledger.factories import assert_books_hold, chart, committing_db, transfer

POSTERS = 2
JUNE_15 = datetime(2024, 6, 15, tzinfo=UTC)


@committing_db
def test_no_posting_dated_in_a_period_commits_after_its_close():
    chart()
    june = period_open(year=2024, month=6)
    stop = threading.Event()
    outcomes: list[list[tuple[str, str]]] = [[] for _ in range(POSTERS)]
    errors: list[BaseException] = []

    def poster(number: int) -> None:
        try:
            sequence = 0
            while not stop.is_set():
                key = f"p{number}-{sequence}"
                sequence += 1
                try:
                    transfer(key, "platform:cash", "platform:fees", 1, effective_at=JUNE_15)
                    outcomes[number].append((key, "posted"))
                except PeriodClosed:
                    outcomes[number].append((key, "refused"))
        except BaseException as error:
            errors.append(error)
        finally:
            connection.close()

    threads = [threading.Thread(target=poster, args=(n,)) for n in range(POSTERS)]
    for thread in threads:
        thread.start()
    time.sleep(0.5)
    period_close(period_id=june.pk, closed_by_id=None, note="closed under load")
    time.sleep(0.3)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)

    assert errors == []
    closed_at = Period.objects.get(pk=june.pk).closed_at
    for results in outcomes:
        kinds = [kind for _, kind in results]
        assert "posted" in kinds
        assert "refused" in kinds
        # Once refused, always refused: the close is never undone.
        assert "posted" not in kinds[kinds.index("refused") :]
    posted = {key for results in outcomes for key, kind in results if kind == "posted"}
    stored = Transaction.objects.filter(effective_at=JUNE_15)
    assert set(stored.values_list("idempotency_key", flat=True)) == posted
    assert all(
        recorded_at < closed_at for recorded_at in stored.values_list("recorded_at", flat=True)
    )
    assert_books_hold()
