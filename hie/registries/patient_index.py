"""The master patient index on the hub's store: golden records, links, review, merge.

Each MO's record of a person is a *source* Patient, stored as the MO sent it. For every person
the hub keeps one *golden* Patient (tagged ``mpi|golden``) that carries every identifier of
every source (SNILS, OMS policy, passport, each MO's local numbers), the names, phones and
addresses the sources give, and a ``Patient.link`` (``seealso``) to each source. A person is
an *identity group* in the store (:class:`hie.hub.store.port.IdentityIndex`): the golden
record's id is the group id, and a reference search for any member finds the records of all
(``DiagnosticReport?patient=<golden>`` finds every MO's reports).

What happens, and where:

- a source Patient is written (FHIR create/update/delete, a transaction, an HL7 ADT feed):
  :meth:`MasterPatientIndex.on_patient_written`, inside the write transaction. The record is
  matched with :mod:`hie.registries.mpi` against the candidates its blocking keys find;
  ``auto-link`` files it under the best golden record, ``review`` and ``new`` give it a golden
  record of its own — ``review`` also opens a Task for an operator. The decision (rule, score,
  every field's contribution, the runners-up) goes to the identity journal.
- ``Patient/$match`` and PDQm: :meth:`MasterPatientIndex.match` (golden records only).
- ``Patient/$ihe-pix`` (IHE PIXm ITI-83): :meth:`MasterPatientIndex.pix`.
- ``Patient/$merge`` / HL7 ADT A40 and ``Patient/$unmerge``: :meth:`MasterPatientIndex.merge`
  and :meth:`MasterPatientIndex.unmerge`, journaled and audited (AuditEvent). A merge only
  moves group rows, so it is undone exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

from hie.fhir import model
from hie.fhir.dates import format_instant
from hie.fhir.search import escape_value, parse_search
from hie.fhir.service import (
    GOLDEN_TAG,
    MPI_SYSTEM,
    FhirService,
    Json,
    content_json,
    is_golden,
    new_id,
)
from hie.hub.audit import AuditRecord
from hie.hub.auth import current_principal
from hie.hub.errors import HieError, InvalidRequest, InvalidResource, NotFound, Unprocessable
from hie.hub.logging import get_logger
from hie.hub.store.port import IdentityIndex, StoredResource, TokenCond, WriteTx
from hie.hub.store.sql import now_us
from hie.registries.identifiers import (
    NATIONAL_SYSTEMS,
    IdentifierError,
    normalise_identifier,
    normalise_system,
)
from hie.registries.mpi import (
    DEFAULT_THRESHOLDS,
    MatchResult,
    MatchScore,
    PersonFeatures,
    Thresholds,
    best_match,
    blocking_keys,
    person_features,
    rank_people,
)
from hie.registries.senders import SenderRegistry

log = get_logger("hie.mpi")

P = "Patient"
MATCH_GRADE_URL = "http://hl7.org/fhir/StructureDefinition/match-grade"
# How many source records sharing a blocking key are scored (the benchmark's blocks average
# ~1 record per key; 50 leaves room for common names with a common birth date).
CANDIDATES = 50
MAX_SOURCES_SHOWN = 5  # names and addresses copied onto a golden record


class MergeRefused(HieError):
    """A merge or unmerge that would corrupt the index (``reason`` says which rule)."""

    code = "HIE-1016"
    status = 422
    issue = "business-rule"

    def __init__(self, reason: str, message: str, *, status: int = 422) -> None:
        super().__init__(f"{message} ({reason})")
        self.reason = reason
        self.status = status


class UnknownTargetSystem(HieError):
    """PIXm: a ``targetSystem`` the hub does not recognise (ITI-83 answers 403)."""

    code = "HIE-1018"
    status = 403
    issue = "code-invalid"


class UnknownPatient(NotFound):
    """A merge, unmerge or cross-reference names a patient the hub does not have."""

    code = "HIE-1017"


@dataclass(slots=True)
class MergeOutcome:
    """What a merge or unmerge did (or, in preview, would do)."""

    source: str
    target: str
    kind: Literal["golden", "relink", "record", "none"]
    moved: list[str] = field(default_factory=list)
    already: bool = False  # a repeated request: nothing changed
    result: StoredResource | None = None  # the surviving golden record afterwards
    message: str = ""


@dataclass(frozen=True, slots=True)
class GoldenMatch:
    """One golden record found by :meth:`MasterPatientIndex.match`."""

    golden: StoredResource
    match: MatchScore
    grade: Literal["certain", "probable", "possible"]
    probability: float


class MasterPatientIndex:
    """Matching, golden records, merge and cross-reference over a :class:`FhirService`."""

    def __init__(
        self,
        svc: FhirService,
        thresholds: Thresholds = DEFAULT_THRESHOLDS,
        *,
        registered_systems_only: bool = True,
    ) -> None:
        self.svc = svc
        self.store = svc.store
        self.thresholds = thresholds
        self.senders = SenderRegistry(svc.store)
        self.registered_systems_only = registered_systems_only

    def known_system(self, system: str) -> bool:
        """A recognised identifier system: national (SNILS, OMS, passport) or one an MO
        registered in the facility registry as its patient-number system."""
        system = normalise_system(system)
        return system in NATIONAL_SYSTEMS or (
            self.senders.mo_for_patient_id_system(system) is not None
        )

    def check_systems(self, res: Json) -> None:
        """Refuse a Patient identifier whose system no MO registered: its number could not be
        told apart from another MO's same number, so it would mis-link people."""
        for i, ident in enumerate(res.get("identifier") or []):
            system = ident.get("system") if isinstance(ident, dict) else None
            if isinstance(system, str) and system and not self.known_system(system):
                where = f"Patient.identifier[{i}].system"
                raise InvalidResource(
                    f"{where}: {system} is not a national identifier system nor registered by "
                    "any MO; register it in the facility registry first "
                    "(unregistered-identifier-system)",
                    expression=[where],
                )

    # --- matching on every source write ---------------------------------------------------

    def on_patient_written(
        self, tx: WriteTx, res: Json | None, stored: StoredResource, when: int
    ) -> None:
        """Link a written source Patient to its golden record (see module docstring)."""
        idx = tx.identity
        sid = stored.id
        existing = next(iter(idx.records(P, [sid])), None)
        if res is None or stored.deleted:
            if existing is not None:
                idx.remove(P, sid)
                self._journal(idx, sid, existing.group_id, "unlink", {"reason": "deleted"}, when)
                self.refresh_golden(tx, existing.group_id, when)
            return
        if self.registered_systems_only:
            self.check_systems(res)
        feats = person_features(res)
        keys = blocking_keys(feats)
        fjson = orjson.dumps(feats.to_json())
        if existing is not None and existing.features is not None:
            idx.put(P, sid, existing.group_id, fjson, keys)
            self.refresh_golden(tx, existing.group_id, when, written=stored)
            # an update (a SNILS added, a typo fixed) may show another golden record is the
            # same person: that is an operator's call, never an automatic merge
            other = self._best(idx, feats, keys, exclude_group=existing.group_id)
            body = {"event": "update", **_result_json(other)}
            if other.decision != "new" and other.person_id is not None:
                task = self._review_task(tx, sid, existing.group_id, other, when)
                body["task"] = task
            self._journal(idx, sid, existing.group_id, "update", body, when)
            return
        if existing is not None:  # a golden or retired golden id written as a source: refused
            raise Unprocessable(f"Patient/{sid} is a golden record (golden-record)")
        result = self._best(idx, feats, keys)
        body = _result_json(result)
        if result.decision == "auto-link" and result.person_id is not None:
            gid = result.person_id
            idx.put(P, sid, gid, fjson, keys, new=True)
            self.refresh_golden(tx, gid, when, written=stored)
        else:
            gid = new_id()
            idx.put(P, gid, gid, new=True)
            idx.put(P, sid, gid, fjson, keys, new=True)
            self.refresh_golden(tx, gid, when, written=stored, new_group=True)
        if result.decision == "review" and result.person_id is not None:
            body["task"] = self._review_task(tx, sid, gid, result, when)
        self._journal(idx, sid, gid, "match", body, when)

    def _best(
        self,
        idx: IdentityIndex,
        feats: PersonFeatures,
        keys: Sequence[str],
        exclude_group: str | None = None,
    ) -> MatchResult:
        cands = idx.candidates(P, keys, CANDIDATES)
        pairs = [
            (c.group_id, PersonFeatures.from_json(orjson.loads(c.features)))
            for c in cands
            if c.features is not None and c.group_id != exclude_group
        ]
        return best_match(feats, pairs, self.thresholds)

    def _journal(
        self, idx: IdentityIndex, id: str, group: str, kind: str, body: Json, when: int
    ) -> None:
        idx.log(P, id, group, kind, orjson.dumps(body), when)

    def _review_task(
        self, tx: WriteTx, source: str, golden: str, result: MatchResult, when: int
    ) -> str:
        """A Task asking an operator whether ``source`` (now under ``golden``) is the person
        of ``result.person_id``; resolved by ``$merge`` or by closing the Task."""
        assert result.person_id is not None and result.match is not None
        task_id = new_id()
        m = result.match
        task: Json = {
            "resourceType": "Task",
            "status": "requested",
            "intent": "proposal",
            "priority": "routine",
            "code": {
                "coding": [
                    {
                        "system": MPI_SYSTEM,
                        "code": "possible-match",
                        "display": "Возможное совпадение пациентов / possible patient match",
                    }
                ]
            },
            "description": (
                "Запись пациента может относиться к уже известному человеку: проверьте и "
                "объедините (Patient/$merge) или закройте задачу. / A patient record may be "
                "a person already known: review, then merge (Patient/$merge) or close."
            ),
            "focus": {"reference": f"Patient/{source}"},
            "for": {"reference": f"Patient/{golden}"},
            "authoredOn": format_instant(when),
            "lastModified": format_instant(when),
            "input": [
                _input(
                    "candidate", {"valueReference": {"reference": f"Patient/{result.person_id}"}}
                ),
                _input("score", {"valueDecimal": round(m.score, 2)}),
                _input("rule", {"valueString": m.rule}),
                _input("explanation", {"valueString": m.explain()}),
            ],
        }
        if result.ambiguous:
            task["input"].append(_input("ambiguous", {"valueBoolean": True}))
        self.svc.write_internal(tx, task, "Task", task_id, when, fresh=True)
        return task_id

    # --- golden records ---------------------------------------------------------------------

    def refresh_golden(
        self,
        tx: WriteTx,
        gid: str,
        when: int,
        *,
        written: StoredResource | None = None,
        new_group: bool = False,
    ) -> StoredResource | None:
        """Rebuild golden record ``gid`` from its group's current members and write it if it
        changed: retired (``active: false``, ``replaced-by``) when its group was merged into
        another, deleted when it has no source left. ``written`` is a member just written in
        ``tx`` (not read back); ``new_group`` says the group was just made for it alone."""
        if new_group and written is not None:
            golden = compose_golden(gid, [content_json(written)])
            return self.svc.write_internal(tx, golden, P, gid, when, fresh=True)
        idx = tx.identity
        cur = tx.current(P, gid)
        own_group = idx.group_of(P, gid)
        if own_group is not None and own_group != gid:
            base = content_json(cur) if cur and not cur.deleted else {"resourceType": P}
            golden = _retired(base, own_group)
        else:
            members = idx.members(P, gid)
            sources = [m.id for m in members if m.features is not None]
            merged = [m.id for m in members if m.features is None and m.id != gid]
            contents = []
            for sid in sources:
                s = (
                    written
                    if written and written.id == sid
                    else tx.current(P, sid, for_update=False)
                )
                if s is not None and not s.deleted:
                    contents.append(content_json(s))
            if not contents:
                if cur is not None and not cur.deleted:
                    self.svc.delete_internal(tx, P, gid, when)
                if own_group == gid and not merged:
                    idx.remove(P, gid)
                return None
            golden = compose_golden(gid, contents, merged)
        if cur is not None and not cur.deleted and _same(content_json(cur), golden):
            return cur
        return self.svc.write_internal(tx, golden, P, gid, when)

    def golden_of(self, id: str) -> str | None:
        """The golden record (group) of Patient ``id``, or None if it is in no group."""
        with self.store.identity_reader() as idx:
            return idx.group_of(P, id)

    # --- $match (and PDQm over golden records) ---------------------------------------------

    def match(
        self, patient: Any, *, count: int = 10, only_certain: bool = False
    ) -> list[GoldenMatch]:
        """Golden records that may be the person described by ``patient`` (a FHIR Patient),
        best first; ``only_certain`` keeps those the index would link automatically."""
        if not isinstance(patient, dict) or patient.get("resourceType") != P:
            raise InvalidRequest("$match needs a Patient in the 'resource' parameter")
        model.validate(dict(patient))
        feats = person_features(patient)
        keys = blocking_keys(feats)
        if not keys:
            raise Unprocessable(
                "$match needs a national identifier, a phone, or a name with a birth date "
                "(not-enough-demographics)"
            )
        with self.store.identity_reader() as idx:
            cands = idx.candidates(P, keys, CANDIDATES)
        pairs = [
            (c.group_id, PersonFeatures.from_json(orjson.loads(c.features)))
            for c in cands
            if c.features is not None
        ]
        found: list[tuple[str, MatchScore, Literal["certain", "probable", "possible"]]] = []
        for gid, m, decision in rank_people(feats, pairs, self.thresholds):
            if decision == "new":
                continue
            grade: Literal["certain", "probable", "possible"]
            if decision == "auto-link":
                grade = "certain"
            elif m.score >= (self.thresholds.auto + self.thresholds.review) / 2:
                grade = "probable"
            else:
                grade = "possible"
            if only_certain and grade != "certain":
                continue
            found.append((gid, m, grade))
        found = found[:count]
        golden = self.store.read_many([(P, gid) for gid, _, _ in found])
        stored = {r.id: r for r in self.svc.visible(golden, "s")}  # the caller's rows only
        return [
            GoldenMatch(stored[gid], m, grade, self.probability(m))
            for gid, m, grade in found
            if gid in stored
        ]

    def decide_many(self, patients: Iterable[Json]) -> list[MatchResult]:
        """What the index would decide for each incoming source Patient (auto-link, review,
        new; against the records stored now, not each other), writing nothing: the matching
        step of :meth:`on_patient_written` alone, over one read connection."""
        out: list[MatchResult] = []
        with self.store.identity_reader() as idx:
            for patient in patients:
                feats = person_features(patient)
                out.append(self._best(idx, feats, blocking_keys(feats)))
        return out

    def probability(self, m: MatchScore) -> float:
        """A 0–1 score for ``Bundle.entry.search.score``: a logistic curve of the bits, 0.5
        at the review threshold and above 0.98 at the auto-link threshold (national
        identifier rules count as certain)."""
        if m.rule == "national-id":
            return 1.0
        mid = self.thresholds.review
        spread = max(1.0, (self.thresholds.auto - mid) / 6)
        return round(1.0 / (1.0 + math.pow(2.0, -(m.score - mid) / spread)), 4)

    # --- PIXm cross-reference ----------------------------------------------------------------

    def pix(
        self,
        source_identifier: str,
        target_systems: Sequence[str] = (),
    ) -> tuple[list[Json], list[str]]:
        """IHE PIXm ITI-83: every identifier (optionally only in ``target_systems``) and
        Patient resource of the person whose record carries ``source_identifier``
        (``system|value``). An assigning authority is recognised when :meth:`known_system`
        says so."""
        system, sep, value = source_identifier.partition("|")
        if not sep or not system or not value:
            raise InvalidRequest("sourceIdentifier must be system|value (ITI-83 §2:3.83.4.1.2)")
        system = normalise_system(system)
        if not self.known_system(system):
            raise InvalidRequest(
                f"sourceIdentifier Assigning Authority {system} is not known to the hub"
            )
        targets = [normalise_system(t) for t in target_systems]
        for t in targets:
            if not self.known_system(t):
                raise UnknownTargetSystem(f"targetSystem {t} is not known to the hub")
        try:
            value = normalise_identifier(system, value)
        except IdentifierError as exc:
            raise InvalidRequest(f"sourceIdentifier: {exc}") from None
        found = self.sources_with_identifier(system, value)
        if not found:
            raise UnknownPatient(f"no patient has the identifier {system}|… (sourceIdentifier)")
        with self.store.identity_reader() as idx:
            group = idx.group_of(P, found[0])
            ids = [m.id for m in idx.members(P, group)] if group else found
        # the caller's rows only: a person who closed their record to the caller's MO is
        # not cross-referenced for it
        records = self.svc.visible(self.store.read_many([(P, i) for i in ids]), "s")
        if not records:
            raise UnknownPatient(f"no patient has the identifier {system}|… (sourceIdentifier)")
        identifiers: dict[tuple[str, str], Json] = {}
        for r in records:
            for ident in content_json(r).get("identifier") or []:
                key = _identifier_key(ident)
                if key is None or key == (system, value):
                    continue
                if targets and key[0] not in targets:
                    continue
                identifiers.setdefault(
                    key, {k: ident[k] for k in ("use", "type", "system", "value") if k in ident}
                )
        golden_first = sorted(records, key=lambda r: (not is_golden(content_json(r)), r.id))
        return list(identifiers.values()), [f"Patient/{r.id}" for r in golden_first]

    def sources_with_identifier(self, system: str, value: str) -> list[str]:
        """Ids of the MOs' records (not golden ones) carrying identifier ``system|value``."""
        token = f"{system}|{escape_value(value)}"
        q = parse_search(P, [("identifier", token)], default_count=10, max_count=10)
        q.query.conds.append(TokenCond("_tag", MPI_SYSTEM, "golden", negate=True))
        return [r.id for r in self.store.search(q.query).items]

    def resolve_identifier(self, system: str, value: str) -> list[str]:
        """The records an identifier names: one MO's record, or — when several MOs' records
        of one person carry it (a SNILS) — that person's golden record."""
        ids = self.sources_with_identifier(system, value)
        if len(ids) > 1:
            groups = {self.golden_of(i) for i in ids}
            if len(groups) == 1 and None not in groups:
                return [str(groups.pop())]
        return ids

    # --- merge and unmerge -------------------------------------------------------------------

    def merge(
        self,
        source: str,
        target: str,
        *,
        preview: bool = False,
        reason: str | None = None,
        agent: str | None = None,
    ) -> MergeOutcome:
        """Merge Patient ``source`` into Patient ``target`` (FHIR ``$merge``, HL7 ADT A40).

        - both golden records: the source's group joins the target's; the source golden
          record is retired (``active: false``, ``link replaced-by``);
        - a source record into a golden record: that record alone moves (an operator's answer
          to a review Task);
        - two source records (an MO found it kept two charts, A40): the groups join and the
          merged record is retired the same way.

        A repeated merge changes nothing and says so; merging a record into itself, into a
        record that was itself merged away, or a record already merged elsewhere is refused.
        ``preview`` computes the outcome and rolls back.
        """
        if source == target:
            raise MergeRefused(
                "merge-into-self", f"cannot merge Patient/{source} into itself", status=400
            )
        when = now_us()
        outcome: MergeOutcome | None = None
        try:
            with self.store.transaction() as tx:
                outcome = self._merge_in(tx, source, target, when, reason, agent)
                if preview:
                    raise _Preview
        except _Preview:
            pass
        assert outcome is not None
        if not preview and not outcome.already:  # recorded once committed, never a preview
            self._audit("merge", source, target, reason, agent, when)
        return outcome

    def _merge_in(
        self,
        tx: WriteTx,
        source: str,
        target: str,
        when: int,
        reason: str | None,
        agent: str | None,
    ) -> MergeOutcome:
        idx = tx.identity
        src = self._existing(tx, source, "source-patient")
        tgt = self._existing(tx, target, "target-patient")
        src_res, tgt_res = content_json(src), content_json(tgt)
        g_src = self._ensure_group(tx, source, src_res, when)
        g_tgt = self._ensure_group(tx, target, tgt_res, when)
        survivor_of_target = replaced_by(tgt_res)
        if survivor_of_target is not None:
            raise MergeRefused(
                "merge-target-retired",
                f"target Patient/{target} was itself merged into {survivor_of_target}; merge "
                "into the surviving record",
            )
        done_into = replaced_by(src_res)
        if done_into is not None:
            if done_into == f"Patient/{target}" or g_src == g_tgt:
                return self._already(tx, source, target, g_tgt, "merged into")
            raise MergeRefused(
                "already-merged",
                f"source Patient/{source} was already merged into {done_into}; unmerge it first",
                status=409,
            )
        src_golden, tgt_golden = is_golden(src_res), is_golden(tgt_res)
        if src_golden and g_src == g_tgt:
            raise MergeRefused(
                "merge-into-self",
                f"Patient/{target} is a record of the person Patient/{source} stands for",
                status=400,
            )
        body: Json = {"source": source, "target": target, "from_group": g_src, "to_group": g_tgt}
        if reason:
            body["reason"] = reason
        if agent:
            body["agent"] = agent
        if src_golden or not tgt_golden:
            kind: Literal["golden", "relink", "record"] = "golden" if src_golden else "record"
            moved = idx.move_group(P, g_src, g_tgt) if g_src != g_tgt else []
            if kind == "record":
                body["source_version"] = src.version
                retired = _retired(src_res, f"Patient/{target}")
                self.svc.write_internal(tx, retired, P, source, when)
        else:  # a source record into a golden record: relink that record alone
            if g_src == g_tgt:
                return self._already(tx, source, target, g_tgt, "linked to")
            kind = "relink"
            rec = idx.records(P, [source])[0]
            idx.put(P, source, g_tgt, rec.features)
            moved = [source]
            if not any(m.features is not None for m in idx.members(P, g_src)):
                moved += idx.move_group(P, g_src, g_tgt)  # its old golden record retires
        body["kind"], body["moved"] = kind, moved
        for gid in dict.fromkeys((g_src, g_tgt)):
            self.refresh_golden(tx, gid, when)
        self._journal(idx, source, g_tgt, "merge", body, when)
        log.info("mpi.merge", kind=kind, moved=len(moved))
        return MergeOutcome(source, target, kind, moved, result=tx.current(P, g_tgt))

    @staticmethod
    def _already(tx: WriteTx, source: str, target: str, group: str, how: str) -> MergeOutcome:
        """A repeated merge: nothing changes, and the answer says so."""
        return MergeOutcome(
            source,
            target,
            "none",
            already=True,
            result=tx.current(P, group),
            message=f"Patient/{source} was already {how} Patient/{target}",
        )

    def unmerge(
        self, source: str, *, reason: str | None = None, agent: str | None = None
    ) -> MergeOutcome:
        """Undo the latest merge of Patient ``source``: the records it moved go back to their
        group, a retired record is restored as it was, both golden records are rebuilt.
        Refused (``not-merged``) when the latest merge of ``source`` was already undone."""
        when = now_us()
        with self.store.transaction() as tx:
            idx = tx.identity
            self._existing(tx, source, "source-patient")
            entries = [
                e for e in idx.journal(P, id=source, limit=50) if e.kind in ("merge", "unmerge")
            ]
            if not entries or entries[0].kind != "merge":
                raise MergeRefused("not-merged", f"Patient/{source} has no merge to undo")
            body = orjson.loads(entries[0].body)
            g_src, g_tgt = str(body["from_group"]), str(body["to_group"])
            moved = [str(m) for m in body.get("moved", [])]
            back = []
            for rec in idx.records(P, moved):
                if rec.group_id == g_tgt:  # still where the merge put it
                    idx.put(P, rec.id, g_src, rec.features)
                    back.append(rec.id)
            if body.get("kind") == "record":
                before = self.store.vread(P, source, int(body["source_version"]))
                if before is not None and before.content is not None:
                    self.svc.write_internal(tx, content_json(before), P, source, when)
            for gid in dict.fromkeys((g_src, g_tgt)):
                self.refresh_golden(tx, gid, when)
            out = {
                "source": source,
                "target": body.get("target"),
                "moved": back,
                "merge": entries[0].seq,
            }
            if reason:
                out["reason"] = reason
            self._journal(idx, source, g_src, "unmerge", out, when)
            undone = MergeOutcome(
                source,
                str(body.get("target")),
                body.get("kind", "golden"),
                back,
                result=tx.current(P, g_src),
            )
        self._audit("unmerge", source, undone.target, reason, agent, when)
        return undone

    def _existing(self, tx: WriteTx, id: str, what: str) -> StoredResource:
        cur = tx.current(P, id)
        if cur is None or cur.deleted or cur.content is None:
            raise UnknownPatient(f"{what} Patient/{id} is not known to the hub (unknown-patient)")
        return cur

    def _ensure_group(self, tx: WriteTx, id: str, res: Json, when: int) -> str:
        """The group of ``id``; a source stored before the index ran is matched now."""
        group = tx.identity.group_of(P, id)
        if group is None:
            if is_golden(res):
                tx.identity.put(P, id, id)
                return id
            stored = tx.current(P, id)
            assert stored is not None
            self.on_patient_written(tx, res, stored, when)
            group = tx.identity.group_of(P, id)
        assert group is not None
        return group

    def _audit(
        self,
        action: str,
        source: str,
        target: str,
        reason: str | None,
        agent: str | None,
        when: int,
    ) -> None:
        """One record in the audit trail for a merge or unmerge (besides the record of the
        request that asked for it, if any): the two patients, who, why."""
        if self.svc.trail is None:
            log.warning("mpi.audit.no-trail", action=action, source=source, target=target)
            return
        p = current_principal.get()
        self.svc.trail.append(
            AuditRecord(
                action="U",
                subtype=action,
                outcome=0,
                status=200,
                method="",
                path=f"mpi:{action}",
                agent=p.subject if p else agent or "hub",
                roles=sorted(p.roles) if p else [],
                org=p.org if p else None,
                reason=f"{agent or 'hub'}: {reason}" if reason else agent,
                patients=[source, target],
                entities=[f"Patient/{source}", f"Patient/{target}"],
                recorded=when,
            )
        )

    # --- explanation ---------------------------------------------------------------------------

    def explain(self, id: str) -> list[Json]:
        """The journal of Patient ``id`` (or of the golden record ``id``), newest first: every
        match decision with its rule, score and per-field contributions, and every merge."""
        with self.store.identity_reader() as idx:
            entries = idx.journal(P, id=id, limit=100)
            if not entries:
                entries = idx.journal(P, group_id=id, limit=100)
        return [
            {
                "seq": e.seq,
                "patient": f"Patient/{e.id}",
                "golden": f"Patient/{e.group_id}",
                "kind": e.kind,
                "at": format_instant(e.created),
                **orjson.loads(e.body),
            }
            for e in entries
        ]


class _Preview(Exception):
    """Raised inside a preview merge so its transaction rolls back."""


def _input(kind: str, value: Json) -> Json:
    return {"type": {"coding": [{"system": MPI_SYSTEM, "code": kind}], "text": kind}, **value}


def _result_json(r: MatchResult) -> Json:
    out: Json = {"decision": r.decision}
    if r.match is not None:
        out.update(r.match.as_dict())
        out["candidate"] = r.person_id
    if r.ambiguous:
        out["ambiguous"] = True
    out["ranked"] = [
        {"golden": pid, "score": round(m.score, 2), "rule": m.rule} for pid, m in r.ranked[:5]
    ]
    return out


def replaced_by(res: Json) -> str | None:
    """The record ``res`` was merged into (``link`` ``replaced-by``), if it was retired."""
    if res.get("active") is not False:
        return None
    for link in res.get("link") or []:
        if isinstance(link, dict) and link.get("type") == "replaced-by":
            ref = (link.get("other") or {}).get("reference")
            if isinstance(ref, str):
                return ref
    return None


def _retired(res: Json, survivor: str) -> Json:
    """``res`` marked as merged into ``survivor`` (FHIR Patient.link ``replaced-by``)."""
    out = {k: v for k, v in res.items() if k not in ("meta", "link")}
    meta = {k: v for k, v in (res.get("meta") or {}).items() if k in ("tag", "security", "source")}
    if meta:
        out["meta"] = meta
    out["active"] = False
    ref = survivor if survivor.startswith("Patient/") else f"Patient/{survivor}"
    out["link"] = [{"other": {"reference": ref}, "type": "replaced-by"}]
    return out


def _identifier_key(ident: Any) -> tuple[str, str] | None:
    if not isinstance(ident, dict):
        return None
    system, value = ident.get("system"), ident.get("value")
    if not isinstance(system, str) or not isinstance(value, str):
        return None
    system = normalise_system(system)
    try:
        return system, normalise_identifier(system, value)
    except IdentifierError:
        return system, value.strip()


def _distinct(items: Iterable[Any], key: Any, limit: int | None = None) -> list[Any]:
    seen: set[Any] = set()
    out = []
    for item in items:
        k = key(item)
        if k is None or k in seen:
            continue
        seen.add(k)
        out.append(item)
        if limit is not None and len(out) >= limit:
            break
    return out


def _name_key(n: Any) -> tuple[str, ...] | None:
    if not isinstance(n, dict):
        return None
    parts = [str(n.get("family") or ""), *(str(g) for g in n.get("given") or [])]
    key = tuple(p.strip().lower().replace("ё", "е") for p in parts)
    return key if any(key) else (str(n.get("text") or "").lower(),)


def compose_golden(gid: str, sources: list[Json], merged: Sequence[str] = ()) -> Json:
    """The golden Patient of a person from its source records (newest first wins for single
    values; identifiers, names, phones and addresses are the union, without duplicates)."""
    ordered = sorted(
        sources, key=lambda r: str((r.get("meta") or {}).get("lastUpdated", "")), reverse=True
    )
    golden: Json = {
        "resourceType": P,
        "id": gid,
        "meta": {"tag": [dict(GOLDEN_TAG)]},
    }
    idents = _distinct((i for r in ordered for i in r.get("identifier") or []), _identifier_key)
    national = [i for i in idents if normalise_system(i["system"]) in NATIONAL_SYSTEMS]
    local = [i for i in idents if normalise_system(i["system"]) not in NATIONAL_SYSTEMS]
    if national or local:
        golden["identifier"] = [
            {
                k: v
                for k, v in i.items()
                if k in ("use", "type", "system", "value", "period", "assigner")
            }
            for i in national + local
        ]
    golden["active"] = True
    names = _distinct(
        (n for r in ordered for n in r.get("name") or []), _name_key, MAX_SOURCES_SHOWN
    )
    if names:
        golden["name"] = [{k: v for k, v in n.items() if k != "id"} for n in names]
    telecom = _distinct(
        (t for r in ordered for t in r.get("telecom") or []),
        lambda t: (
            (t.get("system"), str(t.get("value", "")).strip())
            if isinstance(t, dict) and t.get("value")
            else None
        ),
    )
    if telecom:
        golden["telecom"] = [{k: v for k, v in t.items() if k != "id"} for t in telecom]
    for element in ("gender", "birthDate"):
        value = next((r[element] for r in ordered if r.get(element)), None)
        if value is not None:
            golden[element] = value
    deceased_dt = next((r["deceasedDateTime"] for r in ordered if r.get("deceasedDateTime")), None)
    if deceased_dt:
        golden["deceasedDateTime"] = deceased_dt
    elif any(r.get("deceasedBoolean") is True for r in ordered):
        golden["deceasedBoolean"] = True
    addresses = _distinct(
        (a for r in ordered for a in r.get("address") or []),
        lambda a: (
            orjson.dumps(
                {k: a.get(k) for k in ("line", "city", "postalCode", "text")},
                option=orjson.OPT_SORT_KEYS,
            )
            if isinstance(a, dict)
            else None
        ),
        MAX_SOURCES_SHOWN,
    )
    if addresses:
        golden["address"] = [{k: v for k, v in a.items() if k != "id"} for a in addresses]
    comm = next((r["communication"] for r in ordered if r.get("communication")), None)
    if comm:
        golden["communication"] = comm
    links = [
        {"other": {"reference": f"Patient/{r['id']}"}, "type": "seealso"}
        for r in sorted(sources, key=lambda r: str(r["id"]))
    ]
    links += [{"other": {"reference": f"Patient/{m}"}, "type": "replaces"} for m in sorted(merged)]
    golden["link"] = links
    return golden


def _same(a: Json, b: Json) -> bool:
    """Equal apart from ``meta.versionId`` / ``meta.lastUpdated``."""

    def strip(r: Json) -> Json:
        out = dict(r)
        meta = {
            k: v for k, v in (r.get("meta") or {}).items() if k not in ("versionId", "lastUpdated")
        }
        out["meta"] = meta
        return out

    return strip(a) == strip(b)


def attach_mpi(svc: FhirService) -> MasterPatientIndex | None:
    """Give ``svc`` a master patient index per its settings (None when ``HIE_MPI_ENABLED``
    is off): from then on every source Patient it writes is matched and linked."""
    settings = svc.settings
    if not settings.mpi_enabled:
        return None
    thresholds = Thresholds(auto=settings.mpi_auto_link_bits, review=settings.mpi_review_bits)
    mpi = MasterPatientIndex(
        svc, thresholds, registered_systems_only=settings.mpi_registered_systems_only
    )
    svc.mpi = mpi
    return mpi
