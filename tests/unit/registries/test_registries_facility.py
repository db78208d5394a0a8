"""Registration conventions (hie.registries.facility) and the loader's file readers."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from hie.demo import MOS, Generator
from hie.demo import city as demo_city
from hie.registries import facility
from hie.registries.facility import (
    DicomAddress,
    format_dicom_address,
    frmo_oid_of,
    frmo_oid_problem,
    parse_dicom_address,
    patient_id_systems_of,
    same_host,
)
from hie.registries.load_rows import read_csv, read_json
from hie.registries.senders import _hd_candidates


@pytest.mark.parametrize(
    "oid",
    [
        "1.2.643.5.1.13.13.12.2.78.8111",
        "urn:oid:1.2.643.5.1.13.13.12.2.78.8111",
        "1.2.643.5.1.13.13.12.2.1.1",
        "1.2.643.5.1.13.13.12.2.77.7973.0.1",
    ],
)
def test_good_frmo_oids(oid: str) -> None:
    assert frmo_oid_problem(oid) is None


@pytest.mark.parametrize(
    ("oid", "why"),
    [
        ("", "empty"),
        ("1.2.643.5.1.13.13.12.2.78", "malformed"),
        ("1.2.643.5.1.13.13.12.2.78.", "malformed"),
        ("1.2.643.5.1.13.13.12.2.78.08111", "malformed"),
        ("1.2.643.5.1.13.13.12.2.078.8111", "malformed"),
        ("1.2.643.5.1.13.13.11.1461", "must start with"),
        ("1.2.643.5.1.13.13.12.2.78.81a1", "only digits and dots"),
        ("1.2.643.5.1.13.13.12.2.78 .8111", "only digits and dots"),
    ],
)
def test_bad_frmo_oids(oid: str, why: str) -> None:
    problem = frmo_oid_problem(oid)
    assert problem is not None and why in problem


def test_every_demo_mo_has_a_valid_oid_and_patient_id_system() -> None:
    city = Generator(1).city()
    for mo, org in zip(
        sorted(MOS, key=lambda m: m.id),
        sorted(city.organizations, key=lambda o: o["id"]),
        strict=True,
    ):
        assert frmo_oid_problem(mo.oid) is None
        assert frmo_oid_of(org) == mo.oid
        assert patient_id_systems_of(org) == (mo.mrn_system,)


def test_demo_uses_the_registry_systems() -> None:
    assert demo_city.HL7_FACILITY_SYSTEM == facility.HL7_FACILITY_SYSTEM
    assert demo_city.DICOM_AE_TITLE_SYSTEM == facility.DICOM_AE_TITLE_SYSTEM
    assert demo_city.HIE_ENDPOINT_CONNECTION_TYPE_SYSTEM == facility.HIE_CONNECTION_TYPE_SYSTEM
    assert demo_city.HL7_ENDPOINT_CONNECTION_TYPE_SYSTEM == facility.HL7_CONNECTION_TYPE_SYSTEM
    assert demo_city.MO_KIND_SYSTEM == facility.MO_KIND_SYSTEM
    assert demo_city.SPECIALTY_SYSTEM == facility.MEDICAL_SPECIALTY_SYSTEM
    assert demo_city.PRACTITIONER_ROLE_SYSTEM == facility.PRACTITIONER_ROLE_SYSTEM
    assert demo_city.ORGANIZATION_TYPE_SYSTEM == facility.ORGANIZATION_TYPE_SYSTEM


def test_patient_id_systems_official_first() -> None:
    org = {
        "identifier": [
            facility.patient_id_system_identifier("urn:oid:1.2.3.100"),
            {**facility.patient_id_system_identifier("urn:oid:1.2.3.200"), "use": "official"},
            {"system": "other", "value": "x"},
        ]
    }
    assert patient_id_systems_of(org) == ("urn:oid:1.2.3.200", "urn:oid:1.2.3.100")
    assert patient_id_systems_of({}) == ()


@pytest.mark.parametrize(
    ("address", "parsed"),
    [
        ("dicom://GP12XR@127.0.0.1:11201", DicomAddress("GP12XR", "127.0.0.1", 11201)),
        ("dicom://GP12XR@pacs.gp12.local", DicomAddress("GP12XR", "pacs.gp12.local", None)),
        ("dicom://GP12XR", DicomAddress("GP12XR", None, None)),
        ("DICOM://CT 1@[::1]:104", DicomAddress("CT 1", "::1", 104)),
        ("dicom://A@B@10.0.0.1:104", DicomAddress("A@B", "10.0.0.1", 104)),
        (
            "dicom+tls://PACS@pacs.gp12.local:2762",
            DicomAddress("PACS", "pacs.gp12.local", 2762, True),
        ),
        ("DICOM+TLS://PACS", DicomAddress("PACS", None, None, True)),
    ],
)
def test_parse_dicom_address(address: str, parsed: DicomAddress) -> None:
    assert parse_dicom_address(address) == parsed


@pytest.mark.parametrize(
    "address",
    [
        "mllp://host:2575",
        "dicom://",
        "dicoms://AE@host:104",
        "dicom+ssh://AE@host:104",
        "dicom:AE@host:104",
        "dicom://@host:104",
        "dicom://SEVENTEEN-CHARS-AE@host:104",
        "dicom://BAD\\AE@host:104",
        "dicom://AE@host:0",
        "dicom://AE@host:70000",
        "dicom://AE@host:1x",
        "dicom://AE@ho st:104",
        "dicom://AE@[::1]x",
    ],
)
def test_bad_dicom_addresses(address: str) -> None:
    with pytest.raises(ValueError):
        parse_dicom_address(address)


@given(
    ae=st.text(st.characters(min_codepoint=0x21, max_codepoint=0x7E, exclude_characters="\\@"),
               min_size=1, max_size=16),
    host=st.sampled_from(["127.0.0.1", "pacs.local", "::1", None]),
    port=st.one_of(st.none(), st.integers(1, 65535)),
    tls=st.booleans(),
)  # fmt: skip
def test_dicom_address_round_trip(ae: str, host: str | None, port: int | None, tls: bool) -> None:
    parsed = parse_dicom_address(format_dicom_address(ae, host, port, tls=tls))
    assert parsed == DicomAddress(ae, host, port if host else None, tls)


def test_same_host() -> None:
    assert same_host("127.0.0.1", "::ffff:127.0.0.1")
    assert same_host("::1", "0:0:0:0:0:0:0:1")
    assert same_host("PACS.local.", "pacs.local")
    assert not same_host("10.0.0.1", "10.0.0.2")
    assert not same_host("pacs.local", "10.0.0.1")


def test_hd_candidates() -> None:
    assert _hd_candidates("GP12LAB") == ["GP12LAB"]
    assert _hd_candidates(" GP12LAB^1.2.3^ISO ") == ["GP12LAB^1.2.3^ISO", "GP12LAB", "1.2.3"]
    assert _hd_candidates("^1.2.3^ISO") == ["^1.2.3^ISO", "1.2.3"]
    assert _hd_candidates(None) == [] and _hd_candidates("  ") == []


def test_csv_reader_line_numbers_and_delimiters() -> None:
    text = 'ID;Name\n1;"two\nlines"\n\n2;x;extra\n3;ok\n'
    columns, rows = read_csv(text)
    assert columns == ["id", "name"]
    assert rows[0] == (2, {"id": "1", "name": "two\nlines"})
    assert rows[1][0] == 5 and "2 values" not in str(rows[1][1]) and "3 values" in str(rows[1][1])
    assert rows[2] == (6, {"id": "3", "name": "ok"})


def test_json_reader_line_numbers() -> None:
    resources = [{"resourceType": "Organization", "id": f"o{i}"} for i in range(3)]
    text = json.dumps(resources, indent=2)
    fmt, rows = read_json(text, "json")
    assert fmt == "json" and [r[1]["id"] for r in rows] == ["o0", "o1", "o2"]
    for line, res in rows:
        assert text.splitlines()[line - 1].strip() == "{"
        assert f'"id": "{res["id"]}"' in "\n".join(text.splitlines()[line - 1 : line + 3])
    bundle = {
        "resourceType": "Bundle",
        "meta": {"tag": [{"code": "x"}]},
        "type": "collection",
        "entry": [{"fullUrl": "urn:x", "resource": r} for r in resources] + [{"fullUrl": "y"}],
    }
    text = json.dumps(bundle, indent=1)
    fmt, rows = read_json(text, "json")
    assert [r[1] if isinstance(r[1], str) else r[1]["id"] for r in rows][:3] == ["o0", "o1", "o2"]
    assert rows[3][1] == "the Bundle entry has no resource"
    for line, _ in rows:
        assert text.splitlines()[line - 1].strip() == "{"
    # objects one after another are NDJSON, whatever the file is called
    fmt, rows = read_json("\n".join(json.dumps(r) for r in resources), "json")
    assert fmt == "ndjson" and [line for line, _ in rows] == [1, 2, 3]
