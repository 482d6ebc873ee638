"""Parse and check a usage report body, listing every problem with its JSON path.

The fast path is one msgspec decode into typed structs. Only when that fails do we
walk the generic JSON again, field by field, to list *every* problem (msgspec stops
at the first); rejected reports can afford the slower walk.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import msgspec

from providers.exceptions import InvalidReportError, TooManyRecordsError
from providers.schemas import (
    METADATA_BYTES_MAX,
    WINDOW_SECONDS_MAX,
    RecordIn,
    ReportIn,
)

FieldError = dict[str, str]


def _error(path: str, message: str) -> FieldError:
    return {"path": path, "message": message}


def _message(exc: msgspec.ValidationError) -> str:
    """Return msgspec's message without its " - at `$...`" suffix (we give the path)."""
    return str(exc).split(" - at `", 1)[0]


def _struct_type(annotation: Any) -> type[msgspec.Struct] | None:
    """Return the Struct class in `annotation` (`S` or `S | None`), else None."""
    if isinstance(annotation, type) and issubclass(annotation, msgspec.Struct):
        return annotation
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        for arg in typing.get_args(annotation):
            found = _struct_type(arg)
            if found is not None:
                return found
    return None


def _walk(value: Any, annotation: Any, path: str) -> Iterator[FieldError]:
    """Yield every problem of `value` against `annotation`, with JSON paths."""
    struct = _struct_type(annotation)
    if struct is not None and isinstance(value, dict):
        yield from _walk_struct(value, struct, path)
        return
    if typing.get_origin(annotation) is list and isinstance(value, list):
        (item_type,) = typing.get_args(annotation)
        for index, item in enumerate(value):
            yield from _walk(item, item_type, f"{path}[{index}]")
        return
    try:
        msgspec.json.decode(msgspec.json.encode(value), type=annotation)
    except msgspec.ValidationError as exc:
        yield _error(path, _message(exc))


def _walk_struct(
    value: dict[str, Any], struct: type[msgspec.Struct], path: str
) -> Iterator[FieldError]:
    fields = {field.encode_name: field for field in msgspec.structs.fields(struct)}
    for key in value:
        if key not in fields:
            yield _error(f"{path}.{key}", f"Unknown field `{key}`")
    for name, field in fields.items():
        if name in value:
            yield from _walk(value[name], field.type, f"{path}.{name}")
        elif field.required:
            yield _error(f"{path}.{name}", f"Missing required field `{name}`")


def _structural_errors(body: bytes) -> list[FieldError]:
    """Return every structural problem of a body the typed decode refused."""
    try:
        generic = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        return [_error("$", f"Malformed JSON: {exc}")]
    _check_record_count(generic.get("records") if isinstance(generic, dict) else None)
    errors = list(_walk(generic, ReportIn, "$"))
    # The walk and the typed decode must agree that the body is invalid.
    return errors or [_error("$", "The report does not match the schema")]


def _check_record_count(records: Any) -> None:
    from django.conf import settings

    records_max = settings.USAGE_RECORDS_PER_REPORT_MAX
    if isinstance(records, list) and len(records) > records_max:
        raise TooManyRecordsError(
            f"A report may hold at most {records_max} records; this one has {len(records)}. "
            "Split it into several reports.",
            extra={"records_max": records_max, "records_received": len(records)},
        )


def _record_errors(
    index: int, record: RecordIn, window: ReportIn, latest_allowed: datetime
) -> Iterator[FieldError]:
    path = f"$.records[{index}]"
    start, end = window.window.start, window.window.end
    if not start <= record.occurred_at <= end:
        yield _error(
            f"{path}.occurred_at",
            f"occurred_at {record.occurred_at.isoformat()} is outside the report window "
            f"[{start.isoformat()}, {end.isoformat()}]",
        )
    if record.occurred_at > latest_allowed:
        yield _error(f"{path}.occurred_at", "occurred_at is too far in the future")
    if record.reasoning_tokens > record.output_tokens:
        yield _error(
            f"{path}.reasoning_tokens",
            "reasoning_tokens is a part of output_tokens and cannot exceed it",
        )
    if record.metadata and len(msgspec.json.encode(record.metadata)) > METADATA_BYTES_MAX:
        yield _error(f"{path}.metadata", f"metadata exceeds {METADATA_BYTES_MAX} bytes as JSON")


def _semantic_errors(report: ReportIn, now: datetime) -> list[FieldError]:
    """Return every rule a well-typed report breaks (window, timestamps, uniqueness)."""
    from django.conf import settings

    latest_allowed = now + timedelta(seconds=settings.USAGE_FUTURE_SKEW_SECONDS_MAX)
    errors: list[FieldError] = []
    start, end = report.window.start, report.window.end
    if end <= start:
        errors.append(_error("$.window.end", "window.end must be after window.start"))
    elif (end - start).total_seconds() > WINDOW_SECONDS_MAX:
        errors.append(_error("$.window", f"A window may span at most {WINDOW_SECONDS_MAX} s"))
    if start > latest_allowed:
        errors.append(_error("$.window.start", "window.start is too far in the future"))
    seen: dict[str, int] = {}
    for index, record in enumerate(report.records):
        errors.extend(_record_errors(index, record, report, latest_allowed))
        first = seen.setdefault(record.request_id, index)
        if first != index:
            errors.append(
                _error(
                    f"$.records[{index}].request_id",
                    f"request_id {record.request_id!r} repeats $.records[{first}]",
                )
            )
    return errors


def report_parse(*, body: bytes, now: datetime) -> ReportIn:
    """Return the report in `body`, or raise InvalidReportError listing every problem."""
    try:
        report = msgspec.json.decode(body, type=ReportIn)
    except msgspec.DecodeError:
        raise InvalidReportError(_structural_errors(body)) from None
    _check_record_count(report.records)
    errors = _semantic_errors(report, now)
    if errors:
        raise InvalidReportError(errors)
    return report
