"""Why the archive refuses an instance: :class:`~hie.hub.errors.HieError` subclasses with
stable codes, each naming the DIMSE status the DICOM adapter answers with
(:mod:`hie.adapters.dicom` maps them in one place; STOW-RS will map the same errors to HTTP).
Messages never quote patient data (they end up in logs and the rejected-message store)."""

from __future__ import annotations

from hie.hub.errors import HieError

# PS3.4 Table B.2-1 (Storage Service Class) C-STORE failure statuses
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
CANNOT_UNDERSTAND = 0xC000


class DicomRefused(HieError):
    """An instance the archive did not store; ``dimse_status`` is the C-STORE answer."""

    code = "HIE-1300"
    status = 422
    dimse_status = CANNOT_UNDERSTAND
    kind = "rejected"  # the rejected-message store's kind


class UnreadableInstance(DicomRefused):
    """The bytes are not a well-formed dataset in the negotiated transfer syntax (truncated,
    an element running past the end, a sequence without its delimiter)."""

    code = "HIE-1301"
    status = 400
    dimse_status = CANNOT_UNDERSTAND


class InstanceMismatch(DicomRefused):
    """The dataset lacks what the archive files it by (Study, Series, SOP Instance UID,
    Patient ID), or disagrees with the C-STORE request or with what is stored (a series filed
    under another study, a study of another patient)."""

    code = "HIE-1302"
    status = 422
    dimse_status = DATASET_MISMATCH


class InstanceConflict(DicomRefused):
    """An instance with this SOP Instance UID is stored with different bytes: the first is
    kept, the second refused (and kept in the rejected-message store)."""

    code = "HIE-1303"
    status = 409
    dimse_status = CANNOT_UNDERSTAND
    kind = "conflict"


class PatientUnresolved(DicomRefused):
    """The patient cannot be filed: the sending MO has no registered patient identifier
    system, or a new patient has no usable demographics (no name)."""

    code = "HIE-1304"
    status = 422
    dimse_status = DATASET_MISMATCH


class ArchiveUnavailable(DicomRefused):
    """The blob store or the database failed: nothing was stored, the sender may retry."""

    code = "HIE-1305"
    status = 503
    dimse_status = OUT_OF_RESOURCES
    kind = "failed"
