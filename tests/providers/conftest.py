"""Fixtures of the providers tests: a provider with a node and a key, and a poster."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from django.test import Client

from providers.models import InferenceNode, NodeApiKey
from tests.providers import factories


@pytest.fixture
def node(db: None) -> InferenceNode:
    return factories.node_make(factories.provider_make())


@pytest.fixture
def key_pair(node: InferenceNode) -> tuple[NodeApiKey, str]:
    return factories.key_make(node)


@pytest.fixture
def key_text(key_pair: tuple[NodeApiKey, str]) -> str:
    return key_pair[1]


Poster = Callable[..., Any]


@pytest.fixture
def post(key_text: str) -> Poster:
    """Return post(report_or_bytes, key=..., **headers) -> response, over the real stack."""
    client = Client()

    def _post(report: dict[str, Any] | bytes, *, key: str | None = key_text, **headers: str):
        body = report if isinstance(report, bytes) else factories.body_of(report)
        if key is not None:
            headers.setdefault("HTTP_AUTHORIZATION", f"Bearer {key}")
        headers.setdefault("content_type", "application/json")
        return client.post(factories.REPORTS_URL, data=body, **headers)

    return _post
