"""The books: assets, accounts, transactions, postings, balances and periods.

Sign convention: a posting's amount is positive for a debit and negative for a credit,
so every transaction sums to zero per asset and every asset sums to zero over all
accounts. The rules that keep this true live in PostgreSQL as well (migration
0002_rules, 0003_set_based_posting): balancing, immutability, stored balances, closed
periods.
"""

from __future__ import annotations

from django.conf import settings
from django.contrib.postgres.constraints import ExclusionConstraint
from django.contrib.postgres.fields import DateTimeRangeField, RangeOperators
from django.db import models
from django.db.models import F, Func, Q
from django.db.models.functions import Now

from ledger.fields import AmountField

ASSET_SCALE_MAX = 24
CODE_LENGTH_MAX = 200
IDEMPOTENCY_KEY_LENGTH_MAX = 200
DESCRIPTION_LENGTH_MAX = 1000
# One reversal per transaction: the constraint a second reversal runs into.
REVERSED_ONCE = "ledger_transaction_reversed_once"


class TsTzRange(Func):
    function = "TSTZRANGE"
    output_field = DateTimeRangeField()


class CurrentXactId(Func):
    """The writing database transaction's id, as PostgreSQL numbers it."""

    template = "pg_current_xact_id()::text::bigint"
    output_field = models.BigIntegerField()


class Asset(models.Model):
    """A unit of account: a currency or a token kind, counted in its smallest unit."""

    code = models.CharField(max_length=64, unique=True)
    scale = models.PositiveSmallIntegerField(
        help_text="Decimal places of one smallest unit: USD at scale 12 counts pico-dollars."
    )
    name = models.CharField(max_length=200, blank=True)
    created_at = models.DateTimeField(db_default=Now())

    class Meta:
        ordering = ["code"]
        constraints = [
            models.CheckConstraint(
                condition=Q(scale__lte=ASSET_SCALE_MAX),
                name="ledger_asset_scale_range",
                violation_error_code="asset_scale_range",
            ),
            models.CheckConstraint(
                condition=Q(code__regex=r"^[A-Za-z0-9][A-Za-z0-9_.:\-]*$"),
                name="ledger_asset_code_format",
                violation_error_code="asset_code_format",
            ),
        ]

    def __str__(self) -> str:
        return self.code


class AccountKind(models.TextChoices):
    ASSET = "asset", "Asset"
    LIABILITY = "liability", "Liability"
    EQUITY = "equity", "Equity"
    INCOME = "income", "Income"
    EXPENSE = "expense", "Expense"
    # Memorandum accounts count units that are not money (tokens delivered); they
    # balance like any other, but belong to no side of the balance sheet.
    MEMO = "memo", "Memorandum"


DEBIT_NORMAL_KINDS = frozenset({AccountKind.ASSET, AccountKind.EXPENSE, AccountKind.MEMO})


class Account(models.Model):
    """A named bucket of value, e.g. `enterprise:acme:unbilled`; holds any asset."""

    code = models.CharField(max_length=CODE_LENGTH_MAX, unique=True)
    kind = models.CharField(max_length=16, choices=AccountKind.choices)
    owner = models.CharField(
        max_length=CODE_LENGTH_MAX,
        blank=True,
        db_index=True,
        help_text="Who the account belongs to, e.g. `enterprise:acme`; empty for the platform.",
    )
    metadata = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(db_default=Now())

    class Meta:
        ordering = ["code"]
        constraints = [
            models.CheckConstraint(
                condition=Q(kind__in=AccountKind.values),
                name="ledger_account_kind_valid",
                violation_error_code="account_kind_valid",
            ),
            models.CheckConstraint(
                condition=Q(code__regex=r"^[A-Za-z0-9][A-Za-z0-9_.:\-]*$"),
                name="ledger_account_code_format",
                violation_error_code="account_code_format",
            ),
        ]

    def __str__(self) -> str:
        return self.code

    def is_debit_normal(self) -> bool:
        return bool(self.kind in DEBIT_NORMAL_KINDS)


class Transaction(models.Model):
    """One balanced business event; written once, never changed, corrected by reversal."""

    # Byte order ("C"): the unique index on it is probed for every posted entry, and a
    # key is an identifier, not text anyone sorts by language.
    idempotency_key = models.CharField(max_length=IDEMPOTENCY_KEY_LENGTH_MAX, db_collation="C")
    content_hash = models.CharField(
        max_length=64, help_text="SHA-256 of the posted content; a replayed key must match it."
    )
    description = models.CharField(max_length=DESCRIPTION_LENGTH_MAX, blank=True)
    effective_at = models.DateTimeField(db_default=Now())
    recorded_at = models.DateTimeField(db_default=Now())
    metadata = models.JSONField(default=dict, blank=True)
    # One reversal per transaction: a unique index over the transactions that reverse
    # one (partial, see Meta), not over every transaction's NULL; that was 2.3 ms of a
    # 1,000-entry batch (measured).
    reverses = models.ForeignKey(
        "self",
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="reversed_by",
        db_index=False,
    )
    # Set by the database to the writing transaction's id: postings may only be added
    # to a transaction inside the database transaction that created it.
    created_xact = models.BigIntegerField(db_default=CurrentXactId(), editable=False)
    # The id of this transaction's first posting. A deferred foreign key (migration 0003)
    # requires that posting to exist at commit: no journal entry without lines.
    first_posting_id = models.BigIntegerField(editable=False)

    class Meta:
        ordering = ["-id"]
        indexes = [models.Index(fields=["effective_at", "id"], name="ledger_tx_effective_idx")]
        constraints = [
            models.UniqueConstraint(
                fields=["idempotency_key"],
                name="ledger_transaction_idempotency_key_unique",
                violation_error_code="transaction_idempotency_key_unique",
            ),
            models.UniqueConstraint(
                fields=["reverses"],
                condition=Q(reverses__isnull=False),
                name=REVERSED_ONCE,
                violation_error_code="transaction_reversed_once",
            ),
            models.CheckConstraint(
                condition=~Q(reverses=F("id")),
                name="ledger_transaction_not_self_reversal",
                violation_error_code="transaction_not_self_reversal",
            ),
        ]

    def __str__(self) -> str:
        return f"#{self.pk} {self.idempotency_key}"


class Posting(models.Model):
    """One leg: an amount of one asset debited (+) or credited (-) to one account."""

    # No per-row foreign key checks (db_constraint=False): the statement trigger of
    # migration 0003 checks the whole batch against its transactions in one join, a
    # posting's (account, asset) always has a balance row whose foreign keys hold, and
    # transactions, accounts and assets are never deleted. Per-row RI checks cost
    # three queries per leg at commit (measured with `bench ledger`).
    transaction = models.ForeignKey(
        Transaction,
        on_delete=models.PROTECT,
        related_name="postings",
        db_constraint=False,
        db_index=False,
    )
    account = models.ForeignKey(
        Account,
        on_delete=models.PROTECT,
        related_name="postings",
        db_constraint=False,
        db_index=False,
    )
    asset = models.ForeignKey(
        Asset,
        on_delete=models.PROTECT,
        related_name="postings",
        db_constraint=False,
        db_index=False,
    )
    amount = AmountField()
    # Written by ledger_post() under the balance row's lock and verified by the
    # statement trigger: effective_at is the transaction's; recorded_at is strictly
    # increasing per (account, asset) and balance_after is the running balance in that
    # order (ledger/selectors.py reads balances as of any instant from them).
    effective_at = models.DateTimeField(db_default=Now())
    recorded_at = models.DateTimeField(db_default=Now())
    balance_after = AmountField(db_default=0)

    class Meta:
        ordering = ["id"]
        # No (account, asset, effective time) index: the history in effective order reads
        # the recorded-time index below and the back-dated one (ledger/selectors.py), and
        # maintaining it cost 10-13 % of a 1,000-entry batch (migration 0011).
        constraints = [
            # Target of the transaction's first-posting foreign key; also the index
            # for a transaction's lines.
            models.UniqueConstraint(
                fields=["transaction", "id"],
                name="ledger_posting_transaction_line_unique",
                violation_error_code="posting_transaction_line_unique",
            ),
            # One posting per instant per (account, asset); the balance_after payload
            # answers "balance at T" from the index alone.
            models.UniqueConstraint(
                fields=["account", "asset", "recorded_at"],
                include=["balance_after"],
                name="ledger_posting_recorded_unique",
                violation_error_code="posting_recorded_unique",
            ),
            models.CheckConstraint(
                condition=~Q(amount=0),
                name="ledger_posting_amount_nonzero",
                violation_error_code="posting_amount_nonzero",
            ),
        ]

    def __str__(self) -> str:
        return f"posting {self.pk}"

    def is_debit(self) -> bool:
        return bool(self.amount > 0)


class Balance(models.Model):
    """Current balance of one account in one asset: maintained only by the database."""

    account = models.ForeignKey(Account, on_delete=models.PROTECT, related_name="balances")
    asset = models.ForeignKey(Asset, on_delete=models.PROTECT, related_name="balances")
    amount = AmountField(default=0)
    posting_count = models.BigIntegerField(default=0)
    updated_at = models.DateTimeField(db_default=Now())

    class Meta:
        ordering = ["account", "asset"]
        constraints = [
            models.UniqueConstraint(
                fields=["account", "asset"],
                name="ledger_balance_account_asset_unique",
                violation_error_code="balance_account_asset_unique",
            ),
        ]

    def __str__(self) -> str:
        # Two queries unless read with select_related("account", "asset"), as the admin does.
        return f"{self.account.code} in {self.asset.code}"


class PeriodStatus(models.TextChoices):
    OPEN = "open", "Open"
    CLOSED = "closed", "Closed"


class Period(models.Model):
    """An accounting period, [starts_at, ends_at); once closed it accepts no postings."""

    starts_at = models.DateTimeField()
    ends_at = models.DateTimeField()
    status = models.CharField(max_length=8, choices=PeriodStatus.choices, default=PeriodStatus.OPEN)
    closed_at = models.DateTimeField(null=True, blank=True)
    closed_by = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.PROTECT,
        related_name="+",
    )
    close_note = models.CharField(max_length=DESCRIPTION_LENGTH_MAX, blank=True)

    class Meta:
        ordering = ["-starts_at"]
        constraints = [
            models.CheckConstraint(
                condition=Q(ends_at__gt=F("starts_at")),
                name="ledger_period_ends_after_start",
                violation_error_code="period_ends_after_start",
            ),
            models.CheckConstraint(
                condition=Q(status=PeriodStatus.OPEN, closed_at__isnull=True)
                | Q(status=PeriodStatus.CLOSED, closed_at__isnull=False),
                name="ledger_period_closed_has_time",
                violation_error_code="period_closed_has_time",
            ),
            ExclusionConstraint(
                name="ledger_period_no_overlap",
                expressions=[(TsTzRange("starts_at", "ends_at"), RangeOperators.OVERLAPS)],
                violation_error_code="period_no_overlap",
            ),
        ]

    def __str__(self) -> str:
        return f"{self.starts_at:%Y-%m} ({self.status})"

    def is_closed(self) -> bool:
        return self.status == PeriodStatus.CLOSED
