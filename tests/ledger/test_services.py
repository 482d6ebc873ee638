"""The write services: posting, idempotency, batches, validation, reversal, periods.

These run inside one rolled-back test transaction (fast): the services check every
rule in Python before writing, which is what is under test here; the same rules in
PostgreSQL are proven with real commits in test_rules.py.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from types import MappingProxyType
from zoneinfo import ZoneInfo

import psycopg
import pytest
from django.contrib.auth import get_user_model
from django.db import OperationalError, connection, transaction
from django.db.models import F
from hypothesis import given, settings
from hypothesis import strategies as st

from ledger import services
from ledger.binding import array_literal
from ledger.exceptions import (
    AlreadyReversed,
    IdempotencyConflict,
    InvalidTransaction,
    LedgerError,
    PeriodClosed,
    UnbalancedTransaction,
    UnknownAccount,
    UnknownAsset,
)
from ledger.models import AccountKind, Period, PeriodStatus, Posting, Transaction
from ledger.services import (
    LEGS_PER_TRANSACTION_MAX,
    TRANSACTIONS_PER_BATCH_MAX,
    Entry,
    Leg,
    account_open,
    asset_create,
    period_close,
    period_open,
    transaction_post,
    transaction_reverse,
    transactions_post,
)
from tests.ledger.factories import (
    assert_books_hold,
    books_state,
    chart,
    committing_db,
    legs,
    stored_balances,
    transfer,
)

pytestmark = pytest.mark.django_db

SALE = (("platform:cash", "USD", 500), ("platform:fees", "USD", -500))


@pytest.fixture
def world() -> dict:
    return chart()


def postings_of(tx_id: int) -> list[tuple[str, str, int]]:
    return sorted(
        Posting.objects.filter(transaction_id=tx_id).values_list(
            "account__code", "asset__code", "amount"
        )
    )


# --- posting and idempotency ---------------------------------------------------------


def test_post_writes_the_legs_and_moves_the_balances(world):
    posted = transaction_post(
        idempotency_key="sale-1", legs=legs(*SALE), description="a sale", metadata={"n": 1}
    )
    assert (posted.idempotency_key, posted.created) == ("sale-1", True)
    tx = Transaction.objects.get(pk=posted.transaction_id)
    assert (tx.description, tx.metadata, tx.reverses_id) == ("a sale", {"n": 1}, None)
    assert postings_of(tx.pk) == [("platform:cash", "USD", 500), ("platform:fees", "USD", -500)]
    assert stored_balances() == {("platform:cash", "USD"): 500, ("platform:fees", "USD"): -500}
    assert_books_hold()


def test_replay_with_the_same_content_returns_the_existing_transaction(world):
    first = transaction_post(idempotency_key="sale-1", legs=legs(*SALE), metadata={"a": [1, 2]})
    before = books_state()
    again = transaction_post(idempotency_key="sale-1", legs=legs(*SALE), metadata={"a": [1, 2]})
    assert (again.transaction_id, again.created) == (first.transaction_id, False)
    assert books_state() == before


def test_replay_with_the_legs_in_another_order_is_the_same_content(world):
    first = transaction_post(idempotency_key="sale-1", legs=legs(*SALE))
    again = transaction_post(idempotency_key="sale-1", legs=legs(*reversed(SALE)))
    assert (again.transaction_id, again.created) == (first.transaction_id, False)
    assert Transaction.objects.count() == 1


@pytest.mark.parametrize(
    "changes",
    [
        {"legs": legs(("platform:cash", "USD", 501), ("platform:fees", "USD", -501))},
        {"legs": legs(("platform:cash", "USD", 500), ("enterprise:acme:credit", "USD", -500))},
        {"legs": legs(("platform:cash", "TOK", 500), ("platform:fees", "TOK", -500))},
        {"description": "another sale"},
        {"metadata": {"n": 2}},
        {"effective_at": datetime(2025, 1, 1, tzinfo=UTC)},
    ],
    ids=["amount", "account", "asset", "description", "metadata", "effective_at"],
)
def test_replay_with_different_content_is_a_conflict_and_writes_nothing(world, changes):
    original = {"legs": legs(*SALE), "description": "a sale", "metadata": {"n": 1}}
    first = transaction_post(idempotency_key="sale-1", **original)
    before = books_state()
    with pytest.raises(
        IdempotencyConflict, match=r"^idempotency key sale-1 was already posted with different"
    ) as info:
        transaction_post(idempotency_key="sale-1", **{**original, **changes})
    assert (info.value.code, info.value.status, info.value.retryable) == (
        "idempotency_conflict",
        409,
        False,
    )
    assert info.value.extra == {"idempotency_key": "sale-1", "transaction_id": first.transaction_id}
    assert books_state() == before
    assert_books_hold()


def test_replay_with_the_same_instant_written_in_another_time_zone_is_the_same_content(world):
    """The effective time is an instant; how the caller's datetime spells it is not content.

    A retry that re-reads the time from the database gets it back in UTC.
    """
    paris = datetime(2025, 3, 1, 13, 0, tzinfo=ZoneInfo("Europe/Paris"))
    first = transaction_post(idempotency_key="sale-1", legs=legs(*SALE), effective_at=paris)
    stored = Transaction.objects.get(pk=first.transaction_id).effective_at
    assert stored == paris.astimezone(UTC)
    again = transaction_post(idempotency_key="sale-1", legs=legs(*SALE), effective_at=stored)
    assert (again.transaction_id, again.created) == (first.transaction_id, False)


# --- one entry: ledger_post's small-statement path (migration 0004) ------------------


def running_balances(tx_id: int) -> list[tuple[str, str, int, int]]:
    """Return each posting's account, asset, amount and balance_after, in recorded order."""
    return [
        (a, s, int(n), int(b))
        for a, s, n, b in Posting.objects.filter(transaction_id=tx_id)
        .order_by("account__code", "asset__code", "recorded_at")
        .values_list("account__code", "asset__code", "amount", "balance_after")
    ]


def test_one_entry_with_several_legs_on_one_account_keeps_a_running_balance(world):
    transfer("before", "platform:cash", "platform:fees", 1_000)
    posted = transaction_post(
        idempotency_key="split",
        legs=legs(
            ("platform:cash", "USD", 300),
            ("platform:fees", "USD", -100),
            ("platform:cash", "USD", -50),
            ("platform:fees", "USD", -150),
            ("platform:cash", "TOK", 7),
            ("enterprise:acme:credit", "TOK", -7),
        ),
    )
    assert running_balances(posted.transaction_id) == [
        ("enterprise:acme:credit", "TOK", -7, -7),
        ("platform:cash", "TOK", 7, 7),
        ("platform:cash", "USD", 300, 1_300),
        ("platform:cash", "USD", -50, 1_250),
        ("platform:fees", "USD", -100, -1_100),
        ("platform:fees", "USD", -150, -1_250),
    ]
    assert stored_balances()[("platform:cash", "USD")] == 1_250
    assert_books_hold()


def test_one_entry_opens_the_balance_rows_it_needs(world):
    """Two legs take ledger_post_transfer (0005), three the one-entry path of 0004."""
    account_open(code="enterprise:new:unbilled", kind=AccountKind.ASSET)
    account_open(code="enterprise:other:unbilled", kind=AccountKind.ASSET)
    transfer_ = transaction_post(
        idempotency_key="first-use",
        legs=legs(("enterprise:new:unbilled", "USD", 42), ("platform:fees", "USD", -42)),
    )
    three = transaction_post(
        idempotency_key="first-use-3",
        legs=legs(
            ("enterprise:other:unbilled", "TOK", 5),
            ("platform:fees", "TOK", -2),
            ("enterprise:new:unbilled", "TOK", -3),
        ),
    )
    assert (transfer_.created, three.created) == (True, True)
    balances = stored_balances()
    assert balances[("enterprise:new:unbilled", "USD")] == 42
    assert balances[("enterprise:other:unbilled", "TOK")] == 5
    assert balances[("enterprise:new:unbilled", "TOK")] == -3
    again = transaction_post(
        idempotency_key="first-use",
        legs=legs(("platform:fees", "USD", -42), ("enterprise:new:unbilled", "USD", 42)),
    )
    assert (again.transaction_id, again.created) == (transfer_.transaction_id, False)
    with pytest.raises(IdempotencyConflict):
        transaction_post(
            idempotency_key="first-use",
            legs=legs(("enterprise:new:unbilled", "USD", 43), ("platform:fees", "USD", -43)),
        )
    assert_books_hold()


def test_a_wide_entry_keeps_a_running_balance_per_posting(world):
    """Over 32 legs ledger_post takes its set path."""
    many = [("platform:cash", "USD", 1)] * 40 + [("platform:fees", "USD", -40)]
    posted = transaction_post(idempotency_key="wide", legs=legs(*many))
    balances = [b for a, _, _, b in running_balances(posted.transaction_id) if a == "platform:cash"]
    assert balances == list(range(1, 41))
    assert_books_hold()


# --- batches ---------------------------------------------------------------------------


def test_batch_posts_every_entry_in_order_in_one_go(world):
    entries = [
        Entry(
            idempotency_key=f"batch-{i}",
            legs=legs(("platform:cash", "USD", i + 1), ("provider:p1:payable", "USD", -(i + 1))),
        )
        for i in range(500)
    ]
    posted = transactions_post(entries=entries)
    assert [p.idempotency_key for p in posted] == [f"batch-{i}" for i in range(500)]
    assert all(p.created for p in posted)
    assert len({p.transaction_id for p in posted}) == 500
    assert Posting.objects.count() == 1000
    total = 500 * 501 // 2
    assert stored_balances() == {
        ("platform:cash", "USD"): total,
        ("provider:p1:payable", "USD"): -total,
    }
    assert_books_hold()


def test_a_batch_numbers_its_transactions_in_the_order_given_not_by_key(world):
    """Ids are drawn in entry order (0008); keys are still taken in key order."""
    keys = ["k-c", "k-a", "k-b"]
    posted = transactions_post(entries=[Entry(key, legs(*SALE)) for key in keys])
    ids = [p.transaction_id for p in posted]
    assert ids == sorted(ids)
    assert [Transaction.objects.get(pk=i).idempotency_key for i in ids] == keys
    firsts = {
        t.idempotency_key: (t.first_posting_id, min(t.postings.values_list("id", flat=True)))
        for t in Transaction.objects.filter(pk__in=ids)
    }
    assert all(named == first for named, first in firsts.values()), firsts
    assert_books_hold()


def test_a_batch_naming_an_unknown_account_and_a_conflicting_key_reports_the_conflict(world):
    """The transactions go in before the codes are resolved per balance row (0008)."""
    transaction_post(idempotency_key="sold", legs=legs(*SALE))
    before = books_state()
    changed = Entry("sold", legs(("platform:cash", "USD", 501), ("platform:fees", "USD", -501)))
    stranger = Entry("new", legs(("nobody:x", "USD", 5), ("platform:fees", "USD", -5)))
    with pytest.raises(IdempotencyConflict):
        transactions_post(entries=[stranger, changed])
    # With the conflicting entry replayed as it was, the unknown account is named.
    with pytest.raises(UnknownAccount, match=r"^unknown accounts: nobody:x$"):
        transactions_post(entries=[stranger, Entry("sold", legs(*SALE))])
    assert books_state() == before
    assert not Transaction.objects.filter(idempotency_key="new").exists()


def test_a_batch_dated_now_is_recorded_from_its_own_instant(world):
    """Its postings are not back-dated by the time the batch took to post (migration 0007).

    Each balance row's run starts at the batch's instant, one microsecond apart: on
    0006 they started after the batch had locked its rows, 20 ms and more later, which
    put every posting of the batch in the back-dated index.
    """
    entries = [
        Entry(
            idempotency_key=f"now-{i}",
            legs=legs(("platform:cash", "USD", i + 1), ("provider:p1:payable", "USD", -(i + 1))),
        )
        for i in range(1000)
    ]
    transactions_post(entries=entries)
    lags = sorted(
        Posting.objects.annotate(lag=F("recorded_at") - F("effective_at")).values_list(
            "lag", flat=True
        )
    )
    # two balance rows, a run of 1,000 postings each
    assert lags == sorted(2 * [timedelta(microseconds=n) for n in range(1000)])
    assert set(Transaction.objects.values_list("recorded_at", flat=True)) == set(
        Transaction.objects.values_list("effective_at", flat=True)
    )
    assert_books_hold()


def test_batch_with_some_keys_already_posted_writes_only_the_new_ones(world):
    old = transfer("k-1", "platform:cash", "platform:fees", 10)
    old_3 = transfer("k-3", "platform:cash", "platform:fees", 30)
    entries = [
        Entry(
            idempotency_key=f"k-{i}",
            legs=legs(("platform:cash", "USD", 10 * i), ("platform:fees", "USD", -10 * i)),
        )
        for i in range(1, 5)
    ]
    posted = transactions_post(entries=entries)
    assert [(p.idempotency_key, p.created) for p in posted] == [
        ("k-1", False),
        ("k-2", True),
        ("k-3", False),
        ("k-4", True),
    ]
    assert posted[0].transaction_id == old.transaction_id
    assert posted[2].transaction_id == old_3.transaction_id
    assert Transaction.objects.count() == 4
    assert stored_balances()[("platform:cash", "USD")] == 100
    # The whole batch again is a pure replay.
    before = books_state()
    assert [p.created for p in transactions_post(entries=entries)] == [False] * 4
    assert books_state() == before
    assert_books_hold()


def test_a_conflict_anywhere_in_a_batch_writes_nothing_of_the_batch(world):
    transfer("k-2", "platform:cash", "platform:fees", 20)
    before = books_state()
    entries = [
        Entry(idempotency_key="k-1", legs=legs(*SALE)),
        Entry(idempotency_key="k-2", legs=legs(*SALE)),  # posted before with 20, not 500
        Entry(idempotency_key="k-3", legs=legs(*SALE)),
    ]
    with pytest.raises(IdempotencyConflict, match=r"^idempotency key k-2 was already posted"):
        transactions_post(entries=entries)
    assert books_state() == before
    assert not Transaction.objects.filter(idempotency_key__in=["k-1", "k-3"]).exists()


def test_batch_limits_are_enforced_before_anything_is_written(world):
    with pytest.raises(InvalidTransaction, match=r"^a batch holds 1\.\.10000 transactions$"):
        transactions_post(entries=[])
    entry = Entry(idempotency_key="k", legs=legs(*SALE))
    with pytest.raises(InvalidTransaction, match=r"a batch holds 1\.\.10000"):
        transactions_post(entries=[entry] * (TRANSACTIONS_PER_BATCH_MAX + 1))
    with pytest.raises(
        InvalidTransaction, match=r"^idempotency keys repeated within one batch: \['k'\]$"
    ):
        transactions_post(entries=[entry, Entry(idempotency_key="k", legs=legs(*SALE))])
    assert Transaction.objects.count() == 0


# --- validation ------------------------------------------------------------------------


def rejected(error: type[LedgerError], match: str, code: str, **entry: object) -> LedgerError:
    """Post `entry`, assert it fails with `error` and `code`, and that nothing was written."""
    before = books_state()
    with pytest.raises(error, match=match) as info:
        transaction_post(**{"idempotency_key": "bad", "legs": legs(*SALE), **entry})
    assert info.value.code == code
    assert books_state() == before
    return info.value


@pytest.mark.parametrize(
    "amount", [True, False, 0, 1.0, Decimal("5"), "5", 10**38, -(10**38)], ids=repr
)
def test_a_leg_amount_must_be_a_non_zero_integer_in_range(world, amount):
    bad = Leg(account="platform:cash", asset="USD", amount=amount)  # type: ignore[arg-type]
    error = rejected(
        InvalidTransaction,
        "^"
        + re.escape(f"leg amount {amount!r} of bad must be a non-zero integer of smallest units"),
        "invalid_transaction",
        legs=[bad, *legs(("platform:fees", "USD", -5))],
    )
    assert error.extra == {"idempotency_key": "bad", "account": "platform:cash"}


def test_the_largest_amount_in_range_is_accepted(world):
    top = 10**38 - 1
    posted = transaction_post(
        idempotency_key="big",
        legs=legs(("platform:cash", "USD", top), ("platform:fees", "USD", -top)),
    )
    assert postings_of(posted.transaction_id) == [
        ("platform:cash", "USD", top),
        ("platform:fees", "USD", -top),
    ]
    assert stored_balances()[("platform:cash", "USD")] == top


def test_unbalanced_legs_are_refused_naming_each_asset_and_its_sum(world):
    error = rejected(
        UnbalancedTransaction,
        r"^transaction bad does not balance: TOK sums to 1, USD sums to -2$",
        "transaction_unbalanced",
        legs=legs(
            ("platform:cash", "USD", 3),
            ("platform:fees", "USD", -5),
            ("platform:cash", "TOK", 1),
        ),
    )
    assert error.extra == {"idempotency_key": "bad", "sums": {"TOK": "1", "USD": "-2"}}
    assert error.status == 422


@pytest.mark.parametrize("count", [0, 1, LEGS_PER_TRANSACTION_MAX + 1])
def test_a_transaction_has_two_legs_up_to_the_limit(world, count):
    pairs = [("platform:cash", "USD", 1), ("platform:fees", "USD", -1)] * (count // 2 + 1)
    rejected(
        InvalidTransaction,
        rf"^transaction bad has {count} legs; 2\.\.1000 allowed$",
        "invalid_transaction",
        legs=legs(*pairs[:count]),
    )


def test_a_transaction_with_the_maximum_number_of_legs_posts(world):
    pairs = [("platform:cash", "USD", 1), ("platform:fees", "USD", -1)] * (
        LEGS_PER_TRANSACTION_MAX // 2
    )
    posted = transaction_post(idempotency_key="wide", legs=legs(*pairs))
    assert Posting.objects.filter(transaction_id=posted.transaction_id).count() == 1000
    assert stored_balances()[("platform:cash", "USD")] == 500
    assert_books_hold()


def test_unknown_accounts_are_named(world):
    error = rejected(
        UnknownAccount,
        r"^unknown accounts: nobody:a, nobody:b$",
        "unknown_account",
        legs=legs(("nobody:b", "USD", 5), ("nobody:a", "USD", -3), ("platform:fees", "USD", -2)),
    )
    assert error.extra == {"accounts": ["nobody:a", "nobody:b"]}
    assert error.status == 422


def test_unknown_accounts_of_a_transfer_are_named_the_same_way(world):
    """Two legs go to ledger_post_transfer (0005), which leaves the naming to ledger_post."""
    error = rejected(
        UnknownAccount,
        r"^unknown accounts: nobody:a, nobody:b$",
        "unknown_account",
        legs=legs(("nobody:b", "USD", 5), ("nobody:a", "USD", -5)),
    )
    assert error.extra == {"accounts": ["nobody:a", "nobody:b"]}


def test_unknown_assets_are_named(world):
    error = rejected(
        UnknownAsset,
        r"^unknown assets: XYZ$",
        "unknown_asset",
        legs=legs(("platform:cash", "XYZ", 5), ("platform:fees", "XYZ", -5)),
    )
    assert error.extra == {"assets": ["XYZ"]}


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"idempotency_key": ""}, r"^idempotency key must be 1\.\.200 characters$"),
        ({"idempotency_key": "k" * 201}, r"^idempotency key must be 1\.\.200 characters$"),
        ({"description": "d" * 1001}, r"^description of bad is over 1000 chars$"),
        ({"effective_at": datetime(2025, 1, 1)}, r"^effective time of bad has no time zone$"),  # noqa: DTZ001
        ({"metadata": {"blob": "x" * 20_000}}, r"^metadata of bad is over 16384 bytes$"),
    ],
    ids=["empty-key", "long-key", "long-description", "naive-time", "big-metadata"],
)
def test_entry_limits(world, entry, message):
    rejected(InvalidTransaction, message, "invalid_transaction", **entry)


def test_a_key_of_the_maximum_length_posts(world):
    posted = transaction_post(idempotency_key="k" * 200, legs=legs(*SALE))
    assert posted.created


# --- reversal ----------------------------------------------------------------------


def test_reversal_restores_every_balance_and_is_linked_to_the_original(world):
    transfer("base", "platform:cash", "enterprise:acme:credit", 1_000)
    before = stored_balances()
    original = transaction_post(
        idempotency_key="usage-1",
        description="usage",
        legs=legs(
            ("enterprise:acme:credit", "USD", 300),
            ("provider:p1:payable", "USD", -270),
            ("platform:fees", "USD", -30),
            ("platform:cash", "TOK", 5_000),
            ("provider:p1:payable", "TOK", -5_000),
        ),
    )
    reversal = transaction_reverse(transaction_id=original.transaction_id, idempotency_key="rev-1")
    assert reversal.created
    tx = Transaction.objects.get(pk=reversal.transaction_id)
    assert tx.reverses_id == original.transaction_id
    assert tx.description == f"Reversal of #{original.transaction_id}: usage"
    assert Transaction.objects.get(pk=original.transaction_id).reversed_by.get() == tx
    assert postings_of(tx.pk) == sorted(
        (a, s, -n) for a, s, n in postings_of(original.transaction_id)
    )
    after = stored_balances()
    assert {k: v for k, v in after.items() if v} == {k: v for k, v in before.items() if v}
    assert after[("provider:p1:payable", "TOK")] == 0
    assert_books_hold()


def test_reversal_replayed_with_its_key_returns_it_and_a_second_reversal_is_refused(world):
    original = transfer("sale", "platform:cash", "platform:fees", 500)
    first = transaction_reverse(transaction_id=original.transaction_id, idempotency_key="rev-1")
    before = books_state()
    again = transaction_reverse(transaction_id=original.transaction_id, idempotency_key="rev-1")
    assert (again.transaction_id, again.created) == (first.transaction_id, False)
    with pytest.raises(
        AlreadyReversed, match=rf"^transaction {original.transaction_id} is already reversed$"
    ) as info:
        transaction_reverse(transaction_id=original.transaction_id, idempotency_key="rev-2")
    assert (info.value.code, info.value.status) == ("already_reversed", 409)
    assert info.value.extra == {"transaction_id": original.transaction_id}
    assert books_state() == before
    assert_books_hold()


def test_a_second_reversal_in_a_batch_is_refused_and_the_batch_writes_nothing(world):
    """The batch path: its plain INSERT meets the reversal's unique link, and so does the
    ON CONFLICT INSERT it falls back to (0007); the whole batch is refused."""
    original = transfer("sale", "platform:cash", "platform:fees", 500)
    transaction_reverse(transaction_id=original.transaction_id, idempotency_key="rev-1")
    before = books_state()
    again = Entry(
        idempotency_key="rev-2",
        legs=legs(("platform:cash", "USD", -500), ("platform:fees", "USD", 500)),
        reverses_id=original.transaction_id,
    )
    with pytest.raises(AlreadyReversed):
        transactions_post(entries=[Entry("other", legs(*SALE)), again])
    assert books_state() == before
    assert not Transaction.objects.filter(idempotency_key__in=["other", "rev-2"]).exists()


def test_reversal_of_a_reversal_restores_the_original_balances(world):
    original = transaction_post(
        idempotency_key="orig",
        legs=legs(
            ("platform:cash", "USD", 700),
            ("platform:fees", "USD", -700),
            ("enterprise:acme:credit", "TOK", 9),
            ("provider:p1:payable", "TOK", -9),
        ),
    )
    with_original = stored_balances()
    reversal = transaction_reverse(transaction_id=original.transaction_id, idempotency_key="r1")
    assert set(stored_balances().values()) == {0}
    again = transaction_reverse(transaction_id=reversal.transaction_id, idempotency_key="r2")
    assert stored_balances() == with_original
    assert Transaction.objects.get(pk=again.transaction_id).reverses_id == reversal.transaction_id
    assert_books_hold()


def test_reversing_a_missing_transaction_is_refused(world):
    with pytest.raises(InvalidTransaction, match=r"^transaction 999999 does not exist$"):
        transaction_reverse(transaction_id=999_999, idempotency_key="rev")
    assert Transaction.objects.count() == 0


def test_an_entry_that_claims_to_reverse_a_transaction_must_negate_it(world):
    """A linked reversal that does not negate its original is what ledger_verify rejects.

    The service is the one way in, so it must refuse to write books that verify calls wrong.
    """
    original = transfer("sale", "platform:cash", "platform:fees", 500)
    before = books_state()
    bogus = Entry(
        idempotency_key="fake-reversal",
        legs=legs(("platform:fees", "USD", 1), ("platform:cash", "USD", -1)),
        reverses_id=original.transaction_id,
    )
    with pytest.raises(
        InvalidTransaction,
        match=rf"^transaction fake-reversal reverses #{original.transaction_id} but does not "
        "negate it$",
    ):
        transactions_post(entries=[bogus])
    assert books_state() == before
    assert_books_hold()


def test_replay_of_an_entry_dated_in_a_period_closed_since_returns_it(world):
    june = period_open(year=2024, month=6)
    june_15 = datetime(2024, 6, 15, tzinfo=UTC)
    first = transfer("june", "platform:cash", "platform:fees", 5, effective_at=june_15)
    period_close(period_id=june.pk, closed_by_id=None)
    before = books_state()
    again = transfer("june", "platform:cash", "platform:fees", 5, effective_at=june_15)
    assert (again.transaction_id, again.created) == (first.transaction_id, False)
    with pytest.raises(IdempotencyConflict, match=r"^idempotency key june was already posted"):
        transfer("june", "platform:cash", "platform:fees", 6, effective_at=june_15)
    with pytest.raises(PeriodClosed, match=r"falls in the closed period"):
        transfer("june-late", "platform:cash", "platform:fees", 5, effective_at=june_15)
    assert books_state() == before
    # A batch of that replay and a new entry dated now posts only the new one.
    posted = transactions_post(
        entries=[
            Entry(
                idempotency_key="june",
                legs=legs(("platform:cash", "USD", 5), ("platform:fees", "USD", -5)),
                effective_at=june_15,
            ),
            Entry(idempotency_key="july", legs=legs(*SALE)),
        ]
    )
    assert [(p.idempotency_key, p.created) for p in posted] == [("june", False), ("july", True)]
    assert posted[0].transaction_id == first.transaction_id
    assert Transaction.objects.count() == 2
    assert_books_hold()


# --- assets and accounts ---------------------------------------------------------------


def test_asset_create_is_idempotent_and_the_scale_is_part_of_the_identity(world):
    assert asset_create(code="USD", scale=2).pk == world["usd"].pk
    with pytest.raises(IdempotencyConflict, match=r"^asset USD exists with scale 2, not 12$"):
        asset_create(code="USD", scale=12)
    for scale in (-1, 25):
        with pytest.raises(InvalidTransaction, match=rf"^asset scale {scale} is outside 0\.\.24$"):
            asset_create(code="EUR", scale=scale)
    assert asset_create(code="EUR", scale=24).scale == 24


def test_account_open_is_idempotent_and_the_kind_is_part_of_the_identity(world):
    assert account_open(code="platform:cash", kind="asset").pk == world["cash"].pk
    with pytest.raises(
        IdempotencyConflict, match=r"^account platform:cash exists as asset, not liability$"
    ) as info:
        account_open(code="platform:cash", kind=AccountKind.LIABILITY)
    assert info.value.extra == {"account": "platform:cash"}


# --- periods -------------------------------------------------------------------------


def test_period_open_is_a_utc_calendar_month_and_idempotent(world):
    december = period_open(year=2024, month=12)
    assert (december.starts_at, december.ends_at) == (
        datetime(2024, 12, 1, tzinfo=UTC),
        datetime(2025, 1, 1, tzinfo=UTC),
    )
    assert period_open(year=2024, month=12).pk == december.pk
    february = period_open(year=2024, month=2)
    assert february.ends_at - february.starts_at == timedelta(days=29)
    assert Period.objects.count() == 2


def test_period_close_records_who_and_when_and_is_idempotent(world):
    users = get_user_model().objects
    alice = users.create_user("alice")
    bob = users.create_user("bob")
    period = period_open(year=2024, month=6)
    assert period.status == PeriodStatus.OPEN
    before = datetime.now(tz=UTC)
    closed = period_close(period_id=period.pk, closed_by_id=alice.pk, note="June done")
    stored = Period.objects.get(pk=period.pk)
    assert (stored.status, stored.closed_by_id, stored.close_note) == (
        "closed",
        alice.pk,
        "June done",
    )
    assert before <= stored.closed_at <= datetime.now(tz=UTC)
    assert closed.closed_at == stored.closed_at
    # Closing again changes nothing: not the closer, not the time, not the note.
    again = period_close(period_id=period.pk, closed_by_id=bob.pk, note="again")
    assert (again.closed_by_id, again.closed_at, again.close_note) == (
        alice.pk,
        stored.closed_at,
        "June done",
    )
    assert Period.objects.get(pk=period.pk).closed_by_id == alice.pk


def test_closing_a_period_leaves_the_neighbouring_periods_open_to_postings(world):
    june = period_open(year=2024, month=6)
    period_open(year=2024, month=7)
    period_close(period_id=june.pk, closed_by_id=None)
    last_may = datetime(2024, 6, 1, tzinfo=UTC) - timedelta(microseconds=1)
    first_july = datetime(2024, 7, 1, tzinfo=UTC)
    assert transfer("may", "platform:cash", "platform:fees", 1, effective_at=last_may).created
    assert transfer("july", "platform:cash", "platform:fees", 1, effective_at=first_july).created
    assert_books_hold()


# --- replay and conflict after real commits ------------------------------------------


@committing_db
def test_replay_and_conflict_after_the_original_committed():
    chart()
    first = transfer("sale-1", "platform:cash", "platform:fees", 500)
    before = books_state()
    again = transfer("sale-1", "platform:cash", "platform:fees", 500)
    assert (again.transaction_id, again.created) == (first.transaction_id, False)
    with pytest.raises(IdempotencyConflict, match=r"^idempotency key sale-1 was already posted"):
        transfer("sale-1", "platform:cash", "platform:fees", 501)
    assert books_state() == before
    assert_books_hold()


@committing_db
def test_a_transfer_committed_on_its_own_goes_through_libpq_and_says_the_same():
    """Outside a transaction a transfer skips psycopg's cursor (ledger.binding.exec_prepared):
    the same rows, instants, errors and their details as inside one."""
    chart()
    tokyo = datetime(2025, 2, 1, 9, 0, tzinfo=timezone(timedelta(hours=9)))
    posted = transfer("tokyo", "platform:cash", "platform:fees", 7, effective_at=tokyo)
    tx = Transaction.objects.get(pk=posted.transaction_id)
    assert (posted.created, tx.effective_at) == (True, datetime(2025, 2, 1, 0, 0, tzinfo=UTC))
    assert postings_of(tx.pk) == [("platform:cash", "USD", 7), ("platform:fees", "USD", -7)]
    with pytest.raises(UnknownAccount, match=r"^unknown accounts: nobody:a$") as unknown:
        transfer("unknown", "nobody:a", "platform:fees", 1)
    assert unknown.value.extra == {"accounts": ["nobody:a"]}
    may = period_open(year=2024, month=5)
    period_close(period_id=may.pk, closed_by_id=None)
    with pytest.raises(PeriodClosed, match=r"falls in the closed period 2024-05-01"):
        transfer(
            "late",
            "platform:cash",
            "platform:fees",
            1,
            effective_at=datetime(2024, 5, 9, tzinfo=UTC),
        )
    # A pooler's DISCARD or a DEALLOCATE drops the prepared statement: prepared again.
    with connection.cursor() as cursor:
        cursor.execute("DEALLOCATE ALL")
    assert transfer("after-deallocate", "platform:cash", "platform:fees", 1).created
    # An offset of seconds and microseconds is sent as the instant it names.
    odd_zone = datetime(2025, 2, 1, tzinfo=timezone(timedelta(seconds=1, microseconds=5)))
    odd = transfer("odd-offset", "platform:cash", "platform:fees", 1, effective_at=odd_zone)
    assert Transaction.objects.get(pk=odd.transaction_id).effective_at == odd_zone
    assert stored_balances()[("platform:cash", "USD")] == 9
    assert_books_hold()


@committing_db
def test_a_transfer_committed_on_its_own_is_committed_before_the_call_waits_for_the_flush():
    """Outside a transaction a transfer is two commits in one call (migration 0010): its
    own, which frees its balance rows without waiting for the WAL flush, then one that
    writes WAL and so waits for the flush, which covers the first. Both committed."""
    chart()
    transfer("warm-up", "platform:cash", "platform:fees", 1)
    before = next_xid()
    posted = [transfer(f"durable-{n}", "platform:cash", "platform:fees", 1) for n in range(10)]
    # At least: another session of the cluster may take transaction ids meanwhile.
    assert next_xid() - before >= 2 * len(posted)
    xids = list(
        Transaction.objects.filter(pk__in=[p.transaction_id for p in posted]).values_list(
            "created_xact", flat=True
        )
    )
    with connection.cursor() as cursor:  # each transfer's, and the one after it (quiet here)
        cursor.execute(
            "SELECT DISTINCT pg_xact_status(x::text::xid8) FROM unnest(%s::bigint[]) AS x",
            [xids + [xid + 1 for xid in xids]],
        )
        assert cursor.fetchall() == [("committed",)]
    # A replay answers after the same flush, and so does a conflict's refusal.
    assert transfer("durable-0", "platform:cash", "platform:fees", 1) == posted[0]._replace(
        created=False
    )
    with pytest.raises(IdempotencyConflict):
        transfer("durable-0", "platform:cash", "platform:fees", 2)
    assert stored_balances()[("platform:cash", "USD")] == 11
    assert_books_hold()


INTERRUPTED_SQL = """
CREATE PROCEDURE test_interrupted_transfer(
  p_key text, p_hash text, p_description text, p_effective_at timestamptz, p_metadata text,
  p_account_1 text, p_account_2 text, p_asset text, p_amount_1 numeric,
  INOUT transaction_id bigint DEFAULT NULL, INOUT created boolean DEFAULT NULL)
LANGUAGE plpgsql AS $$
BEGIN
  SELECT r.transaction_id, r.created INTO transaction_id, created
    FROM ledger_post_transfer(p_key, p_hash, p_description, p_effective_at, p_metadata,
                              p_account_1, p_account_2, p_asset, p_amount_1) AS r;
  IF p_description = 'cancelled after the commit' THEN
    PERFORM set_config('synchronous_commit', 'off', true);
    COMMIT;
  END IF;
  RAISE EXCEPTION USING ERRCODE = '57014', MESSAGE = 'canceling statement due to user request';
END $$;
"""


@committing_db
def test_a_transfer_cancelled_after_its_commit_is_answered_as_posted_and_before_it_is_not(
    monkeypatch,
):
    """A cancel or a statement timeout can land between the procedure's two commits (0010):
    the service then asks the key whether the transfer was made, flushes, and answers it
    (created=False: the call cannot tell who made it). Cancelled before its commit, the
    error stands and nothing was posted."""
    chart()
    with connection.cursor() as cursor:
        cursor.execute(INTERRUPTED_SQL)
    try:
        monkeypatch.setattr(
            services,
            "_LEDGER_POST_TRANSFER_DURABLY",
            services._LEDGER_POST_TRANSFER_DURABLY.replace(
                "ledger_post_transfer_durably", "test_interrupted_transfer"
            ),
        )
        entry = {"legs": legs(("platform:cash", "USD", 5), ("platform:fees", "USD", -5))}
        with pytest.raises(OperationalError, match="canceling statement"):
            transaction_post(idempotency_key="before", description="cancelled before", **entry)
        assert not Transaction.objects.filter(idempotency_key="before").exists()
        posted = transaction_post(
            idempotency_key="after", description="cancelled after the commit", **entry
        )
        made = Transaction.objects.get(idempotency_key="after")
        assert (posted.transaction_id, posted.created) == (made.pk, False)
        assert stored_balances()[("platform:cash", "USD")] == 5
        # A ledger rule broken before the commit is reported as it was.
        with pytest.raises(IdempotencyConflict):
            transaction_post(idempotency_key="after", description="something else", **entry)
    finally:
        with connection.cursor() as cursor:
            cursor.execute("DROP PROCEDURE test_interrupted_transfer")
    assert_books_hold()


@committing_db
def test_a_replay_writes_wal_so_that_its_commit_waits_for_the_flush():
    """A replay posts nothing, yet writes a WAL record (0010): the original may have been
    committed by a transfer that has not flushed yet (0010's early release), and a
    transaction that wrote no WAL commits without waiting for the flush. (Before 0010 a
    batch's replay already wrote some, its plain INSERT's; the others wrote none, but
    for a sequence's record now and then.)"""
    chart()
    three = legs(
        ("platform:cash", "USD", 3), ("platform:fees", "USD", -2), ("platform:fees", "USD", -1)
    )
    batch = [
        Entry(
            idempotency_key=f"batch-{n}",
            legs=legs(("platform:cash", "TOK", n), ("platform:fees", "TOK", -n)),
        )
        for n in (1, 2)
    ]
    original = transfer("original", "platform:cash", "platform:fees", 7)
    transaction_post(idempotency_key="three", legs=three)
    transactions_post(entries=batch)
    replays = {
        "a transfer": lambda: [transfer("original", "platform:cash", "platform:fees", 7)],
        "one entry": lambda: [transaction_post(idempotency_key="three", legs=three)],
        "a batch": lambda: transactions_post(entries=batch),
    }
    for kind, replay in replays.items():
        with transaction.atomic():  # the function path: nothing else in this transaction
            before = wal_inserted()
            answers = replay()
            wrote = wal_inserted() > before
        assert [a.created for a in answers] == [False] * len(answers), kind
        assert wrote, f"a replay of {kind} wrote no WAL"
    assert replays["a transfer"]()[0] == original._replace(created=False)
    assert_books_hold()


@committing_db
def test_a_transfer_inside_a_transaction_django_does_not_know_of_joins_that_transaction():
    """A raw BEGIN leaves Django in autocommit: the transfer sees the open transaction and
    joins it (the procedure's COMMIT would fail there), so a ROLLBACK takes it back."""
    chart()
    with connection.cursor() as cursor:
        cursor.execute("BEGIN")
    posted = transfer("raw-begin", "platform:cash", "platform:fees", 4)
    assert Transaction.objects.filter(pk=posted.transaction_id).exists()
    with connection.cursor() as cursor:
        cursor.execute("ROLLBACK")
    assert not Transaction.objects.filter(idempotency_key="raw-begin").exists()
    assert stored_balances().get(("platform:cash", "USD"), 0) == 0
    assert_books_hold()


def wal_inserted() -> int:
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_current_wal_insert_lsn() - '0/0'")
        return int(cursor.fetchone()[0])


def next_xid() -> int:
    with connection.cursor() as cursor:  # reads assign no transaction id
        cursor.execute("SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint")
        return int(cursor.fetchone()[0])


ODD_TEXTS = [
    'a "quote"',
    "back\\slash",
    "comma, {brace}",
    "new\nline",
    "NULL",
    "",
    "ünï ✓",
    " pad ",
]


@committing_db
def test_a_batch_committed_on_its_own_stores_every_character_it_was_given():
    """Outside a transaction a batch goes through libpq as array literals (array_literal)."""
    chart()
    odd = account_open(code="odd:texts", kind=AccountKind.ASSET)  # codes have a format
    entries = [
        Entry(
            idempotency_key=f"{text}#{n}",
            legs=legs((odd.code, "USD", n + 1), ("platform:fees", "USD", -(n + 1))),
            description=text,
            effective_at=datetime(2025, 3, 1, 9, n, tzinfo=ZoneInfo("Asia/Tokyo"))
            if n % 2
            else None,
            metadata={"text": text} if n % 3 else {},
        )
        for n, text in enumerate(ODD_TEXTS)
    ]
    posted = transactions_post(entries=entries)
    stored = {
        t.pk: t for t in Transaction.objects.filter(pk__in=[p.transaction_id for p in posted])
    }
    for entry, result in zip(entries, posted, strict=True):
        tx = stored[result.transaction_id]
        assert (tx.idempotency_key, tx.description, tx.metadata) == (
            entry.idempotency_key,
            entry.description,
            dict(entry.metadata),
        )
        if entry.effective_at:
            assert tx.effective_at == entry.effective_at
    assert stored_balances()[(odd.code, "USD")] == sum(range(1, len(ODD_TEXTS) + 1))
    again = transactions_post(entries=entries)
    assert [(p.transaction_id, p.created) for p in again] == [
        (p.transaction_id, False) for p in posted
    ]
    assert_books_hold()


@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.one_of(
            st.none(),
            st.text(st.characters(blacklist_characters="\x00", blacklist_categories=("Cs",))),
        ),
        max_size=8,
    )
)
def test_array_literal_is_read_back_as_the_same_array(values):
    with connection.cursor() as cursor:
        cursor.execute("SELECT %s::text[]", [array_literal(values).decode()])
        assert cursor.fetchone()[0] == values


@settings(max_examples=60, deadline=None)
@given(st.lists(st.none() | st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=8))
def test_array_literal_of_integers_is_read_back_as_the_same_array(values):
    with connection.cursor() as cursor:
        cursor.execute("SELECT %s::bigint[]", [array_literal(values).decode()])
        assert cursor.fetchone()[0] == values


def test_array_literal_refuses_a_nul_rather_than_cut_it():
    with pytest.raises(ValueError, match="NUL"):
        array_literal(["a", "b\x00c"])


def content_json_reference(entry: Entry) -> str:
    """The canonical JSON every stored content hash was taken of: what the encoder makes."""
    return services._CONTENT_ENCODER.encode(
        {
            "legs": sorted((leg.account, leg.asset, leg.amount) for leg in entry.legs),
            "description": entry.description,
            "effective_at": entry.effective_at.astimezone(UTC).isoformat()
            if entry.effective_at
            else None,
            "metadata": entry.metadata,
            "reverses": entry.reverses_id,
        }
    )


ZONES = [UTC, ZoneInfo("Asia/Tokyo"), ZoneInfo("America/St_Johns")]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


@settings(max_examples=300, deadline=None)
@given(
    legs_=st.lists(
        st.tuples(st.text(), st.text(), st.integers(min_value=-(10**40), max_value=10**40)),
        min_size=2,
        max_size=4,
    ),
    description=st.text(),
    effective_at=st.none()
    | st.datetimes(
        timezones=st.sampled_from([UTC, ZoneInfo("Asia/Tokyo"), ZoneInfo("America/St_Johns")])
    ),
    metadata=st.dictionaries(st.text(), json_values, max_size=4),
    reverses=st.none() | st.integers(min_value=1, max_value=2**63 - 1),
)
def test_content_json_is_the_encoders_byte_for_byte(
    legs_, description, effective_at, metadata, reverses
):
    entry = Entry(
        idempotency_key="k",
        legs=tuple(Leg(account=a, asset=s_, amount=n) for a, s_, n in legs_),
        description=description,
        effective_at=effective_at,
        metadata=metadata,
        reverses_id=reverses,
    )
    assert services._content_json(entry) == content_json_reference(entry)


@pytest.mark.parametrize(
    ("metadata", "reverses"),
    [(None, None), (MappingProxyType({}), None), ({}, Decimal(7)), (MappingProxyType({"a": 1}), 7)],
)
def test_content_json_matches_the_encoder_for_other_mappings_and_numbers(metadata, reverses):
    entry = Entry(idempotency_key="k", legs=legs(*SALE), metadata=metadata, reverses_id=reverses)
    assert services._content_json(entry) == content_json_reference(entry)


@committing_db
def test_the_libpq_path_survives_a_statement_prepared_by_another_connection_object():
    # A pooled server connection may reach a new DatabaseWrapper that does not know the
    # statement is prepared there already (42P05): it is the same statement.
    chart()
    assert transfer("pooled-1", "platform:cash", "platform:fees", 1).created
    delattr(connection, "_ledger_prepared")
    assert transfer("pooled-2", "platform:cash", "platform:fees", 1).created
    assert stored_balances()[("platform:cash", "USD")] == 2


@committing_db
def test_a_lost_connection_is_an_operational_error_on_the_libpq_path():
    chart()
    transfer("before", "platform:cash", "platform:fees", 1)
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        (pid,) = cursor.fetchone()
    with psycopg.connect(**connection.get_connection_params(), autocommit=True) as other:
        other.execute("SELECT pg_terminate_backend(%s)", [pid])
    with pytest.raises(OperationalError):
        transfer("after", "platform:cash", "platform:fees", 1)
    connection.close()
    assert transfer("after", "platform:cash", "platform:fees", 1).created


def test_a_nul_character_in_metadata_is_refused_by_name(world):
    with pytest.raises(InvalidTransaction, match="metadata contains a NUL character"):
        transaction_post(idempotency_key="nul-meta", legs=legs(*SALE), metadata={"x": "a\x00b"})


def test_a_nul_character_is_refused_by_name(world):
    with pytest.raises(InvalidTransaction, match="contains a NUL character"):
        transaction_post(idempotency_key="nul", legs=legs(*SALE), description="a\x00b")
    with pytest.raises(InvalidTransaction, match="contains a NUL character"):
        transaction_post(idempotency_key="n\x00l", legs=legs(*SALE))


def test_effective_time_in_another_zone_is_stored_as_the_same_instant(world):
    tokyo = datetime(2025, 2, 1, 9, 0, tzinfo=timezone(timedelta(hours=9)))
    posted = transfer("tokyo", "platform:cash", "platform:fees", 1, effective_at=tokyo)
    tx = Transaction.objects.get(pk=posted.transaction_id)
    assert tx.effective_at == datetime(2025, 2, 1, 0, 0, tzinfo=UTC)
    assert {p.effective_at for p in tx.postings.all()} == {tx.effective_at}


def legs_valid_reference(legs: list[Leg]) -> bool:
    """What the leg rule says: non-zero whole amounts (no bools), each asset summing to 0."""
    sums: dict[str, int] = {}
    for leg in legs:
        if type(leg.amount) is not int or not 0 < abs(leg.amount) <= services.AMOUNT_ABS_MAX:
            return False
        sums[leg.asset] = sums.get(leg.asset, 0) + leg.amount
    return all(total == 0 for total in sums.values())


edge_amounts = st.sampled_from(
    [0, 1, -1, services.AMOUNT_ABS_MAX, -services.AMOUNT_ABS_MAX, services.AMOUNT_ABS_MAX + 1,
     -services.AMOUNT_ABS_MAX - 1, True, False, Decimal(5), 5.0]
)  # fmt: skip
some_legs = st.builds(
    Leg,
    account=st.sampled_from(["a", "b"]),
    asset=st.sampled_from(["USD", "TOK"]),
    amount=st.one_of(st.integers(min_value=-5, max_value=5), edge_amounts),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(some_legs, min_size=2, max_size=3), st.booleans())
def test_the_two_leg_shortcut_of_validation_agrees_with_the_rule(legs, negate):
    """_validate_legs answers two legs without summing: it must refuse what the rule does."""
    if negate and len(legs) == 2 and isinstance(legs[0].amount, int):  # a transfer, or nearly
        legs[1] = Leg(legs[1].account, legs[1].asset, -legs[0].amount)
    try:
        services._validate_legs("k", legs)
        accepted = True
    except (InvalidTransaction, UnbalancedTransaction):
        accepted = False
    assert accepted == legs_valid_reference(legs)
