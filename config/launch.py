"""The project's own run and test commands (`make run`, `make test`).

    python -m config.launch run     # db, migrate, demo data, gunicorn + worker + beat
    python -m config.launch test [pytest args]

With DATABASE_URL unset, both start the embedded PostgreSQL under .pgdata/ and stop
it again when they started it; with it set, they use that server as it is.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from config import embedded_pg

BASE_DIR = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
STOP_TIMEOUT_S = 15
DEMO_MARKER = "demo_loaded"


def _database_url() -> tuple[str, bool]:
    """Return (DATABASE_URL, whether we started an embedded server for it)."""
    url = os.environ.get("DATABASE_URL", "")
    if url:
        return url, False
    was_running = embedded_pg.URL_FILE.exists()
    url = embedded_pg.start()
    return url, not was_running


def _env(url: str) -> dict[str, str]:
    env = dict(os.environ)
    env["DATABASE_URL"] = url
    env.setdefault("DJANGO_DEBUG", "1")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _manage(env: dict[str, str], *args: str) -> None:
    subprocess.run([PYTHON, "manage.py", *args], check=True, env=env, cwd=BASE_DIR)


def _stop_all(processes: list[subprocess.Popen[bytes]]) -> None:
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for process in processes:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run() -> int:
    url, started = _database_url()
    env = _env(url)
    port = env.get("PORT", "8000")
    processes: list[subprocess.Popen[bytes]] = []
    try:
        _manage(env, "migrate", "--no-input")
        _manage(env, "demo_load")
        _manage(env, "collectstatic", "--no-input", "--verbosity", "0")  # served by WhiteNoise
        commands = {
            "web": [
                PYTHON,
                "-m",
                "gunicorn",
                "config.wsgi",
                "--bind",
                f"127.0.0.1:{port}",
                "--workers",
                env.get("WEB_CONCURRENCY", "2"),
                "--access-logfile",
                "-",
            ],
            "worker": [
                PYTHON,
                "-m",
                "celery",
                "-A",
                "config",
                "worker",
                "--loglevel",
                "INFO",
                "--concurrency",
                env.get("CELERY_CONCURRENCY", "2"),
            ],
            "beat": [PYTHON, "-m", "celery", "-A", "config", "beat", "--loglevel", "INFO"],
            "node": [PYTHON, "manage.py", "demo_node", "--url", f"http://127.0.0.1:{port}"],
        }
        for command in commands.values():
            # Own process group: Ctrl-C reaches us once, and we stop the children in order.
            processes.append(
                subprocess.Popen(command, env=env, cwd=BASE_DIR, start_new_session=True)
            )
        print(
            f"\nTokenledger is running on http://127.0.0.1:{port}/\n"
            f"  admin:    http://127.0.0.1:{port}/admin/  (login: demo-finance / demo-finance)\n"
            f"  API docs: http://127.0.0.1:{port}/api/docs/\n"
            f"  health:   http://127.0.0.1:{port}/healthz\n"
            "Ctrl-C stops everything; data is kept for the next `make run`.\n",
            flush=True,
        )
        while all(process.poll() is None for process in processes):
            time.sleep(0.5)
        print("A process exited; stopping the others.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nStopping...", flush=True)
        return 0
    finally:
        _stop_all(processes)
        if started:
            embedded_pg.stop()


def test(pytest_args: list[str]) -> int:
    url, started = _database_url()
    try:
        result = subprocess.run(
            [PYTHON, "-m", "pytest", *pytest_args], env=_env(url), cwd=BASE_DIR, check=False
        )
        return result.returncode
    finally:
        if started:
            embedded_pg.stop()


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] not in {"run", "test"}:
        print("usage: python -m config.launch run|test [pytest args]", file=sys.stderr)
        return 2
    return run() if argv[1] == "run" else test(argv[2:])


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    # Ctrl-C and SIGTERM both stop everything we started; install the handler even
    # when a parent shell started us with SIGINT ignored.
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)
    sys.exit(main(sys.argv))
