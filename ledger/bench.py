"""`python manage.py bench ledger --json`: posting throughput and balance read latency.

What runs, in a scratch database created, migrated and dropped around the run
(config/scratch.py), one PostgreSQL connection per process, SQL query logging off
(DEBUG's logging formats every parameter array and would measure Django, not us):

- post_tx_per_s: `transaction_post` in a loop, one two-leg transaction per database
  transaction, one process; wall time over `--single-tx` transactions. Alternated, a
  turn of SINGLE_CHUNK each, with the same transfers written by plain psycopg into
  tables shaped like the ledger's (baseline_psycopg_tx_per_s): the issue's reference
  figure for this path ("about 1,000 transfers/s"), measured in the same minute.
- post_tx_per_s_batched: `transactions_post` with BATCH_ENTRIES two-leg entries per call
  (one database transaction per call), one process, over `--batched-tx` transactions.
  Each batch is followed by the same batch on plain PostgreSQL's set-based COPY path
  into tables shaped like the ledger's (baseline_copy_tx_per_s): the same minute's
  ceiling, since this machine's speed moves by a third from one minute to the next.
- hot_account_tx_per_s: `--processes` spawned processes, each posting random two-leg
  transfers among the same HOT_ACCOUNTS accounts with `transaction_post`, for
  `--duration-s` seconds from a common start (each builds its transfers before, as the
  other phases do); committed transactions over the longest worker's wall time. Every
  exception counts in hot_account_errors. Just before, the same load through plain
  psycopg (baseline_psycopg_hot_tx_per_s).
- balance reads: one read account receives one leg of every entry of BATCH_ENTRIES-entry
  batches (the other leg rotates over COUNTER_ACCOUNTS accounts); BACKDATED_FRACTION
  of the entries are dated back up to --backdated-s seconds (within the open period)
  so the back-dated path of `balance_as_of` is exercised. At `--read-postings-small`
  and again at `--read-postings` postings on the read account: `--reads` calls of
  `balance_get` and `--reads` calls of `balance_as_of` at uniform random instants
  between the account's first effective time and now; latency per call, measured
  around the selector (Django and the driver included).

Each measured phase starts on a settled server (`_Settle`: VACUUM (ANALYZE), then
CHECKPOINT), as pgbench vacuums its tables before a run: a phase is not charged for
autovacuum or checkpoint writes that the phases before it caused. `--no-settle` runs
without it, to compare; either way `checkpointer_during_phases` says how many
checkpoints started, and how many buffers the checkpointer wrote, while each phase ran.

Afterwards, the figures are checked: balances equal the sum of postings, and a few
point-in-time balances equal the sum of postings effective by then; so are the plain
paths' tables (baseline_copy_consistent, baseline_psycopg_consistent).
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import os
import platform
import random
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

import psycopg
from django.conf import settings
from django.core.management.base import CommandParser
from django.db import DatabaseError, connection, transaction

from ledger.exceptions import sqlstate_of

if TYPE_CHECKING:
    from multiprocessing.queues import Queue
    from multiprocessing.synchronize import Event

    from ledger.services import Entry

# The services and models are imported inside the functions that use them: a spawned
# worker process imports this module before it has called django.setup().

ASSET = "BENCH"
BATCH_ENTRIES = 1_000
HOT_ACCOUNTS = 10
HOT_TRANSFERS_PER_S_PER_PROCESS = 1_500  # built ahead; about twice what one reaches here
SINGLE_ACCOUNTS = 100
SINGLE_CHUNK = 250  # transfers a turn when the ledger and plain psycopg alternate
COUNTER_ACCOUNTS = 100
BACKDATED_FRACTION = 0.01
# Late arrivals: what a point-in-time read pays for is the postings back-dated across
# its instant (rate x window x fraction), not history; see the README.
BACKDATED_S_MAX = 10
PIT_CHECKS = 5
WORKER_START_TIMEOUT_S = 120
AMOUNT_MAX = 1_000_000
INSUFFICIENT_PRIVILEGE = "42501"
CHECKPOINT_COUNT_WAIT_S = 2.0

FULL = {"single_tx": 5_000, "batched_tx": 100_000, "read_postings_small": 10_000,
        "read_postings": 1_000_000, "reads": 2_000, "duration_s": 10.0}  # fmt: skip
QUICK = {"single_tx": 1_000, "batched_tx": 20_000, "read_postings_small": 10_000,
         "read_postings": 100_000, "reads": 1_000, "duration_s": 5.0}  # fmt: skip


def add_arguments(parser: CommandParser) -> None:
    parser.add_argument("--quick", action="store_true", help="smaller sizes for a smoke run")
    parser.add_argument(
        "--no-settle",
        action="store_true",
        help="measure each phase without first vacuuming and checkpointing the scratch database",
    )
    parser.add_argument("--processes", type=int, default=4, help="hot-account processes")
    parser.add_argument("--duration-s", type=float, help="hot-account run time per process")
    parser.add_argument("--single-tx", type=int, help="transactions posted one by one")
    parser.add_argument("--batched-tx", type=int, help="transactions posted in batches")
    parser.add_argument("--read-postings-small", type=int, help="first read size (postings)")
    parser.add_argument("--read-postings", type=int, help="second read size (postings)")
    parser.add_argument("--reads", type=int, help="reads per kind and size")
    parser.add_argument(
        "--backdated-s",
        type=float,
        default=BACKDATED_S_MAX,
        help=f"read history: {BACKDATED_FRACTION * 100:.0f}%% of entries dated back up to "
        "this many s",
    )


def run(options: dict[str, Any]) -> dict[str, Any]:
    """Build the data in a scratch database, measure, and return the figures."""
    # config.scratch is imported here, not at the top: it is the project's (not the
    # ledger's) way of finding a server, and `ledger` imports only Django at import time.
    from config.scratch import scratch_database

    sizes = dict(QUICK if options.get("quick") else FULL)
    for name in sizes:
        if options.get(name) is not None:
            sizes[name] = options[name]
    processes = int(options.get("processes") or 4)
    assert sizes["read_postings_small"] <= sizes["read_postings"], "small size above large"
    with scratch_database(keep=bool(options.get("keep"))) as url, _queries_not_logged():
        figures = _machine()
        figures["scratch_database"] = url.rsplit("/", 1)[-1]
        _setup()
        settle = _Settle(enabled=not options.get("no_settle"))
        with settle.phase("baseline_commit"):
            figures.update(_bench_baseline(int(sizes["single_tx"])))
        with settle.phase("single"):
            figures.update(_bench_single(int(sizes["single_tx"])))
        with settle.phase("batched"):
            figures.update(_bench_batched(int(sizes["batched_tx"])))
        figures.update(_bench_hot(processes, float(sizes["duration_s"]), settle))
        figures.update(
            _bench_reads(
                int(sizes["read_postings_small"]),
                int(sizes["read_postings"]),
                int(sizes["reads"]),
                float(
                    BACKDATED_S_MAX
                    if options.get("backdated_s") is None
                    else options["backdated_s"]
                ),
                settle,
            )
        )
        figures.update(settle.report())
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM ledger_posting")
            figures["postings_total"] = int(cursor.fetchone()[0])
        figures["balances_consistent"] = _balances_consistent()
        figures["baseline_psycopg_consistent"] = _PlainTransfers.consistent(
            figures["post_tx_count"] + figures["baseline_psycopg_hot_tx_count"]
        )
        figures["load_average_1m_end"] = round(os.getloadavg()[0], 2)
    return figures


@contextlib.contextmanager
def _queries_not_logged() -> Iterator[None]:
    """Turn off Django's query log (on with DEBUG) for the duration of a measurement."""
    debug = settings.DEBUG
    settings.DEBUG = False
    try:
        yield
    finally:
        settings.DEBUG = debug


def _machine() -> dict[str, Any]:
    with connection.cursor() as cursor:
        cursor.execute("SHOW server_version")
        version = cursor.fetchone()[0]
        cursor.execute("SHOW synchronous_commit")
        synchronous_commit = cursor.fetchone()[0]
    return {
        "cpu_count": os.cpu_count(),
        "machine": f"{platform.system()} {platform.machine()}, Python {platform.python_version()}",
        "load_average_1m_start": round(os.getloadavg()[0], 2),
        "postgres_version": version,
        "postgres_synchronous_commit": synchronous_commit,
        "database_host": str(connection.settings_dict.get("HOST") or "local socket"),
    }


def _setup() -> None:
    from ledger.services import account_open, asset_create, period_open

    asset_create(code=ASSET, scale=0, name="Bench token")
    now = datetime.now(tz=UTC)
    period_open(year=now.year, month=now.month)
    codes = (
        [f"bench:single:{i}" for i in range(SINGLE_ACCOUNTS)]
        + [f"bench:hot:{i}" for i in range(HOT_ACCOUNTS)]
        + [f"bench:counter:{i}" for i in range(COUNTER_ACCOUNTS)]
        + ["bench:read"]
    )
    for code in codes:
        account_open(code=code, kind="asset")


class _Settle:
    """Bring the scratch database to rest before each measured phase; watch the checkpointer.

    A phase should not pay for what the phases before it caused: during a full run
    pg_stat_bgwriter counted a requested checkpoint every half minute or so (sampled),
    and the batched phase leaves autovacuum work. So, as pgbench vacuums its tables
    before a run, VACUUM (ANALYZE) clears what autovacuum would otherwise start, and
    CHECKPOINT (immediate: it returns when done) finishes any checkpoint under way and
    restarts both triggers of the next one, the WAL volume and checkpoint_timeout. What a
    phase causes itself (the hot phase's dead balance versions, its own WAL) it still
    pays for: the figures are those of a phase started on a quiet server, not of a
    sustained load that also pays for its checkpoints.

    Whether it matters is measured, not assumed: `checkpointer_during` records, settled
    or not, the checkpoints started and the buffers the checkpointer wrote while each
    phase ran. In the runs that recorded it (this machine, PostgreSQL 15) nothing fell
    inside a measured phase either way, so the spread between runs was the machine's.

    CHECKPOINT is server-wide: run the bench on a server of its own. It needs a superuser
    or pg_checkpoint; without either, phases are only vacuumed and the JSON says so
    (`phases_checkpointed`).
    """

    def __init__(self, *, enabled: bool) -> None:
        self.enabled = enabled
        self.checkpointed = enabled
        self.seconds = 0.0
        self.count = 0
        self.checkpointer_during: dict[str, dict[str, int]] = {}

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Settle the server (unless disabled), run the phase, count its checkpoints."""
        if self.enabled:
            self._settle()
        checkpoints, buffers = _checkpointer_so_far()
        yield
        checkpoints_after, buffers_after = _checkpointer_so_far()
        self.checkpointer_during[name] = {
            "checkpoints": checkpoints_after - checkpoints,
            "buffers_written": buffers_after - buffers,
        }

    def _settle(self) -> None:
        started = time.perf_counter()
        with connection.cursor() as cursor:
            cursor.execute("VACUUM (ANALYZE)")
            if self.checkpointed:
                counted, _ = _checkpointer_so_far()
                try:
                    cursor.execute("CHECKPOINT")
                except DatabaseError as error:
                    if sqlstate_of(error) != INSUFFICIENT_PRIVILEGE:
                        raise
                    self.checkpointed = False
                else:
                    _await_checkpoint_counted(counted)
        self.seconds += time.perf_counter() - started
        self.count += 1

    def report(self) -> dict[str, Any]:
        if not self.enabled:
            method = "off (--no-settle): each phase runs on what the previous ones left"
        else:
            ran = (
                "VACUUM (ANALYZE) then CHECKPOINT"
                if self.checkpointed
                else (
                    "VACUUM (ANALYZE) only: CHECKPOINT was refused (needs a superuser or "
                    "pg_checkpoint)"
                )
            )
            method = (
                f"before each measured phase and its baseline: {ran}, so that no phase "
                "pays for the autovacuum or the checkpoint the previous ones left behind "
                "(as pgbench vacuums before a run); off with --no-settle"
            )
        return {
            "phases_settled": self.enabled,
            "phases_checkpointed": self.enabled and self.checkpointed,
            "settle_count": self.count,
            "settle_s": round(self.seconds, 1),
            "settle_method": method,
            "checkpointer_during_phases": dict(self.checkpointer_during),
        }


def _await_checkpoint_counted(before: int) -> None:
    """Wait until the checkpointer has counted our CHECKPOINT, so no phase counts it.

    CHECKPOINT returns when the checkpoint is done; the checkpointer reports it to the
    statistics a moment later. Bounded: after CHECKPOINT_COUNT_WAIT_S it is left to
    count where it lands.
    """
    deadline = time.monotonic() + CHECKPOINT_COUNT_WAIT_S
    while _checkpointer_so_far()[0] <= before and time.monotonic() < deadline:
        time.sleep(0.01)


def _checkpointer_so_far() -> tuple[int, int]:
    """Checkpoints started (timed or requested) and buffers written by the checkpointer.

    The checkpointer reports its buffers as it writes them, so a phase sees the writes
    of a checkpoint that began before it. PostgreSQL 17 moved the counters.
    """
    view = (
        "SELECT num_timed + num_requested, buffers_written FROM pg_stat_checkpointer"
        if connection.pg_version >= 170000  # type: ignore[attr-defined]
        else "SELECT checkpoints_timed + checkpoints_req, buffers_checkpoint FROM pg_stat_bgwriter"
    )
    with connection.cursor() as cursor:
        cursor.execute(view)
        checkpoints, buffers = cursor.fetchone()
    return int(checkpoints), int(buffers)


def _bench_baseline(count: int) -> dict[str, Any]:
    """Measure the commit rate of the same stack without the ledger: the ceiling here."""
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE bench_baseline (id bigserial PRIMARY KEY, a bigint, b bigint)")
    started = time.perf_counter()
    for i in range(count):
        with transaction.atomic(), connection.cursor() as cursor:
            cursor.execute(
                "INSERT INTO bench_baseline (a, b) VALUES (%s, %s), (%s, %s)", [i, 1, i, -1]
            )
    elapsed_s = time.perf_counter() - started
    return {
        "baseline_commit_tx_per_s": round(count / elapsed_s),
        "baseline_method": f"1 process, {count} x (INSERT of 2 rows into a plain table + "
        f"COMMIT) through the same Django connection: no ledger code, no "
        f"triggers; the commit ceiling of this server at this moment",
    }


def _transfer(key: str, debit: str, credit: str, amount: int, at: datetime | None) -> Entry:
    from ledger.services import Entry, Leg

    return Entry(
        idempotency_key=key,
        legs=(
            Leg(account=debit, asset=ASSET, amount=amount),
            Leg(account=credit, asset=ASSET, amount=-amount),
        ),
        description="bench transfer",
        effective_at=at,
    )


def _bench_single(count: int) -> dict[str, Any]:
    """Transfers one per call, alternated in chunks with the same on plain psycopg."""
    from ledger.services import transaction_post

    rng = random.Random(1)
    entries = [
        _transfer(
            f"single-{i}",
            *_pair(rng, "bench:single", SINGLE_ACCOUNTS),
            rng.randint(1, AMOUNT_MAX),
            None,
        )
        for i in range(count)
    ]
    _PlainTransfers.create_tables()
    plain = _PlainTransfers()
    elapsed_s = plain_s = 0.0
    for start in range(0, count, SINGLE_CHUNK):
        chunk = entries[start : start + SINGLE_CHUNK]
        started = time.perf_counter()
        for entry in chunk:
            transaction_post(
                idempotency_key=entry.idempotency_key,
                legs=entry.legs,
                description=entry.description,
            )
        elapsed_s += time.perf_counter() - started
        started = time.perf_counter()
        for entry in chunk:
            plain.post(entry)
        plain_s += time.perf_counter() - started
    plain.close()
    return {
        "post_tx_per_s": round(count / elapsed_s),
        "post_tx_count": count,
        "post_method": f"1 process, transaction_post x {count}, 2 legs, one database "
        f"transaction each, among {SINGLE_ACCOUNTS} accounts; wall time",
        "baseline_psycopg_tx_per_s": round(count / plain_s),
        "baseline_psycopg_method": f"the same transfers, alternated with the above "
        f"{SINGLE_CHUNK} at a time: {_PlainTransfers.METHOD}",
    }


def _bench_batched(count: int) -> dict[str, Any]:
    """Batches through `transactions_post`, each followed by the same batch on the COPY path.

    The two alternate batch by batch, so that both meet the machine in the same mood
    (its speed moves by a third from one minute to the next).
    """
    from ledger.services import transactions_post

    rng = random.Random(2)
    copy_path = _CopyPath()
    elapsed_s = copy_s = 0.0
    for start in range(0, count, BATCH_ENTRIES):
        entries = [
            _transfer(
                f"batched-{i}",
                *_pair(rng, "bench:single", SINGLE_ACCOUNTS),
                rng.randint(1, AMOUNT_MAX),
                None,
            )
            for i in range(start, min(count, start + BATCH_ENTRIES))
        ]
        started = time.perf_counter()
        transactions_post(entries=entries)
        elapsed_s += time.perf_counter() - started
        copy_s += copy_path.post(entries)
    return {
        "post_tx_per_s_batched": round(count / elapsed_s),
        "post_tx_batched_count": count,
        "post_batched_method": f"1 process, transactions_post with {BATCH_ENTRIES} entries "
        f"per call (one database transaction each), 2 legs, "
        f"{count} transactions among {SINGLE_ACCOUNTS} accounts; time "
        f"inside transactions_post (validation, hashing, SQL, commit)",
        "baseline_copy_tx_per_s": round(count / copy_s),
        "baseline_copy_consistent": copy_path.consistent(count),
        "baseline_copy_method": "the same batches, alternated with the above: psycopg "
        "COPY of the transactions and postings into plain tables shaped like the "
        "ledger's (LIKE ... INCLUDING ALL: its indexes and checks, no triggers) and one "
        "UPDATE of the balance rows, one database transaction per batch; ids, running "
        "balances and recorded times computed in Python, no locks, no validation, the "
        "key's SHA-256 as the hash: what plain PostgreSQL's set-based path costs on "
        "these tables at this moment, not a ledger",
    }


class _CopyPath:
    """The set-based COPY path of plain PostgreSQL on tables shaped like the ledger's."""

    TRANSACTION_COLUMNS = (
        "id, idempotency_key, content_hash, description, effective_at, recorded_at, "
        "metadata, created_xact, reverses_id, first_posting_id"
    )
    POSTING_COLUMNS = (
        "id, transaction_id, account_id, asset_id, amount, effective_at, recorded_at, balance_after"
    )

    def __init__(self) -> None:
        from ledger.models import Account, Asset

        _create_tables_like_the_ledgers("bench_copy")
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_current_xact_id()::text::bigint")
            (self.xact,) = cursor.fetchone()
        self.accounts = dict(Account.objects.values_list("code", "id"))
        self.assets = dict(Asset.objects.values_list("code", "id"))
        self.balances: dict[tuple[int, int], list[Any]] = {}
        self.next_id = 1

    def post(self, entries: Sequence[Entry]) -> float:
        """Write `entries` the plain way; return the seconds it took."""
        started = time.perf_counter()
        now = datetime.now(tz=UTC)
        tick = timedelta(microseconds=1)
        transactions: list[tuple[Any, ...]] = []
        postings: list[tuple[Any, ...]] = []
        opened: list[tuple[int, int]] = []
        touched: dict[tuple[int, int], int] = {}
        for entry in entries:
            tx_id, self.next_id = self.next_id, self.next_id + 1
            first_posting = self.next_id
            key = entry.idempotency_key
            digest = hashlib.sha256(key.encode()).hexdigest()
            head = (tx_id, key, digest, entry.description, now, now, "{}", self.xact)
            transactions.append((*head, None, first_posting))
            for leg in entry.legs:
                pair = (self.accounts[leg.account], self.assets[leg.asset])
                if pair not in self.balances:
                    self.balances[pair] = [0, now - tick]
                    opened.append(pair)
                touched[pair] = touched.get(pair, 0) + 1
                balance = self.balances[pair]
                balance[0] += leg.amount
                balance[1] = max(balance[1] + tick, now)
                postings.append(
                    (self.next_id, tx_id, *pair, leg.amount, now, balance[1], balance[0])
                )
                self.next_id += 1
        pairs = list(touched)
        with transaction.atomic(), connection.cursor() as cursor:
            raw = cursor.cursor  # psycopg's own cursor: its COPY support
            with raw.copy(
                f"COPY bench_copy_transaction ({self.TRANSACTION_COLUMNS}) FROM STDIN"
            ) as copy:
                for row in transactions:
                    copy.write_row(row)
            with raw.copy(f"COPY bench_copy_posting ({self.POSTING_COLUMNS}) FROM STDIN") as copy:
                for row in postings:
                    copy.write_row(row)
            if opened:
                cursor.execute(
                    "INSERT INTO bench_copy_balance (account_id, asset_id, amount, "
                    "posting_count, updated_at) SELECT a, s, 0, 0, '-infinity' "
                    "FROM unnest(%s::bigint[], %s::bigint[]) AS u(a, s)",
                    [[a for a, _ in opened], [s for _, s in opened]],
                )
            cursor.execute(
                "UPDATE bench_copy_balance b SET amount = u.amount, updated_at = u.at, "
                "posting_count = b.posting_count + u.n FROM unnest(%s::bigint[], "
                "%s::bigint[], %s::numeric[], %s::timestamptz[], %s::int[]) "
                "AS u(a, s, amount, at, n) WHERE b.account_id = u.a AND b.asset_id = u.s",
                [
                    [a for a, _ in pairs],
                    [s for _, s in pairs],
                    [self.balances[p][0] for p in pairs],
                    [self.balances[p][1] for p in pairs],
                    [touched[p] for p in pairs],
                ],
            )
        return time.perf_counter() - started

    def consistent(self, transactions: int) -> bool:
        """Did the COPY path write what it was timed for?"""
        return _tables_consistent("bench_copy", transactions)


class _PlainTransfers:
    """A transfer as plain psycopg writes it: the issue's reference for one per commit.

    "Plain psycopg with one transfer per database transaction commits about 1,000
    transfers/s" on this machine, says the issue; this measures that figure in the same
    run, since the machine's speed does not hold still. On a connection of its own, as
    an application would write it: BEGIN, the transaction row, the two balance rows
    moved in account order (their RETURNING gives each posting its running balance and
    recorded time, as the ledger keeps them), the two postings, COMMIT; statements
    bound and prepared by psycopg. Tables shaped like the ledger's; no idempotency
    answer, no validation, no period.
    """

    METHOD = (
        "plain psycopg on a connection of its own with psycopg's defaults: BEGIN, INSERT of the "
        "transaction row, UPDATE ... RETURNING of the two balance rows in account order, "
        "INSERT of the two postings with their running balances, COMMIT, into tables "
        "shaped like the ledger's (LIKE ... INCLUDING ALL: its indexes and checks, no "
        "triggers); no idempotency answer, no validation, no period: the issue's "
        "'plain psycopg with one transfer per database transaction', measured now"
    )

    @staticmethod
    def create_tables() -> None:
        _create_tables_like_the_ledgers("bench_plain")
        with connection.cursor() as cursor:
            cursor.execute(
                "INSERT INTO bench_plain_balance (account_id, asset_id, amount, posting_count) "
                "SELECT a.id, s.id, 0, 0 FROM ledger_account a, ledger_asset s "
                "WHERE s.code = %s",
                [ASSET],
            )

    def __init__(self) -> None:
        from ledger.models import Account, Asset

        self.accounts = dict(Account.objects.values_list("code", "id"))
        self.assets = dict(Asset.objects.values_list("code", "id"))
        # A connection of its own with psycopg's defaults (server-side binding, prepared
        # after five uses), not Django's (client-side binding, never prepared).
        params = connection.get_connection_params()
        for django_only in ("cursor_factory", "context", "prepare_threshold"):
            params.pop(django_only, None)
        self.connection = psycopg.connect(**params, autocommit=True)

    def close(self) -> None:
        self.connection.close()

    def post(self, entry: Entry) -> None:
        """Write one two-leg entry in a database transaction of its own."""
        asset = self.assets[entry.legs[0].asset]
        legs = sorted((self.accounts[leg.account], leg.amount) for leg in entry.legs)
        key = entry.idempotency_key
        with self.connection.transaction(), self.connection.cursor() as cursor:
            cursor.execute(
                "INSERT INTO bench_plain_transaction (idempotency_key, content_hash, "
                "description, metadata, first_posting_id) VALUES (%s, %s, %s, '{}', 0) "
                "RETURNING id",
                [key, hashlib.sha256(key.encode()).hexdigest(), entry.description],
            )
            (transaction_id,) = cursor.fetchone()  # type: ignore[misc]  # RETURNING: always a row
            rows = []
            for account, amount in legs:
                cursor.execute(
                    "UPDATE bench_plain_balance SET amount = amount + %s, "
                    "posting_count = posting_count + 1, updated_at = "
                    "greatest(updated_at + interval '1 microsecond', clock_timestamp()) "
                    "WHERE account_id = %s AND asset_id = %s RETURNING amount, updated_at",
                    [amount, account, asset],
                )
                balance_after, recorded_at = cursor.fetchone()  # type: ignore[misc]
                rows += [transaction_id, account, asset, amount, recorded_at, balance_after]
            cursor.execute(
                "INSERT INTO bench_plain_posting (transaction_id, account_id, asset_id, amount, "
                "recorded_at, balance_after) VALUES (%s, %s, %s, %s, %s, %s), "
                "(%s, %s, %s, %s, %s, %s)",
                rows,
            )

    @staticmethod
    def consistent(transactions: int) -> bool:
        """Did plain psycopg write what it was timed for?"""
        return _tables_consistent("bench_plain", transactions)


def _create_tables_like_the_ledgers(prefix: str) -> None:
    """Plain tables shaped like the ledger's: its indexes and checks, no triggers."""
    with connection.cursor() as cursor:
        for table in ("transaction", "posting", "balance"):
            cursor.execute(f"CREATE TABLE {prefix}_{table} (LIKE ledger_{table} INCLUDING ALL)")


def _tables_consistent(prefix: str, transactions: int) -> bool:
    """Every row a plain path was timed for is there; balances equal postings and sum to 0."""
    with connection.cursor() as cursor:
        cursor.execute(
            f"SELECT (SELECT count(*) FROM {prefix}_transaction), "
            f"(SELECT count(*) FROM {prefix}_posting), "
            f"(SELECT coalesce(sum(amount), 0) FROM {prefix}_balance), "
            f"NOT EXISTS (SELECT 1 FROM {prefix}_balance b WHERE b.amount <> "
            f"(SELECT coalesce(sum(p.amount), 0) FROM {prefix}_posting p "
            f"WHERE p.account_id = b.account_id AND p.asset_id = b.asset_id))"
        )
        written, posted, total, balanced = cursor.fetchone()
    return bool(written == transactions and posted == 2 * transactions and total == 0 and balanced)


def _pair(rng: random.Random, prefix: str, size: int) -> tuple[str, str]:
    debit, credit = rng.sample(range(size), 2)
    return f"{prefix}:{debit}", f"{prefix}:{credit}"


# --- hot accounts: several processes through the same few accounts -----------------


def _bench_hot(processes: int, duration_s: float, settle: _Settle) -> dict[str, Any]:
    """Plain psycopg on the hot accounts, then the ledger: the same load, one after the other."""
    with settle.phase("hot_baseline_psycopg"):
        plain = _run_hot(processes, duration_s, plain=True)
    with settle.phase("hot"):
        ledger = _run_hot(processes, duration_s, plain=False)
    return {
        "hot_account_tx_per_s": round(ledger["committed"] / ledger["elapsed_s"]),
        "hot_account_errors": ledger["errors"],
        "hot_account_error_samples": ledger["error_samples"],
        "hot_account_tx_count": ledger["committed"],
        "hot_account_latency_ms_p50": _percentile(ledger["latencies_ms"], 50),
        "hot_account_latency_ms_p99": _percentile(ledger["latencies_ms"], 99),
        "hot_account_method": f"{processes} processes (spawn), each transaction_post in a "
        f"loop for {duration_s:g} s from a common start (its transfers built before), "
        f"2-leg transfers between random pairs of the same {HOT_ACCOUNTS} accounts, "
        f"each committed on its own; committed / longest worker time",
        "baseline_psycopg_hot_tx_per_s": round(plain["committed"] / plain["elapsed_s"]),
        "baseline_psycopg_hot_errors": plain["errors"],
        "baseline_psycopg_hot_method": "the same load just before, each transfer "
        f"written by {_PlainTransfers.METHOD}",
        "baseline_psycopg_hot_tx_count": plain["committed"],
    }


def _run_hot(processes: int, duration_s: float, *, plain: bool) -> dict[str, Any]:
    """Run the hot workers from a common start; their reports merged."""
    context = multiprocessing.get_context("spawn")
    results: Queue[dict[str, Any]] = context.Queue()
    start: Event = context.Event()
    database = str(connection.settings_dict["NAME"])
    workers = [
        context.Process(target=_hot_worker, args=(database, n, duration_s, plain, start, results))
        for n in range(processes)
    ]
    for worker in workers:
        worker.start()
    ready = [results.get(timeout=WORKER_START_TIMEOUT_S) for _ in workers]
    assert all(r.get("ready") for r in ready), ready
    start.set()
    reports = [results.get(timeout=duration_s + WORKER_START_TIMEOUT_S) for _ in workers]
    for worker in workers:
        worker.join(timeout=WORKER_START_TIMEOUT_S)
    return {
        "committed": sum(r["committed"] for r in reports),
        "errors": sum(r["errors"] for r in reports),
        "error_samples": [s for r in reports for s in r["error_samples"]][:5],
        "elapsed_s": max(r["elapsed_s"] for r in reports),
        "latencies_ms": sorted(ms for r in reports for ms in r["latencies_ms"]),
    }


def _ledger_post(entry: Entry) -> None:
    from ledger.services import transaction_post

    transaction_post(
        idempotency_key=entry.idempotency_key, legs=entry.legs, description=entry.description
    )


def _hot_worker(
    database: str,
    seed: int,
    duration_s: float,
    plain: bool,
    start: Event,
    results: Queue[dict[str, Any]],
) -> None:
    """Post transfers among the hot accounts until `duration_s` has passed; report."""
    import django

    django.setup()
    settings.DEBUG = False
    settings.DATABASES["default"]["NAME"] = database
    connection.settings_dict["NAME"] = database
    rng = random.Random(1_000 + seed)
    prefix = "plain-hot" if plain else "hot"

    def transfers(first: int, count: int) -> list[Entry]:
        return [
            _transfer(
                f"{prefix}-{seed}-{n}",
                *_pair(rng, "bench:hot", HOT_ACCOUNTS),
                rng.randint(1, AMOUNT_MAX),
                None,
            )
            for n in range(first, first + count)
        ]

    # Built before the start, as the other phases build theirs: the generator's CPU
    # would otherwise share the two cores with what is measured. More if they run out.
    pending = transfers(0, int(duration_s * HOT_TRANSFERS_PER_S_PER_PROCESS))
    connection.ensure_connection()
    writer = _PlainTransfers() if plain else None
    post: Callable[[Entry], None] = writer.post if writer else _ledger_post
    results.put({"ready": True})
    start.wait()
    committed = errors = 0
    samples: list[str] = []
    latencies_ms: list[float] = []
    started = time.perf_counter()
    deadline = started + duration_s
    while (now := time.perf_counter()) < deadline:
        if committed + errors == len(pending):
            pending += transfers(len(pending), len(pending))
        entry = pending[committed + errors]
        try:
            post(entry)
        except Exception as error:  # every failure counts; the target is zero
            errors += 1
            if len(samples) < 3:
                samples.append(f"{type(error).__name__}: {error}"[:300])
        else:
            committed += 1
            latencies_ms.append((time.perf_counter() - now) * 1_000)
    results.put(
        {
            "committed": committed,
            "errors": errors,
            "error_samples": samples,
            "elapsed_s": time.perf_counter() - started,
            "latencies_ms": latencies_ms,
        }
    )
    if writer:
        writer.close()
    connection.close()


# --- balance reads: now and as of a past instant, at two history sizes ----------------


def _bench_reads(
    small: int, large: int, reads: int, backdated_s: float, settle: _Settle
) -> dict[str, Any]:
    from ledger.models import Account, Asset

    account_id = Account.objects.get(code="bench:read").pk
    asset_id = Asset.objects.get(code=ASSET).pk
    rng = random.Random(3)
    figures: dict[str, Any] = {}
    build_s = _build_read_history(rng, 0, small, backdated_s)
    with settle.phase("reads_10k"):
        figures.update(_measure_reads(rng, account_id, asset_id, reads, "10k"))
    build_s += _build_read_history(rng, small, large, backdated_s)
    with settle.phase("reads_1m"):
        figures.update(_measure_reads(rng, account_id, asset_id, reads, "1m"))
    figures["balance_read_p99_ms"] = figures["balance_read_p99_ms_1m"]
    figures["pit_balance_p99_ms"] = figures["pit_balance_p99_ms_1m"]
    figures["read_postings_10k"] = small
    figures["read_postings_1m"] = large
    figures["read_build_tx_per_s"] = round(large / build_s)
    figures["pit_checked"] = _check_pit(rng, account_id, asset_id)
    figures["read_method"] = (
        f"the read account gets one leg of each 2-leg entry posted with transactions_post "
        f"({BATCH_ENTRIES} per call; other leg over {COUNTER_ACCOUNTS} accounts; "
        f"{BACKDATED_FRACTION:.0%} back-dated up to {backdated_s:g} s); at {small} and at "
        f"{large} postings: {reads} balance_get calls (current) and {reads} balance_as_of "
        f"calls at uniform random instants over the account's history, 1 process, latency "
        f"per call around the selector; baseline_select1_*: a SELECT 1 through a Django "
        f"cursor right after each current-balance read, the machine's floor at those "
        f"moments; read_build_tx_per_s is the batched rate at that "
        f"table size (a single hot account in every entry)"
    )
    return figures


def _build_read_history(rng: random.Random, done: int, target: int, backdated_s: float) -> float:
    """Post entries touching the read account until it has `target` postings; return s."""
    from ledger.services import transactions_post

    elapsed_s = 0.0
    for start in range(done, target, BATCH_ENTRIES):
        now = datetime.now(tz=UTC)
        month_start = now.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
        backdated_s_max = min(backdated_s, (now - month_start).total_seconds())
        entries = []
        for i in range(start, min(target, start + BATCH_ENTRIES)):
            at = None
            if backdated_s_max > 0.1 and rng.random() < BACKDATED_FRACTION:
                at = now - timedelta(seconds=rng.uniform(0.1, backdated_s_max))
            counter = f"bench:counter:{i % COUNTER_ACCOUNTS}"
            amount = rng.randint(1, AMOUNT_MAX)
            debit, credit = ("bench:read", counter) if i % 2 else (counter, "bench:read")
            entries.append(_transfer(f"read-{i}", debit, credit, amount, at))
        started = time.perf_counter()
        transactions_post(entries=entries)
        elapsed_s += time.perf_counter() - started
    return elapsed_s


def _history_span(account_id: int, asset_id: int) -> tuple[datetime, datetime]:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT min(effective_at), max(recorded_at) FROM ledger_posting "
            "WHERE account_id = %s AND asset_id = %s",
            [account_id, asset_id],
        )
        first, last = cursor.fetchone()
    return first, last


def _measure_reads(
    rng: random.Random, account_id: int, asset_id: int, reads: int, label: str
) -> dict[str, Any]:
    from ledger.selectors import balance_as_of, balance_get

    with connection.cursor() as cursor:  # as autovacuum would leave it after the inserts
        cursor.execute("VACUUM (ANALYZE) ledger_posting")
    first, last = _history_span(account_id, asset_id)
    span_s = (last - first).total_seconds()
    instants = [first + timedelta(seconds=rng.uniform(0, span_s)) for _ in range(reads)]
    current_ms: list[float] = []
    floor_ms: list[float] = []  # the same round trip with no ledger in it, at the same moments
    with connection.cursor() as floor:
        for _ in range(reads):
            started = time.perf_counter()
            balance_get(account_id=account_id, asset_id=asset_id)
            current_ms.append((time.perf_counter() - started) * 1_000)
            started = time.perf_counter()
            floor.execute("SELECT 1")
            floor.fetchone()
            floor_ms.append((time.perf_counter() - started) * 1_000)
    pit_ms: list[float] = []
    for at in instants:
        started = time.perf_counter()
        balance_as_of(account_id=account_id, asset_id=asset_id, at=at)
        pit_ms.append((time.perf_counter() - started) * 1_000)
    current_ms.sort()
    pit_ms.sort()
    floor_ms.sort()
    return {
        f"baseline_select1_p50_ms_{label}": _percentile(floor_ms, 50),
        f"baseline_select1_p99_ms_{label}": _percentile(floor_ms, 99),
        f"balance_read_p50_ms_{label}": _percentile(current_ms, 50),
        f"balance_read_p99_ms_{label}": _percentile(current_ms, 99),
        f"pit_balance_p50_ms_{label}": _percentile(pit_ms, 50),
        f"pit_balance_p99_ms_{label}": _percentile(pit_ms, 99),
    }


def _check_pit(rng: random.Random, account_id: int, asset_id: int) -> int:
    """Assert a few point-in-time balances equal the sum of postings effective by then."""
    from ledger.selectors import balance_as_of

    first, last = _history_span(account_id, asset_id)
    span_s = (last - first).total_seconds()
    for _ in range(PIT_CHECKS):
        at = first + timedelta(seconds=rng.uniform(0, span_s))
        with connection.cursor() as cursor:
            cursor.execute(
                "SELECT coalesce(sum(amount), 0) FROM ledger_posting "
                "WHERE account_id = %s AND asset_id = %s AND effective_at <= %s",
                [account_id, asset_id, at],
            )
            expected = int(cursor.fetchone()[0])
        got = balance_as_of(account_id=account_id, asset_id=asset_id, at=at)
        assert got == expected, f"balance as of {at}: {got}, postings say {expected}"
    return PIT_CHECKS


def _balances_consistent() -> bool:
    """Return whether every stored balance equals its postings and the asset sums to 0."""
    with connection.cursor() as cursor:
        cursor.execute(
            """
            SELECT count(*) FROM ledger_balance b
              FULL JOIN (SELECT account_id, asset_id, sum(amount) AS total, count(*) AS n
                           FROM ledger_posting GROUP BY account_id, asset_id) p
                ON p.account_id = b.account_id AND p.asset_id = b.asset_id
             WHERE b.amount IS DISTINCT FROM p.total OR b.posting_count IS DISTINCT FROM p.n
            """
        )
        mismatches = int(cursor.fetchone()[0])
        cursor.execute("SELECT coalesce(sum(amount), 0) FROM ledger_balance")
        total = int(cursor.fetchone()[0])
    return mismatches == 0 and total == 0


def _percentile(ordered: Sequence[float], percent: int) -> float:
    """Return the nearest-rank percentile of sorted values, in their unit, to 3 decimals."""
    if not ordered:
        return 0.0
    rank = max(1, -(-len(ordered) * percent // 100))
    return round(ordered[rank - 1], 3)
