"""Coded errors of the books.

Each has a stable `code`, an HTTP status for whoever renders it, and whether retrying
the same call can succeed. Database rule violations (SQLSTATE class TL, migrations
0002_rules and 0003_set_based_posting) are translated into the same errors by
`translate_database_error`.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from django.db import Error as DatabaseError


class LedgerError(Exception):
    code: ClassVar[str] = "ledger_error"
    status: ClassVar[int] = 400
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, *, extra: dict[str, Any] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.extra = extra or {}


class UnbalancedTransaction(LedgerError):
    code = "transaction_unbalanced"
    status = 422


class ImmutableRecord(LedgerError):
    code = "append_only"
    status = 409


class PeriodClosed(LedgerError):
    code = "period_closed"
    status = 409


class TransactionCommitted(LedgerError):
    code = "transaction_committed"
    status = 409


class BalanceWriteRefused(LedgerError):
    code = "balance_write_refused"
    status = 409


class FutureEffectiveTime(LedgerError):
    code = "effective_time_in_future"
    status = 422


class FixedColumn(LedgerError):
    code = "fixed_column"
    status = 409


class IdempotencyConflict(LedgerError):
    """The key was used before for different content: a programming or replay error."""

    code = "idempotency_conflict"
    status = 409


class ReversalMismatch(LedgerError):
    code = "reversal_mismatch"
    status = 422


class RunningBalanceMismatch(LedgerError):
    """A posting's recorded time or running balance does not follow its balance row."""

    code = "running_balance_mismatch"
    status = 409


class ConcurrentPosting(LedgerError):
    """Another poster held the same key and rolled back: posting again can succeed."""

    code = "concurrent_posting"
    status = 409
    retryable = True


class UnknownAccount(LedgerError):
    code = "unknown_account"
    status = 422


class UnknownAsset(LedgerError):
    code = "unknown_asset"
    status = 422


class InvalidTransaction(LedgerError):
    code = "invalid_transaction"
    status = 422


class AlreadyReversed(LedgerError):
    code = "already_reversed"
    status = 409


SQLSTATE_ERRORS: dict[str, type[LedgerError]] = {
    "TL001": UnbalancedTransaction,
    "TL002": ImmutableRecord,
    "TL003": PeriodClosed,
    "TL004": TransactionCommitted,
    "TL005": BalanceWriteRefused,
    "TL006": FutureEffectiveTime,
    "TL007": FixedColumn,
    "TL008": ReversalMismatch,
    "TL009": RunningBalanceMismatch,
    "TL010": IdempotencyConflict,
    "TL011": UnknownAccount,
    "TL012": UnknownAsset,
}

# ledger_post() puts what the caller acts on (the key and the stored transaction, the
# unknown codes) in the error's DETAIL, as a JSON object: it becomes the error's extra.
DETAILED_SQLSTATES = frozenset({"TL010", "TL011", "TL012"})


def sqlstate_of(error: BaseException) -> str | None:
    """Return the SQLSTATE behind a Django or psycopg database error, if any."""
    cause: BaseException | None = error
    while cause is not None:
        state = getattr(cause, "sqlstate", None)
        if state:
            return str(state)
        cause = cause.__cause__
    return None


def translate_database_error(error: DatabaseError) -> LedgerError | None:
    """Return the ledger error for a rule the database enforced, or None."""
    state = sqlstate_of(error)
    if state is None or state not in SQLSTATE_ERRORS:
        return None
    cause = error.__cause__
    diag = getattr(cause, "diag", None)
    message = getattr(diag, "message_primary", None) or str(error)
    detail = getattr(diag, "message_detail", None)
    if state in DETAILED_SQLSTATES and detail:
        return SQLSTATE_ERRORS[state](message, extra=json.loads(detail))
    return SQLSTATE_ERRORS[state](message, extra={"sqlstate": state})
