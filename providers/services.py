"""Every write of the providers app: keys, rate counters and usage ingestion."""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import msgspec
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from django.conf import settings
from django.db import connection, transaction
from django.utils import timezone

from providers.exceptions import (
    BodyTooLargeError,
    InvalidKeyError,
    RateLimitedError,
    ReportConflictError,
    SignatureInvalidError,
    SignatureRequiredError,
)
from providers.models import (
    InferenceNode,
    NodeApiKey,
    Provider,
    UsageReportHoldReason,
    UsageReportStatus,
)
from providers.schemas import RecordIn, ReportIn
from providers.validation import report_parse

KEY_PREFIX = "tlk_"
KEY_PREFIX_BYTES = 4  # 8 hex characters: shown in the admin to tell keys apart
KEY_SECRET_BYTES = 32
LAST_USED_RESOLUTION = timedelta(minutes=1)
SIGNATURE_SCHEME = "ed25519="
RATE_WINDOW_SECONDS = 60


# --- Providers, nodes, keys ---------------------------------------------------


def provider_get_or_create(*, slug: str, name: str = "") -> Provider:
    provider, _ = Provider.objects.get_or_create(slug=slug, defaults={"name": name or slug})
    return provider


def inference_node_get_or_create(*, provider: Provider, name: str) -> InferenceNode:
    node, _ = InferenceNode.objects.get_or_create(provider=provider, name=name)
    return node


def inference_node_public_key_set(*, node: InferenceNode, public_key_b64: str) -> InferenceNode:
    """Register the node's Ed25519 public key (base64 of the raw 32 bytes)."""
    public_key_parse(public_key_b64=public_key_b64)
    node.public_key_ed25519 = public_key_b64
    node.save(update_fields=["public_key_ed25519"])
    return node


def public_key_parse(*, public_key_b64: str) -> Ed25519PublicKey:
    """Return the key in `public_key_b64`, or raise ValueError saying what is wrong."""
    try:
        raw = base64.b64decode(public_key_b64, validate=True)
    except binascii.Error as exc:
        raise ValueError("The public key is not valid base64.") from exc
    if len(raw) != 32:
        raise ValueError("An Ed25519 public key is 32 raw bytes (44 base64 characters).")
    return Ed25519PublicKey.from_public_bytes(raw)


def _secret_sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def node_key_create(*, node: InferenceNode) -> tuple[NodeApiKey, str]:
    """Create a key for `node`; return it and its full text, which is never shown again."""
    prefix = secrets.token_hex(KEY_PREFIX_BYTES)
    secret = secrets.token_urlsafe(KEY_SECRET_BYTES)
    key = NodeApiKey.objects.create(node=node, prefix=prefix, secret_sha256=_secret_sha256(secret))
    return key, f"{KEY_PREFIX}{prefix}_{secret}"


def node_key_revoke(*, key: NodeApiKey) -> NodeApiKey:
    """Revoke `key` now; it is refused from its next request on. Revoking twice is a no-op."""
    NodeApiKey.objects.filter(pk=key.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
    key.refresh_from_db(fields=["revoked_at"])
    return key


def node_key_authenticate(*, key_text: str) -> NodeApiKey:
    """Return the live key that `key_text` spells, with its node and provider.

    Raise InvalidKeyError for a malformed, unknown or revoked key. Touch last_used_at at
    most once a minute per key.
    """
    if not key_text.startswith(KEY_PREFIX) or "_" not in key_text[len(KEY_PREFIX) :]:
        raise InvalidKeyError("The API key is malformed; expected tlk_<prefix>_<secret>.")
    prefix, secret = key_text[len(KEY_PREFIX) :].split("_", 1)
    key = NodeApiKey.objects.select_related("node__provider").filter(prefix=prefix).first()
    if key is None or not hmac.compare_digest(key.secret_sha256, _secret_sha256(secret)):
        raise InvalidKeyError("The API key is not valid.")
    if key.revoked_at is not None:
        raise InvalidKeyError("The API key was revoked.")
    now = timezone.now()
    if key.last_used_at is None or now - key.last_used_at >= LAST_USED_RESOLUTION:
        NodeApiKey.objects.filter(pk=key.pk).exclude(
            last_used_at__gt=now - LAST_USED_RESOLUTION
        ).update(last_used_at=now)
        key.last_used_at = now
    return key


_RATE_SQL = """
INSERT INTO providers_nodeapikeyratewindow AS w (key_id, window_start, request_count)
VALUES (%s, date_trunc('minute', now()), 1)
ON CONFLICT (key_id) DO UPDATE SET
  request_count = CASE WHEN w.window_start >= EXCLUDED.window_start
                       THEN w.request_count + 1 ELSE 1 END,
  window_start = GREATEST(w.window_start, EXCLUDED.window_start)
RETURNING request_count,
  GREATEST(1, ceil(extract(epoch FROM window_start + interval '1 minute' - now())))::int
"""


def node_key_rate_count(*, key: NodeApiKey) -> None:
    """Count one report for `key` in its current minute; raise RateLimitedError over the limit.

    A fixed one-minute window kept in one PostgreSQL row per key (upserted), so every
    gunicorn process and host shares it with no extra service. Refused requests count
    too: a client that ignores Retry-After stays refused until the minute ends.
    """
    limit = settings.USAGE_REPORTS_PER_MINUTE_PER_KEY
    with connection.cursor() as cursor:
        cursor.execute(_RATE_SQL, [key.pk])
        count, retry_after_s = cursor.fetchone()
    if count > limit:
        raise RateLimitedError(
            f"This key may send {limit} reports per minute; retry after {retry_after_s} s.",
            retry_after_s=retry_after_s,
        )


# --- Ingestion ----------------------------------------------------------------


@dataclass(frozen=True)
class IngestResult:
    """The answer to a report: `created` (201) or a replay (200), and its exact body."""

    created: bool
    body: bytes


def _signature_verify(*, node: InferenceNode, body: bytes, signature: str | None) -> str:
    """Return the base64 signature verified over `body`, or "" when the node does not sign."""
    if not node.must_sign:
        if signature:
            raise SignatureInvalidError(
                "This node has no registered public key, so its signature cannot be "
                "verified; register the key or send the report unsigned."
            )
        return ""
    if not signature:
        raise SignatureRequiredError(
            "This node registered a public key: every report must carry the header "
            "Tokenledger-Signature: ed25519=<base64 signature of the exact body>."
        )
    if not signature.startswith(SIGNATURE_SCHEME):
        raise SignatureInvalidError("The signature header must read ed25519=<base64 signature>.")
    encoded = signature[len(SIGNATURE_SCHEME) :].strip()
    try:
        raw = base64.b64decode(encoded, validate=True)
        public_key_parse(public_key_b64=node.public_key_ed25519).verify(raw, body)
    except (binascii.Error, ValueError, InvalidSignature):
        raise SignatureInvalidError(
            "The signature does not verify against this node's public key and the exact "
            "request body."
        ) from None
    return encoded


def _utc(moment: datetime) -> datetime:
    return moment.astimezone(UTC)


def _record_canonical(record: RecordIn) -> tuple[object, ...]:
    """Return what identifies a record's usage: a request_id seen again with other values
    here is a conflict. Metadata is informational and left out."""
    return (
        record.request_id,
        record.enterprise,
        record.model,
        _utc(record.occurred_at),
        record.input_tokens,
        record.output_tokens,
        record.cached_input_tokens,
        record.cache_write_tokens,
        record.reasoning_tokens,
        record.service_tier,
    )


def _totals_match(report: ReportIn) -> bool:
    totals = report.totals
    if totals is None:
        return True
    if totals.records is not None and totals.records != len(report.records):
        return False
    for field in (
        "input_tokens",
        "output_tokens",
        "cached_input_tokens",
        "cache_write_tokens",
        "reasoning_tokens",
    ):
        sent = getattr(totals, field)
        if sent is not None and sent != sum(getattr(r, field) for r in report.records):
            return False
    return True


_STAGING_SQL = """
CREATE TEMP TABLE IF NOT EXISTS providers_usage_staging (
  request_id text NOT NULL, enterprise text NOT NULL, model text NOT NULL,
  occurred_at timestamptz NOT NULL, input_tokens bigint NOT NULL,
  output_tokens bigint NOT NULL, cached_input_tokens bigint NOT NULL,
  cache_write_tokens bigint NOT NULL, reasoning_tokens bigint NOT NULL,
  service_tier text NOT NULL, metadata jsonb NOT NULL, content_sha256 bytea NOT NULL
) ON COMMIT DELETE ROWS;
DELETE FROM providers_usage_staging;
"""
_STAGING_COLUMNS = (
    "request_id, enterprise, model, occurred_at, input_tokens, output_tokens, "
    "cached_input_tokens, cache_write_tokens, reasoning_tokens, service_tier, metadata, "
    "content_sha256"
)
_REPORT_INSERT_SQL = """
INSERT INTO providers_usagereport (provider_id, node_id, report_id, content_sha256,
  window_start, window_end, totals, status, hold_reason, records_received,
  records_accepted, records_duplicate, records_conflict, signed, signature,
  signed_body, received_at, response_body)
VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, 0, 0, 0, %s, %s, %s, %s, '')
ON CONFLICT (provider_id, report_id) DO NOTHING
RETURNING id
"""
# Rows go in request_id order so two reports that overlap lock their index entries
# in the same order and cannot deadlock.
_RECORDS_INSERT_SQL = f"""
INSERT INTO providers_usagerecord (report_id, provider_id, node_id, {_STAGING_COLUMNS})
SELECT %s, %s, %s, {_STAGING_COLUMNS} FROM providers_usage_staging ORDER BY request_id
ON CONFLICT (provider_id, request_id) DO NOTHING
"""
# A separate statement (not a CTE of the insert) so it sees rows that concurrent
# reports committed while the insert waited on them. LATERAL with OFFSET 0 (which keeps
# the planner from flattening it) makes it one index probe per staged record: a plain
# join lets the planner (no statistics on the temp table) scan every record of the
# provider, which grows without bound.
_CONFLICTS_INSERT_SQL = """
INSERT INTO providers_usageconflict (report_id, request_id, existing_record_id, incoming,
  created_at)
SELECT %s, s.request_id, r.id, jsonb_build_object(
    'request_id', s.request_id, 'enterprise', s.enterprise, 'model', s.model,
    'occurred_at', s.occurred_at, 'input_tokens', s.input_tokens,
    'output_tokens', s.output_tokens, 'cached_input_tokens', s.cached_input_tokens,
    'cache_write_tokens', s.cache_write_tokens, 'reasoning_tokens', s.reasoning_tokens,
    'service_tier', s.service_tier, 'metadata', s.metadata), %s
FROM providers_usage_staging s
CROSS JOIN LATERAL (
  SELECT id, report_id, content_sha256 FROM providers_usagerecord
  WHERE provider_id = %s AND request_id = s.request_id OFFSET 0
) r
WHERE r.report_id <> %s AND r.content_sha256 <> s.content_sha256
"""
_REPORT_FINISH_SQL = """
UPDATE providers_usagereport SET records_accepted = %s, records_duplicate = %s,
  records_conflict = %s, response_body = %s
WHERE id = %s
"""


@dataclass(frozen=True)
class _Prepared:
    content_sha256: bytes
    rows: list[tuple[object, ...]]
    totals_json: str | None
    held: bool


def _prepare(report: ReportIn) -> _Prepared:
    """Return the rows to COPY and the report's canonical content hash."""
    encode = msgspec.json.encode
    report_hash = hashlib.sha256(
        encode([report.report_id, _utc(report.window.start), _utc(report.window.end)])
    )
    rows = []
    for record in report.records:
        canonical = _record_canonical(record)
        metadata = encode(record.metadata, order="sorted")
        encoded = encode(canonical)
        report_hash.update(encoded)
        report_hash.update(metadata)
        rows.append((*canonical, metadata.decode(), hashlib.sha256(encoded).digest()))
    totals_json = None
    if report.totals is not None:
        totals_json = encode(report.totals, order="sorted").decode()
        report_hash.update(b"totals" + totals_json.encode())
    return _Prepared(report_hash.digest(), rows, totals_json, not _totals_match(report))


def _report_replay(*, provider_id: int, report_id: str, content_sha256: bytes) -> IngestResult:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT content_sha256, response_body FROM providers_usagereport "
            "WHERE provider_id = %s AND report_id = %s",
            [provider_id, report_id],
        )
        stored_sha256, response_body = cursor.fetchone()
    if bytes(stored_sha256) != content_sha256:
        raise ReportConflictError(
            f"report_id {report_id!r} was already used for a report with different "
            "content; a corrected report needs a new report_id.",
            extra={"report_id": report_id},
        )
    return IngestResult(created=False, body=response_body.encode())


def usage_report_ingest(*, key: NodeApiKey, body: bytes, signature: str | None) -> IngestResult:
    """Store the report in `body` whole, or raise and store nothing.

    A replay (same report_id, same content) returns the first answer unchanged; the
    same report_id with other content raises ReportConflictError. Each record is inserted
    and the unique (provider, request_id) index decides: accepted, duplicate (same
    content, counted only) or conflict (stored as a UsageConflict for review).
    """
    body_bytes_max = settings.USAGE_REPORT_BODY_BYTES_MAX
    if len(body) > body_bytes_max:
        raise BodyTooLargeError(
            f"A report body may be at most {body_bytes_max} bytes.",
            extra={"body_bytes_max": body_bytes_max},
        )
    node = key.node
    signature_b64 = _signature_verify(node=node, body=body, signature=signature)
    received_at = timezone.now()
    report = report_parse(body=body, now=received_at)
    prepared = _prepare(report)
    status = UsageReportStatus.HELD if prepared.held else UsageReportStatus.ACCEPTED
    hold_reason = UsageReportHoldReason.TOTALS_MISMATCH if prepared.held else ""
    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute(
            _REPORT_INSERT_SQL,
            [
                node.provider_id,
                node.pk,
                report.report_id,
                prepared.content_sha256,
                report.window.start,
                report.window.end,
                prepared.totals_json,
                status,
                hold_reason,
                len(report.records),
                bool(signature_b64),
                signature_b64,
                body if signature_b64 else None,
                received_at,
            ],
        )
        inserted = cursor.fetchone()
        if inserted is None:
            return _report_replay(
                provider_id=node.provider_id,
                report_id=report.report_id,
                content_sha256=prepared.content_sha256,
            )
        report_pk = inserted[0]
        cursor.execute(_STAGING_SQL)
        with cursor.copy(f"COPY providers_usage_staging ({_STAGING_COLUMNS}) FROM STDIN") as copy:
            for row in prepared.rows:
                copy.write_row(row)
        cursor.execute(_RECORDS_INSERT_SQL, [report_pk, node.provider_id, node.pk])
        accepted = cursor.rowcount
        conflicts = 0
        if accepted < len(prepared.rows):  # only then can there be duplicates or conflicts
            cursor.execute(
                _CONFLICTS_INSERT_SQL, [report_pk, received_at, node.provider_id, report_pk]
            )
            conflicts = cursor.rowcount
        duplicates = len(prepared.rows) - accepted - conflicts
        assert duplicates >= 0, (accepted, conflicts)
        response_body = msgspec.json.encode(
            {
                "report_id": report.report_id,
                "status": str(status),
                "hold_reason": hold_reason or None,
                "records": {
                    "received": len(prepared.rows),
                    "accepted": accepted,
                    "duplicate": duplicates,
                    "conflict": conflicts,
                },
                "received_at": received_at.isoformat().replace("+00:00", "Z"),
            }
        )
        cursor.execute(
            _REPORT_FINISH_SQL,
            [accepted, duplicates, conflicts, response_body.decode(), report_pk],
        )
    return IngestResult(created=True, body=response_body)
