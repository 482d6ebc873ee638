"""`manage.py node_key_create <provider> <node>`: create a node API key and print it once."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.db import transaction

from providers.services import (
    inference_node_get_or_create,
    node_key_create,
    provider_get_or_create,
)


class Command(BaseCommand):
    help = (
        "Create an API key for node <node> of provider <provider> (both created when "
        "missing) and print it. The key is shown only this once."
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("provider", help="provider slug")
        parser.add_argument("node", help="node name")

    def handle(self, *args: Any, **options: Any) -> None:
        with transaction.atomic():
            provider = provider_get_or_create(slug=options["provider"])
            node = inference_node_get_or_create(provider=provider, name=options["node"])
            key, key_text = node_key_create(node=node)
        self.stderr.write(f"Created key {key.prefix} for {node}; it is not shown again.")
        self.stdout.write(key_text)
