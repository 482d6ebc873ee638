"""Shared fixtures. Tests run on real PostgreSQL (DATABASE_URL or the embedded one)."""

import os

import pytest


@pytest.fixture(scope="session")
def django_db_modify_db_settings(django_db_modify_db_settings_parallel_suffix: None) -> None:
    """Give each test run its own database, so runs on one server never collide."""
    from django.conf import settings

    test = settings.DATABASES["default"].setdefault("TEST", {})
    test["NAME"] = f"{test.get('NAME') or 'test_tokenledger'}_{os.getpid()}"


@pytest.fixture(scope="session", autouse=True)
def collected_static(tmp_path_factory: pytest.TempPathFactory) -> object:
    """Collect the static files once, as `make run` does, for WhiteNoise to serve."""
    from django.conf import settings
    from django.core.management import call_command

    root = tmp_path_factory.mktemp("static")
    settings.STATIC_ROOT = root
    call_command("collectstatic", "--no-input", verbosity=0)
    return root
