"""The health check: is the database reachable, is the broker reachable."""

from django.db import connection
from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_GET

from config.celery import app as celery_app

BROKER_TIMEOUT_S = 2.0


def _database_status() -> str:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except Exception as exc:  # any failure means "down"; the reason is logged, not shown
        return f"down: {type(exc).__name__}"
    return "ok"


def _broker_status() -> str:
    try:
        with celery_app.connection_for_write() as conn:
            conn.ensure_connection(max_retries=1, timeout=BROKER_TIMEOUT_S)
    except Exception as exc:
        return f"down: {type(exc).__name__}"
    return "ok"


@require_GET
def healthz(request: HttpRequest) -> JsonResponse:
    """Return 200 when the database and the broker answer, 503 otherwise."""
    status = {"database": _database_status(), "broker": _broker_status()}
    healthy = all(value == "ok" for value in status.values())
    return JsonResponse(
        {"status": "ok" if healthy else "unavailable", **status}, status=200 if healthy else 503
    )
