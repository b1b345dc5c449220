"""Kubernetes-style quantities to canonical integers and back."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedplane.core import quantity
from fedplane.core.quantity import QuantityError, canonical_name, format_quantity, parse, parse_map

Ki, Mi, Gi, Ti, Pi = (2**10 * 1024**i for i in range(5))


@pytest.mark.parametrize(
    ("value", "millicores"),
    [
        ("500m", 500),
        ("2", 2000),
        (2, 2000),
        (0.5, 500),
        ("0.25", 250),
        ("1.5", 1500),
        ("100m", 100),
        ("0", 0),
        (" 4 ", 4000),
        ("+1", 1000),
        ("1e1", 10_000),
        ("2k", 2_000_000),
    ],
)
def test_cpu_is_in_millicores(value: str | int | float, millicores: int) -> None:
    assert parse("cpu", value) == millicores


@pytest.mark.parametrize(
    ("value", "amount"),
    [
        ("4Gi", 4 * Gi),
        ("128Mi", 128 * Mi),
        ("1Ki", Ki),
        ("2Ti", 2 * Ti),
        ("1Pi", Pi),
        ("1.5Gi", 3 * Gi // 2),
        ("1.5G", 1_500_000_000),
        ("2k", 2000),
        ("3M", 3_000_000),
        ("1T", 10**12),
        ("1P", 10**15),
        ("1e3", 1000),
        ("1E3", 1000),
        ("2.5e2", 250),
        ("1e-3k", 1),
        ("1024", 1024),
        (1024, 1024),
        ("1 Gi", Gi),
    ],
)
def test_memory_is_in_bytes(value: str | int, amount: int) -> None:
    assert parse("memory", value) == amount


@pytest.mark.parametrize(
    ("resource", "value", "amount"),
    [
        ("cpu", "0.0001", 1),  # a tenth of a millicore is still something
        ("cpu", "0.5m", 1),
        ("memory", "0.5", 1),
        ("memory", "500m", 1),
        ("memory", "1.0000001Ki", 1025),
        ("nvidia.com/gpu", "0.1", 1),
    ],
)
def test_fractions_round_up_never_down(resource: str, value: str, amount: int) -> None:
    assert parse(resource, value) == amount


def test_gpu_and_memory_aliases() -> None:
    assert canonical_name("gpu") == quantity.GPU == "nvidia.com/gpu"
    assert canonical_name("mem") == "memory"
    assert canonical_name("cpu") == "cpu"
    assert canonical_name("example.com/fpga") == "example.com/fpga"
    assert parse("gpu", "2") == 2
    assert parse("nvidia.com/gpu", 8) == 8
    assert parse("mem", "1Gi") == Gi
    assert parse_map({"gpu": 1, "cpu": "250m", "mem": "1Gi", "example.com/fpga": "3"}) == {
        "nvidia.com/gpu": 1,
        "cpu": 250,
        "memory": Gi,
        "example.com/fpga": 3,
    }


def test_errors_name_the_canonical_resource() -> None:
    with pytest.raises(
        QuantityError, match=r"^nvidia\.com/gpu: 'lots' is not a quantity \(examples: 500m, 4Gi, 2\)$"
    ):
        parse("gpu", "lots")


@pytest.mark.parametrize(
    "value",
    [
        "",
        " ",
        "abc",
        "Gi",
        "4gi",
        "1Mb",
        "1.2.3",
        "1.",
        "0x10",
        "1,5",
        "--1",
        "1e",
        "1 2",
        "nan",
        "inf",
        "1Gi2",
    ],
)
def test_garbage_is_rejected(value: str) -> None:
    with pytest.raises(QuantityError, match="is not a quantity"):
        parse("memory", value)


@pytest.mark.parametrize("value", ["-1", "-500m", -1, -0.5, "-1Gi", -0.0])
def test_negative_quantities_are_rejected(value: str | int | float) -> None:
    with pytest.raises(QuantityError, match="is not a quantity"):
        parse("cpu", value)


@pytest.mark.parametrize("value", [True, False])
def test_booleans_are_not_quantities(value: bool) -> None:
    with pytest.raises(QuantityError, match=f"cpu: {value} is not a quantity"):
        parse("cpu", value)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_floats_are_rejected(value: float) -> None:
    with pytest.raises(QuantityError):
        parse("memory", value)


@pytest.mark.parametrize(
    ("resource", "value"),
    [("memory", "1e30"), ("memory", 2**63), ("memory", "8192Pi"), ("cpu", "9223372036854776")],
)
def test_quantities_beyond_int64_are_rejected(resource: str, value: str | int) -> None:
    # Resources travel as int64: a bigger value must fail here, not when it is put on the wire.
    with pytest.raises(QuantityError, match="too large"):
        parse(resource, value)


def test_the_largest_int64_is_accepted() -> None:
    assert parse("memory", str(2**63 - 1)) == 2**63 - 1
    assert parse("cpu", "9223372036854775m") == 9223372036854775
    with pytest.raises(QuantityError):
        parse("memory", str(2**63))


@pytest.mark.parametrize("value", ["1e999999", "1e999999999"])
def test_absurd_exponents_fail_fast_with_a_quantity_error(value: str) -> None:
    # Without a bound these overflowed the decimal context or spent ~30 s building a huge int.
    with pytest.raises(QuantityError):
        parse("memory", value)


# -- formatting --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("resource", "amount", "text"),
    [
        ("cpu", 500, "500m"),
        ("cpu", 2000, "2"),
        ("cpu", 1500, "1500m"),
        ("cpu", 0, "0"),
        ("memory", 4 * Gi, "4Gi"),
        ("memory", 3 * Gi // 2, "1.5Gi"),
        ("memory", 256 * Mi, "256Mi"),
        ("memory", Ki, "1Ki"),
        ("memory", 2 * Ti, "2Ti"),
        ("memory", 1000, "1000"),
        ("memory", 0, "0"),
        ("ephemeral-storage", 10 * Gi, "10Gi"),
        ("nvidia.com/gpu", 8, "8"),
    ],
)
def test_format_quantity(resource: str, amount: int, text: str) -> None:
    assert format_quantity(resource, amount) == text


@pytest.mark.parametrize(
    ("resource", "amount"),
    [
        ("cpu", 1),
        ("cpu", 250),
        ("cpu", 1000),
        ("cpu", 64_000),
        ("memory", 512),
        ("memory", 512 * Mi),
        ("memory", Gi),
        ("memory", 3 * Gi // 2),
        ("memory", 16 * Gi),
        ("memory", 40 * Ti),
        ("nvidia.com/gpu", 4),
    ],
)
def test_typical_values_round_trip(resource: str, amount: int) -> None:
    assert parse(resource, format_quantity(resource, amount)) == amount


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 10**9))
def test_every_cpu_amount_round_trips(millicores: int) -> None:
    assert parse("cpu", format_quantity("cpu", millicores)) == millicores


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 1023), st.sampled_from([Ki, Mi, Gi, Ti]), st.sampled_from([1, 2]))
def test_whole_and_half_binary_units_round_trip(count: int, unit: int, halves: int) -> None:
    amount = count * unit // halves
    assert parse("memory", format_quantity("memory", amount)) == amount
