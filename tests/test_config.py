"""Start-up safety, the health check, and the import direction between apps."""

import os
import secrets
import subprocess
import sys
from pathlib import Path

import django.contrib.admin
import pytest
from django.db import connection
from django.test import Client

from config.celery import app as celery_app

BASE_DIR = Path(__file__).resolve().parent.parent


def _manage(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DJANGO_")}
    clean["DJANGO_ENV_FILE"] = os.devnull  # production: no developer env file
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=BASE_DIR,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_missing_secret_key_stops_start_up_with_debug_off():
    result = _manage("check", DJANGO_ALLOWED_HOSTS="ledger.example.com")
    assert result.returncode != 0
    assert "DJANGO_SECRET_KEY is not set" in result.stderr


def test_missing_allowed_hosts_stops_start_up_with_debug_off():
    result = _manage("check", DJANGO_SECRET_KEY=secrets.token_urlsafe(50))
    assert result.returncode != 0
    assert "DJANGO_ALLOWED_HOSTS is not set" in result.stderr


def test_check_deploy_is_clean_in_production_settings():
    result = _manage(
        "check",
        "--deploy",
        "--fail-level",
        "WARNING",
        DJANGO_SECRET_KEY=secrets.token_urlsafe(50),
        DJANGO_ALLOWED_HOSTS="ledger.example.com",
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout


@pytest.mark.django_db
def test_admin_static_files_are_served_by_the_web_process():
    # WhiteNoise, from what collectstatic gathered (the session fixture, `make run`):
    # gunicorn has no other static server in front of it.
    response = Client().get("/static/admin/css/base.css")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/css")
    admin_css = Path(django.contrib.admin.__file__).parent / "static/admin/css/base.css"
    assert b"".join(response.streaming_content) == admin_css.read_bytes()
    assert Client().get("/static/admin/css/no-such-file.css").status_code == 404


@pytest.mark.django_db
def test_healthz_reports_database_and_broker_ok(client):
    response = client.get("/healthz")
    assert response.status_code == 200, response.content
    assert response.json() == {"status": "ok", "database": "ok", "broker": "ok"}


@pytest.mark.django_db
def test_healthz_is_503_when_the_broker_is_down(client, monkeypatch):
    dead_broker = "amqp://guest:guest@127.0.0.1:1//"
    # Celery reads CELERY_BROKER_URL from the environment before its own setting.
    monkeypatch.setenv("CELERY_BROKER_URL", dead_broker)
    monkeypatch.setattr(celery_app.conf, "broker_url", dead_broker)
    response = client.get("/healthz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable"
    assert body["database"] == "ok"
    assert body["broker"].startswith("down")


@pytest.mark.django_db(transaction=True)
def test_healthz_is_503_when_the_database_is_down(client, monkeypatch):
    connection.close()
    monkeypatch.setitem(connection.settings_dict, "PORT", "1")
    try:
        response = client.get("/healthz")
    finally:
        connection.close()
    assert response.status_code == 503
    assert response.json()["database"].startswith("down")


def test_import_direction_between_apps():
    """ledger imports no other app; providers never imports billing (import-linter)."""
    result = subprocess.run(
        [str(Path(sys.executable).parent / "lint-imports")],
        cwd=BASE_DIR,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


@pytest.mark.parametrize("suite", ["ledger", "ingest"])
def test_bench_help_lists_every_option(suite, capsys):
    """`bench <suite> --help` prints its options (a stray % in a help text broke it)."""
    from django.core.management import call_command

    with pytest.raises(SystemExit) as exit_:
        call_command("bench", suite, "--help")
    assert exit_.value.code == 0
    assert "--json" in capsys.readouterr().out
