"""SNILS, OMS policy and passport numbers of the demo generator."""

from __future__ import annotations

import random

import pytest

from hie.demo import identifiers
from hie.demo.identifiers import (
    format_snils,
    oms_check_digit,
    oms_is_valid,
    random_oms,
    random_passport,
    random_snils,
    snils_check,
    snils_is_valid,
)


def test_snils_pension_fund_example() -> None:
    # The Pension Fund's own worked example: 1*9+1*8+2*7+2*6+3*5+3*4+4*3+4*2+5*1 = 95.
    assert snils_check("112233445") == "95"
    assert snils_is_valid("112-233-445 95")
    assert snils_is_valid("11223344595")
    assert not snils_is_valid("112-233-445 96")


@pytest.mark.parametrize(
    ("number9", "expected"),
    [
        ("000000019", "11"),  # 1*2 + 9*1 = 11: below 100, the sum itself
        ("000000100", "03"),  # weight of the 7th digit is 3
        ("911000004", "00"),  # 81 + 8 + 7 + 4 = 100 → 00
        ("911000005", "00"),  # 101 → 00
        ("123456789", "64"),  # 165 → 165 mod 101 = 64
        ("999999999", "01"),  # 405 → 405 mod 101 = 1
        ("996100000", "00"),  # 81 + 72 + 42 + 6 = 201 → mod 101 = 100 → 00
        ("999994200", "34"),  # 337 → mod 101 = 34
    ],
)
def test_snils_check_branches(number9: str, expected: str) -> None:
    assert snils_check(number9) == expected


def test_snils_small_numbers_are_not_checked() -> None:
    # The Pension Fund checks the control number only above 001-001-998.
    assert snils_is_valid("001-001-998 77")
    assert snils_is_valid("001-001-999 65")
    assert not snils_is_valid("001-001-999 77")


@pytest.mark.parametrize(
    "bad", ["", "123", "abc-def-ghi jk", "112-233-445 9", "１１２２３３４４５９５"]
)
def test_snils_rejects_malformed(bad: str) -> None:
    assert not snils_is_valid(bad)


def test_random_snils_valid_formatted_and_without_triples() -> None:
    rng = random.Random(3)
    for _ in range(2000):
        s = random_snils(rng)
        assert len(s) == 14 and s[3] == "-" and s[7] == "-" and s[11] == " "
        assert snils_is_valid(s)
        digits = s.replace("-", "").replace(" ", "")[:9]
        assert not any(digits[i] == digits[i + 1] == digits[i + 2] for i in range(7))


def test_format_snils() -> None:
    assert format_snils("11223344595") == "112-233-445 95"


def test_oms_check_digit_is_luhn() -> None:
    # ФФОМС's "double the odd-place digits" rule is the Luhn algorithm.
    assert oms_check_digit("411111111111111") == "1"  # the classic Luhn test number
    assert oms_is_valid("4111111111111111")
    assert not oms_is_valid("4111111111111112")
    assert oms_check_digit("7992739871") == "3"  # the Wikipedia example


def test_random_oms_valid_and_single_digit_errors_caught() -> None:
    rng = random.Random(5)
    for _ in range(500):
        policy = random_oms(rng)
        assert len(policy) == 16 and policy.startswith("78") and oms_is_valid(policy)
        i = rng.randrange(16)
        wrong = policy[:i] + str((int(policy[i]) + rng.randint(1, 9)) % 10) + policy[i + 1 :]
        assert not oms_is_valid(wrong)


def test_random_passport() -> None:
    series, number = random_passport(random.Random(1), 2014)
    assert series == "4014"
    assert len(number) == 6 and number.isdigit()


def test_identifier_builders() -> None:
    assert identifiers.snils_identifier("112-233-445 95")["system"] == "urn:oid:1.2.643.100.3"
    oms = identifiers.oms_identifier("7800000000000000")
    assert oms["system"] == identifiers.OMS_SYSTEM
    mrn = identifiers.mrn_identifier("1.2.643.5.1.13.13.12.2.78.8111", "123", "ГП № 12")
    assert mrn["system"] == "urn:oid:1.2.643.5.1.13.13.12.2.78.8111.100"
    assert mrn["assigner"]["identifier"]["system"] == identifiers.FRMO_SYSTEM
    passport = identifiers.passport_identifier("4014", "123456")
    assert passport["value"] == "4014 123456"
