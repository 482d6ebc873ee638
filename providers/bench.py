"""`python manage.py bench ingest --json`: usage ingestion over the real HTTP stack.

What runs: a scratch database (config/scratch.py), gunicorn serving the real
application on a free loopback port, one node API key per client (nodes of one
provider, so de-duplication spans nodes as in production), and `--clients` processes
each posting its share of `--records` with the repo's client (providers/client.py),
`--records-per-report` records per report. Then every report is sent again: each
must be answered as a replay (200) and store nothing.

Figures: records_per_s is durable — at the end the records committed in the database
are counted and must equal the records sent. Latency is per report, measured by the
client around the HTTP exchange (queueing in gunicorn's backlog included). The CPU
seconds of the clients, the gunicorn workers and PostgreSQL during each phase say
where the time goes on this machine.
"""

from __future__ import annotations

import contextlib
import math
import multiprocessing
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from django.core.management.base import CommandParser
from django.db import connections

from config.scratch import scratch_database
from providers.client import PreparedReport, UsageClient

BASE_DIR = Path(__file__).resolve().parent.parent
PROVIDER = "bench-provider"
SERVER_START_TIMEOUT_S = 60
SERVER_STOP_TIMEOUT_S = 15
PHASE_TIMEOUT_S = 1800
CLOCK_TICKS_PER_S = os.sysconf("SC_CLK_TCK")
IN_PROCESS_CLIENT = 999  # seeds the in-process sample apart from the HTTP clients' data
IN_PROCESS_REPORTS = 10

MODELS = [
    "qwen3-235b-a22b", "qwen3-30b-a3b", "qwen3-32b", "qwen3-coder-480b-a35b", "qwen2.5-72b",
    "qwen2.5-coder-32b", "qwq-32b", "llama-4-maverick", "llama-4-scout", "llama-3.3-70b",
    "llama-3.1-405b", "llama-3.1-8b", "deepseek-v3.2", "deepseek-v3.1", "deepseek-r1",
    "deepseek-r1-distill-llama-70b", "deepseek-coder-v2", "mistral-large-2411",
    "mistral-small-3.2", "mixtral-8x22b", "codestral-2501", "devstral-small", "magistral-medium",
    "gemma-3-27b", "gemma-3-12b", "gemma-2-9b", "phi-4", "phi-4-reasoning", "glm-4.6",
    "glm-4.5-air", "kimi-k2", "kimi-k2-thinking", "minimax-m2", "gpt-oss-120b", "gpt-oss-20b",
    "command-a", "command-r-plus", "nemotron-70b", "nemotron-nano-9b", "olmo-2-32b",
    "granite-3.3-8b", "yi-1.5-34b", "internlm3-8b", "hermes-3-405b", "dbrx-instruct",
    "falcon-180b", "jamba-1.6-large", "ernie-4.5-300b", "hunyuan-a13b", "step-3",
]  # fmt: skip
REASONING_MODELS = frozenset(
    {"qwq-32b", "deepseek-r1", "deepseek-r1-distill-llama-70b", "phi-4-reasoning",
     "magistral-medium", "kimi-k2-thinking", "gpt-oss-120b", "gpt-oss-20b", "qwen3-235b-a22b"}
)  # fmt: skip


def add_arguments(parser: CommandParser) -> None:
    parser.add_argument("--records", type=int, default=200_000, help="records to send")
    parser.add_argument("--clients", type=int, default=4, help="concurrent client processes")
    parser.add_argument("--workers", type=int, default=2, help="gunicorn worker processes")
    parser.add_argument(
        "--threads", type=int, default=1,
        help="threads per gunicorn worker (>1 uses the gthread worker, with keep-alive)",
    )  # fmt: skip
    parser.add_argument("--records-per-report", type=int, default=1000)
    parser.add_argument("--enterprises", type=int, default=2000, help="distinct enterprises")
    parser.add_argument("--seed", type=int, default=7, help="random seed for the usage data")
    parser.add_argument(
        "--no-debug", action="store_true",
        help="run gunicorn with DEBUG off (production settings) instead of DJANGO_DEBUG=1",
    )  # fmt: skip


# --- realistic usage ------------------------------------------------------------------


def _enterprise_names(count: int) -> list[str]:
    return [f"ent-{index:05d}" for index in range(count)]


def _record(rng: random.Random, enterprise: str, moment: datetime) -> dict[str, Any]:
    """Return one request's usage, shaped like a chat or agent call."""
    model = MODELS[min(int(rng.paretovariate(1.2)) - 1, len(MODELS) - 1)]
    prompt = min(int(rng.lognormvariate(7.2, 1.3)) + 1, 190_000)
    cached = int(prompt * rng.uniform(0.3, 0.95)) if rng.random() < 0.45 else 0
    cache_write = int((prompt - cached) * rng.uniform(0.5, 1.0)) if rng.random() < 0.05 else 0
    output = min(int(rng.lognormvariate(5.6, 1.1)) + 1, 32_000)
    reasoning = int(output * rng.uniform(0.3, 0.8)) if model in REASONING_MODELS else 0
    record: dict[str, Any] = {
        "request_id": f"req-{uuid.UUID(int=rng.getrandbits(128), version=4).hex}",
        "enterprise": enterprise,
        "model": model,
        "occurred_at": moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z",
        "input_tokens": prompt - cached - cache_write,
        "output_tokens": output,
        "cached_input_tokens": cached,
        "cache_write_tokens": cache_write,
        "reasoning_tokens": reasoning,
    }
    if rng.random() < 0.1:
        record["service_tier"] = "batch"
    return record


def _reports(
    *, client: int, records: int, per_report: int, enterprises: list[str], seed: int, end: datetime
) -> list[list[dict[str, Any]]]:
    """Return one client's usage as reports in time order, over the hour before `end`."""
    rng = random.Random(seed * 1_000 + client)
    weights = [1 / (rank + 1) for rank in range(len(enterprises))]  # a few big customers
    span_s = 3000.0
    chosen = rng.choices(enterprises, weights=weights, k=records)
    start = end - timedelta(seconds=span_s)
    step_s = span_s / max(records, 1)
    rows = [
        _record(rng, enterprise, start + timedelta(seconds=index * step_s))
        for index, enterprise in enumerate(chosen)
    ]
    return [rows[index : index + per_report] for index in range(0, len(rows), per_report)]


# --- the server -----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _server_env(database_url: str, *, debug: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        DATABASE_URL=database_url,
        DB_CONN_MAX_AGE="600",
        LOG_LEVEL="WARNING",
        # The bench measures ingestion, not the limiter (which still runs on every
        # report): one key per client would otherwise cap it at the per-key rate.
        USAGE_REPORTS_PER_MINUTE_PER_KEY=str(10**9),
        PYTHONUNBUFFERED="1",
    )
    if debug:
        env["DJANGO_DEBUG"] = "1"
    else:
        env.update(
            DJANGO_DEBUG="0",
            DJANGO_SECRET_KEY=secrets.token_urlsafe(50),
            DJANGO_ALLOWED_HOSTS="127.0.0.1",
            DJANGO_SECURE_SSL_REDIRECT="0",  # plain HTTP on loopback
        )
    return env


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    base_url: str
    log_path: Path
    database: str

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")[-3000:]
        return ""

    def worker_pids(self) -> list[int]:
        return _children(self.process.pid)


def _wait_healthy(server: Server) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(f"gunicorn exited at start-up:\n{server.log_tail()}")
        try:
            with urllib.request.urlopen(server.base_url + "/healthz", timeout=5) as answer:  # noqa: S310
                if answer.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"gunicorn did not answer /healthz in time:\n{server.log_tail()}")


@contextlib.contextmanager
def gunicorn(database_url: str, *, workers: int, threads: int, debug: bool) -> Iterator[Server]:
    """Run gunicorn on a free loopback port until the block ends (stopped always)."""
    port = _free_port()
    with tempfile.NamedTemporaryFile(prefix="bench-gunicorn-", suffix=".log", delete=False) as f:
        log_path = Path(f.name)
    command = [
        sys.executable, "-m", "gunicorn", "config.wsgi", "--bind", f"127.0.0.1:{port}",
        "--workers", str(workers), "--threads", str(threads),
        "--worker-class", "gthread" if threads > 1 else "sync",
        "--keep-alive", "5", "--timeout", "120", "--log-level", "warning",
    ]  # fmt: skip
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            command, cwd=BASE_DIR, env=_server_env(database_url, debug=debug),
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    server = Server(
        process=process,
        base_url=f"http://127.0.0.1:{port}",
        log_path=log_path,
        database=database_url.rsplit("/", 1)[-1],
    )
    try:
        _wait_healthy(server)
        yield server
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=SERVER_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log_path.unlink(missing_ok=True)


# --- CPU accounting from /proc (Linux; zeros elsewhere) --------------------------------


def _children(pid: int) -> list[int]:
    with contextlib.suppress(OSError):
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
        return [int(child) for child in text.split()]
    return []


def _process_cpu_s(pid: int) -> float:
    with contextlib.suppress(OSError, ValueError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text()
        fields = stat[stat.rfind(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_S
    return 0.0


def _postgres_pids(database: str) -> tuple[list[int], list[int]]:
    """Return (backends serving `database`, PostgreSQL's own background processes).

    Backends of other databases on the same server (other work on this machine) are
    left out: their CPU shows up as "other".
    """
    backends, background = [], []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if (entry / "comm").read_text().strip() != "postgres":
                continue
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            words = title.split()
            # A backend's title: "postgres: 15/main: <user> <database> <host(port)> <state>".
            if "(" in title or "[local]" in title:
                if database in words[2:4]:
                    backends.append(int(entry.name))
            else:
                background.append(int(entry.name))
    return backends, background


def _machine_cpu_s() -> tuple[float, float]:
    """Return (busy, total) CPU seconds of the whole machine since boot."""
    with contextlib.suppress(OSError):
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
        total = sum(values)
        idle = values[3] + values[4]  # idle + iowait
        return (total - idle) / CLOCK_TICKS_PER_S, total / CLOCK_TICKS_PER_S
    return 0.0, 0.0


@dataclass
class CpuSnapshot:
    gunicorn_s: float
    postgres_s: float
    postgres_background_s: float
    machine_busy_s: float
    machine_total_s: float

    @classmethod
    def take(cls, server: Server) -> CpuSnapshot:
        busy, total = _machine_cpu_s()
        backends, background = _postgres_pids(server.database)
        return cls(
            gunicorn_s=sum(
                _process_cpu_s(pid) for pid in [server.process.pid, *server.worker_pids()]
            ),
            postgres_s=sum(_process_cpu_s(pid) for pid in backends),
            postgres_background_s=sum(_process_cpu_s(pid) for pid in background),
            machine_busy_s=busy,
            machine_total_s=total,
        )


# --- the clients ----------------------------------------------------------------------


def _client_main(
    index: int, base_url: str, api_key: str, reports: list[list[dict[str, Any]]],
    barrier: Any, results: Any,
) -> None:  # fmt: skip
    """Send every report (phase 1), then send them all again (phase 2: replays)."""
    client = UsageClient(base_url, api_key, report_id_prefix=f"bench-c{index}", timeout_s=60)
    prepared: list[PreparedReport] = []
    out: dict[str, Any] = {"latency_s": [], "serialise_s": [], "replay_latency_s": []}
    out.update(accepted=0, received=0, not_created=0, retried=0, replay_not_200=0, error="")
    try:
        barrier.wait()
        cpu_started = time.process_time()
        for batch in reports:
            report = client.prepare_report(batch)
            result = client.post(report)
            prepared.append(report)
            out["serialise_s"].append(report.serialise_s)
            out["latency_s"].append(result.elapsed_s)
            out["accepted"] += result.body["records"]["accepted"]
            out["received"] += result.body["records"]["received"]
            out["not_created"] += result.status != 201
            out["retried"] += result.attempts > 1
        out["cpu_s"] = time.process_time() - cpu_started
        barrier.wait()
        cpu_started = time.process_time()
        for report in prepared:
            result = client.post(report)
            out["replay_latency_s"].append(result.elapsed_s)
            out["replay_not_200"] += result.status != 200
        out["replay_cpu_s"] = time.process_time() - cpu_started
        barrier.wait()
    except Exception as exc:  # reported to the parent, which fails the run with it
        out["error"] = f"{type(exc).__name__}: {exc}"
        barrier.abort()
    finally:
        client.close()
        results.put(out)


def _percentile_ms(values_s: list[float], percentile: float) -> float:
    ordered = sorted(values_s)
    if not ordered:
        return 0.0
    rank = min(len(ordered) - 1, max(0, math.ceil(percentile / 100 * len(ordered)) - 1))  # nearest
    return round(ordered[rank] * 1000, 1)


def _create_keys(clients: int) -> list[str]:
    """Return one API key per client, each for its own node of the bench provider."""
    from providers import services

    provider = services.provider_get_or_create(slug=PROVIDER, name="Bench provider")
    keys = []
    for index in range(clients):
        node = services.inference_node_get_or_create(provider=provider, name=f"node-{index}")
        _, key_text = services.node_key_create(node=node)
        keys.append(key_text)
    return keys


def _stored_records() -> int:
    from providers.models import UsageRecord

    return UsageRecord.objects.count()


def _in_process_ms(*, per_report: int, enterprises: list[str], seed: int, end: datetime) -> dict:
    """Return per-report milliseconds of the server's own work, serially, without HTTP.

    Parse + validate (msgspec) alone, then the whole ingestion service (parse, hash,
    COPY, insert with de-duplication, commit), on fresh records of another node.
    """
    from django.utils import timezone

    from providers import services
    from providers.validation import report_parse

    provider = services.provider_get_or_create(slug=PROVIDER)
    node = services.inference_node_get_or_create(provider=provider, name="in-process")
    key = services.node_key_authenticate(key_text=services.node_key_create(node=node)[1])
    builder = UsageClient("http://127.0.0.1:9", "unused", report_id_prefix="in-process")
    bodies = [
        builder.prepare_report(batch).body
        for batch in _reports(client=IN_PROCESS_CLIENT, records=IN_PROCESS_REPORTS * per_report,
                              per_report=per_report, enterprises=enterprises, seed=seed, end=end)
    ]  # fmt: skip
    parse_s, ingest_s = [], []
    for body in bodies:
        started = time.perf_counter()
        report_parse(body=body, now=timezone.now())
        parse_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        services.usage_report_ingest(key=key, body=body, signature=None)
        ingest_s.append(time.perf_counter() - started)
    return {
        "parse_validate_p50": _percentile_ms(parse_s, 50),
        "ingest_service_p50": _percentile_ms(ingest_s, 50),
        "reports": len(bodies),
    }


def _cpu_breakdown(before: CpuSnapshot, after: CpuSnapshot, clients_s: float) -> dict[str, float]:
    machine_s = after.machine_busy_s - before.machine_busy_s
    gunicorn_s = after.gunicorn_s - before.gunicorn_s
    postgres_s = after.postgres_s - before.postgres_s
    background_s = after.postgres_background_s - before.postgres_background_s
    ours_s = clients_s + gunicorn_s + postgres_s + background_s
    return {
        "clients": round(clients_s, 2),
        "gunicorn": round(gunicorn_s, 2),
        "postgres_backends": round(postgres_s, 2),
        "postgres_background": round(background_s, 2),  # WAL writer, checkpointer: shared
        "other_work_on_machine": round(max(0.0, machine_s - ours_s), 2),
        "idle": round((after.machine_total_s - before.machine_total_s) - machine_s, 2),
    }


def run(options: dict[str, Any]) -> dict[str, Any]:
    records, clients = options["records"], options["clients"]
    per_report = options["records_per_report"]
    assert records > 0, records
    assert clients > 0, clients
    assert per_report > 0, per_report
    enterprises = _enterprise_names(options["enterprises"])
    end = datetime.now(UTC) - timedelta(minutes=5)
    shares = [records // clients + (index < records % clients) for index in range(clients)]
    generate_started = time.monotonic()
    usage = [
        _reports(client=index, records=share, per_report=per_report,
                 enterprises=enterprises, seed=options["seed"], end=end)
        for index, share in enumerate(shares)
    ]  # fmt: skip
    generate_s = time.monotonic() - generate_started

    with scratch_database(keep=options["keep"]) as database_url:
        keys = _create_keys(clients)
        connections.close_all()  # nothing Django-owned crosses the fork below
        with gunicorn(
            database_url, workers=options["workers"], threads=options["threads"],
            debug=not options["no_debug"],
        ) as server:  # fmt: skip
            context = multiprocessing.get_context("fork")
            barrier = context.Barrier(clients + 1, timeout=PHASE_TIMEOUT_S)
            results = context.Queue()
            processes = [
                context.Process(
                    target=_client_main,
                    args=(index, server.base_url, keys[index], usage[index], barrier, results),
                )
                for index in range(clients)
            ]
            for process in processes:
                process.start()
            try:
                barrier.wait()
                cpu_0, started = CpuSnapshot.take(server), time.monotonic()
                barrier.wait()
                cpu_1, sent_at = CpuSnapshot.take(server), time.monotonic()
                barrier.wait()
                cpu_2, replayed_at = CpuSnapshot.take(server), time.monotonic()
            except Exception as exc:
                outs = [results.get(timeout=60) for _ in processes]
                errors = [out["error"] for out in outs if out["error"]]
                raise RuntimeError(
                    f"a client failed: {errors or exc}\n{server.log_tail()}"
                ) from exc
            outs = [results.get(timeout=60) for _ in processes]
            for process in processes:
                process.join(timeout=60)
        stored = _stored_records()
        in_process_ms = _in_process_ms(
            per_report=per_report, enterprises=enterprises, seed=options["seed"], end=end
        )

    latency_s = [value for out in outs for value in out["latency_s"]]
    replay_latency_s = [value for out in outs for value in out["replay_latency_s"]]
    serialise_s = [value for out in outs for value in out["serialise_s"]]
    accepted = sum(out["accepted"] for out in outs)
    assert stored == records, f"{stored} records committed, {records} sent"
    assert accepted == records, f"{accepted} records accepted, {records} sent"
    assert sum(out["replay_not_200"] for out in outs) == 0, "a replay was not answered 200"
    assert sum(out["not_created"] for out in outs) == 0, "a first send was not answered 201"
    send_s, replay_s = sent_at - started, replayed_at - sent_at
    cpu = _cpu_breakdown(cpu_0, cpu_1, sum(out["cpu_s"] for out in outs))
    own_cpu_s = cpu["clients"] + cpu["gunicorn"] + cpu["postgres_backends"]
    return {
        "suite": "ingest",
        "records": records,
        "reports": len(latency_s),
        "records_per_report": per_report,
        "clients": clients,
        "gunicorn_workers": options["workers"],
        "gunicorn_threads": options["threads"],
        "django_debug": not options["no_debug"],
        "records_committed": stored,
        "seconds": round(send_s, 3),
        "records_per_s": round(records / send_s),
        "p50_ms": _percentile_ms(latency_s, 50),
        "p99_ms": _percentile_ms(latency_s, 99),
        "max_ms": _percentile_ms(latency_s, 100),
        "reports_retried": sum(out["retried"] for out in outs),
        "replay_seconds": round(replay_s, 3),
        "replay_records_per_s": round(records / replay_s),
        "replay_p50_ms": _percentile_ms(replay_latency_s, 50),
        "replay_p99_ms": _percentile_ms(replay_latency_s, 99),
        "client_serialise_ms_p50": _percentile_ms(serialise_s, 50),
        "client_serialise_share": round(sum(serialise_s) / (sum(serialise_s) + sum(latency_s)), 3),
        "cpu_s": cpu,
        # The machine is shared, so wall-clock rates move with other work. Records per
        # CPU second this stack used (clients, gunicorn, its PostgreSQL backends) does
        # not; times the cores it is the ceiling with the machine to itself.
        "records_per_own_cpu_s": round(records / own_cpu_s) if own_cpu_s else None,
        "replay_cpu_s": _cpu_breakdown(cpu_1, cpu_2, sum(out["replay_cpu_s"] for out in outs)),
        "server_in_process_ms": in_process_ms,
        "data_generation_s": round(generate_s, 2),
        "cores": os.cpu_count(),
    }
