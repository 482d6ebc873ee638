"""A scratch database for benchmarks: created fresh, migrated, dropped afterwards.

`bench` never touches the database DATABASE_URL names; it creates `<name>_bench_<pid>`
beside it on the same server, points Django's connection at it, and drops it at the
end (unless --keep).
"""

from __future__ import annotations

import contextlib
import io
import os
from collections.abc import Iterator

import psycopg
from django.conf import settings
from django.core.management import call_command
from django.db import connection, connections


def _admin_conninfo() -> str:
    db = settings.DATABASES["default"]
    return psycopg.conninfo.make_conninfo(
        host=db.get("HOST") or None,
        port=db.get("PORT") or None,
        user=db.get("USER") or None,
        password=db.get("PASSWORD") or None,
        dbname="postgres",
    )


def scratch_url(name: str) -> str:
    db = settings.DATABASES["default"]
    auth = db.get("USER") or "postgres"
    if db.get("PASSWORD"):
        auth += ":" + str(db["PASSWORD"])
    return f"postgresql://{auth}@{db.get('HOST') or '127.0.0.1'}:{db.get('PORT') or 5432}/{name}"


@contextlib.contextmanager
def scratch_database(*, keep: bool = False) -> Iterator[str]:
    """Create and migrate a fresh database; yield its URL with Django pointed at it."""
    original = settings.DATABASES["default"]["NAME"]
    name = f"{original}_bench_{os.getpid()}"  # concurrent benches never share one
    connections.close_all()
    with psycopg.connect(_admin_conninfo(), autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{name}"')
    settings.DATABASES["default"]["NAME"] = name
    connection.settings_dict["NAME"] = name
    try:
        call_command("migrate", verbosity=0, stdout=io.StringIO())
        yield scratch_url(name)
    finally:
        connections.close_all()
        settings.DATABASES["default"]["NAME"] = original
        connection.settings_dict["NAME"] = original
        if not keep:
            with psycopg.connect(_admin_conninfo(), autocommit=True) as admin:
                admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
