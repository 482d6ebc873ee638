"""`bench ingest` at a small size: the whole stack runs and every figure is present.

No timing is asserted: this machine's speed is not a property of the code. The run
itself asserts correctness (records committed == records sent; replays all 200).
"""

import os
from typing import Any

import pytest
from django.conf import settings
from django.db import connection

from providers import bench

SMALL = {
    "records": 2_500,
    "clients": 2,
    "workers": 1,
    "threads": 1,
    "records_per_report": 500,
    "enterprises": 50,
    "seed": 1,
    "no_debug": False,
    "keep": False,
}


@pytest.mark.slow
def test_bench_ingest_reports_every_figure(
    django_db_blocker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A scratch name of our own: `bench` drops `<name>_bench` when it starts.
    name = f"test_ingest_bench_{os.getpid()}"
    monkeypatch.setitem(settings.DATABASES["default"], "NAME", name)
    monkeypatch.setitem(connection.settings_dict, "NAME", name)

    with django_db_blocker.unblock():
        figures = bench.run(SMALL)

    assert figures["records"] == figures["records_committed"] == 2_500
    assert figures["reports"] == 6  # 1,250 records per client: 500 + 500 + 250
    assert (figures["clients"], figures["gunicorn_workers"]) == (2, 1)
    assert figures["reports_retried"] == 0
    for key in ("records_per_s", "replay_records_per_s"):
        assert isinstance(figures[key], int), key
        assert figures[key] > 0, key
    for key in ("p50_ms", "p99_ms", "replay_p50_ms", "replay_p99_ms", "client_serialise_ms_p50"):
        assert isinstance(figures[key], float), key
        assert figures[key] > 0, key
    assert figures["p50_ms"] <= figures["p99_ms"] <= figures["max_ms"]
    assert set(figures["cpu_s"]) == {
        "clients", "gunicorn", "postgres_backends", "postgres_background",
        "other_work_on_machine", "idle",
    }  # fmt: skip
    assert figures["server_in_process_ms"]["reports"] == bench.IN_PROCESS_REPORTS
