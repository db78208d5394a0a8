"""Clinical content of the demo record: lab tests, vital signs, diagnoses, vaccines, drugs.

Everything here is a table plus a builder that turns a row into a plain FHIR R4 dict. Builders
take the generator's ``random.Random`` and the subject reference (``Patient/<id>`` or an
``urn:uuid:…``) and never look at the clock: times are passed in, so output depends on the seed
alone.

Lab tests carry LOINC codes in SI units (the molar codes where Russian laboratories report
mmol/L or µmol/L: glucose 14749-6, creatinine 14682-9, not the mass codes 2345-7 and 2160-0),
UCUM unit codes with Russian unit text, the adult reference range, and an interpretation
(N, L, H and, for a small share of results, the critical LL/HH).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
ICD10_SYSTEM = "urn:oid:1.2.643.5.1.13.13.11.1005"  # НСИ: МКБ-10
ATC_SYSTEM = "http://www.whocc.no/atc"
CVX_SYSTEM = "http://hl7.org/fhir/sid/cvx"
OBSERVATION_CATEGORY = "http://terminology.hl7.org/CodeSystem/observation-category"
INTERPRETATION_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
DIAGNOSTIC_SERVICE_SECTION = "http://terminology.hl7.org/CodeSystem/v2-0074"
ACT_CODE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-ActCode"
CONDITION_CLINICAL = "http://terminology.hl7.org/CodeSystem/condition-clinical"
CONDITION_VERIFICATION = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
CONDITION_CATEGORY = "http://terminology.hl7.org/CodeSystem/condition-category"
ALLERGY_CLINICAL = "http://terminology.hl7.org/CodeSystem/allergyintolerance-clinical"
ALLERGY_VERIFICATION = "http://terminology.hl7.org/CodeSystem/allergyintolerance-verification"
# The hub's own code systems for what has no code in a public system we can cite here.
LAB_PANEL_SYSTEM = "https://hie.spb.ru/fhir/CodeSystem/lab-panel"
VACCINE_SYSTEM = "https://hie.spb.ru/fhir/CodeSystem/vaccine"
ALLERGEN_SYSTEM = "https://hie.spb.ru/fhir/CodeSystem/allergen"
ENCOUNTER_TYPE_SYSTEM = "https://hie.spb.ru/fhir/CodeSystem/encounter-type"

MSK = timezone(timedelta(hours=3), "MSK")


def fhir_datetime(dt: datetime) -> str:
    """ISO 8601 with seconds and offset, as FHIR dateTime/instant want it."""
    return dt.isoformat(timespec="seconds")


# --- laboratory ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LabTest:
    """One lab test: codes, units, adult reference range and the distribution of results."""

    loinc: str
    display: str  # LOINC long common name
    text: str  # Russian name as printed on a Russian lab report
    ucum: str
    unit: str  # Russian unit text
    low: float
    high: float
    mean: float
    sd: float  # for log-normal tests: the sigma of log(value)
    decimals: int
    critical_low: float | None = None
    critical_high: float | None = None
    lognormal: bool = False


LAB_TESTS: tuple[LabTest, ...] = (
    # Complete blood count (общий анализ крови)
    LabTest("718-7", "Hemoglobin [Mass/volume] in Blood", "Гемоглобин",
            "g/L", "г/л", 120, 160, 138, 16, 0, 70, 200),
    LabTest("789-8", "Erythrocytes [#/volume] in Blood by Automated count", "Эритроциты",
            "10*12/L", "×10¹²/л", 3.8, 5.5, 4.6, 0.5, 2),
    LabTest("4544-3", "Hematocrit [Volume Fraction] of Blood by Automated count", "Гематокрит",
            "%", "%", 36, 48, 42, 4, 1),
    LabTest("6690-2", "Leukocytes [#/volume] in Blood by Automated count", "Лейкоциты",
            "10*9/L", "×10⁹/л", 4.0, 9.0, 6.5, 0.3, 1, 2.0, 30.0, True),
    LabTest("777-3", "Platelets [#/volume] in Blood by Automated count", "Тромбоциты",
            "10*9/L", "×10⁹/л", 150, 400, 250, 65, 0, 50, 1000),
    LabTest("30341-2", "Erythrocyte sedimentation rate", "СОЭ",
            "mm/h", "мм/ч", 2, 15, 9, 0.6, 0, None, None, True),
    # Biochemistry (биохимический анализ крови)
    LabTest("14749-6", "Glucose [Moles/volume] in Serum or Plasma", "Глюкоза",
            "mmol/L", "ммоль/л", 3.9, 6.1, 5.3, 1.1, 1, 2.5, 25.0),
    LabTest("14682-9", "Creatinine [Moles/volume] in Serum or Plasma", "Креатинин",
            "umol/L", "мкмоль/л", 62, 115, 88, 0.22, 0, None, 700, True),
    LabTest("22664-7", "Urea [Moles/volume] in Serum or Plasma", "Мочевина",
            "mmol/L", "ммоль/л", 2.5, 8.3, 5.4, 0.3, 1, None, 35.0, True),
    LabTest("14933-6", "Urate [Moles/volume] in Serum or Plasma", "Мочевая кислота",
            "umol/L", "мкмоль/л", 150, 420, 310, 80, 0),
    LabTest("14631-6", "Bilirubin.total [Moles/volume] in Serum or Plasma", "Билирубин общий",
            "umol/L", "мкмоль/л", 3.4, 20.5, 11, 0.45, 1, None, 300, True),
    LabTest("1742-6", "Alanine aminotransferase [Enzymatic activity/volume] in Serum or Plasma",
            "АЛТ", "U/L", "Ед/л", 7, 40, 23, 0.5, 0, None, 1000, True),
    LabTest("1920-8", "Aspartate aminotransferase [Enzymatic activity/volume] in Serum or Plasma",
            "АСТ", "U/L", "Ед/л", 10, 40, 24, 0.4, 0, None, 1000, True),
    LabTest("6768-6", "Alkaline phosphatase [Enzymatic activity/volume] in Serum or Plasma",
            "Щелочная фосфатаза", "U/L", "Ед/л", 40, 130, 80, 0.3, 0, None, None, True),
    LabTest("2324-2", "Gamma glutamyl transferase [Enzymatic activity/volume] in Serum or Plasma",
            "ГГТ", "U/L", "Ед/л", 8, 61, 28, 0.6, 0, None, None, True),
    LabTest("2885-2", "Protein [Mass/volume] in Serum or Plasma", "Общий белок",
            "g/L", "г/л", 64, 83, 72, 5, 0),
    LabTest("1751-7", "Albumin [Mass/volume] in Serum or Plasma", "Альбумин",
            "g/L", "г/л", 35, 52, 43, 4, 0),
    LabTest("1988-5", "C reactive protein [Mass/volume] in Serum or Plasma", "С-реактивный белок",
            "mg/L", "мг/л", 0, 5, 2.2, 1.1, 1, None, None, True),
    LabTest("2823-3", "Potassium [Moles/volume] in Serum or Plasma", "Калий",
            "mmol/L", "ммоль/л", 3.5, 5.1, 4.3, 0.4, 1, 2.8, 6.2),
    LabTest("2951-2", "Sodium [Moles/volume] in Serum or Plasma", "Натрий",
            "mmol/L", "ммоль/л", 136, 145, 140, 2.5, 0, 120, 160),
    LabTest("2276-4", "Ferritin [Mass/volume] in Serum or Plasma", "Ферритин",
            "ug/L", "мкг/л", 20, 250, 80, 0.7, 0, None, None, True),
    # Lipids (липидный профиль)
    LabTest("14647-2", "Cholesterol [Moles/volume] in Serum or Plasma", "Холестерин общий",
            "mmol/L", "ммоль/л", 3.0, 5.2, 5.2, 1.1, 2),
    LabTest("14646-4", "Cholesterol in HDL [Moles/volume] in Serum or Plasma", "Холестерин ЛПВП",
            "mmol/L", "ммоль/л", 1.0, 2.2, 1.4, 0.35, 2),
    LabTest("39469-2", "Cholesterol in LDL [Moles/volume] in Serum or Plasma by calculation",
            "Холестерин ЛПНП (расчётный)", "mmol/L", "ммоль/л", 1.5, 3.0, 3.1, 0.9, 2),
    LabTest("14927-8", "Triglyceride [Moles/volume] in Serum or Plasma", "Триглицериды",
            "mmol/L", "ммоль/л", 0.5, 1.7, 1.3, 0.45, 2, None, None, True),
    # Endocrinology
    LabTest("3016-3", "Thyrotropin [Units/volume] in Serum or Plasma", "ТТГ",
            "m[IU]/L", "мМЕ/л", 0.4, 4.0, 1.8, 0.6, 2, None, None, True),
    LabTest("14920-3", "Thyroxine (T4) free [Moles/volume] in Serum or Plasma", "Т4 свободный",
            "pmol/L", "пмоль/л", 9.0, 19.0, 14, 2.6, 1),
    LabTest("4548-4", "Hemoglobin A1c/Hemoglobin.total in Blood", "Гликированный гемоглобин HbA1c",
            "%", "%", 4.0, 6.0, 5.6, 0.9, 1),
    # Coagulation
    LabTest("6301-6", "INR in Platelet poor plasma by Coagulation assay", "МНО",
            "{INR}", "", 0.8, 1.2, 1.05, 0.15, 2, None, 5.0),
)  # fmt: skip
LAB_TESTS_BY_LOINC: dict[str, LabTest] = {t.loinc: t for t in LAB_TESTS}

# Panels a DiagnosticReport groups: key → (LOINC panel code or None, Russian name, members).
LAB_PANELS: dict[str, tuple[str | None, str, str, tuple[str, ...]]] = {
    "cbc": ("58410-2", "CBC panel - Blood by Automated count", "Общий (клинический) анализ крови",
            ("718-7", "789-8", "4544-3", "6690-2", "777-3", "30341-2")),
    "biochem": ("24323-8", "Comprehensive metabolic 2000 panel - Serum or Plasma",
                "Биохимический анализ крови",
                ("14749-6", "14682-9", "22664-7", "14933-6", "14631-6", "1742-6", "1920-8",
                 "6768-6", "2324-2", "2885-2", "1751-7", "1988-5", "2823-3", "2951-2")),
    "lipid": ("24331-1", "Lipid 1996 panel - Serum or Plasma", "Липидный профиль",
              ("14647-2", "14646-4", "39469-2", "14927-8")),
    "thyroid": (None, "", "Гормоны щитовидной железы", ("3016-3", "14920-3")),
    "diabetes": (None, "", "Контроль сахарного диабета", ("4548-4", "14749-6")),
    "iron": (None, "", "Обмен железа", ("718-7", "2276-4")),
    "coag": (None, "", "Коагулограмма", ("6301-6",)),
}  # fmt: skip

_INTERPRETATION_DISPLAY = {
    "N": "Normal",
    "L": "Low",
    "H": "High",
    "LL": "Critical low",
    "HH": "Critical high",
}


def _lab_value(rng: random.Random, t: LabTest) -> float:
    roll = rng.random()
    # About 0.5 % of results are critical, where the test has critical limits.
    if roll < 0.005 and (t.critical_low is not None or t.critical_high is not None):
        if t.critical_high is not None and (t.critical_low is None or roll < 0.0025):
            return round(t.critical_high * rng.uniform(1.0, 1.4), t.decimals)
        assert t.critical_low is not None
        return round(t.critical_low * rng.uniform(0.6, 1.0), t.decimals)
    if t.lognormal:
        value = rng.lognormvariate(math.log(t.mean), t.sd)
    else:
        value = rng.gauss(t.mean, t.sd)
    floor = 10.0**-t.decimals
    return round(max(value, floor), t.decimals)


def interpret(t: LabTest, value: float) -> str:
    """v3 ObservationInterpretation code of ``value`` for test ``t``: N, L, H, LL or HH."""
    if t.critical_low is not None and value < t.critical_low:
        return "LL"
    if t.critical_high is not None and value > t.critical_high:
        return "HH"
    if value < t.low:
        return "L"
    if value > t.high:
        return "H"
    return "N"


def _quantity(value: float, t: LabTest) -> dict[str, Any]:
    q: dict[str, Any] = {"value": value, "system": UCUM, "code": t.ucum}
    if t.unit:
        q["unit"] = t.unit
    return q


def _num(x: float, decimals: int) -> float | int:
    return int(x) if decimals == 0 else x


def lab_observation(
    rng: random.Random,
    t: LabTest,
    subject_ref: str,
    effective: datetime,
    *,
    encounter_ref: str | None = None,
    performer: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A final laboratory Observation of test ``t`` for ``subject_ref`` taken at ``effective``."""
    value = _num(_lab_value(rng, t), t.decimals)
    code = interpret(t, value)
    issued = effective + timedelta(seconds=rng.randrange(3600, 8 * 3600))
    obs: dict[str, Any] = {
        "resourceType": "Observation",
        "status": "final",
        "category": [
            {
                "coding": [
                    {"system": OBSERVATION_CATEGORY, "code": "laboratory", "display": "Laboratory"}
                ]
            }
        ],
        "code": {
            "coding": [{"system": LOINC, "code": t.loinc, "display": t.display}],
            "text": t.text,
        },
        "subject": {"reference": subject_ref},
        "effectiveDateTime": fhir_datetime(effective),
        "issued": fhir_datetime(issued),
        "valueQuantity": _quantity(value, t),
        "interpretation": [
            {
                "coding": [
                    {
                        "system": INTERPRETATION_SYSTEM,
                        "code": code,
                        "display": _INTERPRETATION_DISPLAY[code],
                    }
                ]
            }
        ],
        "referenceRange": [
            {
                "low": _quantity(_num(t.low, t.decimals), t),
                "high": _quantity(_num(t.high, t.decimals), t),
            }
        ],
    }
    if encounter_ref is not None:
        obs["encounter"] = {"reference": encounter_ref}
    if performer is not None:
        obs["performer"] = [performer]
    return obs


def diagnostic_report(
    panel: str,
    subject_ref: str,
    effective: datetime,
    issued: datetime,
    result_refs: list[str],
    *,
    encounter_ref: str | None = None,
    performer: dict[str, Any] | None = None,
    conclusion: str | None = None,
) -> dict[str, Any]:
    """A final laboratory DiagnosticReport of ``panel`` grouping the ``result_refs``."""
    loinc, display, text, _ = LAB_PANELS[panel]
    coding = (
        {"system": LOINC, "code": loinc, "display": display}
        if loinc is not None
        else {"system": LAB_PANEL_SYSTEM, "code": panel, "display": text}
    )
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "status": "final",
        "category": [
            {
                "coding": [
                    {"system": DIAGNOSTIC_SERVICE_SECTION, "code": "LAB", "display": "Laboratory"}
                ]
            }
        ],
        "code": {"coding": [coding], "text": text},
        "subject": {"reference": subject_ref},
        "effectiveDateTime": fhir_datetime(effective),
        "issued": fhir_datetime(issued),
        "result": [{"reference": r} for r in result_refs],
    }
    if encounter_ref is not None:
        report["encounter"] = {"reference": encounter_ref}
    if performer is not None:
        report["performer"] = [performer]
    if conclusion:
        report["conclusion"] = conclusion
    return report


# --- vital signs ---------------------------------------------------------------------------


def _vital(loinc: str, display: str, text: str, subject_ref: str, effective: str) -> dict[str, Any]:
    return {
        "resourceType": "Observation",
        "status": "final",
        "category": [
            {
                "coding": [
                    {
                        "system": OBSERVATION_CATEGORY,
                        "code": "vital-signs",
                        "display": "Vital Signs",
                    }
                ]
            }
        ],
        "code": {"coding": [{"system": LOINC, "code": loinc, "display": display}], "text": text},
        "subject": {"reference": subject_ref},
        "effectiveDateTime": effective,
    }


def _vq(value: float | int, ucum: str, unit: str) -> dict[str, Any]:
    return {"value": value, "unit": unit, "system": UCUM, "code": ucum}


def vital_signs(
    rng: random.Random,
    subject_ref: str,
    effective: datetime,
    *,
    encounter_ref: str | None = None,
    age_years: int | None = None,
) -> list[dict[str, Any]]:
    """Vital signs taken at one visit: blood pressure panel, heart rate, temperature, SpO2,
    and for adults body weight, height and BMI (FHIR vital-signs profile codes)."""
    when = fhir_datetime(effective)
    adult = age_years is None or age_years >= 18
    systolic = int(rng.gauss(128 if adult else 105, 15))
    diastolic = int(min(systolic - 20, rng.gauss(80 if adult else 65, 9)))
    bp = _vital("85354-9", "Blood pressure panel with all children optional",
                "Артериальное давление", subject_ref, when)  # fmt: skip
    bp["component"] = [
        {
            "code": {
                "coding": [
                    {"system": LOINC, "code": "8480-6", "display": "Systolic blood pressure"}
                ],
                "text": "Систолическое давление",
            },
            "valueQuantity": _vq(systolic, "mm[Hg]", "мм рт. ст."),
        },
        {
            "code": {
                "coding": [
                    {"system": LOINC, "code": "8462-4", "display": "Diastolic blood pressure"}
                ],
                "text": "Диастолическое давление",
            },
            "valueQuantity": _vq(diastolic, "mm[Hg]", "мм рт. ст."),
        },
    ]
    hr = _vital("8867-4", "Heart rate", "Частота сердечных сокращений", subject_ref, when)
    hr["valueQuantity"] = _vq(int(rng.gauss(76, 11)), "/min", "уд/мин")
    temp = _vital("8310-5", "Body temperature", "Температура тела", subject_ref, when)
    temp["valueQuantity"] = _vq(round(rng.gauss(36.7, 0.35), 1), "Cel", "°C")
    spo2 = _vital("59408-5", "Oxygen saturation in Arterial blood by Pulse oximetry",
                  "Сатурация кислорода (SpO2)", subject_ref, when)  # fmt: skip
    spo2["valueQuantity"] = _vq(min(100, int(rng.gauss(97, 1.5))), "%", "%")
    out = [bp, hr, temp, spo2]
    if adult:
        height = round(rng.gauss(170, 9), 0)
        weight = round(max(40.0, rng.gauss(78, 15)), 1)
        w = _vital("29463-7", "Body weight", "Масса тела", subject_ref, when)
        w["valueQuantity"] = _vq(weight, "kg", "кг")
        h = _vital("8302-2", "Body height", "Рост", subject_ref, when)
        h["valueQuantity"] = _vq(int(height), "cm", "см")
        bmi = _vital("39156-5", "Body mass index (BMI) [Ratio]", "Индекс массы тела",
                     subject_ref, when)  # fmt: skip
        bmi["valueQuantity"] = _vq(round(weight / (height / 100) ** 2, 1), "kg/m2", "кг/м²")
        out += [w, h, bmi]
    for o in out:
        if encounter_ref is not None:
            o["encounter"] = {"reference": encounter_ref}
    return out


# --- diagnoses -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Diagnosis:
    """An МКБ-10 diagnosis with the lab panels and drugs that usually go with it."""

    code: str
    display: str  # as in НСИ МКБ-10 (1.2.643.5.1.13.13.11.1005)
    chronic: bool
    panels: tuple[str, ...]
    drugs: tuple[str, ...]  # ATC codes, see DRUGS
    min_age: int = 0


DIAGNOSES: tuple[Diagnosis, ...] = (
    Diagnosis("I10", "Эссенциальная [первичная] гипертензия", True, ("biochem",),
              ("C09AA02", "C08CA01", "C09CA01", "C03BA11"), 30),
    Diagnosis("I11.9", "Гипертензивная болезнь сердца без (застойной) сердечной недостаточности",
              True, ("biochem", "lipid"), ("C09AA02", "C07AB07"), 35),
    Diagnosis("I20.8", "Другие формы стенокардии", True, ("lipid", "biochem"),
              ("B01AC06", "C10AA05", "C07AB07"), 40),
    Diagnosis("I25.1", "Атеросклеротическая болезнь сердца", True, ("lipid",),
              ("B01AC06", "C10AA05"), 45),
    Diagnosis("I48", "Фибрилляция и трепетание предсердий", True, ("coag", "cbc"),
              ("B01AF02", "B01AA03", "C07AB07"), 45),
    Diagnosis("I63.9", "Инфаркт мозга неуточненный", False, ("cbc", "biochem", "coag", "lipid"),
              ("B01AC06", "C10AA05"), 45),
    Diagnosis("E11.9", "Инсулиннезависимый сахарный диабет без осложнений", True,
              ("diabetes", "biochem"), ("A10BA02", "A10BB09", "A10AE04"), 30),
    Diagnosis("E03.9", "Гипотиреоз неуточненный", True, ("thyroid",), ("H03AA01",), 18),
    Diagnosis("E66.9", "Ожирение неуточненное", True, ("biochem", "lipid"), (), 18),
    Diagnosis("E78.0", "Чистая гиперхолестеринемия", True, ("lipid",), ("C10AA05",), 30),
    Diagnosis("D50.9", "Железодефицитная анемия неуточненная", False, ("cbc", "iron"), ()),
    Diagnosis("J06.9", "Острая инфекция верхних дыхательных путей неуточненная", False,
              ("cbc",), ("N02BE01",)),
    Diagnosis("J18.9", "Пневмония неуточненная", False, ("cbc", "biochem"),
              ("J01CA04", "J01FA10")),
    Diagnosis("J20.9", "Острый бронхит неуточненный", False, ("cbc",), ("J01FA10", "N02BE01")),
    Diagnosis("J45.9", "Астма неуточненная", True, ("cbc",), ("R03AC02",)),
    Diagnosis("J44.9", "Хроническая обструктивная легочная болезнь неуточненная", True, ("cbc",),
              ("R03AC02",), 40),
    Diagnosis("K21.9", "Гастроэзофагеальный рефлюкс без эзофагита", True, ("cbc",),
              ("A02BC01", "A02BC02"), 18),
    Diagnosis("K29.7", "Гастрит неуточненный", False, ("cbc", "biochem"), ("A02BC01",), 12),
    Diagnosis("K80.2", "Камни желчного пузыря без холецистита", True, ("biochem",), (), 25),
    Diagnosis("N39.0", "Инфекция мочевыводящих путей без установленной локализации", False,
              ("cbc", "biochem"), ()),
    Diagnosis("M54.5", "Боль внизу спины", False, (), ("M01AE01",), 18),
    Diagnosis("M17.9", "Гонартроз неуточненный", True, ("cbc",), ("M01AE01",), 45),
    Diagnosis("U07.1", "COVID-19, вирус идентифицирован", False, ("cbc", "biochem", "coag"),
              ("N02BE01",)),
    Diagnosis("Z00.0", "Общий медицинский осмотр", False, ("cbc", "biochem", "lipid"), ()),
)  # fmt: skip
DIAGNOSES_BY_CODE: dict[str, Diagnosis] = {d.code: d for d in DIAGNOSES}


def condition(
    dx: Diagnosis,
    subject_ref: str,
    onset: datetime,
    *,
    encounter_ref: str | None = None,
    resolved: datetime | None = None,
) -> dict[str, Any]:
    """A confirmed Condition coded in МКБ-10 (active, or resolved at ``resolved``)."""
    status = "resolved" if resolved is not None else "active"
    cond: dict[str, Any] = {
        "resourceType": "Condition",
        "clinicalStatus": {"coding": [{"system": CONDITION_CLINICAL, "code": status}]},
        "verificationStatus": {"coding": [{"system": CONDITION_VERIFICATION, "code": "confirmed"}]},
        "category": [
            {
                "coding": [
                    {
                        "system": CONDITION_CATEGORY,
                        "code": "problem-list-item" if dx.chronic else "encounter-diagnosis",
                    }
                ]
            }
        ],
        "code": {
            "coding": [{"system": ICD10_SYSTEM, "code": dx.code, "display": dx.display}],
            "text": dx.display,
        },
        "subject": {"reference": subject_ref},
        "onsetDateTime": fhir_datetime(onset),
        "recordedDate": fhir_datetime(onset),
    }
    if encounter_ref is not None:
        cond["encounter"] = {"reference": encounter_ref}
    if resolved is not None:
        cond["abatementDateTime"] = fhir_datetime(resolved)
    return cond


# --- encounters ----------------------------------------------------------------------------

# key → (v3 ActCode class, class display, Russian type text, typical length in hours)
ENCOUNTER_KINDS: dict[str, tuple[str, str, str, int]] = {
    "visit": ("AMB", "ambulatory", "Приём врача в поликлинике", 1),
    "checkup": ("AMB", "ambulatory", "Диспансеризация", 2),
    "home": ("HH", "home health", "Вызов врача на дом", 1),
    "emergency": ("EMER", "emergency", "Обращение в приёмное отделение", 4),
    "inpatient": ("IMP", "inpatient encounter", "Госпитализация", 24 * 7),
}


def encounter(
    kind: str,
    subject_ref: str,
    start: datetime,
    end: datetime,
    *,
    service_provider: dict[str, Any] | None = None,
    reason: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """A finished Encounter of ``kind`` (see ENCOUNTER_KINDS) for ``subject_ref``."""
    act, act_display, text, _ = ENCOUNTER_KINDS[kind]
    enc: dict[str, Any] = {
        "resourceType": "Encounter",
        "status": "finished",
        "class": {"system": ACT_CODE_SYSTEM, "code": act, "display": act_display},
        "type": [
            {
                "coding": [{"system": ENCOUNTER_TYPE_SYSTEM, "code": kind, "display": text}],
                "text": text,
            }
        ],
        "subject": {"reference": subject_ref},
        "period": {"start": fhir_datetime(start), "end": fhir_datetime(end)},
    }
    if reason is not None:
        enc["reasonCode"] = [
            {
                "coding": [{"system": ICD10_SYSTEM, "code": reason[0], "display": reason[1]}],
                "text": reason[1],
            }
        ]
    if service_provider is not None:
        enc["serviceProvider"] = service_provider
    return enc


# --- medications ---------------------------------------------------------------------------

# ATC code → (INN as in the ATC index, Russian name and form, Russian dosage instruction)
DRUGS: dict[str, tuple[str, str, str]] = {
    "C09AA02": ("enalapril", "Эналаприл, таблетки 10 мг", "По 1 таблетке 2 раза в день"),
    "C08CA01": ("amlodipine", "Амлодипин, таблетки 5 мг", "По 1 таблетке 1 раз в день"),
    "C09CA01": ("losartan", "Лозартан, таблетки 50 мг", "По 1 таблетке 1 раз в день"),
    "C03BA11": ("indapamide", "Индапамид, таблетки 2,5 мг", "По 1 таблетке утром"),
    "C07AB07": ("bisoprolol", "Бисопролол, таблетки 5 мг", "По 1 таблетке утром"),
    "B01AC06": ("acetylsalicylic acid", "Ацетилсалициловая кислота, таблетки 75 мг",
                "По 1 таблетке 1 раз в день после еды"),
    "C10AA05": ("atorvastatin", "Аторвастатин, таблетки 20 мг", "По 1 таблетке вечером"),
    "B01AF02": ("apixaban", "Апиксабан, таблетки 5 мг", "По 1 таблетке 2 раза в день"),
    "B01AA03": ("warfarin", "Варфарин, таблетки 2,5 мг", "По схеме под контролем МНО"),
    "A10BA02": ("metformin", "Метформин, таблетки 850 мг", "По 1 таблетке 2 раза в день"),
    "A10BB09": ("gliclazide", "Гликлазид, таблетки с модифицированным высвобождением 60 мг",
                "По 1 таблетке утром во время завтрака"),
    "A10AE04": ("insulin glargine", "Инсулин гларгин, раствор 100 ЕД/мл",
                "20 ЕД подкожно 1 раз в день"),
    "H03AA01": ("levothyroxine sodium", "Левотироксин натрия, таблетки 50 мкг",
                "По 1 таблетке утром натощак"),
    "N02BE01": ("paracetamol", "Парацетамол, таблетки 500 мг",
                "По 1 таблетке при температуре выше 38,5 °C, не более 4 раз в день"),
    "J01CA04": ("amoxicillin", "Амоксициллин, капсулы 500 мг", "По 1 капсуле 3 раза в день 7 дней"),
    "J01FA10": ("azithromycin", "Азитромицин, таблетки 500 мг", "По 1 таблетке 1 раз в день 3 дня"),
    "R03AC02": ("salbutamol", "Сальбутамол, аэрозоль для ингаляций 100 мкг/доза",
                "По 1–2 ингаляции при приступе"),
    "A02BC01": ("omeprazole", "Омепразол, капсулы 20 мг", "По 1 капсуле утром натощак"),
    "A02BC02": ("pantoprazole", "Пантопразол, таблетки 40 мг", "По 1 таблетке утром натощак"),
    "M01AE01": ("ibuprofen", "Ибупрофен, таблетки 200 мг", "По 1 таблетке до 3 раз в день"),
}  # fmt: skip


def medication_request(
    atc: str,
    subject_ref: str,
    authored: datetime,
    *,
    active: bool,
    encounter_ref: str | None = None,
    reason_ref: str | None = None,
) -> dict[str, Any]:
    """A MedicationRequest (order) for the drug with ATC code ``atc``."""
    inn, text, dosage = DRUGS[atc]
    req: dict[str, Any] = {
        "resourceType": "MedicationRequest",
        "status": "active" if active else "completed",
        "intent": "order",
        "medicationCodeableConcept": {
            "coding": [{"system": ATC_SYSTEM, "code": atc, "display": inn}],
            "text": text,
        },
        "subject": {"reference": subject_ref},
        "authoredOn": fhir_datetime(authored),
        "dosageInstruction": [{"text": dosage}],
    }
    if encounter_ref is not None:
        req["encounter"] = {"reference": encounter_ref}
    if reason_ref is not None:
        req["reasonReference"] = [{"reference": reason_ref}]
    return req


# --- immunizations -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Vaccine:
    """A vaccine of the Russian national immunisation calendar (or given by epidemic indication)."""

    code: str
    cvx: str
    cvx_display: str
    text: str
    min_age_days: int
    max_age_days: int | None = None
    route: str = "IM"


VACCINES: tuple[Vaccine, ...] = (
    Vaccine("hepb", "08", "Hep B, adolescent or pediatric",
            "Вакцина против гепатита B рекомбинантная (Регевак B)", 0, 18 * 365),
    Vaccine("bcg", "19", "BCG", "Вакцина туберкулёзная (БЦЖ-М)", 3, 30, "ID"),
    Vaccine("dtp", "01", "DTP", "Вакцина АКДС (адсорбированная коклюшно-дифтерийно-столбнячная)",
            90, 4 * 365),
    Vaccine("ipv", "10", "IPV", "Вакцина полиомиелитная инактивированная", 90, 7 * 365),
    Vaccine("pcv", "133", "Pneumococcal conjugate PCV 13", "Вакцина пневмококковая (Превенар 13)",
            60, None),
    Vaccine("mmr", "03", "MMR", "Вакцина против кори, краснухи и паротита (Вактривир)",
            365, None, "SC"),
    Vaccine("td", "09", "Td (adult), adsorbed", "Анатоксин дифтерийно-столбнячный (АДС-М)",
            6 * 365, None),
    Vaccine("flu", "88", "influenza, unspecified formulation",
            "Вакцина гриппозная инактивированная (Ультрикс Квадри)", 180, None),
    Vaccine("covid", "213", "SARS-COV-2 (COVID-19) vaccine, UNSPECIFIED FORMULATION",
            "Гам-КОВИД-Вак (Спутник V)", 18 * 365, None),
)  # fmt: skip

_ROUTE_DISPLAY = {
    "IM": "Injection, intramuscular",
    "SC": "Injection, subcutaneous",
    "ID": "Injection, intradermal",
}
ROUTE_SYSTEM = "http://terminology.hl7.org/CodeSystem/v3-RouteOfAdministration"


def immunization(
    rng: random.Random,
    vaccine: Vaccine,
    patient_ref: str,
    occurrence: datetime,
    *,
    encounter_ref: str | None = None,
    performer: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A completed Immunization with ``vaccine`` given at ``occurrence``."""
    imm: dict[str, Any] = {
        "resourceType": "Immunization",
        "status": "completed",
        "vaccineCode": {
            "coding": [
                {"system": VACCINE_SYSTEM, "code": vaccine.code, "display": vaccine.text},
                {"system": CVX_SYSTEM, "code": vaccine.cvx, "display": vaccine.cvx_display},
            ],
            "text": vaccine.text,
        },
        "patient": {"reference": patient_ref},
        "occurrenceDateTime": fhir_datetime(occurrence),
        "primarySource": True,
        "lotNumber": f"{rng.randrange(100, 999)}-{rng.randrange(10, 99)}{rng.choice('АБВГДЕ')}",
        "route": {
            "coding": [
                {
                    "system": ROUTE_SYSTEM,
                    "code": vaccine.route,
                    "display": _ROUTE_DISPLAY[vaccine.route],
                }
            ]
        },
        "doseQuantity": {"value": 0.5, "unit": "мл", "system": UCUM, "code": "mL"},
    }
    if encounter_ref is not None:
        imm["encounter"] = {"reference": encounter_ref}
    if performer is not None:
        imm["performer"] = [{"actor": performer}]
    return imm


# --- allergies -----------------------------------------------------------------------------

# code → (Russian substance, category, typical reaction)
ALLERGENS: dict[str, tuple[str, str, str]] = {
    "penicillin": ("Пенициллины", "medication", "Крапивница"),
    "amoxicillin": ("Амоксициллин", "medication", "Кожная сыпь"),
    "aspirin": ("Ацетилсалициловая кислота", "medication", "Бронхоспазм"),
    "sulfonamide": ("Сульфаниламиды", "medication", "Кожная сыпь"),
    "iodine-contrast": ("Йодсодержащие рентгеноконтрастные средства", "medication", "Отёк Квинке"),
    "lidocaine": ("Лидокаин", "medication", "Анафилактическая реакция"),
    "peanut": ("Арахис", "food", "Отёк Квинке"),
    "egg": ("Куриное яйцо", "food", "Крапивница"),
    "citrus": ("Цитрусовые", "food", "Кожная сыпь"),
    "birch-pollen": ("Пыльца берёзы", "environment", "Аллергический ринит"),
    "house-dust-mite": ("Клещ домашней пыли", "environment", "Аллергический ринит"),
    "cat-dander": ("Эпителий кошки", "environment", "Конъюнктивит"),
    "latex": ("Латекс", "environment", "Контактный дерматит"),
    "bee-venom": ("Яд пчелы", "environment", "Анафилактическая реакция"),
}


def allergy(code: str, patient_ref: str, recorded: datetime) -> dict[str, Any]:
    """An active, confirmed AllergyIntolerance to the allergen ``code`` (see ALLERGENS)."""
    text, category, reaction = ALLERGENS[code]
    severe = reaction in ("Анафилактическая реакция", "Отёк Квинке")
    return {
        "resourceType": "AllergyIntolerance",
        "clinicalStatus": {"coding": [{"system": ALLERGY_CLINICAL, "code": "active"}]},
        "verificationStatus": {"coding": [{"system": ALLERGY_VERIFICATION, "code": "confirmed"}]},
        "type": "allergy",
        "category": [category],
        "criticality": "high" if severe else "low",
        "code": {
            "coding": [{"system": ALLERGEN_SYSTEM, "code": code, "display": text}],
            "text": text,
        },
        "patient": {"reference": patient_ref},
        "recordedDate": fhir_datetime(recorded),
        "reaction": [
            {
                "manifestation": [{"text": reaction}],
                "severity": "severe" if severe else "mild",
            }
        ],
    }
