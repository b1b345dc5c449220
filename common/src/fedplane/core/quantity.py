"""Kubernetes-style resource quantities ("500m", "4Gi", "2") to Fedplane's canonical integers.

Canonical units: cpu in millicores, memory and storage in bytes, everything else a count.
"""

from __future__ import annotations

import re
from decimal import Decimal

CPU = "cpu"
MEMORY = "memory"
GPU = "nvidia.com/gpu"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
# Short names accepted in specs and config files.
ALIASES = {"gpu": GPU, "mem": MEMORY}
# Quantities travel as int64 (fedplane.v1.Resources).
MAX_QUANTITY = 2**63 - 1

_SUFFIX = {
    "": Decimal(1),
    "m": Decimal("0.001"),
    "k": Decimal(10**3),
    "M": Decimal(10**6),
    "G": Decimal(10**9),
    "T": Decimal(10**12),
    "P": Decimal(10**15),
    "Ki": Decimal(2**10),
    "Mi": Decimal(2**20),
    "Gi": Decimal(2**30),
    "Ti": Decimal(2**40),
    "Pi": Decimal(2**50),
}
_QUANTITY = re.compile(r"^\s*([+]?[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*(Ki|Mi|Gi|Ti|Pi|m|k|M|G|T|P|)\s*$")


class QuantityError(ValueError):
    pass


def canonical_name(resource: str) -> str:
    return ALIASES.get(resource, resource)


def parse(resource: str, value: str | int | float) -> int:
    """Parse one quantity of `resource` into canonical units (rounded up, never negative)."""
    resource = canonical_name(resource)
    if isinstance(value, bool):
        raise QuantityError(f"{resource}: {value!r} is not a quantity")
    match = _QUANTITY.match(str(value))
    if not match:
        raise QuantityError(f"{resource}: {value!r} is not a quantity (examples: 500m, 4Gi, 2)")
    try:
        amount = Decimal(match.group(1)) * _SUFFIX[match.group(2)]
        if resource == CPU:
            amount *= 1000
    except ArithmeticError as exc:  # e.g. decimal.Overflow for "1e999999999"
        raise QuantityError(f"{resource}: {value!r} is not a quantity") from exc
    if amount > MAX_QUANTITY:
        raise QuantityError(f"{resource}: {value!r} is too large (the limit is {MAX_QUANTITY})")
    return int(amount.to_integral_value(rounding="ROUND_CEILING"))


def parse_map(values: dict[str, str | int | float]) -> dict[str, int]:
    return {canonical_name(k): parse(k, v) for k, v in values.items()}


def format_quantity(resource: str, amount: int) -> str:
    """Human form of a canonical amount, for tables and explanations."""
    if resource == CPU:
        return f"{amount // 1000}" if amount % 1000 == 0 else f"{amount}m"
    if resource == MEMORY or resource.endswith("storage"):
        for suffix, size in (("Ti", 2**40), ("Gi", 2**30), ("Mi", 2**20), ("Ki", 2**10)):
            if amount >= size:
                value = amount / size
                return f"{value:.0f}{suffix}" if value == int(value) else f"{value:.1f}{suffix}"
        return str(amount)
    return str(amount)
