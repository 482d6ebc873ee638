"""Node API key authentication, the node-only permission and the per-key rate limit."""

from __future__ import annotations

from typing import Any

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from rest_framework.authentication import BaseAuthentication
from rest_framework.permissions import BasePermission
from rest_framework.request import Request

from providers.exceptions import NotAuthenticatedError
from providers.models import NodeApiKey
from providers.services import node_key_authenticate


class NodeCaller:
    """The authenticated caller: a node, through one of its keys."""

    is_authenticated = True

    def __init__(self, key: NodeApiKey) -> None:
        self.key = key
        self.node = key.node
        self.provider = key.node.provider


class NodeKeyAuthentication(BaseAuthentication):
    """`Authorization: Bearer tlk_<prefix>_<secret>`; a missing header is refused here."""

    keyword = "Bearer"

    def authenticate(self, request: Request) -> tuple[NodeCaller, NodeApiKey]:
        header = request.META.get("HTTP_AUTHORIZATION", "")
        scheme, _, key_text = header.partition(" ")
        if scheme.lower() != "bearer" or not key_text.strip():
            raise NotAuthenticatedError(
                "Send the node's API key as `Authorization: Bearer tlk_<prefix>_<secret>`."
            )
        key = node_key_authenticate(key_text=key_text.strip())
        return NodeCaller(key), key

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="tokenledger"'


class IsNode(BasePermission):
    def has_permission(self, request: Request, view: Any) -> bool:
        return isinstance(request.user, NodeCaller)


class NodeKeyAuthenticationScheme(OpenApiAuthenticationExtension):
    target_class = "providers.auth.NodeKeyAuthentication"
    name = "nodeApiKey"

    def get_security_definition(self, auto_schema: Any) -> dict[str, str]:
        return {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "tlk_<prefix>_<secret>",
            "description": "A node API key, created by finance staff in the admin or with "
            "`manage.py node_key_create <provider> <node>`, shown once.",
        }
