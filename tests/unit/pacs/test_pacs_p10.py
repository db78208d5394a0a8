"""Part 10 files from received datasets: the encoding walk that catches truncation, the
hub's file meta, and the filing attributes."""

from __future__ import annotations

import glob
import os
from io import BytesIO

import pydicom
import pytest
from pydicom.dataset import FileMetaDataset
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, CTImageStorage, DeflatedExplicitVRLittleEndian

from hie.pacs import p10 as p10_module
from hie.pacs.errors import InstanceMismatch, UnreadableInstance
from hie.pacs.p10 import (
    _FILING,
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    check_dataset,
    check_pixels,
    file_meta,
    header_of,
    instance_header,
    read_header,
)
from tests.fixtures.dicom import EXPLICIT, IMPLICIT, ct_instance, encode, uid

CT = str(CTImageStorage)
DEFLATED = str(DeflatedExplicitVRLittleEndian)

TEST_FILES = sorted(
    glob.glob(os.path.join(os.path.dirname(pydicom.__file__), "data/test_files/*.dcm"))
)
# files pydicom ships broken on purpose (or with a wrong VR encoding)
BROKEN = {"rtplan_truncated.dcm", "MR_truncated.dcm", "SC_rgb_jpeg.dcm"}


def _split(path: str) -> tuple[str, bytes] | None:
    """(transfer syntax, dataset bytes) of a Part 10 file, None if it has no usable meta."""
    with open(path, "rb") as fp:
        try:
            read_preamble(fp, False)
            meta = _read_file_meta_info(fp)
        except Exception:
            return None
        if "TransferSyntaxUID" not in meta:
            return None
        return str(meta.TransferSyntaxUID), fp.read()


@pytest.mark.parametrize("path", TEST_FILES, ids=os.path.basename)
def test_bundled_files_pass_and_their_truncations_do_not(path: str) -> None:
    split = _split(path)
    if split is None:
        pytest.skip("no file meta")
    ts, raw = split
    name = os.path.basename(path)
    if name in BROKEN:
        with pytest.raises(UnreadableInstance):
            check_dataset(raw, ts)
        return
    check_dataset(raw, ts)
    if len(raw) > 64 and not pydicom.uid.UID(ts).is_deflated:
        for cut in (1, 3, 7):
            with pytest.raises(UnreadableInstance):
                check_dataset(raw[:-cut], ts)


def test_a_cut_between_elements_leaves_an_image_without_pixels() -> None:
    ds = ct_instance(size=8)
    raw = encode(ds, EXPLICIT)
    whole = raw.index(b"\xe0\x7f\x10\x00")  # (7FE0,0010) starts the last element
    assert check_dataset(raw, EXPLICIT) is True
    assert check_dataset(raw[:whole], EXPLICIT) is False  # well-formed, but…
    p10 = file_meta(str(ds.SOPClassUID), str(ds.SOPInstanceUID), EXPLICIT) + raw[:whole]
    with pytest.raises(UnreadableInstance, match="pixel data"):
        check_pixels(read_header(p10), False)


@pytest.mark.parametrize(
    "ts", [IMPLICIT, EXPLICIT, "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2"]
)
def test_generated_instances_in_every_uncompressed_syntax(ts: str) -> None:
    raw = encode(ct_instance(size=8), ts)
    check_dataset(raw, ts)
    with pytest.raises(UnreadableInstance):
        check_dataset(raw[: len(raw) - 10], ts)


def test_garbage_and_empty_and_unknown_syntax() -> None:
    with pytest.raises(UnreadableInstance):
        check_dataset(b"", IMPLICIT)
    with pytest.raises(UnreadableInstance):
        check_dataset(b"\x08\x00\x16\x00ZZ\x02\x00ab", EXPLICIT)
    with pytest.raises(UnreadableInstance):
        check_dataset(encode(ct_instance(size=4), EXPLICIT), "1.2.3.4")


def test_file_meta_is_deterministic_and_readable() -> None:
    ds = ct_instance(size=4)
    raw = encode(ds, IMPLICIT)
    a = file_meta(str(ds.SOPClassUID), str(ds.SOPInstanceUID), IMPLICIT)
    assert a == file_meta(str(ds.SOPClassUID), str(ds.SOPInstanceUID), IMPLICIT)
    back = pydicom.dcmread(BytesIO(a + raw))
    assert back.file_meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert back.file_meta.TransferSyntaxUID == IMPLICIT
    assert back.PatientID == "12345"


@pytest.mark.parametrize(
    ("sop_uid", "ts"), [("1.2.3.4", IMPLICIT), ("1.2.3.45", EXPLICIT), ("1.2", DEFLATED)]
)
def test_file_meta_bytes_equal_pydicoms(sop_uid: str, ts: str) -> None:
    """The hand-written group 0002 is what pydicom writes for the same elements (odd and
    even UID lengths: NUL padding, group length)."""
    meta = FileMetaDataset()
    meta.FileMetaInformationVersion = b"\x00\x01"
    meta.MediaStorageSOPClassUID = UID(CT)
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = UID(ts)
    meta.ImplementationClassUID = UID(IMPLEMENTATION_CLASS_UID)
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION_NAME
    out = BytesIO()
    out.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(out, meta, enforce_standard=True)  # type: ignore[arg-type]
    assert file_meta(CT, sop_uid, ts) == out.getvalue()


def _header(ds: pydicom.Dataset, sop: str | None = None) -> object:
    raw = encode(ds, EXPLICIT)
    sop_uid = sop or str(ds.get("SOPInstanceUID", uid()))
    p10 = file_meta(str(ds.SOPClassUID), sop_uid, EXPLICIT) + raw
    return header_of(read_header(p10), str(ds.SOPClassUID), sop_uid)


def test_header_reads_the_filing_attributes() -> None:
    ds = ct_instance(issuer="GP9101", accession="ACC-7")
    hdr = _header(ds)
    assert hdr.patient_id == "12345" and hdr.issuer == "GP9101"  # type: ignore[attr-defined]
    assert hdr.name.family == "Иванова" and hdr.name.middle == "Петровна"  # type: ignore[attr-defined]
    assert hdr.accession == "ACC-7" and hdr.modality == "CT"  # type: ignore[attr-defined]
    assert hdr.rows == 16 and hdr.instance_number == 1  # type: ignore[attr-defined]


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID", "PatientID"])
def test_header_refuses_what_the_archive_cannot_file(keyword: str) -> None:
    ds = ct_instance()
    delattr(ds, keyword)
    with pytest.raises(InstanceMismatch):
        _header(ds)


def test_header_refuses_a_bad_uid_and_a_request_it_contradicts() -> None:
    ds = ct_instance()
    ds.StudyInstanceUID = "1.2.abc"
    with pytest.raises(InstanceMismatch, match="not a valid UID"):
        _header(ds)
    with pytest.raises(InstanceMismatch, match="Affected SOP Instance"):
        _header(ct_instance(), sop=uid())


# --- the filing attributes read from the walked bytes ----------------------------------------


def _outcome(fn: object, *args: object) -> object:
    """What a header reading returns, or the refusal it raises (type and message)."""
    try:
        return fn(*args)  # type: ignore[operator]
    except (InstanceMismatch, UnreadableInstance) as err:
        return (type(err).__name__, err.message)


def _by_pydicom(raw: bytes, ts: str, sop_class: str, sop_uid: str) -> object:
    """The reading :func:`instance_header` must agree with: pydicom's, step by step."""
    has_pixels = check_dataset(raw, ts)
    ds = read_header(file_meta(sop_class, sop_uid, ts) + raw)
    check_pixels(ds, has_pixels)
    return header_of(ds, sop_class, sop_uid)


def _no_pydicom(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(_p10: bytes) -> None:
        raise AssertionError("pydicom was asked to read the header")

    monkeypatch.setattr(p10_module, "read_header", refuse)


def test_filing_elements_are_the_standards_tags_and_vrs() -> None:
    for keyword, (tag, vr) in _FILING.items():
        assert pydicom.datadict.tag_for_keyword(keyword) == tag, keyword
        assert pydicom.datadict.dictionary_VR(tag) == vr.decode(), keyword


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on the odd values of its files
@pytest.mark.parametrize("path", TEST_FILES, ids=os.path.basename)
def test_bundled_files_read_the_same_without_pydicom(path: str) -> None:
    split = _split(path)
    if split is None or os.path.basename(path) in BROKEN:
        pytest.skip("no file meta, or broken on purpose")
    ts, raw = split
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    sop_class = str(ds.get("SOPClassUID", "") or ds.file_meta.get("MediaStorageSOPClassUID", ""))
    sop_uid = str(ds.get("SOPInstanceUID", "") or uid())
    try:
        check_dataset(raw, ts)
    except UnreadableInstance:
        pytest.skip("not a dataset the archive takes")
    args = (raw, ts, sop_class, sop_uid)
    assert _outcome(instance_header, *args) == _outcome(_by_pydicom, *args)


CYRILLIC = {"ISO_IR 192": "utf-8", "ISO_IR 144": "iso8859_5"}


@pytest.mark.parametrize("charset", sorted(CYRILLIC))
@pytest.mark.parametrize("ts", [EXPLICIT, IMPLICIT, DEFLATED, "1.2.840.10008.1.2.2"])
def test_russian_text_is_read_without_pydicom(
    charset: str, ts: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = ct_instance(issuer="ГП-9101", accession="А-7", name="Ёлкина^Мария^Петровна=ЁЛКИНА")
    ds.SpecificCharacterSet = charset
    ds.TimezoneOffsetFromUTC = "+0300"
    ds.NumberOfFrames = "1"
    raw = encode(ds, ts)
    args = (raw, ts, str(ds.SOPClassUID), str(ds.SOPInstanceUID))
    expected = _by_pydicom(*args)
    _no_pydicom(monkeypatch)
    hdr = instance_header(*args)
    assert hdr == expected
    assert hdr.name.family == "Ёлкина" and hdr.name.text == "Ёлкина Мария Петровна"
    assert hdr.issuer == "ГП-9101" and hdr.study_description == "КТ органов грудной клетки"
    assert (hdr.rows, hdr.columns, hdr.frames, hdr.timezone_offset) == (16, 16, 1, "+0300")


def _variant(change: str) -> pydicom.Dataset:
    ds = ct_instance(issuer="GP9101")
    if change == "other ids":
        item = pydicom.Dataset()
        item.PatientID = "777"
        item.IssuerOfPatientID = "OMS"
        ds.OtherPatientIDsSequence = [item]
    elif change == "universal issuer":
        item = pydicom.Dataset()
        item.UniversalEntityID = "1.2.643.5.1.13"
        ds.IssuerOfPatientIDQualifiersSequence = [item]
    elif change == "multi-valued":
        ds.StudyDescription = ["КТ", "грудь"]
    elif change == "ISO 2022":
        ds.SpecificCharacterSet = ["", "ISO 2022 IR 144"]
    elif change == "no charset":
        del ds.SpecificCharacterSet
    elif change == "wrong VR":
        ds.add_new(0x00200013, "LO", "1")  # Instance Number as LO
    elif change == "bad number":
        ds.SeriesNumber = None
        ds.add_new(0x00200013, "IS", "1.0")
    elif change == "no pixels":
        del ds.PixelData
    elif change == "pixels elsewhere":
        del ds.PixelData
        ds.PixelDataProviderURL = "https://pacs.example/px/1"
    elif change == "empty name":
        ds.PatientName = ""
    return ds


@pytest.mark.parametrize(
    "change",
    [
        "other ids",
        "universal issuer",
        "multi-valued",
        "ISO 2022",
        "no charset",
        "wrong VR",
        "bad number",
        "no pixels",
        "pixels elsewhere",
        "empty name",
        "none",
    ],
)
@pytest.mark.parametrize("ts", [EXPLICIT, IMPLICIT])
@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom on the odd values written
def test_what_the_bytes_cannot_say_surely_pydicom_reads(change: str, ts: str) -> None:
    ds = _variant(change)
    try:
        raw = encode(ds, ts)
    except (ValueError, LookupError):
        pytest.skip("pydicom cannot write this variant in this syntax")
    args = (raw, ts, str(ds.SOPClassUID), str(ds.SOPInstanceUID))
    assert _outcome(instance_header, *args) == _outcome(_by_pydicom, *args)


@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID", "PatientID"])
def test_refusals_are_the_same_without_pydicom(
    keyword: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    ds = ct_instance()
    delattr(ds, keyword)
    raw = encode(ds, EXPLICIT)
    _no_pydicom(monkeypatch)
    with pytest.raises(InstanceMismatch):
        instance_header(raw, EXPLICIT, str(ds.SOPClassUID), str(ds.SOPInstanceUID))
    with pytest.raises(InstanceMismatch, match="Affected SOP Instance"):
        instance_header(encode(ct_instance(), EXPLICIT), EXPLICIT, str(ds.SOPClassUID), uid())
