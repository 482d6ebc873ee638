"""The posting functions check their own input (migration 0006), proven by calling them.

ledger_post() and ledger_post_transfer() run as the NOLOGIN role ledger_poster, and the
rule triggers skip that role: what the functions do not check themselves, nobody checks.
The service validates before it calls them, so these tests call the SQL functions with
raw SQL, bypassing it, on each of the three paths (ledger_post_transfer; ledger_post
with one entry; ledger_post with several entries, the set path), and assert the
SQLSTATE, the message and that nothing was written. Then the privilege model that makes
skipping the triggers safe, and the deadlock 0006 fixed when balance rows are opened.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.db import DatabaseError, IntegrityError, connection, transaction

from ledger.exceptions import sqlstate_of
from ledger.models import AccountKind, Transaction
from ledger.services import Entry, account_open, asset_create, transactions_post
from tests.ledger import test_rules
from tests.ledger.factories import (
    assert_books_hold,
    books_state,
    committing_db,
    db_now,
    legs,
    stored_balances,
)
from tests.ledger.test_rules import constraint_of, post_raw, refused, sql

pytestmark = committing_db

# The rule tests' fixtures: the small world they post in, and January 2024 closed.
world = test_rules.world
closed_january = test_rules.closed_january

CASH, FEES, CREDIT = "platform:cash", "platform:fees", "enterprise:acme:credit"
APP_ROLE = "tokenledger_test_app"  # roles are per cluster: created once, never dropped
TIMEOUT = 10.0

Triple = tuple[str, str, int | Decimal]  # (account code, asset code, amount)


# --- calling the functions directly --------------------------------------------------

LEDGER_POST = """
SELECT transaction_id, created
  FROM ledger_post(%s::text[], %s::text[], %s::text[], %s::timestamptz[], %s::text[],
                   %s::bigint[], %s::int[], %s::text[], %s::text[], %s::numeric[])
"""

LEDGER_POST_TRANSFER = """
SELECT transaction_id, created
  FROM ledger_post_transfer(%s::text, %s::text, %s::text, %s::timestamptz, %s::text,
                            %s::text, %s::text, %s::text, %s::numeric)
"""


@dataclass(frozen=True)
class Raw:
    """One entry as ledger_post() takes it, unchecked by Python."""

    key: str
    legs: Sequence[Triple]
    effective_at: datetime | None = None
    reverses_id: int | None = None


def ledger_post(*entries: Raw) -> list[tuple[int, bool]]:
    """Call ledger_post() with these entries; one entry takes its one-entry path."""
    return sql(
        LEDGER_POST,
        [
            [e.key for e in entries],
            [f"hash-{e.key}" for e in entries],
            ["" for _ in entries],
            [e.effective_at for e in entries],
            ["{}" for _ in entries],
            [e.reverses_id for e in entries],
            [n for n, e in enumerate(entries, 1) for _ in e.legs],
            [account for e in entries for account, _, _ in e.legs],
            [asset for e in entries for _, asset, _ in e.legs],
            [Decimal(amount) for e in entries for _, _, amount in e.legs],
        ],
    )


def ledger_post_transfer(
    key: str,
    debit: str,
    credit: str,
    amount: int | Decimal,
    asset: str = "USD",
    effective_at: datetime | None = None,
) -> list[tuple[int, bool]]:
    """Call ledger_post_transfer(): Dr `debit` `amount`, Cr `credit` as much."""
    return sql(
        LEDGER_POST_TRANSFER,
        [key, f"hash-{key}", "", effective_at, "{}", debit, credit, asset, amount],
    )


FILLER = Raw("filler", [(CASH, "TOK", 1), (FEES, "TOK", -1)])  # a correct entry


def post_on_path(path: str, entry: Raw) -> list[tuple[int, bool]]:
    """Post `entry` through one path; on the set path after a correct entry."""
    if path == "transfer":
        (debit, asset, amount), (credit, _, _) = entry.legs
        return ledger_post_transfer(entry.key, debit, credit, amount, asset, entry.effective_at)
    if path == "one-entry":
        return ledger_post(entry)
    assert path == "set"
    return ledger_post(FILLER, entry)


ALL_PATHS = ["transfer", "one-entry", "set"]
POST_PATHS = ["one-entry", "set"]  # the two paths of ledger_post()


def five_usd(key: str, effective_at: datetime | None = None) -> Raw:
    return Raw(key, [(CASH, "USD", 5), (FEES, "USD", -5)], effective_at)


# --- each path posts what it is given: the control for the refusals below -----------


@pytest.mark.parametrize("path", ALL_PATHS)
def test_each_path_posts_a_correct_entry_and_moves_balances(world, path):
    rows = post_on_path(path, five_usd("ok"))
    assert rows[-1][1] is True
    assert Transaction.objects.get(pk=rows[-1][0]).idempotency_key == "ok"
    balances = stored_balances()
    assert balances[(FEES, "USD")] == -5
    assert balances[(CASH, "USD")] == 10_005
    assert_books_hold()


# --- TL006, TL003: when an entry may be dated ----------------------------------------


@pytest.mark.parametrize("path", ALL_PATHS)
def test_a_future_effective_time_is_refused(world, path):
    tomorrow = db_now() + timedelta(days=1)
    with refused("TL006", rf"effective time {tomorrow:%Y-%m-%d} .* is in the future"):
        post_on_path(path, five_usd("future", tomorrow))


@pytest.mark.parametrize("path", ALL_PATHS)
@pytest.mark.parametrize(
    ("effective_at", "shown"),
    [
        pytest.param(datetime(2024, 1, 1, tzinfo=UTC), "2024-01-01 00:00:00", id="first-instant"),
        pytest.param(
            datetime(2024, 1, 31, 23, 59, 59, 999_999, tzinfo=UTC),
            "2024-01-31 23:59:59.999999",
            id="last-instant",
        ),
    ],
)
def test_an_effective_time_in_a_closed_period_is_refused(
    world, closed_january, path, effective_at, shown
):
    with refused(
        "TL003",
        rf"effective time {re.escape(shown)}\+00 falls in the closed period "
        r"2024-01-01 00:00:00\+00 to 2024-02-01 00:00:00\+00",
    ):
        post_on_path(path, five_usd("closed", effective_at))


@pytest.mark.parametrize("path", ALL_PATHS)
def test_the_instant_a_closed_period_ends_may_be_posted_to(world, closed_january, path):
    february = datetime(2024, 2, 1, tzinfo=UTC)
    rows = post_on_path(path, five_usd("february", february))
    assert Transaction.objects.get(pk=rows[-1][0]).effective_at == february
    assert_books_hold()


# --- TL001: the legs of each entry balance per asset; no zero leg --------------------

UNBALANCED = [
    pytest.param([(CASH, "USD", 5), (FEES, "USD", -2)], r"asset USD sums to 3", id="one-asset"),
    pytest.param(
        [(CASH, "USD", 5), (FEES, "USD", -5), (CASH, "TOK", 4), (FEES, "TOK", -3)],
        r"asset TOK sums to 1",
        id="balanced-in-USD-not-in-TOK",
    ),
    pytest.param([(CASH, "USD", 5)], r"asset USD sums to 5", id="one-leg"),
]


@pytest.mark.parametrize("path", POST_PATHS)
@pytest.mark.parametrize(("triples", "message"), UNBALANCED)
def test_legs_that_do_not_balance_are_refused(world, path, triples, message):
    with refused("TL001", rf"transaction \(unbalanced\) does not balance: {message}"):
        post_on_path(path, Raw("unbalanced", triples))


def test_a_zero_amount_transfer_is_refused_by_the_check_constraint(world):
    before = books_state()
    with pytest.raises(IntegrityError) as info:
        ledger_post_transfer("zero", CASH, FEES, 0)
    assert (sqlstate_of(info.value), constraint_of(info.value)) == (
        "23514",
        "ledger_posting_amount_nonzero",
    )
    assert books_state() == before
    assert_books_hold()


@pytest.mark.parametrize("path", POST_PATHS)
def test_a_zero_amount_leg_is_refused_by_the_check_constraint(world, path):
    # Balanced, and two legs are not zero: only the zero leg is wrong.
    entry = Raw("zero", [(CASH, "USD", 5), (FEES, "USD", -5), (CREDIT, "USD", 0)])
    before = books_state()
    with pytest.raises(IntegrityError) as info:
        post_on_path(path, entry)
    assert (sqlstate_of(info.value), constraint_of(info.value)) == (
        "23514",
        "ledger_posting_amount_nonzero",
    )
    assert books_state() == before
    assert_books_hold()


# --- TL008: a reversal negates its original ------------------------------------------


@pytest.fixture
def seed(world) -> Transaction:
    """seed-1 of the world: Dr platform:cash 10,000 USD, Cr enterprise:acme:credit."""
    return Transaction.objects.get(idempotency_key="seed-1")


@pytest.mark.parametrize("path", POST_PATHS)
@pytest.mark.parametrize(
    "triples",
    [
        # balanced, and the right total, but against the wrong account
        pytest.param([(CASH, "USD", -10_000), (FEES, "USD", 10_000)], id="wrong-account"),
        pytest.param([(CASH, "USD", -1), (CREDIT, "USD", 1)], id="part-of-it"),
        pytest.param([(CASH, "USD", 10_000), (CREDIT, "USD", -10_000)], id="repeats-it"),
    ],
)
def test_a_reversal_that_does_not_negate_its_original_is_refused(seed, path, triples):
    entry = Raw("bad-reversal", triples, reverses_id=seed.pk)
    with refused("TL008", rf"\(bad-reversal\) reverses {seed.pk} but does not negate it"):
        post_on_path(path, entry)
    assert not Transaction.objects.filter(reverses=seed).exists()


@pytest.mark.parametrize("path", POST_PATHS)
def test_a_reversal_that_negates_its_original_commits_and_restores_balances(seed, path):
    before = stored_balances()
    entry = Raw("reversal", [(CREDIT, "USD", 10_000), (CASH, "USD", -10_000)], reverses_id=seed.pk)
    rows = post_on_path(path, entry)
    assert Transaction.objects.get(pk=seed.pk).reversed_by.get().pk == rows[-1][0]
    balances = stored_balances()
    assert balances[(CASH, "USD")] == before[(CASH, "USD")] - 10_000 == 0
    assert balances[(CREDIT, "USD")] == before[(CREDIT, "USD")] + 10_000 == 0
    assert_books_hold()


# --- the shape of the input: what the functions read is what they checked -------------


@pytest.mark.parametrize("path", ALL_PATHS)
def test_a_fractional_amount_is_refused_not_rounded(world, path):
    # Stored in NUMERIC(38, 0) it would be rounded after the sums and running balances
    # were taken from the exact value: 0.5 + 0.5 - 1 balances, 1 + 1 - 1 does not.
    triples: list[Triple] = [(CASH, "USD", Decimal("0.5")), (FEES, "USD", Decimal("-0.5"))]
    if path != "transfer":
        triples = [
            (CASH, "USD", Decimal("0.5")),
            (CASH, "USD", Decimal("0.5")),
            (FEES, "USD", Decimal(-1)),
        ]
    with refused("22023", "whole numbers of the asset's smallest unit"):
        post_on_path(path, Raw("fraction", triples))


def call_ledger_post_sql(arrays: str) -> None:
    """Call ledger_post() with its ten arrays spelled as SQL literals."""
    sql(f"SELECT * FROM ledger_post({arrays})")


def test_arrays_that_do_not_start_at_one_are_refused(world):
    # Read by position from 1, a '[0:n]' array shifts every leg against its asset:
    # the balance check would see one entry and the postings another.
    arrays = (
        "ARRAY['bounds'], ARRAY['h'], ARRAY[''], ARRAY[NULL]::timestamptz[], ARRAY['{}'], "
        "ARRAY[NULL]::bigint[], ARRAY[1, 1, 1, 1], "
        f"ARRAY['{CASH}', '{FEES}', '{CASH}', '{FEES}'], "
        "'[0:4]={USD,USD,TOK,TOK,TOK}'::text[], ARRAY[5, -5, 3, -3]::numeric[]"
    )
    with refused("22023", "one-dimensional arrays indexed from 1"):
        call_ledger_post_sql(arrays)


def test_a_reversal_array_that_does_not_start_at_one_is_refused(seed):
    arrays = (
        "ARRAY['rev', 'other'], ARRAY['h1', 'h2'], ARRAY['', ''], "
        "ARRAY[NULL, NULL]::timestamptz[], ARRAY['{}', '{}'], "
        f"'[0:1]={{{seed.pk},NULL}}'::bigint[], ARRAY[1, 1, 2, 2], "
        f"ARRAY['{CASH}', '{CREDIT}', '{CASH}', '{FEES}'], "
        "ARRAY['USD', 'USD', 'USD', 'USD'], ARRAY[-1, 1, 2, -2]::numeric[]"
    )
    with refused("22023", "one-dimensional arrays indexed from 1"):
        call_ledger_post_sql(arrays)
    assert not Transaction.objects.filter(reverses=seed).exists()


@pytest.mark.parametrize(
    ("entries", "legs_entry"),
    [
        pytest.param(2, "ARRAY[1, 1, 1, 1]", id="an-entry-without-legs"),
        pytest.param(1, "ARRAY[1, 1, 2, 2]", id="a-leg-of-no-entry"),
    ],
)
def test_every_leg_names_an_entry_and_every_entry_has_legs(world, entries, legs_entry):
    keys = ", ".join(f"'e{n}'" for n in range(entries))
    arrays = (
        f"ARRAY[{keys}], ARRAY[{keys}], ARRAY[{keys}], "
        f"array_fill(NULL::timestamptz, ARRAY[{entries}]), array_fill('{{}}'::text, "
        f"ARRAY[{entries}]), array_fill(NULL::bigint, ARRAY[{entries}]), {legs_entry}, "
        f"ARRAY['{CASH}', '{FEES}', '{CASH}', '{FEES}'], "
        "ARRAY['USD', 'USD', 'USD', 'USD'], ARRAY[5, -5, 3, -3]::numeric[]"
    )
    with refused("22023", "each leg names an entry"):
        call_ledger_post_sql(arrays)


# --- the privilege model -------------------------------------------------------------

POSTERS = {
    "ledger_post": "ledger_post(text[], text[], text[], timestamptz[], text[], bigint[], "
    "int[], text[], text[], numeric[])",
    "ledger_post_transfer": "ledger_post_transfer(text, text, text, timestamptz, text, "
    "text, text, text, numeric)",
}
HELPERS = [
    "ledger_refuse_closed(timestamptz[])",
    "ledger_refuse_unnegated(bigint[])",
    "ledger_open_balances(bigint[], bigint[])",
]


@pytest.mark.parametrize("signature", POSTERS.values(), ids=POSTERS.keys())
def test_the_posting_functions_run_as_ledger_poster_with_a_fixed_search_path(signature):
    ((definer, owner, config),) = sql(
        "SELECT p.prosecdef, p.proowner::regrole::text, p.proconfig FROM pg_proc p "
        "WHERE p.oid = %s::regprocedure",
        [signature],
    )
    assert definer is True
    assert owner == "ledger_poster"
    # A SECURITY DEFINER function must not find what its caller created: only pg_catalog,
    # and pg_temp last (the ledger's own names are written schema-qualified).
    assert "search_path=pg_catalog, pg_temp" in config


@pytest.mark.parametrize("signature", [*POSTERS.values(), *HELPERS])
def test_no_posting_function_is_executable_by_public(signature):
    # A read-only or reporting role must not post as ledger_poster: EXECUTE is granted.
    ((public,),) = sql("SELECT has_function_privilege('public', %s, 'EXECUTE')", [signature])
    assert public is False


def test_a_function_planted_in_the_ledgers_schema_is_not_called_by_the_posters(world):
    # An exact argument match beats pg_catalog's polymorphic function wherever the schema
    # is in the search path; the posters keep only pg_catalog in theirs.
    sql("CREATE FUNCTION cardinality(text[]) RETURNS int LANGUAGE sql AS $$ SELECT 1 / 0 $$")
    try:
        rows = ledger_post(five_usd("planted"), FILLER)
        assert [created for _, created in rows] == [True, True]
        assert ledger_post_transfer("planted-2", CASH, FEES, 1)[0][1] is True
    finally:
        sql("DROP FUNCTION cardinality(text[])")
    assert_books_hold()


@pytest.mark.parametrize("amount", ["NaN", "Infinity", "-Infinity", None])
def test_a_transfer_of_no_number_is_refused(world, amount):
    with refused("22023", "whole numbers of the asset's smallest unit"):
        sql(LEDGER_POST_TRANSFER, ["nan", "h", "", None, "{}", CASH, FEES, "USD", amount])


def test_nan_is_refused_by_the_tables_themselves(world):
    ids = test_rules.posting_ids(2)
    with refused("23514", "ledger_posting_amounts_are_numbers"), transaction.atomic():
        tx = test_rules.insert_transaction("raw-nan", first_posting_id=ids[0])
        sql(
            "INSERT INTO ledger_posting (id, transaction_id, account_id, asset_id, amount, "
            "effective_at, recorded_at, balance_after) SELECT %s, %s, a.id, s.id, 'NaN', "
            "now(), clock_timestamp(), 'NaN' FROM ledger_account a, ledger_asset s "
            "WHERE a.code = %s AND s.code = 'USD'",
            [ids[0], tx, CASH],
        )


def test_one_call_cannot_post_two_entries_under_one_key(world):
    with refused("22023", "its own idempotency key"):
        ledger_post(five_usd("twice"), Raw("twice", [(CASH, "TOK", 999), (FEES, "TOK", -999)]))


def test_ledger_poster_cannot_log_in():
    ((can_login, superuser),) = sql(
        "SELECT rolcanlogin, rolsuper FROM pg_roles WHERE rolname = 'ledger_poster'"
    )
    assert (can_login, superuser) == (False, False)


@pytest.mark.parametrize("signature", HELPERS)
def test_the_posters_helpers_are_not_executable_by_public(signature):
    ((public, owner),) = sql(
        "SELECT has_function_privilege('public', %s, 'EXECUTE'), "
        "p.proowner::regrole::text FROM pg_proc p WHERE p.oid = %s::regprocedure",
        [signature, signature],
    )
    assert (public, owner) == (False, "ledger_poster")


def ledger_relations(relkind: str) -> list[str]:
    return [
        name
        for (name,) in sql(
            "SELECT c.relname FROM pg_class c "
            "WHERE c.relnamespace = current_schema()::regnamespace "
            "AND c.relkind = %s AND c.relname LIKE 'ledger\\_%%' ORDER BY 1",
            [relkind],
        )
    ]


def become_application_role() -> None:
    """Inside an atomic block: become an ordinary role that may write the ledger's tables.

    Created once per cluster (NOLOGIN, no superuser, not a member of ledger_poster),
    granted here in this database, and left in place: a parallel run may be using it.
    """
    assert connection.in_atomic_block
    sql(
        "DO $$ BEGIN "
        f"IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = '{APP_ROLE}') THEN "
        f"CREATE ROLE {APP_ROLE} NOLOGIN; END IF; "
        "EXCEPTION WHEN duplicate_object OR unique_violation THEN NULL; END $$"
    )
    quote = connection.ops.quote_name
    tables = ledger_relations("r")
    assert {"ledger_transaction", "ledger_posting", "ledger_balance"} <= set(tables)
    for table in tables:
        sql(f"GRANT SELECT, INSERT ON {quote(table)} TO {APP_ROLE}")
    # The posting trigger runs as its invoker and moves the balance rows.
    sql(f"GRANT UPDATE ON ledger_balance TO {APP_ROLE}")
    for sequence in ledger_relations("S"):
        sql(f"GRANT USAGE ON SEQUENCE {quote(sequence)} TO {APP_ROLE}")
    for signature in POSTERS.values():
        sql(f"GRANT EXECUTE ON FUNCTION {signature} TO {APP_ROLE}")
    # SET ROLE would change only current_user: SET ROLE is checked against the session
    # user, and a superuser's session may become any role. So the session user changes
    # too, for this transaction only (the authenticated user is a superuser: it may).
    sql(f"SET LOCAL SESSION AUTHORIZATION {APP_ROLE}")
    assert sql(
        "SELECT session_user, current_user, r.rolsuper, "
        "pg_has_role(current_user, 'ledger_poster', 'MEMBER') "
        "FROM pg_roles r WHERE r.rolname = current_user"
    ) == [(APP_ROLE, APP_ROLE, False, False)]


def refused_here(sqlstate: str, action: Callable[[], object], match: str = "") -> None:
    """Assert `action` fails with `sqlstate` inside a savepoint of the caller's transaction."""
    with pytest.raises(DatabaseError, match=match) as info, transaction.atomic():
        action()
    assert sqlstate_of(info.value) == sqlstate, info.value


def test_an_application_role_posts_through_the_functions_but_is_policed_itself(world):
    cash, fees, usd = world["cash"].id, world["fees"].id, world["usd"].id
    before = stored_balances()
    with transaction.atomic():
        become_application_role()
        # Both posting functions run for it, as ledger_poster.
        ((tx_id, created),) = ledger_post_transfer("app-transfer", FEES, CASH, 25)
        assert created is True
        assert ledger_post(Raw("app-post", [(FEES, "TOK", 2), (CASH, "TOK", -2)]))[0][1] is True

        # An unbalanced entry written by hand: the posting trigger fires for this role.
        refused_here(
            "TL001",
            lambda: post_raw("app-raw-unbalanced", [(cash, usd, 5), (fees, usd, -2)]),
            r"\(app-raw-unbalanced\) does not balance: asset USD sums to 3",
        )

        # A transaction without postings: its first-posting check still fires for it.
        def no_postings() -> None:
            sql(
                "INSERT INTO ledger_transaction (idempotency_key, content_hash, description, "
                "effective_at, metadata, first_posting_id) "
                "VALUES ('app-empty', 'x', '', now(), '{}', nextval('ledger_posting_id_seq'))"
            )
            sql("SET CONSTRAINTS ledger_transaction_first_posting_fk IMMEDIATE")

        refused_here("23503", no_postings, r"ledger_transaction_first_posting_fk")
        # Balance rows are the posters' alone; the guard fires for this role.
        refused_here(
            "TL005",
            lambda: sql("UPDATE ledger_balance SET amount = amount + 1"),
            r"maintained by postings only: UPDATE refused",
        )
        # Nor can it become the trusted writer, or call the posters' helpers.
        refused_here(
            "42501", lambda: sql("SET ROLE ledger_poster"), r"permission denied to set role"
        )
        refused_here(
            "42501",
            lambda: sql(
                "SELECT ledger_open_balances(ARRAY[%s]::bigint[], ARRAY[%s]::bigint[])", [cash, usd]
            ),
            r"permission denied for function ledger_open_balances",
        )
        # The refusals rolled back to their savepoints; what it posted stands.
        assert sql("SELECT current_user") == [(APP_ROLE,)]

    # SET LOCAL ended with the block; what the role posted was committed, nothing else.
    ((session, current),) = sql("SELECT session_user, current_user")
    assert session == current != APP_ROLE
    assert list(Transaction.objects.values_list("idempotency_key", flat=True).order_by("id")) == [
        "seed-1",
        "seed-2",
        "app-transfer",
        "app-post",
    ]
    assert Transaction.objects.get(idempotency_key="app-transfer").pk == tx_id
    balances = stored_balances()
    assert balances[(FEES, "USD")] == before.get((FEES, "USD"), 0) + 25
    assert balances[(CASH, "USD")] == before[(CASH, "USD")] - 25
    assert balances[(FEES, "TOK")] == before[(FEES, "TOK")] + 2
    assert balances[(CASH, "TOK")] == before[(CASH, "TOK")] - 2
    assert_books_hold()


# --- 0006: a balance row opened in lock order (the deadlock of 0003 to 0005) ---------


def post_pair(path: str, key: str, debit: str, credit: str, amount: int) -> None:
    """Post `amount` Dr `debit` Cr `credit` through the service, on one path."""
    if path == "transfer":
        entries = [Entry(key, legs((debit, "USD", amount), (credit, "USD", -amount)))]
    elif path == "one-entry":  # three legs: not a transfer
        entries = [
            Entry(
                key, legs((debit, "USD", amount), (credit, "USD", 1 - amount), (credit, "USD", -1))
            )
        ]
    else:
        entries = [
            Entry(f"{key}-1", legs((debit, "USD", amount - 1), (credit, "USD", 1 - amount))),
            Entry(f"{key}-2", legs((debit, "USD", 1), (credit, "USD", -1))),
        ]
    assert all(p.created for p in transactions_post(entries=entries))


def wait_until_blocked(pid: int, by: int, done: Callable[[], bool]) -> None:
    """Return once backend `pid` waits for a lock `by` holds; fail if it never does."""
    deadline = time.monotonic() + TIMEOUT
    while time.monotonic() < deadline:
        assert not done(), "the second poster finished without waiting for the first"
        (blockers,) = sql("SELECT pg_blocking_pids(%s)", [pid])[0]
        if by in blockers:
            return
        time.sleep(0.005)
    pytest.fail(f"backend {pid} did not wait for {by} within {TIMEOUT} s")


class Poster(threading.Thread):
    """Runs `post` on a connection of its own: `outcome` gets its backend pid, then what
    it returned ("posted") or what it raised ("error"); `connected` is set once the pid
    is known (or the post failed before)."""

    def __init__(self, post: Callable[[], object]) -> None:
        super().__init__()
        self.post = post
        self.outcome: dict[str, object] = {}
        self.connected = threading.Event()

    def run(self) -> None:
        try:
            connection.ensure_connection()
            self.outcome["pid"] = connection.connection.info.backend_pid
            self.connected.set()
            self.outcome["posted"] = self.post()
        except BaseException as error:
            self.outcome["error"] = error
        finally:
            self.connected.set()
            connection.close()


@pytest.mark.parametrize("path", ALL_PATHS)
def test_opening_a_balance_row_while_holding_another_does_not_deadlock(path):
    """R opens A's row and holds it; S waits for A, holding nothing; R then posts to B.

    Before 0006, S locked B (which existed) and then waited for A: R waiting for B
    deadlocked, and one of the two failed with ConcurrentPosting.
    """
    asset_create(code="USD", scale=2)
    a, b, c, d = (account_open(code=f"acct:{n}", kind=AccountKind.ASSET) for n in "abcd")
    assert a.pk < b.pk < c.pk < d.pk
    post_pair(path, "b-d-1", "acct:b", "acct:d", 100)  # B has a balance row; A has none
    second = Poster(lambda: post_pair(path, "a-b", "acct:a", "acct:b", 5))
    outcome = second.outcome
    try:
        with transaction.atomic():
            post_pair(path, "a-c", "acct:a", "acct:c", 10)  # opens A's row, uncommitted
            second.start()
            assert second.connected.wait(TIMEOUT)
            assert "error" not in outcome, outcome
            wait_until_blocked(
                outcome["pid"], connection.connection.info.backend_pid, lambda: len(outcome) > 1
            )
            post_pair(path, "b-d-2", "acct:b", "acct:d", 20)  # B: free, if S holds nothing
    finally:
        if second.ident is not None:
            second.join(TIMEOUT)
    assert not second.is_alive()
    assert outcome.get("error") is None, outcome["error"]
    assert "posted" in outcome
    balances = stored_balances()
    assert {code: balances[(code, "USD")] for code in ("acct:a", "acct:b", "acct:c", "acct:d")} == {
        "acct:a": 10 + 5,
        "acct:b": 100 - 5 + 20,
        "acct:c": -10,
        "acct:d": -100 - 20,
    }
    assert_books_hold()


def test_a_batch_and_a_transfer_of_one_key_wait_on_the_key_not_in_a_circle():
    """Every poster takes its keys before its balance rows.

    R holds A's balance row. S1 posts a batch holding key K (A and B); S2 posts K again
    as a transfer. Had the batch locked rows before keys (as before), S2 would hold K
    and wait for A while S1 held A and waited for K: a deadlock. Now S1 holds K and
    waits for A, S2 waits for K, and when R commits S2 finds K posted: a replay.
    """
    asset_create(code="USD", scale=2)
    for code in ("acct:a", "acct:b", "acct:c"):
        account_open(code=code, kind=AccountKind.ASSET)
    post_pair("transfer", "open", "acct:a", "acct:b", 1)
    k = Entry("K", legs(("acct:a", "USD", 5), ("acct:b", "USD", -5)))
    s1 = Poster(lambda: transactions_post(entries=[k, five_usd_entry("K2")]))
    s2 = Poster(lambda: transactions_post(entries=[k]))
    try:
        with transaction.atomic():
            post_pair("transfer", "hold-a", "acct:a", "acct:c", 1)  # R holds A's row
            r_pid = connection.connection.info.backend_pid
            s1.start()
            assert s1.connected.wait(TIMEOUT)
            wait_until_blocked(s1.outcome["pid"], r_pid, lambda: len(s1.outcome) > 1)
            s2.start()
            assert s2.connected.wait(TIMEOUT)
            wait_until_blocked(s2.outcome["pid"], s1.outcome["pid"], lambda: len(s2.outcome) > 1)
    finally:
        for poster in (s1, s2):
            if poster.ident is not None:
                poster.join(TIMEOUT)
    outcomes = {"S1": s1.outcome, "S2": s2.outcome}
    assert {name: o.get("error") for name, o in outcomes.items()} == {"S1": None, "S2": None}
    first, _ = outcomes["S1"]["posted"]
    (again,) = outcomes["S2"]["posted"]
    assert (first.created, again.created, again.transaction_id) == (
        True,
        False,
        first.transaction_id,
    )
    assert stored_balances()[("acct:a", "USD")] == 1 + 1 + 5
    assert_books_hold()


@pytest.mark.parametrize("first_commits", [True, False], ids=["commits", "rolls-back"])
def test_a_batch_waits_for_a_concurrent_poster_of_its_key_and_follows_its_outcome(
    first_commits,
):
    """The batch's plain INSERT waits for the other poster's key, as ON CONFLICT did.

    R posts K and holds it uncommitted; S posts a batch of K (same content) and K2.
    If R commits, K is R's (a replay for S, 0007 takes its unique-violation path); if R
    rolls back, S creates K itself. Either way S fails on nothing and K posts once.
    """
    asset_create(code="USD", scale=2)
    for code in ("acct:a", "acct:b", "acct:c"):
        account_open(code=code, kind=AccountKind.ASSET)
    k = Entry("K", legs(("acct:a", "USD", 5), ("acct:b", "USD", -5)))
    second = Poster(lambda: transactions_post(entries=[k, five_usd_entry("K2")]))
    outcome = second.outcome
    held: list[int] = []
    try:
        with transaction.atomic():
            held.append(transactions_post(entries=[k])[0].transaction_id)  # R holds K
            second.start()
            assert second.connected.wait(TIMEOUT)
            wait_until_blocked(
                outcome["pid"], connection.connection.info.backend_pid, lambda: len(outcome) > 1
            )
            if not first_commits:
                transaction.set_rollback(True)
    finally:
        if second.ident is not None:
            second.join(TIMEOUT)
    assert not second.is_alive()
    assert outcome.get("error") is None, outcome["error"]
    posted_k, posted_k2 = outcome["posted"]
    assert (posted_k.created, posted_k2.created) == (not first_commits, True)
    assert (posted_k.transaction_id == held[0]) is first_commits
    assert Transaction.objects.filter(idempotency_key="K").count() == 1
    balances = stored_balances()
    assert {code: balances[(code, "USD")] for code in ("acct:a", "acct:b", "acct:c")} == {
        "acct:a": 5,
        "acct:b": -5 + 5,
        "acct:c": -5,
    }
    assert_books_hold()


def five_usd_entry(key: str) -> Entry:
    return Entry(key, legs(("acct:b", "USD", 5), ("acct:c", "USD", -5)))


def test_an_entry_without_a_hash_is_refused_not_taken_for_a_replay(world):
    ledger_post_transfer("hashed", CASH, FEES, 5)
    with refused("23502", "content_hash"):
        sql(LEDGER_POST_TRANSFER, ["hashed", None, "", None, "{}", CASH, FEES, "USD", 5])
    with refused("23502", "content_hash"):
        sql(
            LEDGER_POST,
            [["hashed", "other"], [None, "h"], ["", ""], [None, None], ["{}", "{}"],
             [None, None], [1, 1, 2, 2], [CASH, FEES, CASH, FEES], ["USD"] * 4,
             [5, -5, 1, -1]],
        )  # fmt: skip
