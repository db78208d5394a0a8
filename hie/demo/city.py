"""The demo city: St Petersburg's districts and streets, and ~30 medical organisations (MOs).

The MO table is fixed (it does not depend on the seed) so that ids (``mo-0001``), ФРМО OIDs,
HL7 sending facilities and DICOM AE titles are stable across runs and can be named in tests.
Each MO becomes an Organization (identifier = its ФРМО OID) with the Endpoints it manages: an
``hl7v2-mllp`` Endpoint whose identifier is its HL7 sending facility (MSH-4), and for MOs that
send images a ``dicom-dimse`` Endpoint (the hub's own code system) with address
``dicom://AE_TITLE@host:port``. Practitioners and their roles come from the generator's seed.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

from hie.demo import identifiers, names

# The registration conventions (identifier and connection-type systems) are the facility
# registry's: the demo registers its MOs exactly the way a real MO would.
from hie.registries.facility import (
    DICOM_AE_TITLE_SYSTEM,
    ENDPOINT_PAYLOAD_TYPE_SYSTEM,
    HL7_FACILITY_SYSTEM,
    patient_id_system_identifier,
)
from hie.registries.facility import (
    HIE_CONNECTION_TYPE_SYSTEM as HIE_ENDPOINT_CONNECTION_TYPE_SYSTEM,
)
from hie.registries.facility import (
    HL7_CONNECTION_TYPE_SYSTEM as HL7_ENDPOINT_CONNECTION_TYPE_SYSTEM,
)

ORGANIZATION_TYPE_SYSTEM = "http://terminology.hl7.org/CodeSystem/organization-type"
MO_KIND_SYSTEM = "https://hie.spb.ru/fhir/CodeSystem/mo-kind"
PRACTITIONER_ROLE_SYSTEM = "http://terminology.hl7.org/CodeSystem/practitioner-role"
SPECIALTY_SYSTEM = "https://hie.spb.ru/fhir/CodeSystem/medical-specialty"

CITY = "Санкт-Петербург"

MoKind = Literal[
    "polyclinic",
    "childrens-polyclinic",
    "womens-clinic",
    "hospital",
    "laboratory",
    "diagnostic-centre",
    "dispensary",
]

MO_KIND_DISPLAY: dict[str, str] = {
    "polyclinic": "Поликлиника",
    "childrens-polyclinic": "Детская поликлиника",
    "womens-clinic": "Женская консультация",
    "hospital": "Больница",
    "laboratory": "Клинико-диагностическая лаборатория",
    "diagnostic-centre": "Консультативно-диагностический центр",
    "dispensary": "Диспансер",
}

# District (район) → streets with a postal code on each: real names, plausible codes.
DISTRICT_STREETS: dict[str, tuple[tuple[str, str], ...]] = {
    "Адмиралтейский район": (
        ("Садовая ул.", "190068"),
        ("Лермонтовский пр.", "190103"),
        ("ул. Декабристов", "190121"),
    ),
    "Василеостровский район": (
        ("Большой пр. В.О.", "199106"),
        ("Средний пр. В.О.", "199178"),
        ("ул. Наличная", "199226"),
    ),
    "Выборгский район": (
        ("пр. Просвещения", "194354"),
        ("пр. Энгельса", "194156"),
        ("ул. Сантьяго-де-Куба", "194291"),
    ),
    "Калининский район": (
        ("Гражданский пр.", "195220"),
        ("пр. Науки", "195256"),
        ("ул. Вавиловых", "195257"),
    ),
    "Кировский район": (
        ("пр. Стачек", "198097"),
        ("Ленинский пр.", "198332"),
        ("ул. Маршала Казакова", "198261"),
    ),
    "Колпинский район": (("ул. Труда", "196655"), ("Тверская ул.", "196657")),
    "Красногвардейский район": (
        ("Заневский пр.", "195112"),
        ("Среднеохтинский пр.", "195027"),
        ("пр. Энергетиков", "195248"),
    ),
    "Красносельский район": (
        ("пр. Ветеранов", "198329"),
        ("ул. Партизана Германа", "198205"),
        ("пр. Ленина (Красное Село)", "198320"),
    ),
    "Кронштадтский район": (("Советская ул. (Кронштадт)", "197760"),),
    "Курортный район": (("ул. Токарева (Сестрорецк)", "197706"), ("Приморское ш.", "197720")),
    "Московский район": (
        ("Московский пр.", "196084"),
        ("ул. Благодатная", "196105"),
        ("Ленинский пр.", "196240"),
    ),
    "Невский район": (
        ("пр. Большевиков", "193231"),
        ("ул. Коллонтай", "193230"),
        ("пр. Обуховской Обороны", "192012"),
    ),
    "Петроградский район": (
        ("Каменноостровский пр.", "197101"),
        ("Большой пр. П.С.", "197198"),
        ("ул. Льва Толстого", "197022"),
    ),
    "Петродворцовый район": (("Санкт-Петербургский пр. (Петергоф)", "198510"),),
    "Приморский район": (
        ("Комендантский пр.", "197371"),
        ("Богатырский пр.", "197348"),
        ("ул. Савушкина", "197374"),
    ),
    "Пушкинский район": (("Московская ул. (Пушкин)", "196601"), ("Октябрьский бульв.", "196607")),
    "Фрунзенский район": (
        ("пр. Славы", "192241"),
        ("Бухарестская ул.", "192071"),
        ("Будапештская ул.", "192242"),
    ),
    "Центральный район": (
        ("Невский пр.", "191025"),
        ("Литейный пр.", "191014"),
        ("ул. Марата", "191002"),
    ),
}
DISTRICTS: tuple[str, ...] = tuple(DISTRICT_STREETS)


@dataclass(frozen=True, slots=True)
class MoInfo:
    """One demo medical organisation: everything needed to name it in messages and tests."""

    id: str
    oid: str
    name: str
    short_name: str
    kind: MoKind
    district: str
    street: str
    house: str
    postal_code: str
    hl7_facility: str
    ae_title: str | None = None
    dicom_port: int | None = None
    parent_id: str | None = None

    @property
    def mrn_system(self) -> str:
        """Identifier system of this MO's local medical record numbers."""
        return identifiers.mrn_system(self.oid)

    @property
    def reference(self) -> str:
        """``Organization/<id>``."""
        return f"Organization/{self.id}"

    @property
    def treats_patients(self) -> bool:
        """True for MOs that keep patient charts (not pure laboratories)."""
        return self.kind != "laboratory"


def _mo_table() -> tuple[MoInfo, ...]:
    # (name, short, kind, district index into that district's streets, house, facility, AE, parent)
    rows: list[tuple[str, str, MoKind, str, int, str, str, str | None, int | None]] = [
        ("СПб ГБУЗ «Городская поликлиника № 12»", "ГП № 12", "polyclinic",
         "Кировский район", 0, "12", "GP12LAB", "GP12XR", None),
        ("СПб ГБУЗ «Городская поликлиника № 3»", "ГП № 3", "polyclinic",
         "Василеостровский район", 1, "38", "GP3LAB", None, None),
        ("СПб ГБУЗ «Городская поликлиника № 17»", "ГП № 17", "polyclinic",
         "Красногвардейский район", 1, "51", "GP17LAB", None, None),
        ("СПб ГБУЗ «Городская поликлиника № 25 Невского района»", "ГП № 25", "polyclinic",
         "Невский район", 0, "27", "GP25LAB", "GP25XR", None),
        ("СПб ГБУЗ «Городская поликлиника № 32»", "ГП № 32", "polyclinic",
         "Петроградский район", 0, "14", "GP32LAB", None, None),
        ("СПб ГБУЗ «Городская поликлиника № 37»", "ГП № 37", "polyclinic",
         "Центральный район", 2, "18", "GP37LAB", None, None),
        ("СПб ГБУЗ «Городская поликлиника № 44»", "ГП № 44", "polyclinic",
         "Фрунзенский район", 1, "15", "GP44LAB", None, None),
        ("СПб ГБУЗ «Городская поликлиника № 51»", "ГП № 51", "polyclinic",
         "Московский район", 1, "20", "GP51LAB", "GP51XR", None),
        ("СПб ГБУЗ «Городская поликлиника № 54»", "ГП № 54", "polyclinic",
         "Калининский район", 0, "90", "GP54LAB", None, None),
        ("СПб ГБУЗ «Городская поликлиника № 60 Пушкинского района»", "ГП № 60", "polyclinic",
         "Пушкинский район", 0, "15", "GP60LAB", None, None),
        ("СПб ГБУЗ «Городская поликлиника № 71»", "ГП № 71", "polyclinic",
         "Колпинский район", 0, "7", "GP71LAB", None, None),
        ("СПб ГБУЗ «Городская поликлиника № 98»", "ГП № 98", "polyclinic",
         "Приморский район", 0, "4", "GP98LAB", None, None),
        ("СПб ГБУЗ «Городская поликлиника № 104»", "ГП № 104", "polyclinic",
         "Выборгский район", 0, "53", "GP104LAB", "GP104XR", None),
        ("СПб ГБУЗ «Городская поликлиника № 106»", "ГП № 106", "polyclinic",
         "Красносельский район", 0, "89", "GP106LAB", None, None),
        ("Поликлиническое отделение № 30 СПб ГБУЗ «Городская поликлиника № 104»", "ПО № 30",
         "polyclinic", "Выборгский район", 1, "111", "GP104PO30", None, 12),
        ("Женская консультация № 22 СПб ГБУЗ «Городская поликлиника № 37»", "ЖК № 22",
         "womens-clinic", "Центральный район", 0, "88", "GP37ZK22", None, 5),
        ("СПб ГБУЗ «Детская городская поликлиника № 11»", "ДГП № 11", "childrens-polyclinic",
         "Калининский район", 1, "16", "DGP11LAB", None, None),
        ("СПб ГБУЗ «Детская городская поликлиника № 44»", "ДГП № 44", "childrens-polyclinic",
         "Выборгский район", 2, "4", "DGP44LAB", None, None),
        ("СПб ГБУЗ «Городская многопрофильная больница № 2»", "ГМБ № 2", "hospital",
         "Выборгский район", 1, "5", "GMB2LAB", "GMB2CT", None),
        ("СПб ГБУЗ «Городская Мариинская больница»", "Мариинская больница", "hospital",
         "Центральный район", 1, "56", "MARIINSKLAB", "MARIINSKCT", None),
        ("СПб ГБУЗ «Елизаветинская больница»", "Елизаветинская больница", "hospital",
         "Калининский район", 2, "14", "ELIZLAB", "ELIZMR", None),
        ("СПб ГБУЗ «Александровская больница»", "Александровская больница", "hospital",
         "Невский район", 2, "4", "ALEXLAB", "ALEXCT", None),
        ("СПб ГБУЗ «Городская больница № 40 Курортного района»", "ГБ № 40", "hospital",
         "Курортный район", 0, "9", "GB40LAB", "GB40CT", None),
        ("СПб ГБУЗ «Городская больница № 26»", "ГБ № 26", "hospital",
         "Московский район", 0, "2", "GB26LAB", "GB26CT", None),
        ("СПб ГБУЗ «Детская городская больница № 1»", "ДГБ № 1", "hospital",
         "Красносельский район", 1, "14", "DGB1LAB", "DGB1MR", None),
        ("Централизованная клинико-диагностическая лаборатория СПб ГБУЗ «Городская "
         "многопрофильная больница № 2»", "ЦКДЛ ГМБ № 2", "laboratory",
         "Выборгский район", 1, "5", "GMB2CKDL", None, 18),
        ("СПб ГБУЗ «Городской клинико-диагностический лабораторный центр»", "ГКДЛЦ",
         "laboratory", "Адмиралтейский район", 1, "24", "GKDLC", None, None),
        ("ООО «Северо-Западный лабораторный центр»", "СЗЛЦ", "laboratory",
         "Приморский район", 2, "41", "SZLC", None, None),
        ("СПб ГБУЗ «Консультативно-диагностический центр № 85»", "КДЦ № 85",
         "diagnostic-centre", "Кировский район", 2, "24", "KDC85LAB", "KDC85MR", None),
        ("СПб ГБУЗ «Городской клинический онкологический диспансер»", "ГКОД", "dispensary",
         "Адмиралтейский район", 0, "3", "GKODLAB", "GKODPET", None),
    ]  # fmt: skip
    mos: list[MoInfo] = []
    for i, (name, short, kind, district, street_i, house, facility, ae, parent) in enumerate(
        rows, start=1
    ):
        street, postal = DISTRICT_STREETS[district][street_i]
        mos.append(
            MoInfo(
                id=f"mo-{i:04d}",
                oid=f"{identifiers.SPB_MO_OID_ROOT}.{8100 + 11 * i}",
                name=name,
                short_name=short,
                kind=kind,
                district=district,
                street=street,
                house=house,
                postal_code=postal,
                hl7_facility=facility,
                ae_title=ae,
                dicom_port=11200 + i if ae else None,
                parent_id=f"mo-{parent + 1:04d}" if parent is not None else None,
            )
        )
    return tuple(mos)


MOS: tuple[MoInfo, ...] = _mo_table()
MOS_BY_ID: dict[str, MoInfo] = {mo.id: mo for mo in MOS}


def mo_by_facility(hl7_facility: str) -> MoInfo | None:
    """The demo MO whose HL7 sending facility (MSH-4) is ``hl7_facility``, if any."""
    for mo in MOS:
        if mo.hl7_facility == hl7_facility:
            return mo
    return None


def _mo_address(mo: MoInfo) -> dict[str, Any]:
    line = f"{mo.street}, д. {mo.house}"
    return {
        "use": "work",
        "type": "physical",
        "text": f"{mo.postal_code}, г. {CITY}, {line}",
        "line": [line],
        "city": CITY,
        "district": mo.district,
        "state": CITY,
        "postalCode": mo.postal_code,
        "country": "RU",
    }


def organization(mo: MoInfo) -> dict[str, Any]:
    """The Organization resource of ``mo`` (id ``mo-NNNN``, identifier = its ФРМО OID)."""
    org: dict[str, Any] = {
        "resourceType": "Organization",
        "id": mo.id,
        "identifier": [
            {"use": "official", "system": identifiers.FRMO_SYSTEM, "value": mo.oid},
            # the MO's local patient ids (MRNs), registered as hie.registries.facility says
            patient_id_system_identifier(mo.mrn_system),
        ],
        "active": True,
        "type": [
            {
                "coding": [
                    {
                        "system": ORGANIZATION_TYPE_SYSTEM,
                        "code": "prov",
                        "display": "Healthcare Provider",
                    },
                    {
                        "system": MO_KIND_SYSTEM,
                        "code": mo.kind,
                        "display": MO_KIND_DISPLAY[mo.kind],
                    },
                ],
                "text": MO_KIND_DISPLAY[mo.kind],
            }
        ],
        "name": mo.name,
        "alias": [mo.short_name],
        "telecom": [
            {
                "system": "phone",
                "value": f"+7812{(int(mo.oid.rsplit('.', 1)[1]) * 7919) % 10**7:07d}",
                "use": "work",
            }
        ],
        "address": [_mo_address(mo)],
    }
    if mo.parent_id is not None:
        org["partOf"] = {"reference": f"Organization/{mo.parent_id}"}
    return org


def endpoints(mo: MoInfo) -> list[dict[str, Any]]:
    """The Endpoints ``mo`` manages: HL7 v2 over MLLP, and DICOM DIMSE for imaging MOs."""
    n = int(mo.id.split("-")[1])
    eps: list[dict[str, Any]] = [
        {
            "resourceType": "Endpoint",
            "id": f"ep-{n:04d}-mllp",
            "identifier": [{"system": HL7_FACILITY_SYSTEM, "value": mo.hl7_facility}],
            "status": "active",
            "connectionType": {
                "system": HL7_ENDPOINT_CONNECTION_TYPE_SYSTEM,
                "code": "hl7v2-mllp",
                "display": "HL7 v2 MLLP",
            },
            "name": f"{mo.short_name}: HL7 v2 (MLLP)",
            "managingOrganization": {"reference": mo.reference, "display": mo.short_name},
            "payloadType": [
                {
                    "coding": [
                        {"system": ENDPOINT_PAYLOAD_TYPE_SYSTEM, "code": "any", "display": "Any"}
                    ]
                }
            ],
            "payloadMimeType": ["x-application/hl7-v2+er7"],
            "address": f"mllp://127.0.0.1:{21000 + n}",
        }
    ]
    if mo.ae_title is not None and mo.dicom_port is not None:
        eps.append(
            {
                "resourceType": "Endpoint",
                "id": f"ep-{n:04d}-dimse",
                "identifier": [{"system": DICOM_AE_TITLE_SYSTEM, "value": mo.ae_title}],
                "status": "active",
                "connectionType": {
                    "system": HIE_ENDPOINT_CONNECTION_TYPE_SYSTEM,
                    "code": "dicom-dimse",
                    "display": "DICOM DIMSE (C-STORE, C-FIND, C-MOVE, C-GET)",
                },
                "name": f"{mo.short_name}: DICOM",
                "managingOrganization": {"reference": mo.reference, "display": mo.short_name},
                "payloadType": [
                    {
                        "coding": [
                            {
                                "system": ENDPOINT_PAYLOAD_TYPE_SYSTEM,
                                "code": "any",
                                "display": "Any",
                            }
                        ]
                    }
                ],
                "payloadMimeType": ["application/dicom"],
                "address": f"dicom://{mo.ae_title}@127.0.0.1:{mo.dicom_port}",
            }
        )
    return eps


# (code, display) of the specialties each kind of MO employs.
_SPECIALTIES: dict[str, tuple[tuple[str, str], ...]] = {
    "polyclinic": (
        ("therapist", "Терапевт участковый"),
        ("general-practice", "Врач общей практики"),
        ("cardiology", "Кардиолог"),
        ("endocrinology", "Эндокринолог"),
        ("neurology", "Невролог"),
        ("ophthalmology", "Офтальмолог"),
        ("otorhinolaryngology", "Оториноларинголог"),
        ("surgery", "Хирург"),
    ),
    "childrens-polyclinic": (
        ("paediatrics", "Педиатр участковый"),
        ("paediatric-neurology", "Невролог детский"),
        ("ophthalmology", "Офтальмолог"),
    ),
    "womens-clinic": (("obstetrics-gynaecology", "Акушер-гинеколог"),),
    "hospital": (
        ("therapy", "Терапевт"),
        ("cardiology", "Кардиолог"),
        ("surgery", "Хирург"),
        ("anaesthesiology", "Анестезиолог-реаниматолог"),
        ("neurology", "Невролог"),
        ("pulmonology", "Пульмонолог"),
    ),
    "laboratory": (("clinical-laboratory", "Врач клинической лабораторной диагностики"),),
    "diagnostic-centre": (
        ("cardiology", "Кардиолог"),
        ("endocrinology", "Эндокринолог"),
        ("functional-diagnostics", "Врач функциональной диагностики"),
    ),
    "dispensary": (("oncology", "Онколог"), ("surgery", "Хирург")),
}
_RADIOLOGY = ("radiology", "Рентгенолог")


@dataclass(slots=True)
class CityData:
    """Organizations, Endpoints, Practitioners and PractitionerRoles of the demo city.

    Every resource has a deterministic id (``mo-0001``, ``ep-0001-mllp``, ``pr-0001``,
    ``prr-0001``) so it can be PUT; :meth:`resources` yields them in an order where anything
    referenced comes first.
    """

    mos: tuple[MoInfo, ...]
    organizations: list[dict[str, Any]] = field(default_factory=list)
    endpoints: list[dict[str, Any]] = field(default_factory=list)
    practitioners: list[dict[str, Any]] = field(default_factory=list)
    roles: list[dict[str, Any]] = field(default_factory=list)

    def resources(self) -> Iterator[dict[str, Any]]:
        """All resources, referenced ones first (parent MOs before their departments)."""
        yield from self.organizations
        yield from self.endpoints
        yield from self.practitioners
        yield from self.roles


def build_city(rng: random.Random) -> CityData:
    """Build the demo city; practitioners' names and numbers come from ``rng``."""
    city = CityData(mos=MOS)
    # Parents first, so a PUT of each in turn never references an absent Organization.
    ordered = sorted(MOS, key=lambda mo: (mo.parent_id is not None, mo.id))
    city.organizations = [organization(mo) for mo in ordered]
    for mo in MOS:
        city.endpoints.extend(endpoints(mo))
    pr_n = 0
    for mo in MOS:
        specialties = list(_SPECIALTIES[mo.kind])
        if mo.ae_title is not None:
            specialties.append(_RADIOLOGY)
        for code, display in specialties:
            for _ in range(1 if mo.kind in ("laboratory", "womens-clinic") else rng.randint(1, 2)):
                pr_n += 1
                practitioner, role = _practitioner(rng, pr_n, mo, code, display)
                city.practitioners.append(practitioner)
                city.roles.append(role)
    return city


def _practitioner(
    rng: random.Random, n: int, mo: MoInfo, code: str, display: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    gender: Literal["male", "female"] = "female" if rng.random() < 0.7 else "male"
    given_table = names.FEMALE_GIVEN_NAMES if gender == "female" else names.MALE_GIVEN_NAMES
    family = names.family_for(rng.choice(names.MALE_FAMILY_NAMES), gender)
    given = rng.choice(given_table)
    patronymic = names.patronymic(rng.choice(names.MALE_GIVEN_NAMES), gender)
    pid = f"pr-{n:04d}"
    practitioner: dict[str, Any] = {
        "resourceType": "Practitioner",
        "id": pid,
        "identifier": [identifiers.snils_identifier(identifiers.random_snils(rng))],
        "active": True,
        "name": [
            {
                "use": "official",
                "text": f"{family} {given} {patronymic}",
                "family": family,
                "given": [given, patronymic],
            }
        ],
        "gender": gender,
        "birthDate": f"{rng.randint(1955, 1998)}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
    }
    role: dict[str, Any] = {
        "resourceType": "PractitionerRole",
        "id": f"prr-{n:04d}",
        "active": True,
        "practitioner": {
            "reference": f"Practitioner/{pid}",
            "display": f"{family} {given[0]}. {patronymic[0]}.",
        },
        "organization": {"reference": mo.reference, "display": mo.short_name},
        "code": [
            {
                "coding": [
                    {"system": PRACTITIONER_ROLE_SYSTEM, "code": "doctor", "display": "Doctor"}
                ],
                "text": "Врач",
            }
        ],
        "specialty": [
            {
                "coding": [{"system": SPECIALTY_SYSTEM, "code": code, "display": display}],
                "text": display,
            }
        ],
    }
    return practitioner, role
