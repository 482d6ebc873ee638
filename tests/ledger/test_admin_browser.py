"""The finance workspace as a person uses it: headless Chromium against a live server.

Debian's chromium (`CHROMIUM`, default /usr/bin/chromium) driven by Playwright; no
browser is downloaded. CI installs it (.ci/run); a developer machine without it skips
these tests with that reason, and CI fails instead of skipping.
"""

from __future__ import annotations

import csv
import io
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from django.core.management import call_command
from django.db import connections
from playwright.sync_api import expect

from config.management.commands.demo_load import DEMO_USER
from ledger.models import Posting

CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
# What the machine allows a headless browser here: no sandbox as root, no network but
# loopback (background services would only fail to connect, many at a time).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
PAGE_TIMEOUT_MS = 15_000

pytestmark = pytest.mark.slow


@pytest.fixture
def browser_page(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    if not shutil.which(CHROMIUM):
        message = f"no Chromium at {CHROMIUM}: apt-get install chromium (or set CHROMIUM)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    # Playwright's sync API runs an event loop in this thread; the test's own ORM calls
    # are synchronous all the same (Django's documented escape for such callers). While
    # that loop runs, Django's connections are another set (asgiref keys them by context):
    # those are closed below, or the test database could not be dropped afterwards.
    monkeypatch.setenv("DJANGO_ALLOW_ASYNC_UNSAFE", "true")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(accept_downloads=True)
        page = context.new_page()
        page.set_default_timeout(PAGE_TIMEOUT_MS)
        try:
            yield page
        finally:
            try:
                context.close()
                browser.close()
            finally:  # while Playwright's loop is current: the connections it keyed
                connections.close_all()


@pytest.fixture
def demo_books(transactional_db: None) -> None:
    call_command("demo_load", stdout=io.StringIO())


def _log_in(page: Any, live_server: Any, *, password: str) -> None:
    """Fill the admin's login form as the demo's finance user, and send it."""
    page.goto(f"{live_server.url}/admin/")
    page.get_by_label("Username").fill(DEMO_USER)
    page.get_by_label("Password").fill(password)
    page.get_by_role("button", name="Log in").click()


def test_finance_clerk_logs_in_reads_the_books_and_exports_the_journal(
    demo_books: None, live_server: Any, browser_page: Any, tmp_path: Path
) -> None:
    page = browser_page
    _log_in(page, live_server, password=DEMO_USER)  # the demo password is the user name
    expect(page.locator("#site-name")).to_have_text("Tokenledger finance")

    page.get_by_role("link", name="Accounts").first.click()
    page.get_by_role("link", name="enterprise:acme:unbilled").click()
    # read-only: the balances are shown, nothing can be saved
    expect(page.locator("h1")).to_have_text("View account")
    expect(page.get_by_role("heading", name="Balances")).to_be_visible()
    expect(page.locator(".inline-group").first).to_contain_text("enterprise:acme:unbilled in USD")
    expect(page.locator('input[name="_save"]')).to_have_count(0)

    page.goto(f"{live_server.url}/admin/ledger/transaction/")
    with page.expect_download() as download_info:
        page.get_by_role("link", name="Export the journal (CSV)").click()
    download = download_info.value
    assert download.suggested_filename == "journal.csv"
    saved = tmp_path / "journal.csv"
    download.save_as(saved)
    with saved.open(newline="") as file:
        rows = list(csv.DictReader(file))

    # every posting of the books, and every asset sums to zero
    assert len(rows) == Posting.objects.count() > 0
    per_asset: Counter[str] = Counter()
    for row in rows:
        per_asset[row["asset"]] += int(row["amount"])
    assert set(per_asset.values()) == {0}, per_asset
    assert "enterprise:acme:unbilled" in {row["account"] for row in rows}

    # a month picked in the date hierarchy: the button exports that month only
    page.get_by_role("link", name="September 2026").click()
    button = page.get_by_role("link", name="Export the journal (CSV)")
    expect(button).to_have_text(
        "Export the journal (CSV), effective from 2026-09-01 00:00 to before 2026-10-01 00:00 (UTC)"
    )
    with page.expect_download() as download_info:
        button.click()
    download_info.value.save_as(saved)
    with saved.open(newline="") as file:
        september = list(csv.DictReader(file))
    expected = Posting.objects.filter(
        effective_at__gte=datetime(2026, 9, 1, tzinfo=UTC),
        effective_at__lt=datetime(2026, 10, 1, tzinfo=UTC),
    ).count()
    assert 0 < len(september) == expected < len(rows)
    assert {row["effective_at"][:7] for row in september} == {"2026-09"}


def test_wrong_password_is_refused_with_the_admins_message(
    demo_books: None, live_server: Any, browser_page: Any
) -> None:
    page = browser_page
    _log_in(page, live_server, password="not-the-password")
    expect(page.locator(".errornote")).to_contain_text(
        "Please enter the correct username and password for a staff account"
    )
    page.goto(f"{live_server.url}/admin/ledger/transaction/")
    expect(page).to_have_url(re.compile(r"/admin/login/\?next="))
