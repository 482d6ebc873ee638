"""Domain errors and the one DRF exception handler that renders them.

Every error a client sees has the shape {"code", "message", "extra"}; field errors
sit under extra.fields as a list of {"path", "message"}. Database text never
reaches a client.
"""

from __future__ import annotations

from typing import Any

from rest_framework import exceptions as drf_exceptions
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler


class DomainError(Exception):
    """A business condition with a stable code, an HTTP status and retry advice."""

    code = "error"
    status = 400
    retryable = False

    def __init__(self, message: str, *, extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra or {}


def _flatten(detail: Any, path: str = "$") -> list[dict[str, str]]:
    """Return DRF error details as a flat list of {"path": "$.a[0].b", "message"}."""
    if isinstance(detail, dict):
        out: list[dict[str, str]] = []
        for key, value in detail.items():
            out.extend(_flatten(value, path if key == "non_field_errors" else f"{path}.{key}"))
        return out
    if isinstance(detail, list):
        if all(not isinstance(item, dict | list) for item in detail):
            return [{"path": path, "message": str(item)} for item in detail]
        out = []
        for index, value in enumerate(detail):
            out.extend(_flatten(value, f"{path}[{index}]"))
        return out
    return [{"path": path, "message": str(detail)}]


def error_body(code: str, message: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"code": code, "message": message, "extra": extra or {}}


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, DomainError):
        return Response(
            error_body(exc.code, exc.message, {**exc.extra, "retryable": exc.retryable}),
            status=exc.status,
            headers=getattr(exc, "headers", None),  # e.g. Retry-After, WWW-Authenticate
        )
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    if isinstance(exc, drf_exceptions.ValidationError):
        fields = _flatten(exc.detail)
        response.data = error_body(
            "invalid", "The request is invalid; see extra.fields.", {"fields": fields}
        )
    else:
        code = getattr(exc, "default_code", "error")
        detail = getattr(exc, "detail", str(exc))
        response.data = error_body(str(code), str(detail))
    return response
