"""Errors of usage ingestion, each with a stable code, an HTTP status and retry advice.

Auth errors also subclass DRF's AuthenticationFailed so DRF treats them as
authentication failures (401 with a WWW-Authenticate challenge); the project's
exception handler renders them as DomainErrors ({"code", "message", "extra"}).
"""

from __future__ import annotations

from rest_framework.exceptions import AuthenticationFailed

from config.errors import DomainError


class InvalidReportError(DomainError):
    """The report is malformed; extra.fields lists every problem with its JSON path."""

    code = "invalid"
    status = 400

    def __init__(self, fields: list[dict[str, str]]) -> None:
        super().__init__(
            "The usage report is invalid and was not stored; see extra.fields.",
            extra={"fields": fields},
        )


class TooManyRecordsError(DomainError):
    code = "too_many_records"
    status = 413


class BodyTooLargeError(DomainError):
    code = "body_too_large"
    status = 413


class UnsupportedMediaTypeError(DomainError):
    code = "unsupported_media_type"
    status = 415


class ReportConflictError(DomainError):
    """The report_id was already used for a report with different content."""

    code = "report_conflict"
    status = 409


class ReportNotFoundError(DomainError):
    code = "not_found"
    status = 404


class RateLimitedError(DomainError):
    code = "rate_limited"
    status = 429
    retryable = True

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message, extra={"retry_after_s": retry_after_s})
        self.retry_after_s = retry_after_s


class NodeAuthError(DomainError, AuthenticationFailed):
    status = 401
    status_code = 401


class NotAuthenticatedError(NodeAuthError):
    code = "not_authenticated"


class InvalidKeyError(NodeAuthError):
    code = "invalid_key"


class SignatureRequiredError(NodeAuthError):
    code = "signature_required"


class SignatureInvalidError(NodeAuthError):
    code = "signature_invalid"
