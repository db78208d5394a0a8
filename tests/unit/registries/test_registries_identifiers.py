"""National identifier systems: checks, canonical forms and specific errors."""

from __future__ import annotations

import pytest

from hie.demo import identifiers as demo_identifiers
from hie.hub.errors import HieError, InvalidResource
from hie.registries import identifiers
from hie.registries.identifiers import (
    FRMO_SYSTEM,
    NATIONAL_SYSTEMS,
    OMS_SYSTEM,
    PASSPORT_SYSTEM,
    SNILS_SYSTEM,
    IdentifierError,
    is_national,
    normalise_identifier,
    normalise_system,
    oms_check_digit,
    oms_is_valid,
    snils_check,
    snils_is_valid,
)


def test_national_systems_are_the_person_identifiers() -> None:
    assert set(NATIONAL_SYSTEMS) == {SNILS_SYSTEM, OMS_SYSTEM, PASSPORT_SYSTEM}
    assert SNILS_SYSTEM == "urn:oid:1.2.643.100.3"
    assert FRMO_SYSTEM not in NATIONAL_SYSTEMS  # organisations, not people
    assert NATIONAL_SYSTEMS[SNILS_SYSTEM].kind == "snils"
    assert NATIONAL_SYSTEMS[SNILS_SYSTEM].lifelong
    assert not NATIONAL_SYSTEMS[PASSPORT_SYSTEM].lifelong


def test_demo_reexports_the_one_source_of_truth() -> None:
    # hie.demo keeps its public names, but they are the registries' objects.
    assert demo_identifiers.SNILS_SYSTEM is identifiers.SNILS_SYSTEM
    assert demo_identifiers.OMS_SYSTEM is identifiers.OMS_SYSTEM
    assert demo_identifiers.PASSPORT_SYSTEM is identifiers.PASSPORT_SYSTEM
    assert demo_identifiers.FRMO_SYSTEM is identifiers.FRMO_SYSTEM
    assert demo_identifiers.snils_is_valid is identifiers.snils_is_valid
    assert demo_identifiers.oms_is_valid is identifiers.oms_is_valid
    assert demo_identifiers.snils_check is identifiers.snils_check
    assert demo_identifiers.oms_check_digit is identifiers.oms_check_digit


def test_snils_checks() -> None:
    assert snils_check("112233445") == "95"  # the Pension Fund's worked example
    assert snils_is_valid("112-233-445 95")
    assert snils_is_valid("11223344595")
    assert not snils_is_valid("112-233-445 96")
    assert not snils_is_valid("1122334459")
    assert not snils_is_valid("１１２２３３４４５９５")  # full-width digits are not digits here
    assert snils_is_valid("001-001-998 77")  # not checked below 001-001-999


def test_oms_checks() -> None:
    assert oms_check_digit("411111111111111") == "1"
    assert oms_is_valid("4111111111111111")
    assert oms_is_valid("4111 1111 1111 1111")
    assert not oms_is_valid("4111111111111112")
    assert not oms_is_valid("411111111111111")


@pytest.mark.parametrize(
    ("system", "value", "canonical"),
    [
        (SNILS_SYSTEM, "112-233-445 95", "11223344595"),
        (SNILS_SYSTEM, "11223344595", "11223344595"),
        (SNILS_SYSTEM, " 112 233 445 95 ", "11223344595"),
        ("1.2.643.100.3", "112-233-445 95", "11223344595"),  # bare OID, as HL7 v2 CX-4 has it
        ("URN:OID:1.2.643.100.3", "112-233-445 95", "11223344595"),
        (OMS_SYSTEM, "4111 1111 1111 1111", "4111111111111111"),
        (PASSPORT_SYSTEM, "4012 345678", "4012345678"),
        (PASSPORT_SYSTEM, "40 12 № 345678", "4012345678"),
        ("urn:oid:1.2.643.5.1.13.13.12.2.78.8111.100", " A-17/3 ", "A-17/3"),
    ],
)
def test_normalise_identifier(system: str, value: str, canonical: str) -> None:
    assert normalise_identifier(system, value) == canonical


@pytest.mark.parametrize(
    ("system", "value", "reason", "fragment"),
    [
        (SNILS_SYSTEM, "112-233-445 96", "invalid-snils-checksum", "expected 95"),
        (SNILS_SYSTEM, "112-233-445", "malformed-snils", "11 digits"),
        (SNILS_SYSTEM, "abc-def-ghi jk", "malformed-snils", "11 digits"),
        (OMS_SYSTEM, "4111111111111112", "invalid-oms-check-digit", "expected 1"),
        (OMS_SYSTEM, "ЯЛ 123456", "malformed-oms", "16 digits"),
        (PASSPORT_SYSTEM, "4012 34567", "malformed-passport", "6-digit number"),
        ("", "123", "identifier-without-system", "no system"),
        (SNILS_SYSTEM, "  ", "identifier-without-value", "no value"),
    ],
)
def test_normalise_identifier_errors_are_specific(
    system: str, value: str, reason: str, fragment: str
) -> None:
    with pytest.raises(IdentifierError) as err:
        normalise_identifier(system, value)
    assert err.value.reason == reason
    assert fragment in err.value.message
    # An IdentifierError is an invalid resource to the FHIR edge (HIE-1002, HTTP 400).
    assert isinstance(err.value, InvalidResource)
    assert isinstance(err.value, HieError)
    assert err.value.code == "HIE-1002" and err.value.status == 400


def test_snils_error_does_not_echo_the_number() -> None:
    with pytest.raises(IdentifierError) as err:
        normalise_identifier(SNILS_SYSTEM, "112-233-445 96")
    assert "112-233-445" not in err.value.message and "112233445" not in err.value.message


def test_normalise_system_and_is_national() -> None:
    assert normalise_system("1.2.643.100.3") == SNILS_SYSTEM
    assert normalise_system(" urn:OID:1.2.643.100.3 ") == SNILS_SYSTEM
    assert normalise_system("https://example.org/mrn") == "https://example.org/mrn"
    assert is_national("1.2.643.100.3")
    assert is_national(OMS_SYSTEM)
    assert not is_national("urn:oid:1.2.643.5.1.13.13.12.2.78.8111.100")
