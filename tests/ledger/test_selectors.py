"""Reads of the books against a brute-force sum of postings.

The point-in-time balance (ledger/selectors.py) is computed from the running balance
stored on each posting plus the postings recorded after the instant but effective at
or before it. The scenario below posts, with real commits, transactions whose effective
times are out of order with their recording: current ones, ones back-dated by less
than BACKDATED_LAG, by a little more, and by an hour; then it compares every balance at
every instant that matters with the sum of postings effective at or before it.
"""

from __future__ import annotations

import itertools
import random
import time
from datetime import UTC, datetime, timedelta, timezone

import pytest
from django.db import connection, transaction

from ledger.models import Account, Asset, Posting
from ledger.selectors import (
    BACKDATED_LAG,
    account_history,
    balance_as_of,
    balance_get,
    normal_balance,
    trial_balance,
)
from ledger.services import transaction_post
from tests.ledger.factories import (
    assert_books_hold,
    asset_totals,
    chart,
    committing_db,
    db_now,
    legs,
    nonzero,
    posting_sums,
    stored_balances,
    transfer,
)

ACCOUNTS = ("platform:cash", "platform:fees", "enterprise:acme:credit", "provider:p1:payable")
US = timedelta(microseconds=1)


def post_random(rng: random.Random, key: str, effective_at: datetime | None) -> None:
    a, b, c = rng.sample(ACCOUNTS, 3)
    usd, tok = rng.randint(1, 10**6), rng.randint(1, 10**4)
    transaction_post(
        idempotency_key=key,
        effective_at=effective_at,
        legs=legs((a, "USD", usd), (b, "USD", -usd), (c, "TOK", tok), (a, "TOK", -tok)),
    )


def post_old_and_late(rng: random.Random) -> datetime:
    """Post history out of effective order; return the hour-ago instant it starts at.

    Old entries in shuffled effective order, then current traffic interleaved with late
    arrivals dated back by less and more than the lag.
    """
    hour_ago = db_now() - timedelta(hours=1)
    offsets = list(range(10))
    rng.shuffle(offsets)
    for i in offsets:
        post_random(rng, f"old-{i}", hour_ago + timedelta(minutes=3 * i))
    for i in range(12):
        post_random(rng, f"now-{i}", None)
        lag_s = (0.002, 0.0099, 0.0101, 0.05, 1.5, 30.0)[i % 6]
        post_random(rng, f"late-{i}", db_now() - timedelta(seconds=lag_s))
        time.sleep(0.02)
    return hour_ago


def instants_that_matter(rng: random.Random, count: int) -> list[datetime]:
    """Return `count` of: every posting's effective and recorded time (and recorded minus
    the lag), a microsecond either side, midpoints between them; plus the extremes."""
    times: set[datetime] = set()
    for effective_at, recorded_at in Posting.objects.values_list("effective_at", "recorded_at"):
        for t in (
            effective_at,
            recorded_at,
            recorded_at - BACKDATED_LAG,
            effective_at + BACKDATED_LAG,
        ):
            times.update((t - US, t, t + US))
    ordered = sorted(times)
    between = {a + (b - a) / 2 for a, b in itertools.pairwise(ordered)}
    pool = sorted(times | between)
    sample = rng.sample(pool, min(count, len(pool)))
    return sorted({*sample, ordered[0] - timedelta(days=1), db_now()})


@committing_db
def test_balance_as_of_equals_the_sum_of_postings_effective_by_then_at_every_instant():
    w = chart()
    rng = random.Random(20260101)
    post_old_and_late(rng)
    instants = instants_that_matter(rng, 400)
    assert len(instants) == 402
    postings = list(Posting.objects.values_list("account_id", "asset_id", "effective_at", "amount"))
    assert len(postings) == 34 * 4
    pairs = [(acc, ass) for acc in Account.objects.all() for ass in Asset.objects.all()]
    mismatches = []
    for at in instants:
        for account, asset in pairs:
            got = balance_as_of(account_id=account.id, asset_id=asset.id, at=at)
            want = sum(n for a, s, e, n in postings if (a, s) == (account.id, asset.id) and e <= at)
            if got != want:
                mismatches.append((at.isoformat(), account.code, asset.code, got, want))
    assert mismatches == []
    # Now, balance_as_of agrees with the O(1) current balance.
    now = db_now()
    for account, asset in pairs:
        assert balance_as_of(account_id=account.id, asset_id=asset.id, at=now) == balance_get(
            account_id=account.id, asset_id=asset.id
        )
    assert balance_get(account_id=w["cash"].id, asset_id=w["usd"].id) == posting_sums().get(
        ("platform:cash", "USD"), 0
    )
    # Every read above ran outside a transaction: one statement, prepared once on this
    # connection (through libpq) and run for each call.
    assert prepared_as_of_runs() == len(instants) * len(pairs) + len(pairs)
    # Inside a transaction the read is planned per call, on the cursor: the same answers,
    # as after the prepared statement was dropped (a pooler's DISCARD), and for an instant
    # given without its offset (read in the session's zone, UTC).
    sample = [(at, account.id, asset.id) for at in instants[::25] for account, asset in pairs]
    outside = [balance_as_of(account_id=a, asset_id=s, at=at) for at, a, s in sample]
    with transaction.atomic():
        inside = [balance_as_of(account_id=a, asset_id=s, at=at) for at, a, s in sample]
    with connection.cursor() as cursor:
        cursor.execute("DEALLOCATE ALL")
    again = [balance_as_of(account_id=a, asset_id=s, at=at) for at, a, s in sample]
    naive = [
        balance_as_of(account_id=a, asset_id=s, at=at.astimezone(UTC).replace(tzinfo=None))
        for at, a, s in sample
    ]
    assert inside == outside == again == naive
    assert len(set(outside)) > 5
    assert prepared_as_of_runs() == len(sample) * 2
    assert_books_hold()


@committing_db
def test_account_history_is_every_posting_of_the_range_in_effective_order_at_every_edge():
    """The history reads by recorded time (there is no effective-time index): brute force.

    The traffic of the test above (shuffled old history, late arrivals dated back by
    less and more than the lag), and arrivals a few milliseconds late, dated before the
    two postings recorded just before them: within the lag, so not in the back-dated
    index, yet out of effective order in the recorded-time one. Ranges cut at every
    instant that matters, pages of 1 to all.
    """
    chart()
    rng = random.Random(20261123)
    hour_ago = post_old_and_late(rng)
    for i in range(6):
        first = transfer(f"on-time-{i}", "platform:cash", "platform:fees", 7)
        dated = Posting.objects.filter(transaction_id=first.transaction_id)[0].effective_at
        transfer(f"on-time-{i}-b", "platform:cash", "platform:fees", 3)
        transfer(f"ms-late-{i}", "platform:cash", "platform:fees", 11, effective_at=dated - US)
        time.sleep(0.02)
    instants = instants_that_matter(rng, 120)
    postings = list(
        Posting.objects.values_list("id", "account_id", "asset_id", "effective_at", "amount")
    )
    pairs = [(acc.id, ass.id) for acc in Account.objects.all() for ass in Asset.objects.all()]
    # Random ranges; then short pages starting just before each recent posting.
    cases = [
        (*sorted(rng.sample(instants, 2)), rng.choice(pairs), rng.choice((1, 2, 3, 5, 8, 10_000)))
        for _ in range(150)
    ]
    cases += [
        (e - US, instants[-1], (a, s), limit)
        for _, a, s, e, _ in postings
        if e > hour_ago + timedelta(minutes=30)
        for limit in (1, 2)
    ]
    checked = truncated = 0
    mismatches = []
    for since, until, (account, asset), limit in cases:
        mine = sorted((e, i, n) for i, a, s, e, n in postings if (a, s) == (account, asset))
        opening = sum(n for e, _, n in mine if e < since)
        in_range = [(i, n) for e, i, n in mine if since <= e < until]
        running = itertools.accumulate((n for _, n in in_range), initial=opening)
        want = list(zip((i for i, _ in in_range), list(running)[1:], strict=True))[:limit]
        history = account_history(
            account_id=account, asset_id=asset, since=since, until=until, limit=limit
        )
        got = [(r.posting_id, r.running_balance) for r in history.rows]
        if (got, history.opening_balance, history.truncated) != (
            want,
            opening,
            len(in_range) > limit,
        ):
            mismatches.append((since.isoformat(), until.isoformat(), limit, got, want))
        checked += len(want)
        truncated += history.truncated
    assert mismatches == []
    # Not all of them empty or whole pages.
    assert checked > 300
    assert truncated > 100


def prepared_as_of_runs() -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT sum(generic_plans + custom_plans) FROM pg_prepared_statements "
            "WHERE name LIKE 'ledger_balance_as_of%%'"
        )
        return int(cursor.fetchone()[0] or 0)


@pytest.mark.django_db
def test_balance_get_is_the_sum_of_postings_and_zero_when_nothing_was_posted():
    w = chart()
    assert balance_get(account_id=w["cash"].id, asset_id=w["usd"].id) == 0
    amounts = [5, 17, -3, 250, -1000, 1]
    for i, n in enumerate(amounts):
        transfer(f"t-{i}", "platform:cash", "platform:fees", n)
    assert balance_get(account_id=w["cash"].id, asset_id=w["usd"].id) == sum(amounts) == -730
    assert balance_get(account_id=w["fees"].id, asset_id=w["usd"].id) == 730
    assert balance_get(account_id=w["cash"].id, asset_id=w["tok"].id) == 0
    assert stored_balances() == posting_sums()


@committing_db
def test_balance_as_of_reads_the_ends_of_the_calendar_and_any_offset_outside_a_transaction():
    """Outside a transaction the instant goes to libpq as text, with its own offset:
    nothing overflows at the ends of datetime's range, and an offset with seconds
    (sent in UTC) names the same instant."""
    w = chart()
    transfer("a", "platform:cash", "platform:fees", 5)
    cash, usd = w["cash"].id, w["usd"].id
    east, west = timezone(timedelta(hours=5)), timezone(timedelta(hours=-5))
    assert balance_as_of(account_id=cash, asset_id=usd, at=datetime.min.replace(tzinfo=east)) == 0
    assert balance_as_of(account_id=cash, asset_id=usd, at=datetime.max.replace(tzinfo=west)) == 5
    (effective_at,) = Posting.objects.filter(account_id=cash).values_list("effective_at", flat=True)
    odd = timezone(timedelta(seconds=1, microseconds=5))
    assert balance_as_of(account_id=cash, asset_id=usd, at=(effective_at - US).astimezone(odd)) == 0
    assert balance_as_of(account_id=cash, asset_id=usd, at=effective_at.astimezone(odd)) == 5
    assert balance_as_of(account_id=cash, asset_id=usd, at=effective_at.astimezone(west)) == 5


@pytest.mark.django_db
def test_balance_as_of_before_everything_is_zero_and_ignores_other_accounts_and_assets():
    w = chart()
    start = db_now()
    transfer("a", "platform:cash", "platform:fees", 10, effective_at=start - timedelta(days=2))
    transfer("b", "platform:cash", "enterprise:acme:credit", 7, "TOK")
    cash, usd, tok = w["cash"].id, w["usd"].id, w["tok"].id
    assert balance_as_of(account_id=cash, asset_id=usd, at=start - timedelta(days=3)) == 0
    assert balance_as_of(account_id=cash, asset_id=usd, at=start - timedelta(days=1)) == 10
    assert balance_as_of(account_id=cash, asset_id=tok, at=start - timedelta(days=1)) == 0
    assert balance_as_of(account_id=cash, asset_id=tok, at=db_now()) == 7


@pytest.mark.django_db
def test_trial_balance_sums_to_zero_per_asset_now_and_as_of_a_past_instant():
    chart()
    now = db_now()
    transfer(
        "old",
        "platform:cash",
        "enterprise:acme:credit",
        1_000,
        effective_at=now - timedelta(days=10),
    )
    transfer(
        "fee", "enterprise:acme:credit", "platform:fees", 30, effective_at=now - timedelta(days=5)
    )
    transfer("tok", "enterprise:acme:credit", "provider:p1:payable", 9, "TOK")
    transfer("pay", "provider:p1:payable", "platform:cash", 400)

    rows = trial_balance()
    assert [(r.asset, r.scale, r.account, r.kind, r.balance) for r in rows] == [
        ("TOK", 0, "enterprise:acme:credit", "liability", 9),
        ("TOK", 0, "provider:p1:payable", "liability", -9),
        ("USD", 2, "enterprise:acme:credit", "liability", -970),
        ("USD", 2, "platform:cash", "asset", 600),
        ("USD", 2, "platform:fees", "income", -30),
        ("USD", 2, "provider:p1:payable", "liability", 400),
    ]
    assert {r.account: (r.debit, r.credit) for r in rows if r.asset == "USD"} == {
        "enterprise:acme:credit": (0, 970),
        "platform:cash": (600, 0),
        "platform:fees": (0, 30),
        "provider:p1:payable": (400, 0),
    }
    assert asset_totals({(r.account, r.asset): r.balance for r in rows}) == {"TOK": 0, "USD": 0}

    past = trial_balance(at=now - timedelta(days=7))
    assert [(r.asset, r.account, r.balance) for r in past] == [
        ("USD", "enterprise:acme:credit", -1_000),
        ("USD", "platform:cash", 1_000),
    ]
    assert sum(r.debit for r in past) == sum(r.credit for r in past) == 1_000
    for at in (
        now - timedelta(days=11),
        now - timedelta(days=5),
        now - timedelta(days=4),
        db_now(),
    ):
        as_of = {(r.account, r.asset): r.balance for r in trial_balance(at=at)}
        assert as_of == nonzero(posting_sums(at=at))
        assert set(asset_totals(as_of).values()) <= {0}
    assert trial_balance(at=now - timedelta(days=11)) == []


@pytest.mark.django_db
def test_account_history_gives_the_running_balance_in_effective_order():
    w = chart()
    now = db_now()
    day = timedelta(days=1)
    # Posted out of effective order: the history is read in effective order.
    transfer("d3", "platform:cash", "platform:fees", 300, effective_at=now - 3 * day)
    transfer("d9", "platform:cash", "platform:fees", 900, effective_at=now - 9 * day)
    transfer("d5", "platform:fees", "platform:cash", 50, effective_at=now - 5 * day)
    transfer("d1", "platform:cash", "platform:fees", 10, effective_at=now - day)
    transfer("d4", "platform:cash", "platform:fees", 4, effective_at=now - 4 * day)

    history = account_history(
        account_id=w["cash"].id, asset_id=w["usd"].id, since=now - 6 * day, until=now - day
    )
    assert history.opening_balance == 900
    assert [(r.idempotency_key, r.amount, r.running_balance) for r in history.rows] == [
        ("d5", -50, 850),
        ("d4", 4, 854),
        ("d3", 300, 1154),
    ]
    assert not history.truncated
    assert history.rows[-1].running_balance == balance_as_of(
        account_id=w["cash"].id, asset_id=w["usd"].id, at=now - day - US
    )
    assert [r.effective_at for r in history.rows] == [now - 5 * day, now - 4 * day, now - 3 * day]

    limited = account_history(
        account_id=w["cash"].id, asset_id=w["usd"].id, since=now - 10 * day, until=now, limit=2
    )
    assert limited.opening_balance == 0
    assert [(r.idempotency_key, r.running_balance) for r in limited.rows] == [
        ("d9", 900),
        ("d5", 850),
    ]
    assert limited.truncated


@pytest.mark.parametrize(
    ("kind", "balance", "expected"),
    [("asset", 5, 5), ("expense", -5, -5), ("memo", 7, 7), ("liability", -5, 5), ("income", 3, -3)],
)
def test_normal_balance_reads_credits_as_positive_for_credit_normal_kinds(kind, balance, expected):
    assert normal_balance(kind=kind, balance=balance) == expected
