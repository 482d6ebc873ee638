"""Test data for the providers app: providers, nodes, keys and report bodies."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from providers.models import InferenceNode, NodeApiKey, Provider
from providers.services import (
    inference_node_get_or_create,
    node_key_create,
    provider_get_or_create,
)

REPORTS_URL = "/api/v1/usage/reports"


def provider_make(slug: str = "acme-gpu") -> Provider:
    return provider_get_or_create(slug=slug)


def node_make(provider: Provider, name: str = "node-1") -> InferenceNode:
    return inference_node_get_or_create(provider=provider, name=name)


def key_make(node: InferenceNode) -> tuple[NodeApiKey, str]:
    return node_key_create(node=node)


def signing_key_make() -> tuple[Ed25519PrivateKey, str]:
    """Return a private key and its public key as the node registers it."""
    private = Ed25519PrivateKey.generate()
    return private, base64.b64encode(private.public_key().public_bytes_raw()).decode()


def sign(private: Ed25519PrivateKey, body: bytes) -> str:
    return "ed25519=" + base64.b64encode(private.sign(body)).decode()


def window_recent() -> tuple[datetime, datetime]:
    """Return a five-minute window that ended a few minutes ago, on whole minutes."""
    end = datetime.now(UTC).replace(second=0, microsecond=0) - timedelta(minutes=5)
    return end - timedelta(minutes=5), end


def record_make(index: int, start: datetime, **overrides: Any) -> dict[str, Any]:
    record = {
        "request_id": f"req-{index}",
        "enterprise": "acme",
        "model": "qwen3-235b-a22b",
        "occurred_at": _iso(start + timedelta(seconds=index % 300)),
        "input_tokens": 1200 + index,
        "output_tokens": 350,
        "cached_input_tokens": 800,
        "cache_write_tokens": 0,
        "reasoning_tokens": 10,
    }
    record.update(overrides)
    return record


def report_make(
    count: int = 3, *, report_id: str = "report-1", first: int = 0, totals: bool = False
) -> dict[str, Any]:
    start, end = window_recent()
    records = [record_make(index, start) for index in range(first, first + count)]
    report: dict[str, Any] = {
        "report_id": report_id,
        "window": {"start": _iso(start), "end": _iso(end)},
        "records": records,
    }
    if totals:
        report["totals"] = {
            "records": count,
            "input_tokens": sum(r["input_tokens"] for r in records),
            "output_tokens": sum(r["output_tokens"] for r in records),
        }
    return report


def body_of(report: dict[str, Any]) -> bytes:
    return json.dumps(report).encode()


def _iso(moment: datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")
