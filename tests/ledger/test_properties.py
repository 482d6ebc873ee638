"""Property-based tests: any sequence of valid operations keeps every invariant.

Operations: post a random balanced transaction (one to three transfers over four
accounts and two assets), replay a key with the same content, replay it with other
content, reverse any transaction (including reversals). A model of the balances is
kept alongside; after every operation the stored balances must equal the model, the
sums of postings, and sum to zero per asset.

Each example runs in a savepoint rolled back at its end, inside the test's own
transaction (fast; the deferred balancing trigger does not fire, the services check
balance themselves and ledger_verify re-derives everything).
"""

from __future__ import annotations

from collections import defaultdict

import pytest
from django.db import transaction
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ledger.exceptions import AlreadyReversed, IdempotencyConflict
from ledger.services import Leg, transaction_post, transaction_reverse
from tests.ledger.factories import (
    assert_books_hold,
    asset_totals,
    chart,
    nonzero,
    posting_sums,
    stored_balances,
)

pytestmark = pytest.mark.django_db

ACCOUNTS = ("platform:cash", "platform:fees", "enterprise:acme:credit", "provider:p1:payable")
ASSETS = ("USD", "TOK")
AMOUNT_MAX = 10**30

PROPERTY_SETTINGS = settings(
    max_examples=50,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

transfers = st.tuples(
    st.sampled_from(ACCOUNTS),
    st.sampled_from(ACCOUNTS),
    st.sampled_from(ASSETS),
    st.integers(1, AMOUNT_MAX),
)
entries = st.lists(transfers, min_size=1, max_size=3).map(
    lambda ts: tuple(
        leg for debit, credit, a, n in ts for leg in (Leg(debit, a, n), Leg(credit, a, -n))
    )
)
operations = st.lists(
    st.one_of(
        st.tuples(st.just("post"), entries),
        st.tuples(st.just("replay"), st.integers(0, 100)),
        st.tuples(st.just("conflict"), st.integers(0, 100)),
        st.tuples(st.just("reverse"), st.integers(0, 100)),
    ),
    max_size=15,
)


@pytest.fixture
def world() -> dict:
    return chart()


class Books:
    """The model: what every balance must be after the operations applied so far."""

    def __init__(self) -> None:
        self.balances: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.posted: list[tuple[str, int, tuple[Leg, ...]]] = []  # key, id, legs
        self.reverses: dict[str, int] = {}  # reversal key -> the transaction it reverses
        self.reversed: set[int] = set()
        self.attempts = 0

    def apply(self, legs: tuple[Leg, ...]) -> None:
        for leg in legs:
            self.balances[(leg.account, leg.asset)] += leg.amount

    def check(self) -> None:
        stored = nonzero(stored_balances())
        assert stored == nonzero(dict(self.balances))
        assert stored == nonzero(posting_sums())
        assert set(asset_totals(stored).values()) <= {0}

    def post(self, legs: tuple[Leg, ...]) -> None:
        key = f"k-{len(self.posted)}"
        posted = transaction_post(idempotency_key=key, legs=legs)
        assert posted.created
        self.posted.append((key, posted.transaction_id, legs))
        self.apply(legs)

    def replay(self, index: int) -> None:
        key, tx_id, legs = self.posted[index % len(self.posted)]
        if key in self.reverses:  # a reversal is replayed the way it was made
            again = transaction_reverse(transaction_id=self.reverses[key], idempotency_key=key)
        else:
            again = transaction_post(idempotency_key=key, legs=tuple(reversed(legs)))
        assert (again.transaction_id, again.created) == (tx_id, False)

    def conflict(self, index: int) -> None:
        key, _, legs = self.posted[index % len(self.posted)]
        doubled = tuple(Leg(leg.account, leg.asset, leg.amount * 2) for leg in legs)
        with pytest.raises(IdempotencyConflict, match=f"^idempotency key {key} was already"):
            transaction_post(idempotency_key=key, legs=doubled)

    def reverse(self, index: int) -> None:
        _, tx_id, legs = self.posted[index % len(self.posted)]
        self.attempts += 1
        key = f"rev-{tx_id}-{self.attempts}"
        if tx_id in self.reversed:
            with pytest.raises(AlreadyReversed, match=f"^transaction {tx_id} is already reversed$"):
                transaction_reverse(transaction_id=tx_id, idempotency_key=key)
            return
        reversal = transaction_reverse(transaction_id=tx_id, idempotency_key=key)
        assert reversal.created
        negated = tuple(Leg(leg.account, leg.asset, -leg.amount) for leg in legs)
        self.reversed.add(tx_id)
        self.reverses[key] = tx_id
        self.posted.append((key, reversal.transaction_id, negated))
        self.apply(negated)


CASH_TO_CASH = (Leg("platform:cash", "USD", 1), Leg("platform:cash", "USD", -1))


@PROPERTY_SETTINGS
@given(operations=operations)
# Pinned: a reversal replayed, reversed again, and a reversal of the reversal.
@example(
    operations=[
        ("post", CASH_TO_CASH),
        ("reverse", 0),
        ("replay", 1),
        ("reverse", 0),
        ("conflict", 1),
        ("reverse", 1),
        ("replay", 2),
    ]
)
def test_any_sequence_of_valid_operations_keeps_every_invariant(world, operations):
    with transaction.atomic():
        books = Books()
        for name, argument in operations:
            if name == "post":
                books.post(argument)
            elif books.posted:
                getattr(books, name)(argument)
            books.check()
        assert_books_hold()
        transaction.set_rollback(True)


@PROPERTY_SETTINGS
@given(history=st.lists(entries, max_size=5), target=entries)
def test_reversal_restores_balances_and_reversal_of_the_reversal_restores_the_original(
    world, history, target
):
    with transaction.atomic():
        for i, legs in enumerate(history):
            transaction_post(idempotency_key=f"h-{i}", legs=legs)
        before = stored_balances()
        original = transaction_post(idempotency_key="target", legs=target)
        with_original = stored_balances()
        reversal = transaction_reverse(
            transaction_id=original.transaction_id, idempotency_key="rev"
        )
        assert nonzero(stored_balances()) == nonzero(before)
        transaction_reverse(transaction_id=reversal.transaction_id, idempotency_key="rev-rev")
        assert stored_balances() == with_original
        assert_books_hold()
        transaction.set_rollback(True)
