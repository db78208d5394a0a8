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

from hie.pacs.errors import InstanceMismatch, UnreadableInstance
from hie.pacs.p10 import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    check_dataset,
    check_pixels,
    file_meta,
    header_of,
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
