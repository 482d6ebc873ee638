"""The amount column: an exact integer of an asset's smallest unit.

NUMERIC(38,0), not BIGINT: money is accrued at a sub-cent scale fine enough that every
price times any token count is exact (e.g. pico-dollars, scale 12), and at that scale
BIGINT would overflow at about $9.2 million, which a busy fees or cash account passes.
38 digits hold 10^26 dollars at scale 12. Python sees plain ints, never Decimal or float.
"""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from django.db import models

AMOUNT_DIGITS_MAX = 38


class AmountField(models.DecimalField):  # type: ignore[type-arg]
    _pyi_private_set_type: int | Decimal
    _pyi_private_get_type: int  # type: ignore[assignment]
    _pyi_lookup_exact_type: int | Decimal
    description = "Exact integer amount in an asset's smallest unit (NUMERIC(38,0))"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["max_digits"] = AMOUNT_DIGITS_MAX
        kwargs["decimal_places"] = 0
        super().__init__(*args, **kwargs)

    def deconstruct(self) -> Any:
        name, path, args, kwargs = super().deconstruct()
        kwargs.pop("max_digits", None)
        kwargs.pop("decimal_places", None)
        return name, path, args, kwargs

    def from_db_value(self, value: Any, expression: Any, connection: Any) -> int | None:
        if value is None:
            return None
        return int(value)

    def to_python(self, value: Any) -> Any:
        value = super().to_python(value)
        if isinstance(value, Decimal):
            if value != value.to_integral_value():
                raise ValueError(f"amount {value} is not a whole number of smallest units")
            return int(value)
        return value
