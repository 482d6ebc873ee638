"""Who may post and read reports: keys, revocation, other providers, signatures, rate limit."""

from __future__ import annotations

import base64

import pytest
from django.test import Client

from providers.models import InferenceNode, NodeApiKey, UsageConflict, UsageRecord, UsageReport
from providers.services import inference_node_public_key_set, node_key_revoke
from tests.providers import factories

pytestmark = pytest.mark.django_db


def stored() -> tuple[int, int, int]:
    return (
        UsageReport.objects.count(),
        UsageRecord.objects.count(),
        UsageConflict.objects.count(),
    )


def assert_refused(response, status: int, code: str, message: str) -> None:
    assert response.status_code == status, response.content
    assert response.json() == {"code": code, "message": message, "extra": {"retryable": False}}
    assert stored() == (0, 0, 0)


def test_no_key_is_401_not_authenticated(post) -> None:
    response = post(factories.report_make(1), key=None)

    assert_refused(
        response,
        401,
        "not_authenticated",
        "Send the node's API key as `Authorization: Bearer tlk_<prefix>_<secret>`.",
    )
    assert response["WWW-Authenticate"] == 'Bearer realm="tokenledger"'


def test_another_scheme_is_401_not_authenticated(post, key_text: str) -> None:
    response = post(factories.report_make(1), HTTP_AUTHORIZATION=f"Token {key_text}")

    assert response.status_code == 401
    assert response.json()["code"] == "not_authenticated"


def test_a_wrong_secret_is_401_invalid_key(post, key_text: str) -> None:
    response = post(factories.report_make(1), key=key_text[:-2] + "xx")

    assert_refused(response, 401, "invalid_key", "The API key is not valid.")


def test_an_unknown_prefix_is_401_invalid_key(post) -> None:
    response = post(factories.report_make(1), key="tlk_00000000_" + "a" * 43)

    assert_refused(response, 401, "invalid_key", "The API key is not valid.")


def test_a_malformed_key_is_401_invalid_key(post) -> None:
    response = post(factories.report_make(1), key="sk-something")

    assert_refused(
        response, 401, "invalid_key", "The API key is malformed; expected tlk_<prefix>_<secret>."
    )


def test_a_revoked_key_is_refused_at_once(post, key_pair: tuple[NodeApiKey, str]) -> None:
    key, _ = key_pair
    assert post(factories.report_make(1)).status_code == 201
    node_key_revoke(key=key)

    response = post(factories.report_make(1, report_id="report-2", first=5))

    assert response.status_code == 401
    assert response.json() == {
        "code": "invalid_key",
        "message": "The API key was revoked.",
        "extra": {"retryable": False},
    }
    assert stored() == (1, 1, 0)


def test_a_key_records_its_last_use_at_most_once_a_minute(post, key_pair) -> None:
    key, _ = key_pair
    assert key.last_used_at is None
    post(factories.report_make(1))
    key.refresh_from_db()
    first_use = key.last_used_at
    assert first_use is not None

    post(factories.report_make(1, report_id="report-2"))

    key.refresh_from_db()
    assert key.last_used_at == first_use


def test_the_key_format_is_tlk_prefix_secret(key_pair) -> None:
    key, key_text = key_pair
    prefix = f"tlk_{key.prefix}_"
    assert key_text.startswith(prefix)
    assert len(key.prefix) == 8
    assert len(key_text) - len(prefix) >= 43  # 32 random bytes, base64url
    assert key.secret_sha256 not in key_text


# --- reading a report ---------------------------------------------------------


def test_a_node_reads_its_report_status(post, key_text: str) -> None:
    first = post(factories.report_make(3, totals=True)).json()
    report = factories.report_make(3)

    response = Client().get(
        f"{factories.REPORTS_URL}/report-1", HTTP_AUTHORIZATION=f"Bearer {key_text}"
    )

    assert response.status_code == 200
    assert response.json() == {
        **first,
        "window": report["window"],
        "signed": False,
    }


def test_another_node_of_the_provider_reads_the_report(post, node: InferenceNode) -> None:
    post(factories.report_make(1))
    _, other_key = factories.key_make(factories.node_make(node.provider, "node-2"))

    response = Client().get(
        f"{factories.REPORTS_URL}/report-1", HTTP_AUTHORIZATION=f"Bearer {other_key}"
    )

    assert response.status_code == 200


def test_another_providers_key_gets_404_like_an_unknown_report(post) -> None:
    post(factories.report_make(1))
    _, foreign_key = factories.key_make(factories.node_make(factories.provider_make("other")))
    client = Client()

    foreign = client.get(
        f"{factories.REPORTS_URL}/report-1", HTTP_AUTHORIZATION=f"Bearer {foreign_key}"
    )
    unknown = client.get(
        f"{factories.REPORTS_URL}/report-9", HTTP_AUTHORIZATION=f"Bearer {foreign_key}"
    )

    assert foreign.status_code == unknown.status_code == 404
    assert foreign.json() == {
        "code": "not_found",
        "message": "No report 'report-1' for this provider.",
        "extra": {"retryable": False},
    }
    assert unknown.json()["code"] == "not_found"


def test_reading_without_a_key_is_401(post) -> None:
    response = Client().get(f"{factories.REPORTS_URL}/report-1")

    assert response.status_code == 401
    assert response.json()["code"] == "not_authenticated"


def test_the_same_report_id_of_two_providers_are_two_reports(post) -> None:
    post(factories.report_make(1))
    _, foreign_key = factories.key_make(factories.node_make(factories.provider_make("other")))

    response = post(factories.report_make(1), key=foreign_key)

    assert response.status_code == 201
    assert response.json()["records"]["accepted"] == 1
    assert stored() == (2, 2, 0)


# --- signatures -----------------------------------------------------------------


@pytest.fixture
def signing_key(node: InferenceNode):
    private, public_b64 = factories.signing_key_make()
    inference_node_public_key_set(node=node, public_key_b64=public_b64)
    return private


def test_a_good_signature_is_verified_and_stored(post, signing_key) -> None:
    body = factories.body_of(factories.report_make(2))
    signature = factories.sign(signing_key, body)

    response = post(body, HTTP_TOKENLEDGER_SIGNATURE=signature)

    assert response.status_code == 201, response.content
    report = UsageReport.objects.get()
    assert report.signed is True
    assert report.signature == signature.removeprefix("ed25519=")
    assert bytes(report.signed_body) == body
    signing_key.public_key().verify(base64.b64decode(report.signature), bytes(report.signed_body))


def test_a_missing_signature_is_401_signature_required(post, signing_key) -> None:
    response = post(factories.report_make(2))

    assert_refused(
        response,
        401,
        "signature_required",
        "This node registered a public key: every report must carry the header "
        "Tokenledger-Signature: ed25519=<base64 signature of the exact body>.",
    )


def test_a_signature_over_other_bytes_is_401_signature_invalid(post, signing_key) -> None:
    body = factories.body_of(factories.report_make(2))
    signature = factories.sign(signing_key, body + b" ")

    response = post(body, HTTP_TOKENLEDGER_SIGNATURE=signature)

    assert_refused(
        response,
        401,
        "signature_invalid",
        "The signature does not verify against this node's public key and the exact request body.",
    )


def test_a_signature_by_another_key_is_401_signature_invalid(post, signing_key) -> None:
    body = factories.body_of(factories.report_make(2))
    other, _ = factories.signing_key_make()

    response = post(body, HTTP_TOKENLEDGER_SIGNATURE=factories.sign(other, body))

    assert response.status_code == 401
    assert response.json()["code"] == "signature_invalid"
    assert stored() == (0, 0, 0)


@pytest.mark.parametrize("header", ["ed25519=not base64!", "rsa=AAAA", "ed25519="])
def test_a_garbled_signature_header_is_401_signature_invalid(post, signing_key, header) -> None:
    response = post(factories.report_make(1), HTTP_TOKENLEDGER_SIGNATURE=header)

    assert response.status_code == 401
    assert response.json()["code"] == "signature_invalid"
    assert stored() == (0, 0, 0)


def test_a_signature_from_a_node_without_a_key_is_refused(post) -> None:
    body = factories.body_of(factories.report_make(1))
    private, _ = factories.signing_key_make()

    response = post(body, HTTP_TOKENLEDGER_SIGNATURE=factories.sign(private, body))

    assert response.status_code == 401
    assert response.json()["code"] == "signature_invalid"
    assert stored() == (0, 0, 0)


# --- rate limit -----------------------------------------------------------------


def test_a_key_over_its_rate_is_429_with_retry_after(post, settings) -> None:
    settings.USAGE_REPORTS_PER_MINUTE_PER_KEY = 0

    response = post(factories.report_make(1))

    assert response.status_code == 429
    retry_after_s = int(response["Retry-After"])
    assert 1 <= retry_after_s <= 60
    assert response.json() == {
        "code": "rate_limited",
        "message": f"This key may send 0 reports per minute; retry after {retry_after_s} s.",
        "extra": {"retry_after_s": retry_after_s, "retryable": True},
    }
    assert stored() == (0, 0, 0)


def test_the_rate_is_counted_per_key(post, settings, node) -> None:
    settings.USAGE_REPORTS_PER_MINUTE_PER_KEY = 2
    statuses = [
        post(factories.report_make(1, report_id=f"r-{index}", first=index)).status_code
        for index in range(3)
    ]
    _, other_key = factories.key_make(node)

    other = post(factories.report_make(1, report_id="r-9", first=9), key=other_key)

    assert statuses == [201, 201, 429]
    assert other.status_code == 201
    assert stored() == (3, 3, 0)


@pytest.mark.parametrize("report_id", ["bad%00id", "bad%0A", "x" * 129])
def test_an_id_that_cannot_exist_is_404(key_text: str, report_id: str) -> None:
    response = Client().get(
        f"{factories.REPORTS_URL}/{report_id}", HTTP_AUTHORIZATION=f"Bearer {key_text}"
    )

    assert response.status_code == 404
    assert response.json()["code"] == "not_found"
