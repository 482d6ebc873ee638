"""Each rule of the books attacked where it lives: in PostgreSQL (ledger migrations 0002, 0003).

Every attack goes once through raw SQL and once through the ORM, and asserts which rule
fired by its SQLSTATE, then that nothing was written. Some rules are checked at COMMIT
(the first-posting foreign key), so these tests commit for real (transaction=True).
The attacks start from a correct writer that is not ledger_post() (INSERT_POSTINGS,
post_orm) and break one thing at a time.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import pytest
from django.core.exceptions import ValidationError
from django.db import DatabaseError, IntegrityError, connection, transaction
from django.db.models import F
from django.db.models.deletion import ProtectedError

from ledger.exceptions import (
    FutureEffectiveTime,
    PeriodClosed,
    sqlstate_of,
    translate_database_error,
)
from ledger.models import Account, Asset, Balance, Period, PeriodStatus, Posting, Transaction
from ledger.services import period_close, period_open, transaction_post
from tests.ledger.factories import (
    assert_books_hold,
    books_state,
    chart,
    committing_db,
    legs,
    stored_balances,
    transfer,
)

pytestmark = committing_db


@contextmanager
def refused(sqlstate: str, match: str = "") -> Iterator[None]:
    """Assert the block raises a database error with this SQLSTATE and changes nothing."""
    before = books_state()
    with pytest.raises(DatabaseError, match=match) as info:
        yield
    assert sqlstate_of(info.value) == sqlstate, f"{sqlstate_of(info.value)}: {info.value}"
    assert books_state() == before
    assert_books_hold()


def sql(statement: str, params: list[object] | tuple[object, ...] = ()) -> list[tuple]:
    with connection.cursor() as cursor:
        cursor.execute(statement, params)
        return cursor.fetchall() if cursor.description else []


def posting_ids(count: int) -> list[int]:
    return [
        row[0]
        for row in sql(
            "SELECT nextval('ledger_posting_id_seq') FROM generate_series(1, %s)", [count]
        )
    ]


def insert_transaction(
    key: str,
    effective_at: datetime | None = None,
    reverses_id: int | None = None,
    first_posting_id: int = 0,
) -> int:
    """Insert a transaction row naming the id its first posting will have; return its id."""
    return sql(
        "INSERT INTO ledger_transaction (idempotency_key, content_hash, description, "
        "effective_at, metadata, reverses_id, first_posting_id) "
        "VALUES (%s, 'x', '', coalesce(%s, now()), '{}', %s, %s) RETURNING id",
        [key, effective_at, reverses_id, first_posting_id],
    )[0][0]


# A correct writer that is not ledger_post(): one statement for all of a transaction's
# legs, each continuing its balance row (recorded after its last posting, running
# balance from its amount). The rule tests break one thing at a time against it.
INSERT_POSTINGS = """
INSERT INTO ledger_posting (id, transaction_id, account_id, asset_id, amount, effective_at,
                            recorded_at, balance_after)
SELECT l.id, l.tx, l.account, l.asset, l.amount, t.effective_at,
       greatest(coalesce(b.updated_at, '-infinity') + interval '1 microsecond', clock_timestamp())
         + (row_number() OVER w - 1) * interval '1 microsecond',
       coalesce(b.amount, 0) + sum(l.amount) OVER w
  FROM unnest(%s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[], %s::numeric[])
       WITH ORDINALITY AS l(id, tx, account, asset, amount, ord)
  JOIN ledger_transaction t ON t.id = l.tx
  LEFT JOIN ledger_balance b ON b.account_id = l.account AND b.asset_id = l.asset
WINDOW w AS (PARTITION BY l.account, l.asset ORDER BY l.ord)
"""


def insert_postings(tx_id: int, ids: list[int], postings: list[tuple[int, int, int]]) -> None:
    sql(
        INSERT_POSTINGS,
        [
            ids,
            [tx_id] * len(postings),
            [account for account, _, _ in postings],
            [asset for _, asset, _ in postings],
            [amount for _, _, amount in postings],
        ],
    )


def post_raw(
    key: str,
    postings: list[tuple[int, int, int]],
    effective_at: datetime | None = None,
    reverses_id: int | None = None,
) -> int:
    """Insert a transaction and its (account id, asset id, amount) postings, then commit."""
    with transaction.atomic():
        ids = posting_ids(max(len(postings), 1))
        tx = insert_transaction(key, effective_at, reverses_id, ids[0])
        if postings:
            insert_postings(tx, ids, postings)
    return tx


def post_orm(
    key: str,
    postings: list[tuple[Account, Asset, int]],
    reverses: Transaction | None = None,
    effective_at: datetime | None = None,
) -> Transaction:
    """The same through the ORM: Transaction.objects.create, Posting.objects.bulk_create.

    The running balance is the writer's to compute; this one computes it right, so that
    each test breaks only the rule it is about.
    """
    with transaction.atomic():
        ids = posting_ids(max(len(postings), 1))
        tx = Transaction.objects.create(
            idempotency_key=key,
            content_hash="x",
            reverses=reverses,
            first_posting_id=ids[0],
            **({"effective_at": effective_at} if effective_at else {}),
        )
        running: dict[tuple[int, int], Balance] = {}
        rows = []
        for n, (account, asset, amount) in enumerate(postings):
            balance = (
                running.get((account.pk, asset.pk))
                or Balance.objects.filter(account=account, asset=asset).first()
                or Balance(amount=0, updated_at=datetime.min.replace(tzinfo=UTC))
            )
            recorded_at = max(balance.updated_at + timedelta(microseconds=1), datetime.now(tz=UTC))
            balance = Balance(amount=balance.amount + amount, updated_at=recorded_at)
            running[(account.pk, asset.pk)] = balance
            rows.append(
                Posting(
                    id=ids[n],
                    transaction=tx,
                    account=account,
                    asset=asset,
                    amount=amount,
                    effective_at=tx.effective_at,
                    recorded_at=recorded_at,
                    balance_after=balance.amount,
                )
            )
        Posting.objects.bulk_create(rows)
    return tx


@pytest.fixture
def world() -> dict:
    w = chart()
    transfer("seed-1", "platform:cash", "enterprise:acme:credit", 10_000)
    transfer("seed-2", "platform:cash", "platform:fees", 7, "TOK")
    return w


# --- TL001: every transaction balances per asset at commit ----------------------------


def test_raw_sql_unbalanced_transaction_is_refused_at_commit(world):
    cash, fees, usd = world["cash"].id, world["fees"].id, world["usd"].id
    with refused("TL001", r"does not balance: asset USD sums to 3"):
        post_raw("raw-unbalanced", [(cash, usd, 5), (fees, usd, -2)])


def test_raw_sql_transaction_balanced_in_one_asset_but_not_another_is_refused(world):
    cash, fees, usd, tok = world["cash"].id, world["fees"].id, world["usd"].id, world["tok"].id
    with refused("TL001", r"asset TOK sums to 1"):
        post_raw(
            "raw-two-assets", [(cash, usd, 5), (fees, usd, -5), (cash, tok, 4), (fees, tok, -3)]
        )


def test_raw_sql_single_leg_transaction_is_refused(world):
    # A non-zero leg balances only against another one: one leg never balances.
    with refused("TL001", r"\(raw-one-leg\) does not balance: asset USD sums to 5"):
        post_raw("raw-one-leg", [(world["cash"].id, world["usd"].id, 5)])


def test_raw_sql_transaction_without_postings_is_refused_even_in_autocommit(world):
    # No atomic block: the INSERT is its own transaction and commits at once; the
    # deferred foreign key to its first posting finds none.
    with refused("23503", r"ledger_transaction_first_posting_fk"):
        insert_transaction("raw-empty", first_posting_id=posting_ids(1)[0])


def test_a_transaction_cannot_name_a_posting_of_another_transaction(world):
    seed_posting = Posting.objects.filter(transaction__idempotency_key="seed-1").first()
    with refused("23503", r"ledger_transaction_first_posting_fk"), transaction.atomic():
        tx = insert_transaction("raw-borrowed", first_posting_id=seed_posting.pk)
        insert_postings(
            tx,
            posting_ids(2),
            [(world["cash"].id, world["usd"].id, 5), (world["fees"].id, world["usd"].id, -5)],
        )


def test_legs_of_one_transaction_balance_per_statement(world):
    # Two statements, each one leg: the first is refused, though the second would
    # have balanced it. A transaction's legs are written together.
    cash, fees, usd = world["cash"].id, world["fees"].id, world["usd"].id
    with refused("TL001", r"does not balance: asset USD sums to 5"), transaction.atomic():
        ids = posting_ids(2)
        tx = insert_transaction("raw-split", first_posting_id=ids[0])
        insert_postings(tx, ids[:1], [(cash, usd, 5)])
        insert_postings(tx, ids[1:], [(fees, usd, -5)])


def test_raw_sql_balanced_transaction_commits(world):
    cash, fees, usd = world["cash"].id, world["fees"].id, world["usd"].id
    post_raw("raw-balanced", [(cash, usd, 5), (fees, usd, -5)])
    assert stored_balances()[("platform:fees", "USD")] == -5
    assert_books_hold()


def test_orm_unbalanced_transaction_is_refused_at_commit(world):
    cash, fees, usd = world["cash"], world["fees"], world["usd"]
    with refused("TL001", r"\(orm-unbalanced\) does not balance: asset USD sums to 1"):
        post_orm("orm-unbalanced", [(cash, usd, 10), (fees, usd, -9)])


def test_orm_single_leg_and_empty_transactions_are_refused(world):
    with refused("TL001", r"\(orm-one-leg\) does not balance"):
        post_orm("orm-one-leg", [(world["cash"], world["usd"], 1)])
    with refused("23503", r"ledger_transaction_first_posting_fk"):
        post_orm("orm-empty", [])
    with refused("23502", r"first_posting_id"):
        Transaction.objects.create(idempotency_key="orm-no-first", content_hash="x")


def test_orm_balanced_transaction_commits_and_moves_balances(world):
    post_orm(
        "orm-balanced", [(world["cash"], world["usd"], 40), (world["fees"], world["usd"], -40)]
    )
    balances = stored_balances()
    assert balances[("platform:cash", "USD")] == 10_040
    assert balances[("platform:fees", "USD")] == -40
    assert_books_hold()


def test_translate_database_error_maps_the_rule_to_its_coded_error(world):
    with pytest.raises(DatabaseError) as info:
        post_raw("translated", [(world["cash"].id, world["usd"].id, 5)])
    error = translate_database_error(info.value)
    assert error is not None
    assert (error.code, error.status, error.extra) == (
        "transaction_unbalanced",
        422,
        {"sqlstate": "TL001"},
    )
    assert error.message.startswith("transaction ")
    assert error.message.endswith("(translated) does not balance: asset USD sums to 5")


# --- TL008: a reversal negates its original, account by account -------------------


def post_raw_reversal(key: str, reverses_id: int, postings: list[tuple[int, int, int]]) -> int:
    """Insert a transaction linked as the reversal of `reverses_id`, with postings; commit."""
    return post_raw(key, postings, reverses_id=reverses_id)


def test_raw_sql_reversal_that_does_not_negate_its_original_is_refused_at_commit(world):
    seed = Transaction.objects.get(idempotency_key="seed-1")  # Dr cash 10,000 / Cr credit
    cash, fees, usd = world["cash"].id, world["fees"].id, world["usd"].id
    # Balanced, and even the right total, but against the wrong account.
    with refused("TL008", rf"\(raw-bad-reversal\) reverses {seed.pk} but does not negate it"):
        post_raw_reversal("raw-bad-reversal", seed.pk, [(cash, usd, -10_000), (fees, usd, 10_000)])


def test_raw_sql_reversal_that_negates_its_original_commits(world):
    seed = Transaction.objects.get(idempotency_key="seed-1")
    cash, credit, usd = world["cash"].id, world["credit"].id, world["usd"].id
    tx = post_raw_reversal("raw-reversal", seed.pk, [(cash, usd, -10_000), (credit, usd, 10_000)])
    assert Transaction.objects.get(pk=seed.pk).reversed_by.get().pk == tx
    assert stored_balances()[("platform:cash", "USD")] == 0
    assert_books_hold()


def test_raw_sql_second_reversal_of_a_transaction_is_refused(world):
    """One reversal per transaction: the partial unique index over reverses_id (0009)."""
    seed = Transaction.objects.get(idempotency_key="seed-1")
    cash, credit, usd = world["cash"].id, world["credit"].id, world["usd"].id
    post_raw_reversal("raw-reversal", seed.pk, [(cash, usd, -10_000), (credit, usd, 10_000)])
    with refused("23505", r"ledger_transaction_reversed_once"):
        post_raw_reversal("raw-reversal-2", seed.pk, [(cash, usd, -10_000), (credit, usd, 10_000)])
    assert not Transaction.objects.filter(idempotency_key="raw-reversal-2").exists()
    assert stored_balances()[("platform:cash", "USD")] == 0
    assert_books_hold()


def test_orm_reversal_that_does_not_negate_its_original_is_refused(world):
    seed = Transaction.objects.get(idempotency_key="seed-1")
    cash, credit, usd = world["cash"], world["credit"], world["usd"]
    with refused("TL008", r"\(orm-bad-reversal\) reverses \d+ but does not negate it"):
        post_orm("orm-bad-reversal", [(cash, usd, -1), (credit, usd, 1)], reverses=seed)


def test_tl008_translates_to_reversal_mismatch(world):
    seed = Transaction.objects.get(idempotency_key="seed-1")
    cash, credit, usd = world["cash"].id, world["credit"].id, world["usd"].id
    with pytest.raises(DatabaseError) as info:
        post_raw_reversal("translated-reversal", seed.pk, [(cash, usd, -5), (credit, usd, 5)])
    error = translate_database_error(info.value)
    assert error is not None
    assert (error.code, error.status, error.extra) == (
        "reversal_mismatch",
        422,
        {"sqlstate": "TL008"},
    )


# --- TL002: postings and transactions are append-only --------------------------------


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE ledger_posting SET amount = amount * 2",
        "UPDATE ledger_posting SET account_id = account_id",  # even a no-op update
        "DELETE FROM ledger_posting",
        "UPDATE ledger_transaction SET description = 'edited'",
        "UPDATE ledger_transaction SET effective_at = effective_at - interval '1 day'",
        "DELETE FROM ledger_transaction WHERE idempotency_key = 'seed-2'",
    ],
)
def test_raw_sql_update_or_delete_of_posted_rows_is_refused(world, statement):
    with refused("TL002", r"is append-only: (UPDATE|DELETE) refused"):
        sql(statement)


@pytest.mark.parametrize("table", ["ledger_posting", "ledger_transaction"])
def test_raw_sql_truncate_of_posted_rows_is_refused(world, table):
    with refused("TL002", r"is append-only: TRUNCATE refused"):
        sql(f"TRUNCATE {table} CASCADE")


def test_orm_update_and_delete_of_postings_is_refused(world):
    posting = Posting.objects.filter(transaction__idempotency_key="seed-1").first()
    with refused("TL002", r"ledger_posting is append-only: UPDATE refused"):
        Posting.objects.filter(pk=posting.pk).update(amount=F("amount") + 1)
    with refused("TL002", r"ledger_posting is append-only: UPDATE refused"):
        posting.amount = 1
        posting.save()
    with refused("TL002", r"ledger_posting is append-only: DELETE refused"):
        posting.delete()
    with refused("TL002", r"ledger_posting is append-only: DELETE refused"):
        Posting.objects.all().delete()


def test_orm_update_and_delete_of_transactions_is_refused(world):
    tx = Transaction.objects.get(idempotency_key="seed-1")
    with refused("TL002", r"ledger_transaction is append-only: UPDATE refused"):
        Transaction.objects.filter(pk=tx.pk).update(description="edited")
    with refused("TL002", r"ledger_transaction is append-only: UPDATE refused"):
        tx.metadata = {"edited": True}
        tx.save()
    # The ORM's own PROTECT stops a delete before the database sees it; the database
    # rule is the second line, proven by raw SQL above.
    before = books_state()
    with pytest.raises(ProtectedError):
        tx.delete()
    assert books_state() == before


# --- TL003: nothing may be dated in a closed period -----------------------------------


@pytest.fixture
def closed_january() -> Period:
    period = period_open(year=2024, month=1)
    return period_close(period_id=period.pk, closed_by_id=None, note="January closed")


def test_raw_sql_transaction_dated_in_a_closed_period_is_refused(world, closed_january):
    cash, fees, usd = world["cash"].id, world["fees"].id, world["usd"].id
    january_15 = datetime(2024, 1, 15, tzinfo=UTC)
    with refused("TL003", r"falls in the closed period 2024-01-01 00:00:00\+00"):
        post_raw("raw-closed", [(cash, usd, 5), (fees, usd, -5)], january_15)


def test_orm_transaction_dated_in_a_closed_period_is_refused(world, closed_january):
    with refused("TL003", r"in the closed period"):
        post_orm(
            "orm-closed",
            [(world["cash"], world["usd"], 5), (world["fees"], world["usd"], -5)],
            effective_at=datetime(2024, 1, 31, 23, 59, 59, 999_999, tzinfo=UTC),
        )


def test_service_refuses_a_closed_period_with_period_closed(world, closed_january):
    before = books_state()
    with pytest.raises(PeriodClosed, match=r"falls in the closed period") as info:
        transfer(
            "svc-closed",
            "platform:cash",
            "platform:fees",
            5,
            effective_at=datetime(2024, 1, 1, tzinfo=UTC),  # the first instant is inside
        )
    assert (info.value.code, info.value.status) == ("period_closed", 409)
    assert info.value.extra == {"sqlstate": "TL003"}
    assert books_state() == before
    assert_books_hold()


def test_the_instant_a_closed_period_ends_belongs_to_the_next_period(world, closed_january):
    posted = transfer(
        "svc-february",
        "platform:cash",
        "platform:fees",
        5,
        effective_at=datetime(2024, 2, 1, tzinfo=UTC),
    )
    assert posted.created
    assert Transaction.objects.get(pk=posted.transaction_id).effective_at == datetime(
        2024, 2, 1, tzinfo=UTC
    )
    assert_books_hold()


# --- TL004: postings join only a transaction of the same database transaction ---------


def test_raw_sql_posting_added_to_a_committed_transaction_is_refused(world):
    tx = Transaction.objects.get(idempotency_key="seed-1")
    with refused("TL004", rf"transaction {tx.pk} was committed earlier"), transaction.atomic():
        # Even a balanced pair: the committed transaction is closed for good.
        insert_postings(
            tx.pk,
            posting_ids(2),
            [(world["cash"].id, world["usd"].id, 5), (world["fees"].id, world["usd"].id, -5)],
        )


def test_orm_posting_added_to_a_committed_transaction_is_refused(world):
    tx = Transaction.objects.get(idempotency_key="seed-1")
    with refused("TL004", r"postings cannot be added to it"):
        Posting.objects.create(transaction=tx, account=world["fees"], asset=world["usd"], amount=1)


# --- TL005: balances are written by the posting trigger only ------------------------


def test_raw_sql_writes_to_balances_are_refused(world):
    cash, usd = world["cash"].id, world["usd"].id
    with refused("TL005", r"maintained by postings only: UPDATE refused"):
        sql("UPDATE ledger_balance SET amount = amount + 1")
    with refused("TL005", r"maintained by postings only: DELETE refused"):
        sql("DELETE FROM ledger_balance WHERE account_id = %s", [cash])
    with refused("TL005", r"maintained by postings only: INSERT refused"):
        sql(
            "INSERT INTO ledger_balance (account_id, asset_id, amount, posting_count, updated_at)"
            " VALUES (%s, %s, 1, 1, now())",
            [world["payable"].id, usd],
        )
    with refused("TL005", r"maintained by postings only: TRUNCATE refused"):
        sql("TRUNCATE ledger_balance")


def test_orm_writes_to_balances_are_refused(world):
    balance = Balance.objects.get(account=world["cash"], asset=world["usd"])
    with refused("TL005", r"UPDATE refused"):
        Balance.objects.filter(pk=balance.pk).update(amount=0)
    with refused("TL005", r"UPDATE refused"):
        balance.amount += 1
        balance.save()
    with refused("TL005", r"DELETE refused"):
        Balance.objects.get(pk=balance.pk).delete()
    with refused("TL005", r"INSERT refused"):
        Balance.objects.create(account=world["payable"], asset=world["usd"], amount=1)


# --- TL006: no effective time in the future -------------------------------------------


def test_raw_sql_future_effective_time_is_refused(world):
    cash, fees, usd = world["cash"].id, world["fees"].id, world["usd"].id
    with refused("TL006", r"is in the future"):
        post_raw(
            "raw-future",
            [(cash, usd, 5), (fees, usd, -5)],
            datetime.now(tz=UTC) + timedelta(seconds=1),
        )


def test_orm_and_service_refuse_a_future_effective_time(world):
    tomorrow = datetime.now(tz=UTC) + timedelta(days=1)
    with refused("TL006", r"is in the future"):
        post_orm(
            "orm-future",
            [(world["cash"], world["usd"], 5), (world["fees"], world["usd"], -5)],
            effective_at=tomorrow,
        )
    before = books_state()
    with pytest.raises(FutureEffectiveTime, match=r"is in the future") as info:
        transfer("svc-future", "platform:cash", "platform:fees", 5, effective_at=tomorrow)
    assert (info.value.code, info.value.extra) == (
        "effective_time_in_future",
        {"sqlstate": "TL006"},
    )
    assert books_state() == before


# --- TL007: what postings refer to keeps its meaning --------------------------------


@pytest.mark.parametrize(
    ("statement", "message"),
    [
        ("UPDATE ledger_asset SET scale = 4 WHERE code = 'USD'", "asset's code and scale"),
        ("UPDATE ledger_asset SET code = 'EUR' WHERE code = 'USD'", "asset's code and scale"),
        (
            "UPDATE ledger_account SET code = 'platform:cash2' WHERE code = 'platform:cash'",
            "account's code and kind",
        ),
        (
            "UPDATE ledger_account SET kind = 'liability' WHERE code = 'platform:cash'",
            "account's code and kind",
        ),
        ("DELETE FROM ledger_account WHERE code = 'platform:cash'", "never deleted: DELETE"),
        ("DELETE FROM ledger_asset WHERE code = 'USD'", "never deleted: DELETE"),
        ("TRUNCATE ledger_account CASCADE", "never deleted: TRUNCATE"),
    ],
)
def test_raw_sql_asset_and_account_identity_is_fixed(world, statement, message):
    with refused("TL007", message):
        sql(statement)


def test_orm_asset_and_account_identity_is_fixed_but_names_may_change(world):
    usd = Asset.objects.get(code="USD")
    with refused("TL007", r"an asset's code and scale are fixed"):
        usd.scale = 12
        usd.save()
    cash = Account.objects.get(code="platform:cash")
    with refused("TL007", r"an account's code and kind are fixed"):
        cash.kind = "equity"
        cash.save()
    with refused("TL007", r"an account's code and kind are fixed"):
        Account.objects.filter(pk=cash.pk).update(code="platform:till")
    # What postings do not depend on stays editable.
    Asset.objects.filter(code="USD").update(name="US dollar")
    Account.objects.filter(pk=cash.pk).update(metadata={"bank": "x"}, owner="platform")
    assert Asset.objects.get(code="USD").name == "US dollar"
    assert Account.objects.get(pk=cash.pk).metadata == {"bank": "x"}


def test_closed_period_cannot_be_reopened_moved_or_deleted(world, closed_january):
    pk = closed_january.pk
    with refused("TL007", r"a closed period cannot be changed"):
        sql("UPDATE ledger_period SET status = 'open', closed_at = NULL WHERE id = %s", [pk])
    with refused("TL007", r"a closed period cannot be changed"):
        Period.objects.filter(pk=pk).update(ends_at=datetime(2024, 1, 2, tzinfo=UTC))
    with refused("TL007", r"a closed period cannot be changed"):
        period = Period.objects.get(pk=pk)
        period.status = PeriodStatus.OPEN
        period.closed_at = None
        period.save()
    with refused("TL007", r"a closed period cannot be deleted"):
        sql("DELETE FROM ledger_period WHERE id = %s", [pk])
    with refused("TL007", r"a closed period cannot be deleted"):
        Period.objects.get(pk=pk).delete()
    assert Period.objects.get(pk=pk).status == PeriodStatus.CLOSED


def test_open_period_may_still_be_deleted(world):
    period = period_open(year=2024, month=3)
    Period.objects.filter(pk=period.pk).delete()
    assert not Period.objects.filter(pk=period.pk).exists()


# --- row constraints -----------------------------------------------------------------


def constraint_of(error: BaseException) -> str | None:
    return getattr(getattr(error.__cause__, "diag", None), "constraint_name", None)


def test_zero_amount_posting_is_refused_by_its_check_constraint(world):
    before = books_state()
    with pytest.raises(IntegrityError) as info:
        post_raw("raw-zero", [(world["cash"].id, world["usd"].id, 0)])
    assert (sqlstate_of(info.value), constraint_of(info.value)) == (
        "23514",
        "ledger_posting_amount_nonzero",
    )
    with pytest.raises(IntegrityError) as info:
        post_orm("orm-zero", [(world["cash"], world["usd"], 0)])
    assert constraint_of(info.value) == "ledger_posting_amount_nonzero"
    assert books_state() == before
    assert_books_hold()


def test_zero_amount_is_reported_by_model_validation_with_its_code(world):
    with pytest.raises(ValidationError) as info:
        Posting(amount=0).validate_constraints()
    assert [e.code for e in info.value.error_dict["__all__"]] == ["posting_amount_nonzero"]


def test_overlapping_periods_are_refused_by_the_exclusion_constraint(world):
    period_open(year=2024, month=5)
    before = books_state()
    with pytest.raises(IntegrityError) as info:
        Period.objects.create(
            starts_at=datetime(2024, 5, 31, tzinfo=UTC), ends_at=datetime(2024, 6, 2, tzinfo=UTC)
        )
    assert (sqlstate_of(info.value), constraint_of(info.value)) == (
        "23P01",
        "ledger_period_no_overlap",
    )
    with pytest.raises(IntegrityError) as info:
        sql(
            "INSERT INTO ledger_period (starts_at, ends_at, status, close_note) "
            "VALUES ('2024-04-15Z', '2024-05-01T00:00:00.000001Z', 'open', '')"
        )
    assert constraint_of(info.value) == "ledger_period_no_overlap"
    assert books_state() == before
    # Adjacent periods touch without overlapping: [May, June) then [June, July).
    period_open(year=2024, month=6)
    period_open(year=2024, month=4)
    assert Period.objects.count() == 3


def test_overlap_is_reported_by_model_validation_with_its_code(world):
    period_open(year=2024, month=5)
    candidate = Period(
        starts_at=datetime(2024, 5, 10, tzinfo=UTC), ends_at=datetime(2024, 5, 20, tzinfo=UTC)
    )
    with pytest.raises(ValidationError) as info:
        candidate.validate_constraints()
    assert [e.code for e in info.value.error_dict["__all__"]] == ["period_no_overlap"]


@pytest.mark.parametrize(
    ("column", "value", "sqlstate", "message"),
    [
        (
            "effective_at",
            "'1999-01-01Z'",
            "TL004",
            r"is dated 1999-01-01 00:00:00\+00, its transaction",
        ),
        ("balance_after", "123456", "TL009", r"does not follow the balance"),
        ("recorded_at", "'1999-01-01Z'", "TL009", r"recorded at 1999-01-01 00:00:00\+00"),
        ("recorded_at", "now() + interval '1 hour'", "TL009", r"does not follow the balance"),
    ],
)
def test_a_posting_whose_derived_columns_do_not_follow_is_refused(
    world, column, value, sqlstate, message
):
    """effective_at is the transaction's; recorded_at and balance_after continue the balance."""
    cash, fees, usd = world["cash"].id, world["fees"].id, world["usd"].id
    columns = {
        "effective_at": "t.effective_at",
        "recorded_at": "clock_timestamp() + (l.ord - 1) * interval '1 microsecond'",
        "balance_after": "coalesce(b.amount, 0) + l.amount",
    }
    columns[column] = value
    with refused(sqlstate, message), transaction.atomic():
        ids = posting_ids(2)
        tx = insert_transaction("raw-derived", first_posting_id=ids[0])
        sql(
            "INSERT INTO ledger_posting (id, transaction_id, account_id, asset_id, amount, "
            f"effective_at, recorded_at, balance_after) "
            f"SELECT l.id, %s, l.account, %s, l.amount, {columns['effective_at']}, "
            f"{columns['recorded_at']}, {columns['balance_after']} "
            "FROM unnest(%s::bigint[], %s::bigint[], %s::numeric[]) WITH ORDINALITY "
            "AS l(id, account, amount, ord) "
            "JOIN ledger_transaction t ON t.id = %s "
            "LEFT JOIN ledger_balance b ON b.account_id = l.account AND b.asset_id = %s",
            [tx, usd, ids, [cash, fees], [3, -3], tx, usd],
        )


def test_the_correct_raw_writer_is_accepted_and_moves_balances(world):
    cash, fees, usd = world["cash"].id, world["fees"].id, world["usd"].id
    tx = post_raw("raw-derived-ok", [(fees, usd, 3), (cash, usd, -3)])
    assert Posting.objects.get(transaction_id=tx, account_id=fees).balance_after == 3
    assert stored_balances()[("platform:fees", "USD")] == 3
    assert_books_hold()


def test_the_service_path_writes_exactly_what_it_was_given(world):
    posted = transaction_post(
        idempotency_key="svc-ok",
        legs=legs(("provider:p1:payable", "USD", -3), ("platform:fees", "USD", 3)),
    )
    assert posted.created
    assert sorted(
        Posting.objects.filter(transaction_id=posted.transaction_id).values_list(
            "account__code", "amount"
        )
    ) == [("platform:fees", 3), ("provider:p1:payable", -3)]
    assert_books_hold()


def test_a_period_cannot_be_inserted_already_closed(world):
    """Closing is an act with who and when (period_close), never a starting state."""
    with refused("TL007", r"a period is opened, then closed"):
        sql(
            "INSERT INTO ledger_period (starts_at, ends_at, status, closed_at, close_note) "
            "VALUES ('2024-01-01Z', '2024-02-01Z', 'closed', '2000-01-01Z', '')"
        )
    assert not Period.objects.exists()
