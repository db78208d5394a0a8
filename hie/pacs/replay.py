"""Replaying a refused DICOM instance from the rejected-message store, once its cause is fixed.

The storage service keeps every instance it refuses (:meth:`~hie.pacs.storage.StorageService.
store`) with channel ``dicom``: the File Meta Information the hub wrote in front of the dataset
as received (PS3.10 7.1), the sender as ``<calling AE title>|<MO id>`` (``|<MO id>`` for
STOW-RS), the peer's address and the Affected SOP Instance UID. After an operator fixed the
cause — registered the MO's patient identifier system or the issuer its modality names,
resolved a patient the study was filed under, freed the archive's disk —
:func:`replay_instance` stores it through the same path as a C-STORE, as the MO that sent it:

- the file meta gives the SOP Class and Instance UID and the Transfer Syntax the request
  carried; the dataset behind it is handed over byte for byte;
- the MO is looked up again in the facility registry (it must still be registered and active);
- stored, or the same bytes already stored (the modality sent it again meanwhile): the kept
  message is marked replayed with the outcome (``0000 stored: ImagingStudy/…`` or
  ``0000 duplicate: …``);
- refused again: the C-STORE failure status and the reason are returned, the message stays
  open and is not kept a second time.

What a replay can never store is refused before it runs (:class:`~hie.hub.errors.Conflict`):
a message that is not open, not an instance the storage service kept, kept without file
meta (its UIDs were too broken to write one) or not a whole dataset — its bytes cannot
change; discard it with a reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from hie.hub.audit import note_access
from hie.hub.errors import Conflict
from hie.hub.logging import get_logger
from hie.hub.rejected import RejectedMessage
from hie.pacs.access import STUDY_RESOURCE
from hie.pacs.errors import (
    ArchiveUnavailable,
    DicomRefused,
    InstanceConflict,
    UnreadableInstance,
)
from hie.pacs.p10 import check_dataset
from hie.pacs.storage import Received, StorageService, Stored
from hie.pacs.stow import split_part10
from hie.registries.senders import RegisteredMo

log = get_logger("hie.pacs.replay")

CHANNEL = "dicom"
SUCCESS = 0x0000  # PS3.7 C.1.1: the C-STORE answer when the instance is stored
# what the storage service keeps a refusal as (DicomRefused.kind and its subclasses')
_KINDS = frozenset({DicomRefused.kind, InstanceConflict.kind, ArchiveUnavailable.kind})


@dataclass(frozen=True, slots=True)
class Replayed:
    """What a replay came to: the C-STORE status the instance would be answered with now."""

    status: int  # SUCCESS, or the refusal's failure status (PS3.4 Table B.2-1)
    stored: Stored | None = None
    refused: DicomRefused | None = None

    @property
    def outcome(self) -> str:
        """``stored``, ``duplicate`` (the same bytes were stored before) or ``refused``."""
        if self.stored is None:
            return "refused"
        return "duplicate" if self.stored.duplicate else "stored"

    @property
    def text(self) -> str:
        """The status in hex and what it means, as ``hie messages replay`` prints it and a
        replayed message records it: ``0000 stored: ImagingStudy/…``, ``0000 duplicate: …``,
        ``A900 HIE-1304: <reason>``."""
        if self.refused is not None:
            return f"{self.status:04X} {self.refused.code}: {self.refused.message}"
        assert self.stored is not None
        if self.stored.duplicate:
            return f"{self.status:04X} duplicate: the same bytes were already stored"
        return f"{self.status:04X} stored: {STUDY_RESOURCE}/{self.stored.imaging_study_id}"


def replayable(kept: RejectedMessage) -> bool:
    """Whether ``kept`` is an instance the storage service refused or failed on for a cause
    a replay may find fixed. One refused as unreadable (``HIE-1301``: truncated, malformed,
    an unknown transfer syntax) is refused for its bytes, which a replay cannot change.
    Whether the bytes carry file meta is only known once they are read
    (:func:`replay_instance`)."""
    return kept.channel == CHANNEL and kept.kind in _KINDS and kept.code != UnreadableInstance.code


def replay_instance(storage: StorageService, kept: RejectedMessage) -> Replayed:
    """Store the instance ``kept`` holds again, as the MO that sent it (see the module
    docstring); mark it replayed in ``storage.rejected`` when it is stored or was already.

    Raises :class:`~hie.hub.errors.Conflict` for a message a replay cannot store (not open,
    not a replayable instance, no file meta, not a whole dataset, its MO no longer
    registered); the message stays as it was. A new instance of a known series leaves its
    study's ImagingStudy counts stale, as a C-STORE does: call
    :meth:`~hie.pacs.storage.StorageService.refresh_summaries` after a batch of replays."""
    ident = kept.id
    if storage.rejected is None:  # pragma: no cover - the hub always builds it with one
        raise Conflict("the storage service has no rejected-message store to replay from")
    if not replayable(kept):
        raise Conflict(
            f"сообщение {ident} ({kept.channel}, {kept.kind}, {kept.code or '-'}) нельзя "
            f"обработать повторно / message {ident} is not a DICOM instance a replay could "
            "store (an unreadable one is refused for its bytes: discard it)"
        )
    if kept.status != "open":
        raise Conflict(
            f"сообщение {ident} уже закрыто ({kept.status}) / message {ident} is {kept.status}"
        )
    rx, mo = _received(storage, kept)
    try:
        done = storage.store(rx, mo, keep=False)  # kept already: it stays open if refused
    except DicomRefused as err:
        log.info("pacs.replay_refused", id=ident, code=err.code, mo=mo.id)
        return Replayed(err.dimse_status, refused=err)
    out = Replayed(SUCCESS, stored=done)
    if not done.duplicate:
        # the record of the operator's request names what the replay wrote
        note_access(
            entities=[f"{STUDY_RESOURCE}/{done.imaging_study_id}"],
            patients=[done.patient_ref] if done.patient_ref else [],
        )
    storage.rejected.mark_replayed(ident, out.text)
    log.info("pacs.replayed", id=ident, outcome=out.outcome, mo=mo.id)
    return out


def _received(storage: StorageService, kept: RejectedMessage) -> tuple[Received, RegisteredMo]:
    """The C-STORE request ``kept`` was, rebuilt from its bytes and sender, and its MO."""
    ident = kept.id
    raw = kept.raw or b""
    try:
        p10 = split_part10(raw)
    except UnreadableInstance:
        raise Conflict(
            f"сообщение {ident} сохранено без File Meta Information (только набор данных): "
            f"повторная обработка невозможна / message {ident} was kept without File Meta "
            "Information (the dataset alone: its UIDs were too broken for one), so its SOP "
            "Class, Instance and Transfer Syntax are unknown; it cannot be replayed"
        ) from None
    try:
        check_dataset(p10.dataset, p10.transfer_syntax)
    except UnreadableInstance as err:
        raise Conflict(
            f"сообщение {ident} — не целый набор данных DICOM / message {ident} is not a "
            f"whole dataset ({err.message}); it cannot be replayed"
        ) from None
    calling_ae, _, mo_id = kept.sender.rpartition("|")
    # the operator has just fixed the cause, often in the registry: no cached answer
    storage.senders.invalidate()
    mo = storage.senders.mo(mo_id) if mo_id else None
    if mo is None:
        raise Conflict(
            f"МО {mo_id or '-'}, приславшая сообщение {ident}, не зарегистрирована или не "
            f"активна / the MO that sent message {ident} (Organization/{mo_id or '-'}) is no "
            "longer a registered, active MO; register it again or discard the message"
        )
    return p10.received(calling_ae=calling_ae, peer=kept.peer), mo
