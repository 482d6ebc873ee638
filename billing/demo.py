"""Demo books: the chart of accounts of PRODUCT.md and one month told in postings.

Every amount is derived from a price, a token count and a fee rate with exact integer
arithmetic, so the demo shows the posting rules as billing will apply them. Fixed
idempotency keys and fixed dates make loading twice a no-op.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from ledger import services as ledger
from ledger.models import AccountKind
from ledger.services import Leg

USD_SCALE = 12  # pico-dollars: exact for any price with up to 6 decimals per million tokens
PICO_PER_DOLLAR = 10**USD_SCALE
CENT = PICO_PER_DOLLAR // 100

ENTERPRISES = ("acme", "globex")
PROVIDERS = ("qwenhost", "llamaworks")
MODELS = {  # model -> (provider, USD per million input tokens, per million output tokens)
    "qwen3-235b-a22b": ("qwenhost", Decimal("0.22"), Decimal("0.88")),
    "llama-4-maverick": ("llamaworks", Decimal("0.15"), Decimal("0.60")),
}
FEE_RATE = Decimal("0.10")


def _price_per_token(per_million: Decimal) -> int:
    units = per_million * PICO_PER_DOLLAR / 1_000_000
    assert units == units.to_integral_value(), "price not exact at the ledger's scale"
    return int(units)


def _chart() -> None:
    ledger.asset_create(code="USD", scale=USD_SCALE, name="US dollar (pico-dollars)")
    for model in MODELS:
        for kind in ("input", "output"):
            ledger.asset_create(code=f"tok:{model}:{kind}", scale=0, name=f"{model} {kind}")
    for code, kind in (
        ("cash", AccountKind.ASSET),
        ("fees", AccountKind.INCOME),
        ("processing", AccountKind.EXPENSE),
        ("suspense", AccountKind.LIABILITY),
    ):
        ledger.account_open(code=f"platform:{code}", kind=kind, owner="platform")
    for slug in ENTERPRISES:
        owner = f"enterprise:{slug}"
        for code, kind in (
            ("unbilled", AccountKind.ASSET),
            ("receivable", AccountKind.ASSET),
            ("credit", AccountKind.LIABILITY),
            ("tokens", AccountKind.MEMO),
        ):
            ledger.account_open(code=f"{owner}:{code}", kind=kind, owner=owner)
    for slug in PROVIDERS:
        owner = f"provider:{slug}"
        ledger.account_open(code=f"{owner}:payable", kind=AccountKind.LIABILITY, owner=owner)
        ledger.account_open(code=f"{owner}:tokens", kind=AccountKind.MEMO, owner=owner)


def _usage(
    enterprise: str, model: str, input_tokens: int, output_tokens: int, day: datetime
) -> tuple[int, int]:
    """Post rule 1, in money and tokens; return (gross, provider's share)."""
    provider, input_price, output_price = MODELS[model]
    gross = input_tokens * _price_per_token(input_price) + output_tokens * _price_per_token(
        output_price
    )
    fee = gross * int(FEE_RATE * 100) // 100  # exact: gross is a multiple of 100 here
    assert fee * 100 == gross * int(FEE_RATE * 100)
    ledger.transaction_post(
        idempotency_key=f"demo:usage:{enterprise}:{model}:{day:%Y-%m-%d}",
        description=f"Usage rated: {enterprise} on {model}, {day:%Y-%m-%d}",
        effective_at=day,
        legs=[
            Leg(f"enterprise:{enterprise}:unbilled", "USD", gross),
            Leg(f"provider:{provider}:payable", "USD", -(gross - fee)),
            Leg("platform:fees", "USD", -fee),
            Leg(f"enterprise:{enterprise}:tokens", f"tok:{model}:input", input_tokens),
            Leg(f"provider:{provider}:tokens", f"tok:{model}:input", -input_tokens),
            Leg(f"enterprise:{enterprise}:tokens", f"tok:{model}:output", output_tokens),
            Leg(f"provider:{provider}:tokens", f"tok:{model}:output", -output_tokens),
        ],
    )
    return gross, gross - fee


def demo_load() -> None:
    """Load the demo books; loading twice changes nothing."""
    _chart()
    september = ledger.period_open(year=2026, month=9)
    ledger.period_open(year=2026, month=10)
    acme_gross = qwenhost_share = 0
    for day in (1, 15):
        when = datetime(2026, 9, day, 12, tzinfo=UTC)
        gross, share = _usage("acme", "qwen3-235b-a22b", 1_200_000, 350_000, when)
        acme_gross += gross
        qwenhost_share += share
        _usage("globex", "llama-4-maverick", 800_000, 120_000, when)
    ledger.transaction_post(
        idempotency_key="demo:credit:acme:2026-09",
        description="Prepaid credit purchased by acme",
        effective_at=datetime(2026, 9, 20, tzinfo=UTC),
        legs=[
            Leg("platform:cash", "USD", 50 * 100 * CENT),
            Leg("enterprise:acme:credit", "USD", -50 * 100 * CENT),
        ],
    )
    ledger.period_close(period_id=september.pk, closed_by_id=None, note="demo close")
    # Money moves in whole cents; the sub-cent remainder stays unbilled and carries.
    invoice = acme_gross // CENT * CENT
    ledger.transaction_post(
        idempotency_key="demo:invoice:acme:2026-09",
        description="Invoice finalized: acme, September 2026 (remainder carried)",
        effective_at=datetime(2026, 10, 1, 1, tzinfo=UTC),
        legs=[
            Leg("enterprise:acme:receivable", "USD", invoice),
            Leg("enterprise:acme:unbilled", "USD", -invoice),
        ],
    )
    ledger.transaction_post(
        idempotency_key="demo:credit-applied:acme:2026-09",
        description="Prepaid credit applied to acme's September invoice",
        effective_at=datetime(2026, 10, 1, 1, tzinfo=UTC),
        legs=[
            Leg("enterprise:acme:credit", "USD", invoice),
            Leg("enterprise:acme:receivable", "USD", -invoice),
        ],
    )
    payout = qwenhost_share // CENT * CENT
    ledger.transaction_post(
        idempotency_key="demo:payout:qwenhost:2026-09",
        description="Payout to qwenhost for September 2026",
        effective_at=datetime(2026, 10, 5, tzinfo=UTC),
        legs=[
            Leg("provider:qwenhost:payable", "USD", payout),
            Leg("platform:cash", "USD", -payout),
        ],
    )
