"""STOW-RS without HTTP (PS3.18 10.5): the parts of a store request become archived
instances, and their outcomes the response dataset.

Each ``application/dicom`` part is a DICOM Part 10 file (PS3.10 7.1). Its File Meta
Information says how the dataset is encoded and which SOP Class and Instance it claims to
be; the meta is stripped and the dataset handed to
:meth:`~hie.pacs.storage.StorageService.store` exactly as C-STORE hands over a received
dataset (same parse, identity, durability and conflict rules; a refusal is kept in the
rejected-message store there). A part that is not a DICOM file is refused here and kept the
same way. With a Study Instance UID in the path, an instance of another study is refused
(PS3.18 10.5.1.1: "the instances shall belong to that study").

The response (PS3.18 10.5.3, Table 10.5.3-1) lists every stored instance in the Referenced
SOP Sequence and every refused one in the Failed SOP Sequence with its Failure Reason (the
C-STORE status the same refusal gets over DIMSE); its HTTP status is 200 when all were
stored, 202 when some were, 409 when none was.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from io import BytesIO
from typing import Any

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from hie.hub.logging import get_logger
from hie.pacs.dicom_json import Json, element
from hie.pacs.errors import (
    CANNOT_UNDERSTAND,
    DATASET_MISMATCH,
    DicomRefused,
    UnreadableInstance,
)
from hie.pacs.multipart import Part
from hie.pacs.storage import Received, StorageService, Stored
from hie.registries.senders import RegisteredMo

log = get_logger("hie.pacs.stow")

DICOM = "application/dicom"
_KEEP_AT_MOST = 1 << 20  # of a part that is not DICOM, the head is kept for the operator
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN"})
_LONG_VRS |= {b"UR", b"UT", b"UV"}


@dataclass(frozen=True, slots=True)
class Part10:
    """A Part 10 file split into what its File Meta Information says and its dataset."""

    transfer_syntax: str
    sop_class_uid: str
    sop_instance_uid: str
    dataset: bytes

    def received(self, *, calling_ae: str = "", peer: str = "") -> Received:
        """This file as the storage service takes an instance: the dataset as it is, with the
        UIDs and transfer syntax its file meta names."""
        return Received(
            dataset=self.dataset,
            transfer_syntax=self.transfer_syntax,
            sop_class_uid=self.sop_class_uid,
            sop_instance_uid=self.sop_instance_uid,
            calling_ae=calling_ae,
            peer=peer,
        )


def split_part10(raw: bytes) -> Part10:
    """The File Meta Information (group 0002, explicit VR little endian, PS3.10 7.1) and the
    dataset behind it; :class:`UnreadableInstance` if ``raw`` is not a Part 10 file."""
    if len(raw) < 132 or raw[128:132] != b"DICM":
        raise UnreadableInstance("the part is not a DICOM Part 10 file (no DICM prefix)")
    pos, found = 132, {}
    while pos + 8 <= len(raw):
        group, elem = struct.unpack_from("<HH", raw, pos)
        if group != 0x0002:
            break
        vr = raw[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            if pos + 12 > len(raw):
                break
            length, start = struct.unpack_from("<I", raw, pos + 8)[0], pos + 12
        else:
            length, start = struct.unpack_from("<H", raw, pos + 6)[0], pos + 8
        if start + length > len(raw):
            raise UnreadableInstance("the File Meta Information runs past the end of the file")
        found[elem] = raw[start : start + length]
        pos = start + length

    def text(elem: int) -> str:
        return found.get(elem, b"").decode("ascii", "replace").strip("\x00 ")

    ts = text(0x0010)
    if not ts:
        raise UnreadableInstance("the File Meta Information names no Transfer Syntax UID")
    return Part10(ts, text(0x0002), text(0x0003), raw[pos:])


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one part."""

    sop_class_uid: str
    sop_instance_uid: str
    stored: Stored | None = None
    failure: int | None = None  # Failure Reason (0008,1197): a C-STORE status
    reason: str = ""


def store_parts(
    storage: StorageService,
    parts: Sequence[Part],
    mo: RegisteredMo,
    *,
    study_uid: str | None = None,
    peer: str = "",
) -> list[Outcome]:
    """Store each part for ``mo`` (one at a time: the archive's per-study row lock would
    serialise them anyway) and say what became of it."""
    return [_store_one(storage, part, mo, study_uid, peer) for part in parts]


def _store_one(
    storage: StorageService, part: Part, mo: RegisteredMo, study_uid: str | None, peer: str
) -> Outcome:
    ctype = part.content_type.type
    if ctype != DICOM:
        _keep_foreign(storage, part, mo, peer, f"a body part of type {ctype or 'none'}")
        return Outcome("", "", failure=CANNOT_UNDERSTAND, reason=f"unsupported part {ctype}")
    raw = part.read()
    try:
        p10 = split_part10(raw)
    except UnreadableInstance as err:
        _keep_foreign(storage, part, mo, peer, err.message, raw)
        return Outcome("", "", failure=err.dimse_status, reason=err.message)
    if study_uid is not None:
        other = _study_of(p10, raw)
        if other != study_uid:
            reason = "the instance belongs to another study than the request's path names"
            log.info("stow.other_study", mo=mo.id)
            return Outcome(
                p10.sop_class_uid, p10.sop_instance_uid, failure=DATASET_MISMATCH, reason=reason
            )
    rx = p10.received(peer=peer)
    try:
        done = storage.store(rx, mo)
    except DicomRefused as err:
        log.info("stow.refused", code=err.code, mo=mo.id)
        return Outcome(
            p10.sop_class_uid, p10.sop_instance_uid, failure=err.dimse_status, reason=err.message
        )
    return Outcome(p10.sop_class_uid, p10.sop_instance_uid, stored=done)


def _study_of(p10: Part10, raw: bytes) -> str | None:
    """The Study Instance UID the dataset names (None if it cannot be read: the storage
    service then refuses it with the reason)."""
    try:
        ds = dcmread(BytesIO(raw), stop_before_pixels=True, specific_tags=["StudyInstanceUID"])
        return str(ds.get("StudyInstanceUID", "")).strip("\x00 ") or None
    except (InvalidDicomError, ValueError, TypeError, KeyError, EOFError, OSError):
        log.info("stow.unreadable_header", transfer_syntax=p10.transfer_syntax)
        return None


def _keep_foreign(
    storage: StorageService,
    part: Part,
    mo: RegisteredMo,
    peer: str,
    reason: str,
    raw: bytes | None = None,
) -> None:
    """Keep a part that never reached the storage service (best effort, like its own)."""
    if storage.rejected is None:
        return
    try:
        if raw is None:
            part.body.seek(0)
            raw = part.body.read(_KEEP_AT_MOST)
        storage.rejected.keep(
            channel="dicom",
            kind="rejected",
            raw=raw[:_KEEP_AT_MOST],
            size=part.size,
            sender=f"STOW-RS|{mo.id}",
            peer=peer,
            code=UnreadableInstance.code,
            reason=reason,
        )
    except Exception as exc:  # noqa: BLE001 - the rejected store itself is down
        log.error("stow.keep_failed", error=type(exc).__name__)


def response(outcomes: Sequence[Outcome], base: str, study_uid: str | None) -> tuple[int, Json]:
    """The HTTP status and the DICOM JSON body of a store request (module docstring);
    ``base`` is the DICOMweb base URL retrieve URLs start with."""
    stored = [o for o in outcomes if o.stored is not None]
    failed = [o for o in outcomes if o.stored is None]
    studies = {o.stored.study_uid for o in stored if o.stored and o.stored.study_uid}
    body: dict[str, Any] = {}
    one_study = study_uid or (next(iter(studies)) if len(studies) == 1 else None)
    if one_study:
        body.update(element("RetrieveURL", f"{base}/studies/{one_study}"))
    if stored:
        body.update(element("ReferencedSOPSequence", [_referenced(o, base) for o in stored]))
    if failed:
        body.update(element("FailedSOPSequence", [_failed(o) for o in failed]))
    if not failed:
        status = 200
    elif stored:
        status = 202
    else:
        status = 409
    return status, body


def _referenced(o: Outcome, base: str) -> Json:
    assert o.stored is not None
    item: Json = {}
    item.update(element("ReferencedSOPClassUID", o.sop_class_uid))
    item.update(element("ReferencedSOPInstanceUID", o.sop_instance_uid))
    s = o.stored
    if s.study_uid and s.series_uid:
        url = f"{base}/studies/{s.study_uid}/series/{s.series_uid}/instances/{s.sop_uid}"
        item.update(element("RetrieveURL", url))
    return item


def _failed(o: Outcome) -> Json:
    item: Json = {}
    item.update(element("ReferencedSOPClassUID", o.sop_class_uid or None))
    item.update(element("ReferencedSOPInstanceUID", o.sop_instance_uid or None))
    item.update(element("FailureReason", o.failure if o.failure is not None else 0x0110))
    return item
