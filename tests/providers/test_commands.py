"""manage.py node_key_create."""

from __future__ import annotations

from io import StringIO

import pytest
from django.core.management import call_command

from providers.models import InferenceNode, NodeApiKey, Provider
from providers.services import node_key_authenticate

pytestmark = pytest.mark.django_db


def _create(provider: str, node: str) -> str:
    out, err = StringIO(), StringIO()
    call_command("node_key_create", provider, node, stdout=out, stderr=err)
    assert "it is not shown again" in err.getvalue()
    return out.getvalue().strip()


def test_it_creates_provider_node_and_a_working_key() -> None:
    key_text = _create("acme-gpu", "node-7")

    key = node_key_authenticate(key_text=key_text)
    assert key.node.name == "node-7"
    assert key.node.provider.slug == "acme-gpu"
    assert key_text.startswith(f"tlk_{key.prefix}_")


def test_it_reuses_an_existing_provider_and_node() -> None:
    first = _create("acme-gpu", "node-7")
    second = _create("acme-gpu", "node-7")

    assert first != second
    assert (Provider.objects.count(), InferenceNode.objects.count()) == (1, 1)
    assert NodeApiKey.objects.count() == 2
    assert node_key_authenticate(key_text=first) != node_key_authenticate(key_text=second)
