"""DICOM upper-layer associations (pynetdicom): who is calling, and the DIMSE answers.

:class:`DicomListener` is the hub's Application Entity (``HIE_DICOM_AE_TITLE``, port
``HIE_DICOM_PORT``). pynetdicom raises events; the handlers here are thin:

1. **association request** — the called AE title must be the hub's (else rejected, "called
   AE title not recognised"); the calling AE title and the peer's address must belong to a
   registered MO (facility registry: an active ``dicom-dimse`` Endpoint with address
   ``dicom://AE_TITLE@host:port``, :meth:`~hie.registries.senders.SenderRegistry.
   mo_for_dicom_caller`) — else rejected ("calling AE title not recognised") and logged;
2. **C-ECHO** (Verification) — success;
3. **C-STORE** (every storage SOP class pynetdicom knows, in any standard transfer syntax) —
   the dataset exactly as received goes to :class:`~hie.pacs.storage.StorageService`; the
   answer is success only once it is durable, else the failure status its error names
   (:func:`dimse_status`: the one place errors become statuses), with an Error Comment;
4. **storage commitment** (push model, N-ACTION) — answered at once; the result
   (:func:`hie.pacs.commitment.commit`) follows as an N-EVENT-REPORT over a new association
   the hub opens to the caller's registered address, in the SCP role (PS3.4 J.3.3).

Accepted sockets get ``TCP_NODELAY`` (pynetdicom leaves Nagle's algorithm on, which can hold
each DIMSE response back ~40 ms). An association silent for ``HIE_DICOM_TIMEOUT_SECONDS`` —
including one stalled in the middle of a dataset — is aborted; nothing of a dataset that did
not arrive whole reaches the archive (the storage service is called only with a complete one).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any

from pydicom import uid
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import _STORAGE_CLASSES as STORAGE_CLASSES
from pynetdicom.transport import ThreadedAssociationServer

from hie.fhir.service import FhirService
from hie.hub.logging import get_logger
from hie.hub.runtime import Hub
from hie.hub.settings import Settings
from hie.pacs.commitment import Commitment, commit
from hie.pacs.errors import CANNOT_UNDERSTAND, DicomRefused
from hie.pacs.storage import Received, StorageService
from hie.registries.patient_index import attach_mpi
from hie.registries.senders import RegisteredMo, SenderRegistry

log = get_logger("hie.dicom")

SUCCESS = 0x0000
VERIFICATION = "1.2.840.10008.1.1"  # PS3.4 A.4 Verification SOP Class
COMMITMENT_PUSH = "1.2.840.10008.1.20.1"  # PS3.4 J.3 Storage Commitment Push Model
COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"  # its well-known SOP Instance
COMMIT_REQUEST = 1  # N-ACTION Action Type ID: Request Storage Commitment
NO_SUCH_ACTION = 0x0123
PROCESSING_FAILURE = 0x0110
MISTYPED_ARGUMENT = 0x0212
_UNCOMPRESSED = [str(uid.ExplicitVRLittleEndian), str(uid.ImplicitVRLittleEndian)]
# PS3.8 9.3.4 A-ASSOCIATE-RJ: result 1 (permanent), source 1 (service user), diagnostics
_REJECT_CALLING = (0x01, 0x01, 0x03)
_REJECT_CALLED = (0x01, 0x01, 0x07)
# Transfer syntaxes accepted for storage: every one the standard defines (the archive keeps
# the bytes as they come, so none needs a codec here). pynetdicom accepts, per presentation
# context, the first of this list the caller proposed: lossless compression first (a sender
# holding compressed images sends them as they are), then uncompressed, and lossy syntaxes
# last — a sender that offers to compress uncompressed images lossily is never asked to (a
# sender holding lossy images proposes that syntax in a context of its own, as dcmtk does).
_PREFERRED = [
    uid.JPEGLosslessSV1,
    uid.JPEGLossless,
    uid.JPEGLSLossless,
    uid.JPEG2000Lossless,
    uid.JPEG2000MCLossless,
    uid.HTJ2KLossless,
    uid.HTJ2KLosslessRPCL,
    uid.RLELossless,
    uid.ExplicitVRLittleEndian,
    uid.ImplicitVRLittleEndian,
    uid.DeflatedExplicitVRLittleEndian,
    uid.ExplicitVRBigEndian,
]
TRANSFER_SYNTAXES = [
    str(ts) for ts in [*_PREFERRED, *(t for t in uid.AllTransferSyntaxes if t not in _PREFERRED)]
]


@dataclass(frozen=True, slots=True)
class Caller:
    """A peer whose association was accepted."""

    mo: RegisteredMo
    ae_title: str
    host: str
    port: int

    @property
    def peer(self) -> str:
        """``host:port`` of the peer."""
        return f"{self.host}:{self.port}"


def dimse_status(err: DicomRefused) -> Dataset:
    """The C-STORE response status for a refusal: its status code and an Error Comment
    (0000,0902, LO: at most 64 characters) with the hub's error code."""
    status = Dataset()
    status.Status = err.dimse_status
    status.ErrorComment = f"{err.code} {err.message}"[:64]
    return status


class DicomListener:
    """The hub's DICOM Application Entity (see the module docstring)."""

    def __init__(
        self,
        settings: Settings,
        storage: StorageService,
        senders: SenderRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.storage = storage
        self.senders = senders or storage.senders
        self.ae_title = settings.dicom_ae_title.strip()
        self._callers: weakref.WeakKeyDictionary[Association, Caller] = weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self._server: ThreadedAssociationServer | None = None
        self._reports: set[threading.Thread] = set()
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        # pynetdicom logs every association and message at INFO (dataset summaries at DEBUG):
        # the hub logs its own structured lines, without patient data
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        ae = AE(ae_title=self.ae_title)
        timeout = self.settings.dicom_timeout_seconds
        ae.network_timeout = timeout
        ae.acse_timeout = timeout
        ae.dimse_timeout = timeout
        ae.maximum_associations = self.settings.dicom_max_associations
        ae.maximum_pdu_size = 0  # no limit on what peers send us
        ae.add_supported_context(VERIFICATION, TRANSFER_SYNTAXES)
        ae.add_supported_context(COMMITMENT_PUSH, _UNCOMPRESSED)
        for sop_class in STORAGE_CLASSES.values():
            ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
        return ae

    # --- running -----------------------------------------------------------------------------

    def start(self) -> None:
        """Listen on ``HIE_DICOM_HOST``:``HIE_DICOM_PORT`` in background threads."""
        handlers: list[evt.EventHandlerType] = [
            (evt.EVT_CONN_OPEN, self._on_connection),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_N_ACTION, self._on_commitment),
        ]
        address = (self.settings.dicom_host, self.settings.dicom_port)
        self._server = self.ae.start_server(address, block=False, evt_handlers=handlers)

    @property
    def port(self) -> int:
        """The port the listener is bound to."""
        if self._server is None:
            raise RuntimeError("the DICOM listener is not started")
        return int(self._server.server_address[1])

    def stop(self) -> None:
        """Stop accepting, abort open associations, release the threads."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self.ae.shutdown()
        for thread in list(self._reports):
            thread.join(timeout=self.settings.dicom_timeout_seconds)
        self.storage.close()

    # --- association ---------------------------------------------------------------------

    @staticmethod
    def _on_connection(event: evt.Event) -> None:
        sock = getattr(event.assoc.dul.socket, "socket", None)
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:  # pragma: no cover - the peer already went away
                pass

    def _on_requested(self, event: evt.Event) -> None:
        """Accept only the hub's called AE title from a registered caller (module docs)."""
        assoc = event.assoc
        rq: Any = assoc.requestor.primitive
        calling = str(rq.calling_ae_title or "").strip()
        called = str(rq.called_ae_title or "").strip()
        host, port = str(assoc.requestor.address), int(assoc.requestor.port)
        if called != self.ae_title:
            log.warning("dicom.rejected", reason="called-ae-title", ae_title=calling, peer=host)
            self._reject(assoc, _REJECT_CALLED)
            return
        try:
            mo = self.senders.mo_for_dicom_caller(calling, host)
        except Exception as exc:  # the registry is unreadable: refuse rather than guess
            log.error("dicom.registry_failed", error=type(exc).__name__)
            mo = None
        if mo is None:
            log.warning("dicom.rejected", reason="unknown-caller", ae_title=calling, peer=host)
            self._reject(assoc, _REJECT_CALLING)
            return
        with self._lock:
            self._callers[assoc] = Caller(mo, calling, host, port)
        log.info("dicom.associated", mo=mo.id, ae_title=calling, peer=host)

    @staticmethod
    def _reject(assoc: Association, reason: tuple[int, int, int]) -> None:
        assoc.acse.send_reject(*reason)
        assoc.kill()

    def _caller(self, assoc: Association) -> Caller | None:
        with self._lock:
            return self._callers.get(assoc)

    # --- DIMSE services --------------------------------------------------------------------

    @staticmethod
    def _on_echo(_event: evt.Event) -> int:
        return SUCCESS

    def _on_store(self, event: evt.Event) -> int | Dataset:
        caller = self._caller(event.assoc)
        if caller is None:  # pragma: no cover - only accepted associations get here
            status = Dataset()
            status.Status = CANNOT_UNDERSTAND
            return status
        rq: Any = event.request
        rx = Received(
            dataset=event.encoded_dataset(include_meta=False),
            transfer_syntax=str(event.context.transfer_syntax),
            sop_class_uid=str(rq.AffectedSOPClassUID or ""),
            sop_instance_uid=str(rq.AffectedSOPInstanceUID or ""),
            calling_ae=caller.ae_title,
            peer=caller.peer,
        )
        try:
            self.storage.store(rx, caller.mo)
        except DicomRefused as err:
            log.info("dicom.store_refused", code=err.code, mo=caller.mo.id)
            return dimse_status(err)
        return SUCCESS

    # --- storage commitment (push model) -----------------------------------------------------

    def _on_commitment(self, event: evt.Event) -> tuple[int, Dataset | None]:
        """N-ACTION Request Storage Commitment: answered at once; the result follows in an
        N-EVENT-REPORT over a new association to the caller's registered address."""
        caller = self._caller(event.assoc)
        rq: Any = event.request
        if caller is None or rq.ActionTypeID != COMMIT_REQUEST:
            return NO_SUCH_ACTION, None
        try:
            info = event.action_information
            transaction = str(info.TransactionUID)
            refs = [
                (str(item.ReferencedSOPClassUID), str(item.ReferencedSOPInstanceUID))
                for item in info.ReferencedSOPSequence
            ]
        except (AttributeError, KeyError, ValueError, TypeError):
            return MISTYPED_ARGUMENT, None
        target = self.senders.dicom_destination(caller.ae_title, for_mo=caller.mo.id)
        if target is None:
            log.warning("dicom.commitment_no_address", mo=caller.mo.id, ae_title=caller.ae_title)
            return PROCESSING_FAILURE, None
        thread = threading.Thread(
            target=self._report,
            args=(caller, target, transaction, refs),
            name="dicom-commitment",
            daemon=True,
        )
        with self._lock:
            self._reports.add(thread)
        thread.start()
        return SUCCESS, None

    def _report(
        self,
        caller: Caller,
        target: tuple[str, int],
        transaction: str,
        refs: list[tuple[str, str]],
    ) -> None:
        """Decide the commitment and deliver it (three tries, a few seconds apart)."""
        try:
            result = commit(self.storage.index, self.storage.blobs, transaction, refs)
            report = commitment_report(result)
            for attempt in range(3):
                if self._send_report(caller, target, report, result.event_type):
                    log.info(
                        "dicom.commitment_reported", mo=caller.mo.id, event_type=result.event_type
                    )
                    return
                time.sleep(1.0 + 2.0 * attempt)
            log.warning("dicom.commitment_undelivered", mo=caller.mo.id)
        finally:
            with self._lock:
                self._reports.discard(threading.current_thread())

    def _send_report(
        self, caller: Caller, target: tuple[str, int], report: Dataset, event_type: int
    ) -> bool:
        ae = AE(ae_title=self.ae_title)
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = (
            self.settings.dicom_timeout_seconds
        )
        ae.add_requested_context(COMMITMENT_PUSH, _UNCOMPRESSED)
        # the hub calls, but plays the SCP role of Storage Commitment (PS3.4 J.3.3)
        role = build_role(COMMITMENT_PUSH, scp_role=True)
        assoc = ae.associate(
            target[0],
            target[1],
            ae_title=caller.ae_title,
            ext_neg=[role],
            evt_handlers=[(evt.EVT_CONN_OPEN, self._on_connection)],
        )
        if not assoc.is_established:
            return False
        try:
            status: Any = assoc.send_n_event_report(
                report, event_type, COMMITMENT_PUSH, COMMITMENT_INSTANCE
            )[0]
            return bool(status) and status.Status == SUCCESS
        finally:
            assoc.release()


def commitment_report(result: Commitment) -> Dataset:
    """The N-EVENT-REPORT Event Information for a commitment (PS3.4 J.3.3.1.1)."""
    ds = Dataset()
    ds.TransactionUID = result.transaction_uid
    if result.committed:
        ds.ReferencedSOPSequence = [_ref(c, i) for c, i in result.committed]
    if result.failed:
        failed = []
        for c, i, reason in result.failed:
            item = _ref(c, i)
            item.FailureReason = reason
            failed.append(item)
        ds.FailedSOPSequence = failed
    return ds


def _ref(sop_class: str, sop_uid: str) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = sop_class
    item.ReferencedSOPInstanceUID = sop_uid
    return item


def start_dicom(hub: Hub) -> DicomListener | None:
    """Start the DICOM listener ``HIE_DICOM_*`` describes over ``hub`` (None when
    ``HIE_DICOM_PORT`` is 0). Instances go to the archive through the hub's FHIR service
    and master patient index; refused ones to ``hub.rejected``."""
    settings = hub.settings
    if not settings.dicom_port:
        return None
    svc = FhirService(hub.store, settings, search_index=lambda: hub.search_index, trail=hub.audit)
    attach_mpi(svc)
    listener = DicomListener(settings, StorageService(svc, hub.blobs, hub.rejected))
    listener.start()
    return listener
