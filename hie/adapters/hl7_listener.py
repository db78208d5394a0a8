"""HL7 v2 over MLLP: who sent it, which service takes it, and the acknowledgement.

:class:`Hl7Listener` is the handler :class:`~hie.adapters.mllp.MllpServer` calls for every
frame. For one message it:

1. reads the header (MSH); unreadable → ``AR``;
2. identifies the sender: MSH-3/MSH-4 must name a registered MO (facility registry, an
   ``hl7v2-mllp`` Endpoint); when the connection came with a client certificate, the
   certificate must belong to that MO (its Endpoint lists the certificate's SHA-256
   fingerprint as an identifier) — else ``AR``;
3. hands it, as that MO (:func:`~hie.lab_exchange.service.mo_principal`), to the service for
   its type: ADT to the master patient index (:class:`~hie.registries.adt_intake.AdtIntake`),
   ORU^R01 (results) and ORM^O01 / OML^O21 (orders) to the lab intake
   (:class:`~hie.lab_exchange.service.LabIntake`); any other type is ``AR`` (200);
4. keeps every message answered ``AE`` or ``AR`` — and every frame that never became a
   message (garbage, too large, truncated) — in the rejected-message store, raw bytes and
   all, before the sender hears the answer (``hie messages list|show|replay``);
5. answers after the data is committed: original mode one ACK (``AA``/``AE``/``AR``);
   enhanced mode (MSH-15/16) a commit ACK (``CA``/``CR``) and then the application ACK, each
   only when the sender asked for it.

The services are synchronous (database transactions); they run in a thread pool so the event
loop keeps reading other connections while one message commits.
"""

from __future__ import annotations

import asyncio
import contextlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal

from hie.adapters.hl7v2 import (
    APPLICATION_INTERNAL_ERROR,
    TABLE_VALUE_NOT_FOUND,
    UNSUPPORTED_MESSAGE_TYPE,
    Hl7Problem,
    MessageHeader,
    ack_for_unreadable,
    build_ack,
    parse,
    read_header,
    wants_application_ack,
    wants_commit_ack,
)
from hie.adapters.mllp import MllpThread, Peer, mllp_server_from_settings, serve_in_thread
from hie.fhir.service import FhirService
from hie.hub.audit import AccessNote, collecting_access, record_of
from hie.hub.auth import Principal, acting_as
from hie.hub.errors import Conflict, NotFound, StorageError
from hie.hub.logging import get_logger
from hie.hub.rejected import RejectedMessage, RejectedStore
from hie.hub.runtime import Hub
from hie.lab_exchange.service import LabIntake, mo_principal
from hie.registries.adt_intake import AdtIntake
from hie.registries.patient_index import MasterPatientIndex, attach_mpi
from hie.registries.senders import RegisteredMo, SenderRegistry

log = get_logger("hie.hl7")

HEAD_BYTES = 64 * 1024
# the audit record's status for an MSA-1 code (the trail's statuses are HTTP's)
_AUDIT_STATUS = {"AA": 200, "AE": 422, "AR": 400}


@dataclass(slots=True)
class Outcome:
    """What became of one message: MSA-1 and the problems for the ERR segments."""

    code: Literal["AA", "AE", "AR"]
    header: MessageHeader | None = None
    errors: list[Hl7Problem] = field(default_factory=list)
    warnings: list[Hl7Problem] = field(default_factory=list)
    mo: str | None = None
    kept: int | None = None  # its id in the rejected-message store
    principal: Principal | None = None  # who it was applied as (the sending MO's system)


class Hl7Listener:
    """The MLLP handler: HL7 v2 messages to the hub's services (see the module docstring)."""

    def __init__(
        self,
        svc: FhirService,
        mpi: MasterPatientIndex,
        rejected: RejectedStore,
        *,
        workers: int = 2,
    ) -> None:
        self.svc = svc
        self.rejected = rejected
        self.senders = SenderRegistry(svc.store)
        self.adt = AdtIntake(svc, mpi, self.senders)
        self.lab = LabIntake(svc, self.senders)
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="hl7")

    def close(self) -> None:
        """Stop the worker threads (after the messages in hand)."""
        self._pool.shutdown(wait=True)

    # --- the MllpHandler protocol -----------------------------------------------------------

    async def handle(self, raw: bytes, peer: Peer) -> list[bytes]:
        """One message → its acknowledgements (after the data is durable)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self.process, raw, peer)

    async def reject(self, kind: str, head: bytes, peer: Peer, *, size: int) -> list[bytes]:
        """A frame that never became a message: kept, and answered ``AR`` when the sender
        can still hear it (a truncated frame's connection is gone)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self._reject, kind, head, peer, size)

    def _reject(self, kind: str, head: bytes, peer: Peer, size: int) -> list[bytes]:
        reasons = {
            "too-large": "the message is larger than the hub accepts (HIE_MLLP_MAX_MESSAGE_BYTES)",
            "garbage": "bytes outside an MLLP frame (start block 0x0B … end block 0x1C 0x0D)",
            "truncated": "the frame ended before its end block (connection closed or timed out)",
        }
        reason = reasons.get(kind, kind)
        control = ""
        with contextlib.suppress(Hl7Problem):
            control = read_header(head).control_id
        self.rejected.keep(
            channel="mllp",
            kind=kind,
            raw=head,
            peer=f"{peer.host}:{peer.port}",
            code="100" if kind != "too-large" else "207",
            reason=reason,
            control_id=control,
            size=size,
        )
        log.warning("hl7.frame_rejected", kind=kind, size=size, peer=peer.host)
        self._audit(AccessNote(), Outcome("AR", errors=[Hl7Problem("100", reason)]), peer)
        if kind == "truncated":
            return []
        return [ack_for_unreadable(head, reason=reason)]

    # --- one message ------------------------------------------------------------------------

    def process(self, raw: bytes, peer: Peer | None = None) -> list[bytes]:
        """Apply one message, audit it, and build its acknowledgements (also what replay
        runs)."""
        with collecting_access() as note:
            out = self.apply(raw, peer)
        out = self._audit(note, out, peer)
        if out.code != "AA":
            first = (out.errors or [Hl7Problem(APPLICATION_INTERNAL_ERROR, "failed")])[0]
            h = out.header
            out.kept = self.rejected.keep(
                channel="mllp",
                kind="rejected" if out.code == "AR" else "failed",
                raw=raw,
                sender=f"{h.sending_application}|{h.sending_facility}" if h else "",
                peer=f"{peer.host}:{peer.port}" if peer else "",
                code=first.code,
                reason=first.message,
                control_id=h.control_id if h else "",
            )
        return self.acks(raw, out)

    def _audit(self, note: AccessNote, out: Outcome, peer: Peer | None) -> Outcome:
        """One audit record per message — applied, refused or from an unknown sender (a
        failed access attempt) — with the patients and resources it wrote, before the
        sender hears the answer. If the trail cannot take it, the message is not
        acknowledged ``AA`` (it is kept for replay; a resend is a duplicate, audited then)."""
        if self.svc.trail is None:
            return out
        h = out.header
        kind = f"{h.message_code}^{h.trigger_event}" if h else "unreadable"
        first = out.errors[0] if out.errors else None
        try:
            self.svc.trail.append_ahead(
                record_of(
                    note,
                    out.principal,
                    action="C",
                    subtype="hl7v2",
                    outcome=0 if out.code == "AA" else 4,
                    status=_AUDIT_STATUS[out.code],
                    method="MLLP",
                    path=f"mllp:{kind} {h.control_id if h else ''}".rstrip(),
                    source=peer.host if peer else None,
                    reason=first.message if first else None,
                )
            )
        except StorageError as exc:
            log.error("hl7.audit_failed", error=exc.message)
            failure = Hl7Problem(
                APPLICATION_INTERNAL_ERROR,
                "the hub's audit trail is unavailable; the message is kept and will be replayed",
                "MSH",
            )
            return Outcome("AE", h, [failure], mo=out.mo, principal=out.principal)
        return out

    def apply(self, raw: bytes, peer: Peer | None = None) -> Outcome:
        """Identify, route and apply one message; never raises for anything a sender sends."""
        try:
            header = read_header(raw)
        except Hl7Problem as problem:
            return Outcome("AR", errors=[problem])
        mo = self.senders.mo_for_hl7_sender(header.sending_application, header.sending_facility)
        if mo is None:
            return Outcome("AR", header, [_unknown_sender()])
        cert = peer.certificate if peer is not None else None
        if cert is not None and not mo.has_certificate(cert.sha256):
            return Outcome("AR", header, [_unknown_sender("the client certificate")])
        try:
            out = self._route(raw, header, mo)
            out.principal = mo_principal(mo, "mllp")
            return out
        except Exception as exc:  # a bug must not cost the message: it is kept, the sender told
            log.error("hl7.failed", error=type(exc).__name__, mo=mo.id)
            failure = Hl7Problem(
                APPLICATION_INTERNAL_ERROR,
                "the hub could not process the message; it is kept and will be replayed",
                "MSH",
            )
            return Outcome("AE", header, [failure], mo=mo.id, principal=mo_principal(mo, "mllp"))

    def _route(self, raw: bytes, header: MessageHeader, mo: RegisteredMo) -> Outcome:
        kind = header.message_code
        if kind == "ADT":
            with acting_as(mo_principal(mo, "mllp")):
                adt = self.adt.ingest(raw)
            return Outcome(adt.ack_code, header, adt.errors, adt.warnings, mo.id)
        if kind == "ORU":
            try:
                msg = parse(raw)
                lab = self.lab.ingest_result(raw, msg, mo)
            except Hl7Problem as problem:
                return Outcome("AR" if problem.reject else "AE", header, [problem], mo=mo.id)
            return Outcome(lab.ack_code, header, lab.errors, lab.warnings, mo.id)
        if kind in ("ORM", "OML"):
            try:
                order = self.lab.ingest_order(raw, parse(raw), mo)
            except Hl7Problem as problem:
                return Outcome("AR" if problem.reject else "AE", header, [problem], mo=mo.id)
            return Outcome(order.ack_code, header, order.errors, order.warnings, mo.id)
        unsupported = Hl7Problem(
            UNSUPPORTED_MESSAGE_TYPE,
            f"MSH-9: message type {kind or '(empty)'} is not one the hub accepts over MLLP "
            "(ADT, ORU, ORM, OML)",
            "MSH",
            1,
            9,
            reject=True,
        )
        return Outcome("AR", header, [unsupported], mo=mo.id)

    @staticmethod
    def acks(raw: bytes, out: Outcome) -> list[bytes]:
        """The acknowledgements for ``out`` (original or enhanced mode, HL7 v2.5.1 §2.9)."""
        h = out.header
        if h is None:
            first = out.errors[0] if out.errors else Hl7Problem("100", "unreadable")
            return [ack_for_unreadable(raw[:HEAD_BYTES], first.code, first.message)]
        if not h.enhanced_mode:
            return [build_ack(h, out.code, out.errors, out.warnings)]
        acks: list[bytes] = []
        # the commit ACK says the hub has the message safe (stored, or kept as rejected):
        # CR only when it refused to take it at all
        accepted = out.code != "AR"
        if wants_commit_ack(h, accepted):
            acks.append(build_ack(h, "CA" if accepted else "CR", [] if accepted else out.errors))
        if accepted and wants_application_ack(h, out.code == "AA"):
            acks.append(build_ack(h, out.code, out.errors, out.warnings))
        return acks


def _unknown_sender(what: str = "the sending application/facility (MSH-3/MSH-4)") -> Hl7Problem:
    return Hl7Problem(
        TABLE_VALUE_NOT_FOUND,
        f"{what} is not registered with the hub",
        "MSH",
        1,
        4,
        reject=True,
    )


class MllpListener:
    """The running MLLP listener of ``hie serve``: the server in its thread and its handler."""

    def __init__(self, thread: MllpThread, handler: Hl7Listener) -> None:
        self.thread = thread
        self.handler = handler

    @property
    def port(self) -> int:
        """The port it listens on."""
        return self.thread.port

    def stop(self) -> None:
        """Stop accepting, finish the messages in hand, release the threads."""
        self.thread.stop()
        self.handler.close()


def start_mllp(hub: Hub) -> MllpListener | None:
    """Start the MLLP listener ``HIE_MLLP_*`` describes over ``hub`` (None when
    ``HIE_MLLP_PORT`` is 0). Its services are the hub's FHIR service and master patient index;
    what it refuses goes to ``hub.rejected``."""
    settings = hub.settings
    if not settings.mllp_port:
        return None
    svc = FhirService(hub.store, settings, search_index=lambda: hub.search_index, trail=hub.audit)
    mpi = attach_mpi(svc)
    if mpi is None:
        raise ValueError("the MLLP listener needs the master patient index (HIE_MPI_ENABLED)")
    handler = Hl7Listener(svc, mpi, hub.rejected, workers=settings.mllp_workers)
    return MllpListener(serve_in_thread(mllp_server_from_settings(settings, handler)), handler)


def replayable(kept: RejectedMessage) -> bool:
    """Whether a kept message is one :func:`replay` can run again: an HL7 message the MLLP
    intake answered AR/AE (a frame that never became a message has nothing to run)."""
    return kept.channel == "mllp" and kept.kind in ("rejected", "failed")


def replay(handler: Hl7Listener, ident: int) -> Outcome:
    """Run a kept message through the listener again (after the cause was fixed: a sender
    registered, a code list loaded). Success marks it replayed; a failure leaves it open and
    is not kept a second time. Frames that never became a message cannot be replayed."""
    kept = handler.rejected.get(ident)
    if kept is None or kept.raw is None:
        raise NotFound(f"no kept message {ident}")
    if not replayable(kept):
        raise Conflict(f"message {ident} ({kept.channel}, {kept.kind}) is not an HL7 message")
    if kept.status != "open":
        raise Conflict(f"message {ident} is {kept.status}")
    out = handler.apply(kept.raw)
    if out.code == "AA":
        handler.rejected.mark_replayed(ident, f"AA ({len(out.warnings)} warning(s))")
    return out
