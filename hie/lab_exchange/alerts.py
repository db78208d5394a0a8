"""Critical-result alerts: detection, the alert itself, and its escalation.

**Detection** (:func:`critical_findings`, pure). A result is critical when

- the lab says so: an Observation ``interpretation`` of HH, LL or AA (HL7 v2 table 0078 = v3
  ObservationInterpretation "critical high / low / abnormal", OBX-8), or a local coding or text
  that names a critical or panic value; or
- a rule of the reference data says so: an ``ObservationDefinition`` for the result's code with a
  ``qualifiedInterval`` of category ``critical`` (FHIR R4 §ObservationDefinition: the *range* of
  critical values, bounds inclusive as every FHIR Range) that holds the value, compared in the
  definition's unit (``quantitativeDetails.unit``). A value in another unit is converted by UCUM
  where the conversion is a pure scale (g/dL → g/L, 10*3/uL → 10*9/L), else through the
  definition's ``customaryUnit`` and ``conversionFactor`` (glucose mg/dL → mmol/L). A value that
  cannot be converted, an interval that depends on what the hub cannot judge (``appliesTo``,
  ``condition``, ``gestationalAge``), and a missing value raise nothing: a guessed alert is noise.

The hub ships adult limits (``data/critical_limits.json``, loaded by :func:`load_builtin_limits`);
operators change them as ordinary ObservationDefinition resources, and :class:`CriticalRules`
picks every change up (keyed on the store's change marker).

**The alert** (:class:`CriticalResultAlerts`, an outbox consumer, so never in the path of a
sender's acknowledgement). For a critical DiagnosticReport it writes, in one transaction:

- a ``Communication`` (category ``alert``, priority ``stat``, ``about`` the report and the Task,
  payload in Russian then English naming the test, value, unit and flag) to the ordering
  practitioner(-role) and their MO. Its status is ``in-progress`` (FHIR R4 EventStatus: the
  notification is under way) until receipt is confirmed — by the Task's acknowledgement today,
  by a push channel's delivery later — when it becomes ``completed`` with ``received``;
- a ``Task`` ``acknowledge-critical-result`` (intent ``order``, status ``requested``, priority
  ``stat``, ``focus`` the report, ``owner`` the ordering practitioner(-role), else their MO,
  else the hub's duty operator, due at ``restriction.period.end``), whose ``note`` and version
  history record every step.

Both are the ordering MO's records (``owner`` in the store), so its clinicians see them and its
MIS may acknowledge. Their ids are uuid5 of the report and its critical findings, so a
re-delivered event or a re-sent report writes nothing. A corrected report whose critical
findings differ (another value, another test, a finding gone) raises a new alert and cancels the
old one if it is still open, with a note; a report corrected to no critical findings, cancelled
or deleted cancels it too. A report issued more than ``max_age_hours`` (48) ago raises nothing
(counted): a backfill of an MO's archive or the demo city must not page anyone.

Delivery is the recipient's inbox, ``Task?owner=…&status=requested`` and
``Communication?recipient=…&status=in-progress``; every write goes through the outbox, so a push
channel subscribes to Communication events of category ``alert``.

**Escalation** (:class:`AlertEscalator`). An alert not acknowledged (status still ``requested``
or ``received``) by its due time, or ``rejected`` by its owner, passes to the MO's duty role (an
active PractitionerRole of the MO coded ``duty-officer``), then to the hub's duty operator
(``HIE_ALERT_HUB_OPERATOR``, else an active ``duty-officer`` PractitionerRole of no
organisation). Acknowledging is updating the Task to ``accepted``, ``in-progress`` or
``completed``.

Metrics: ``hie_lab_alerts_total{reason}``, ``hie_lab_alert_escalations_total{level}``,
``hie_lab_alerts_acknowledged_total{level}``, ``hie_lab_alerts_skipped_total{reason}``,
``hie_lab_alerts_open{level}``.
"""

from __future__ import annotations

import math
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta, timezone
from importlib import resources as importlib_resources
from typing import Any, Final, Literal

import orjson
from prometheus_client import Counter, Gauge

from hie.fhir import model
from hie.fhir.dates import format_instant, parse_range
from hie.fhir.search import escape_value, parse_search
from hie.fhir.service import FhirService
from hie.hub.logging import get_logger
from hie.hub.outbox import Poller
from hie.hub.settings import Settings
from hie.hub.store.port import OutboxEvent, ResourceStore, StoredResource, WriteTx, iter_search
from hie.hub.store.sql import now_us

log = get_logger("hie.lab.alerts")

Json = dict[str, Any]

INTERPRETATION_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
V2_ABNORMAL_FLAGS: Final = "http://terminology.hl7.org/CodeSystem/v2-0078"
UCUM: Final = "http://unitsofmeasure.org"
COMMUNICATION_CATEGORY: Final = "http://terminology.hl7.org/CodeSystem/communication-category"
TASK_CODE_SYSTEM: Final = "https://hie.spb.ru/fhir/CodeSystem/task-code"
ACKNOWLEDGE: Final = "acknowledge-critical-result"
ROLE_SYSTEM: Final = "https://hie.spb.ru/fhir/CodeSystem/practitioner-role"
DUTY_OFFICER: Final = "duty-officer"
# The alert's stage (Task.businessStatus) and the kinds of Task.input it carries.
ALERT_STATUS_SYSTEM: Final = "https://hie.spb.ru/fhir/CodeSystem/lab-alert-status"
ALERT_INPUT_SYSTEM: Final = "https://hie.spb.ru/fhir/CodeSystem/lab-alert-input"
ALERT_ID_SYSTEM: Final = "https://hie.spb.ru/fhir/sid/lab-alert"
ALERT_NAMESPACE: Final = uuid.uuid5(uuid.NAMESPACE_URL, "https://hie.spb.ru/fhir/lab-alerts")

# OBX-8 / v3 ObservationInterpretation codes that mean "call the clinician now".
CRITICAL_FLAGS: Final = frozenset({"HH", "LL", "AA"})
_FLAG_SYSTEMS: Final = frozenset({INTERPRETATION_SYSTEM, V2_ABNORMAL_FLAGS})
# Words a lab uses for a critical value in a local coding or in the interpretation's text.
_CRITICAL_WORDS: Final = re.compile(r"critical|panic|критич|пани[кч]|жизнеугрож", re.IGNORECASE)
_NOT_CRITICAL: Final = re.compile(
    r"\b(?:non|not|no)[\s-]*(?:critical|panic)|\bне\s*критич|некритич", re.IGNORECASE
)
_NOT_A_RESULT: Final = frozenset({"cancelled", "entered-in-error"})
# Task statuses (FHIR R4 task-status) for which the alert still waits for someone.
WAITING: Final = ("requested", "received")
ESCALATE_NOW: Final = ("rejected",)  # the owner declined it: the next level, at once
ACKNOWLEDGED: Final = frozenset({"accepted", "in-progress", "completed"})
CLOSED: Final = frozenset({"cancelled", "failed", "entered-in-error"})

Level = Literal["practitioner", "mo", "mo-duty", "hub"]
_STAGE_DISPLAY: Final = {
    "notified": "Ожидает подтверждения / awaiting acknowledgement",
    "escalated-mo": "Передано дежурному МО / escalated to the MO's duty officer",
    "escalated-hub": "Передано дежурному оператору РМИС / escalated to the hub's duty operator",
    "superseded": "Заменено оповещением по исправленному отчёту / superseded by a corrected report",
    "withdrawn": "Отозвано: критических результатов больше нет / withdrawn: no critical result",
}
_FLAG_WORDS: Final = {
    "HH": ("критически высокое", "critically high"),
    "LL": ("критически низкое", "critically low"),
    "AA": ("критическое отклонение", "critically abnormal"),
}
_HUB_AUTHOR: Final = "РМИС (концентратор) / HIE hub"
# Moscow has kept UTC+3 all year since 2014; times shown to people are Moscow time.
MSK: Final = timezone(timedelta(hours=3), "MSK")

ALERTS = Counter("hie_lab_alerts_total", "Critical-result alerts raised", ["reason"])
ESCALATIONS = Counter(
    "hie_lab_alert_escalations_total", "Critical-result alerts escalated", ["level"]
)
ACKNOWLEDGEMENTS = Counter(
    "hie_lab_alerts_acknowledged_total",
    "Critical-result alerts acknowledged, by the level that held them",
    ["level"],
)
SKIPPED = Counter(
    "hie_lab_alerts_skipped_total",
    "Critical reports that raised no alert: issued too long ago (a backfill, a replay)",
    ["reason"],
)
OPEN = Gauge(
    "hie_lab_alerts_open",
    "Unacknowledged critical-result alerts (escalator's last pass)",
    ["level"],
)


# --- units (UCUM, the few forms lab results use) ------------------------------------------------

_PREFIXES: Final = {
    "k": 1e3,
    "d": 1e-1,
    "c": 1e-2,
    "m": 1e-3,
    "u": 1e-6,
    "n": 1e-9,
    "p": 1e-12,
    "f": 1e-15,
}
_ATOMS: Final = {"g": "g", "mol": "mol", "eq": "eq", "l": "l", "[iu]": "iu", "iu": "iu", "u": "u"}
# Unit text as Russian labs write it (the ORU mapping keeps the text when it cannot code it).
_RU_TERMS: Final = {
    "л": "l",
    "дл": "dl",
    "мл": "ml",
    "мкл": "ul",
    "нл": "nl",
    "моль": "mol",
    "ммоль": "mmol",
    "мкмоль": "umol",
    "нмоль": "nmol",
    "г": "g",
    "мг": "mg",
    "мкг": "ug",
    "нг": "ng",
    "мэкв": "meq",
    "ед": "u",
    "ме": "iu",
}
_SUPERSCRIPTS: Final = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹⁻", "0123456789-")
_SUPERSCRIPT_POWER: Final = re.compile("10([⁻⁰¹²³⁴⁵⁶⁷⁸⁹]+)")  # 10⁹ as Russian labs print it
_POWER: Final = re.compile(r"^(?:[x×*]\s*)?10\s*[*^]\s*(-?\d+)$")


@dataclass(frozen=True, slots=True)
class Unit:
    """A unit as a scale of base units: ``factor`` × the product of ``dims`` (atom → power)."""

    factor: float
    dims: frozenset[tuple[str, int]]


def _term(text: str) -> tuple[float, dict[str, int]] | None:
    text = _RU_TERMS.get(text, text)
    if text in ("", "1"):
        return 1.0, {}
    m = _POWER.match(text)
    if m:
        return 10.0 ** int(m[1]), {}
    if text in _ATOMS:
        return 1.0, {_ATOMS[text]: 1}
    for prefix, scale in _PREFIXES.items():
        if text.startswith(prefix) and text[len(prefix) :] in _ATOMS:
            return scale, {_ATOMS[text[len(prefix) :]]: 1}
    return None


def parse_unit(code: str | None) -> Unit | None:
    """A UCUM unit code (or a lab's usual spelling of one) as a :class:`Unit`; None when it is
    not one of the simple forms ``[10*n][prefix]atom[/[10*n][prefix]atom]`` used for lab
    concentrations and counts, ``%``, or a dimensionless annotation such as ``{INR}``."""
    if code is None:
        return None
    text = _SUPERSCRIPT_POWER.sub(lambda m: "10^" + m[1].translate(_SUPERSCRIPTS), code)
    text = re.sub(r"\{[^}]*\}", "", text).strip()
    text = text.replace("µ", "u").replace("μ", "u").lower().replace(" ", "")
    if text == "%":
        return Unit(0.01, frozenset())
    parts = text.split("/")
    if len(parts) > 2:
        return None
    num = _term(parts[0])
    den = _term(parts[1]) if len(parts) == 2 else (1.0, {})
    if num is None or den is None:
        return None
    dims = dict(num[1])
    for atom, power in den[1].items():
        dims[atom] = dims.get(atom, 0) - power
    return Unit(num[0] / den[0], frozenset((a, p) for a, p in dims.items() if p))


def convert(value: float, from_unit: str | None, to_unit: str | None) -> float | None:
    """``value`` in ``from_unit`` expressed in ``to_unit``, when the two differ by a scale only."""
    a, b = parse_unit(from_unit), parse_unit(to_unit)
    if a is None or b is None or a.dims != b.dims:
        return None
    return value * a.factor / b.factor


# --- rules from the reference data --------------------------------------------------------------

_AGE_YEARS: Final = {"a": 1.0, "mo": 1 / 12, "wk": 7 / 365.25, "d": 1 / 365.25}


@dataclass(frozen=True, slots=True)
class CriticalRule:
    """One ``qualifiedInterval`` of category ``critical`` of an ObservationDefinition: the
    values in [``low``, ``high``] (either may be open) are critical, in ``unit``."""

    definition: str  # ObservationDefinition id
    codes: frozenset[tuple[str, str]]
    unit: str | None  # UCUM code of the limits
    low: float | None
    high: float | None
    customary_unit: str | None = None
    conversion_factor: float | None = None  # SI value × factor = customary value
    gender: str | None = None
    age_low: float | None = None  # years
    age_high: float | None = None

    @property
    def flag(self) -> str:
        """The flag a value in this interval earns: HH above a floor, LL below a ceiling."""
        if self.low is not None and self.high is None:
            return "HH"
        if self.high is not None and self.low is None:
            return "LL"
        return "AA"

    def limit_text(self) -> str:
        """The interval as people read it: ``≥ 6.2 mmol/L``, ``≤ 2.8 mmol/L``, ``4–5 …``."""
        unit = f" {self.unit}" if self.unit and not self.unit.startswith("{") else ""
        if self.low is not None and self.high is None:
            return f"≥ {_num(self.low)}{unit}"
        if self.high is not None and self.low is None:
            return f"≤ {_num(self.high)}{unit}"
        return f"{_num(self.low or 0)}–{_num(self.high or 0)}{unit}"

    def in_rule_unit(self, value: float, unit: str | None) -> float | None:
        """``value`` (in ``unit``) in the rule's unit, or None if it cannot be converted."""
        if self.unit is None or _same_unit(unit, self.unit):
            return value
        if unit is None or not unit.strip():
            # a ratio such as INR is often sent without a unit; a concentration never is
            rule_unit = parse_unit(self.unit)
            return value if rule_unit is not None and not rule_unit.dims else None
        direct = convert(value, unit, self.unit)
        if direct is not None:
            return direct
        if self.customary_unit and self.conversion_factor:
            customary = (
                value
                if _same_unit(unit, self.customary_unit)
                else convert(value, unit, self.customary_unit)
            )
            if customary is not None:
                return customary / self.conversion_factor
        return None

    def holds(self, value: float, comparator: str | None) -> bool:
        """Whether every value the result can stand for lies in the interval (``<3`` is
        critical for ``≤ 3.5``, never for ``≥ 6``)."""
        lo_ok = self.low is None or (value >= self.low and comparator not in ("<", "<="))
        hi_ok = self.high is None or (value <= self.high and comparator not in (">", ">="))
        return lo_ok and hi_ok

    def applies(self, patient: Json | None, at: date) -> bool:
        """Whether the interval is meant for this patient (gender, age on the day)."""
        if self.gender is not None:
            if patient is None or patient.get("gender") != self.gender:
                return False
        if self.age_low is not None or self.age_high is not None:
            born = _birth_date(patient)
            if born is None:
                return False
            age = (at - born).days / 365.25
            if self.age_low is not None and age < self.age_low:
                return False
            if self.age_high is not None and age > self.age_high:
                return False
        return True


def _same_unit(a: str | None, b: str | None) -> bool:
    return a is not None and b is not None and a.strip().lower() == b.strip().lower()


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _birth_date(patient: Json | None) -> date | None:
    raw = (patient or {}).get("birthDate")
    if not isinstance(raw, str):
        return None
    try:
        return date.fromisoformat(raw[:10]) if len(raw) >= 10 else None
    except ValueError:
        return None


def _quantity_value(q: Any) -> tuple[float, str | None] | None:
    if not isinstance(q, dict):
        return None
    value = q.get("value")
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    unit = q.get("code") if q.get("system") in (None, UCUM) and q.get("code") else None
    return float(value), unit or q.get("unit")


def _codings(concept: Any) -> Iterator[tuple[str, str]]:
    """``(system, code)`` of each coding of a CodeableConcept (system '' when it has none)."""
    if not isinstance(concept, dict):
        return
    for c in concept.get("coding") or []:
        if isinstance(c, dict) and isinstance(c.get("code"), str):
            yield str(c.get("system") or ""), c["code"]


def _rules_of(res: Json) -> list[CriticalRule]:
    """The critical intervals of one ObservationDefinition (malformed parts are skipped)."""
    codes = frozenset(_codings(res.get("code")))
    if not codes or not isinstance(res.get("id"), str):
        return []
    details = res.get("quantitativeDetails") or {}
    unit = next((c for s, c in _codings(details.get("unit")) if s in (UCUM, "")), None)
    customary = next(
        (c for s, c in _codings(details.get("customaryUnit")) if s in (UCUM, "")), None
    )
    factor = details.get("conversionFactor")
    factor = float(factor) if isinstance(factor, int | float) and factor > 0 else None
    out = []
    for qi in res.get("qualifiedInterval") or []:
        if not isinstance(qi, dict) or qi.get("category") != "critical":
            continue
        if qi.get("appliesTo") or qi.get("condition") or qi.get("gestationalAge"):
            continue  # a population the hub cannot tell from the record
        rng = qi.get("range") or {}
        low, high = _bound(rng.get("low"), unit), _bound(rng.get("high"), unit)
        if low is None and high is None:
            continue
        age = qi.get("age") or {}
        out.append(
            CriticalRule(
                definition=res["id"],
                codes=codes,
                unit=unit,
                low=low,
                high=high,
                customary_unit=customary,
                conversion_factor=factor,
                gender=qi.get("gender") if isinstance(qi.get("gender"), str) else None,
                age_low=_age(age.get("low")),
                age_high=_age(age.get("high")),
            )
        )
    return out


def _bound(q: Any, unit: str | None) -> float | None:
    """A Range bound in the definition's unit (a bound written in another unit is converted)."""
    found = _quantity_value(q)
    if found is None:
        return None
    value, its_unit = found
    if its_unit is None or unit is None or _same_unit(its_unit, unit):
        return value
    return convert(value, its_unit, unit)


def _age(q: Any) -> float | None:
    found = _quantity_value(q)
    if found is None:
        return None
    return found[0] * _AGE_YEARS.get(str(found[1] or "a"), 1.0)


@dataclass(frozen=True, slots=True)
class RuleSet:
    """Critical intervals by result code (``(system, code)``)."""

    by_code: dict[tuple[str, str], tuple[CriticalRule, ...]] = field(default_factory=dict)

    @classmethod
    def from_definitions(cls, definitions: Iterable[Json]) -> RuleSet:
        """The rules of these ObservationDefinition resources."""
        by_code: dict[tuple[str, str], list[CriticalRule]] = {}
        for res in definitions:
            if isinstance(res, dict) and res.get("resourceType") == "ObservationDefinition":
                for rule in _rules_of(res):
                    for code in rule.codes:
                        by_code.setdefault(code, []).append(rule)
        return cls({k: tuple(v) for k, v in by_code.items()})

    def __len__(self) -> int:
        return len({r.definition for rules in self.by_code.values() for r in rules})

    @property
    def needs_patient(self) -> bool:
        """Whether some interval depends on the patient's gender or age."""
        return any(
            r.gender is not None or r.age_low is not None or r.age_high is not None
            for rules in self.by_code.values()
            for r in rules
        )

    def for_code(self, concept: Any) -> list[CriticalRule]:
        """The rules for any coding of ``concept`` (each once)."""
        seen: dict[CriticalRule, None] = {}
        for code in _codings(concept):
            for rule in self.by_code.get(code, ()):
                seen[rule] = None
        return list(seen)


NO_RULES: Final = RuleSet()


class CriticalRules:
    """The rules in a store, re-read when any ObservationDefinition changes."""

    def __init__(self, store: ResourceStore) -> None:
        self.store = store
        self._lock = threading.Lock()
        self._marker: tuple[int, int] | None = None
        self._rules = NO_RULES

    def current(self) -> RuleSet:
        """The rules as the store holds them now."""
        marker = self.store.change_marker("ObservationDefinition")
        with self._lock:
            if marker != self._marker:
                defs = (
                    orjson.loads(r.content)
                    for r in self.store.iter_current("ObservationDefinition")
                    if r.content
                )
                self._rules = RuleSet.from_definitions(defs)
                self._marker = marker
                log.info("lab.alert_rules_loaded", definitions=len(self._rules))
            return self._rules


# --- detection -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Finding:
    """One critical result."""

    observation: str | None  # "Observation/<id>"
    code: tuple[str, str] | None  # the result's first coding
    name_ru: str
    name_en: str
    value: float | None
    unit: str  # as the lab wrote it (display)
    flag: str  # HH | LL | AA
    reason: Literal["flag", "rule"]
    rule: str | None = None  # ObservationDefinition id
    limit: str | None = None  # the rule's interval, for people

    @property
    def key(self) -> str:
        """What makes this finding the same one when a report is sent again."""
        code = "|".join(self.code) if self.code else self.name_en
        value = "" if self.value is None else repr(self.value)
        return f"{code}|{value}|{self.unit}|{self.flag}"

    def text_ru(self) -> str:
        """``Калий 7.1 ммоль/л — критически высокое (HH)`` (and the rule's limit)."""
        value = "" if self.value is None else f" {_num(self.value)}"
        unit = f" {self.unit}" if self.unit and self.value is not None else ""
        why = f"; порог {self.limit}" if self.limit else ""
        return f"{self.name_ru}{value}{unit} — {_FLAG_WORDS[self.flag][0]} ({self.flag}{why})"

    def text_en(self) -> str:
        """``Potassium 7.1 mmol/L — critically high (HH)`` (and the rule's limit)."""
        value = "" if self.value is None else f" {_num(self.value)}"
        unit = f" {self.unit}" if self.unit and self.value is not None else ""
        why = f"; limit {self.limit}" if self.limit else ""
        return f"{self.name_en}{value}{unit} — {_FLAG_WORDS[self.flag][1]} ({self.flag}{why})"


def critical_flag(interpretation: Any) -> str | None:
    """HH, LL or AA if the interpretation marks a critical value (OBX-8 → interpretation):
    the table 0078 / v3 codes, or a local coding's display or the text naming a critical or
    panic value (AA when the words say no direction)."""
    for concept in interpretation if isinstance(interpretation, list) else []:
        if not isinstance(concept, dict):
            continue
        texts = [concept.get("text")]
        for c in concept.get("coding") or []:
            if not isinstance(c, dict):
                continue
            code, system = str(c.get("code") or "").upper(), c.get("system")
            if code in CRITICAL_FLAGS and (system in _FLAG_SYSTEMS or not system):
                return code
            if system not in _FLAG_SYSTEMS:
                texts.append(c.get("display"))
        for text in texts:
            if isinstance(text, str) and _CRITICAL_WORDS.search(text):
                if not _NOT_CRITICAL.search(text):
                    return _direction(text)
    return None


def _direction(text: str) -> str:
    low = text.lower()
    if any(w in low for w in ("low", "низк", "пониж")):
        return "LL"
    if any(w in low for w in ("high", "высок", "повыш")):
        return "HH"
    return "AA"


def _names(concept: Any) -> tuple[str, str]:
    """The test's name in Russian (the lab's text first) and in English (a display first)."""
    concept = concept if isinstance(concept, dict) else {}
    text = concept.get("text") if isinstance(concept.get("text"), str) else None
    display = next(
        (
            c["display"]
            for c in concept.get("coding") or []
            if isinstance(c, dict) and isinstance(c.get("display"), str)
        ),
        None,
    )
    code = next((c for _, c in _codings(concept)), "?")
    return text or display or code, display or text or code


def _at(obs: Json, report: Json) -> date:
    for node in (obs, report):
        for key in ("effectiveDateTime", "issued"):
            rng = parse_range(node[key]) if isinstance(node.get(key), str) else None
            if rng is not None:
                return datetime.fromtimestamp(rng[0] / 1e6, UTC).date()
    return datetime.now(UTC).date()


def _finding(
    node: Json,
    ref: str | None,
    rules: RuleSet,
    patient: Json | None,
    at: date,
) -> Finding | None:
    """The finding of an Observation or one of its components, if it is critical."""
    code = next(_codings(node.get("code")), None)
    name_ru, name_en = _names(node.get("code"))
    found = _quantity_value(node.get("valueQuantity"))
    value, unit = (found[0], found[1] or "") if found else (None, "")
    display_unit = str((node.get("valueQuantity") or {}).get("unit") or unit) if found else ""
    flag = critical_flag(node.get("interpretation"))
    if flag is not None:
        return Finding(ref, code, name_ru, name_en, value, display_unit, flag, "flag")
    if found is None:
        return None
    comparator = (node.get("valueQuantity") or {}).get("comparator")
    for rule in rules.for_code(node.get("code")):
        if not rule.applies(patient, at):
            continue
        converted = rule.in_rule_unit(found[0], found[1])
        if converted is not None and rule.holds(converted, comparator):
            return Finding(
                ref,
                code,
                name_ru,
                name_en,
                value,
                display_unit,
                rule.flag,
                "rule",
                rule.definition,
                rule.limit_text(),
            )
    return None


def critical_findings(
    report: Json,
    observations: Sequence[Json],
    rules: RuleSet = NO_RULES,
    *,
    patient: Json | None = None,
) -> list[Finding]:
    """The critical results of a DiagnosticReport (pure).

    ``observations`` are its results (and their members), in any order; they are reported in
    the order of ``report.result``. A report or result that is cancelled or entered in error
    has none. ``patient`` is needed only for intervals limited by gender or age."""
    if report.get("status") in _NOT_A_RESULT:
        return []
    order = {r: i for i, r in enumerate(_refs(report.get("result")))}
    ranked = sorted(
        observations,
        key=lambda o: order.get(f"Observation/{o.get('id')}", len(order)),
    )
    out: list[Finding] = []
    for obs in ranked:
        if obs.get("resourceType") != "Observation" or obs.get("status") in _NOT_A_RESULT:
            continue
        ref = f"Observation/{obs['id']}" if isinstance(obs.get("id"), str) else None
        at = _at(obs, report)
        found = _finding(obs, ref, rules, patient, at)
        if found is not None:
            out.append(found)
        for comp in obs.get("component") or []:
            if isinstance(comp, dict):
                found = _finding(comp, ref, rules, patient, at)
                if found is not None:
                    out.append(found)
    return out


def alert_id(report_id: str, findings: Sequence[Finding]) -> str:
    """The alert's Task id: the same report with the same critical findings, the same id."""
    keys = "\n".join(sorted(f.key for f in findings))
    return str(uuid.uuid5(ALERT_NAMESPACE, f"DiagnosticReport/{report_id}\n{keys}"))


# --- the builtin limits --------------------------------------------------------------------


def builtin_limits() -> list[Json]:
    """The critical limits the hub ships (``data/critical_limits.json``): adult values from
    published lists (each definition's narrative names its source)."""
    data = importlib_resources.files("hie.lab_exchange") / "data" / "critical_limits.json"
    bundle = orjson.loads(data.read_bytes())
    return [e["resource"] for e in bundle.get("entry") or []]


@dataclass(slots=True)
class LimitsReport:
    """What :func:`load_builtin_limits` did, as ``ObservationDefinition/<id>`` labels."""

    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)  # changed or deleted by an operator


def load_builtin_limits(svc: FhirService, *, replace: bool = False) -> LimitsReport:
    """Store the builtin critical limits (idempotent, by id, in one transaction).

    A definition an operator has changed or deleted is left as they made it unless
    ``replace`` is given (then every builtin one is PUT back): the operators' limits win over
    the shipped ones."""
    report = LimitsReport()
    resources = builtin_limits()
    for res in resources:
        model.validate(dict(res))
    when = now_us()
    with svc.store.transaction() as tx:
        for original in resources:
            res = dict(original)
            rid = str(res["id"])
            label = f"ObservationDefinition/{rid}"
            cur = tx.current("ObservationDefinition", rid)
            if cur is not None and cur.content is not None and _same(cur.content, res):
                report.unchanged.append(label)
                continue
            if cur is not None and not replace:
                report.kept.append(label)
                continue
            svc.write_internal(tx, res, "ObservationDefinition", rid, when)
            (report.updated if cur is not None else report.created).append(label)
    return report


def _same(content: bytes, res: Json) -> bool:
    stored = orjson.loads(content)
    strip = ("meta", "id")
    return {k: v for k, v in stored.items() if k not in strip} == {
        k: v for k, v in res.items() if k not in strip
    }


# --- who gets the alert --------------------------------------------------------------------


def _ref(node: Any) -> str | None:
    """``Type/id`` of a Reference (a full URL or a versioned reference cut down to it)."""
    raw = node.get("reference") if isinstance(node, dict) else None
    if not isinstance(raw, str) or raw.startswith(("#", "urn:")):
        return None
    parts = raw.split("/_history/", 1)[0].rstrip("/").split("/")
    if len(parts) < 2 or not parts[-2][:1].isupper() or not parts[-1]:
        return None
    return f"{parts[-2]}/{parts[-1]}"


def _refs(nodes: Any) -> list[str]:
    return [r for n in (nodes if isinstance(nodes, list) else []) if (r := _ref(n))]


def _split(ref: str) -> tuple[str, str]:
    rtype, _, rid = ref.partition("/")
    return rtype, rid


@dataclass(frozen=True, slots=True)
class Routing:
    """Where an alert goes: the order, who placed it, their MO, and the lab."""

    order: str | None = None
    practitioner_role: str | None = None
    practitioner: str | None = None
    organization: str | None = None  # the ordering MO
    lab: str | None = None
    why_no_mo: tuple[str, str] | None = None  # (ru, en) when the MO is unknown

    @property
    def owner(self) -> str | None:
        """The first owner: the ordering practitioner(-role), else the MO."""
        return self.practitioner_role or self.practitioner or self.organization

    @property
    def mo_id(self) -> str | None:
        """The ordering MO's Organization id."""
        return _split(self.organization)[1] if self.organization else None


class Directory:
    """Lookups in the practitioner and organisation registries (no principal needed)."""

    def __init__(self, store: ResourceStore, settings: Settings) -> None:
        self.store = store
        self.settings = settings

    def read(self, ref: str | None) -> Json | None:
        """The current resource behind ``Type/id``, or None."""
        if not ref:
            return None
        stored = self.store.read(*_split(ref))
        if stored is None or stored.deleted or not stored.content:
            return None
        return orjson.loads(stored.content)  # type: ignore[no-any-return]

    def search(self, rtype: str, items: list[tuple[str, str]], count: int = 20) -> list[Json]:
        """Current resources matching FHIR search ``items``."""
        q = parse_search(rtype, items, default_count=count, max_count=count).query
        return [orjson.loads(r.content) for r in self.store.search(q).items if r.content]

    def by_identifier(self, rtype: str, ident: Any) -> str | None:
        """``Type/id`` of the one resource with this identifier (a logical reference)."""
        if not isinstance(ident, dict) or not ident.get("value"):
            return None
        system = escape_value(str(ident.get("system") or ""))
        token = f"{system}|{escape_value(str(ident['value']))}" if system else ident["value"]
        found = self.search(rtype, [("identifier", token)], 2)
        return f"{rtype}/{found[0]['id']}" if len(found) == 1 else None

    def resolve(self, node: Any, rtype: str) -> str | None:
        """A Reference to ``rtype`` by its ``reference`` or (logical) ``identifier``."""
        ref = _ref(node)
        if ref is not None:
            return ref if ref.startswith(f"{rtype}/") else None
        if isinstance(node, dict) and node.get("type") in (None, rtype):
            return self.by_identifier(rtype, node.get("identifier"))
        return None

    def route(self, report: Json) -> Routing:
        """Who ordered the report's test and at which MO (see the module docstring)."""
        lab = next(
            (r for r in _refs(report.get("performer")) if r.startswith("Organization/")), None
        )
        order_ref = next(
            (o for n in report.get("basedOn") or [] if (o := self.resolve(n, "ServiceRequest"))),
            None,
        )
        order = self.read(order_ref)
        if order is None:
            return Routing(
                lab=lab,
                why_no_mo=(
                    "у отчёта нет известного направления (ServiceRequest), врач и МО не известны",
                    "the report names no known order (ServiceRequest): no ordering practitioner "
                    "or MO",
                ),
            )
        requester = order.get("requester")
        req = _ref(requester)
        if req is None and isinstance(requester, dict):
            req = self.resolve(requester, str(requester.get("type") or "Practitioner"))
        rtype = _split(req)[0] if req else ""
        if rtype == "PractitionerRole":
            role = self.read(req) or {}
            org = next(iter(_refs([role.get("organization")])), None)
            prac = next(iter(_refs([role.get("practitioner")])), None)
            return Routing(
                order_ref,
                req,
                prac,
                org,
                lab,
                None
                if org
                else (
                    "роль врача не указывает МО",
                    "the ordering PractitionerRole names no organization",
                ),
            )
        if rtype == "Practitioner":
            assert req is not None
            orgs = self._organizations_of(req)
            if len(orgs) == 1:
                return Routing(order_ref, None, req, orgs[0], lab)
            why = (
                (
                    f"у врача {len(orgs)} действующих ролей в разных МО",
                    f"the ordering practitioner has active roles at {len(orgs)} organizations",
                )
                if orgs
                else (
                    "у врача нет действующей роли в МО",
                    "the ordering practitioner has no active PractitionerRole",
                )
            )
            return Routing(order_ref, None, req, None, lab, why)
        if rtype == "Organization":
            return Routing(order_ref, None, None, req, lab)
        return Routing(
            order_ref,
            lab=lab,
            why_no_mo=(
                "в направлении не указан известный врач или МО",
                "the order's requester is not a known practitioner or organization",
            ),
        )

    def _organizations_of(self, practitioner: str) -> list[str]:
        roles = self.search(
            "PractitionerRole", [("practitioner", practitioner), ("active", "true")]
        )
        return list(dict.fromkeys(r for role in roles for r in _refs([role.get("organization")])))

    def mo_duty_role(self, organization: str, now: float) -> str | None:
        """The MO's duty officer: an active PractitionerRole of it coded ``duty-officer``."""
        roles = self.search(
            "PractitionerRole",
            [
                ("organization", organization),
                ("role", f"{ROLE_SYSTEM}|{DUTY_OFFICER}"),
                ("active", "true"),
                ("_sort", "_id"),
            ],
        )
        current = [r for r in roles if _in_period(r.get("period"), now)]
        return f"PractitionerRole/{current[0]['id']}" if current else None

    def hub_operator(self, now: float) -> str | None:
        """The hub's duty operator: ``HIE_ALERT_HUB_OPERATOR``, else an active duty-officer
        PractitionerRole of no organisation."""
        configured = self.settings.alert_hub_operator.strip()
        if configured:
            return _ref({"reference": configured}) or configured
        roles = self.search(
            "PractitionerRole",
            [
                ("role", f"{ROLE_SYSTEM}|{DUTY_OFFICER}"),
                ("active", "true"),
                ("organization:missing", "true"),
                ("_sort", "_id"),
            ],
        )
        current = [r for r in roles if _in_period(r.get("period"), now)]
        return f"PractitionerRole/{current[0]['id']}" if current else None

    def label(self, ref: str | None) -> str:
        """A person's or organisation's name for notes and ``display`` (never a patient's)."""
        res = self.read(ref)
        if res is None:
            return ref or "—"
        rtype = res.get("resourceType")
        if rtype == "PractitionerRole":
            who = self.label(_ref(res.get("practitioner"))) if res.get("practitioner") else ""
            where = self.label(_ref(res.get("organization"))) if res.get("organization") else ""
            role = next((t for c in res.get("code") or [] if (t := _text(c))), "")
            return ", ".join(p for p in (who, role, where) if p) or str(ref)
        if rtype == "Practitioner":
            return _person_name(res.get("name")) or str(ref)
        if isinstance(res.get("name"), str):
            return str(res["name"])
        return str(ref)


def _text(concept: Any) -> str:
    if not isinstance(concept, dict):
        return ""
    if isinstance(concept.get("text"), str):
        return str(concept["text"])
    for c in concept.get("coding") or []:
        if isinstance(c, dict) and isinstance(c.get("display"), str):
            return str(c["display"])
    return ""


def _person_name(names: Any) -> str:
    for n in names if isinstance(names, list) else []:
        if not isinstance(n, dict):
            continue
        if isinstance(n.get("text"), str):
            return str(n["text"])
        parts = [n.get("family"), *(n.get("given") or [])]
        found = " ".join(p for p in parts if isinstance(p, str))
        if found:
            return found
    return ""


def _in_period(period: Any, now: float) -> bool:
    if not isinstance(period, dict):
        return True
    now_u = int(now * 1e6)
    start = parse_range(period["start"]) if isinstance(period.get("start"), str) else None
    end = parse_range(period["end"]) if isinstance(period.get("end"), str) else None
    return (start is None or start[0] <= now_u) and (end is None or now_u <= end[1])


# --- writing the alert ---------------------------------------------------------------------


def _msk(us: int) -> str:
    """A time as people in the region read it (Moscow time)."""
    dt = datetime.fromtimestamp(us / 1e6, UTC).astimezone(MSK)
    return dt.strftime("%d.%m.%Y %H:%M МСК")


def _msk_en(us: int) -> str:
    dt = datetime.fromtimestamp(us / 1e6, UTC).astimezone(MSK)
    return dt.strftime("%Y-%m-%d %H:%M MSK")


def _us(seconds: float) -> int:
    return int(round(seconds * 1_000_000))


def _stage(code: str) -> Json:
    return {
        "coding": [{"system": ALERT_STATUS_SYSTEM, "code": code}],
        "text": _STAGE_DISPLAY[code],
    }


def stage_of(task: Json) -> str | None:
    """The alert's stage: ``notified``, ``escalated-mo``, ``escalated-hub``, …"""
    for c in (task.get("businessStatus") or {}).get("coding") or []:
        if isinstance(c, dict) and c.get("system") == ALERT_STATUS_SYSTEM:
            return str(c.get("code"))
    return None


def is_alert(task: Json) -> bool:
    """Whether a Task is a critical-result acknowledgement this module manages."""
    return (TASK_CODE_SYSTEM, ACKNOWLEDGE) in set(_codings(task.get("code")))


def _input(task: Json, kind: str) -> str | None:
    for item in task.get("input") or []:
        if isinstance(item, dict) and (ALERT_INPUT_SYSTEM, kind) in set(_codings(item.get("type"))):
            return _ref(item.get("valueReference"))
    return None


def _level(task: Json) -> Level:
    stage = stage_of(task)
    if stage == "escalated-hub":
        return "hub"
    if stage == "escalated-mo":
        return "mo-duty"
    owner = _ref(task.get("owner")) or ""
    return "mo" if owner.startswith("Organization/") else "practitioner"


def _due(task: Json) -> int | None:
    end = ((task.get("restriction") or {}).get("period") or {}).get("end")
    rng = parse_range(end) if isinstance(end, str) else None
    return rng[0] if rng else None


def _note(when_us: int, ru: str, en: str) -> Json:
    return {
        "authorString": _HUB_AUTHOR,
        "time": format_instant(when_us),
        "text": f"{_msk(when_us)}: {ru}\n{_msk_en(when_us)}: {en}",
    }


def _with_display(ref: str, label: str) -> Json:
    out: Json = {"reference": ref}
    if label and label != ref:
        out["display"] = label
    return out


class _Writer:
    """Writes the hub's own records of an alert through the FHIR service."""

    def __init__(self, service: FhirService) -> None:
        self.service = service

    def create(
        self, tx: WriteTx, res: Json, rtype: str, rid: str, when: int, owner: str | None
    ) -> StoredResource:
        """A new resource written as the MO's record (``owner``), so its staff see it: the
        alert is the ordering MO's record, reachable through the MO's own rows of the access
        policy, not only while the patient happens to have an open encounter there."""
        return self.service.write_internal(tx, res, rtype, rid, when, fresh=True, owner=owner)

    def update(self, tx: WriteTx, res: Json, rtype: str, rid: str, when: int) -> StoredResource:
        """A new version of a resource the hub keeps."""
        return self.service.write_internal(tx, res, rtype, rid, when)


def _communication(
    cid: str,
    task: Json,
    recipients: Sequence[Json],
    sent_us: int,
    payload: tuple[str, str],
    sender: str | None,
) -> Json:
    res: Json = {
        "resourceType": "Communication",
        "identifier": [{"system": ALERT_ID_SYSTEM, "value": cid}],
        "status": "in-progress",
        "category": [
            {"coding": [{"system": COMMUNICATION_CATEGORY, "code": "alert", "display": "Alert"}]}
        ],
        "priority": "stat",
        "subject": task["for"],
        "about": [task["focus"], {"reference": f"Task/{task['id']}"}],
        "sent": format_instant(sent_us),
        "recipient": list(recipients),
        "payload": [{"contentString": payload[0]}, {"contentString": payload[1]}],
    }
    if sender:
        res["sender"] = {"reference": sender}
    security = (task.get("meta") or {}).get("security")
    if security:
        res["meta"] = {"security": security}
    return res


def _payload(findings: Sequence[Finding], report_ref: str) -> tuple[str, str]:
    """What the alert says, in Russian and in English (no patient's name: the record has it)."""
    ru = "; ".join(f.text_ru() for f in findings)
    en = "; ".join(f.text_en() for f in findings)
    return (
        f"Критический результат: {ru}. Отчёт {report_ref}.",
        f"Critical result: {en}. Report {report_ref}.",
    )


# --- the consumer --------------------------------------------------------------------------


class CriticalResultAlerts:
    """Outbox consumer: raises alerts for critical DiagnosticReports and closes an alert's
    notifications when its Task is acknowledged (see the module docstring)."""

    name = "lab-alerts"

    def __init__(
        self,
        store: ResourceStore,
        service: FhirService,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
        rules: CriticalRules | None = None,
        max_age_hours: float = 48.0,
    ) -> None:
        self.store = store
        self.settings = settings
        self.clock = clock
        self.rules = rules or CriticalRules(store)
        # Results issued longer ago than this raise no alert: records loaded in bulk (an
        # MO's archive, the demo city, the consumer registered on a hub that has history)
        # must not page duty doctors about last year's potassium.
        self.max_age_hours = max_age_hours
        self.directory = Directory(store, settings)
        self.writer = _Writer(service)

    def handle(self, events: Sequence[OutboxEvent]) -> None:
        """Reports created, updated or deleted → alerts; alert Tasks updated → their
        notifications closed. Idempotent: state is read as it is now, and ids are derived."""
        reports: dict[str, None] = {}
        tasks: dict[str, None] = {}
        results: dict[str, None] = {}
        for e in events:
            if e.resource_type == "DiagnosticReport":
                reports[e.id] = None
            elif e.resource_type == "Task" and e.op == "update":
                tasks[e.id] = None
            elif e.resource_type == "Observation" and e.op == "update":
                results[e.id] = None  # a result corrected on its own, without its report
        if results:
            reports.update(dict.fromkeys(self._reports_of_critical(list(results))))
        if reports:
            self._check_reports(list(reports))
        for tid in tasks:
            self._on_task(tid)

    def check_report(self, report_id: str) -> str | None:
        """Check one report now (as its outbox event would); the id of the alert Task for its
        current critical findings, or None when it has none."""
        return self._check_reports([report_id], always=True).get(report_id)

    def _reports_of_critical(self, ids: list[str]) -> list[str]:
        """The reports of those of these Observations that are critical now."""
        rules = self.rules.current()
        critical = [
            ("Observation", s.id)
            for s in self.store.read_many([("Observation", i) for i in ids])
            if s.content and critical_findings({}, [orjson.loads(s.content)], rules)
        ]
        found = self.store.referencing(critical, "DiagnosticReport", "result", 1000)
        return [r.id for r in found]

    def _observations(self, reports: Iterable[Json]) -> dict[str, Json]:
        wanted = [
            _split(r)
            for rep in reports
            for r in _refs(rep.get("result"))
            if r.startswith("Observation/")
        ]
        return {o.id: orjson.loads(o.content) for o in self.store.read_many(wanted) if o.content}

    def _findings(self, report: Json, cache: dict[str, Json], rules: RuleSet) -> list[Finding]:
        patient = None
        if rules.needs_patient:
            patient = self.directory.read(_ref(report.get("subject")))
        return critical_findings(report, self._results(report, cache), rules, patient=patient)

    def _check_reports(self, ids: list[str], *, always: bool = False) -> dict[str, str | None]:
        """Check each report; the alert id for its findings now, by report id."""
        out: dict[str, str | None] = {}
        rules = self.rules.current()
        stored = {s.id: s for s in self.store.read_many([("DiagnosticReport", i) for i in ids])}
        reports = {i: orjson.loads(s.content) for i, s in stored.items() if s.content}
        cache = self._observations(reports.values())
        for rid in ids:
            report = reports.get(rid)
            findings = self._findings(report, cache, rules) if report is not None else []
            if findings and report is not None and self._too_old(report):
                SKIPPED.labels("old").inc()
                log.info("lab.alert_skipped_old", report=rid, findings=len(findings))
                continue
            # read_many skips deleted reports: a report that is gone, or any later version,
            # may have an alert to withdraw; a first version without findings has none
            first = rid in stored and stored[rid].version == 1
            if findings or always or not first:
                out[rid] = self._apply(rid, report, findings)
        return out

    def _too_old(self, report: Json) -> bool:
        """Whether the report was issued (else taken) more than ``max_age_hours`` ago."""
        period = report.get("effectivePeriod") or {}
        for value in (report.get("issued"), report.get("effectiveDateTime"), period.get("end")):
            rng = parse_range(value) if isinstance(value, str) else None
            if rng is not None:
                return rng[1] < _us(self.clock() - self.max_age_hours * 3600)
        return False

    def _results(self, report: Json, cache: dict[str, Json]) -> list[Json]:
        """The report's results and the members of panels among them (one level)."""
        out = [cache[i] for _, i in map(_split, _refs(report.get("result"))) if i in cache]
        have = {o.get("id") for o in out}
        members = [
            _split(r)[1]
            for o in out
            for r in _refs(o.get("hasMember"))
            if r.startswith("Observation/") and _split(r)[1] not in have
        ]
        unread = [("Observation", m) for m in members if m not in cache]
        read = {o.id: orjson.loads(o.content) for o in self.store.read_many(unread) if o.content}
        out.extend(
            cache.get(m) or read[m] for m in dict.fromkeys(members) if m in cache or m in read
        )
        return out

    def _apply(
        self, report_id: str, report: Json | None, findings: Sequence[Finding]
    ) -> str | None:
        """Bring the report's alerts in line with its critical ``findings``: raise the alert
        for them unless it exists, cancel an open alert raised for other findings. Returns
        the id of the alert for ``findings`` (None when there are none)."""
        new_id = alert_id(report_id, findings) if findings and report else None
        if new_id is None and not self._open_alerts(None, report_id):
            return None  # nothing to raise, nothing to withdraw: no write transaction
        now = self.clock()
        now_u = _us(now)
        routing = self.directory.route(report) if new_id and report else None
        when = now_us()
        raised = False
        with self.store.transaction() as tx:
            for old in self._open_alerts(tx, report_id):
                if old != new_id:
                    self._cancel(tx, old, new_id, now_u, when)
            if new_id and report and routing and tx.current("Task", new_id) is None:
                self._raise(tx, new_id, report_id, report, findings, routing, now, when)
                raised = True
        if raised:
            reason = "flag" if any(f.reason == "flag" for f in findings) else "rule"
            ALERTS.labels(reason).inc()
            log.info(
                "lab.alert_raised",
                task=new_id,
                report=report_id,
                findings=len(findings),
                reason=reason,
                mo=routing.mo_id if routing else None,
            )
        return new_id

    def _open_alerts(self, tx: WriteTx | None, report_id: str) -> list[str]:
        """Ids of the report's alerts still waiting for someone (inside ``tx`` if given)."""
        q = parse_search(
            "Task",
            [
                ("focus", f"DiagnosticReport/{report_id}"),
                ("code", f"{TASK_CODE_SYSTEM}|{ACKNOWLEDGE}"),
                ("status", ",".join((*WAITING, *ESCALATE_NOW))),
            ],
            default_count=100,
            max_count=100,
        ).query
        if tx is None:
            return [r.id for r in self.store.search(q).items]
        return [i for _, i in tx.search_ids(q)]

    def _raise(
        self,
        tx: WriteTx,
        task_id: str,
        report_id: str,
        report: Json,
        findings: Sequence[Finding],
        routing: Routing,
        now: float,
        when: int,
    ) -> None:
        now_u = _us(now)
        d = self.directory
        report_ref = f"DiagnosticReport/{report_id}"
        hub = d.hub_operator(now) if routing.organization is None else None
        owner = hub if routing.organization is None else routing.owner
        due_u = now_u + _us(60 * self.settings.alert_ack_minutes)
        ru_text, en_text = _payload(findings, report_ref)
        task: Json = {
            "resourceType": "Task",
            "id": task_id,
            "identifier": [{"system": ALERT_ID_SYSTEM, "value": task_id}],
        }
        security = (report.get("meta") or {}).get("security")
        if security:
            # the alert carries the report's sensitivity labels, so a Consent that closes
            # such records to an MO closes its alert too
            task["meta"] = {"security": security}
        if routing.order:
            task["basedOn"] = [{"reference": routing.order}]
        task["status"] = "requested"
        task["businessStatus"] = _stage("notified" if routing.organization else "escalated-hub")
        task["intent"] = "order"
        task["priority"] = "stat"
        task["code"] = {
            "coding": [
                {
                    "system": TASK_CODE_SYSTEM,
                    "code": ACKNOWLEDGE,
                    "display": "Acknowledge critical result",
                }
            ],
            "text": "Подтвердить получение критического результата / "
            "acknowledge the critical result",
        }
        task["description"] = f"{ru_text}\n{en_text}"
        task["focus"] = {"reference": report_ref}
        subject = _ref(report.get("subject"))
        if subject:
            task["for"] = {"reference": subject}
        task["authoredOn"] = format_instant(now_u)
        task["lastModified"] = format_instant(now_u)
        if routing.lab:
            task["requester"] = {"reference": routing.lab}
        if owner:
            task["owner"] = _with_display(owner, d.label(owner))
        task["restriction"] = {"period": {"end": format_instant(due_u)}}
        inputs = [
            {
                "type": {"coding": [{"system": ALERT_INPUT_SYSTEM, "code": "critical-finding"}]},
                "valueReference": {"reference": f.observation, "display": f.text_en()},
            }
            for f in findings
            if f.observation
        ]
        for kind, ref in (
            ("ordering-practitioner", routing.practitioner_role or routing.practitioner),
            ("ordering-organization", routing.organization),
        ):
            if ref:
                inputs.append(
                    {
                        "type": {"coding": [{"system": ALERT_INPUT_SYSTEM, "code": kind}]},
                        "valueReference": _with_display(ref, d.label(ref)),
                    }
                )
        if inputs:
            task["input"] = inputs
        who = d.label(owner) if owner else "—"
        if routing.organization is None:
            why = routing.why_no_mo or ("МО не известна", "the ordering MO is unknown")
            ru = (
                f"оповещение о критическом результате создано; МО, назначившая исследование, "
                f"не известна ({why[0]}), поэтому оно передано дежурному оператору РМИС: "
                f"{who}. Подтвердить до {_msk(due_u)}."
            )
            en = (
                f"critical-result alert raised; the ordering MO is unknown ({why[1]}), so it "
                f"went straight to the hub's duty operator: {who}. Acknowledge by "
                f"{_msk_en(due_u)}."
            )
            if not owner:
                ru += " Дежурный оператор РМИС не настроен (HIE_ALERT_HUB_OPERATOR)."
                en += " No hub duty operator is configured (HIE_ALERT_HUB_OPERATOR)."
                log.error("lab.alert_no_recipient", task=task_id, report=report_id)
        else:
            ru = (
                f"оповещение о критическом результате создано и направлено: {who}. "
                f"Подтвердить до {_msk(due_u)}."
            )
            en = f"critical-result alert raised for {who}. Acknowledge by {_msk_en(due_u)}."
        task["note"] = [_note(now_u, ru, en)]
        mo = routing.mo_id
        self.writer.create(tx, task, "Task", task_id, when, mo)
        recipients = [
            _with_display(r, d.label(r))
            for r in dict.fromkeys(
                x
                for x in (
                    routing.practitioner_role,
                    routing.practitioner,
                    routing.organization,
                    hub,
                )
                if x
            )
        ]
        if recipients and "for" in task:
            cid = _communication_id(task_id, "raised")
            comm = _communication(cid, task, recipients, now_u, (ru_text, en_text), routing.lab)
            self.writer.create(tx, comm, "Communication", cid, when, mo)

    def _cancel(self, tx: WriteTx, task_id: str, new_id: str | None, now_u: int, when: int) -> None:
        cur = tx.current("Task", task_id)
        if cur is None or cur.content is None:
            return
        task = orjson.loads(cur.content)
        if task.get("status") not in (*WAITING, *ESCALATE_NOW):
            return
        task["status"] = "cancelled"
        task["lastModified"] = format_instant(now_u)
        if new_id:
            task["businessStatus"] = _stage("superseded")
            note = _note(
                now_u,
                f"отменено: отчёт исправлен, критические результаты изменились; новое "
                f"оповещение Task/{new_id}.",
                f"cancelled: the report was corrected and its critical results changed; the "
                f"new alert is Task/{new_id}.",
            )
        else:
            task["businessStatus"] = _stage("withdrawn")
            note = _note(
                now_u,
                "отменено: в исправленном (отменённом или удалённом) отчёте нет критических "
                "результатов.",
                "cancelled: the corrected (cancelled or deleted) report has no critical result.",
            )
        task["note"] = [*(task.get("note") or []), note]
        self.writer.update(tx, task, "Task", task_id, when)
        self._close_notifications(tx, task, "stopped", None, now_u, when)

    def _close_notifications(
        self,
        tx: WriteTx,
        task: Json,
        status: str,
        received_by: str | None,
        now_u: int,
        when: int,
    ) -> int:
        """Set the alert's in-progress Communications to ``status``; the one addressed to
        ``received_by`` is marked received. Returns how many changed."""
        q = parse_search(
            "Communication",
            [("about", f"Task/{task['id']}"), ("status", "in-progress")],
            default_count=100,
            max_count=100,
        ).query
        changed = 0
        for _, cid in tx.search_ids(q):
            cur = tx.current("Communication", cid)
            if cur is None or cur.content is None:
                continue
            comm = orjson.loads(cur.content)
            if comm.get("status") != "in-progress":
                continue
            comm["status"] = status
            if status == "completed" and received_by in _refs(comm.get("recipient")):
                comm["received"] = format_instant(now_u)
            elif status == "completed":
                comm["note"] = [
                    *(comm.get("note") or []),
                    _note(
                        now_u,
                        "подтверждено другим получателем оповещения.",
                        "acknowledged by another recipient of the alert.",
                    ),
                ]
            self.writer.update(tx, comm, "Communication", cid, when)
            changed += 1
        return changed

    def _on_task(self, task_id: str) -> None:
        """An alert Task acknowledged or closed: its notifications are done with."""
        stored = self.store.read("Task", task_id)
        if stored is None or not stored.content or ACKNOWLEDGE.encode() not in stored.content:
            return
        task = orjson.loads(stored.content)
        status = task.get("status")
        if not is_alert(task) or (status not in ACKNOWLEDGED and status not in CLOSED):
            return
        now_u = _us(self.clock())
        done = "completed" if status in ACKNOWLEDGED else "stopped"
        with self.store.transaction() as tx:
            changed = self._close_notifications(
                tx, task, done, _ref(task.get("owner")), now_u, now_us()
            )
        if changed and status in ACKNOWLEDGED:
            # counted once: the first acknowledging version closes the notifications
            level = _level(task)
            ACKNOWLEDGEMENTS.labels(level).inc()
            due = _due(task)
            log.info(
                "lab.alert_acknowledged",
                task=task_id,
                level=level,
                status=status,
                late_seconds=max(0, (now_u - due) // 1_000_000) if due else None,
            )


def _communication_id(task_id: str, step: str) -> str:
    return str(uuid.uuid5(ALERT_NAMESPACE, f"Communication\n{task_id}\n{step}"))


# --- escalation ----------------------------------------------------------------------------


class AlertEscalator(Poller):
    """Escalates alerts nobody acknowledged in time (see the module docstring).

    ``run_once`` is one pass; ``start`` runs passes every ``poll_seconds`` in a thread. Passes
    in several processes are safe: each step re-reads the Task inside its transaction (locked
    on PostgreSQL) and does nothing if someone else already moved it."""

    thread_name = "hie-alerts"

    def __init__(
        self,
        store: ResourceStore,
        service: FhirService,
        settings: Settings,
        clock: Callable[[], float] = time.time,
        *,
        poll_seconds: float = 30.0,
    ) -> None:
        super().__init__(poll_seconds)
        self.store = store
        self.settings = settings
        self.clock = clock
        self.directory = Directory(store, settings)
        self.writer = _Writer(service)

    def open_alerts(self) -> Iterator[StoredResource]:
        """Every alert Task still waiting for someone (requested, received, rejected)."""
        items = [
            ("code", f"{TASK_CODE_SYSTEM}|{ACKNOWLEDGE}"),
            ("status", ",".join((*WAITING, *ESCALATE_NOW))),
        ]
        q = parse_search("Task", items, default_count=500, max_count=500).query
        yield from iter_search(self.store, q)

    def run_once(self, now: float | None = None) -> int:
        """Escalate every overdue or rejected alert; returns how many were escalated."""
        now = self.clock() if now is None else now
        now_u = _us(now)
        escalated = 0
        open_by_level: dict[str, int] = {"practitioner": 0, "mo": 0, "mo-duty": 0, "hub": 0}
        for stored in list(self.open_alerts()):
            if not stored.content:
                continue
            task = orjson.loads(stored.content)
            level = _level(task)
            open_by_level[level] += 1
            if level == "hub":
                continue  # the last level: it stays with the hub's operators
            due = _due(task)
            if task.get("status") in ESCALATE_NOW or (due is not None and due <= now_u):
                if self.escalate(stored.id, stored.version, now):
                    escalated += 1
        for name, n in open_by_level.items():
            OPEN.labels(name).set(n)
        return escalated

    def escalate(self, task_id: str, seen_version: int, now: float) -> bool:
        """Move one alert to its next level (if it is still as it was seen)."""
        now_u = _us(now)
        when = now_us()
        d = self.directory
        with self.store.transaction() as tx:
            cur = tx.current("Task", task_id)
            if cur is None or cur.content is None or cur.version != seen_version:
                return False  # acknowledged or escalated meanwhile
            task = orjson.loads(cur.content)
            status = task.get("status")
            if status not in (*WAITING, *ESCALATE_NOW):
                return False
            stage = stage_of(task) or "notified"
            old_owner = _ref(task.get("owner"))
            mo = _input(task, "ordering-organization")
            target: str | None = None
            next_stage = "escalated-hub"
            why_ru = why_en = ""
            if stage == "notified" and mo:
                target = d.mo_duty_role(mo, now)
                if target:
                    next_stage = "escalated-mo"
                else:
                    why_ru = " (у МО нет дежурной роли duty-officer)"
                    why_en = " (the MO has no duty-officer PractitionerRole)"
            if next_stage == "escalated-hub":
                target = d.hub_operator(now)
                if target is None:
                    why_ru += "; дежурный оператор РМИС не настроен (HIE_ALERT_HUB_OPERATOR)"
                    why_en += "; no hub duty operator is configured (HIE_ALERT_HUB_OPERATOR)"
            reason_ru, reason_en = (
                ("отклонено получателем", "rejected by its owner")
                if status in ESCALATE_NOW
                else (
                    f"не подтверждено до {_msk(_due(task) or now_u)}",
                    f"not acknowledged by {_msk_en(_due(task) or now_u)}",
                )
            )
            frm, to = d.label(old_owner), d.label(target) if target else "—"
            level_ru = (
                "дежурному МО" if next_stage == "escalated-mo" else "дежурному оператору РМИС"
            )
            level_en = (
                "the MO's duty officer"
                if next_stage == "escalated-mo"
                else "the hub's duty operator"
            )
            due_u = now_u + _us(60 * self.settings.alert_escalate_minutes)
            task["status"] = "requested"
            task["businessStatus"] = _stage(next_stage)
            task["lastModified"] = format_instant(now_u)
            if target:
                task["owner"] = _with_display(target, to)
            task["restriction"] = {
                **(task.get("restriction") or {}),
                "period": {"end": format_instant(due_u)},
            }
            task["note"] = [
                *(task.get("note") or []),
                _note(
                    now_u,
                    f"эскалация: {reason_ru}; передано от «{frm}» {level_ru} «{to}»{why_ru}. "
                    f"Подтвердить до {_msk(due_u)}.",
                    f"escalated: {reason_en}; reassigned from '{frm}' to {level_en} '{to}'"
                    f"{why_en}. Acknowledge by {_msk_en(due_u)}.",
                ),
            ]
            self.writer.update(tx, task, "Task", task_id, when)
            if target and task.get("for"):
                recipients = [_with_display(target, to)]
                if next_stage == "escalated-mo" and mo:
                    recipients.append(_with_display(mo, d.label(mo)))
                lines = str(task.get("description") or "").split("\n", 1)
                ru_text, en_text = lines[0], lines[-1]
                comm = _communication(
                    _communication_id(task_id, next_stage),
                    task,
                    recipients,
                    now_u,
                    (
                        f"ЭСКАЛАЦИЯ ({reason_ru}; прежний получатель: {frm}). {ru_text}",
                        f"ESCALATION ({reason_en}; previous owner: {frm}). {en_text}",
                    ),
                    _ref(task.get("requester")),
                )
                cid = comm["identifier"][0]["value"]
                if tx.current("Communication", cid) is None:
                    self.writer.create(
                        tx, comm, "Communication", cid, when, _split(mo)[1] if mo else None
                    )
        level = "mo-duty" if next_stage == "escalated-mo" else "hub"
        ESCALATIONS.labels(level).inc()
        log.warning("lab.alert_escalated", task=task_id, level=level, owner=target)
        return True

    def tick(self) -> bool:
        """One escalation pass (then rest ``poll_seconds``)."""
        self.run_once()
        return False
