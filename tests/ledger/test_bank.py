"""A bank test in the style of Jepsen's: concurrent transfers, concurrent readers, then audit.

Three writer processes post random transfers among twelve accounts (two of them hot,
in most transfers) with unique idempotency keys, replay some with the same content
(must return the same transaction), replay some with other content (must be refused),
and race each other on shared keys. Two reader processes read every balance, now and
at a recent past instant, in one REPEATABLE READ snapshot, and check each asset sums
to zero in it. Afterwards the books are audited against what the writers were told.
"""

from __future__ import annotations

import multiprocessing
import queue
from collections import Counter, defaultdict

import pytest
from django.db import connection

from ledger.models import Posting, Transaction
from ledger.services import Leg
from tests.ledger import bank_workers
from tests.ledger.factories import (
    account,
    assert_books_hold,
    asset,
    committing_db,
    expected_books,
    nonzero,
    stored_balances,
)

WRITERS = 3
READERS = 2
RUN_SECONDS = 4.0
JOIN_TIMEOUT_S = 60


def run_processes() -> list[dict]:
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    barrier = context.Barrier(WRITERS + READERS)
    db_name = connection.settings_dict["NAME"]
    processes = [
        context.Process(
            target=bank_workers.writer, args=(n, db_name, RUN_SECONDS, barrier, results)
        )
        for n in range(WRITERS)
    ] + [
        context.Process(
            target=bank_workers.reader, args=(n, db_name, RUN_SECONDS, barrier, results)
        )
        for n in range(READERS)
    ]
    for process in processes:
        process.start()
    collected = []
    try:
        for _ in processes:
            collected.append(results.get(timeout=JOIN_TIMEOUT_S))
    except queue.Empty:
        pytest.fail(f"only {len(collected)} of {len(processes)} bank processes reported")
    finally:
        for process in processes:
            process.join(timeout=JOIN_TIMEOUT_S)
            if process.is_alive():
                process.kill()
    assert [p.exitcode for p in processes] == [0] * len(processes)
    return collected


@pytest.mark.slow
@committing_db
def test_bank_concurrent_transfers_keep_every_invariant_and_lose_nothing_acknowledged():
    asset("USD", 2)
    asset("TOK", 0)
    for code in bank_workers.ACCOUNTS:
        account(code, "asset")
    results = run_processes()
    writers = [r for r in results if r["role"] == "writer"]
    readers = [r for r in results if r["role"] == "reader"]

    # No process saw an error it did not provoke: no deadlock, no serialization failure.
    assert [r["errors"] for r in results] == [[]] * len(results)
    counts = sum((Counter(w["counts"]) for w in writers), Counter())
    # Enough of each kind of operation happened to mean something (even on a busy machine).
    assert counts["posted"] >= 100, counts
    assert counts["replays"] >= 5, counts
    assert counts["conflicts_refused"] >= 1, counts
    assert counts["shared"] >= 10, counts

    # Readers saw every asset sum to zero in every snapshot, now and in the recent past.
    assert [r["violations"] for r in readers] == [[]] * READERS
    assert all(r["counts"]["snapshots"] >= 3 for r in readers), [r["counts"] for r in readers]

    # Every acknowledged key is present once, with exactly the legs it was posted with.
    acked: dict[str, tuple[int, list]] = {}
    for w in writers:
        for key, tx_id, legs in w["acked"]:
            assert acked.setdefault(key, (tx_id, legs)) == (tx_id, legs), key
    stored = dict(Transaction.objects.values_list("idempotency_key", "id"))
    assert stored == {key: tx_id for key, (tx_id, _) in acked.items()}
    postings: defaultdict[int, list] = defaultdict(list)
    for tx_id, account_code, asset_code, amount in Posting.objects.values_list(
        "transaction_id", "account__code", "asset__code", "amount"
    ):
        postings[tx_id].append((account_code, asset_code, amount))
    assert {tx_id: sorted(legs) for tx_id, legs in postings.items()} == {
        tx_id: sorted(legs) for tx_id, legs in acked.values()
    }

    # Each shared key was created by exactly one writer; all others got its transaction.
    creators: Counter[str] = Counter()
    for w in writers:
        for key, tx_id, created in w["shared"]:
            creators[key] += created
            assert stored[key] == tx_id
    assert set(creators.values()) == {1}

    # Balances are exactly what the acknowledged transfers add up to, and the books hold.
    entries = [
        [Leg(account=a, asset=s, amount=n) for a, s, n in legs] for _, legs in acked.values()
    ]
    assert nonzero(stored_balances()) == expected_books(entries)
    assert_books_hold()
