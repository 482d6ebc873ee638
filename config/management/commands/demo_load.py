"""`manage.py demo_load`: a small demo data set; idempotent, any DATABASE_URL."""

from typing import Any

from django.contrib.auth.models import Group, Permission
from django.core.management.base import BaseCommand
from django.db import transaction

from billing.demo import demo_load as books_demo_load

DEMO_USER = "demo-finance"
DEMO_GROUP = "Finance (demo)"


def _demo_staff() -> None:
    from django.contrib.auth import get_user_model

    group, _ = Group.objects.get_or_create(name=DEMO_GROUP)
    group.permissions.set(
        Permission.objects.filter(content_type__app_label__in=["ledger", "providers"])
    )
    user_model = get_user_model()
    user = user_model.objects.filter(username=DEMO_USER).first()
    if user is None:
        user = user_model.objects.create_user(DEMO_USER, password=DEMO_USER, is_staff=True)
    user.groups.add(group)


class Command(BaseCommand):
    help = "Load the demo data set (staff login, books, providers). Loading twice changes nothing."

    def handle(self, *args: Any, **options: Any) -> None:
        with transaction.atomic():
            _demo_staff()
        books_demo_load()
        try:
            from providers.demo import demo_load as providers_demo_load
        except ImportError:  # pragma: no cover - present once ingestion lands
            providers_demo_load = None
        if providers_demo_load is not None:
            providers_demo_load()
        self.stdout.write(f"Demo data loaded. Admin login: {DEMO_USER} / {DEMO_USER}")
