"""Demo providers and nodes for `make run`: created idempotently, shared with billing's demo.

`demo_load()` is called by the project's `demo_load` command; running it again changes
nothing. The names below are what the simulated node (`manage.py demo_node`) reports,
so billing's demo data can price the same models for the same enterprises.

The demo node signs its reports. Its Ed25519 key is derived from SECRET_KEY (demo
only: a real node generates its key and keeps the private half on the node), so the
registered public key stays the same across runs and every signature already stored
keeps verifying.
"""

from __future__ import annotations

import hashlib
import hmac
from base64 import b64encode
from dataclasses import dataclass

from django.conf import settings
from django.db import transaction

from providers import services
from providers.models import InferenceNode, Provider


@dataclass(frozen=True)
class DemoProvider:
    slug: str
    name: str
    nodes: tuple[str, ...]


# The same provider slugs as the demo books (billing/demo.py).
DEMO_PROVIDERS = (
    DemoProvider(slug="qwenhost", name="Qwenhost", nodes=("fra-1", "sjc-1")),
    DemoProvider(slug="llamaworks", name="Llamaworks", nodes=("ams-1",)),
)
# The node `demo_node` posts as (it signs), and what it reports.
DEMO_NODE_PROVIDER = "qwenhost"
DEMO_NODE_NAME = "fra-1"
DEMO_ENTERPRISES = ("acme", "globex", "initech")
DEMO_MODELS = ("qwen3-235b-a22b", "llama-4-maverick", "deepseek-v3.2", "gpt-oss-120b")


def demo_signing_key_bytes(*, provider: str, node: str) -> bytes:
    """Return the demo node's Ed25519 private key (32 raw bytes), derived from SECRET_KEY."""
    message = f"tokenledger-demo-node-signing-key:{provider}/{node}".encode()
    return hmac.new(settings.SECRET_KEY.encode(), message, hashlib.sha256).digest()


def demo_public_key_b64(*, provider: str, node: str) -> str:
    """Return the public half of `demo_signing_key_bytes`, as the node model stores it."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    private_key = Ed25519PrivateKey.from_private_bytes(
        demo_signing_key_bytes(provider=provider, node=node)
    )
    return b64encode(private_key.public_key().public_bytes_raw()).decode()


def demo_node_get_or_create() -> InferenceNode:
    """Return the node demo_node posts as, with its public key registered."""
    provider = services.provider_get_or_create(
        slug=DEMO_NODE_PROVIDER,
        name=next(p.name for p in DEMO_PROVIDERS if p.slug == DEMO_NODE_PROVIDER),
    )
    node = services.inference_node_get_or_create(provider=provider, name=DEMO_NODE_NAME)
    public_key_b64 = demo_public_key_b64(provider=DEMO_NODE_PROVIDER, node=DEMO_NODE_NAME)
    if node.public_key_ed25519 != public_key_b64:
        node = services.inference_node_public_key_set(node=node, public_key_b64=public_key_b64)
    return node


@transaction.atomic
def demo_load() -> list[Provider]:
    """Create the demo providers and their nodes when missing; return the providers.

    Idempotent: a second run finds everything in place and writes nothing. API keys are
    not created here (a key is shown once); `demo_node` makes its own.
    """
    providers = []
    for demo in DEMO_PROVIDERS:
        provider = services.provider_get_or_create(slug=demo.slug, name=demo.name)
        for node_name in demo.nodes:
            services.inference_node_get_or_create(provider=provider, name=node_name)
        providers.append(provider)
    demo_node_get_or_create()
    return providers
