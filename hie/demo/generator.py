"""``Generator(seed)``: the one source of synthetic patients, records and traffic.

Everything comes from one ``random.Random(seed)``; the demo world's "today" is a fixed
``reference_date`` (never the clock), so the same seed and the same sequence of calls give
byte-identical output on any machine. The city (:meth:`Generator.city`) draws from its own
stream derived from the seed, so it is the same whenever it is asked for.

Resources are plain FHIR R4 JSON dicts, ready for ``orjson.dumps`` and for validation by the
hub's FHIR models. Patients are returned without ``id`` (the server assigns one) unless
:meth:`Generator.assign_id` gives them a deterministic one; records from
:meth:`Generator.patient_record` carry ids and reference each other as ``Type/id``, in an order
where anything referenced comes first, so :func:`as_transaction` can PUT them.

:meth:`Generator.patient_documents` adds a record's clinical documents (PDF and CDA bodies from
:mod:`hie.demo.documents`) as IHE MHD submissions, drawn from a stream of their own.

The module also makes the "same person, different record" variants the MPI benchmarks need:
:func:`typo_variant`, :func:`transliterate_variant` and :func:`swap_day_month`.
"""

from __future__ import annotations

import base64
import copy
import gc
import random
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import date, datetime, timedelta
from functools import cached_property
from typing import Any, Literal

from hie.demo import clinical, documents, identifiers, names
from hie.demo.city import (
    DISTRICT_STREETS,
    DISTRICTS,
    MOS,
    MOS_BY_ID,
    CityData,
    MoInfo,
    build_city,
)

# "Today" in the demo world: birth dates run 1930–2025 and clinical data fills the five years
# before this date.
REFERENCE_DATE = date(2025, 11, 1)
HISTORY_YEARS = 5

Gender = Literal["male", "female"]

# RFC 4122 version 4: version nibble 4 (bits 76-79), variant bits 10 (bits 62-63).
_UUID_CLEAR = ~((0xF << 76) | (0x3 << 62))
_UUID_V4 = (0x4 << 76) | (0x2 << 62)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building many small dicts.

    The resources we build hold no reference cycles, but each is ~20 containers, and with the
    collector on, generation scans make building 100,000 Observations several times slower.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


# Age bands of the population (years, inclusive) and their shares, roughly St Petersburg's.
_AGE_BANDS: tuple[tuple[int, int], ...] = ((0, 17), (18, 39), (40, 64), (65, 95))
_AGE_WEIGHTS: tuple[float, ...] = (0.18, 0.30, 0.33, 0.19)

_ENCOUNTER_KINDS: tuple[str, ...] = ("visit", "checkup", "home", "emergency", "inpatient")
_ENCOUNTER_WEIGHTS: tuple[float, ...] = (0.62, 0.1, 0.1, 0.1, 0.08)


# IHE MHD (ITI-65): the submission set's List type and the identifier system of documents.
MHD_LIST_TYPES = "https://profiles.ihe.net/ITI/MHD/CodeSystem/MHDlistTypes"
MHD_SOURCE_ID = "https://profiles.ihe.net/ITI/MHD/StructureDefinition/ihe-sourceId"
DOCUMENT_IDS = "urn:ietf:rfc:3986"
_LOINC_SYSTEM = "http://loinc.org"

# The documents an encounter leaves: the first one it always has, then one it may have.
_ENCOUNTER_DOCUMENTS: dict[str, tuple[documents.DocumentKind, documents.DocumentKind]] = {
    "inpatient": (documents.DISCHARGE_SUMMARY, documents.IMAGING_REPORT),
    "emergency": (documents.VISIT_PROTOCOL, documents.IMAGING_REPORT),
    "visit": (documents.VISIT_PROTOCOL, documents.REFERRAL),
    "home": (documents.VISIT_PROTOCOL, documents.REFERRAL),
    "checkup": (documents.VISIT_PROTOCOL, documents.IMAGING_REPORT),
}
_MOS_BY_OID: dict[str, MoInfo] = {mo.oid: mo for mo in MOS}
# Specialties that write a visit protocol, referral or discharge summary when the MO has them.
_GENERALISTS = frozenset({"therapist", "general-practice", "paediatrics", "therapy"})


def _random_uuid(rng: random.Random) -> str:
    """A version 4 UUID from ``rng`` (what ``str(uuid.UUID(int=bits, version=4))`` gives)."""
    bits = (rng.getrandbits(128) & _UUID_CLEAR) | _UUID_V4
    h = f"{bits:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def _mo_reference(mo: MoInfo) -> dict[str, Any]:
    """A logical reference to an MO by its ФРМО OID: valid whether or not the city is loaded."""
    return {"identifier": {"system": identifiers.FRMO_SYSTEM, "value": mo.oid}, "display": mo.name}


class Generator:
    """Deterministic generator of the demo city, patients and their records.

    ``Generator(seed)`` — the same seed and the same calls give byte-identical output.
    ``reference_date`` is the demo world's "today" (default :data:`REFERENCE_DATE`).

    - :meth:`patient` / :meth:`patients` — Patients with Russian names, SNILS, OMS policy,
      passport, an MO-local MRN and a St Petersburg address.
    - :meth:`city` — :class:`~hie.demo.city.CityData`: Organizations, Endpoints,
      Practitioners, PractitionerRoles with fixed ids (``mo-0001`` …).
    - :meth:`observation` / :meth:`observations` — laboratory Observations.
    - :meth:`patient_record` — a mixed record of encounters, conditions, observations,
      reports, immunizations, medication requests and allergies.
    - :meth:`observation_bundle`, :meth:`transaction_with_patient` — transaction Bundles.
    - :meth:`patient_documents` — a record's clinical documents as IHE MHD submissions.
    """

    def __init__(self, seed: int, *, reference_date: date = REFERENCE_DATE) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.reference_date = reference_date
        self._now = datetime(
            reference_date.year, reference_date.month, reference_date.day, tzinfo=clinical.MSK
        )
        self._history_days = HISTORY_YEARS * 365
        self._history_start = self._now - timedelta(days=self._history_days)
        self._clinical_mos = tuple(mo for mo in MOS if mo.treats_patients)
        self._adult_mos = tuple(mo for mo in self._clinical_mos if "childrens" not in mo.kind)
        self._child_mos = tuple(
            mo for mo in self._clinical_mos if mo.kind == "childrens-polyclinic"
        )
        self._labs = tuple(mo for mo in MOS if mo.kind == "laboratory")

    # --- identifiers and ids -------------------------------------------------------------

    def uuid(self) -> str:
        """A random (version 4) UUID drawn from the generator's stream.

        The same string ``str(uuid.UUID(int=bits, version=4))`` gives, built without the
        ``UUID`` object (this is on the hot path of bundle generation).
        """
        return _random_uuid(self.rng)

    def assign_id(self, resource: dict[str, Any]) -> dict[str, Any]:
        """Give ``resource`` a deterministic id (a UUID from the stream); returns it."""
        resource["id"] = self.uuid()
        return resource

    # --- patients ------------------------------------------------------------------------

    def _birth_date(self) -> date:
        rng = self.rng
        lo, hi = rng.choices(_AGE_BANDS, weights=_AGE_WEIGHTS)[0]
        age_days = rng.randint(lo * 365, hi * 365 + 364)
        birth = self.reference_date - timedelta(days=max(age_days, 1))
        return max(birth, date(1930, 1, 1))

    def _age(self, birth: date, at: date | None = None) -> int:
        at = at or self.reference_date
        return at.year - birth.year - ((at.month, at.day) < (birth.month, birth.day))

    def _resolve_mo(self, mo: MoInfo | str | None, age: int) -> MoInfo:
        if isinstance(mo, MoInfo):
            return mo
        if isinstance(mo, str):
            return MOS_BY_ID[mo]
        if age < 18 and self.rng.random() < 0.7:
            return self.rng.choice(self._child_mos)
        return self.rng.choice(self._adult_mos)

    def _address(self) -> dict[str, Any]:
        rng = self.rng
        district = rng.choice(DISTRICTS)
        street, postal = rng.choice(DISTRICT_STREETS[district])
        line = f"{street}, д. {rng.randint(1, 150)}"
        if rng.random() < 0.25:
            line += f", корп. {rng.randint(1, 5)}"
        line += f", кв. {rng.randint(1, 350)}"
        return {
            "use": "home",
            "type": "physical",
            "text": f"{postal}, г. Санкт-Петербург, {district}, {line}",
            "line": [line],
            "city": "Санкт-Петербург",
            "district": district,
            "state": "Санкт-Петербург",
            "postalCode": postal,
            "country": "RU",
        }

    def patient(self, mo: MoInfo | str | None = None) -> dict[str, Any]:
        """One Patient (no ``id``): name, gender, birth date, address, phone and identifiers.

        ``mo`` (a :class:`MoInfo` or its id, e.g. ``"mo-0003"``) is the MO whose local MRN the
        patient carries; by default one is chosen (children's polyclinics for most children).
        """
        rng = self.rng
        gender: Gender = "female" if rng.random() < 0.54 else "male"
        birth = self._birth_date()
        age = self._age(birth)
        the_mo = self._resolve_mo(mo, age)
        family = names.family_for(rng.choice(names.MALE_FAMILY_NAMES), gender)
        given_table = names.FEMALE_GIVEN_NAMES if gender == "female" else names.MALE_GIVEN_NAMES
        given = rng.choice(given_table)
        patronymic = names.patronymic(rng.choice(names.MALE_GIVEN_NAMES), gender)
        ids: list[dict[str, Any]] = []
        # Newborns may not have their SNILS yet.
        if age >= 1 or rng.random() < 0.5:
            ids.append(identifiers.snils_identifier(identifiers.random_snils(rng)))
        ids.append(identifiers.oms_identifier(identifiers.random_oms(rng)))
        if age >= 14:
            # Passports are issued at 14 and replaced at 20 and 45.
            issue_age = 45 if age >= 45 else 20 if age >= 20 else 14
            series, number = identifiers.random_passport(rng, birth.year + issue_age)
            ids.append(identifiers.passport_identifier(series, number))
        ids.append(
            identifiers.mrn_identifier(the_mo.oid, f"{rng.randrange(10**6, 10**7)}", the_mo.name)
        )
        return {
            "resourceType": "Patient",
            "identifier": ids,
            "active": True,
            "name": [
                {
                    "use": "official",
                    "text": f"{family} {given} {patronymic}",
                    "family": family,
                    "given": [given, patronymic],
                }
            ],
            "telecom": [
                {"system": "phone", "value": f"+79{rng.randrange(10**9):09d}", "use": "mobile"}
            ],
            "gender": gender,
            "birthDate": birth.isoformat(),
            "address": [self._address()],
        }

    def patients(self, n: int, mo: MoInfo | str | None = None) -> Iterator[dict[str, Any]]:
        """``n`` Patients (see :meth:`patient`)."""
        for _ in range(n):
            yield self.patient(mo)

    # --- city ----------------------------------------------------------------------------

    def city(self) -> CityData:
        """The demo city: ~30 MOs with their Endpoints, Practitioners and PractitionerRoles.

        Ids are fixed (``mo-0001``, ``ep-0001-mllp``, ``pr-0001``, ``prr-0001``), so the
        resources can be PUT. Drawn from a stream of its own: calling this does not change what
        the other methods return, and it returns the same city every time for a seed.
        """
        return build_city(random.Random(f"hie.demo.city:{self.seed}"))

    # --- observations --------------------------------------------------------------------

    def _lab_time(self, start: datetime | None = None, days: int | None = None) -> datetime:
        """A weekday-hours time in the ``days`` after ``start`` (default: the history window)."""
        rng = self.rng
        start = start or self._history_start
        days = days if days is not None else self._history_days
        return start + timedelta(
            days=rng.randrange(max(days, 1)), seconds=rng.randrange(8 * 3600, 17 * 3600)
        )

    def observation(
        self,
        patient_ref: str,
        *,
        loinc: str | None = None,
        effective: datetime | None = None,
        encounter_ref: str | None = None,
    ) -> dict[str, Any]:
        """One laboratory Observation for ``patient_ref`` (``Patient/<id>`` or ``urn:uuid:…``).

        ``loinc`` picks the test (default: any of :data:`~hie.demo.clinical.LAB_TESTS`);
        ``effective`` defaults to a time in the last five years before the reference date.
        """
        rng = self.rng
        test = clinical.LAB_TESTS_BY_LOINC[loinc] if loinc else rng.choice(clinical.LAB_TESTS)
        when = effective if effective is not None else self._lab_time()
        return clinical.lab_observation(rng, test, patient_ref, when, encounter_ref=encounter_ref)

    def observations(self, patient_ref: str, n: int) -> Iterator[dict[str, Any]]:
        """``n`` laboratory Observations for ``patient_ref`` (see :meth:`observation`)."""
        for _ in range(n):
            yield self.observation(patient_ref)

    def observation_bundle(self, patient_refs: Sequence[str], n: int) -> dict[str, Any]:
        """A transaction Bundle of ``n`` Observations spread round-robin over ``patient_refs``.

        Each entry has ``fullUrl`` ``urn:uuid:<uuid from the stream>`` and
        ``request: {method: POST, url: Observation}``.
        """
        if not patient_refs:
            raise ValueError("observation_bundle needs at least one patient reference")
        entries: list[dict[str, Any]] = []
        n_refs = len(patient_refs)
        with _gc_paused():
            for i in range(n):
                entries.append(
                    {
                        "fullUrl": f"urn:uuid:{self.uuid()}",
                        "resource": self.observation(patient_refs[i % n_refs]),
                        "request": {"method": "POST", "url": "Observation"},
                    }
                )
        return {"resourceType": "Bundle", "type": "transaction", "entry": entries}

    def transaction_with_patient(
        self, n_obs: int, mo: MoInfo | str | None = None
    ) -> dict[str, Any]:
        """A transaction Bundle: a new Patient under ``urn:uuid:…`` and ``n_obs`` Observations
        whose ``subject`` is that ``urn:uuid`` (the server rewrites it to the new id)."""
        patient_url = f"urn:uuid:{self.uuid()}"
        entries: list[dict[str, Any]] = [
            {
                "fullUrl": patient_url,
                "resource": self.patient(mo),
                "request": {"method": "POST", "url": "Patient"},
            }
        ]
        with _gc_paused():
            for _ in range(n_obs):
                entries.append(
                    {
                        "fullUrl": f"urn:uuid:{self.uuid()}",
                        "resource": self.observation(patient_url),
                        "request": {"method": "POST", "url": "Observation"},
                    }
                )
        return {"resourceType": "Bundle", "type": "transaction", "entry": entries}

    # --- records -------------------------------------------------------------------------

    def patient_record(
        self,
        patient_ref: str,
        n_resources: int,
        *,
        birth_date: str | None = None,
        mo: MoInfo | str | None = None,
    ) -> list[dict[str, Any]]:
        """A realistic mixed record of exactly ``n_resources`` resources for ``patient_ref``.

        Episodes of care (an Encounter, its Condition, vital signs, lab Observations grouped by
        DiagnosticReports, MedicationRequests, now and then an Immunization) plus the patient's
        AllergyIntolerances. Every resource has an ``id`` and references use ``Type/id``; the
        list is ordered so that anything referenced comes first. ``birth_date``
        (``YYYY-MM-DD``) keeps dates after birth and diagnoses and vaccines fitting the age;
        ``mo`` is the patient's own MO (default: chosen by age).
        """
        with _gc_paused():
            return self._record(patient_ref, n_resources, birth_date, mo)

    def _record(
        self,
        patient_ref: str,
        n_resources: int,
        birth_date: str | None,
        mo: MoInfo | str | None,
    ) -> list[dict[str, Any]]:
        rng = self.rng
        birth = date.fromisoformat(birth_date) if birth_date else None
        age_now = self._age(birth) if birth else 45
        home_mo = self._resolve_mo(mo, age_now)
        start = self._history_start
        if birth is not None:
            born = datetime(birth.year, birth.month, birth.day, tzinfo=clinical.MSK)
            start = max(start, born + timedelta(days=1))
        span_days = max((self._now - start).days, 1)
        out: list[dict[str, Any]] = []

        def add(resource: dict[str, Any]) -> str:
            rid = self.uuid()
            # id right after resourceType, where FHIR's own JSON puts it.
            out.append({"resourceType": resource["resourceType"], "id": rid, **resource})
            return f"{resource['resourceType']}/{rid}"

        def age_at(dt: datetime) -> int:
            return self._age(birth, dt.date()) if birth else age_now

        # Allergies first: they are recorded once and stay.
        for code in rng.sample(
            sorted(clinical.ALLERGENS), k=rng.choices((0, 1, 2), (0.7, 0.22, 0.08))[0]
        ):
            add(clinical.allergy(code, patient_ref, self._lab_time(start, span_days)))

        eligible = [d for d in clinical.DIAGNOSES if d.min_age <= age_now]
        chronic_pool = [d for d in eligible if d.chronic]
        acute_pool = [d for d in eligible if not d.chronic and d.code != "Z00.0"]
        n_chronic = min(len(chronic_pool), rng.choices((0, 1, 2, 3), (0.35, 0.3, 0.2, 0.15))[0])
        chronic = rng.sample(chronic_pool, k=n_chronic)
        chronic_refs: dict[str, str] = {}

        while len(out) < n_resources:
            kind = rng.choices(_ENCOUNTER_KINDS, weights=_ENCOUNTER_WEIGHTS)[0]
            begin = self._lab_time(start, span_days)
            hours = clinical.ENCOUNTER_KINDS[kind][3]
            end = begin + timedelta(minutes=rng.randint(15, 60) if hours == 1 else hours * 60)
            end = min(end, self._now)
            if kind == "checkup":
                dx = clinical.DIAGNOSES_BY_CODE["Z00.0"]
            elif chronic and rng.random() < 0.55:
                dx = rng.choice(chronic)
            else:
                acute = [d for d in acute_pool if d.min_age <= age_at(begin)] or acute_pool
                dx = rng.choice(acute)
            where = (
                home_mo
                if kind in ("visit", "checkup", "home")
                else rng.choice([m for m in self._clinical_mos if m.kind == "hospital"])
            )
            enc_ref = add(
                clinical.encounter(
                    kind,
                    patient_ref,
                    begin,
                    end,
                    service_provider=_mo_reference(where),
                    reason=(dx.code, dx.display),
                )
            )
            # The diagnosis: chronic ones are recorded once, at their first encounter.
            if dx.chronic:
                if dx.code not in chronic_refs:
                    chronic_refs[dx.code] = add(
                        clinical.condition(dx, patient_ref, begin, encounter_ref=enc_ref)
                    )
                cond_ref = chronic_refs[dx.code]
            elif dx.code != "Z00.0":
                resolved = begin + timedelta(days=rng.randint(7, 21))
                cond_ref = add(
                    clinical.condition(
                        dx,
                        patient_ref,
                        begin,
                        encounter_ref=enc_ref,
                        resolved=resolved if resolved < self._now else None,
                    )
                )
            else:
                cond_ref = None
            if rng.random() < 0.6:
                for vital in clinical.vital_signs(
                    rng, patient_ref, begin, encounter_ref=enc_ref, age_years=age_at(begin)
                ):
                    add(vital)
            panels = list(dx.panels) or [rng.choice(("cbc", "biochem"))]
            lab = rng.choice(self._labs) if rng.random() < 0.5 else where
            performer = _mo_reference(lab)
            for panel in panels[:2]:
                members = clinical.LAB_PANELS[panel][3]
                if len(members) > 8:
                    members = tuple(sorted(rng.sample(members, k=rng.randint(5, 9))))
                taken = begin + timedelta(minutes=rng.randint(5, 90))
                obs_refs: list[str] = []
                last_issued = taken
                for loinc in members:
                    obs = clinical.lab_observation(
                        rng,
                        clinical.LAB_TESTS_BY_LOINC[loinc],
                        patient_ref,
                        taken,
                        encounter_ref=enc_ref,
                        performer=performer,
                    )
                    last_issued = max(last_issued, datetime.fromisoformat(obs["issued"]))
                    obs_refs.append(add(obs))
                add(
                    clinical.diagnostic_report(
                        panel,
                        patient_ref,
                        taken,
                        last_issued,
                        obs_refs,
                        encounter_ref=enc_ref,
                        performer=performer,
                    )
                )
            if dx.drugs and rng.random() < 0.75:
                add(
                    clinical.medication_request(
                        rng.choice(dx.drugs),
                        patient_ref,
                        end,
                        active=dx.chronic,
                        encounter_ref=enc_ref,
                        reason_ref=cond_ref,
                    )
                )
            if rng.random() < 0.12:
                age_days = (begin.date() - birth).days if birth else age_now * 365
                fitting = [
                    v
                    for v in clinical.VACCINES
                    if v.min_age_days <= age_days
                    and (v.max_age_days is None or age_days <= v.max_age_days)
                ]
                if fitting:
                    add(
                        clinical.immunization(
                            rng,
                            rng.choice(fitting),
                            patient_ref,
                            begin,
                            encounter_ref=enc_ref,
                            performer=_mo_reference(where),
                        )
                    )
        del out[n_resources:]
        return out

    def patient_with_record(
        self, n_resources: int, mo: MoInfo | str | None = None
    ) -> list[dict[str, Any]]:
        """A Patient with a deterministic id followed by a record (``n_resources`` in all)."""
        patient = self.assign_id(self.patient(mo))
        mrn_mo = mo if mo is not None else _mo_of_patient(patient)
        record = self.patient_record(
            f"Patient/{patient['id']}",
            max(n_resources - 1, 0),
            birth_date=patient["birthDate"],
            mo=mrn_mo,
        )
        return [patient, *record]

    # --- documents -----------------------------------------------------------------------

    def patient_documents(
        self, record: Sequence[dict[str, Any]], max_documents: int = 4
    ) -> list[list[dict[str, Any]]]:
        """The clinical documents of a record from :meth:`patient_with_record` (its Patient
        first): 2 to ``max_documents`` of them (fewer when the record has few encounters),
        each as one IHE MHD submission (ITI-65) — the submission-set List, the
        DocumentReference and its Binary (``data``: a PDF with a text layer or a CDA R2
        document, about half each) — with fixed ids, in date order.

        Each document belongs to one of the record's encounters: a hospital stay's discharge
        summary first, then visit protocols, referrals and imaging reports. It is about the
        encounter's diagnosis, dated within it, written by its MO (author with one of the
        MO's doctors, and custodian) and points at it (``context.encounter``). Drawn from a
        stream of the seed and the patient's id: asking for documents changes nothing else
        the generator returns, and the same record always gets the same documents."""
        patient = record[0] if record else {}
        if patient.get("resourceType") != "Patient" or "id" not in patient:
            raise ValueError("patient_documents needs a record whose first resource is its Patient")
        rng = random.Random(f"hie.demo.documents:{self.seed}:{patient['id']}")
        encounters = [
            (res, _ENCOUNTER_DOCUMENTS[code])
            for res in record
            if res["resourceType"] == "Encounter"
            and (code := res["type"][0]["coding"][0]["code"]) in _ENCOUNTER_DOCUMENTS
        ]
        if not encounters or max_documents < 1:
            return []
        n = rng.randint(min(2, max_documents), max_documents)
        candidates = [(enc, kind) for enc, kinds in encounters for kind in kinds]
        rng.shuffle(candidates)
        # every hospital stay leaves a discharge summary; then the kinds least used so far
        chosen = [c for c in candidates if c[1] is documents.DISCHARGE_SUMMARY][:n]
        rest = [c for c in candidates if c[1] is not documents.DISCHARGE_SUMMARY]
        used = Counter(kind for _, kind in chosen)
        while len(chosen) < n and rest:
            pick = min(range(len(rest)), key=lambda i: used[rest[i][1]])
            chosen.append(rest.pop(pick))
            used[chosen[-1][1]] += 1
        made = [self._submission(rng, patient, enc, kind) for enc, kind in chosen]
        made.sort(key=lambda item: item[0])
        return [sub for _, sub in made]

    @cached_property
    def _doctors(self) -> dict[str, list[dict[str, Any]]]:
        """The city's PractitionerRoles by the id of their MO."""
        out: dict[str, list[dict[str, Any]]] = {}
        for role in self.city().roles:
            org = role["organization"]["reference"].removeprefix("Organization/")
            out.setdefault(org, []).append(role)
        return out

    def _submission(
        self,
        rng: random.Random,
        patient: dict[str, Any],
        enc: dict[str, Any],
        kind: documents.DocumentKind,
    ) -> tuple[datetime, list[dict[str, Any]]]:
        """One document of ``enc`` as an MHD submission: (its date, [List, DocumentReference,
        Binary])."""
        mo = _MOS_BY_OID[enc["serviceProvider"]["identifier"]["value"]]
        dx = clinical.DIAGNOSES_BY_CODE[enc["reasonCode"][0]["coding"][0]["code"]]
        start = datetime.fromisoformat(enc["period"]["start"])
        end = datetime.fromisoformat(enc["period"]["end"])
        born = date.fromisoformat(patient["birthDate"])
        name = patient["name"][0]["text"]
        referral_to = ""
        if kind is documents.REFERRAL:
            specialists = [m for m in MOS if m.kind in ("diagnostic-centre", "hospital")]
            referral_to = rng.choice(specialists).name
        doc = documents.record_document(
            rng,
            kind,
            dx,
            start,
            end,
            organization=mo.name,
            patient=f"{name}, {born:%d.%m.%Y} г. р.",
            child=self._age(born, start.date()) < 15,
            referral_to=referral_to,
        )
        doc_id, list_id, binary_id = _random_uuid(rng), _random_uuid(rng), _random_uuid(rng)
        if rng.random() < 0.5:
            content_type, suffix = "application/pdf", "pdf"
            body = documents.pdf_bytes(doc.text(), title=doc.title)
        else:
            content_type, suffix = "application/hl7-cda+xml", "xml"
            body = documents.cda_bytes(doc, document_id=doc_id, patient_name=name)
        radiology = kind is documents.IMAGING_REPORT
        roles = self._doctors.get(mo.id, [])
        fitting = [
            r for r in roles if (r["specialty"][0]["coding"][0]["code"] == "radiology") == radiology
        ]
        fitting = [
            r for r in fitting if r["specialty"][0]["coding"][0]["code"] in _GENERALISTS
        ] or fitting
        authors: list[dict[str, Any]] = []
        role = rng.choice(fitting or roles) if roles else None
        if role is not None:
            display = f"{role['practitioner']['display']}, {role['specialty'][0]['text'].lower()}"
            authors.append({"reference": f"PractitionerRole/{role['id']}", "display": display})
        authors.append({"reference": mo.reference, "display": mo.name})
        when = clinical.fhir_datetime(doc.date)
        patient_ref = f"Patient/{patient['id']}"
        docref: dict[str, Any] = {
            "resourceType": "DocumentReference",
            "id": doc_id,
            "masterIdentifier": {"system": DOCUMENT_IDS, "value": f"urn:uuid:{doc_id}"},
            "status": "current",
            "docStatus": "final",
            "type": {
                "coding": [{"system": _LOINC_SYSTEM, "code": kind.loinc, "display": kind.title}],
                "text": kind.title,
            },
            "category": [
                {
                    "coding": [
                        {
                            "system": _LOINC_SYSTEM,
                            "code": kind.category,
                            "display": kind.category_title,
                        }
                    ]
                }
            ],
            "subject": {"reference": patient_ref, "display": name},
            "date": when,
            "author": authors,
            "custodian": {"reference": mo.reference, "display": mo.name},
            "description": doc.title,
            "content": [
                {
                    "attachment": {
                        "contentType": content_type,
                        "language": "ru",
                        "url": f"Binary/{binary_id}",
                        "title": f"{kind.title}.{suffix}",
                        "creation": when,
                    }
                }
            ],
            "context": {
                "encounter": [{"reference": f"Encounter/{enc['id']}"}],
                "period": dict(enc["period"]),
            },
        }
        submission: dict[str, Any] = {
            "resourceType": "List",
            "id": list_id,
            "extension": [
                {"url": MHD_SOURCE_ID, "valueIdentifier": {"value": f"urn:oid:{mo.oid}"}}
            ],
            "identifier": [
                {"use": "usual", "system": DOCUMENT_IDS, "value": f"urn:uuid:{list_id}"}
            ],
            "status": "current",
            "mode": "working",
            "code": {"coding": [{"system": MHD_LIST_TYPES, "code": "submissionset"}]},
            "subject": {"reference": patient_ref},
            "date": when,
            "entry": [{"item": {"reference": f"DocumentReference/{doc_id}"}}],
        }
        if role is not None:
            submission["source"] = {"reference": f"PractitionerRole/{role['id']}"}
        binary = {
            "resourceType": "Binary",
            "id": binary_id,
            "contentType": content_type,
            "data": base64.b64encode(body).decode(),
        }
        return doc.date, [submission, docref, binary]


def _mo_of_patient(patient: dict[str, Any]) -> MoInfo | None:
    """The demo MO whose MRN ``patient`` carries, if any."""
    for ident in patient.get("identifier", []):
        for mo in MOS:
            if ident.get("system") == mo.mrn_system:
                return mo
    return None


def as_transaction(resources: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A transaction Bundle that PUTs each resource at ``Type/id`` (create-or-update)."""
    entries: list[dict[str, Any]] = []
    for res in resources:
        if "id" not in res:
            raise ValueError(f"as_transaction needs ids; a {res.get('resourceType')} has none")
        url = f"{res['resourceType']}/{res['id']}"
        entries.append({"resource": res, "request": {"method": "PUT", "url": url}})
    return {"resourceType": "Bundle", "type": "transaction", "entry": entries}


# --- record variants for MPI matching -----------------------------------------------------

_KEYBOARD_ROWS = ("йцукенгшщзхъ", "фывапролджэ", "ячсмитьбю")
_KEY_NEIGHBOURS: dict[str, str] = {}
for _row in _KEYBOARD_ROWS:
    for _i, _ch in enumerate(_row):
        _KEY_NEIGHBOURS[_ch] = _row[max(_i - 1, 0) : _i] + _row[_i + 1 : _i + 2]
# Letters clerks confuse by ear or by habit.
_PHONETIC: dict[str, str] = {
    "е": "эё",
    "ё": "е",
    "э": "е",
    "и": "ыйе",
    "ы": "и",
    "о": "а",
    "а": "о",
    "й": "и",
    "ь": "",
    "ъ": "ь",
    "ш": "щ",
    "щ": "ш",
    "ц": "с",
    "т": "д",
    "д": "т",
}

TypoKind = Literal["transpose", "delete", "duplicate", "keyboard", "phonetic"]
_TYPO_KINDS: tuple[TypoKind, ...] = ("transpose", "delete", "duplicate", "keyboard", "phonetic")


def _match_case(new: str, old: str) -> str:
    return new.upper() if old.isupper() else new


def _typo(word: str, kind: TypoKind, rng: random.Random) -> str | None:
    """``word`` with one typing error of ``kind`` (never in the first letter), or None."""
    n = len(word)
    if n < 3:
        return None
    if kind == "transpose":
        spots = [i for i in range(1, n - 1) if word[i].lower() != word[i + 1].lower()]
        if not spots:
            return None
        i = rng.choice(spots)
        return word[:i] + word[i + 1] + word[i] + word[i + 2 :]
    i = rng.randrange(1, n)
    if kind == "delete":
        return word[:i] + word[i + 1 :]
    if kind == "duplicate":
        return word[: i + 1] + word[i] + word[i + 1 :]
    table = _KEY_NEIGHBOURS if kind == "keyboard" else _PHONETIC
    spots = [j for j in range(1, n) if word[j].lower() in table]
    if not spots:
        return None
    i = rng.choice(spots)
    options = table[word[i].lower()]
    repl = rng.choice(options) if options else ""
    return word[:i] + _match_case(repl, word[i]) + word[i + 1 :]


def _name_text(name: dict[str, Any]) -> str:
    return " ".join([name.get("family", ""), *name.get("given", [])]).strip()


def typo_variant(patient: dict[str, Any], rng: random.Random) -> tuple[dict[str, Any], str]:
    """A copy of ``patient`` with one typing error in the family, given or patronymic name.

    Returns ``(variant, label)`` with a label like ``typo:family:transpose``. The input is not
    changed.
    """
    variant = copy.deepcopy(patient)
    name = variant["name"][0]
    fields: list[tuple[str, int | None]] = [("family", None)]
    fields += [("given", i) for i in range(len(name.get("given", [])))]
    for _ in range(100):
        field, index = rng.choices(fields, weights=[6, 3, 1][: len(fields)])[0]
        kind = rng.choice(_TYPO_KINDS)
        old = name[field] if index is None else name[field][index]
        new = _typo(old, kind, rng)
        if new is None or new == old:
            continue
        if index is None:
            name[field] = new
        else:
            name[field][index] = new
        name["text"] = _name_text(name)
        part = field if index is None else ("given" if index == 0 else "patronymic")
        return variant, f"typo:{part}:{kind}"
    raise ValueError("no typo applies to this patient's name")


def transliterate_variant(
    patient: dict[str, Any], scheme: names.TransliterationScheme = "icao"
) -> tuple[dict[str, Any], str]:
    """A copy of ``patient`` with its names in Latin letters (ICAO 9303 by default).

    Returns ``(variant, "translit:icao")``; Иванова → Ivanova, Щукин → Shchukin.
    """
    variant = copy.deepcopy(patient)
    for name in variant.get("name", []):
        if "family" in name:
            name["family"] = names.transliterate(name["family"], scheme)
        if "given" in name:
            name["given"] = [names.transliterate(g, scheme) for g in name["given"]]
        if "text" in name:
            name["text"] = names.transliterate(name["text"], scheme)
    return variant, f"translit:{scheme}"


def swap_day_month(patient: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """A copy of ``patient`` with day and month of birth swapped (a classic entry error).

    Returns ``(variant, "dob:swap-day-month")``, or the unchanged copy labelled
    ``dob:unchanged`` where the swap gives no different valid date (day > 12 or day = month).
    """
    variant = copy.deepcopy(patient)
    born = date.fromisoformat(variant["birthDate"])
    if born.day > 12 or born.day == born.month:
        return variant, "dob:unchanged"
    variant["birthDate"] = born.replace(month=born.day, day=born.month).isoformat()
    return variant, "dob:swap-day-month"
