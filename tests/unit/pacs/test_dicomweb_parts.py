"""The transport-free pieces of DICOMweb: multipart/related parsing and framing, media type and
Accept negotiation, Part 10 splitting, QIDO parameters, DICOM JSON."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset

from hie.hub.errors import InvalidRequest, PayloadTooLarge
from hie.pacs import qido
from hie.pacs.dicom_json import attributes, dataset, element
from hie.pacs.dicomweb import NotAcceptable, negotiate
from hie.pacs.errors import UnreadableInstance
from hie.pacs.multipart import (
    MultipartReader,
    closing,
    parse_accept,
    parse_media_type,
    part_head,
)
from hie.pacs.query import PATIENT_KEY, Level
from hie.pacs.stow import split_part10
from tests.fixtures.dicom import ct_instance
from tests.fixtures.dicomweb import dataset_bytes, parse_multipart, part10, stow_body


def read(body: bytes, boundary: str, chunk: int, limit: int = 1 << 30) -> list[Any]:
    reader = MultipartReader(boundary.encode(), limit)
    for i in range(0, len(body), chunk):
        reader.feed(body[i : i + chunk])
    parts = reader.finish()
    return [(p.headers, p.read()) for p in parts]


@settings(max_examples=60, deadline=None)
@given(
    bodies=st.lists(st.binary(max_size=300), min_size=1, max_size=4),
    chunk=st.integers(min_value=1, max_value=97),
)
def test_parts_survive_any_chunking(bodies: list[bytes], chunk: int) -> None:
    # bodies that contain CRLFs, dashes and near-boundaries must come back exactly
    bodies = [b + b"\r\n--bound" for b in bodies]
    body, ctype = stow_body(bodies, boundary="boundary42")
    got = read(b"preamble\r\n" + body + b"epilogue", "boundary42", chunk)
    assert [g[1] for g in got] == bodies
    assert all(h["content-type"] == "application/dicom" for h, _ in got)


def test_limit_and_truncation() -> None:
    body, _ = stow_body([b"x" * 1000], boundary="b1")
    with pytest.raises(PayloadTooLarge):
        read(body, "b1", 100, limit=500)
    with pytest.raises(InvalidRequest):
        read(body[:-10], "b1", 100)


def test_framing_is_read_back_by_a_standard_parser() -> None:
    boundary = "hie-test"
    body = (
        part_head(boundary, "application/dicom", {"Content-Length": "3"}, first=True)
        + b"abc"
        + part_head(boundary, "application/dicom", first=False)
        + b"\r\nde\r\n"
        + closing(boundary)
    )
    got = parse_multipart(body, f'multipart/related; type="application/dicom"; boundary={boundary}')
    assert [p[1] for p in got] == [b"abc", b"\r\nde\r\n"]


def test_media_types_and_accept() -> None:
    m = parse_media_type('Multipart/Related; type="application/dicom"; boundary="a;b"')
    assert m.type == "multipart/related"
    assert m.params == {"type": "application/dicom", "boundary": "a;b"}
    ranges = parse_accept(
        'multipart/related; type="application/dicom"; transfer-syntax=*; q=0.5, '
        'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1'
    )
    assert ranges[0].params["transfer-syntax"] == "1.2.840.10008.1.2.1"
    assert parse_accept(None)[0].type == "*/*"
    negotiate(ranges, "application/dicom", {"1.2.840.10008.1.2"})  # via the '*' range
    with pytest.raises(NotAcceptable):
        negotiate(ranges[:1], "application/dicom", {"1.2.840.10008.1.2"})
    with pytest.raises(NotAcceptable):
        negotiate(parse_accept("image/jpeg"), "application/octet-stream", {"1.2.840.10008.1.2.1"})
    negotiate(parse_accept('multipart/related; type="image/*"'), "image/jpeg", {"x"})


def test_part10_split() -> None:
    raw = part10(ct_instance())
    p = split_part10(raw)
    assert p.transfer_syntax == "1.2.840.10008.1.2.1"
    assert p.dataset == dataset_bytes(raw) and raw.endswith(p.dataset)
    assert p.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2"
    with pytest.raises(UnreadableInstance):
        split_part10(b"DICM" + raw[132:])
    with pytest.raises(UnreadableInstance):
        split_part10(raw[:140])


def test_qido_parameters() -> None:
    params = [
        ("00100020", "123"),
        ("StudyInstanceUID", "1.2.3,1.2.4"),
        ("ModalitiesInStudy", "CT"),
        ("ModalitiesInStudy", "MR"),
        ("includefield", "StudyDescription,00080054"),
        ("limit", "5000"),
        ("offset", "10"),
        ("fuzzymatching", "true"),
        ("patient", "abc"),
        ("Manufacturer", "X"),
    ]
    q = qido.parse(Level.STUDY, params, cap=100)
    assert q.query.keys == {
        "PatientID": "123",
        "StudyInstanceUID": "1.2.3\\1.2.4",
        "ModalitiesInStudy": "CT\\MR",
        PATIENT_KEY: "abc",
    }
    assert (q.query.limit, q.query.offset, q.query.fuzzy) == (100, 10, True)
    assert q.returned is not None and {"StudyDescription", "RetrieveAETitle"} <= q.returned
    assert q.ignored == ("Manufacturer",)
    for bad in (
        [("limit", "x")],
        [("PatientID", "1"), ("PatientID", "2")],
        [("NotAKeyword", "1")],
        [("fuzzymatching", "yes")],
    ):
        with pytest.raises(InvalidRequest):
            qido.parse(Level.STUDY, bad, cap=100)


def test_dicom_json() -> None:
    assert element("PatientName", "Иванова^Мария") == {
        "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Иванова^Мария"}]}
    }
    assert element("ModalitiesInStudy", "CT\\MR") == {
        "00080061": {"vr": "CS", "Value": ["CT", "MR"]}
    }
    assert element("StudyDescription", "") == {"00081030": {"vr": "LO"}}
    js = attributes({"NumberOfStudyRelatedInstances": 3, "SeriesNumber": None, "_x": 1})
    assert js == {"00201208": {"vr": "IS", "Value": [3]}, "00200011": {"vr": "IS"}}
    ds = Dataset()
    ds.PatientID = "1"
    seq = Dataset()
    seq.add_new(0x00091010, "OB", b"\0" * 2000)
    seq.add_new(0x00091011, "OB", b"\1\2")
    ds.add_new(0x00400260, "SQ", [seq])
    out = dataset(ds, lambda path: "/".join(path))
    item = out["00400260"]["Value"][0]
    assert item["00091010"] == {"vr": "OB", "BulkDataURI": "00400260/0/00091010"}
    assert item["00091011"] == {"vr": "OB", "InlineBinary": "AQI="}
    assert out["00100020"] == {"vr": "LO", "Value": ["1"]}
