"""HL7 v2 ADT into the master patient index: the service the MLLP listener will call.

:meth:`AdtIntake.ingest` takes one message's bytes and returns what the acknowledgement must
say (:class:`AdtResult`: ``AA`` / ``AE`` / ``AR`` with the problems for ERR segments):

1. the sender (MSH-3/MSH-4) must be a registered MO (facility registry) — else ``AR``;
2. the message is mapped by :mod:`hie.registries.adt` with the MO's patient-id system —
   malformed or unsupported: ``AR``; application errors (a bad SNILS, an unknown identifier
   system): ``AE``; nothing is written in either case;
3. A01/A04/A08/A28/A31: the MO's record is created or updated, keyed by the MO's own patient
   number (a conditional update on that identifier, so a re-sent message changes nothing
   twice) and matched by the index in the same transaction;
4. A40: the surviving record (PID) is written, then each prior record (MRG-1) is merged into
   it (:meth:`~hie.registries.patient_index.MasterPatientIndex.merge`). A prior patient the
   hub does not have, or a merge into itself, is ``AE`` before anything is written; a
   repeated A40 is ``AA`` and changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from hie.adapters.hl7v2 import (
    APPLICATION_INTERNAL_ERROR,
    REQUIRED_FIELD_MISSING,
    TABLE_VALUE_NOT_FOUND,
    Hl7Problem,
    read_sender,
)
from hie.fhir.search import escape_value
from hie.fhir.service import FhirService, content_json
from hie.hub.errors import HieError
from hie.hub.logging import get_logger
from hie.registries.adt import AdtMessage, AdtPatient, parse_adt
from hie.registries.identifiers import NATIONAL_SYSTEMS
from hie.registries.patient_index import MasterPatientIndex, MergeOutcome, replaced_by
from hie.registries.senders import SenderRegistry

log = get_logger("hie.adt")

# HL7 table 0357: 204 "unknown key identifier" — a record the message names is not known.
UNKNOWN_KEY: str = "204"


@dataclass(slots=True)
class AdtResult:
    """What one ADT message did, and what its ACK says (MSA-1 and the ERR segments)."""

    ack_code: Literal["AA", "AE", "AR"]
    control_id: str = ""
    event: str = ""
    mo: str | None = None  # the sending MO's Organization id
    errors: list[Hl7Problem] = field(default_factory=list)
    warnings: list[Hl7Problem] = field(default_factory=list)
    patients: list[str] = field(default_factory=list)  # source Patient ids written
    merges: list[MergeOutcome] = field(default_factory=list)


class AdtIntake:
    """ADT messages → source Patients, golden records and merges."""

    def __init__(
        self, svc: FhirService, mpi: MasterPatientIndex, senders: SenderRegistry | None = None
    ) -> None:
        self.svc = svc
        self.mpi = mpi
        self.senders = senders or SenderRegistry(svc.store)

    def ingest(self, raw: bytes) -> AdtResult:
        """Apply one ADT message; never raises for anything a sender can send."""
        try:
            app, facility = read_sender(raw)
        except Hl7Problem as problem:
            return AdtResult("AR", errors=[problem])
        mo = self.senders.mo_for_hl7_sender(app, facility)
        if mo is None:
            log.warning("adt.unknown_sender")
            return AdtResult(
                "AR",
                errors=[
                    Hl7Problem(
                        TABLE_VALUE_NOT_FOUND,
                        "the sending application/facility (MSH-3/MSH-4) is not registered "
                        "with the hub",
                        "MSH",
                        field=4,
                        reject=True,
                    )
                ],
            )
        try:
            msg = parse_adt(
                raw,
                default_system=mo.patient_id_system,
                system_for_authority=self._system_for_authority,
            )
        except Hl7Problem as problem:
            return AdtResult("AR" if problem.reject else "AE", mo=mo.id, errors=[problem])
        result = AdtResult("AA", msg.control_id, msg.event, mo.id, warnings=list(msg.warnings))
        try:
            self._apply(msg, mo.id, mo.patient_id_system, result)
        except Hl7Problem as problem:
            result.ack_code = "AE"
            result.errors.append(problem)
        except HieError as err:  # a refused merge, a refused record: the reason goes back
            result.ack_code = "AE"
            result.errors.append(
                Hl7Problem(APPLICATION_INTERNAL_ERROR, err.message, "PID", field=3)
            )
        log.info("adt.ingested", ack=result.ack_code, hl7_event=msg.event, mo=mo.id)
        return result

    def _system_for_authority(self, namespace: str) -> str | None:
        """A CX.4 namespace naming a registered MO (by its HL7 facility) → that MO's system."""
        other = self.senders.mo_for_hl7_sender(None, namespace)
        return other.patient_id_system if other is not None else None

    def _apply(self, msg: AdtMessage, mo_id: str, system: str | None, out: AdtResult) -> None:
        if msg.event != "A40":
            out.patients.append(self._upsert(msg.patients[0], mo_id, system, 1))
            return
        # check every pair before writing anything: an A40 is applied whole or not at all
        plans = []
        for seq, group in enumerate(msg.patients, start=1):
            key = _record_key(group, system, seq)
            priors: list[str] = []
            for rep, ident in enumerate(group.prior_identifiers, start=1):
                found = self.mpi.sources_with_identifier(ident["system"], ident["value"])
                if not found:
                    raise Hl7Problem(
                        UNKNOWN_KEY,
                        "MRG-1 names a patient the hub does not have (prior patient unknown); "
                        "send the patient first, then the merge",
                        "MRG",
                        seq,
                        field=1,
                        repetition=rep,
                    )
                priors.extend(found)
            surviving = self.mpi.sources_with_identifier(*key)
            for sid in surviving:
                done_into = replaced_by(content_json(self.svc.read("Patient", sid)))
                if done_into is not None:
                    raise Hl7Problem(
                        APPLICATION_INTERNAL_ERROR,
                        f"PID-3 names a record that was merged into {done_into}; a merge "
                        "into a merged record would be circular (merge-target-retired)",
                        "PID",
                        seq,
                        field=3,
                    )
            if surviving and set(priors) & set(surviving):
                raise Hl7Problem(
                    APPLICATION_INTERNAL_ERROR,
                    "MRG-1 names the same record as PID-3: a record cannot be merged into "
                    "itself (merge-into-self)",
                    "MRG",
                    seq,
                    field=1,
                )
            plans.append((seq, group, list(dict.fromkeys(priors))))
        for seq, group, priors in plans:
            target = self._upsert(group, mo_id, system, seq)
            out.patients.append(target)
            for prior in priors:
                out.merges.append(
                    self.mpi.merge(prior, target, reason="HL7 ADT^A40", agent=f"MO {mo_id}")
                )

    def _upsert(self, group: AdtPatient, mo_id: str, system: str | None, seq: int) -> str:
        """Create or update the MO's record of the person (keyed by its own patient number)."""
        key = _record_key(group, system, seq)
        res: dict[str, Any] = dict(group.patient)
        res["managingOrganization"] = {"reference": f"Organization/{mo_id}"}
        token = f"{key[0]}|{escape_value(key[1])}"
        written = self.svc.conditional_update(res, "Patient", [("identifier", token)])
        return written.stored.id


def _record_key(group: AdtPatient, system: str | None, seq: int) -> tuple[str, str]:
    """The identifier that names the MO's record: its number in the MO's own system, else the
    first identifier that is not national (SNILS and the like name the person, not the
    MO's chart)."""
    idents = group.patient.get("identifier") or []
    mine = [i for i in idents if system and i.get("system") == system]
    local = mine or [i for i in idents if i.get("system") not in NATIONAL_SYSTEMS]
    if not local:
        raise Hl7Problem(
            REQUIRED_FIELD_MISSING,
            "PID-3 has no patient number of the sending MO (only national identifiers)",
            "PID",
            seq,
            field=3,
        )
    return str(local[0]["system"]), str(local[0]["value"])
