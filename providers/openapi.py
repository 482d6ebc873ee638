"""The OpenAPI description of the ingestion API (drf-spectacular).

These serializers only document the wire format: the hot path parses with msgspec
(providers/schemas.py). tests/providers/test_schema.py checks the two agree.
"""

from __future__ import annotations

from django.conf import settings
from drf_spectacular.utils import OpenApiExample
from rest_framework import serializers

from providers import schemas
from providers.models import ServiceTier, UsageReportHoldReason, UsageReportStatus


def _tokens(help_text: str, *, required: bool = True) -> serializers.IntegerField:
    extra = {} if required else {"required": False, "default": 0}
    return serializers.IntegerField(
        min_value=0, max_value=schemas.TOKENS_PER_RECORD_MAX, help_text=help_text, **extra
    )


class WindowSerializer(serializers.Serializer):
    start = serializers.DateTimeField(help_text="RFC 3339 with a timezone, e.g. ...Z.")
    end = serializers.DateTimeField(help_text="After start; at most 24 h after it.")


class RecordSerializer(serializers.Serializer):
    request_id = serializers.RegexField(
        schemas.REQUEST_ID_PATTERN,
        max_length=200,
        help_text="Unique per provider across all its nodes: a request_id seen before is a "
        "duplicate (same values, counted, not billed again) or a conflict (other values, "
        "held for finance review). Printable ASCII, no spaces.",
    )
    enterprise = serializers.RegexField(
        schemas.ENTERPRISE_PATTERN, max_length=100, help_text="The consuming enterprise's slug."
    )
    model = serializers.RegexField(schemas.MODEL_PATTERN, max_length=200)
    occurred_at = serializers.DateTimeField(
        help_text="Inside the report window (both ends included), and at most "
        f"{settings.USAGE_FUTURE_SKEW_SECONDS_MAX} s in the future."
    )
    input_tokens = _tokens(
        "Uncached input only. OpenAI: prompt_tokens - prompt_tokens_details.cached_tokens. "
        "Anthropic: input_tokens."
    )
    output_tokens = _tokens(
        "All output, reasoning included. OpenAI: completion_tokens. Anthropic: output_tokens."
    )
    cached_input_tokens = _tokens(
        "Cache reads. OpenAI: prompt_tokens_details.cached_tokens. Anthropic: "
        "cache_read_input_tokens.",
        required=False,
    )
    cache_write_tokens = _tokens(
        "Cache creation. Anthropic: cache_creation_input_tokens. OpenAI: 0.", required=False
    )
    reasoning_tokens = _tokens(
        "The part of output_tokens that was reasoning (informational, billed as output); "
        "at most output_tokens. OpenAI: completion_tokens_details.reasoning_tokens.",
        required=False,
    )
    service_tier = serializers.ChoiceField(
        choices=ServiceTier.choices, required=False, default=ServiceTier.STANDARD
    )
    metadata = serializers.DictField(
        child=serializers.JSONField(),
        required=False,
        help_text=f"Small flat object: at most {schemas.METADATA_KEYS_MAX} keys, values string, "
        f"integer, boolean or null, at most {schemas.METADATA_BYTES_MAX} bytes as JSON. "
        "Not part of the record's identity.",
    )


class TotalsSerializer(serializers.Serializer):
    records = serializers.IntegerField(min_value=0, required=False)
    input_tokens = serializers.IntegerField(min_value=0, required=False)
    output_tokens = serializers.IntegerField(min_value=0, required=False)
    cached_input_tokens = serializers.IntegerField(min_value=0, required=False)
    cache_write_tokens = serializers.IntegerField(min_value=0, required=False)
    reasoning_tokens = serializers.IntegerField(min_value=0, required=False)


class UsageReportSerializer(serializers.Serializer):
    report_id = serializers.RegexField(
        schemas.REPORT_ID_PATTERN,
        max_length=128,
        help_text="Unique per provider. Retrying with the same report_id and content "
        "is safe (200, same answer); other content under it is 409.",
    )
    window = WindowSerializer()
    records = RecordSerializer(
        many=True, help_text=f"At most {settings.USAGE_RECORDS_PER_REPORT_MAX} records."
    )
    totals = TotalsSerializer(
        required=False,
        help_text="Optional control totals; a mismatch stores the report as held "
        "(hold_reason totals_mismatch).",
    )


class RecordCountsSerializer(serializers.Serializer):
    received = serializers.IntegerField()
    accepted = serializers.IntegerField(help_text="New records, to be billed.")
    duplicate = serializers.IntegerField(help_text="Seen before with the same values.")
    conflict = serializers.IntegerField(help_text="Seen before with other values; held.")


class UsageReportAnswerSerializer(serializers.Serializer):
    report_id = serializers.CharField()
    status = serializers.ChoiceField(choices=UsageReportStatus.choices)
    hold_reason = serializers.ChoiceField(choices=UsageReportHoldReason.choices, allow_null=True)
    records = RecordCountsSerializer()
    received_at = serializers.DateTimeField()


class UsageReportStatusSerializer(UsageReportAnswerSerializer):
    window = WindowSerializer()
    signed = serializers.BooleanField()


class FieldErrorSerializer(serializers.Serializer):
    path = serializers.CharField(help_text="JSON path, e.g. $.records[3].input_tokens")
    message = serializers.CharField()


class ErrorExtraSerializer(serializers.Serializer):
    retryable = serializers.BooleanField(required=False)
    fields = FieldErrorSerializer(many=True, required=False)


class ErrorSerializer(serializers.Serializer):
    code = serializers.CharField(
        help_text="Stable: invalid, too_many_records, body_too_large, "
        "unsupported_media_type, rate_limited, not_authenticated, invalid_key, "
        "signature_required, signature_invalid, report_conflict, not_found."
    )
    message = serializers.CharField()
    extra = ErrorExtraSerializer()


REPORT_EXAMPLE = OpenApiExample(
    "One record (OpenAI or Anthropic usage mapped)",
    request_only=True,
    description=(
        "OpenAI usage {prompt_tokens: 2000, completion_tokens: 350, prompt_tokens_details: "
        "{cached_tokens: 800}} maps to input_tokens 1200 (2000 - 800) and "
        "cached_input_tokens 800. Anthropic usage {input_tokens: 1200, "
        "cache_read_input_tokens: 800, cache_creation_input_tokens: 0, output_tokens: 350} "
        "maps field by field."
    ),
    value={
        "report_id": "node-7-2026-11-22T10:00Z",
        "window": {"start": "2026-11-22T10:00:00Z", "end": "2026-11-22T10:05:00Z"},
        "records": [
            {
                "request_id": "req-8f2c",
                "enterprise": "acme",
                "model": "qwen3-235b-a22b",
                "occurred_at": "2026-11-22T10:01:07Z",
                "input_tokens": 1200,
                "output_tokens": 350,
                "cached_input_tokens": 800,
                "cache_write_tokens": 0,
                "reasoning_tokens": 0,
                "service_tier": "standard",
                "metadata": {"region": "eu-west"},
            }
        ],
        "totals": {"records": 1, "input_tokens": 1200, "output_tokens": 350},
    },
)


def limits_description() -> str:
    return (
        "Limits (settings, answered with a clear error): at most "
        f"{settings.USAGE_RECORDS_PER_REPORT_MAX} records per report "
        "(USAGE_RECORDS_PER_REPORT_MAX, 413 too_many_records); a body of at most "
        f"{settings.USAGE_REPORT_BODY_BYTES_MAX} bytes (USAGE_REPORT_BODY_BYTES_MAX, 413 "
        f"body_too_large); {settings.USAGE_REPORTS_PER_MINUTE_PER_KEY} reports per minute "
        "per key (USAGE_REPORTS_PER_MINUTE_PER_KEY, 429 rate_limited with Retry-After); "
        f"occurred_at at most {settings.USAGE_FUTURE_SKEW_SECONDS_MAX} s in the future "
        "(USAGE_FUTURE_SKEW_SECONDS_MAX); token counts at most "
        f"{schemas.TOKENS_PER_RECORD_MAX} per field and record.\n\n"
        "A node that registered an Ed25519 public key must send "
        "`Tokenledger-Signature: ed25519=<base64 signature of the exact body bytes>`."
    )
