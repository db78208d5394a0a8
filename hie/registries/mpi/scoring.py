"""Scoring a pair of person records and deciding: auto-link, review ("possible match") or new.

:func:`score` applies, in order:

1. **The deterministic rule** (national identifiers, ``NATIONAL_SYSTEMS`` of
   :mod:`hie.registries.identifiers`). The same SNILS, OMS policy or passport in the same
   system means the same person (rule ``national-id``), unless the demographics contradict
   it — a different given name, or a different birth date without agreeing names — which is
   how a parent's policy on a newborn's record or a twin's SNILS typed on the other twin's
   record looks (rule ``national-id-contradicted``, sent to review). Two different valid SNILS
   (issued once for life, check number verified) or two different ЕНП OMS numbers mean two
   people (rule ``national-id-conflict``: never auto-linked).
2. **Fellegi–Sunter weights** (Fellegi & Sunter, *A Theory for Record Linkage*, JASA 1969):
   each field contributes ``log2(m/u)`` bits when it agrees at some level and
   ``log2((1-m)/(1-u))`` when it disagrees, where ``m`` is the chance the field agrees for the
   same person and ``u`` for two different people; a missing field contributes nothing. Names
   are compared on their transliteration-proof keys with Jaro-Winkler (Winkler 1990, via
   ``rapidfuzz``); birth dates agree exactly, with day and month swapped, with one digit
   wrong (or two adjacent digits transposed), or in the year only. :data:`WEIGHTS` holds the
   bits; the values are rounded ``log2`` ratios of the ``m``/``u`` noted beside each.
3. **Core-field vetoes** for the probabilistic rule: a record is only auto-linked when the
   family name, the given name, the birth date and the gender do not disagree and both records
   have a birth date — a twin, a namesake of another age, a father and son of the same name
   differ in exactly one of these, and add up to a high score otherwise (rule
   ``core-conflict`` or ``missing-birth-date``: review or new, by score).

``MatchScore.details`` holds every field's contribution under ``field:level`` (for example
``birth-date:swapped-day-month``) and always sums to ``MatchScore.score``, so an operator sees
why. :func:`decide` turns a score into the outcome with :class:`Thresholds` (defaults tuned on
``bench/mpi_engine.py`` for precision ≥ 0.999 at recall ≥ 0.98 of auto-link);
:func:`best_match` ranks candidates and sends an incoming record that auto-links to two golden
records to review.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date
from typing import Literal

from rapidfuzz.distance import OSA, JaroWinkler

from hie.registries.identifiers import OMS_SYSTEM, PASSPORT_SYSTEM, SNILS_SYSTEM
from hie.registries.mpi.features import PersonFeatures

Rule = Literal[
    "national-id",
    "national-id-contradicted",
    "national-id-conflict",
    "core-conflict",
    "missing-birth-date",
    "probabilistic",
]
Decision = Literal["auto-link", "review", "new"]

# Weights in bits (log2 likelihood ratios). m = P(agree | same person), u = P(agree | two
# people) for a pair that reached scoring (it shares a blocking key).
WEIGHTS: dict[str, float] = {
    # National identifiers: u ~ 1e-8 (a number shared by two people is an entry error).
    "snils:same": 25.0,
    "snils:different": -25.0,  # m(different) ~ 1e-7: issued once for life, check verified
    "oms:same": 20.0,
    "oms:different": -12.0,  # re-issued rarely; a newborn uses the mother's policy
    "passport:same": 18.0,
    "passport:different": -1.5,  # replaced at 20 and 45 and when lost: m(different) ~ 0.3
    # An MO's own record number, same system: the MO says it is (or is not) one chart.
    "local-id:same": 12.0,
    "local-id:different": -3.0,  # duplicate charts in one MO happen
    # Family name: u(exact) ~ 1/1000 (top surnames ~1 %), m(exact) ~ 0.93.
    "family:exact": 9.0,
    "family:close": 6.0,  # Jaro-Winkler >= 0.94: one typo, a gender form
    "family:similar": 3.0,  # >= 0.88
    "family:initial": 0.0,
    "family:different": -5.0,  # m ~ 0.03 (marriage), u ~ 0.99
    # Given name: u(exact) ~ 1/100, m(exact) ~ 0.95.
    "given:exact": 7.0,
    "given:close": 5.0,
    "given:similar": 2.5,
    "given:initial": 2.0,
    "given:different": -8.0,  # m ~ 0.004
    # Patronymic: u(exact) ~ 1/60 (it follows the father's given name), m(exact) ~ 0.95.
    "middle:exact": 6.0,
    "middle:close": 4.0,
    "middle:similar": 2.0,
    "middle:initial": 1.5,
    "middle:different": -5.0,
    # Birth date: u(exact) ~ 1/30,000 (a century of dates), m(exact) ~ 0.96.
    "birth-date:exact": 13.0,
    "birth-date:swapped-day-month": 9.0,  # m ~ 0.01, u ~ 1/60,000
    "birth-date:one-digit": 7.0,  # m ~ 0.01, u ~ 8 of 30,000
    "birth-date:year": 1.0,
    "birth-date:different": -10.0,  # m ~ 0.001
    # Gender: u ~ 0.5, m ~ 0.995.
    "gender:same": 1.0,
    "gender:different": -5.0,
    # Phone, last 10 digits: u ~ 1e-5 (households share), m ~ 0.5 (numbers change).
    "phone:same": 8.0,
    "phone:different": -1.0,
    # Address: people move (m(different) ~ 0.3); a flat is a household, not a person.
    "address:same-flat": 5.0,
    "address:same-house": 3.0,
    "address:same-street": 1.5,
    "address:same-postal-code": 0.5,
    "address:different": -1.0,
}

_JW_CLOSE = 0.94
_JW_SIMILAR = 0.88
_NAMES_AGREE = frozenset({"exact", "close"})
_DATES_AGREE = frozenset({"exact", "swapped-day-month", "one-digit"})


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Score bounds (bits) of the probabilistic rule: ``>= auto`` links, ``>= review`` asks.

    Defaults from ``bench/mpi_engine.py`` at 1,000,000 golden patients: no different person
    scored above 20 under the probabilistic rule, while the hardest true matches (a typo and a
    swapped day/month, no identifiers, no phone, another address) score 28–29.
    """

    auto: float = 28.0
    review: float = 16.0


DEFAULT_THRESHOLDS = Thresholds()


@dataclass(frozen=True, slots=True)
class MatchScore:
    """The outcome of comparing two records.

    ``score`` is the total log2 likelihood ratio in bits (positive: more likely the same
    person); ``details`` maps ``field:level`` to its contribution and sums to ``score``;
    ``rule`` names what decided (see the module docstring).
    """

    score: float
    rule: Rule
    details: dict[str, float] = field(default_factory=dict)

    def explain(self) -> str:
        """One line per field, largest contribution first, for an operator's screen."""
        lines = [f"{self.rule}: {self.score:+.1f} bits"]
        for name, bits in sorted(self.details.items(), key=lambda kv: -abs(kv[1])):
            lines.append(f"  {name:<32} {bits:+.1f}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, object]:
        """A JSON-ready form for storing with the link."""
        return {"score": self.score, "rule": self.rule, "details": dict(self.details)}


def _name_level(a: str, b: str) -> str | None:
    """Agreement level of two name keys, or None if either is missing.

    ``close``: one typing error (an OSA edit: a letter changed, added, dropped, or two
    neighbours swapped — Damerau 1964) or Jaro-Winkler >= 0.94, with the first letter equal;
    ``similar``: Jaro-Winkler >= 0.88; ``initial``: one side is an initial of the other.
    """
    if not a or not b:
        return None
    if a == b:
        return "exact"
    if len(a) == 1 or len(b) == 1:
        # An initial (А. for Анна) agrees with any name starting with it.
        return "initial" if a[0] == b[0] else "different"
    # Typists rarely miss the first letter (Winkler's prefix assumption): Алина and Галина,
    # 0.94 apart, are two names, so a differing first letter is at best "similar".
    if a[0] == b[0]:
        if max(len(a), len(b)) >= 3 and OSA.distance(a, b, score_cutoff=1) <= 1:
            return "close"
        jw = JaroWinkler.normalized_similarity(a, b)
        if jw >= _JW_CLOSE:
            return "close"
    else:
        jw = JaroWinkler.normalized_similarity(a, b)
    if jw >= _JW_SIMILAR:
        return "similar"
    return "different"


def _names(a_key: str, b_key: str, a_raw: str, b_raw: str) -> str | None:
    """Agreement of two names.

    Equal keys are ``exact`` whatever the spelling (Юрий / Yuriy). Otherwise, two names in the
    same script are compared as written, where one typing error is one edit and Алла / Анна
    stay two letters apart (their keys, with double letters folded, are one apart); names in
    different scripts are compared on their keys.
    """
    if not a_key or not b_key:
        return None
    if a_key == b_key:
        return "exact"
    if _is_cyrillic(a_raw) == _is_cyrillic(b_raw):
        level = _name_level(_letters(a_raw), _letters(b_raw))
        if level is not None:
            return level
    return _name_level(a_key, b_key)


def _letters(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalpha()).replace("ё", "е")


def _is_cyrillic(s: str) -> bool:
    """Written mostly in Cyrillic (a stray look-alike letter does not change the script)."""
    cyr = sum(1 for ch in s if "\u0400" <= ch <= "\u04ff")
    return cyr * 2 > len(s)


def _one_digit_apart(a: str, b: str) -> bool:
    """Equal-length digit strings that differ in one place or by one adjacent transposition."""
    diff = [i for i, (x, y) in enumerate(zip(a, b, strict=True)) if x != y]
    if len(diff) == 1:
        return True
    if len(diff) == 2:
        i, j = diff
        return j == i + 1 and a[i] == b[j] and a[j] == b[i]
    return False


def _date_level(a: PersonFeatures, b: PersonFeatures) -> str | None:
    da, db = a.birth_date, b.birth_date
    if da is not None and db is not None:
        if da == db:
            return "exact"
        if da.year == db.year and da.day == db.month and da.month == db.day:
            return "swapped-day-month"
        if _one_digit_apart(_digits(da), _digits(db)):
            return "one-digit"
        if da.year == db.year:
            return "year"
        return "different"
    if a.birth_year is not None and b.birth_year is not None:
        # One of them is only a year (a partial date).
        return "year" if a.birth_year == b.birth_year else "different"
    return None


def _digits(d: date) -> str:
    return f"{d.year:04d}{d.month:02d}{d.day:02d}"


def _address_level(a: PersonFeatures, b: PersonFeatures) -> str | None:
    if a.street_key and b.street_key:
        if a.street_key == b.street_key:
            if a.house and a.house == b.house:
                return "same-flat" if a.flat and a.flat == b.flat else "same-house"
            return "same-street"
        return "different"
    if a.postal_code and b.postal_code:
        return "same-postal-code" if a.postal_code == b.postal_code else "different"
    return None


def score(a: PersonFeatures, b: PersonFeatures) -> MatchScore:
    """Compare two records; ``details`` explains every bit of the total (see module docs)."""
    details: dict[str, float] = {}

    def add(name: str, level: str | None) -> str | None:
        if level is not None:
            key = f"{name}:{level}"
            details[key] = WEIGHTS[key]
        return level

    # National identifiers, system by system.
    agree: list[str] = []
    conflict: list[str] = []
    for system, label in (
        (SNILS_SYSTEM, "snils"),
        (OMS_SYSTEM, "oms"),
        (PASSPORT_SYSTEM, "passport"),
    ):
        va, vb = a.national.get(system), b.national.get(system)
        if va is None or vb is None:
            continue
        if va == vb:
            add(label, "same")
            agree.append(label)
        else:
            add(label, "different")
            conflict.append(label)
    # MO-local record numbers: only comparable within one system.
    if a.identifiers and b.identifiers:
        local_b = dict(b.local_identifiers)
        local_level: str | None = None
        for system, value in a.local_identifiers:
            other = local_b.get(system)
            if other is not None:
                local_level = "same" if other == value else (local_level or "different")
        add("local-id", local_level)

    family = add("family", _names(a.family_key, b.family_key, a.family, b.family))
    given = add("given", _names(a.given_key, b.given_key, a.given, b.given))
    add("middle", _names(a.middle_key, b.middle_key, a.middle, b.middle))
    born = add("birth-date", _date_level(a, b))
    sex = None
    if a.gender and b.gender:
        sex = add("gender", "same" if a.gender == b.gender else "different")
    if a.phones and b.phones:
        add("phone", "same" if set(a.phones) & set(b.phones) else "different")
    add("address", _address_level(a, b))

    total = sum(details.values())
    names_agree = family in _NAMES_AGREE and given in _NAMES_AGREE
    rule: Rule
    if "snils" in conflict:
        rule = "national-id-conflict"
    elif agree:
        contradicted = given == "different" or (born == "different" and not names_agree)
        rule = "national-id-contradicted" if contradicted else "national-id"
    elif "oms" in conflict:
        rule = "national-id-conflict"
    elif (
        "different" in (family, given, born, sex)
        or given in ("similar", "initial")
        or (born == "year" and a.birth_date is not None and b.birth_date is not None)
    ):
        # Two full birth dates that share only the year disagree; a given name that is only
        # similar (Лидия / Людмила) or an initial is what twins look like, so a person tells.
        rule = "core-conflict"
    elif born is None or born == "year":
        rule = "missing-birth-date"
    else:
        rule = "probabilistic"
    return MatchScore(score=total, rule=rule, details=details)


def decide(match: MatchScore, thresholds: Thresholds = DEFAULT_THRESHOLDS) -> Decision:
    """``auto-link``, ``review`` (a possible match for an operator) or ``new`` person.

    ``national-id`` always links and ``national-id-contradicted`` always goes to review;
    ``national-id-conflict``, ``core-conflict`` and ``missing-birth-date`` never auto-link
    (review at ``>= thresholds.review``, else new); ``probabilistic`` uses both thresholds.
    """
    if match.rule == "national-id":
        return "auto-link"
    if match.rule == "national-id-contradicted":
        return "review"
    if match.rule == "probabilistic" and match.score >= thresholds.auto:
        return "auto-link"
    return "review" if match.score >= thresholds.review else "new"


@dataclass(frozen=True, slots=True)
class MatchResult:
    """The outcome for one incoming record against its candidates.

    ``person_id`` and ``match`` are the best candidate (None when there was none);
    ``ranked`` lists every candidate scored, best first; ``ambiguous`` is set when more than
    one candidate would auto-link (two golden records of one person: review, then merge).
    """

    decision: Decision
    person_id: str | None
    match: MatchScore | None
    ranked: list[tuple[str, MatchScore]]
    ambiguous: bool = False


_RULE_RANK: dict[Rule, int] = {
    "national-id": 0,
    "probabilistic": 1,
    "national-id-contradicted": 2,
    "missing-birth-date": 3,
    "core-conflict": 3,
    "national-id-conflict": 4,
}


_ORDER = {"auto-link": 0, "review": 1, "new": 2}


def _rank_key(t: tuple[str, MatchScore, Decision]) -> tuple[int, int, float]:
    return (_ORDER[t[2]], _RULE_RANK[t[1].rule], -t[1].score)


def rank_people(
    incoming: PersonFeatures,
    candidates: Iterable[tuple[str, PersonFeatures]],
    thresholds: Thresholds = DEFAULT_THRESHOLDS,
) -> list[tuple[str, MatchScore, Decision]]:
    """One ``(person_id, score, decision)`` per person among ``candidates``, best first (see
    :func:`best_match` for the order and how a person with several records is judged)."""
    scored = [(pid, score(incoming, cand)) for pid, cand in candidates]
    decided = sorted(((pid, m, decide(m, thresholds)) for pid, m in scored), key=_rank_key)
    per_person: dict[str, list[tuple[str, MatchScore, Decision]]] = {}
    for entry in decided:
        per_person.setdefault(entry[0], []).append(entry)
    return sorted((_person_entry(entries) for entries in per_person.values()), key=_rank_key)


def best_match(
    incoming: PersonFeatures,
    candidates: Iterable[tuple[str, PersonFeatures]],
    thresholds: Thresholds = DEFAULT_THRESHOLDS,
) -> MatchResult:
    """Score ``incoming`` against each ``(person_id, features)`` candidate and decide.

    Candidates are ranked by decision (auto-link first), then rule, then score. A person may
    be listed several times (one entry per source record: a maiden name, another MO's
    spelling); it is ranked by its best record, except that a person one of whose records
    has another SNILS or OMS policy is never auto-linked by the others (see
    :func:`_person_entry`). If two or more people would auto-link, the result is ``review``
    with ``ambiguous`` set.
    """
    decided = rank_people(incoming, candidates, thresholds)
    ranked = [(pid, m) for pid, m, _ in decided]
    if not decided:
        return MatchResult("new", None, None, ranked)
    pid, best, decision = decided[0]
    autos = sum(1 for _, _, d in decided if d == "auto-link")
    if autos > 1:
        return MatchResult("review", pid, best, ranked, ambiguous=True)
    return MatchResult(decision, pid, best, ranked)


def _person_entry(
    entries: list[tuple[str, MatchScore, Decision]],
) -> tuple[str, MatchScore, Decision]:
    """The entry that stands for one person (``entries`` best first). A record without a
    SNILS may look exactly like the incoming one — a namesake born the same day — while
    another record of the same person carries a different SNILS: the person is then judged
    by that record (rule ``national-id-conflict``), unless one of its records shares the
    incoming national identifier."""
    best = entries[0]
    if best[2] != "auto-link" or best[1].rule == "national-id":
        return best
    return next((e for e in entries if e[1].rule == "national-id-conflict"), best)
