"""`bench ledger` at its smallest sizes: every figure is present and of a sane type.

No timing is asserted: this machine's speed is not a property of the code. The run
itself asserts correctness (balances equal postings, point-in-time checks).
"""

import os
from typing import Any

import psycopg
import pytest
from django.conf import settings
from django.db import connection

from config.scratch import _admin_conninfo
from ledger import bench

SMALL = {"single_tx": 20, "batched_tx": 1_500, "read_postings_small": 50,
         "read_postings": 300, "reads": 20, "duration_s": 0.5, "processes": 2}  # fmt: skip

RATES = ["post_tx_per_s", "post_tx_per_s_batched", "hot_account_tx_per_s", "read_build_tx_per_s",
         "baseline_commit_tx_per_s", "baseline_copy_tx_per_s", "baseline_psycopg_tx_per_s",
         "baseline_psycopg_hot_tx_per_s"]  # fmt: skip
LATENCIES_MS = [
    f"{kind}_{p}_ms{size}"
    for kind in ("balance_read", "pit_balance", "baseline_select1")
    for p in ("p50", "p99")
    for size in ("_10k", "_1m")
] + ["balance_read_p99_ms", "pit_balance_p99_ms", "hot_account_latency_ms_p50",
     "hot_account_latency_ms_p99"]  # fmt: skip
METHODS = ["post_method", "post_batched_method", "hot_account_method", "read_method",
           "baseline_method", "baseline_copy_method", "baseline_psycopg_method",
           "baseline_psycopg_hot_method", "settle_method"]  # fmt: skip
PHASES = {"baseline_commit", "single", "batched", "hot_baseline_psycopg", "hot", "reads_10k",
          "reads_1m"}  # fmt: skip


@pytest.mark.slow
def test_bench_ledger_reports_every_figure(
    django_db_blocker: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A scratch name of our own: `bench` drops `<name>_bench` when it starts, and
    # another run (or test) on the same server must not lose its database to us.
    name = f"test_ledger_bench_{os.getpid()}"
    monkeypatch.setitem(settings.DATABASES["default"], "NAME", name)
    monkeypatch.setitem(connection.settings_dict, "NAME", name)

    with django_db_blocker.unblock():
        figures = bench.run({"quick": True, "keep": False, **SMALL})

    for key in RATES:
        assert isinstance(figures[key], int), key
        assert figures[key] > 0, key
    for key in LATENCIES_MS:
        assert isinstance(figures[key], float), key
        assert figures[key] >= 0, key
    for key in METHODS:
        assert isinstance(figures[key], str), key
        assert figures[key], key
    assert figures["hot_account_errors"] == 0, figures["hot_account_error_samples"]
    assert figures["post_tx_count"] == 20
    assert figures["post_tx_batched_count"] == 1_500
    assert figures["read_postings_10k"] == 50
    assert figures["read_postings_1m"] == 300
    assert figures["balance_read_p99_ms"] == figures["balance_read_p99_ms_1m"]
    assert figures["pit_balance_p99_ms"] == figures["pit_balance_p99_ms_1m"]
    assert figures["balances_consistent"] is True
    assert figures["baseline_copy_consistent"] is True
    assert figures["baseline_psycopg_consistent"] is True
    assert figures["baseline_psycopg_hot_errors"] == 0
    assert figures["pit_checked"] == bench.PIT_CHECKS
    assert figures["phases_settled"] is True
    assert figures["phases_checkpointed"] is _may_checkpoint()
    assert figures["settle_count"] == len(PHASES)
    during = figures["checkpointer_during_phases"]
    assert set(during) == PHASES
    assert all(set(d) == {"checkpoints", "buffers_written"} for d in during.values())
    assert all(n >= 0 for d in during.values() for n in d.values())
    assert isinstance(figures["cpu_count"], int)
    assert isinstance(figures["postgres_version"], str)
    # single + batched + hot + read entries, two legs each
    assert figures["postings_total"] == 2 * (20 + 1_500 + figures["hot_account_tx_count"] + 300)


def _may_checkpoint() -> bool:
    """Whether the bench's role may run CHECKPOINT (superuser, or pg_checkpoint)."""
    with psycopg.connect(_admin_conninfo()) as server:
        row = server.execute(
            "SELECT r.rolsuper OR EXISTS (SELECT 1 FROM pg_roles c WHERE c.rolname = "
            "'pg_checkpoint' AND pg_has_role(current_user, c.oid, 'MEMBER')) "
            "FROM pg_roles r WHERE r.rolname = current_user"
        ).fetchone()
    assert row is not None
    return bool(row[0])


@pytest.mark.django_db(transaction=True)  # VACUUM cannot run inside a transaction block
def test_settle_without_the_right_to_checkpoint_only_vacuums() -> None:
    role = f"tl_bench_no_checkpoint_{os.getpid()}"
    with connection.cursor() as cursor:
        cursor.execute(f'CREATE ROLE "{role}" NOLOGIN')
        cursor.execute(f'SET ROLE "{role}"')
    try:
        settle = bench._Settle(enabled=True)
        with settle.phase("first"):
            pass
        with settle.phase("second"):
            pass
    finally:
        with connection.cursor() as cursor:
            cursor.execute("RESET ROLE")
            cursor.execute(f'DROP ROLE "{role}"')
    report = settle.report()
    assert report["phases_settled"] is True
    assert report["phases_checkpointed"] is False
    assert report["settle_count"] == 2
    assert "CHECKPOINT was refused" in report["settle_method"]
    assert set(report["checkpointer_during_phases"]) == {"first", "second"}


@pytest.mark.django_db(transaction=True)
def test_settle_off_settles_nothing_and_still_counts_checkpoints() -> None:
    settle = bench._Settle(enabled=False)
    with settle.phase("quiet"):
        pass
    report = settle.report()
    assert report["phases_settled"] is False
    assert report["phases_checkpointed"] is False
    assert report["settle_count"] == 0
    assert report["settle_method"].startswith("off (--no-settle)")
    # counted all the same (a timed checkpoint of the server may write meanwhile)
    (quiet,) = report["checkpointer_during_phases"].values()
    assert set(quiet) == {"checkpoints", "buffers_written"}
    assert min(quiet.values()) >= 0
