"""Providers, their inference nodes and node API keys; usage reports and records.

Usage is append-only: a UsageRecord is never updated or deleted (a PostgreSQL trigger
refuses it, see migration 0002). Reconciliation (a later issue) claims whole reports
with FOR UPDATE SKIP LOCKED and keeps its state on the report, never on the records.
"""

from __future__ import annotations

from django.db import models
from django.db.models import F, Q


class Provider(models.Model):
    """A company that runs inference nodes and gets paid for the tokens they serve."""

    slug = models.SlugField(max_length=100, unique=True)
    name = models.CharField(max_length=200)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["slug"]

    def __str__(self) -> str:
        return self.slug


class InferenceNode(models.Model):
    """One node of a provider; it posts usage reports with its own API keys.

    `public_key_ed25519` is the node's Ed25519 public key as the standard base64 of
    its raw 32 bytes (44 characters, e.g. the output of
    `base64.b64encode(key.public_bytes_raw())`). Empty means the node does not sign;
    once set, every report of the node must carry a valid signature.
    """

    provider = models.ForeignKey(Provider, on_delete=models.PROTECT, related_name="nodes")
    name = models.CharField(max_length=100)
    public_key_ed25519 = models.CharField(max_length=44, blank=True, default="")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["provider_id", "name"]
        constraints = [
            models.UniqueConstraint(
                fields=["provider", "name"], name="providers_inferencenode_name_unique"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.provider.slug}/{self.name}"

    @property
    def must_sign(self) -> bool:
        return bool(self.public_key_ed25519)


class NodeApiKey(models.Model):
    """An API key of a node: `tlk_<prefix>_<secret>`, shown once, stored hashed.

    The secret is 32 random bytes (256 bits), so a single fast SHA-256 is the right
    hash: a slow password hash (PBKDF2, argon2) protects low-entropy secrets against
    guessing, which 256 random bits do not need, and it would cost milliseconds on
    every report.
    """

    node = models.ForeignKey(InferenceNode, on_delete=models.PROTECT, related_name="api_keys")
    prefix = models.CharField(max_length=16, unique=True)
    secret_sha256 = models.CharField(max_length=64)
    created_at = models.DateTimeField(auto_now_add=True)
    revoked_at = models.DateTimeField(null=True, blank=True)
    # Written at most once a minute per key, to keep writes off the ingestion path.
    last_used_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-created_at"]
        verbose_name = "node API key"

    def __str__(self) -> str:
        return f"tlk_{self.prefix}_…"

    @property
    def is_revoked(self) -> bool:
        return self.revoked_at is not None


class NodeApiKeyRateWindow(models.Model):
    """The fixed one-minute request counter of a key (the rate limit lives in PostgreSQL).

    One row per key, upserted by each report: the count restarts when the minute
    changes. It works across any number of gunicorn processes and hosts with no
    extra service.
    """

    key = models.OneToOneField(
        NodeApiKey, on_delete=models.CASCADE, primary_key=True, related_name="rate_window"
    )
    window_start = models.DateTimeField()
    request_count = models.IntegerField()

    def __str__(self) -> str:
        return f"{self.key_id}@{self.window_start:%H:%M}: {self.request_count}"


class UsageReportStatus(models.TextChoices):
    ACCEPTED = "accepted"
    HELD = "held"


class UsageReportHoldReason(models.TextChoices):
    TOTALS_MISMATCH = "totals_mismatch"


class UsageReport(models.Model):
    """One report a node posted: a window of usage, stored whole or not at all.

    `content_sha256` is the hash of the canonical content (parsed and normalised, not
    the raw bytes): the same report_id with the same hash is a replay and gets
    `response_body` again, byte for byte; with another hash it is a conflict.
    """

    # No single-column indexes: the unique (provider, report_id) and the
    # (node, received_at) indexes lead with these columns.
    provider = models.ForeignKey(
        Provider, on_delete=models.PROTECT, related_name="+", db_index=False
    )
    node = models.ForeignKey(
        InferenceNode, on_delete=models.PROTECT, related_name="+", db_index=False
    )
    report_id = models.CharField(max_length=128)
    content_sha256 = models.BinaryField(max_length=32)
    window_start = models.DateTimeField()
    window_end = models.DateTimeField()
    totals = models.JSONField(null=True, blank=True)
    status = models.CharField(max_length=16, choices=UsageReportStatus.choices)
    hold_reason = models.CharField(
        max_length=32, choices=UsageReportHoldReason.choices, blank=True, default=""
    )
    records_received = models.IntegerField(default=0)
    records_accepted = models.IntegerField(default=0)
    records_duplicate = models.IntegerField(default=0)
    records_conflict = models.IntegerField(default=0)
    signed = models.BooleanField(default=False)
    # base64 of the Ed25519 signature and the exact body it covers: kept so the
    # signature can be verified again when an enterprise disputes the usage.
    signature = models.CharField(max_length=100, blank=True, default="")
    signed_body = models.BinaryField(null=True, blank=True)
    received_at = models.DateTimeField()
    response_body = models.TextField()

    class Meta:
        ordering = ["-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["provider", "report_id"], name="providers_usagereport_report_id_unique"
            ),
            models.CheckConstraint(
                condition=Q(window_end__gt=F("window_start")),
                name="providers_usagereport_window_positive",
            ),
            models.CheckConstraint(
                condition=Q(status__in=UsageReportStatus.values),
                name="providers_usagereport_status_valid",
            ),
            models.CheckConstraint(
                condition=Q(signed=False) | ~Q(signature=""),
                name="providers_usagereport_signed_has_signature",
            ),
        ]
        indexes = [
            # Reconciliation claims pending reports in id order per status.
            models.Index(fields=["status", "id"], name="providers_report_status_id"),
            models.Index(fields=["node", "received_at"], name="providers_report_node_recv"),
        ]

    def __str__(self) -> str:
        return self.report_id


class ServiceTier(models.TextChoices):
    STANDARD = "standard"
    BATCH = "batch"
    PRIORITY = "priority"
    FLEX = "flex"


TOKEN_FIELDS = (
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
)


# What one request consumed, in the order finance reads it (admin and exports).
USAGE_RECORD_FIELDS = (
    "request_id",
    "enterprise",
    "model",
    "occurred_at",
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
    "service_tier",
)


class UsageRecord(models.Model):
    """One request's usage. Append-only: never updated, never deleted.

    `provider` and `node` copy the report's, so the unique index on
    (provider, request_id) can decide duplicates across all nodes of a provider.
    They carry no foreign-key constraint: the report's foreign key already
    guarantees them, and two more RI triggers per row would cost ingestion time.
    """

    id = models.BigAutoField(primary_key=True)
    report = models.ForeignKey(
        UsageReport, on_delete=models.PROTECT, related_name="records", db_index=False
    )
    provider = models.ForeignKey(
        Provider,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        db_index=False,
        related_name="+",
    )
    node = models.ForeignKey(
        InferenceNode,
        on_delete=models.DO_NOTHING,
        db_constraint=False,
        db_index=False,
        related_name="+",
    )
    request_id = models.CharField(max_length=200)
    # The enterprise's slug as the node reported it, not a foreign key: billing
    # resolves it later and holds usage of unknown enterprises.
    enterprise = models.CharField(max_length=100)
    model = models.CharField(max_length=200)
    occurred_at = models.DateTimeField()
    input_tokens = models.BigIntegerField()
    output_tokens = models.BigIntegerField()
    cached_input_tokens = models.BigIntegerField()
    cache_write_tokens = models.BigIntegerField()
    reasoning_tokens = models.BigIntegerField()
    service_tier = models.CharField(
        max_length=16, choices=ServiceTier.choices, default=ServiceTier.STANDARD
    )
    metadata = models.JSONField(default=dict, blank=True)
    content_sha256 = models.BinaryField(max_length=32)

    class Meta:
        ordering = ["id"]
        constraints = [
            models.UniqueConstraint(
                fields=["provider", "request_id"], name="providers_usagerecord_request_id_unique"
            ),
            models.CheckConstraint(
                condition=Q(
                    input_tokens__gte=0,
                    output_tokens__gte=0,
                    cached_input_tokens__gte=0,
                    cache_write_tokens__gte=0,
                    reasoning_tokens__gte=0,
                ),
                name="providers_usagerecord_tokens_nonnegative",
            ),
            models.CheckConstraint(
                condition=Q(reasoning_tokens__lte=F("output_tokens")),
                name="providers_usagerecord_reasoning_within_output",
            ),
            models.CheckConstraint(
                condition=Q(service_tier__in=ServiceTier.values),
                name="providers_usagerecord_service_tier_valid",
            ),
        ]
        indexes = [
            # Reconciliation reads a claimed report's records in id order.
            models.Index(fields=["report", "id"], name="providers_record_report_id"),
        ]

    def __str__(self) -> str:
        return self.request_id


class UsageConflict(models.Model):
    """A record whose request_id was already stored with different content.

    Counted in its report, never billed; finance reviews it. Append-only like the
    records: a resolution will be a new fact linked to it.
    """

    report = models.ForeignKey(UsageReport, on_delete=models.PROTECT, related_name="conflicts")
    request_id = models.CharField(max_length=200)
    existing_record = models.ForeignKey(
        UsageRecord, on_delete=models.PROTECT, related_name="conflicts"
    )
    incoming = models.JSONField()
    created_at = models.DateTimeField()

    class Meta:
        ordering = ["-id"]
        constraints = [
            models.UniqueConstraint(
                fields=["report", "request_id"], name="providers_usageconflict_request_unique"
            ),
        ]

    def __str__(self) -> str:
        return self.request_id
