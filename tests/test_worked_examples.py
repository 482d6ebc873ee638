"""Worked accounting stories: the posting rules of PRODUCT.md, with ledger services only.

One month of Acme using Qwen3 tokens served by provider P1, priced in pico-dollars
(USD at scale 12: $0.075 per million tokens is 75,000 pico-dollars per token, exact),
with a 10 % platform fee. After every step every balance is asserted, every asset sums
to zero, and ledger_verify passes. Real commits, so the database rules check each step.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import ROUND_HALF_EVEN, Decimal

import pytest

from ledger.exceptions import PeriodClosed
from ledger.models import AccountKind, Posting, Transaction
from ledger.services import (
    Leg,
    Posted,
    account_open,
    asset_create,
    period_close,
    period_open,
    transaction_post,
    transaction_reverse,
)
from tests.ledger.factories import (
    assert_books_hold,
    asset_totals,
    committing_db,
    nonzero,
    stored_balances,
)

pytestmark = committing_db

USD_SCALE = 12
PICO_PER_CENT = 10**10
FEE_RATE_PERCENT = 10
E, P = "enterprise:acme", "provider:p1"
INPUT, OUTPUT, CACHED = "tok:qwen3:input", "tok:qwen3:output", "tok:qwen3:cached_input"
# Price card, pico-dollars per token: $0.15, $0.60 and $0.075 per million tokens.
PRICE = {INPUT: 150_000, OUTPUT: 600_000, CACHED: 75_000}


def usd(text: str) -> int:
    """Return dollars written as a decimal string, in pico-dollars (exact or refused)."""
    pico = Decimal(text).scaleb(USD_SCALE)
    assert pico == pico.to_integral_value(), text
    return int(pico)


def cents_floor(pico: int) -> int:
    """Money moves in whole cents; the sub-cent remainder stays on the account."""
    return pico - pico % PICO_PER_CENT


def post(key: str, *legs: tuple[str, str, int], **extra: object) -> Posted:
    return transaction_post(idempotency_key=key, legs=[Leg(a, s, n) for a, s, n in legs], **extra)


def open_chart() -> None:
    asset_create(code="USD", scale=USD_SCALE, name="US dollar (pico)")
    for token_asset in (INPUT, OUTPUT, CACHED):
        asset_create(code=token_asset, scale=0)
    for code, kind in [
        (f"{E}:unbilled", AccountKind.ASSET),
        (f"{E}:receivable", AccountKind.ASSET),
        (f"{E}:credit", AccountKind.LIABILITY),
        (f"{E}:tokens", AccountKind.MEMO),
        (f"{P}:payable", AccountKind.LIABILITY),
        (f"{P}:tokens", AccountKind.MEMO),
        ("platform:cash", AccountKind.ASSET),
        ("platform:fees", AccountKind.INCOME),
        ("platform:processing", AccountKind.EXPENSE),
        ("platform:suspense", AccountKind.LIABILITY),
    ]:
        account_open(code=code, kind=kind)


def rate_usage(key: str, lines: list[tuple[str, int, int]]) -> Posted:
    """Rule 1, one transaction per reconciliation batch: (token asset, tokens, unit price)."""
    legs: list[tuple[str, str, int]] = []
    for token_asset, tokens, unit_price in lines:
        gross = tokens * unit_price
        assert gross * FEE_RATE_PERCENT % 100 == 0  # the fee is exact at this scale
        fee = gross * FEE_RATE_PERCENT // 100
        legs += [
            (f"{E}:unbilled", "USD", gross),
            (f"{P}:payable", "USD", -(gross - fee)),
            ("platform:fees", "USD", -fee),
            (f"{E}:tokens", token_asset, tokens),
            (f"{P}:tokens", token_asset, -tokens),
        ]
    return post(key, *legs, description=f"usage {key}")


def assert_books(expected: dict[tuple[str, str], int]) -> None:
    """Assert every non-zero balance, the zero-sum of every asset, and ledger_verify."""
    assert nonzero(stored_balances()) == expected
    assert set(asset_totals(expected).values()) <= {0}
    assert_books_hold()


@pytest.fixture
def chart() -> None:
    open_chart()


def test_rule_1_usage_rated_in_tokens_and_money(chart):
    rate_usage("batch-1", [(INPUT, 120_000_000, PRICE[INPUT]), (OUTPUT, 35_000_000, PRICE[OUTPUT])])
    # Gross $18.00 + $21.00 = $39.00; fee 10 % = $3.90; owed to P1 $35.10.
    assert_books(
        {
            (f"{E}:unbilled", "USD"): usd("39.00"),
            (f"{P}:payable", "USD"): -usd("35.10"),
            ("platform:fees", "USD"): -usd("3.90"),
            (f"{E}:tokens", INPUT): 120_000_000,
            (f"{P}:tokens", INPUT): -120_000_000,
            (f"{E}:tokens", OUTPUT): 35_000_000,
            (f"{P}:tokens", OUTPUT): -35_000_000,
        }
    )


def test_rule_1_a_sub_cent_price_is_exact_and_any_partition_sums_the_same(chart):
    # 1,234,567 cache reads at $0.075 per million: $0.092592525, not a rounded figure.
    rate_usage("whole", [(CACHED, 1_234_567, PRICE[CACHED])])
    whole = stored_balances()[(f"{E}:unbilled", "USD")]
    assert whole == usd("0.092592525")
    for i, part in enumerate((1, 566, 1_000_000, 234_000)):
        rate_usage(f"part-{i}", [(CACHED, part, PRICE[CACHED])])
    assert stored_balances()[(f"{E}:unbilled", "USD")] == 2 * whole
    assert stored_balances()[("platform:fees", "USD")] == -2 * usd("0.0092592525")
    assert_books_hold()


def test_rule_1_replayed_batch_does_not_double_post(chart):
    lines = [(OUTPUT, 1_000, PRICE[OUTPUT])]
    first = rate_usage("batch-9", lines)
    again = rate_usage("batch-9", lines)
    assert (again.transaction_id, again.created) == (first.transaction_id, False)
    assert_books(
        {
            (f"{E}:unbilled", "USD"): usd("0.0006"),
            (f"{P}:payable", "USD"): -usd("0.00054"),
            ("platform:fees", "USD"): -usd("0.00006"),
            (f"{E}:tokens", OUTPUT): 1_000,
            (f"{P}:tokens", OUTPUT): -1_000,
        }
    )


def test_a_month_of_acme_rules_1_to_6(chart):
    # Rule 4: Acme buys $5.00 of prepaid credit.
    post("credit-1", ("platform:cash", "USD", usd("5.00")), (f"{E}:credit", "USD", -usd("5.00")))
    books = {("platform:cash", "USD"): usd("5.00"), (f"{E}:credit", "USD"): -usd("5.00")}
    assert_books(books)

    # Rule 1: the first batch of usage, three kinds of tokens.
    rate_usage(
        "batch-1",
        [
            (INPUT, 120_000_000, PRICE[INPUT]),
            (OUTPUT, 35_000_000, PRICE[OUTPUT]),
            (CACHED, 1_234_567, PRICE[CACHED]),
        ],
    )
    tokens = {
        (f"{E}:tokens", INPUT): 120_000_000,
        (f"{P}:tokens", INPUT): -120_000_000,
        (f"{E}:tokens", OUTPUT): 35_000_000,
        (f"{P}:tokens", OUTPUT): -35_000_000,
        (f"{E}:tokens", CACHED): 1_234_567,
        (f"{P}:tokens", CACHED): -1_234_567,
    }
    books |= tokens | {
        (f"{E}:unbilled", "USD"): usd("39.092592525"),
        (f"{P}:payable", "USD"): -usd("35.1833332725"),
        ("platform:fees", "USD"): -usd("3.9092592525"),
    }
    assert_books(books)

    # Rule 6: batch 2 was rated at a wrong price ($0.70 per million output tokens).
    wrong = rate_usage("batch-2", [(OUTPUT, 1_000_000, 700_000)])
    reversal = transaction_reverse(
        transaction_id=wrong.transaction_id, idempotency_key="batch-2:reversal"
    )
    assert Transaction.objects.get(pk=reversal.transaction_id).reverses_id == wrong.transaction_id
    assert_books(books)  # the reversal restored every balance, tokens included
    rate_usage("batch-2:corrected", [(OUTPUT, 1_000_000, PRICE[OUTPUT])])
    books[(f"{E}:tokens", OUTPUT)] += 1_000_000
    books[(f"{P}:tokens", OUTPUT)] -= 1_000_000
    books[(f"{E}:unbilled", "USD")] += usd("0.60")
    books[(f"{P}:payable", "USD")] -= usd("0.54")
    books[("platform:fees", "USD")] -= usd("0.06")
    assert_books(books)
    assert books[(f"{E}:unbilled", "USD")] == usd("39.692592525")

    # Rule 2: the invoice is the unbilled amount in whole cents; the rest carries over.
    invoiced = cents_floor(books[(f"{E}:unbilled", "USD")])
    assert invoiced == usd("39.69")
    post("invoice-1", (f"{E}:receivable", "USD", invoiced), (f"{E}:unbilled", "USD", -invoiced))
    credit = usd("5.00")
    post("invoice-1:credit", (f"{E}:credit", "USD", credit), (f"{E}:receivable", "USD", -credit))
    del books[(f"{E}:credit", "USD")]
    books[(f"{E}:unbilled", "USD")] = usd("0.002592525")
    books[(f"{E}:receivable", "USD")] = usd("34.69")
    assert_books(books)

    # Rule 3: Acme pays $34.69; the processor keeps 2.9 % + 30 cents, rounded to a cent.
    paid = books[(f"{E}:receivable", "USD")]
    processor_fee = Decimal("34.69") * Decimal("0.029") + Decimal("0.30")  # $1.30601
    fee = usd(str(processor_fee.quantize(Decimal("0.01"), rounding=ROUND_HALF_EVEN)))
    assert fee == usd("1.31")
    post(
        "payment-1",
        ("platform:cash", "USD", paid - fee),
        ("platform:processing", "USD", fee),
        (f"{E}:receivable", "USD", -paid),
    )
    del books[(f"{E}:receivable", "USD")]
    books[("platform:cash", "USD")] += usd("33.38")
    books[("platform:processing", "USD")] = usd("1.31")
    assert_books(books)

    # Rule 5: P1 is paid what it is owed in whole cents; the sub-cent rest stays owed.
    payout = cents_floor(-books[(f"{P}:payable", "USD")])
    assert payout == usd("35.72")
    post("payout-1", (f"{P}:payable", "USD", payout), ("platform:cash", "USD", -payout))
    books[(f"{P}:payable", "USD")] = -usd("0.0033332725")
    books[("platform:cash", "USD")] = usd("2.66")
    assert_books(books)

    # The month in one line: the platform keeps its fee less processing, to the pico-dollar;
    # the sub-cent remainders ($0.002592525 unbilled, $0.0033332725 owed) carry over.
    assert books == tokens | {
        (f"{E}:tokens", OUTPUT): 36_000_000,
        (f"{P}:tokens", OUTPUT): -36_000_000,
        ("platform:cash", "USD"): usd("2.66"),
        ("platform:processing", "USD"): usd("1.31"),
        ("platform:fees", "USD"): -usd("3.969259252500"),
        (f"{E}:unbilled", "USD"): usd("0.002592525"),
        (f"{P}:payable", "USD"): -usd("0.0033332725"),
    }
    # Statement identity, read back from the receivable's postings:
    # opening + charges - payments - credits = closing.
    by_key = dict(
        Posting.objects.filter(account__code=f"{E}:receivable").values_list(
            "transaction__idempotency_key", "amount"
        )
    )
    charges, credits, payments = (
        by_key["invoice-1"],
        -by_key["invoice-1:credit"],
        -by_key["payment-1"],
    )
    assert (charges, payments, credits) == (usd("39.69"), usd("34.69"), usd("5.00"))
    assert len(by_key) == 3
    assert 0 + charges - payments - credits == stored_balances()[(f"{E}:receivable", "USD")] == 0


def test_late_usage_for_a_closed_month_lands_in_the_open_month_as_an_adjustment(chart):
    october = period_open(year=2024, month=10)
    november = period_open(year=2024, month=11)
    late = datetime(2024, 10, 30, 12, 0, tzinfo=UTC)
    rate_usage("october-batch", [(INPUT, 1_000, PRICE[INPUT])])  # recorded now, dated now
    period_close(period_id=october.pk, closed_by_id=None, note="October closed")

    line = [(f"{E}:tokens", INPUT, 2_000), (f"{P}:tokens", INPUT, -2_000)]
    with pytest.raises(PeriodClosed, match=r"falls in the closed period 2024-10-01"):
        post("late-batch", *line, effective_at=late)
    adjustment = post(
        "late-batch",
        *line,
        effective_at=november.starts_at,
        metadata={"prior_period_adjustment": True, "occurred_in": "2024-10"},
    )
    tx = Transaction.objects.get(pk=adjustment.transaction_id)
    assert (tx.effective_at, tx.metadata["prior_period_adjustment"]) == (
        datetime(2024, 11, 1, tzinfo=UTC),
        True,
    )
    assert stored_balances()[(f"{E}:tokens", INPUT)] == 3_000
    assert_books_hold()
