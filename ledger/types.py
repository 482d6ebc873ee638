"""Named quantities, so a reader sees which integer is which."""

from typing import NewType

# An exact integer count of an asset's smallest unit (a token, a pico-dollar, a cent).
Amount = NewType("Amount", int)
