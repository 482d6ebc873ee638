"""The wire format of a usage report, parsed with msgspec.

msgspec decodes and type-checks straight from bytes into these structs at about
1.7 million records/s on this machine; a DRF serializer manages about 19,000, which
alone would miss the 20,000 records/s ingestion target. So the hot path never builds
Python dicts or runs DRF fields: strict types (ints only: a float or a bool is refused
for a token count), unknown fields refused, bounds in the types.

The DRF serializers in providers/openapi.py describe the same shape for the OpenAPI
document only; tests check the two agree.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

# A single request cannot plausibly use more tokens than this; a bigger number is a
# bug on the node (an overflow, a cumulative counter sent as a delta), not usage.
TOKENS_PER_RECORD_MAX = 100_000_000
METADATA_BYTES_MAX = 1024
METADATA_KEYS_MAX = 16
WINDOW_SECONDS_MAX = 24 * 3600

# Printable ASCII without spaces: ids travel in URLs and logs, and PostgreSQL text
# cannot hold NUL.
REPORT_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:~-]*$"
REQUEST_ID_PATTERN = r"^[!-~]+$"
ENTERPRISE_PATTERN = r"^[A-Za-z0-9_-]+$"
MODEL_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/@+-]*$"
NO_NUL_PATTERN = r"^[^\x00]*$"


def python_pattern(pattern: str) -> str:
    """Return `pattern` with its final `$` as `\\Z`: in Python, unlike in the ECMAScript
    regexes of OpenAPI, `$` also matches before a trailing newline."""
    assert pattern.endswith("$")
    return pattern[:-1] + r"\Z"


REPORT_ID_MAX_LENGTH = 128
ReportId = Annotated[
    str,
    msgspec.Meta(
        min_length=1, max_length=REPORT_ID_MAX_LENGTH, pattern=python_pattern(REPORT_ID_PATTERN)
    ),
]
RequestId = Annotated[
    str, msgspec.Meta(min_length=1, max_length=200, pattern=python_pattern(REQUEST_ID_PATTERN))
]
EnterpriseSlug = Annotated[
    str, msgspec.Meta(min_length=1, max_length=100, pattern=python_pattern(ENTERPRISE_PATTERN))
]
ModelName = Annotated[
    str, msgspec.Meta(min_length=1, max_length=200, pattern=python_pattern(MODEL_PATTERN))
]
TokenCount = Annotated[int, msgspec.Meta(ge=0, le=TOKENS_PER_RECORD_MAX)]
AwareDatetime = Annotated[datetime, msgspec.Meta(tz=True)]
MetadataKey = Annotated[
    str, msgspec.Meta(min_length=1, max_length=64, pattern=python_pattern(NO_NUL_PATTERN))
]
MetadataValue = (
    Annotated[str, msgspec.Meta(max_length=512, pattern=python_pattern(NO_NUL_PATTERN))]
    | int
    | bool
    | None
)
Metadata = Annotated[dict[MetadataKey, MetadataValue], msgspec.Meta(max_length=METADATA_KEYS_MAX)]
ServiceTierName = Literal["standard", "batch", "priority", "flex"]


class WindowIn(msgspec.Struct, forbid_unknown_fields=True):
    start: AwareDatetime
    end: AwareDatetime


class RecordIn(msgspec.Struct, forbid_unknown_fields=True):
    request_id: RequestId
    enterprise: EnterpriseSlug
    model: ModelName
    occurred_at: AwareDatetime
    input_tokens: TokenCount
    output_tokens: TokenCount
    cached_input_tokens: TokenCount = 0
    cache_write_tokens: TokenCount = 0
    reasoning_tokens: TokenCount = 0
    service_tier: ServiceTierName = "standard"
    metadata: Metadata = msgspec.field(default_factory=dict)


class TotalsIn(msgspec.Struct, forbid_unknown_fields=True):
    """Optional control totals; each one sent must equal the sum over the records."""

    records: Annotated[int, msgspec.Meta(ge=0)] | None = None
    input_tokens: Annotated[int, msgspec.Meta(ge=0)] | None = None
    output_tokens: Annotated[int, msgspec.Meta(ge=0)] | None = None
    cached_input_tokens: Annotated[int, msgspec.Meta(ge=0)] | None = None
    cache_write_tokens: Annotated[int, msgspec.Meta(ge=0)] | None = None
    reasoning_tokens: Annotated[int, msgspec.Meta(ge=0)] | None = None


class ReportIn(msgspec.Struct, forbid_unknown_fields=True):
    report_id: ReportId
    window: WindowIn
    records: list[RecordIn]
    totals: TotalsIn | None = None
