"""`python manage.py demo_node --url http://127.0.0.1:8000`: a simulated inference node.

Used by `make run` so the admin shows usage reports arriving. It registers the demo
node (providers/demo.py), gives itself a fresh API key (revoking the node's earlier
ones: the plain key of a previous run is gone, keys are stored hashed), waits for the
server, then posts a small signed report every --interval seconds with the repo's
client until SIGTERM or Ctrl-C.

Now and then a report repeats a request of the previous one, so the admin also shows
de-duplication at work (counted as duplicate, not billed twice).
"""

from __future__ import annotations

import random
import signal
import threading
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from providers import demo, services
from providers.client import PreparedReport, UsageClient, UsageDeliveryError, UsageReportRejected
from providers.models import InferenceNode

RECORDS_PER_REPORT_MIN = 3
RECORDS_PER_REPORT_MAX = 30
DUPLICATE_EVERY_REPORTS = 15
SERVER_POLL_S = 1.0
ENTERPRISE_WEIGHTS = dict(zip(demo.DEMO_ENTERPRISES, (50, 30, 20), strict=True))
# (typical prompt tokens, typical output tokens, share of output that is reasoning)
MODEL_SHAPES = {
    "qwen3-235b-a22b": (3000, 600, 0.4),
    "llama-4-maverick": (1800, 400, 0.0),
    "deepseek-v3.2": (6000, 900, 0.0),
    "gpt-oss-120b": (2500, 700, 0.5),
}


def _record(rng: random.Random, moment: datetime) -> dict[str, Any]:
    """Return one chat/agent request's usage in the contract's additive shape."""
    model = rng.choice(demo.DEMO_MODELS)
    prompt_typical, output_typical, reasoning_share = MODEL_SHAPES.get(model, (2000, 500, 0.0))
    prompt = max(1, int(rng.lognormvariate(0, 0.8) * prompt_typical))
    # Agents resend long prefixes: about half the requests read most of them from cache.
    cached = int(prompt * rng.uniform(0.5, 0.9)) if rng.random() < 0.5 else 0
    cache_write = int((prompt - cached) * 0.8) if rng.random() < 0.05 else 0
    output = max(1, int(rng.lognormvariate(0, 0.7) * output_typical))
    enterprises = list(ENTERPRISE_WEIGHTS)
    return {
        "request_id": f"req-{uuid.uuid4().hex[:24]}",
        "enterprise": rng.choices(enterprises, weights=list(ENTERPRISE_WEIGHTS.values()))[0],
        "model": model,
        "occurred_at": moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z",
        "input_tokens": prompt - cached - cache_write,
        "output_tokens": output,
        "cached_input_tokens": cached,
        "cache_write_tokens": cache_write,
        "reasoning_tokens": int(output * reasoning_share),
    }


def _records(
    rng: random.Random, *, interval_s: float, previous: list[dict[str, Any]], sequence: int
) -> list[dict[str, Any]]:
    now = datetime.now(UTC)
    count = rng.randint(RECORDS_PER_REPORT_MIN, RECORDS_PER_REPORT_MAX)
    moments = sorted(
        now - timedelta(seconds=rng.uniform(0.5, max(interval_s, 1.0))) for _ in range(count)
    )
    records = [_record(rng, moment) for moment in moments]
    if previous and sequence % DUPLICATE_EVERY_REPORTS == 0:
        records.append(previous[-1])  # the node retried a request it had already reported
    return records


class Command(BaseCommand):
    help = "Simulate an inference node posting usage reports to a running server."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--url", default="http://127.0.0.1:8000", help="server base URL")
        parser.add_argument("--interval", type=float, default=5.0, help="seconds per report")
        parser.add_argument("--reports", type=int, default=0, help="stop after N (0: never)")
        parser.add_argument("--seed", type=int, default=None, help="random seed")

    def handle(self, *args: Any, **options: Any) -> None:
        stop = threading.Event()

        def request_stop(signum: int, frame: object) -> None:
            stop.set()

        signal.signal(signal.SIGTERM, request_stop)
        signal.signal(signal.SIGINT, request_stop)
        demo.demo_load()
        node = demo.demo_node_get_or_create()
        url = options["url"].rstrip("/")
        if not self._wait_for_server(url, stop):
            return
        client = self._client(url, node)
        self.stdout.write(f"demo_node: posting as {node} to {url} every {options['interval']} s")
        client = self._post_until_stopped(client, node, stop, options)
        client.close()
        self.stdout.write("demo_node: stopped")

    def _client(self, url: str, node: InferenceNode) -> UsageClient:
        """Return a client with a fresh key for `node`; the node's older keys are revoked."""
        for key in node.api_keys.filter(revoked_at__isnull=True):
            services.node_key_revoke(key=key)
        _, key_text = services.node_key_create(node=node)
        signing_key = demo.demo_signing_key_bytes(provider=node.provider.slug, node=node.name)
        return UsageClient(
            url, key_text, signing_key=signing_key, retries_max=3, backoff_max_s=2.0,
            report_id_prefix=f"{node.provider.slug}-{node.name}",
        )  # fmt: skip

    def _wait_for_server(self, url: str, stop: threading.Event) -> bool:
        """Return True once the server answers /healthz (any status), False if stopped."""
        announced = False
        while not stop.is_set():
            try:
                with urllib.request.urlopen(f"{url}/healthz", timeout=2):  # noqa: S310
                    return True
            except urllib.error.HTTPError:
                return True  # it answered: up, if not yet healthy
            except OSError:
                if not announced:
                    self.stdout.write(f"demo_node: waiting for {url} ...")
                    announced = True
            stop.wait(SERVER_POLL_S)
        return False

    def _post_until_stopped(
        self, client: UsageClient, node: InferenceNode, stop: threading.Event,
        options: dict[str, Any],
    ) -> UsageClient:  # fmt: skip
        """Post reports until stopped; return the client in use (it may have a new key)."""
        rng = random.Random(options["seed"])
        interval_s = options["interval"]
        previous: list[dict[str, Any]] = []
        pending: PreparedReport | None = None
        sent = 0
        while not stop.is_set() and not (options["reports"] and sent >= options["reports"]):
            if pending is None:
                records = _records(rng, interval_s=interval_s, previous=previous, sequence=sent)
                pending, previous = client.prepare_report(records), records
            try:
                result = client.post(pending)
            except UsageDeliveryError as exc:
                # Kept: the same bytes and report_id go again next time, so a report the
                # server did store is answered as a replay, never counted twice.
                self.stderr.write(f"demo_node: {exc}; will send {pending.report_id} again")
            except UsageReportRejected as exc:
                if exc.code == "invalid_key":  # revoked in the admin: take a new key
                    self.stderr.write("demo_node: key refused; creating a new one")
                    client.close()
                    client = self._client(client.base_url, node)
                else:
                    self.stderr.write(f"demo_node: report {pending.report_id} rejected: {exc}")
                    pending = None
            else:
                counts = result.body.get("records", {})
                self.stdout.write(
                    f"demo_node: {pending.report_id} -> {result.status} "
                    f"{result.body.get('status')}: {counts.get('received')} received, "
                    f"{counts.get('accepted')} accepted, {counts.get('duplicate')} duplicate"
                )
                pending, sent = None, sent + 1
            stop.wait(interval_s * rng.uniform(0.8, 1.2))
        return client
