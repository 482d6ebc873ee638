"""The node client (providers/client.py) over real HTTP on loopback.

Transport behaviours the real API cannot produce on demand (a 503, a 429 with
Retry-After, a server that is not up yet) are played by a small stdlib HTTP server
scripted per test; everything else runs against the real application (live_server).
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from providers.client import (
    REPORTS_PATH,
    UsageClient,
    UsageDeliveryError,
    UsageReportRejected,
    window_around,
)

ACCEPTED = {
    "report_id": "r-1",
    "status": "accepted",
    "hold_reason": "",
    "records": {"received": 2, "accepted": 2, "duplicate": 0, "conflict": 0},
    "received_at": "2026-11-22T10:06:00Z",
}


def _records(count: int = 2, *, prefix: str = "req") -> list[dict[str, Any]]:
    return [
        {
            "request_id": f"{prefix}-{index}",
            "enterprise": "acme",
            "model": "qwen3-235b-a22b",
            "occurred_at": f"2026-11-22T10:0{index % 5}:07Z",
            "input_tokens": 1200 + index,
            "output_tokens": 350,
            "cached_input_tokens": 800,
            "cache_write_tokens": 0,
            "reasoning_tokens": 0,
        }
        for index in range(count)
    ]


# --- a scripted stub server for transport behaviours ----------------------------------


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    client_port: int


@dataclass
class Script:
    """Answers to give, in order (the last one repeats), and the requests seen."""

    answers: list[tuple[int, dict[str, str], dict[str, Any]]]
    seen: list[Seen] = field(default_factory=list)
    seen_at: list[float] = field(default_factory=list)


def _handler(script: Script) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as gunicorn's threaded workers do

        def _answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            script.seen.append(
                Seen(self.command, self.path, dict(self.headers), body, self.client_address[1])
            )
            script.seen_at.append(time.monotonic())
            index = min(len(script.seen), len(script.answers)) - 1
            status, headers, payload = script.answers[index]
            data = json.dumps(payload).encode()
            self.send_response(status)
            for name, value in {**headers, "Content-Type": "application/json"}.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_POST = do_GET = _answer  # noqa: N815 (http.server's naming)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def stub() -> Iterator[tuple[ThreadingHTTPServer, Script]]:
    script = Script(answers=[(201, {}, ACCEPTED)])
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(script))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, script
    server.shutdown()
    server.server_close()


def _url(server: ThreadingHTTPServer) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}"


def test_503_is_retried_with_the_same_bytes_and_report_id(stub):
    server, script = stub
    script.answers = [(503, {}, {"code": "unavailable"}), (201, {}, ACCEPTED)]
    client = UsageClient(_url(server), "tlk_abc_secret", backoff_s=0.01)

    result = client.post(client.prepare_report(_records(), report_id="node-7-r1"))

    assert result.status == 201
    assert result.body == ACCEPTED
    assert result.attempts == 2
    assert [seen.path for seen in script.seen] == [REPORTS_PATH, REPORTS_PATH]
    assert script.seen[0].body == script.seen[1].body
    assert json.loads(script.seen[1].body)["report_id"] == "node-7-r1"
    assert script.seen[1].headers["Authorization"] == "Bearer tlk_abc_secret"


def test_429_waits_for_retry_after(stub):
    server, script = stub
    script.answers = [(429, {"Retry-After": "1"}, {"code": "rate_limited"}), (201, {}, ACCEPTED)]
    client = UsageClient(_url(server), "tlk_abc_secret", backoff_s=0.01, backoff_max_s=0.01)

    answer = client.send_report(_records())

    assert answer == ACCEPTED
    assert len(script.seen) == 2
    assert script.seen_at[1] - script.seen_at[0] >= 1.0
    assert script.seen[0].body == script.seen[1].body


def test_a_server_not_up_yet_is_retried_until_it_answers():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = Script(answers=[(201, {}, ACCEPTED)])
    server_box: list[ThreadingHTTPServer] = []

    def start_late() -> None:
        time.sleep(0.5)
        server = ThreadingHTTPServer(("127.0.0.1", port), _handler(script))
        server_box.append(server)
        server.serve_forever()

    threading.Thread(target=start_late, daemon=True).start()
    client = UsageClient(f"http://127.0.0.1:{port}", "tlk_abc_secret", backoff_s=0.1)
    try:
        result = client.post(client.prepare_report(_records(), report_id="node-7-r2"))
    finally:
        for server in server_box:
            server.shutdown()
            server.server_close()

    assert result.body == ACCEPTED
    assert result.attempts >= 2  # at least one attempt was refused
    assert len(script.seen) == 1
    assert json.loads(script.seen[0].body)["report_id"] == "node-7-r2"


def test_transient_failures_give_up_after_retries_max(stub):
    server, script = stub
    script.answers = [(502, {}, {"code": "bad_gateway"})]
    client = UsageClient(_url(server), "tlk_abc_secret", retries_max=2, backoff_s=0.01)

    with pytest.raises(UsageDeliveryError) as caught:
        client.send_report(_records())

    assert (caught.value.attempts, caught.value.status) == (3, 502)
    assert len(script.seen) == 3
    assert len({seen.body for seen in script.seen}) == 1


def test_reports_share_one_keep_alive_connection(stub):
    server, script = stub
    client = UsageClient(_url(server), "tlk_abc_secret")

    for _ in range(3):
        client.send_report(_records())

    assert len(script.seen) == 3
    assert len({seen.client_port for seen in script.seen}) == 1


def test_add_sends_full_batches_and_flush_the_rest(stub):
    server, script = stub
    client = UsageClient(_url(server), "tlk_abc_secret", records_per_report=2)

    answers = [client.add(record) for record in _records(5)]
    last = client.flush()

    assert answers == [None, ACCEPTED, None, ACCEPTED, None]
    assert last == ACCEPTED
    sent = [json.loads(seen.body) for seen in script.seen]
    assert [len(report["records"]) for report in sent] == [2, 2, 1]
    assert [report["totals"]["records"] for report in sent] == [2, 2, 1]
    assert len({report["report_id"] for report in sent}) == 3
    assert client.flush() is None


# --- building reports (no server) ----------------------------------------------------


def test_report_carries_window_rounded_outward_and_exact_totals():
    client = UsageClient("http://127.0.0.1:9", "tlk_abc_secret")
    records = _records(3)
    records[1]["occurred_at"] = "2026-11-22T10:04:00Z"  # on a minute boundary

    prepared = client.prepare_report(records, report_id="node-7-r3")
    document = json.loads(prepared.body)

    assert document["report_id"] == "node-7-r3"
    assert document["window"] == {"start": "2026-11-22T10:00:00Z", "end": "2026-11-22T10:05:00Z"}
    assert document["totals"] == {
        "records": 3,
        "input_tokens": 1200 + 1201 + 1202,
        "output_tokens": 1050,
        "cached_input_tokens": 2400,
        "cache_write_tokens": 0,
        "reasoning_tokens": 0,
    }
    assert document["records"] == records
    assert prepared.signature is None


def test_window_end_is_strictly_after_the_last_record():
    moment = datetime(2026, 11, 22, 10, 5, tzinfo=UTC)

    assert window_around([moment]) == {
        "start": "2026-11-22T10:05:00Z",
        "end": "2026-11-22T10:06:00Z",
    }


@pytest.mark.parametrize("value", [1.0, True, "12", -1])
def test_token_counts_must_be_non_negative_ints(value):
    client = UsageClient("http://127.0.0.1:9", "tlk_abc_secret")
    records = _records(2)
    records[1]["output_tokens"] = value

    with pytest.raises((TypeError, ValueError), match=r"records\[1\]\.output_tokens"):
        client.prepare_report(records)


def test_signed_report_signature_covers_the_exact_body():
    private_key = Ed25519PrivateKey.generate()
    raw = private_key.private_bytes(
        serialization.Encoding.Raw,
        serialization.PrivateFormat.Raw,
        serialization.NoEncryption(),
    )
    client = UsageClient("http://127.0.0.1:9", "tlk_abc_secret", signing_key=raw)

    prepared = client.prepare_report(_records())

    assert prepared.signature is not None
    scheme, _, encoded = prepared.signature.partition("=")
    assert scheme == "ed25519"
    private_key.public_key().verify(base64.b64decode(encoded), prepared.body)  # no raise


def test_rejected_is_typed_with_status_and_code():
    error = UsageReportRejected(409, {"code": "report_conflict", "message": "differs"})

    assert (error.status, error.code) == (409, "report_conflict")
    assert str(error) == "HTTP 409 report_conflict: differs"


# --- against the real application (live_server) --------------------------------------


def _live_records(count: int, *, prefix: str) -> list[dict[str, Any]]:
    """Return `count` records that happened in the last few minutes."""
    moment = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=3)
    return [
        {**record, "occurred_at": moment + timedelta(seconds=index)}
        for index, record in enumerate(_records(count, prefix=prefix))
    ]


def _node_key(*, provider: str = "qwenhost", node: str = "fra-1", public_key_b64: str = ""):
    from providers import services

    owner = services.provider_get_or_create(slug=provider)
    inference_node = services.inference_node_get_or_create(provider=owner, name=node)
    if public_key_b64:
        services.inference_node_public_key_set(node=inference_node, public_key_b64=public_key_b64)
    _, key_text = services.node_key_create(node=inference_node)
    return key_text


def _stored_request_ids() -> list[str]:
    from providers.models import UsageRecord

    return sorted(UsageRecord.objects.values_list("request_id", flat=True))


@pytest.mark.django_db(transaction=True)
def test_live_report_is_accepted_and_stored(live_server):
    client = UsageClient(live_server.url, _node_key(), report_id_prefix="qwenhost-fra-1")
    records = _live_records(3, prefix="live-a")

    answer = client.send_report(records, report_id="qwenhost-fra-1-a")

    assert answer["report_id"] == "qwenhost-fra-1-a"
    assert answer["status"] == "accepted"
    assert answer["hold_reason"] is None
    assert answer["records"] == {"received": 3, "accepted": 3, "duplicate": 0, "conflict": 0}
    assert _stored_request_ids() == ["live-a-0", "live-a-1", "live-a-2"]
    status = client.report_status("qwenhost-fra-1-a")
    assert (status["status"], status["records"]) == ("accepted", answer["records"])


@pytest.mark.django_db(transaction=True)
def test_live_replay_gets_the_first_answer_and_stores_nothing(live_server):
    client = UsageClient(live_server.url, _node_key())
    prepared = client.prepare_report(_live_records(2, prefix="live-b"))

    first = client.post(prepared)
    again = client.post(prepared)

    assert (first.status, again.status) == (201, 200)
    assert again.replayed
    assert again.body == first.body
    assert _stored_request_ids() == ["live-b-0", "live-b-1"]


@pytest.mark.django_db(transaction=True)
def test_live_duplicate_request_in_a_new_report_is_counted_not_stored_twice(live_server):
    client = UsageClient(live_server.url, _node_key())
    records = _live_records(2, prefix="live-c")
    client.send_report(records[:1])

    answer = client.send_report(records)

    assert answer["records"] == {"received": 2, "accepted": 1, "duplicate": 1, "conflict": 0}
    assert _stored_request_ids() == ["live-c-0", "live-c-1"]


@pytest.mark.django_db(transaction=True)
def test_live_same_report_id_with_other_content_is_a_conflict(live_server):
    client = UsageClient(live_server.url, _node_key())
    client.send_report(_live_records(1, prefix="live-d"), report_id="qwenhost-fra-1-d")

    with pytest.raises(UsageReportRejected) as caught:
        client.send_report(_live_records(2, prefix="live-d"), report_id="qwenhost-fra-1-d")

    assert (caught.value.status, caught.value.code) == (409, "report_conflict")
    assert _stored_request_ids() == ["live-d-0"]


@pytest.mark.django_db(transaction=True)
def test_live_invalid_report_raises_at_once_with_field_paths(live_server):
    client = UsageClient(live_server.url, _node_key(), backoff_s=5)
    records = _live_records(2, prefix="live-e")
    records[1]["colour"] = "blue"
    started = time.monotonic()

    with pytest.raises(UsageReportRejected) as caught:
        client.send_report(records)

    assert time.monotonic() - started < 5  # not retried
    assert (caught.value.status, caught.value.code) == (400, "invalid")
    paths = [field["path"] for field in caught.value.body["extra"]["fields"]]
    assert any(path.startswith("$.records[1]") for path in paths), paths
    assert _stored_request_ids() == []


@pytest.mark.django_db(transaction=True)
def test_live_bad_key_is_rejected_with_its_code(live_server):
    _node_key()
    client = UsageClient(live_server.url, "tlk_00000000_not-a-real-secret")

    with pytest.raises(UsageReportRejected) as caught:
        client.send_report(_live_records(1, prefix="live-f"))

    assert (caught.value.status, caught.value.code) == (401, "invalid_key")


@pytest.mark.django_db(transaction=True)
def test_live_signed_report_is_accepted_when_the_node_registered_its_key(live_server):
    from providers.models import UsageReport

    private_key = Ed25519PrivateKey.generate()
    public_key_b64 = base64.b64encode(private_key.public_key().public_bytes_raw()).decode()
    key_text = _node_key(public_key_b64=public_key_b64)
    pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    signed = UsageClient(live_server.url, key_text, signing_key=pem)
    unsigned = UsageClient(live_server.url, key_text)

    answer = signed.send_report(_live_records(2, prefix="live-g"), report_id="signed-1")
    with pytest.raises(UsageReportRejected) as caught:
        unsigned.send_report(_live_records(1, prefix="live-h"))

    assert answer["records"]["accepted"] == 2
    report = UsageReport.objects.get(report_id="signed-1")
    assert report.signed
    assert (caught.value.status, caught.value.code) == (401, "signature_required")
    assert _stored_request_ids() == ["live-g-0", "live-g-1"]
