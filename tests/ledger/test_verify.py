"""ledger_verify finds discrepancies planted behind the triggers' back.

Planting one needs the triggers off, which only a superuser can do:
`SET LOCAL session_replication_role = replica` inside a committed transaction.
"""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.db import connection, transaction

from ledger.models import Posting, Transaction
from ledger.services import period_close, period_open, transaction_post, transaction_reverse
from ledger.verify import ledger_verify
from tests.ledger.factories import assert_books_hold, chart, committing_db, legs, transfer

pytestmark = committing_db


def behind_the_triggers(*statements: tuple[str, list[object]]) -> None:
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL session_replication_role = replica")
        for statement, params in statements:
            cursor.execute(statement, params)


@pytest.fixture
def books() -> dict:
    w = chart()
    w["sale"] = transfer("sale", "platform:cash", "platform:fees", 500)
    w["tokens"] = transfer("tokens", "enterprise:acme:credit", "provider:p1:payable", 70, "TOK")
    w["refund"] = transfer("refund", "platform:fees", "platform:cash", 20)
    return w


def sql(statement: str, params: list[object] | None = None) -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(statement, params)
        return cursor.fetchall() if cursor.description else []


def verify_command() -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    call_command("ledger_verify", stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def failing_command() -> tuple[str, str]:
    out, err = StringIO(), StringIO()
    with pytest.raises(CommandError) as info:
        call_command("ledger_verify", stdout=out, stderr=err)
    return str(info.value), err.getvalue()


def test_clean_books_pass(books):
    assert ledger_verify() == []
    out, err = verify_command()
    assert out == "ledger_verify: the books hold (balances, transactions, assets)\n"
    assert err == ""


def test_a_tampered_balance_is_named_with_its_account_and_asset(books):
    behind_the_triggers(
        (
            "UPDATE ledger_balance SET amount = amount + 1 WHERE account_id = %s AND asset_id = %s",
            [books["cash"].id, books["usd"].id],
        )
    )
    assert ledger_verify() == [
        "stored balance differs from the sum of postings: account platform:cash asset USD: "
        "stored 481 (2 postings), postings sum to 480 (2)",
        "asset does not sum to zero over all accounts: asset USD sums to 1 over all balances",
    ]
    message, err = failing_command()
    assert message == "2 discrepancies found"
    assert "account platform:cash asset USD: stored 481" in err
    assert "asset USD sums to 1" in err


def test_a_tampered_posting_count_is_found(books):
    behind_the_triggers(
        (
            "UPDATE ledger_balance SET posting_count = 9 WHERE account_id = %s",
            [books["payable"].id],
        )
    )
    assert ledger_verify() == [
        "stored balance differs from the sum of postings: account provider:p1:payable asset TOK: "
        "stored -70 (9 postings), postings sum to -70 (1)",
    ]


def test_an_edited_posting_unbalances_its_transaction_and_the_balances(books):
    sale = books["sale"].transaction_id
    behind_the_triggers(
        (
            "UPDATE ledger_posting SET amount = 400 WHERE transaction_id = %s AND amount = 500",
            [sale],
        )
    )
    found = ledger_verify()
    posting = Posting.objects.get(transaction_id=sale, amount=400)
    assert found == [
        "stored balance differs from the sum of postings: account platform:cash asset USD: "
        "stored 480 (2 postings), postings sum to 380 (2)",
        f"transaction does not balance per asset: transaction {sale} asset USD sums to -100",
        f"running balance (balance_after) differs from the sum of earlier postings: posting "
        f"{posting.pk} (account {books['cash'].id} asset {books['usd'].id}): balance_after 500, "
        f"running sum 400",
        found[3],
    ]
    assert found[3].startswith("running balance (balance_after) differs")
    message, err = failing_command()
    assert message == "4 discrepancies found"
    assert f"transaction {sale} asset USD sums to -100" in err


def test_a_deleted_posting_leaves_a_one_legged_transaction(books):
    tokens = books["tokens"].transaction_id
    behind_the_triggers(
        (
            "DELETE FROM ledger_posting WHERE transaction_id = %s AND account_id = %s",
            [tokens, books["payable"].id],
        )
    )
    found = ledger_verify()
    assert (
        "transaction does not balance per asset: "
        f"transaction {tokens} asset TOK sums to 70" in found
    )
    assert (
        f"transaction has fewer than two postings: transaction {tokens} (tokens) has 1 postings"
        in found
    )
    assert (
        "stored balance differs from the sum of postings: account provider:p1:payable asset TOK: "
        "stored -70 (1 postings), postings sum to 0 (0)"
    ) in found
    assert len(found) == 3


def test_a_transaction_naming_another_than_its_first_posting_is_found(books):
    sale = books["sale"].transaction_id
    first, second = sql(
        "SELECT id FROM ledger_posting WHERE transaction_id = %s ORDER BY id", [sale]
    )
    behind_the_triggers(
        (
            "UPDATE ledger_transaction SET first_posting_id = %s WHERE id = %s",
            [second[0], sale],
        )
    )
    assert ledger_verify() == [
        f"transaction does not name its first posting: transaction {sale} (sale) names "
        f"posting {second[0]}; its first posting is {first[0]}"
    ]


def test_a_posting_moved_in_time_is_found(books):
    sale = books["sale"].transaction_id
    behind_the_triggers(
        (
            "UPDATE ledger_posting SET effective_at = effective_at - interval '1 day' "
            "WHERE transaction_id = %s AND amount > 0",
            [sale],
        )
    )
    found = ledger_verify()
    assert len(found) == 1
    assert found[0].startswith(
        "posting effective time differs from its transaction, or follows its recording: posting "
    )


def test_a_linked_reversal_that_does_not_negate_is_found(books):
    sale = books["sale"].transaction_id
    cash, fees, usd = books["cash"].id, books["fees"].id, books["usd"].id
    # The posting trigger refuses this (TL008). Post an ordinary transaction, then link
    # it to the sale behind the triggers' back: balances stay right, and the reversal
    # is the only discrepancy.
    fake = transaction_post(
        idempotency_key="fake",
        legs=legs(("platform:cash", "USD", -1), ("platform:fees", "USD", 1)),
    ).transaction_id
    behind_the_triggers(
        ("UPDATE ledger_transaction SET reverses_id = %s WHERE id = %s", [sale, fake])
    )
    found = ledger_verify()
    assert sorted(found) == sorted(
        [
            f"reversal does not negate the transaction it reverses: transaction {fake} "
            f"reverses {sale} but account {cash} asset {usd} nets to 499",
            f"reversal does not negate the transaction it reverses: transaction {fake} "
            f"reverses {sale} but account {fees} asset {usd} nets to -499",
        ]
    )


def test_a_true_reversal_and_a_reversal_of_it_pass(books):
    reversal = transaction_reverse(transaction_id=books["sale"].transaction_id, idempotency_key="r")
    transaction_reverse(transaction_id=reversal.transaction_id, idempotency_key="rr")
    assert_books_hold()
    assert verify_command()[1] == ""


def test_a_closed_period_inserted_with_a_close_time_before_its_postings_is_found(books):
    """Only a superuser can plant this: the database refuses a period inserted closed."""
    sale = Transaction.objects.get(pk=books["sale"].transaction_id)
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL session_replication_role = replica")
        cursor.execute(
            "INSERT INTO ledger_period (starts_at, ends_at, status, closed_at, close_note) "
            "VALUES (%s - interval '1 day', %s + interval '1 day', 'closed', '2000-01-01Z', '')",
            [sale.effective_at, sale.effective_at],
        )
    found = ledger_verify()
    assert len(found) == 3  # the three transactions of `books`
    prefix = "transaction dated in a closed period was recorded after the close: "
    assert all(line.startswith(prefix) for line in found)
    assert any(line.startswith(f"{prefix}transaction {sale.pk} effective ") for line in found)


def test_a_properly_closed_period_with_postings_before_the_close_passes(books):
    transaction_post(
        idempotency_key="march",
        legs=legs(("platform:cash", "USD", 1), ("platform:fees", "USD", -1)),
        effective_at=period_open(year=2024, month=3).starts_at,
    )
    period_close(period_id=period_open(year=2024, month=3).pk, closed_by_id=None)
    assert_books_hold()
