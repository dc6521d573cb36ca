"""QEMU size strings."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from memslots.errors import SizeError
from memslots.sizes import (
    GiB,
    KiB,
    MiB,
    TiB,
    align_down,
    align_up,
    column_unit,
    format_in,
    format_size,
    hex_size,
    is_power_of_two,
    parse_ram_size,
    parse_size,
)


@pytest.mark.parametrize(
    "text,value",
    [
        ("0", 0),
        ("4096", 4096),
        ("512M", 512 * MiB),
        ("4G", 4 * GiB),
        ("4g", 4 * GiB),
        ("1T", TiB),
        ("1028G", 1028 * GiB),
        ("2k", 2 * KiB),
        ("1.5G", 3 * GiB // 2),
        ("0.5M", 512 * KiB),
        ("100B", 100),
        ("0x1000", 4096),
        ("15E", 15 << 60),
    ],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize(
    "text", ["", "G", "-1G", "1.5", "4Q", "1 G G", "0x", "17E", "4GiB", "0x10M", "0x100000M"]
)
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(SizeError):
        parse_size(text)


def test_ram_size_without_suffix_is_mib() -> None:
    assert parse_ram_size("512") == 512 * MiB
    assert parse_ram_size("4G") == 4 * GiB
    with pytest.raises(SizeError):
        parse_ram_size("0x100")  # QEMU makes it "0x100M", and hex with a suffix is an error


def test_format_size() -> None:
    assert format_size(4 * GiB) == "4 GiB"
    assert format_size(2846 * MiB) == "2846 MiB"
    assert format_size(1536 * MiB) == "1536 MiB"
    assert format_size(12) == "12 B"
    assert format_size(4 * GiB + 1) == "4.00 GiB"


@given(st.integers(min_value=0, max_value=1 << 62), st.integers(min_value=0, max_value=20))
def test_align(value: int, shift: int) -> None:
    a = 1 << shift
    assert align_down(value, a) <= value <= align_up(value, a)
    assert align_up(value, a) % a == 0 and align_up(value, a) - value < a
    assert is_power_of_two(a) and not is_power_of_two(a * 3 if a > 1 else 0)


@given(st.integers(min_value=0, max_value=(1 << 54) - 1), st.sampled_from("KMGT"))
def test_roundtrip_with_suffix(n: int, suffix: str) -> None:
    unit = {"K": KiB, "M": MiB, "G": GiB, "T": TiB}[suffix]
    if n * unit < 1 << 64:
        assert parse_size(f"{n}{suffix}") == n * unit


@pytest.mark.parametrize(
    "text",
    [
        "\u0664G",  # ARABIC-INDIC DIGIT FOUR: int() and \d take it, QEMU does not
        "\uff14G",  # FULLWIDTH DIGIT FOUR
        "1\u212a",  # KELVIN SIGN: matched "k" case-insensitively
        "1.\u0665G",
        "1_0G",
        "1" * 5000,
        "0x" + "f" * 5000,
        "1" * 5000 + "G",
    ],
    ids=lambda t: ascii(t)[:24],
)
def test_parse_size_rejects_what_qemu_rejects(text: str) -> None:
    with pytest.raises(SizeError) as info:
        parse_size(text)
    assert len(str(info.value)) < 200  # a long text is shortened in the message


def test_parse_size_long_but_small() -> None:
    assert parse_size("0" * 5000 + "4G") == 4 * GiB
    assert parse_size("1." + "0" * 5000 + "G") == GiB
    assert parse_size("0." + "9" * 5000 + "K") == 1023  # truncated to whole bytes, as before
    assert parse_size(" 4G") == 4 * GiB  # strtoull skips leading white space


def test_hex_size_repeats_qemus_hex_for_people() -> None:
    assert hex_size(60 * GiB) == "0xf00000000 (60 GiB)"
    assert hex_size(2 * MiB, parens=True) == "(0x200000) (2 MiB)"


def test_one_unit_per_column() -> None:
    assert column_unit([2 * MiB, TiB, 0]) == ("MiB", MiB)
    assert column_unit([512 * MiB, TiB]) == ("GiB", GiB)
    assert column_unit([4 * GiB, 1536 * MiB]) == ("GiB", GiB)
    assert column_unit([100]) == ("B", 1)
    assert column_unit([0, 0]) == ("B", 1)
    assert column_unit([]) == ("B", 1)
    assert [format_in(v, GiB) for v in (4 * GiB, 1536 * MiB, 0, GiB + 10 * MiB)] == [
        "4",
        "1.5",
        "0",
        "1.01",
    ]
