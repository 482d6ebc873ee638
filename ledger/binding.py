"""A server-binding psycopg cursor on Django's own connection, for the hot calls.

Django's default cursor binds parameters on the client: it quotes every element of an
array parameter with a regex, the server parses the text again, and nothing can be
prepared. `ledger_post()` (arrays of a whole batch), `ledger_post_transfer()` and the
as-of balance read (planning costs more than running) use this instead: same connection
and transaction as the ORM, parameters sent in binary where asked (%b), and database
errors raised as Django's.

One cursor per connection, kept: a new psycopg cursor per call (its adapters copied),
the connection proxy's thread-local lookups and Django's wrappers cost about 60 us a
call, as much as the server spends on a transfer's SQL outside its commit.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import psycopg
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.backends.base.base import BaseDatabaseWrapper
from psycopg import errors, pq

_CURSOR_ATTRIBUTE = "_ledger_bound_cursor"


def database() -> BaseDatabaseWrapper:
    """The default connection itself: one thread-local lookup, not one per attribute."""
    return connections[DEFAULT_DB_ALIAS]


@contextmanager
def bound_cursor(db: BaseDatabaseWrapper | None = None) -> Iterator[psycopg.Cursor[Any]]:
    """Yield the server-binding cursor of the default connection, inside its transaction."""
    db = db or database()
    with db.wrap_database_errors:
        db.ensure_connection()
        cursor: psycopg.Cursor[Any] | None = getattr(db, _CURSOR_ATTRIBUTE, None)
        if cursor is None or cursor.closed or cursor.connection is not db.connection:
            cursor = psycopg.Cursor(db.connection)
            setattr(db, _CURSOR_ATTRIBUTE, cursor)
        yield cursor


def on_its_own(db: BaseDatabaseWrapper) -> bool:
    """Whether a statement sent now commits on its own: `exec_prepared` may carry it.

    Autocommit outside an atomic block, and no transaction open on the connection that
    Django does not know of (a raw BEGIN through a cursor).
    """
    return (
        not db.in_atomic_block
        and db.get_autocommit()  # connects first if needed
        and db.connection.pgconn.transaction_status == pq.TransactionStatus.IDLE
    )


_PREPARED_ATTRIBUTE = "_ledger_prepared"
_TEXT, _BINARY = 0, 1
_SQLSTATE = pq.DiagnosticField.SQLSTATE


def exec_prepared(
    db: BaseDatabaseWrapper,
    name: str,
    query: str,
    params: Sequence[bytes | None],
    binary: Sequence[bool],
) -> list[tuple[bytes | None, ...]]:
    """Run `query` as a prepared statement straight through libpq; rows as text bytes.

    For the calls where the driver's own cost shows: a post committed on its own (a
    transfer, a batch). psycopg's cursor (query conversion, adapters, its prepared-statement cache,
    result loaders) cost about 45 us of CPU a call more than this, measured, and four
    processes posting to hot accounts share two cores with the server. Only outside a
    transaction (psycopg starts one itself when the connection is not in autocommit,
    and this bypasses it): callers check `on_its_own` first.

    Text parameters go in binary (exact length: a NUL byte is refused by the server,
    not cut off); the statement is prepared once per connection (again if something
    deallocated it). Django's query log does not see these calls.
    """
    statement = _statement_name(name, query)
    with db.wrap_database_errors:
        db.ensure_connection()
        pgconn = db.connection.pgconn
        prepared: tuple[pq.abc.PGconn, set[bytes]] | None = getattr(db, _PREPARED_ATTRIBUTE, None)
        if prepared is None or prepared[0] is not pgconn:
            prepared = (pgconn, set())
            setattr(db, _PREPARED_ATTRIBUTE, prepared)
        formats = _formats(tuple(binary))
        for attempt in (1, 2):
            if statement not in prepared[1]:
                result = pgconn.prepare(statement, query.encode())
                if result.status != pq.ExecStatus.COMMAND_OK and _state(result) != b"42P05":
                    raise _error(pgconn, result)
                prepared[1].add(statement)
            result = pgconn.exec_prepared(statement, params, formats)
            if result.status == pq.ExecStatus.TUPLES_OK:
                get = result.get_value
                if result.nfields == 2:  # the posters' (id, created), a row per entry
                    return [(get(row, 0), get(row, 1)) for row in range(result.ntuples)]
                columns = range(result.nfields)
                return [tuple([get(row, c) for c in columns]) for row in range(result.ntuples)]
            if attempt == 1 and _state(result) == b"26000":  # deallocated: prepare again
                prepared[1].discard(statement)
                continue
            raise _error(pgconn, result)
    raise AssertionError("unreachable")


@functools.lru_cache(maxsize=64)
def _formats(binary: tuple[bool, ...]) -> tuple[int, ...]:
    return tuple(_BINARY if b else _TEXT for b in binary)


@functools.lru_cache(maxsize=64)
def _statement_name(name: str, query: str) -> bytes:
    """The prepared statement's name: `name` and a digest of the text (cached, a few).

    On a pooled connection another thread may have prepared it already, and then it is
    the same statement (42P05 is no error).
    """
    return f"{name}_{hashlib.sha256(query.encode()).hexdigest()[:12]}".encode()


def _state(result: pq.abc.PGresult) -> bytes | None:
    return result.error_field(_SQLSTATE)


def _error(pgconn: pq.abc.PGconn, result: pq.abc.PGresult) -> psycopg.Error:
    """The error psycopg's cursor would raise: a lost connection is an OperationalError."""
    if pgconn.status == pq.ConnStatus.BAD or _state(result) is None:
        message = (result.error_message or pgconn.error_message).decode(errors="replace")
        return psycopg.OperationalError(message.strip() or "the connection was lost")
    return errors.error_from_result(result, encoding="utf-8")


_MINUTE = timedelta(minutes=1)


def libpq_text(value: Any) -> bytes | None:
    """A parameter as exec_prepared takes it: text bytes, an array literal, an instant.

    An aware instant goes with its own offset, so that none overflows at the ends of
    datetime's range, unless that has seconds (PostgreSQL reads whole minutes): then in
    UTC. A naive one as psycopg's cursor would send it, read in the session's zone.
    """
    if type(value) is str:  # most parameters
        return value.encode()
    if value is None:
        return None
    if isinstance(value, list):
        return array_literal(value)
    if isinstance(value, datetime):
        offset = value.utcoffset()
        instant = value.astimezone(UTC) if offset is not None and offset % _MINUTE else value
        return instant.isoformat().encode()
    return str(value).encode()


def array_literal(values: Sequence[str | int | datetime | None]) -> bytes:
    """Write a one-dimensional PostgreSQL array literal of these values, in text format.

    Strings are double-quoted, with backslash and quote escaped (nothing else is special
    inside quotes); None is NULL; ints as their text, instants in ISO 8601 in UTC (an
    offset of seconds or less is no input PostgreSQL reads).
    The common case (no backslash or quote anywhere) is one join, at C speed. A NUL
    cannot be sent (libpq ends a text parameter there): refused, not cut off.
    """
    if not values:
        return b"{}"
    first = next((v for v in values if v is not None), None)
    if isinstance(first, str):
        texts = cast("Sequence[str | None]", values)
        if None not in texts:
            joined = '","'.join(cast("Sequence[str]", texts))
            if "\x00" in joined:
                raise ValueError("PostgreSQL text cannot contain NUL (0x00) characters")
            if "\\" not in joined and joined.count('"') == 2 * (len(texts) - 1):
                return ('{"' + joined + '"}').encode()
        if any(v is not None and "\x00" in v for v in texts):
            raise ValueError("PostgreSQL text cannot contain NUL (0x00) characters")
        return (
            "{"
            + ",".join(
                "NULL" if v is None else '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
                for v in texts
            )
            + "}"
        ).encode()
    if isinstance(first, datetime):
        return (
            "{"
            + ",".join(
                "NULL" if v is None else cast(datetime, v).astimezone(UTC).isoformat()
                for v in values
            )
            + "}"
        ).encode()
    if first is None:  # every element NULL (no effective times, no reversals)
        return ("{" + ",".join(["NULL"] * len(values)) + "}").encode()
    if None not in values:
        return ("{" + ",".join(map(str, values)) + "}").encode()
    return ("{" + ",".join("NULL" if v is None else str(v) for v in values) + "}").encode()
