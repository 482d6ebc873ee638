"""The books in the admin: read-only pages, the journal export, closing a period."""

import csv
import io
from datetime import UTC, datetime

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
