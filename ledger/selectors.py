"""Reads of the books: balances now and at any past instant, trial balance, history, journal.

Point-in-time balance without scanning history. ledger_post() stores on each posting
`recorded_at` (strictly increasing per account and asset) and `balance_after` (the
running balance in that order). Effective time never exceeds recorded time, so

    balance(T) = balance_after of the last posting recorded at or before T
               + postings recorded after T but effective at or before T.

The second term is small: either recorded within BACKDATED_LAG after T (an entry
posted "now" is recorded within microseconds of its effective time, or after waiting
for its balance rows' locks; a batch's postings to one row a microsecond apart from
the batch's instant, migration 0007), or back-dated by more than that, which
`ledger_posting_backdated_idx` finds by lag class: a posting of class k was recorded
less than 10 ms x 2^k after its effective time, so one range probe per class (41 of
them, up to centuries of lag) reads about twice the postings that straddle T. The
cost follows the postings back-dated across T, not the history.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from django.db import connection

from ledger.binding import bound_cursor, database, exec_prepared, libpq_text, on_its_own
from ledger.models import DEBIT_NORMAL_KINDS, Posting

BACKDATED_LAG = timedelta(milliseconds=10)  # the index predicate of migration 0003
HISTORY_ROWS_MAX = 10_000
JOURNAL_CHUNK_ROWS = 5_000


def balance_get(*, account_id: int, asset_id: int) -> int:
    """Return the current balance (debits minus credits) in smallest units; O(1).

    One primary-key probe through a raw cursor: the ORM's queryset machinery cost
    several times the query itself here (measured by `bench ledger`).
    """
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT amount FROM ledger_balance WHERE account_id = %s AND asset_id = %s",
            [account_id, asset_id],
        )
        row = cursor.fetchone()
    return int(row[0]) if row else 0


def _backdated_after(anchor: str) -> str:
    """The conditions of one lag-class probe of ledger_posting_backdated_idx (0003).

    A posting back-dated by more than the lag, recorded after `anchor` plus the lag, and
    before `anchor` plus its class's bound: a posting of class k (k < 41) was recorded
    less than 10 ms x 2^k after its effective time, so one that is effective by `anchor`
    lies in that range. Joined to generate_series(1, 41) AS c(lag_class).
    """
    return f"""ledger_lag_class(recorded_at - effective_at) = c.lag_class
                           AND recorded_at > {anchor} + %(lag)s::interval
                           AND recorded_at < CASE WHEN c.lag_class < 41
                                THEN {anchor} + interval '10 milliseconds' * power(2, c.lag_class)
                                ELSE 'infinity' END
                           AND recorded_at - effective_at > interval '10 milliseconds'"""


_BALANCE_AS_OF = f"""
SELECT coalesce((SELECT balance_after FROM ledger_posting
                  WHERE account_id = %(account)s::bigint AND asset_id = %(asset)s::bigint
                    AND recorded_at <= %(at)s::timestamptz
                  ORDER BY recorded_at DESC LIMIT 1), 0)
     + coalesce((SELECT sum(amount) FROM ledger_posting
                  WHERE account_id = %(account)s::bigint AND asset_id = %(asset)s::bigint
                    AND recorded_at > %(at)s::timestamptz
                    AND recorded_at <= %(at)s::timestamptz + %(lag)s::interval
                    AND effective_at <= %(at)s::timestamptz), 0)
     + coalesce((SELECT sum(p.amount)
                   FROM generate_series(1, 41) AS c(lag_class)
                   CROSS JOIN LATERAL (
                        SELECT amount FROM ledger_posting
                         WHERE account_id = %(account)s::bigint AND asset_id = %(asset)s::bigint
                           AND effective_at <= %(at)s::timestamptz
                           AND {_backdated_after("%(at)s::timestamptz")}) p), 0)
"""


# Django turns psycopg's statement preparation off (prepare_threshold=None, for poolers),
# so `prepare=True` on its connection prepares nothing: planning this query (41 lag-class
# probes) took 0.5 ms a call, as long as running it. Outside a transaction it goes
# through libpq as a statement prepared once per connection (ledger.binding.exec_prepared),
# its parameters typed so that one generic plan serves every call.
_BALANCE_AS_OF_LIBPQ = (
    _BALANCE_AS_OF.replace("%(account)s", "$1")
    .replace("%(asset)s", "$2")
    .replace("%(at)s", "$3")
    .replace("%(lag)s", "$4")
)
_BACKDATED_LAG_TEXT = f"{BACKDATED_LAG // timedelta(microseconds=1)} microseconds".encode()


def balance_as_of(*, account_id: int, asset_id: int, at: datetime) -> int:
    """Return the balance of postings effective at or before `at`; cost independent of history.

    Inside a transaction (an atomic block, a view's request) it is planned per call, on
    the connection's cursor, in that transaction: there a prepared statement that a
    pooler dropped (or another client prepared) would fail, and abort the caller's
    transaction before it could be prepared again.
    """
    db = database()
    if on_its_own(db):
        texts = [str(account_id).encode(), str(asset_id).encode(), libpq_text(at)]
        ((amount,),) = exec_prepared(
            db,
            "ledger_balance_as_of",
            _BALANCE_AS_OF_LIBPQ,
            [*texts, _BACKDATED_LAG_TEXT],
            (False,) * 4,
        )
        assert amount is not None
        return int(amount)
    params = {"account": account_id, "asset": asset_id, "at": at, "lag": BACKDATED_LAG}
    with bound_cursor(db) as cursor:
        cursor.execute(_BALANCE_AS_OF, params)
        row = cursor.fetchone()
    assert row is not None
    return int(row[0])


@dataclass(frozen=True, slots=True)
class TrialBalanceRow:
    asset: str
    scale: int
    account: str
    kind: str
    balance: int  # debits minus credits

    @property
    def debit(self) -> int:
        return self.balance if self.balance > 0 else 0

    @property
    def credit(self) -> int:
        return -self.balance if self.balance < 0 else 0


def trial_balance(*, at: datetime | None = None) -> list[TrialBalanceRow]:
    """Return every non-zero (account, asset) balance, now or as of `at`, by asset then account.

    Per asset, debits equal credits: the rows of one asset sum to zero.
    """
    if at is None:
        sql = """
            SELECT s.code, s.scale, a.code, a.kind, b.amount
              FROM ledger_balance b
              JOIN ledger_account a ON a.id = b.account_id
              JOIN ledger_asset s ON s.id = b.asset_id
             WHERE b.amount <> 0
             ORDER BY s.code, a.code"""
        params: dict[str, Any] = {}
    else:
        sql = f"""
            SELECT s.code, s.scale, a.code, a.kind, x.amount
              FROM ledger_balance b
              JOIN ledger_account a ON a.id = b.account_id
              JOIN ledger_asset s ON s.id = b.asset_id
              CROSS JOIN LATERAL ({
            _BALANCE_AS_OF.replace("%(account)s", "b.account_id").replace("%(asset)s", "b.asset_id")
        } AS amount) x
             WHERE x.amount <> 0
             ORDER BY s.code, a.code"""
        params = {"at": at, "lag": BACKDATED_LAG}
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return [
            TrialBalanceRow(
                asset=asset, scale=scale, account=account, kind=kind, balance=int(amount)
            )
            for asset, scale, account, kind, amount in cursor.fetchall()
        ]


@dataclass(frozen=True, slots=True)
class HistoryRow:
    posting_id: int
    transaction_id: int
    idempotency_key: str
    effective_at: datetime
    description: str
    amount: int
    running_balance: int


@dataclass(frozen=True, slots=True)
class AccountHistory:
    opening_balance: int
    rows: list[HistoryRow]
    truncated: bool


# A page of an account's history, in effective order, from the index the as-of read uses:
# there is no (account, asset, effective time) index, which cost a tenth of a batch's
# posting time to maintain (migration 0011). Effective time never exceeds recorded time,
# and exceeds it by more than BACKDATED_LAG only for a back-dated posting, so:
#  - `firsts`: the first n postings effective in [since, until) by recorded time, the
#    last of them recorded at R; each of them is effective at or before X = min(R, until),
#    and X = until when fewer than n exist;
#  - every posting effective in [since, X] is among them, or recorded after R (and at or
#    after since) but by X + lag, or back-dated and found by lag class as in
#    _BALANCE_AS_OF: recorded after X + lag but before X plus its class's bound;
# so the first n of those candidates in effective order are the first n of the range,
# and their running balances are right: no posting effective before one of them is
# missing. (Recorded times are unique per account and asset, ledger_posting_recorded_
# unique, so the n firsts never split a tie at R.) Besides the page it reads what was
# recorded within the lag after it (a batch's postings to the row: up to a thousand)
# and the postings back-dated across it. Transactions are joined to the page only,
# one probe each, after the sort.
_ACCOUNT_HISTORY = f"""
WITH firsts AS (
    SELECT id, transaction_id, effective_at, amount, recorded_at FROM ledger_posting
     WHERE account_id = %(account)s::bigint AND asset_id = %(asset)s::bigint
       AND recorded_at >= %(since)s::timestamptz
       AND recorded_at <= %(until)s::timestamptz + %(lag)s::interval
       AND effective_at >= %(since)s::timestamptz AND effective_at < %(until)s::timestamptz
     ORDER BY recorded_at
     LIMIT %(n)s
), bound AS (
    SELECT coalesce(max(recorded_at), '-infinity') AS r,
           CASE WHEN count(*) = %(n)s THEN least(max(recorded_at), %(until)s::timestamptz)
                ELSE %(until)s::timestamptz END AS x
      FROM firsts
), candidates AS (
    SELECT id, transaction_id, effective_at, amount FROM firsts
    UNION ALL
    SELECT p.id, p.transaction_id, p.effective_at, p.amount
      FROM bound, ledger_posting p
     WHERE p.account_id = %(account)s::bigint AND p.asset_id = %(asset)s::bigint
       AND p.recorded_at > bound.r AND p.recorded_at >= %(since)s::timestamptz
       AND p.recorded_at <= bound.x + %(lag)s::interval
       AND p.effective_at >= %(since)s::timestamptz AND p.effective_at < %(until)s::timestamptz
    UNION ALL
    SELECT p.id, p.transaction_id, p.effective_at, p.amount
      FROM bound CROSS JOIN generate_series(1, 41) AS c(lag_class)
      CROSS JOIN LATERAL (
           SELECT id, transaction_id, effective_at, amount FROM ledger_posting
            WHERE account_id = %(account)s::bigint AND asset_id = %(asset)s::bigint
              AND effective_at >= %(since)s::timestamptz
              AND effective_at < %(until)s::timestamptz
              AND {_backdated_after("bound.x")}
           OFFSET 0) p  -- a probe per class, not one scan of every back-dated posting
), page AS (
    SELECT id, transaction_id, effective_at, amount,
           %(opening)s::numeric + sum(amount) OVER (ORDER BY effective_at, id) AS running
      FROM candidates
     ORDER BY effective_at, id
     LIMIT %(n)s
)
SELECT p.id, p.transaction_id, t.idempotency_key, p.effective_at, t.description, p.amount,
       p.running
  FROM page p
 CROSS JOIN LATERAL (SELECT idempotency_key, description FROM ledger_transaction
                      WHERE id = p.transaction_id OFFSET 0) t  -- not a scan of them all
 ORDER BY p.effective_at, p.id
"""


def account_history(
    *,
    account_id: int,
    asset_id: int,
    since: datetime,
    until: datetime,
    limit: int = HISTORY_ROWS_MAX,
) -> AccountHistory:
    """Return postings effective in [since, until) with the running balance after each.

    Its cost follows `limit`, the postings recorded within the lag after the page and
    those back-dated across it, not the length of the history (see _ACCOUNT_HISTORY).
    """
    limit = min(limit, HISTORY_ROWS_MAX)
    opening = balance_as_of(
        account_id=account_id, asset_id=asset_id, at=since - timedelta(microseconds=1)
    )
    params: dict[str, Any] = {
        "opening": opening,
        "account": account_id,
        "asset": asset_id,
        "since": since,
        "until": until,
        "lag": BACKDATED_LAG,
        "n": limit + 1,  # one more than asked: whether the page is truncated
    }
    with connection.cursor() as cursor:
        cursor.execute(_ACCOUNT_HISTORY, params)
        fetched = cursor.fetchall()
    rows = [
        HistoryRow(
            posting_id=r[0],
            transaction_id=r[1],
            idempotency_key=r[2],
            effective_at=r[3],
            description=r[4],
            amount=int(r[5]),
            running_balance=int(r[6]),
        )
        for r in fetched[:limit]
    ]
    return AccountHistory(opening_balance=opening, rows=rows, truncated=len(fetched) > limit)


JOURNAL_COLUMNS = (
    "transaction_id",
    "idempotency_key",
    "effective_at",
    "account",
    "asset",
    "amount",
    "amount_decimal",
    "description",
)


def journal_rows(
    *, since: datetime | None = None, until: datetime | None = None
) -> Iterator[tuple[object, ...]]:
    """Yield one row per posting, in (effective time, transaction, posting) order.

    Streams through a server-side cursor in chunks, so a year of postings exports in
    constant memory.
    """
    postings = Posting.objects.all()
    if since is not None:
        postings = postings.filter(effective_at__gte=since)
    if until is not None:
        postings = postings.filter(effective_at__lt=until)
    rows = postings.order_by("effective_at", "transaction_id", "id").values_list(
        "transaction_id",
        "transaction__idempotency_key",
        "effective_at",
        "account__code",
        "asset__code",
        "amount",
        "asset__scale",
        "transaction__description",
    )
    for tx_id, key, effective_at, account, asset, amount, scale, description in rows.iterator(
        chunk_size=JOURNAL_CHUNK_ROWS
    ):
        yield (
            tx_id,
            key,
            effective_at.isoformat(),
            account,
            asset,
            int(amount),
            format_amount(int(amount), scale),
            description,
        )


def format_amount(amount: int, scale: int) -> str:
    """Return `amount` smallest units as an exact decimal string, e.g. 1234, 2 -> '12.34'.

    Integer arithmetic, not Decimal: a Decimal context rounds past 28 digits.
    """
    if scale == 0:
        return str(amount)
    whole, fraction = divmod(abs(amount), 10**scale)
    return f"{'-' if amount < 0 else ''}{whole}.{fraction:0{scale}d}"


def normal_balance(*, kind: str, balance: int) -> int:
    """Return the balance signed the way the account kind is read (credits for liabilities)."""
    return balance if kind in DEBIT_NORMAL_KINDS else -balance
