"""DICOM upper-layer associations (pynetdicom): who is calling, and the DIMSE answers.

:class:`DicomListener` is the hub's Application Entity (``HIE_DICOM_AE_TITLE``, port
``HIE_DICOM_PORT``). pynetdicom raises events; the handlers here are thin:

1. **association request** — the called AE title must be the hub's (else rejected, "called
   AE title not recognised"); the calling AE title and the peer's address must belong to a
   registered MO (facility registry: an active ``dicom-dimse`` Endpoint with address
   ``dicom://AE_TITLE@host:port``, :meth:`~hie.registries.senders.SenderRegistry.
   mo_for_dicom_caller`) — else rejected ("calling AE title not recognised") and logged.
   Over TLS (``HIE_DICOM_TLS_PORT``, a second server) a caller presenting a verified client
   certificate is the MO with that AE title that registered the certificate's fingerprint,
   wherever it connects from (:class:`_TlsAssociationServer` runs each handshake in the
   association's thread, not the accepting one);
2. **C-ECHO** (Verification) — success;
3. **C-STORE** (every storage SOP class pynetdicom knows, in any standard transfer syntax) —
   the dataset exactly as received goes to :class:`~hie.pacs.storage.StorageService`; the
   answer is success only once it is durable, else the failure status its error names
   (:func:`dimse_status`: the one place errors become statuses), with an Error Comment.
   The audit trail gets one record per study and association, written before the answer
   to the study's first instance (as DICOM audits "Instances Transferred", PS3.15
   A.5.3.2), and one per refused instance;
4. **storage commitment** (push model, N-ACTION) — answered at once; the result
   (:func:`hie.pacs.commitment.commit`) follows as an N-EVENT-REPORT over a new association
   the hub opens to the caller's registered address, in the SCP role (PS3.4 J.3.3);
5. **Query/Retrieve** (Patient Root and Study Root; PS3.4 Annex C) — the caller acts as its
   MO's system (:func:`hie.lab_exchange.service.mo_principal`), so the access policy decides
   what it finds and retrieves (:mod:`hie.pacs.retrieve`, one audit record per operation):

   - **C-FIND** at every level: the identifier becomes a :class:`~hie.pacs.query.DicomQuery`
     (hierarchical: the unique keys of the levels above must be single values); one pending
     response (0xFF00) per match with the requested keys (UTF-8, ``ISO_IR 192``), at most
     ``HIE_DICOM_QUERY_LIMIT``; C-CANCEL answers 0xFE00; a bad identifier 0xA900, a bad
     match value 0xC000, an archive failure 0xA700 — each with an Error Comment;
   - **C-MOVE** to a destination AE title registered by the *caller's own MO* (a
     ``dicom-dimse`` Endpoint with host and port; anything else is 0xA801 "move destination
     unknown": an MO cannot push another MO's patients to a third MO's system), over a new
     association proposing, per SOP class, each stored transfer syntax and uncompressed;
   - **C-GET** over the caller's association (it proposes storage contexts with SCP/SCU role
     selection, which the hub accepts);

   instances go out as stored (no transcoding: one whose transfer syntax the receiver did not
   accept is a failed sub-operation), with pending responses carrying the remaining,
   completed, failed and warning counts, cancel honoured between sub-operations, and the
   Failed SOP Instance UID List on a warning or failure.

Associations the hub opens (C-MOVE, commitment reports) go over TLS to nodes registered as
``dicom+tls://AE@host:port``, presenting ``HIE_DICOM_TLS_CERT`` (:meth:`DicomListener._tls_to`).

Accepted sockets get ``TCP_NODELAY`` (pynetdicom leaves Nagle's algorithm on, which can hold
each DIMSE response back ~40 ms). An association silent for ``HIE_DICOM_TIMEOUT_SECONDS`` —
including one stalled in the middle of a dataset — is aborted; nothing of a dataset that did
not arrive whole reaches the archive (the storage service is called only with a complete one).
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydicom import uid
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pynetdicom import AE, _config, build_context, build_role, evt
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import _STORAGE_CLASSES as STORAGE_CLASSES
from pynetdicom.status import code_to_category
from pynetdicom.transport import ThreadedAssociationServer

from hie.adapters import dicom_reactor
from hie.adapters.tls import certificate_of, server_ssl_context
from hie.fhir.service import FhirService
from hie.hub.audit_export import tls_context
from hie.hub.auth import Forbidden, acting_as
from hie.hub.blobs.journal import open_journal
from hie.hub.errors import HieError, StorageError
from hie.hub.logging import get_logger
from hie.hub.runtime import Hub
from hie.hub.settings import Settings
from hie.lab_exchange.service import mo_principal
from hie.pacs.access import audit_dimse
from hie.pacs.commitment import Commitment, commit
from hie.pacs.errors import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, ArchiveUnavailable, DicomRefused
from hie.pacs.query import DicomQuery, InvalidQuery, Level, Match
from hie.pacs.retrieve import QueryRetrieve, Retrieval
from hie.pacs.storage import Received, StorageService
from hie.registries.patient_index import attach_mpi
from hie.registries.senders import Destination, RegisteredMo, SenderRegistry

log = get_logger("hie.dicom")

SUCCESS = 0x0000
MOVE_DESTINATION_UNKNOWN = 0xA801
VERIFICATION = "1.2.840.10008.1.1"  # PS3.4 A.4 Verification SOP Class
COMMITMENT_PUSH = "1.2.840.10008.1.20.1"  # PS3.4 J.3 Storage Commitment Push Model
COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"  # its well-known SOP Instance
COMMIT_REQUEST = 1  # N-ACTION Action Type ID: Request Storage Commitment
NO_SUCH_ACTION = 0x0123
PROCESSING_FAILURE = 0x0110
MISTYPED_ARGUMENT = 0x0212
_UNCOMPRESSED = [str(uid.ExplicitVRLittleEndian), str(uid.ImplicitVRLittleEndian)]
# Query/Retrieve information models (PS3.4 C.6): SOP Class UID → root
FIND_MODELS = {
    "1.2.840.10008.5.1.4.1.2.1.1": "PATIENT",  # Patient Root Q/R Information Model - FIND
    "1.2.840.10008.5.1.4.1.2.2.1": "STUDY",  # Study Root Q/R Information Model - FIND
}
MOVE_MODELS = {"1.2.840.10008.5.1.4.1.2.1.2": "PATIENT", "1.2.840.10008.5.1.4.1.2.2.2": "STUDY"}
GET_MODELS = {"1.2.840.10008.5.1.4.1.2.1.3": "PATIENT", "1.2.840.10008.5.1.4.1.2.2.3": "STUDY"}
PENDING = 0xFF00
CANCEL = 0xFE00
WARNING = 0xB000  # sub-operations complete, one or more failures or warnings
ALL_FAILED = 0xA702  # sub-operations complete, all failed
MAX_CONTEXTS = 128  # PS3.8 9.3.2: presentation context IDs are odd numbers 1-255
CHARSET = "ISO_IR 192"  # UTF-8: every response identifier says so
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
    certificate: str | None = None  # SHA-256 of the verified TLS client certificate

    @property
    def peer(self) -> str:
        """``host:port`` of the peer."""
        return f"{self.host}:{self.port}"


def dimse_status(err: HieError) -> Dataset:
    """The DIMSE response status for an error: a refusal's own status (a
    :class:`~hie.pacs.errors.DicomRefused` names it), 0xA700 for a storage failure, else
    0xC000 — with an Error Comment (0000,0902, LO: at most 64 characters) starting with the
    hub's error code."""
    status = Dataset()
    if isinstance(err, DicomRefused):
        status.Status = err.dimse_status
    elif isinstance(err, StorageError):
        status.Status = OUT_OF_RESOURCES
    else:
        status.Status = CANNOT_UNDERSTAND
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
        # associations that stored something: the studies audited on each, (Study Instance
        # UID, duplicate?) -- one record per study and association, as DICOM audits
        # "Instances Transferred" (PS3.15 A.5.3.2), not one per instance
        self._stored: weakref.WeakKeyDictionary[Association, set[tuple[str, bool]]] = (
            weakref.WeakKeyDictionary()
        )
        self._lock = threading.Lock()
        self._servers: dict[str, ThreadedAssociationServer] = {}  # "plain" / "tls"
        self._reports: set[threading.Thread] = set()
        self._client_tls: ssl.SSLContext | None = None  # for dicom+tls:// nodes, when needed
        self.qr = QueryRetrieve(storage.svc, storage.index, storage.blobs)
        self.ae = self._make_ae()

    def _make_ae(self) -> AE:
        # pynetdicom logs every association and message at INFO (dataset summaries at DEBUG):
        # the hub logs its own structured lines, without patient data
        logging.getLogger("pynetdicom").setLevel(logging.WARNING)
        # and never formats identifiers (patient data) for those logs: it did for every C-FIND
        # match, whatever the log level, about 5 % of a query's time
        _config.LOG_REQUEST_IDENTIFIERS = False
        _config.LOG_RESPONSE_IDENTIFIERS = False
        dicom_reactor.install()
        ae = AE(ae_title=self.ae_title)
        timeout = self.settings.dicom_timeout_seconds
        ae.network_timeout = timeout
        ae.acse_timeout = timeout
        ae.dimse_timeout = timeout
        ae.maximum_associations = self.settings.dicom_max_associations
        ae.maximum_pdu_size = 0  # no limit on what peers send us
        ae.add_supported_context(VERIFICATION, TRANSFER_SYNTAXES)
        ae.add_supported_context(COMMITMENT_PUSH, _UNCOMPRESSED)
        for model in (*FIND_MODELS, *MOVE_MODELS, *GET_MODELS):
            ae.add_supported_context(model, _UNCOMPRESSED)
        for sop_class in STORAGE_CLASSES.values():
            # a C-GET caller proposes storage with SCP/SCU role selection: the hub accepts
            # (it then sends over these contexts); without role selection, the usual roles
            ae.add_supported_context(sop_class, TRANSFER_SYNTAXES, scu_role=True, scp_role=True)
        return ae

    # --- running -----------------------------------------------------------------------------

    def start(self) -> None:
        """Listen on ``HIE_DICOM_HOST``:``HIE_DICOM_PORT`` (and ``HIE_DICOM_TLS_PORT`` over
        TLS) in background threads."""
        handlers: list[evt.EventHandlerType] = [
            (evt.EVT_CONN_OPEN, self._on_connection),
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_N_ACTION, self._on_commitment),
            (evt.EVT_C_FIND, self._on_find),
            (evt.EVT_C_MOVE, self._on_move),
            (evt.EVT_C_GET, self._on_get),
            (evt.EVT_RELEASED, self._on_end),
            (evt.EVT_ABORTED, self._on_end),
        ]
        host = self.settings.dicom_host
        if self.settings.dicom_port:
            address = (host, self.settings.dicom_port)
            plain = self.ae.start_server(address, block=False, evt_handlers=handlers)
            assert plain is not None  # non-blocking: the running server
            self._servers["plain"] = plain
        if self.settings.dicom_tls_port:
            ctx = server_ssl_context(
                self.settings.dicom_tls_cert,
                self.settings.dicom_tls_key,
                self.settings.dicom_tls_client_ca,
            )
            server = self.ae.make_server(
                (host, self.settings.dicom_tls_port),
                ssl_context=ctx,
                evt_handlers=handlers,
                server_class=_TlsAssociationServer,
            )
            threading.Thread(target=server.serve_forever, name="hie-dicom-tls", daemon=True).start()
            self._servers["tls"] = server
            # as AE.start_server registers its servers (each removes itself on shutdown)
            self.ae._servers.append(server)
            log.info("dicom.tls_listening", port=server.server_address[1])

    @property
    def port(self) -> int:
        """The port the listener (plain TCP) is bound to."""
        return self._port("plain")

    @property
    def tls_port(self) -> int:
        """The port the TLS listener is bound to."""
        return self._port("tls")

    def _port(self, kind: str) -> int:
        server = self._servers.get(kind)
        if server is None:
            raise RuntimeError(f"the DICOM listener ({kind}) is not started")
        return int(server.server_address[1])

    def stop(self) -> None:
        """Stop accepting, abort open associations, release the threads."""
        for server in self._servers.values():
            server.shutdown()
        self._servers.clear()
        self.ae.shutdown()
        for thread in list(self._reports):
            thread.join(timeout=self.settings.dicom_timeout_seconds)
        self.storage.close()

    # --- association ---------------------------------------------------------------------

    @staticmethod
    def _on_connection(event: evt.Event) -> None:
        dicom_reactor.tune(event.assoc)
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
        cert = certificate_of(getattr(assoc.dul.socket, "socket", None))
        fingerprint = cert.sha256 if cert is not None else None
        try:
            mo = self.senders.mo_for_dicom_caller(calling, host, certificate=fingerprint)
        except Exception as exc:  # the registry is unreadable: refuse rather than guess
            log.error("dicom.registry_failed", error=type(exc).__name__)
            mo = None
        if mo is None:
            reason = "unknown-caller" if cert is None else "unknown-caller-certificate"
            log.warning(
                "dicom.rejected",
                reason=reason,
                ae_title=calling,
                peer=host,
                certificate=fingerprint,
                subject=cert.subject if cert is not None else None,
            )
            self._reject(assoc, _REJECT_CALLING)
            return
        with self._lock:
            self._callers[assoc] = Caller(mo, calling, host, port, fingerprint)
        log.info("dicom.associated", mo=mo.id, ae_title=calling, peer=host, tls=cert is not None)

    def _on_end(self, event: evt.Event) -> None:
        """An association that stored instances ended: its studies' ImagingStudy counts are
        brought up to date now (the worker's pass would within a second)."""
        with self._lock:
            stored = self._stored.pop(event.assoc, None) is not None
        if not stored:
            return
        try:
            self.storage.refresh_summaries()
        except Exception as exc:  # noqa: BLE001 - the worker's pass retries; the sender is gone
            log.error("dicom.summary_failed", error=type(exc).__name__)

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
        with self._lock:
            audited = self._stored.setdefault(event.assoc, set())
        try:
            done = self.storage.store(rx, caller.mo)
        except DicomRefused as err:
            log.info("dicom.store_refused", code=err.code, mo=caller.mo.id)
            self._audit_store(caller, 4, err.dimse_status, reason=err.message)
            return dimse_status(err)
        study = (done.study_uid, done.duplicate)
        if study in audited:  # this association's record of the study is written already
            return SUCCESS
        try:
            self._audit_store(
                caller, 0, SUCCESS, done.patient_ref, done.imaging_study_id, done.study_uid
            )
        except StorageError as exc:  # stored, but not acknowledged unaudited: a resend is
            log.error("dicom.audit_failed", error=exc.message)  # a duplicate, audited then
            return dimse_status(ArchiveUnavailable("the audit trail is unavailable; retry"))
        audited.add(study)
        return SUCCESS

    def _audit_store(
        self,
        caller: Caller,
        outcome: int,
        status: int,
        patient: str | None = None,
        study: str | None = None,
        study_uid: str = "",
        reason: str | None = None,
    ) -> None:
        """The audit record of a refused C-STORE, or of the first instance of a study an
        association stores, as the caller's MO, before the answer (its path names the
        Study Instance UID)."""
        audit_dimse(
            self.storage.svc,
            subtype="store",
            outcome=outcome,
            status=status,
            source=caller.host,
            patients=[patient] if patient else [],
            studies=[study] if study else [],
            reason=reason,
            detail=study_uid,
            principal=mo_principal(caller.mo, "dicom"),
        )

    # --- query / retrieve --------------------------------------------------------------------

    def _on_find(self, event: evt.Event) -> Iterator[tuple[int | Dataset, Dataset | None]]:
        """C-FIND (PS3.4 C.4.1): pending responses with the requested keys of each match."""
        caller = self._caller(event.assoc)
        rq: Any = event.request
        root = FIND_MODELS.get(str(rq.AffectedSOPClassUID), "STUDY")
        if caller is None:  # pragma: no cover - only accepted associations get here
            yield _failure(CANNOT_UNDERSTAND, "unknown caller"), None
            return
        with acting_as(mo_principal(caller.mo, "dicom")):
            try:
                level, keys, returned = _identifier(event)
                detail = f"{root.lower()}-root {level.value} keys={','.join(sorted(keys))}"
                q = DicomQuery(
                    level,
                    keys,
                    root=root,
                    hierarchical=True,
                    retrieve_ae_title=self.ae_title,
                )
            except InvalidQuery as err:
                self.qr.refused("query", err, caller.peer, f"{root.lower()}-root")
                yield dimse_status(err), None
                return
            try:
                page = self.qr.find(q, source=caller.peer, detail=detail)
            except (HieError, Forbidden) as err:
                log.info("dicom.find_refused", code=err.code, mo=caller.mo.id)
                yield dimse_status(err), None
                return
            except Exception as exc:  # the archive failed: say so, keep the association
                log.error("dicom.find_failed", error=type(exc).__name__, mo=caller.mo.id)
                yield _failure(OUT_OF_RESOURCES, "HIE-1305 the archive failed; retry"), None
                return
        if page.more:
            log.info("dicom.find_cut", mo=caller.mo.id, limit=len(page.matches))
        for m in page.matches:
            if event.is_cancelled:
                yield CANCEL, None
                return
            yield PENDING, _response(level, returned, m)

    def _plan(
        self, event: evt.Event, caller: Caller, models: dict[str, str], op: str
    ) -> Retrieval | Dataset:
        """The instances a C-MOVE / C-GET names (or the failure status to answer)."""
        rq: Any = event.request
        root = models.get(str(rq.AffectedSOPClassUID), "STUDY")
        detail = f"{op} {root.lower()}-root"
        if op == "C-MOVE":
            detail += f" to {str(rq.MoveDestination or '').strip()}"
        with acting_as(mo_principal(caller.mo, "dicom")):
            try:
                level, keys, _ = _identifier(event)
            except InvalidQuery as err:
                self.qr.refused("retrieve", err, caller.peer, detail)
                return dimse_status(err)
            try:
                return self.qr.retrieval(
                    level, keys, root=root, source=caller.peer, detail=f"{detail} {level.value}"
                )
            except (HieError, Forbidden) as err:  # audited by the service
                log.info("dicom.retrieve_refused", code=err.code, mo=caller.mo.id)
                return dimse_status(err)
            except Exception as exc:
                log.error("dicom.retrieve_failed", error=type(exc).__name__, mo=caller.mo.id)
                return _failure(OUT_OF_RESOURCES, "HIE-1305 the archive failed; retry")

    def _on_move(self, event: evt.Event) -> Iterator[Any]:
        """C-MOVE (PS3.4 C.4.2): the named instances to a registered destination."""
        caller = self._caller(event.assoc)
        if caller is None:  # pragma: no cover - only accepted associations get here
            yield None, None
            return
        rq: Any = event.request
        dest_ae = str(rq.MoveDestination or "").strip()
        target = self._destination(caller, dest_ae)
        if target is None:
            log.warning("dicom.move_destination_unknown", mo=caller.mo.id, destination=dest_ae)
            self.qr.refused(
                "retrieve",
                InvalidQuery(f"move destination {dest_ae!r} is not registered for this MO"),
                caller.peer,
                f"C-MOVE to {dest_ae}",
                status=MOVE_DESTINATION_UNKNOWN,
            )
            yield None, None  # pynetdicom answers 0xA801 Move destination unknown
            return
        plan = self._plan(event, caller, MOVE_MODELS, "C-MOVE")
        tracker = _StoreResponses()
        contexts = _contexts(plan) if isinstance(plan, Retrieval) else _fallback_contexts()
        yield (
            target.host,
            target.port,
            {
                "contexts": contexts,
                "evt_handlers": [
                    (evt.EVT_CONN_OPEN, self._on_connection),
                    (evt.EVT_DIMSE_RECV, tracker.on_recv),
                ],
                "tls_args": self._tls_to(target),
            },
        )
        yield from self._sub_operations(event, plan, tracker)

    def _on_get(self, event: evt.Event) -> Iterator[Any]:
        """C-GET (PS3.4 C.4.3): the named instances back over the caller's association."""
        caller = self._caller(event.assoc)
        if caller is None:  # pragma: no cover - only accepted associations get here
            yield 0
            return
        plan = self._plan(event, caller, GET_MODELS, "C-GET")
        tracker = _StoreResponses()
        event.assoc.bind(evt.EVT_DIMSE_RECV, tracker.on_recv)
        try:
            yield from self._sub_operations(event, plan, tracker)
        finally:
            event.assoc.unbind(evt.EVT_DIMSE_RECV, tracker.on_recv)

    @staticmethod
    def _sub_operations(
        event: evt.Event, plan: Retrieval | Dataset, tracker: _StoreResponses
    ) -> Iterator[Any]:
        """pynetdicom's retrieve protocol: the number of sub-operations, then one pending
        ``(status, dataset)`` per instance (pynetdicom sends it and counts), then the end."""
        if isinstance(plan, Dataset):  # refused: one failure response (pynetdicom needs ≥1)
            yield 1
            yield plan, None
            return
        if not len(plan):  # pynetdicom answers success at once, without resuming this
            plan.finish(SUCCESS)
            yield 0
            return
        yield len(plan)
        for m, ds in plan.datasets(lambda: bool(event.is_cancelled)):
            seen = len(tracker.statuses)
            yield PENDING, ds if ds is not None else _unsendable(m)
            got = tracker.statuses[seen:]
            plan.record(m, code_to_category(got[0]) if got else "Failure")
        c = plan.counts
        if plan.cancelled:
            plan.finish(CANCEL)
            failed = Dataset()
            failed.FailedSOPInstanceUIDList = c.failed_uids
            yield CANCEL, failed
            return
        if not c.failed and not c.warning:
            plan.finish(SUCCESS)
        else:
            plan.finish(ALL_FAILED if c.failed == len(plan) else WARNING)

    def _destination(self, caller: Caller, ae_title: str) -> Destination | None:
        """Where a C-MOVE destination the caller's MO registered listens."""
        own = {ep.dicom.ae_title for ep in caller.mo.endpoints if ep.dicom is not None}
        if not ae_title or ae_title not in own:
            return None
        return self.senders.dicom_destination(ae_title, for_mo=caller.mo.id)

    def _tls_to(self, target: Destination) -> tuple[ssl.SSLContext, str] | None:
        """pynetdicom's ``tls_args`` for an association the hub opens: None for a plain
        ``dicom://`` node; for ``dicom+tls://``, TLS 1.2+ verifying the node's certificate
        (its host name included) against ``HIE_DICOM_TLS_CLIENT_CA`` (else the system's CAs)
        and presenting the hub's ``HIE_DICOM_TLS_CERT``."""
        if not target.tls:
            return None
        with self._lock:
            if self._client_tls is None:
                s = self.settings
                self._client_tls = tls_context(
                    s.dicom_tls_client_ca, s.dicom_tls_cert, s.dicom_tls_key
                )
            return self._client_tls, target.host

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
        target: Destination,
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
        self, caller: Caller, target: Destination, report: Dataset, event_type: int
    ) -> bool:
        ae = AE(ae_title=self.ae_title)
        ae.network_timeout = ae.acse_timeout = ae.dimse_timeout = (
            self.settings.dicom_timeout_seconds
        )
        ae.add_requested_context(COMMITMENT_PUSH, _UNCOMPRESSED)
        # the hub calls, but plays the SCP role of Storage Commitment (PS3.4 J.3.3)
        role = build_role(COMMITMENT_PUSH, scp_role=True)
        assoc = ae.associate(
            target.host,
            target.port,
            ae_title=caller.ae_title,
            ext_neg=[role],
            evt_handlers=[(evt.EVT_CONN_OPEN, self._on_connection)],
            tls_args=self._tls_to(target),
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


class _TlsAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded association server with the TLS handshake moved from the
    accepting thread (where pynetdicom does it, so one peer that connects and says nothing
    would hold up every other) to the association's own thread, bounded by the network
    timeout. A failed handshake (no client certificate when one is required, one from
    another CA, not TLS at all) closes that connection and is logged."""

    def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
        assert self.socket is not None and self.ssl_context is not None
        sock, address = self.socket.accept()
        tls = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return tls, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        peer = client_address[0] if isinstance(client_address, tuple) else str(client_address)
        try:
            request.settimeout(self.ae.network_timeout)
            request.do_handshake()
            request.settimeout(None)  # as pynetdicom has accepted sockets: blocking
        except (OSError, ValueError) as exc:
            log.warning("dicom.tls_failed", peer=peer, error=_tls_error(exc))
            self.shutdown_request(request)
            return
        super().process_request_thread(request, client_address)


def _tls_error(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLError):
        return str(exc.reason or exc.__class__.__name__)
    return type(exc).__name__


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


class _StoreResponses:
    """The statuses of the C-STORE responses an association receives (the sub-operations
    of a retrieve, which pynetdicom sends and counts; the audit record needs them too)."""

    def __init__(self) -> None:
        self.statuses: list[int] = []

    def on_recv(self, event: evt.Event) -> None:
        msg: Any = event.message
        if isinstance(msg, C_STORE_RSP):
            self.statuses.append(int(msg.command_set.Status))


def _failure(status: int, comment: str) -> Dataset:
    ds = Dataset()
    ds.Status = status
    ds.ErrorComment = comment[:64]
    return ds


def _text(elem: DataElement) -> str:
    """A request element's value as DICOM encodes it (multiple values ``\\``-separated)."""
    value = elem.value
    if value is None:
        return ""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    return str(value)


def _identifier(event: evt.Event) -> tuple[Level, dict[str, str], list[DataElement]]:
    """Query/Retrieve Level, the match keys and the elements to return, from a request's
    identifier (:class:`InvalidQuery` when it cannot be decoded or has no valid level)."""
    try:
        ident: Dataset = event.identifier
        level_value = str(ident.get("QueryRetrieveLevel", "") or "").strip()
        returned: list[DataElement] = []
        keys: dict[str, str] = {}
        for elem in ident:
            if elem.tag.group in (0x0000, 0x0002) or elem.keyword in (
                "QueryRetrieveLevel",
                "SpecificCharacterSet",
            ):
                continue
            returned.append(elem)
            if elem.VR != "SQ" and elem.keyword:  # sequences: universal (module docs)
                keys[elem.keyword] = _text(elem)
    except Exception as exc:
        raise InvalidQuery(f"the identifier cannot be decoded ({type(exc).__name__})") from exc
    try:
        level = Level(level_value)
    except ValueError:
        raise InvalidQuery("Query/Retrieve Level (0008,0052) is missing or unknown") from None
    return level, keys, returned


def _response(level: Level, returned: list[DataElement], m: Match) -> Dataset:
    """A pending C-FIND response identifier: the requested keys with this match's values
    (zero length where the archive keeps none)."""
    ds = Dataset()
    ds.SpecificCharacterSet = CHARSET
    ds.QueryRetrieveLevel = level.value
    for elem in returned:
        value = m.attrs.get(elem.keyword) if elem.keyword else None
        if elem.VR == "SQ":
            ds.add_new(elem.tag, "SQ", [])
        elif value is None or value == "":
            ds.add_new(elem.tag, elem.VR, None)
        else:
            ds.add_new(elem.tag, elem.VR, value)
    ds.RetrieveAETitle = m.attrs.get("RetrieveAETitle") or None
    return ds


def _unsendable(m: Match) -> Dataset:
    """A stand-in for an instance whose file cannot be read: pynetdicom cannot send it
    (no File Meta Information) and counts a failed sub-operation with its SOP Instance UID."""
    ds = Dataset()
    ds.SOPClassUID = m.sop_class_uid or ""
    ds.SOPInstanceUID = str(m.attrs["SOPInstanceUID"])
    return ds


def _contexts(plan: Retrieval) -> list[PresentationContext]:
    """The presentation contexts a C-MOVE's outgoing association proposes: per SOP class,
    each stored transfer syntax that is not plain uncompressed in a context of its own, and
    uncompressed (explicit and implicit little endian: pynetdicom sends an uncompressed
    instance in whichever the receiver accepted). At most 128 (PS3.8)."""
    out: list[PresentationContext] = []
    for sop_class, syntaxes in sorted(plan.syntaxes().items()):
        for ts in sorted(syntaxes - set(_UNCOMPRESSED)):
            out.append(build_context(sop_class, [ts]))
        out.append(build_context(sop_class, _UNCOMPRESSED))
    if len(out) > MAX_CONTEXTS:
        log.warning("dicom.move_too_many_contexts", contexts=len(out))
    return out[:MAX_CONTEXTS]


def _fallback_contexts() -> list[PresentationContext]:
    return [build_context(VERIFICATION, _UNCOMPRESSED)]


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
    if not settings.dicom_port and not settings.dicom_tls_port:
        return None
    svc = FhirService(hub.store, settings, search_index=lambda: hub.search_index, trail=hub.audit)
    attach_mpi(svc)
    journal = open_journal(hub.blobs, settings.dicom_journal_mb)
    storage = StorageService(svc, hub.blobs, hub.rejected, journal=journal)
    listener = DicomListener(settings, storage)
    listener.start()
    return listener
