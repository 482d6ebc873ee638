"""A server-binding psycopg cursor on Django's own connection, for the two hot calls.

Django's default cursor binds parameters on the client: it quotes every element of an
array parameter with a regex, the server parses the text again, and nothing can be
prepared. `ledger_post()` (arrays of a whole batch) and the as-of balance read (planning
costs more than running) use this instead: same connection and transaction as the ORM,
parameters sent in binary where asked (%b), and database errors raised as Django's.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from django.db import connection


@contextmanager
def bound_cursor() -> Iterator[psycopg.Cursor[Any]]:
    """Yield a server-binding cursor on the default connection, inside its transaction."""
    with connection.wrap_database_errors:
        connection.ensure_connection()
        with psycopg.Cursor(connection.connection) as cursor:
            yield cursor
