"""The admin: keys shown once, revocation, and usage that cannot be edited."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.contrib.auth.models import Permission
from django.test import Client

from providers.models import NodeApiKey, UsageRecord, UsageReport
from providers.services import node_key_authenticate
from tests.providers import factories

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff() -> Client:
    user = get_user_model().objects.create_superuser("finance", "f@example.com", "pw")
    client = Client()
    client.force_login(user)
    return client


def test_creating_a_key_shows_the_secret_once(staff: Client, node) -> None:
    response = staff.post("/admin/providers/nodeapikey/add/", {"node": node.pk}, follow=True)

    assert response.status_code == 200
    shown = [str(m) for m in response.context["messages"] if str(m).startswith("New key")]
    assert len(shown) == 1
    key_text = shown[0].split(": ", 1)[1].split(" ")[0]
    key = node_key_authenticate(key_text=key_text)
    assert key.node == node
    assert NodeApiKey.objects.count() == 1
    page = staff.get(f"/admin/providers/nodeapikey/{key.pk}/change/")
    assert key_text not in page.content.decode()


def test_the_revoke_action_refuses_the_key_at_once(staff: Client, post, key_pair) -> None:
    key, _ = key_pair

    staff.post(
        "/admin/providers/nodeapikey/",
        {"action": "revoke", "_selected_action": [key.pk]},
    )

    key.refresh_from_db()
    assert key.revoked_at is not None
    assert post(factories.report_make(1)).json()["code"] == "invalid_key"


def test_the_revoke_action_needs_the_change_permission(post, key_pair) -> None:
    key, _ = key_pair
    viewer = get_user_model().objects.create_user("auditor", password="pw", is_staff=True)
    viewer.user_permissions.set(Permission.objects.filter(codename="view_nodeapikey"))
    client = Client()
    client.force_login(viewer)

    page = client.get("/admin/providers/nodeapikey/")
    client.post("/admin/providers/nodeapikey/", {"action": "revoke", "_selected_action": [key.pk]})

    assert page.status_code == 200
    assert b'value="revoke"' not in page.content
    key.refresh_from_db()
    assert key.revoked_at is None
    assert post(factories.report_make(1)).status_code == 201  # the key still works


def test_usage_pages_show_and_never_edit(staff: Client, post) -> None:
    post(factories.report_make(3))
    report = UsageReport.objects.get()
    record = UsageRecord.objects.first()

    for url in [
        "/admin/providers/provider/",
        "/admin/providers/inferencenode/",
        "/admin/providers/nodeapikey/",
        "/admin/providers/usagereport/",
        f"/admin/providers/usagereport/{report.pk}/change/",
        "/admin/providers/usagerecord/",
        f"/admin/providers/usagerecord/{record.pk}/change/",
        "/admin/providers/usageconflict/",
    ]:
        assert staff.get(url).status_code == 200, url
    assert b"req-0" in staff.get(f"/admin/providers/usagereport/{report.pk}/change/").content

    edit = staff.post(f"/admin/providers/usagerecord/{record.pk}/change/", {"input_tokens": 1})
    assert edit.status_code == 403
    assert staff.get("/admin/providers/usagerecord/add/").status_code == 403
    record.refresh_from_db()
    assert record.input_tokens == 1200


def test_records_export_through_the_resource(post) -> None:
    from providers.resources import UsageRecordResource

    post(factories.report_make(2))

    dataset = UsageRecordResource().export()

    assert dataset.headers[:4] == ["id", "provider", "node", "report_id"]
    assert [row[4] for row in dataset] == ["req-0", "req-1"]
    assert dataset[0][1:4] == ("acme-gpu", "node-1", "report-1")
