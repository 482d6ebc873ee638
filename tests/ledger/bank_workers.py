"""Processes of the bank test (test_bank.py), importable by a spawned interpreter.

Each process sets Django up on its own, points its connection at the test database and
runs until its deadline, then sends one result dict to the parent.
"""

from __future__ import annotations

import os
import random
import time
from collections import Counter
from typing import Any

ACCOUNTS = tuple(f"bank:{i:02d}" for i in range(12))
HOT_ACCOUNTS = ACCOUNTS[:2]
ASSETS = ("USD", "TOK")
SHARED_KEYS = 40  # keys every writer posts, with the same content, racing each other
AMOUNT_MAX = 10**9

Legs = list[tuple[str, str, int]]


def _django(db_name: str) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    import django

    django.setup()
    from django.conf import settings
    from django.db import connection

    settings.DEBUG = False  # no query log in a loop of thousands of queries
    connection.settings_dict["NAME"] = db_name


def _pick_pair(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.6:
        hot = rng.choice(HOT_ACCOUNTS)
        other = rng.choice([a for a in ACCOUNTS if a != hot])
        return (hot, other) if rng.random() < 0.5 else (other, hot)
    a, b = rng.sample(ACCOUNTS, 2)
    return a, b


def transfer_legs(rng: random.Random) -> Legs:
    """Return a random balanced transfer: one asset, sometimes both, sometimes three ways."""
    debit, credit = _pick_pair(rng)
    amount = rng.randint(1, AMOUNT_MAX)
    legs = [(debit, "USD", amount), (credit, "USD", -amount)]
    if rng.random() < 0.3:
        tokens = rng.randint(1, AMOUNT_MAX)
        third = rng.choice(ACCOUNTS)
        legs += [(credit, "TOK", tokens), (third, "TOK", -tokens)]
    return legs


def shared_legs(index: int) -> Legs:
    return transfer_legs(random.Random(f"shared-{index}"))


def writer(number: int, db_name: str, seconds: float, barrier: Any, results: Any) -> None:
    _django(db_name)
    from django.db import connections

    from ledger.exceptions import IdempotencyConflict, sqlstate_of
    from ledger.services import Leg, transaction_post

    def post(key: str, legs: Legs) -> Any:
        return transaction_post(
            idempotency_key=key, legs=[Leg(account=a, asset=s, amount=n) for a, s, n in legs]
        )

    rng = random.Random(1000 + number)
    acked: list[tuple[str, int, Legs]] = []
    shared: list[tuple[str, int, bool]] = []
    counts: Counter[str] = Counter()
    errors: list[str] = []
    barrier.wait(timeout=60)
    deadline = time.monotonic() + seconds
    sequence = 0
    while time.monotonic() < deadline:
        roll = rng.random()
        try:
            if roll < 0.10 and acked:
                key, tx_id, legs = rng.choice(acked)
                again = post(key, legs)
                counts["replays"] += 1
                if (again.transaction_id, again.created) != (tx_id, False):
                    errors.append(f"replay of {key} returned {again}")
            elif roll < 0.13 and acked:
                key, _, legs = rng.choice(acked)
                altered = [(a, s, n * 2) for a, s, n in legs]
                try:
                    post(key, altered)
                    errors.append(f"conflicting replay of {key} was accepted")
                except IdempotencyConflict:
                    counts["conflicts_refused"] += 1
            elif roll < 0.25:
                index = rng.randrange(SHARED_KEYS)
                key, legs = f"shared-{index}", shared_legs(index)
                posted = post(key, legs)
                shared.append((key, posted.transaction_id, posted.created))
                acked.append((key, posted.transaction_id, legs))
                counts["shared"] += 1
            else:
                key = f"w{number}-{sequence}"
                sequence += 1
                legs = transfer_legs(rng)
                posted = post(key, legs)
                if not posted.created:
                    errors.append(f"new key {key} was not created")
                acked.append((key, posted.transaction_id, legs))
                counts["posted"] += 1
        except Exception as error:  # every unexpected failure is a finding
            errors.append(f"{type(error).__name__} {sqlstate_of(error)}: {error}")
    connections.close_all()
    results.put(
        {
            "role": "writer",
            "number": number,
            "acked": acked,
            "shared": shared,
            "counts": dict(counts),
            "errors": errors,
        }
    )


def _snapshot_violations(
    code: str, asset_id: int, accounts: dict[str, int], now: Any, past: Any
) -> list[str]:
    """Return what is wrong with one asset's balances in the current snapshot."""
    from ledger.selectors import balance_as_of, balance_get

    current, at_now, at_past = {}, {}, {}
    for name, account_id in accounts.items():
        current[name] = balance_get(account_id=account_id, asset_id=asset_id)
        at_now[name] = balance_as_of(account_id=account_id, asset_id=asset_id, at=now)
        at_past[name] = balance_as_of(account_id=account_id, asset_id=asset_id, at=past)
    found = []
    if sum(current.values()) != 0:
        found.append(f"{code}: current balances sum to {sum(current.values())}")
    if sum(at_past.values()) != 0:
        found.append(f"{code}: balances as of {past} sum to {sum(at_past.values())}")
    if at_now != current:
        found.append(f"{code}: balances as of now {at_now} differ from current {current}")
    return found


def reader(number: int, db_name: str, seconds: float, barrier: Any, results: Any) -> None:
    """Read every balance in one REPEATABLE READ snapshot; check what must hold in it."""
    _django(db_name)
    from django.db import connection, connections, transaction

    from ledger.models import Account, Asset

    accounts = dict(Account.objects.filter(code__in=ACCOUNTS).values_list("code", "id"))
    assets = dict(Asset.objects.filter(code__in=ASSETS).values_list("code", "id"))
    rng = random.Random(2000 + number)
    counts: Counter[str] = Counter()
    violations: list[str] = []
    errors: list[str] = []
    barrier.wait(timeout=60)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            with transaction.atomic(), connection.cursor() as cursor:
                cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
                cursor.execute(
                    "SELECT clock_timestamp(), clock_timestamp() - %s * interval '1 millisecond'",
                    [rng.randint(0, 1500)],
                )
                now, past = cursor.fetchone()
                for code, asset_id in assets.items():
                    violations += _snapshot_violations(code, asset_id, accounts, now, past)
            counts["snapshots"] += 1
        except Exception as error:
            errors.append(f"{type(error).__name__}: {error}")
    connections.close_all()
    results.put(
        {
            "role": "reader",
            "number": number,
            "counts": dict(counts),
            "violations": violations,
            "errors": errors,
        }
    )
