"""The journal export: every posting once, in order, with exact decimal amounts."""

from __future__ import annotations

import types
from datetime import UTC, datetime, timedelta

import pytest

from ledger.models import Posting
from ledger.selectors import JOURNAL_CHUNK_ROWS, JOURNAL_COLUMNS, format_amount, journal_rows
from ledger.services import Entry, transactions_post
from tests.ledger.factories import asset, chart, legs, transfer

pytestmark = pytest.mark.django_db


@pytest.mark.parametrize(
    ("amount", "scale", "text"),
    [
        (1234, 2, "12.34"),
        (-5, 2, "-0.05"),
        (100, 2, "1.00"),
        (7, 0, "7"),
        (-7, 0, "-7"),
        (1, 12, "0.000000000001"),
        (75_000, 12, "0.000000075000"),
        (10**38 - 1, 12, "99999999999999999999999999.999999999999"),
        (-(10**38 - 1), 24, "-99999999999999.999999999999999999999999"),
        (123, 24, "0.000000000000000000000123"),
    ],
)
def test_format_amount_is_exact_at_every_scale(amount, scale, text):
    assert format_amount(amount, scale) == text


def test_journal_has_one_row_per_posting_in_effective_order_with_exact_amounts():
    chart()
    asset("PICO", 12)
    now = datetime.now(tz=UTC)
    second = transfer(
        "second", "platform:cash", "platform:fees", 1234, effective_at=now - timedelta(hours=1)
    )
    first = transfer(
        "first",
        "platform:cash",
        "enterprise:acme:credit",
        5,
        "TOK",
        effective_at=now - timedelta(hours=2),
    )
    third = transfer("third", "provider:p1:payable", "platform:cash", 10**38 - 1, "PICO")
    rows = list(journal_rows())
    assert JOURNAL_COLUMNS == (
        "transaction_id", "idempotency_key", "effective_at", "account", "asset", "amount",
        "amount_decimal", "description",
    )  # fmt: skip
    effective = {p.transaction_id: p.effective_at.isoformat() for p in Posting.objects.all()}
    top = 10**38 - 1

    def row(posted, account, asset_code, amount, text):
        key = posted.idempotency_key
        return (posted.transaction_id, key, effective[posted.transaction_id], account, asset_code,
                amount, text, "")  # fmt: skip

    # Within a transaction, postings come in the order the caller gave its legs.
    assert rows == [
        row(first, "platform:cash", "TOK", 5, "5"),
        row(first, "enterprise:acme:credit", "TOK", -5, "-5"),
        row(second, "platform:cash", "USD", 1234, "12.34"),
        row(second, "platform:fees", "USD", -1234, "-12.34"),
        row(third, "provider:p1:payable", "PICO", top, "99999999999999999999999999.999999999999"),
        row(third, "platform:cash", "PICO", -top, "-99999999999999999999999999.999999999999"),
    ]
    assert all(type(row[5]) is int for row in rows)
    assert effective[first.transaction_id] == (now - timedelta(hours=2)).isoformat()

    window = list(journal_rows(since=now - timedelta(hours=1), until=now - timedelta(minutes=1)))
    assert [r[1] for r in window] == ["second", "second"]
    assert [r[1] for r in journal_rows(since=now - timedelta(minutes=90))] == [
        "second", "second", "third", "third",
    ]  # fmt: skip
    assert [r[1] for r in journal_rows(until=now - timedelta(hours=1))] == ["first", "first"]


def test_journal_streams_through_more_than_one_chunk():
    chart()
    count = JOURNAL_CHUNK_ROWS // 2 + 10  # two legs each: more postings than one chunk holds
    transactions_post(
        entries=[
            Entry(
                idempotency_key=f"k-{i:05d}",
                description=f"entry {i}",
                legs=legs(("platform:cash", "USD", i + 1), ("platform:fees", "USD", -(i + 1))),
            )
            for i in range(count)
        ]
    )
    rows = journal_rows()
    assert isinstance(rows, types.GeneratorType)
    seen = list(rows)
    assert len(seen) == 2 * count > JOURNAL_CHUNK_ROWS
    assert sorted(r[5] for r in seen if r[5] > 0) == list(range(1, count + 1))
    assert sum(r[5] for r in seen) == 0
    assert len({(r[0], r[3]) for r in seen}) == len(seen)
    assert seen[-1][7] == f"entry {count - 1}" or seen[-1][1].startswith("k-")
