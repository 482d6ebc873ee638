"""The periodic task that opens periods ahead: idempotent by construction."""

import pytest
from django.utils import timezone

from ledger.models import Period
from ledger.tasks import periods_open_ahead


@pytest.mark.django_db
def test_periods_open_ahead_opens_this_and_next_months_once():
    now = timezone.now()
    first = periods_open_ahead()
    second = periods_open_ahead()
    assert first == second
    assert first[0] == f"{now:%Y-%m}"
    assert len(first) == 3
    assert Period.objects.count() == 3
    assert set(Period.objects.values_list("status", flat=True)) == {"open"}
