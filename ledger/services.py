"""Every write to the books: open assets and accounts, post, reverse, open and close periods.

One way in (`transactions_post`, with `transaction_post` for one entry), one way to
correct (`transaction_reverse`). The database enforces the same rules again: the
posting functions check their input themselves, the triggers police every other writer
(migrations 0002 to 0006); the checks here run first so callers get a precise error.

Hot path: posting is one call of the SQL function `ledger_post()` (migrations 0006 to
0008) with the batch as arrays, or `ledger_post_transfer()` for one two-leg entry; outside an
atomic block sent straight through libpq (ledger.binding.exec_prepared), a transfer
through the procedure `ledger_post_transfer_durably()` (migration 0010). Through the
ORM, `bulk_create` builds a model instance per leg, cannot say ON CONFLICT DO NOTHING
RETURNING (which idempotency needs) and costs a round trip per table; measured with
`manage.py bench ledger`, one set-based call per batch is what posting throughput needs.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple

from django.db import DatabaseError, IntegrityError, connection, transaction
from django.db.backends.base.base import BaseDatabaseWrapper
from django.utils import timezone
from psycopg import pq

from ledger.binding import bound_cursor, database, exec_prepared, libpq_text, on_its_own
from ledger.exceptions import (
    AlreadyReversed,
    ConcurrentPosting,
    IdempotencyConflict,
    InvalidTransaction,
    LedgerError,
    UnbalancedTransaction,
    sqlstate_of,
    translate_database_error,
)
from ledger.fields import AMOUNT_DIGITS_MAX
from ledger.models import (
    ASSET_SCALE_MAX,
    DESCRIPTION_LENGTH_MAX,
    IDEMPOTENCY_KEY_LENGTH_MAX,
    REVERSED_ONCE,
    Account,
    AccountKind,
    Asset,
    Period,
    PeriodStatus,
    Posting,
    Transaction,
)

LEGS_PER_TRANSACTION_MAX = 1_000
TRANSACTIONS_PER_BATCH_MAX = 10_000
AMOUNT_ABS_MAX = 10**AMOUNT_DIGITS_MAX - 1
METADATA_BYTES_MAX = 16_384


@dataclass(frozen=True, slots=True)
class Leg:
    """One side of an entry: `amount` > 0 debits `account`, < 0 credits it."""

    account: str
    asset: str
    amount: int


@dataclass(frozen=True, slots=True)
class Entry:
    """A transaction to post. `effective_at=None` means now, as the database sees it."""

    idempotency_key: str
    legs: Sequence[Leg]
    description: str = ""
    effective_at: datetime | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    reverses_id: int | None = None


class Posted(NamedTuple):
    """What a post returned: the transaction id, and whether this call created it.

    A named tuple, not a frozen dataclass: a 1,000-entry batch builds 1,000 of them,
    and a frozen dataclass's __init__ cost a few per cent of the batch (measured).
    """

    transaction_id: int
    idempotency_key: str
    created: bool


# --- assets, accounts ------------------------------------------------------------


def asset_create(*, code: str, scale: int, name: str = "") -> Asset:
    """Return the asset `code`, creating it; an existing one must have the same scale."""
    if not 0 <= scale <= ASSET_SCALE_MAX:
        raise InvalidTransaction(f"asset scale {scale} is outside 0..{ASSET_SCALE_MAX}")
    asset, _ = Asset.objects.get_or_create(code=code, defaults={"scale": scale, "name": name})
    if asset.scale != scale:
        raise IdempotencyConflict(
            f"asset {code} exists with scale {asset.scale}, not {scale}",
            extra={"asset": code},
        )
    return asset


def account_open(
    *,
    code: str,
    kind: AccountKind | str,
    owner: str = "",
    metadata: Mapping[str, Any] | None = None,
) -> Account:
    """Return the account `code`, opening it; an existing one must have the same kind."""
    account, _ = Account.objects.get_or_create(
        code=code, defaults={"kind": kind, "owner": owner, "metadata": dict(metadata or {})}
    )
    if account.kind != kind:
        raise IdempotencyConflict(
            f"account {code} exists as {account.kind}, not {kind}", extra={"account": code}
        )
    return account


# --- posting -----------------------------------------------------------------------


# One encoder for every hash (json.dumps with options builds a new one per call); its
# output must never change: stored hashes are compared with it on every replay.
_CONTENT_ENCODER = json.JSONEncoder(sort_keys=True, separators=(",", ":"), default=str)


_JSON_STRING = json.encoder.encode_basestring_ascii  # what that encoder does to a str, in C


def _content_json(entry: Entry) -> str:
    """What the entry says, as canonical JSON, independent of the order of its legs.

    The string `_CONTENT_ENCODER.encode` makes of {"description", "effective_at" (an
    instant in UTC, whatever zone the caller spelled it in), "legs" (sorted [account,
    asset, amount] triples), "metadata", "reverses"}, built directly: the encoder
    costs a new C encoder per call, and a 1,000-entry batch hashes 1,000 entries.
    Keys in sorted order, strings through the encoder's own escaping, ints as it
    writes them (validated legs hold ints, never bools), metadata through the encoder
    itself. tests/ledger/test_services.py holds it to the encoder, byte for byte.
    """
    if len(entry.legs) == 2:  # most entries: sorted() of two, written out
        a, b = entry.legs
        first, second = (a.account, a.asset, a.amount), (b.account, b.asset, b.amount)
        if second < first:
            first, second = second, first
        legs = (
            f"[{_JSON_STRING(first[0])},{_JSON_STRING(first[1])},{first[2]!r}],"
            f"[{_JSON_STRING(second[0])},{_JSON_STRING(second[1])},{second[2]!r}]"
        )
    else:
        legs = ",".join(
            f"[{_JSON_STRING(account)},{_JSON_STRING(asset)},{amount!r}]"
            for account, asset, amount in sorted((g.account, g.asset, g.amount) for g in entry.legs)
        )
    effective_at = (
        _JSON_STRING(entry.effective_at.astimezone(UTC).isoformat())
        if entry.effective_at
        else "null"
    )
    # The shortcuts only where they are what the encoder writes: an empty dict, None, an int.
    metadata = (
        "{}"
        if type(entry.metadata) is dict and not entry.metadata
        else _CONTENT_ENCODER.encode(entry.metadata)
    )
    reverses = (
        "null"
        if entry.reverses_id is None
        else repr(entry.reverses_id)
        if type(entry.reverses_id) is int
        else _CONTENT_ENCODER.encode(entry.reverses_id)
    )
    return (
        f'{{"description":{_JSON_STRING(entry.description)},"effective_at":{effective_at},'
        f'"legs":[{legs}],"metadata":{metadata},"reverses":{reverses}}}'
    )


def _content_hash(entry: Entry) -> str:
    """Return a digest of what the entry says, independent of the order of its legs."""
    return hashlib.sha256(_content_json(entry).encode()).hexdigest()


def _refuse_nul(entries: Sequence[Entry]) -> None:
    """PostgreSQL text cannot hold a NUL character: said here, by name.

    One scan of the batch's text joined (C speed); entry by entry only to name one.
    """
    texts = [text for e in entries for text in (e.idempotency_key, e.description)]
    texts += [text for e in entries for leg in e.legs for text in (leg.account, leg.asset)]
    if "\x00" not in "".join(texts):
        return
    for entry in entries:
        texts = [entry.idempotency_key, entry.description]
        texts += [text for leg in entry.legs for text in (leg.account, leg.asset)]
        if any("\x00" in text for text in texts):
            raise InvalidTransaction(
                f"transaction {entry.idempotency_key!r} contains a NUL character",
                extra={"idempotency_key": entry.idempotency_key.replace("\x00", "")},
            )


def _validate(entry: Entry) -> None:
    key = entry.idempotency_key
    if not key or len(key) > IDEMPOTENCY_KEY_LENGTH_MAX:
        raise InvalidTransaction(
            f"idempotency key must be 1..{IDEMPOTENCY_KEY_LENGTH_MAX} characters",
            extra={"idempotency_key": key[:IDEMPOTENCY_KEY_LENGTH_MAX]},
        )
    if not 2 <= len(entry.legs) <= LEGS_PER_TRANSACTION_MAX:
        raise InvalidTransaction(
            f"transaction {key} has {len(entry.legs)} legs; 2..{LEGS_PER_TRANSACTION_MAX} allowed",
            extra={"idempotency_key": key},
        )
    if len(entry.description) > DESCRIPTION_LENGTH_MAX:
        raise InvalidTransaction(f"description of {key} is over {DESCRIPTION_LENGTH_MAX} chars")
    if entry.effective_at is not None and timezone.is_naive(entry.effective_at):
        raise InvalidTransaction(f"effective time of {key} has no time zone")
    if entry.metadata and len(json.dumps(entry.metadata, default=str)) > METADATA_BYTES_MAX:
        raise InvalidTransaction(f"metadata of {key} is over {METADATA_BYTES_MAX} bytes")
    _validate_legs(key, entry.legs)


def _validate_legs(key: str, legs: Sequence[Leg]) -> None:
    """Every amount a non-zero whole number of smallest units; each asset sums to zero."""
    if len(legs) == 2:  # most entries: valid when two whole amounts cancel in one asset
        first, second = legs
        amount = first.amount
        if (
            type(amount) is int
            and type(second.amount) is int
            and second.amount == -amount
            and 0 < abs(amount) <= AMOUNT_ABS_MAX
            and first.asset == second.asset
        ):
            return
    sums: defaultdict[str, int] = defaultdict(int)
    for leg in legs:
        # bool is an int in Python; a True amount is a bug, not one unit.
        if type(leg.amount) is not int or leg.amount == 0 or abs(leg.amount) > AMOUNT_ABS_MAX:
            raise InvalidTransaction(
                f"leg amount {leg.amount!r} of {key} must be a non-zero integer of smallest units",
                extra={"idempotency_key": key, "account": leg.account},
            )
        sums[leg.asset] += leg.amount
    unbalanced = {asset: total for asset, total in sums.items() if total != 0}
    if unbalanced:
        raise UnbalancedTransaction(
            f"transaction {key} does not balance: "
            + ", ".join(f"{asset} sums to {total}" for asset, total in sorted(unbalanced.items())),
            extra={"idempotency_key": key, "sums": {a: str(t) for a, t in unbalanced.items()}},
        )


def _net_legs(legs: Iterable[tuple[str, str, int]]) -> dict[tuple[str, str], int]:
    net: defaultdict[tuple[str, str], int] = defaultdict(int)
    for account, asset, amount in legs:
        net[(account, asset)] += amount
    return {key: amount for key, amount in net.items() if amount != 0}


def _check_reversals(entries: Sequence[Entry]) -> None:
    """Assert each reversal negates its original, leg for leg (the database checks too)."""
    if not entries:
        return
    originals: defaultdict[int, list[tuple[str, str, int]]] = defaultdict(list)
    rows = Posting.objects.filter(transaction_id__in={e.reverses_id for e in entries})
    for tx_id, account, asset, amount in rows.values_list(
        "transaction_id", "account__code", "asset__code", "amount"
    ):
        originals[tx_id].append((account, asset, -int(amount)))
    for entry in entries:
        assert entry.reverses_id is not None
        if entry.reverses_id not in originals:
            raise InvalidTransaction(f"transaction {entry.reverses_id} does not exist")
        given = _net_legs((leg.account, leg.asset, leg.amount) for leg in entry.legs)
        if given != _net_legs(originals[entry.reverses_id]):
            raise InvalidTransaction(
                f"transaction {entry.idempotency_key} reverses #{entry.reverses_id} "
                "but does not negate it",
                extra={"idempotency_key": entry.idempotency_key},
            )


class _DatabaseRules:
    """Turn a database rule violation into the ledger error it stands for.

    A class, not a @contextmanager generator: it wraps every post, and a generator
    costs a frame and its protocol on each one.
    """

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, error: Any, traceback: Any) -> None:
        if isinstance(error, IntegrityError):
            diag = getattr(error.__cause__, "diag", None)
            if getattr(diag, "constraint_name", None) == REVERSED_ONCE:
                raise AlreadyReversed(
                    "a transaction in this batch reverses one already reversed",
                    extra={"sqlstate": "23505"},
                ) from error
        elif isinstance(error, DatabaseError):
            translated = _posting_error(error) or translate_database_error(error)
            if translated is not None:
                raise translated from error


def _posting_error(error: DatabaseError) -> LedgerError | None:
    """Return ConcurrentPosting for a race ledger_post() lost, InvalidTransaction for a NUL."""
    state = sqlstate_of(error)
    if state == "22P05":  # a NUL (\u0000) in metadata: jsonb cannot hold it
        return InvalidTransaction(
            "metadata contains a NUL character, which PostgreSQL cannot store",
            extra={"sqlstate": state},
        )
    if state in {"40001", "40P01"}:
        diag = getattr(error.__cause__, "diag", None)
        message = str(getattr(diag, "message_primary", None) or error)
        return ConcurrentPosting(message, extra={"sqlstate": state})
    return None


def _poster_queries(function: str, types: Sequence[str]) -> tuple[str, str]:
    """The call of a posting function, for the psycopg cursor (%b) and for libpq ($n)."""
    cursor = ", ".join(f"%b::{t}" for t in types)
    libpq = ", ".join(f"${n}::{t}" for n, t in enumerate(types, 1))
    return (
        f"SELECT transaction_id, created FROM {function}({cursor})",
        f"SELECT transaction_id, created FROM {function}({libpq})",
    )


# One call per batch: ledger_post() (migration 0008) inserts the transactions (keys in
# order), locks the balance rows in (account, asset) order, then inserts the postings
# with their running balances and moves the rows, and returns the ids: a few statements
# whatever the batch size. Amounts travel as text, so that no value is squeezed into a
# fixed-width integer.
_LEDGER_POST, _LEDGER_POST_LIBPQ = _poster_queries(
    "ledger_post",
    # keys, hashes, descriptions, effective times, metadata, reversals; then per leg:
    # entry, account, asset, amount
    [
        *("text[]", "text[]", "text[]", "timestamptz[]", "text[]", "bigint[]"),
        *("int[]", "text[]", "text[]", "numeric[]"),
    ],
)
_POST_BINARY = (False,) * 10  # array literals are text

# One entry moving one asset between two accounts, the usual call: scalar parameters
# (migrations 0005, 0006). Measured from Python, 908-980/s against 563/s for the same
# entry as ten one-element arrays through ledger_post().
_TRANSFER_TYPES = ("text", "text", "text", "timestamptz", "text", "text", "text", "text", "numeric")
_LEDGER_POST_TRANSFER, _ = _poster_queries("ledger_post_transfer", _TRANSFER_TYPES)
# Committed on its own, a transfer goes through the procedure of migration 0010: it
# commits the transfer without waiting for the WAL flush, so that its balance rows are
# free at once, and returns only after a second commit has flushed the WAL through it.
_LEDGER_POST_TRANSFER_DURABLY = (
    "CALL ledger_post_transfer_durably("
    + ", ".join(f"${n}::{t}" for n, t in enumerate(_TRANSFER_TYPES, 1))
    + ", NULL, NULL)"
)
# text parameters in binary (exact lengths), the instant and the amount as text
_TRANSFER_BINARY = (True, True, True, False, True, True, True, True, False)


def _post_through(
    name: str,
    queries: tuple[str, str],
    params: list[Any],
    binary: Sequence[bool],
    interrupted: Callable[[BaseDatabaseWrapper], list[tuple[int, bool]] | None] | None = None,
) -> list[tuple[int, bool]]:
    """Call a posting function with `params`; its (transaction id, created) rows.

    Inside an atomic block, through psycopg's cursor with binary parameters (a
    savepoint, see `_call`). Outside one the call commits on its own (a transfer in two
    transactions, see migration 0010), one round trip, straight through libpq
    (ledger.binding.exec_prepared says why), its arrays written as PostgreSQL array
    literals: a third of the cost of psycopg's per-element dumping of a 1,000-entry batch.
    """
    db = database()
    if not on_its_own(db):
        return [(int(tx_id), bool(created)) for tx_id, created in _call(queries[0], params)]
    raw = [libpq_text(value) for value in params]
    try:
        with _DatabaseRules():
            rows = exec_prepared(db, name, queries[1], raw, binary)
    except DatabaseError:  # no ledger rule: a cancel, a timeout; `interrupted` may know more
        found = interrupted(db) if interrupted is not None else None
        if found is None:
            raise
        return found
    return [(_int(tx_id), created == b"t") for tx_id, created in rows]


def _int(value: bytes | None) -> int:
    if value is None:  # the posting functions return an id for every entry
        raise DatabaseError("a posting function returned no transaction id")
    return int(value)


def _call(query: str, params: list[Any]) -> list[tuple[Any, ...]]:
    """Run a posting function; its rows, or the ledger error a database rule stands for.

    Inside a caller's atomic block, a savepoint, so that a refused post leaves the
    caller's transaction usable; outside one, the single statement commits on its own.
    """
    db = database()
    scope = transaction.atomic() if db.in_atomic_block else nullcontext()
    with _DatabaseRules(), scope, bound_cursor(db) as cursor:
        cursor.execute(query, params)
        return cursor.fetchall()


def _metadata_json(entry: Entry) -> str:
    return json.dumps(entry.metadata, default=str) if entry.metadata else "{}"


def _is_transfer(entry: Entry) -> bool:
    first, *rest = entry.legs
    return (
        len(rest) == 1
        and entry.reverses_id is None
        and first.asset == rest[0].asset
        and first.account != rest[0].account
    )


def transactions_post(*, entries: Sequence[Entry]) -> list[Posted]:
    """Post `entries` atomically, in order; return one `Posted` per entry.

    An idempotency key already posted with the same content returns the existing
    transaction (created=False); with different content the whole batch fails with
    IdempotencyConflict and nothing is written.
    """
    if not 1 <= len(entries) <= TRANSACTIONS_PER_BATCH_MAX:
        raise InvalidTransaction(f"a batch holds 1..{TRANSACTIONS_PER_BATCH_MAX} transactions")
    if len({e.idempotency_key for e in entries}) != len(entries):
        duplicates = [k for k, n in Counter(e.idempotency_key for e in entries).items() if n > 1]
        raise InvalidTransaction(f"idempotency keys repeated within one batch: {duplicates[:5]}")
    for entry in entries:
        _validate(entry)
    _refuse_nul(entries)
    _check_reversals([e for e in entries if e.reverses_id is not None])
    if len(entries) == 1 and _is_transfer(entries[0]):
        return [_post_transfer(entries[0])]
    leg_entry: list[int] = []
    leg_account: list[str] = []
    leg_asset: list[str] = []
    leg_amount: list[str] = []
    for position, entry in enumerate(entries, 1):
        for leg in entry.legs:
            leg_entry.append(position)
            leg_account.append(leg.account)
            leg_asset.append(leg.asset)
            leg_amount.append(str(leg.amount))
    params: list[Any] = [
        [e.idempotency_key for e in entries],
        [_content_hash(e) for e in entries],
        [e.description for e in entries],
        [e.effective_at for e in entries],
        [_metadata_json(e) for e in entries],
        [e.reverses_id for e in entries],
        leg_entry,
        leg_account,
        leg_asset,
        leg_amount,
    ]
    rows = _post_through("ledger_post", (_LEDGER_POST, _LEDGER_POST_LIBPQ), params, _POST_BINARY)
    # Positional: keywords cost a third of building 1,000 of them (measured).
    return [
        Posted(tx_id, entry.idempotency_key, created)
        for entry, (tx_id, created) in zip(entries, rows, strict=True)
    ]


def _post_transfer(entry: Entry) -> Posted:
    debit, credit = entry.legs  # validated: balanced, so credit.amount == -debit.amount
    key, content_hash = entry.idempotency_key, _content_hash(entry)
    params = [
        key,
        content_hash,
        entry.description,
        entry.effective_at,
        _metadata_json(entry),
        debit.account,
        credit.account,
        debit.asset,
        str(debit.amount),
    ]
    ((tx_id, created),) = _post_through(
        "ledger_post_transfer_durably",
        (_LEDGER_POST_TRANSFER, _LEDGER_POST_TRANSFER_DURABLY),
        params,
        _TRANSFER_BINARY,
        lambda db: _transfer_made_before_the_error(db, key, content_hash),
    )
    return Posted(transaction_id=tx_id, idempotency_key=key, created=created)


def _transfer_made_before_the_error(
    db: BaseDatabaseWrapper, key: str, content_hash: str
) -> list[tuple[int, bool]] | None:
    """After the procedure failed with no ledger rule broken: whether it had committed.

    The procedure commits the transfer, then waits for the flush in a second
    transaction; a cancel or a statement timeout can land between the two. The call
    has ended either way, so the key says: posted with this content (by this call or an
    earlier one: created is False, the call cannot tell), after a flush that makes it
    durable; or not (None: the error stands, nothing was posted).
    """
    if db.connection is None or db.connection.pgconn.status != pq.ConnStatus.OK:
        return None  # the connection is gone: the outcome is unknown, as for any commit
    try:
        rows = exec_prepared(
            db,
            "ledger_transfer_by_key",
            "SELECT t.id, t.content_hash FROM ledger_transaction t WHERE t.idempotency_key = $1",
            [key.encode()],
            (True,),
        )
        if not rows or rows[0][1] != content_hash.encode():
            return None
        # Its own transaction, which writes WAL: its commit waits for the flush.
        exec_prepared(
            db, "ledger_flush", "SELECT pg_logical_emit_message(true, 'ledger', '')", [], ()
        )
    except DatabaseError:
        return None
    return [(_int(rows[0][0]), False)]


def transaction_post(
    *,
    idempotency_key: str,
    legs: Sequence[Leg],
    description: str = "",
    effective_at: datetime | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Posted:
    """Post one balanced transaction (see `transactions_post`)."""
    entry = Entry(
        idempotency_key=idempotency_key,
        legs=tuple(legs),
        description=description,
        effective_at=effective_at,
        metadata=dict(metadata or {}),
    )
    # What transactions_post checks of a one-entry batch, without the batch: a transfer
    # is the hot path, and four processes posting them share two cores with the server.
    _validate(entry)
    _refuse_nul((entry,))
    if _is_transfer(entry):
        return _post_transfer(entry)
    return transactions_post(entries=[entry])[0]


def transaction_reverse(
    *,
    transaction_id: int,
    idempotency_key: str,
    description: str = "",
    effective_at: datetime | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> Posted:
    """Post the exact opposite of a transaction, linked to it. Each can be reversed once."""
    original = Transaction.objects.filter(pk=transaction_id).first()
    if original is None:
        raise InvalidTransaction(f"transaction {transaction_id} does not exist")
    legs = tuple(
        Leg(account=account, asset=asset, amount=-int(amount))
        for account, asset, amount in original.postings.order_by("id").values_list(
            "account__code", "asset__code", "amount"
        )
    )
    entry = Entry(
        idempotency_key=idempotency_key,
        legs=legs,
        description=description
        or f"Reversal of #{original.pk}: {original.description}"[:DESCRIPTION_LENGTH_MAX],
        effective_at=effective_at,
        metadata=dict(metadata or {}),
        reverses_id=original.pk,
    )
    try:
        return transactions_post(entries=[entry])[0]
    except AlreadyReversed as error:
        raise AlreadyReversed(
            f"transaction {transaction_id} is already reversed",
            extra={"transaction_id": transaction_id},
        ) from error


# --- periods -----------------------------------------------------------------------


def _month_bounds(year: int, month: int) -> tuple[datetime, datetime]:
    starts_at = datetime(year, month, 1, tzinfo=UTC)
    ends_at = datetime(year + month // 12, month % 12 + 1, 1, tzinfo=UTC)
    return starts_at, ends_at


def period_open(*, year: int, month: int) -> Period:
    """Return the monthly period (UTC calendar month), opening it if it does not exist."""
    starts_at, ends_at = _month_bounds(year, month)
    period, _ = Period.objects.get_or_create(starts_at=starts_at, defaults={"ends_at": ends_at})
    return period


def period_close(*, period_id: int, closed_by_id: int | None, note: str = "") -> Period:
    """Close a period: from then on no transaction may be dated in it. Idempotent.

    Closing takes a SHARE ROW EXCLUSIVE lock on the transactions table, which waits for
    every posting in flight and holds new ones back for the instant the close takes;
    so no transaction dated in the period can commit after the close.
    """
    with transaction.atomic():
        with connection.cursor() as cursor:
            cursor.execute("LOCK TABLE ledger_transaction IN SHARE ROW EXCLUSIVE MODE")
        period = Period.objects.select_for_update().get(pk=period_id)
        if period.status == PeriodStatus.CLOSED:
            return period
        period.status = PeriodStatus.CLOSED
        period.closed_at = timezone.now()
        period.closed_by_id = closed_by_id
        period.close_note = note[:DESCRIPTION_LENGTH_MAX]
        period.save(update_fields=["status", "closed_at", "closed_by", "close_note"])
    return period
