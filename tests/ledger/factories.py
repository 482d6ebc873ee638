"""Builders and checks shared by the ledger tests.

Everything goes through the ledger's own services, so a test reads like the books:
open accounts, post legs, then assert balances, the zero-sum and `ledger_verify`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import pytest
from django.db import connection
from django.db.models import Sum

from ledger.models import Account, AccountKind, Asset, Balance, Period, Posting, Transaction
from ledger.services import Leg, Posted, account_open, asset_create, transaction_post
from ledger.verify import ledger_verify

# Tests whose rules fire at COMMIT need real commits. Flushing only the ledger's tables
# afterwards (and skipping post_migrate) keeps each such test fast; the flush runs with
# session_replication_role = replica (config/db) so the append-only triggers allow it.
committing_db = pytest.mark.django_db(transaction=True, available_apps=["ledger"])

Books = dict[tuple[str, str], int]  # (account code, asset code) -> balance


def asset(code: str = "USD", scale: int = 2) -> Asset:
    return asset_create(code=code, scale=scale)


def account(code: str, kind: AccountKind | str = AccountKind.ASSET) -> Account:
    return account_open(code=code, kind=kind)


def chart() -> dict[str, Any]:
    """Open two assets and four accounts: the small world most tests post in."""
    return {
        "usd": asset("USD", 2),
        "tok": asset("TOK", 0),
        "cash": account("platform:cash", AccountKind.ASSET),
        "fees": account("platform:fees", AccountKind.INCOME),
        "credit": account("enterprise:acme:credit", AccountKind.LIABILITY),
        "payable": account("provider:p1:payable", AccountKind.LIABILITY),
    }


def legs(*triples: tuple[str, str, int]) -> list[Leg]:
    return [Leg(account=a, asset=s, amount=n) for a, s, n in triples]


def transfer(
    key: str,
    debit: str,
    credit: str,
    amount: int,
    asset_code: str = "USD",
    effective_at: datetime | None = None,
) -> Posted:
    """Post `amount` from `credit` to `debit` (Dr debit, Cr credit)."""
    return transaction_post(
        idempotency_key=key,
        legs=legs((debit, asset_code, amount), (credit, asset_code, -amount)),
        effective_at=effective_at,
    )


def stored_balances() -> Books:
    """Return every stored balance row, including zero ones."""
    return {
        (a, s): int(n)
        for a, s, n in Balance.objects.values_list("account__code", "asset__code", "amount")
    }


def posting_sums(*, at: datetime | None = None) -> Books:
    """Return the brute-force sum of postings per (account, asset), optionally as of `at`."""
    postings = Posting.objects.all()
    if at is not None:
        postings = postings.filter(effective_at__lte=at)
    rows = postings.values("account__code", "asset__code").annotate(total=Sum("amount"))
    return {(r["account__code"], r["asset__code"]): int(r["total"]) for r in rows}


def nonzero(books: Books) -> Books:
    return {k: v for k, v in books.items() if v != 0}


def asset_totals(books: Books) -> dict[str, int]:
    totals: defaultdict[str, int] = defaultdict(int)
    for (_, asset_code), amount in books.items():
        totals[asset_code] += amount
    return dict(totals)


def books_state() -> dict[str, Any]:
    """Return everything a refused write must leave untouched."""
    return {
        "transactions": sorted(Transaction.objects.values_list("id", "idempotency_key")),
        "postings": Posting.objects.count(),
        "balances": sorted(
            Balance.objects.values_list("account_id", "asset_id", "amount", "posting_count")
        ),
        "periods": sorted(
            Period.objects.values_list("id", "status", "starts_at", "ends_at", "closed_at")
        ),
        "assets": sorted(Asset.objects.values_list("code", "scale")),
        "accounts": sorted(Account.objects.values_list("code", "kind")),
    }


def assert_books_hold() -> None:
    """Assert every invariant: verify is clean, balances equal sums, each asset sums to 0."""
    assert ledger_verify() == []
    stored = stored_balances()
    assert nonzero(stored) == nonzero(posting_sums())
    assert all(total == 0 for total in asset_totals(stored).values()), asset_totals(stored)


def expected_books(entries: Iterable[Iterable[Leg]]) -> Books:
    """Return the balances the given legs add up to (zero balances dropped)."""
    books: defaultdict[tuple[str, str], int] = defaultdict(int)
    for entry_legs in entries:
        for leg in entry_legs:
            books[(leg.account, leg.asset)] += leg.amount
    return nonzero(dict(books))


def db_now() -> datetime:
    """Return the database clock (clock_timestamp), the clock effective times are checked by."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT clock_timestamp()")
        return cursor.fetchone()[0]
