"""A small client for Tokenledger's usage-report API, for providers' inference nodes.

Copy this one file into a node: it needs only the standard library (and the
`cryptography` package, imported only when a signing key is configured). It knows
nothing about Django. The contract it speaks is `POST /api/v1/usage/reports`:

    from client import UsageClient

    with UsageClient("https://ledger.example.com", "tlk_ab12cd34_...") as client:
        client.add({
            "request_id": "req-8f2c", "enterprise": "acme", "model": "qwen3-235b-a22b",
            "occurred_at": "2026-11-22T10:01:07Z",
            "input_tokens": 1200,          # uncached input only
            "cached_input_tokens": 800,    # cache reads, beside (not inside) input
            "cache_write_tokens": 0,
            "output_tokens": 350,          # includes reasoning
            "reasoning_tokens": 0,         # the reasoning part of output (informational)
        })
        # ... add() sends a report each time `records_per_report` records are buffered;
        # leaving the `with` block (or calling flush()) sends the rest.

Mapping provider-style usage into a record (token fields are additive, never subsets):

- OpenAI style (`prompt_tokens` includes `cached_tokens`): `input_tokens =
  prompt_tokens - cached_tokens`, `cached_input_tokens = cached_tokens`,
  `output_tokens = completion_tokens`, `reasoning_tokens = reasoning_tokens`.
- Anthropic style (cache reads beside input): `input_tokens = input_tokens`,
  `cached_input_tokens = cache_read_input_tokens`, `cache_write_tokens =
  cache_creation_input_tokens`, `output_tokens = output_tokens`.

Delivery guarantees. A report is serialised and signed once; every retry sends the
same bytes under the same `report_id`, so a report the server already stored (say the
answer was lost on the way back) is answered as a replay (200) and never counted
twice. Network errors, 5xx and 429 are retried with exponential backoff (429 and 503
honour `Retry-After`); any other 4xx raises `UsageReportRejected` at once, because
sending the same bytes again cannot succeed.

Token counts must be Python ints: floats (and bools) are refused before anything is
sent, because usage is billed to the last token.

A `UsageClient` holds one keep-alive HTTP connection and is not thread-safe: use one
client per thread or process.
"""

from __future__ import annotations

import base64
import http.client
import json
import random
import socket
import time
import urllib.parse
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

__all__ = [
    "TOKEN_FIELDS",
    "PreparedReport",
    "ReportResult",
    "UsageClient",
    "UsageClientError",
    "UsageDeliveryError",
    "UsageReportRejected",
]

USER_AGENT = "tokenledger-usage-client/1"
REPORTS_PATH = "/api/v1/usage/reports"
SIGNATURE_HEADER = "Tokenledger-Signature"

# The server's default limits (Django settings USAGE_RECORDS_PER_REPORT_MAX and
# USAGE_REPORT_BODY_BYTES_MAX). A server may be configured lower; it then answers 413.
RECORDS_PER_REPORT_MAX = 5000
REPORT_BODY_BYTES_MAX = 4 * 2**20
# A Retry-After longer than this is cut short: a node should not sleep for an hour
# on one answer; the next attempt will be told again.
RETRY_AFTER_MAX_S = 300.0

TOKEN_FIELDS: tuple[str, ...] = (
    "input_tokens",
    "output_tokens",
    "cached_input_tokens",
    "cache_write_tokens",
    "reasoning_tokens",
)

# 408, 425, 429 and 5xx mean "not now": the same bytes may succeed later.
_RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
# A keep-alive connection the server closed while idle fails the next request in one
# of these ways; that attempt never reached the application, so it is retried at once.
_STALE_CONNECTION_ERRORS = (
    http.client.RemoteDisconnected,
    BrokenPipeError,
    ConnectionResetError,
    ConnectionAbortedError,
)


class UsageClientError(Exception):
    """Base of every error this client raises."""


class UsageReportRejected(UsageClientError):
    """The server refused the report with a 4xx; retrying the same bytes cannot help.

    Attributes:
        status: the HTTP status (400 invalid, 401 auth, 409 report_conflict,
            413 body_too_large / too_many_records, ...).
        body: the decoded JSON error, `{"code", "message", "extra"}`; field errors are
            under `body["extra"]["fields"]` as `[{"path": "$.records[3].model",
            "message": ...}]`.
        code: `body["code"]`, or "" when the body carried none.
    """

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        self.status = status
        self.body = body
        self.code = str(body.get("code", ""))
        super().__init__(f"HTTP {status} {self.code}: {body.get('message', '')}".rstrip())


class UsageDeliveryError(UsageClientError):
    """Every attempt failed transiently (network, 5xx, 429); the report may be retried.

    Sending the same `PreparedReport` again later is safe: the server de-duplicates it
    by `report_id`.

    Attributes:
        attempts: how many requests were tried.
        status: the last HTTP status, or None when the last failure was a network error.
        body: the last decoded answer, if any.
    """

    def __init__(
        self, message: str, *, attempts: int, status: int | None, body: dict[str, Any] | None
    ) -> None:
        self.attempts = attempts
        self.status = status
        self.body = body
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class PreparedReport:
    """A report serialised (and signed) once, ready to be sent and re-sent unchanged.

    Attributes:
        report_id: the idempotency key of the report.
        body: the exact JSON bytes that are sent (and that the signature covers).
        signature: the `Tokenledger-Signature` header value, or None when unsigned.
        records: the number of records in the report.
        serialise_s: seconds spent building, serialising and signing it.
    """

    report_id: str
    body: bytes
    signature: str | None
    records: int
    serialise_s: float = 0.0


@dataclass(frozen=True, slots=True)
class ReportResult:
    """The server's answer to a report.

    Attributes:
        status: 201 on first acceptance, 200 when the server already had this report.
        body: the decoded answer: `report_id`, `status` ("accepted" or "held"),
            `hold_reason`, `records` {received, accepted, duplicate, conflict},
            `received_at`.
        attempts: the number of HTTP requests it took (1 when nothing was retried).
        elapsed_s: seconds from the first attempt to the answer, backoff included.
    """

    status: int
    body: dict[str, Any]
    attempts: int = 1
    elapsed_s: float = 0.0

    @property
    def replayed(self) -> bool:
        """Return True when the server answered that it already had this report."""
        return self.status == 200


@dataclass(slots=True)
class _Answer:
    status: int
    headers: http.client.HTTPMessage
    body: dict[str, Any] = field(default_factory=dict)


def _utc_text(moment: datetime) -> str:
    """Return an aware datetime as RFC 3339 UTC text with a Z suffix."""
    assert moment.tzinfo is not None, "timestamps must be timezone-aware"
    moment = moment.astimezone(UTC)
    text = moment.isoformat(timespec="microseconds" if moment.microsecond else "seconds")
    return text.replace("+00:00", "Z")


def _parse_time(value: Any, where: str) -> datetime:
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError as exc:
            raise ValueError(f"{where}: {value!r} is not an ISO 8601 timestamp") from exc
    else:
        raise TypeError(f"{where}: expected an ISO 8601 string, got {type(value).__name__}")
    if moment.tzinfo is None:
        raise ValueError(f"{where}: {value!r} has no timezone; send UTC with a Z suffix")
    return moment


def _minute_floor(moment: datetime) -> datetime:
    return moment.astimezone(UTC).replace(second=0, microsecond=0)


def window_around(times: Iterable[datetime]) -> dict[str, str]:
    """Return the report window covering `times`, rounded outward to whole minutes.

    The start is the earliest minute boundary at or before the first record; the end
    is the minute boundary strictly after the last one, so no record sits on the edge.
    """
    earliest = latest = None
    for moment in times:
        if earliest is None or moment < earliest:
            earliest = moment
        if latest is None or moment > latest:
            latest = moment
    if earliest is None or latest is None:
        raise ValueError("a report needs at least one record to derive its window")
    start = _minute_floor(earliest)
    end = _minute_floor(latest) + timedelta(minutes=1)
    return {"start": _utc_text(start), "end": _utc_text(end)}


def _check_record(record: Mapping[str, Any], index: int, totals: dict[str, int]) -> None:
    """Add the record's token counts to `totals`, refusing anything but ints >= 0."""
    for name in TOKEN_FIELDS:
        value = record.get(name, 0)
        # type() and not isinstance(): bool is an int subclass and is not a count.
        if type(value) is not int:
            raise TypeError(
                f"records[{index}].{name}: token counts are ints, got "
                f"{type(value).__name__} {value!r}"
            )
        if value < 0:
            raise ValueError(f"records[{index}].{name}: token counts are >= 0, got {value}")
        totals[name] += value


def _retry_after_s(headers: http.client.HTTPMessage) -> float | None:
    """Return the Retry-After header in seconds (delta-seconds or HTTP-date), if any."""
    value = headers.get("Retry-After")
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (moment - datetime.now(UTC)).total_seconds())


def _load_signing_key(signing_key: Any) -> Any:
    """Return an Ed25519 private key from raw 32 bytes, PEM bytes/str or a key object."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    if isinstance(signing_key, Ed25519PrivateKey):
        return signing_key
    if isinstance(signing_key, str):
        signing_key = signing_key.encode()
    if isinstance(signing_key, bytes) and len(signing_key) == 32:
        return Ed25519PrivateKey.from_private_bytes(signing_key)
    if isinstance(signing_key, bytes) and signing_key.lstrip().startswith(b"-----BEGIN"):
        key = serialization.load_pem_private_key(signing_key, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise TypeError("signing_key: the PEM key is not an Ed25519 private key")
        return key
    raise TypeError("signing_key: give 32 raw Ed25519 private key bytes or a PEM key")


class UsageClient:
    """Send usage reports to Tokenledger, batching, signing and retrying.

    Args:
        base_url: the server, e.g. "https://ledger.example.com" (http or https).
        api_key: the node's API key, "tlk_<prefix>_<secret>", shown once at creation.
        signing_key: the node's Ed25519 private key (32 raw bytes, or PEM) when the
            node registered its public key; every report is then signed. A node that
            registered a key must sign.
        records_per_report: how many records `add()` buffers before it sends a report
            (1..RECORDS_PER_REPORT_MAX). 1,000 is a good size: large enough to make
            each request cheap per record, small enough to keep latency low.
        timeout_s: socket timeout for connecting and for each read.
        retries_max: how many times a transient failure is retried (so at most
            retries_max + 1 requests per report).
        backoff_s: the first backoff; it doubles on each retry, with jitter.
        backoff_max_s: the longest backoff between two attempts (a Retry-After
            from the server is honoured even when longer, up to RETRY_AFTER_MAX_S).
        report_id_prefix: the start of generated report ids (use the node's name).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        signing_key: Any = None,
        records_per_report: int = 1000,
        timeout_s: float = 10.0,
        retries_max: int = 8,
        backoff_s: float = 0.2,
        backoff_max_s: float = 10.0,
        report_id_prefix: str = "report",
    ) -> None:
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in {"http", "https"} or not parts.hostname:
            raise ValueError(f"base_url: expected http(s)://host[:port], got {base_url!r}")
        if not 1 <= records_per_report <= RECORDS_PER_REPORT_MAX:
            raise ValueError(f"records_per_report: 1..{RECORDS_PER_REPORT_MAX}")
        if retries_max < 0 or timeout_s <= 0 or backoff_s < 0 or backoff_max_s < 0:
            raise ValueError("retries_max, timeout_s, backoff_s, backoff_max_s must be >= 0")
        self.base_url = base_url.rstrip("/")
        self._scheme = parts.scheme
        self._host = parts.hostname
        self._port = parts.port
        self._path_prefix = parts.path.rstrip("/")
        self._authorization = f"Bearer {api_key}"
        self._signing_key = _load_signing_key(signing_key) if signing_key is not None else None
        self.records_per_report = records_per_report
        self.timeout_s = timeout_s
        self.retries_max = retries_max
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.report_id_prefix = report_id_prefix
        self._buffer: list[Mapping[str, Any]] = []
        self._connection: http.client.HTTPConnection | None = None
        self._connection_requests = 0

    # --- batching -------------------------------------------------------------------

    def add(self, record: Mapping[str, Any]) -> dict[str, Any] | None:
        """Buffer one record; send a report when `records_per_report` are buffered.

        Return the server's answer when a report was sent, else None. On failure the
        buffered records stay buffered (and the exception propagates), so nothing is
        lost; the next `add()`/`flush()` sends them under a new report_id, which the
        server de-duplicates per request_id if an earlier attempt was stored after all.
        """
        self._buffer.append(record)
        if len(self._buffer) >= self.records_per_report:
            return self.flush()
        return None

    def flush(self) -> dict[str, Any] | None:
        """Send the buffered records as one report; return the answer (None if empty)."""
        if not self._buffer:
            return None
        answer = self.send_report(self._buffer)
        self._buffer = []
        return answer

    @property
    def buffered(self) -> int:
        """Return how many records wait in the buffer."""
        return len(self._buffer)

    # --- reports --------------------------------------------------------------------

    def prepare_report(
        self,
        records: Iterable[Mapping[str, Any]],
        *,
        report_id: str | None = None,
        window: Mapping[str, Any] | None = None,
    ) -> PreparedReport:
        """Build, check, serialise and sign a report, once.

        Args:
            records: the usage records (dicts as in the module docstring). A record's
                `occurred_at` may be an aware datetime; it is sent as UTC text.
            report_id: the idempotency key; generated when None. Reuse it only to
                re-send the very same report.
            window: {"start", "end"}; when None, it is derived from the records'
                `occurred_at`, rounded outward to whole minutes.

        Raises:
            TypeError, ValueError: a record has a non-int or negative token count, a
                bad timestamp, or the report is over the limits; nothing was sent.
        """
        started = time.perf_counter()
        records = list(records)
        if not records:
            raise ValueError("a report needs at least one record")
        if len(records) > RECORDS_PER_REPORT_MAX:
            raise ValueError(
                f"{len(records)} records in one report; the limit is {RECORDS_PER_REPORT_MAX}"
            )
        totals = dict.fromkeys(TOKEN_FIELDS, 0)
        times: list[datetime] = []
        for index, record in enumerate(records):
            _check_record(record, index, totals)
            occurred_at = record.get("occurred_at")
            moment = _parse_time(occurred_at, f"records[{index}].occurred_at")
            if isinstance(occurred_at, datetime):
                records[index] = {**record, "occurred_at": _utc_text(moment)}
            times.append(moment)
        if window is None:
            window = window_around(times)
        if report_id is None:
            start = _parse_time(window["start"], "window.start").astimezone(UTC)
            report_id = f"{self.report_id_prefix}-{start:%Y%m%dT%H%MZ}-{uuid.uuid4().hex[:16]}"
        document = {
            "report_id": report_id,
            "window": dict(window),
            "records": records,
            "totals": {"records": len(records), **totals},
        }
        body = json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()
        if len(body) > REPORT_BODY_BYTES_MAX:
            raise ValueError(
                f"the report is {len(body)} bytes; the limit is {REPORT_BODY_BYTES_MAX}: "
                "send fewer records per report"
            )
        signature = None
        if self._signing_key is not None:
            signature = "ed25519=" + base64.b64encode(self._signing_key.sign(body)).decode()
        return PreparedReport(
            report_id=report_id,
            body=body,
            signature=signature,
            records=len(records),
            serialise_s=time.perf_counter() - started,
        )

    def send_report(
        self,
        records: Iterable[Mapping[str, Any]],
        *,
        report_id: str | None = None,
        window: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Send one report and return the server's answer (see `ReportResult.body`).

        Raises:
            UsageReportRejected: a 4xx other than 408/425/429 (invalid, auth, conflict,
                too large); not retried.
            UsageDeliveryError: every attempt failed transiently.
        """
        prepared = self.prepare_report(records, report_id=report_id, window=window)
        return self.post(prepared).body

    def post(self, prepared: PreparedReport) -> ReportResult:
        """Send a prepared report, retrying transient failures with the same bytes."""
        headers = {
            "Content-Type": "application/json",
            "Authorization": self._authorization,
        }
        if prepared.signature is not None:
            headers[SIGNATURE_HEADER] = prepared.signature
        started = time.monotonic()
        answer, attempts = self._request_with_retries("POST", REPORTS_PATH, prepared.body, headers)
        if answer.status not in {200, 201}:
            raise UsageReportRejected(answer.status, answer.body)
        return ReportResult(
            status=answer.status,
            body=answer.body,
            attempts=attempts,
            elapsed_s=time.monotonic() - started,
        )

    def report_status(self, report_id: str) -> dict[str, Any]:
        """Return where a report stands: its status and record counts.

        Raises:
            UsageReportRejected: 404 when the node's provider has no such report.
        """
        path = f"{REPORTS_PATH}/{urllib.parse.quote(report_id, safe='')}"
        answer, _ = self._request_with_retries(
            "GET", path, None, {"Authorization": self._authorization}
        )
        if answer.status != 200:
            raise UsageReportRejected(answer.status, answer.body)
        return answer.body

    # --- transport ------------------------------------------------------------------

    def _backoff_s(self, retry: int, answer: _Answer | None) -> float:
        if answer is not None:
            retry_after = _retry_after_s(answer.headers)
            if retry_after is not None:
                return min(retry_after, RETRY_AFTER_MAX_S)
        ceiling = min(self.backoff_max_s, self.backoff_s * 2**retry)
        # "Equal jitter": at least half the backoff, so many nodes do not retry in step.
        return ceiling / 2 + random.uniform(0, ceiling / 2)

    def _request_with_retries(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str]
    ) -> tuple[_Answer, int]:
        """Return the first non-transient answer and the number of attempts."""
        attempts = 0
        last_error: BaseException | None = None
        answer: _Answer | None = None
        for retry in range(self.retries_max + 1):
            if retry:
                time.sleep(self._backoff_s(retry - 1, answer))
            attempts += 1
            try:
                answer = self._request(method, path, body, headers)
            except (OSError, http.client.HTTPException) as exc:
                last_error, answer = exc, None
                continue
            if answer.status not in _RETRYABLE_STATUSES:
                return answer, attempts
        status = answer.status if answer is not None else None
        reason = f"HTTP {status}" if status is not None else repr(last_error)
        raise UsageDeliveryError(
            f"{method} {path} failed after {attempts} attempts; last: {reason}",
            attempts=attempts,
            status=status,
            body=answer.body if answer is not None else None,
        )

    def _request(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str]
    ) -> _Answer:
        """Make one request on the keep-alive connection (reopened when needed)."""
        reused = self._connection is not None and self._connection_requests > 0
        try:
            return self._request_once(method, path, body, headers)
        except _STALE_CONNECTION_ERRORS:
            self.close()
            if not reused:
                raise
        # The server closed an idle keep-alive connection under us; that request never
        # reached the application. Once more on a fresh connection, without backoff.
        return self._request_once(method, path, body, headers)

    def _request_once(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str]
    ) -> _Answer:
        connection = self._connect()
        try:
            connection.request(method, self._path_prefix + path, body=body, headers={**headers})
            response = connection.getresponse()
            payload = response.read()
        except BaseException:
            self.close()
            raise
        self._connection_requests += 1
        if response.will_close:
            self.close()
        return _Answer(status=response.status, headers=response.headers, body=_decode(payload))

    def _connect(self) -> http.client.HTTPConnection:
        if self._connection is None:
            connection_class = (
                http.client.HTTPSConnection
                if self._scheme == "https"
                else http.client.HTTPConnection
            )
            self._connection = connection_class(self._host, self._port, timeout=self.timeout_s)
            self._connection.connect()
            if self._connection.sock is not None:
                # A large body leaves in several writes; without this, Nagle's algorithm
                # may hold the last one back until the server's delayed ACK.
                self._connection.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self._connection_requests = 0
        return self._connection

    def close(self) -> None:
        """Close the HTTP connection (buffered records stay buffered)."""
        if self._connection is not None:
            self._connection.close()
            self._connection = None
            self._connection_requests = 0

    def __enter__(self) -> UsageClient:
        return self

    def __exit__(self, exc_type: object, exc: object, traceback: object) -> None:
        try:
            if exc_type is None:
                self.flush()
        finally:
            self.close()


def _decode(payload: bytes) -> dict[str, Any]:
    """Return a JSON object answer; wrap anything else (a proxy's HTML page, say)."""
    if not payload:
        return {}
    try:
        decoded = json.loads(payload)
    except ValueError:
        return {"code": "not_json", "message": payload[:500].decode("utf-8", "replace")}
    return decoded if isinstance(decoded, dict) else {"data": decoded}
