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

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from django.db import DEFAULT_DB_ALIAS, connections
from django.db.backends.base.base import BaseDatabaseWrapper

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
