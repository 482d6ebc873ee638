"""The books in the admin: read-only pages, the journal export, closing a period."""

import csv
import html
import io
import re
from datetime import UTC, datetime
from urllib.parse import parse_qs, urlsplit

import pytest
from django.contrib.auth.models import Permission, User

from ledger import services
from ledger.models import Period, PeriodStatus, Transaction
from ledger.services import Leg

SEPTEMBER = datetime(2026, 9, 10, tzinfo=UTC)


@pytest.fixture
def books(db):
    services.asset_create(code="USD", scale=2)
    services.account_open(code="platform:cash", kind="asset")
    services.account_open(code="enterprise:acme:credit", kind="liability")
    return services.transaction_post(
        idempotency_key="credit:acme:1",
        description="=HYPERLINK(evil) credit purchased",
        effective_at=SEPTEMBER,
        legs=[Leg("platform:cash", "USD", 12_345), Leg("enterprise:acme:credit", "USD", -12_345)],
    )


def _staff(*codenames: str) -> User:
    user = User.objects.create_user("clerk", password="pw", is_staff=True)
    user.user_permissions.set(
        Permission.objects.filter(content_type__app_label="ledger", codename__in=codenames)
    )
    return user


def test_account_page_shows_balances_read_only(client, books):
    client.force_login(_staff("view_account", "view_balance"))
    response = client.get("/admin/ledger/account/")
    assert response.status_code == 200
    assert b"enterprise:acme:credit" in response.content
    account_id = services.account_open(code="platform:cash", kind="asset").pk
    page = client.get(f"/admin/ledger/account/{account_id}/change/")
    assert page.status_code == 200
    assert b"123.45" in page.content
    assert b'name="_save"' not in page.content


def test_balance_list_shows_amounts_in_the_assets_units(client, books):
    client.force_login(_staff("view_balance"))
    page = client.get("/admin/ledger/balance/")
    assert page.status_code == 200
    cells = re.findall(rb'<td class="field-balance">([^<]*)</td>', page.content)
    assert sorted(cells) == [b"-123.45", b"123.45"]


def test_transaction_page_shows_postings_inline(client, books):
    client.force_login(_staff("view_transaction", "view_posting"))
    page = client.get(f"/admin/ledger/transaction/{books.transaction_id}/change/")
    assert page.status_code == 200
    assert b"credit:acme:1" in page.content
    assert page.content.count(b"123.45") == 2  # once debit, once credit


def test_journal_export_streams_every_posting_with_safe_cells(client, books):
    client.force_login(_staff("view_transaction"))
    response = client.get("/admin/ledger/transaction/journal.csv")
    assert response.status_code == 200
    rows = list(csv.reader(io.StringIO(b"".join(response.streaming_content).decode())))
    assert rows[0] == [
        "transaction_id",
        "idempotency_key",
        "effective_at",
        "account",
        "asset",
        "amount",
        "amount_decimal",
        "description",
    ]
    assert sorted((r[3], r[5], r[6]) for r in rows[1:]) == [
        ("enterprise:acme:credit", "-12345", "-123.45"),
        ("platform:cash", "12345", "123.45"),
    ]
    assert all(r[7] == "'=HYPERLINK(evil) credit purchased" for r in rows[1:])


def test_journal_export_filters_by_effective_time(client, books):
    client.force_login(_staff("view_transaction"))
    response = client.get(
        "/admin/ledger/transaction/journal.csv",
        {"since": "2026-10-01T00:00:00Z", "until": "2026-11-01T00:00:00Z"},
    )
    assert b"".join(response.streaming_content).decode().count("\n") == 1  # header only


def _export_link(page) -> str:
    """Return the href of the change list's "Export the journal" button."""
    match = re.search(rb'<a href="([^"]*)" class="viewlink">Export the journal', page.content)
    assert match, page.content.decode()[:2000]
    return html.unescape(match.group(1).decode())


def test_transaction_list_has_the_journal_export_button(client, books):
    client.force_login(_staff("view_transaction"))
    page = client.get("/admin/ledger/transaction/")
    assert page.status_code == 200
    assert _export_link(page) == "/admin/ledger/transaction/journal.csv"
    assert b"<title>Select transaction to view | Tokenledger finance</title>" in page.content
    assert b'<a href="/admin/">Tokenledger finance</a>' in page.content


def test_journal_export_button_follows_the_month_in_view(client, books):
    services.transaction_post(
        idempotency_key="credit:acme:2",
        description="credit purchased in October",
        effective_at=datetime(2026, 10, 1, tzinfo=UTC),
        legs=[Leg("platform:cash", "USD", 500), Leg("enterprise:acme:credit", "USD", -500)],
    )
    client.force_login(_staff("view_transaction"))
    page = client.get(
        "/admin/ledger/transaction/", {"effective_at__year": "2026", "effective_at__month": "9"}
    )
    link = _export_link(page)
    assert parse_qs(urlsplit(link).query) == {
        "since": ["2026-09-01T00:00:00+00:00"],
        "until": ["2026-10-01T00:00:00+00:00"],
    }
    assert (
        b"Export the journal (CSV), effective from 2026-09-01 00:00 to before 2026-10-01 00:00"
        b" (UTC)" in page.content
    )
    rows = list(csv.reader(io.StringIO(b"".join(client.get(link).streaming_content).decode())))
    assert {r[1] for r in rows[1:]} == {"credit:acme:1"}  # September's only, both legs
    assert len(rows) == 3

    december = _export_link(
        client.get(
            "/admin/ledger/transaction/",
            {"effective_at__year": "2026", "effective_at__month": "12"},
        )
    )
    assert parse_qs(urlsplit(december).query)["until"] == ["2027-01-01T00:00:00+00:00"]


def test_journal_export_button_follows_the_list_filter_within_the_hierarchy(client, books):
    client.force_login(_staff("view_transaction"))
    page = client.get(
        "/admin/ledger/transaction/",
        {
            "effective_at__gte": "2026-09-10 00:00:00+00:00",  # "By effective at"
            "effective_at__lt": "2026-11-01 00:00:00+00:00",
            "effective_at__year": "2026",  # the hierarchy narrows it to September
            "effective_at__month": "9",
        },
    )
    assert parse_qs(urlsplit(_export_link(page)).query) == {
        "since": ["2026-09-10T00:00:00+00:00"],
        "until": ["2026-10-01T00:00:00+00:00"],
    }


def test_journal_export_refuses_a_time_it_cannot_read(client, books):
    client.force_login(_staff("view_transaction"))
    for bad in ("yesterday", "2026-13-01T00:00:00Z"):
        response = client.get("/admin/ledger/transaction/journal.csv", {"since": bad})
        assert response.status_code == 400, bad


def test_journal_export_refused_without_view_permission(client, books):
    client.force_login(_staff())
    assert client.get("/admin/ledger/transaction/journal.csv").status_code == 403


def test_posted_transactions_cannot_be_added_or_deleted_in_admin(client, books):
    client.force_login(User.objects.create_superuser("root", password="pw"))
    assert client.get("/admin/ledger/transaction/add/").status_code == 403
    delete = client.get(f"/admin/ledger/transaction/{books.transaction_id}/delete/")
    assert delete.status_code == 403
    assert Transaction.objects.count() == 1


def test_close_period_action_records_who_and_needs_permission(client, books):
    period = services.period_open(year=2026, month=9)
    viewer = _staff("view_period")
    client.force_login(viewer)
    data = {"action": "close_periods", "_selected_action": [period.pk]}
    client.post("/admin/ledger/period/", data)
    assert Period.objects.get(pk=period.pk).status == PeriodStatus.OPEN

    closer = User.objects.create_user("controller", password="pw", is_staff=True)
    closer.user_permissions.set(
        Permission.objects.filter(codename__in=["view_period", "change_period"])
    )
    client.force_login(closer)
    response = client.post("/admin/ledger/period/", data, follow=True)
    assert response.status_code == 200
    period.refresh_from_db()
    assert period.status == PeriodStatus.CLOSED
    assert period.closed_by == closer
    assert period.closed_at is not None
