"""Synthetic medical documents for the demo city and the document benchmark: Russian clinical
text (discharge summaries, visit protocols, referrals, imaging reports) as PDF with a text layer,
as CDA R2 and as plain text, deterministic by the generator's ``random.Random``.

Sections follow the usual shape of a Russian discharge summary (жалобы, анамнез, объективный
статус, диагноз по МКБ-10, обследования, лечение, рекомендации); a document grows to the size
asked for with a daily observation diary, as long inpatient records do. :func:`record_document`
writes one document of a patient's record instead: its kind, diagnosis, MO and dates given, the
complaints, drugs and imaging findings fitting that diagnosis (the demo city). PDFs use Helvetica
re-encoded through ``/Differences`` so Cyrillic is stored as single bytes and read back as
Unicode, with no embedded font.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeVar
from xml.sax.saxutils import escape

from hie.demo.clinical import DIAGNOSES, DRUGS, LOINC, Diagnosis

CDA_TYPE_ID = "2.16.840.1.113883.1.3"


@dataclass(frozen=True, slots=True)
class DocumentKind:
    """A kind of clinical document: its LOINC type, class (category) and Russian title."""

    loinc: str
    title: str
    category: str
    category_title: str


KINDS: tuple[DocumentKind, ...] = (
    DocumentKind("18842-5", "Выписной эпикриз", "18842-5", "Выписной эпикриз"),
    DocumentKind("11506-3", "Протокол осмотра врача", "11488-4", "Консультативное заключение"),
    DocumentKind("57133-1", "Направление на консультацию", "57133-1", "Направление"),
    DocumentKind("18748-4", "Протокол инструментального исследования", "18748-4", "Диагностика"),
)
DISCHARGE_SUMMARY, VISIT_PROTOCOL, REFERRAL, IMAGING_REPORT = KINDS

_COMPLAINTS = (
    "кашель с отделением мокроты",
    "повышение температуры тела до 38,5 °C",
    "общую слабость и быструю утомляемость",
    "одышку при умеренной физической нагрузке",
    "головную боль в затылочной области",
    "боли в эпигастрии после еды",
    "боли в поясничной области",
    "сердцебиение и перебои в работе сердца",
    "отёки нижних конечностей к вечеру",
    "жажду и учащённое мочеиспускание",
)
_FINDINGS = (
    "Состояние средней степени тяжести. Сознание ясное.",
    "Кожные покровы обычной окраски, умеренной влажности.",
    "Дыхание везикулярное, хрипов нет. ЧДД {rr} в минуту.",
    "Тоны сердца ритмичные, приглушены. ЧСС {hr} уд/мин, АД {sys}/{dia} мм рт. ст.",
    "Живот мягкий, безболезненный при пальпации. Печень не увеличена.",
    "Симптом поколачивания отрицательный с обеих сторон. Отёков нет.",
    "В нижних отделах лёгких справа выслушиваются влажные мелкопузырчатые хрипы.",
)
_TREATMENT = (
    "амоксициллин 500 мг 3 раза в сутки",
    "кларитромицин 500 мг 2 раза в сутки",
    "эналаприл 10 мг 2 раза в сутки",
    "аторвастатин 20 мг вечером",
    "метформин 1000 мг 2 раза в сутки",
    "омепразол 20 мг утром натощак",
    "ацетилсалициловая кислота 75 мг в сутки",
    "парацетамол 500 мг при температуре выше 38,5 °C",
)
_ADVICE = (
    "Наблюдение участкового терапевта по месту жительства.",
    "Контроль общего анализа крови через 10 дней.",
    "Соблюдение диеты с ограничением соли и животных жиров.",
    "Контроль артериального давления ежедневно, ведение дневника.",
    "Повторная рентгенография органов грудной клетки через 4 недели.",
    "Листок нетрудоспособности продлён до окончания лечения.",
)
_LABS = (
    ("Гемоглобин", "г/л", 110, 160),
    ("Лейкоциты", "10^9/л", 4, 14),
    ("СОЭ", "мм/ч", 2, 40),
    ("Глюкоза", "ммоль/л", 4, 9),
    ("Креатинин", "мкмоль/л", 60, 120),
    ("С-реактивный белок", "мг/л", 1, 60),
    ("Холестерин общий", "ммоль/л", 3, 7),
)
_DIARY = (
    "Состояние с положительной динамикой. Температура тела {t} °C.",
    "Жалобы на слабость уменьшились, кашель стал реже.",
    "АД {sys}/{dia} мм рт. ст., ЧСС {hr} уд/мин. Лечение переносит удовлетворительно.",
    "Аппетит сохранён, стул и диурез в норме. Продолжает назначенную терапию.",
    "Осмотрен заведующим отделением, план лечения согласован.",
)


@dataclass(frozen=True, slots=True)
class ClinicalDocument:
    """One generated document: kind, diagnosis, date, title and its sections of text."""

    kind: DocumentKind
    diagnosis: Diagnosis
    date: datetime
    title: str
    sections: tuple[tuple[str, tuple[str, ...]], ...]

    def text(self) -> str:
        """The document as plain text."""
        parts = [self.title, ""]
        for heading, paragraphs in self.sections:
            parts.extend([heading.upper(), *paragraphs, ""])
        return "\n".join(parts)


def clinical_document(
    rng: random.Random,
    when: datetime,
    target_bytes: int,
    kind: DocumentKind | None = None,
    *,
    diagnosis: Diagnosis | None = None,
) -> ClinicalDocument:
    """A document of about ``target_bytes`` of UTF-8 text (at least the basic sections);
    ``diagnosis`` defaults to one drawn from ``rng``."""
    kind = kind or rng.choice(KINDS)
    dx = diagnosis or rng.choice(DIAGNOSES)
    vitals = {"rr": rng.randint(14, 24), "hr": rng.randint(60, 110)}
    vitals |= {"sys": rng.randint(105, 170), "dia": rng.randint(65, 100)}
    complaints = ", ".join(rng.sample(_COMPLAINTS, 3))
    sections: list[tuple[str, tuple[str, ...]]] = [
        ("Жалобы", (f"При поступлении предъявлял(а) жалобы на {complaints}.",)),
        (
            "Анамнез заболевания",
            (
                f"Заболел(а) остро {rng.randint(2, 14)} дней назад. Самостоятельно принимал(а) "
                "жаропонижающие без эффекта. Обратился(ась) в поликлинику по месту жительства, "
                "направлен(а) на госпитализацию.",
            ),
        ),
        ("Объективный статус", tuple(f.format(**vitals) for f in rng.sample(_FINDINGS, 4))),
        ("Диагноз", (f"Основной: {dx.display} ({dx.code}).",)),
        (
            "Лабораторные исследования",
            tuple(
                f"{name}: {rng.uniform(lo, hi):.1f} {unit}"
                for name, unit, lo, hi in rng.sample(_LABS, 5)
            ),
        ),
        ("Лечение", tuple(f"{t}." for t in rng.sample(_TREATMENT, 3))),
        ("Рекомендации", tuple(rng.sample(_ADVICE, 3))),
    ]
    size = sum(len(p.encode()) for _, ps in sections for p in ps)
    diary: list[str] = []
    day = when - timedelta(days=1)
    while size < target_bytes:
        day -= timedelta(hours=rng.randint(6, 24))
        vitals["t"] = round(rng.uniform(36.4, 38.2), 1)  # type: ignore[assignment]
        entry = f"{day:%d.%m.%Y %H:%M}. " + " ".join(
            d.format(**vitals) for d in rng.sample(_DIARY, 3)
        )
        diary.append(entry)
        size += len(entry.encode()) + 1
    if diary:
        sections.insert(5, ("Дневник наблюдения", tuple(reversed(diary))))
    title = f"{kind.title}: {dx.display}"
    return ClinicalDocument(kind, dx, when, title, tuple(sections))


# --- documents of a patient's record (the demo city) -----------------------------------------

_T = TypeVar("_T")

# Complaints by МКБ-10 chapter (the first letter of the code); a check-up has none.
_COMPLAINTS_BY_CHAPTER: dict[str, tuple[str, ...]] = {
    "I": (
        "головную боль в затылочной области",
        "сердцебиение и перебои в работе сердца",
        "одышку при умеренной физической нагрузке",
        "отёки нижних конечностей к вечеру",
        "давящие боли за грудиной при ходьбе",
    ),
    "J": (
        "кашель с отделением мокроты",
        "повышение температуры тела до 38,5 °C",
        "общую слабость и быструю утомляемость",
        "боль в горле при глотании",
        "заложенность носа",
    ),
    "U": (
        "повышение температуры тела до 38,5 °C",
        "сухой кашель",
        "общую слабость и ломоту в теле",
        "потерю обоняния",
    ),
    "E": (
        "жажду и учащённое мочеиспускание",
        "общую слабость и быструю утомляемость",
        "сухость кожи и зябкость",
        "прибавку массы тела",
    ),
    "K": (
        "боли в эпигастрии после еды",
        "изжогу и отрыжку кислым",
        "тяжесть в правом подреберье после жирной пищи",
        "тошноту",
    ),
    "N": ("боли в поясничной области", "частое болезненное мочеиспускание", "озноб"),
    "M": (
        "боли в поясничной области при движении",
        "боли в коленных суставах при ходьбе",
        "скованность по утрам",
    ),
    "D": (
        "общую слабость и быструю утомляемость",
        "головокружение",
        "одышку при умеренной физической нагрузке",
    ),
}

# Instrumental study by diagnosis code (or by the code's first letter): the study, what is
# seen, the conclusion. The last entry is the study when nothing fits.
_STUDIES: dict[str, tuple[str, str, str]] = {
    "J18.9": (
        "Рентгенография органов грудной клетки в двух проекциях",
        "В нижней доле правого лёгкого определяется участок инфильтрации лёгочной ткани "
        "неоднородной структуры. Корни лёгких расширены. Синусы свободны. Сердце не расширено.",
        "Рентгенологические признаки правосторонней нижнедолевой пневмонии.",
    ),
    "U07.1": (
        "Компьютерная томография органов грудной клетки",
        "В обоих лёгких субплеврально определяются участки уплотнения по типу «матового "
        "стекла», объём поражения менее 25 %. Внутригрудные лимфоузлы не увеличены.",
        "КТ-картина вирусной пневмонии, высокая вероятность COVID-19 (КТ-1).",
    ),
    "J": (
        "Рентгенография органов грудной клетки в прямой проекции",
        "Лёгочные поля без очаговых и инфильтративных теней. Лёгочный рисунок усилен в "
        "прикорневых отделах. Корни структурны. Синусы свободны.",
        "Признаки бронхита. Данных за пневмонию нет.",
    ),
    "I48": (
        "Электрокардиография",
        "Ритм неправильный, зубцы P отсутствуют, регистрируются волны f. ЧСС {hr} в минуту. "
        "Электрическая ось сердца отклонена влево.",
        "Фибрилляция предсердий. Признаки гипертрофии левого желудочка.",
    ),
    "I63.9": (
        "Компьютерная томография головного мозга",
        "В левой теменной доле определяется зона пониженной плотности без чётких контуров. "
        "Срединные структуры не смещены. Желудочки не расширены.",
        "КТ-признаки ишемического инсульта в бассейне левой средней мозговой артерии.",
    ),
    "I": (
        "Эхокардиография",
        "Полости сердца не расширены. Толщина межжелудочковой перегородки 1,2 см. "
        "Фракция выброса левого желудочка {ef} %. Клапаны без особенностей.",
        "Гипертрофия миокарда левого желудочка. Систолическая функция сохранена.",
    ),
    "E03.9": (
        "Ультразвуковое исследование щитовидной железы",
        "Объём щитовидной железы 9,8 мл. Эхоструктура неоднородная, эхогенность снижена. "
        "Узловых образований не выявлено.",
        "Эхопризнаки диффузных изменений щитовидной железы (аутоиммунный тиреоидит?).",
    ),
    "K80.2": (
        "Ультразвуковое исследование органов брюшной полости",
        "Желчный пузырь обычных размеров, в просвете гиперэхогенные образования до 8 мм с "
        "акустической тенью. Холедох не расширен. Печень и поджелудочная железа без "
        "особенностей.",
        "Эхопризнаки желчнокаменной болезни.",
    ),
    "K": (
        "Эзофагогастродуоденоскопия",
        "Пищевод свободно проходим, кардия смыкается не полностью. Слизистая желудка "
        "гиперемирована, отёчна в антральном отделе. Двенадцатиперстная кишка без "
        "особенностей.",
        "Эндоскопические признаки поверхностного гастрита. Недостаточность кардии.",
    ),
    "E": (
        "Ультразвуковое исследование органов брюшной полости",
        "Печень увеличена, правая доля 16,5 см, паренхима диффузно повышенной эхогенности. "
        "Желчный пузырь без конкрементов. Поджелудочная железа не увеличена.",
        "Эхопризнаки жирового гепатоза.",
    ),
    "N": (
        "Ультразвуковое исследование почек и мочевого пузыря",
        "Почки расположены обычно, контуры ровные. Чашечно-лоханочная система не расширена, "
        "конкрементов нет. Мочевой пузырь без особенностей.",
        "Эхопризнаков патологии почек и мочевого пузыря не выявлено.",
    ),
    "M17.9": (
        "Рентгенография коленных суставов в двух проекциях",
        "Суставные щели сужены неравномерно, субхондральный склероз, краевые остеофиты "
        "мыщелков бедренной и большеберцовой костей.",
        "Рентгенологические признаки двустороннего гонартроза II стадии.",
    ),
    "M": (
        "Рентгенография поясничного отдела позвоночника",
        "Высота межпозвонковых дисков L4–L5, L5–S1 снижена. Краевые костные разрастания тел "
        "позвонков. Физиологический лордоз сглажен.",
        "Остеохондроз поясничного отдела позвоночника.",
    ),
    "D": (
        "Эзофагогастродуоденоскопия",
        "Слизистая пищевода, желудка и двенадцатиперстной кишки без видимой патологии. "
        "Источника кровотечения не выявлено.",
        "Эндоскопически патологии верхних отделов ЖКТ не выявлено.",
    ),
    "child": (
        "Электрокардиография",
        "Ритм синусовый, регулярный, ЧСС {hr} в минуту. Электрическая ось сердца нормальная. "
        "Проводимость не нарушена.",
        "Вариант возрастной нормы.",
    ),
    "": (
        "Флюорография органов грудной клетки",
        "Лёгочные поля прозрачны, без очаговых и инфильтративных теней. Корни структурны. "
        "Синусы свободны. Сердце и аорта без особенностей.",
        "Патологии органов грудной клетки не выявлено.",
    ),
}

_PNEUMONIA = frozenset({"J18.9", "U07.1"})

# The specialist a diagnosis is referred to (by code, then by chapter).
_SPECIALISTS: dict[str, str] = {
    "I63.9": "неврологу",
    "I": "кардиологу",
    "E": "эндокринологу",
    "J": "пульмонологу",
    "U": "пульмонологу",
    "K80.2": "хирургу",
    "K": "гастроэнтерологу",
    "N": "урологу",
    "M54.5": "неврологу",
    "M": "травматологу-ортопеду",
    "D": "гематологу",
}


def _by_code(table: dict[str, _T], code: str, default: _T) -> _T:
    """The entry for an МКБ-10 code: the code itself, else its chapter letter, else default."""
    return table.get(code, table.get(code[:1], default))


def _drugs(dx: Diagnosis) -> tuple[str, ...]:
    """The diagnosis' usual drugs as prescribed: name and form, then how to take them."""
    return tuple(f"{DRUGS[atc][1]}. {DRUGS[atc][2]}." for atc in dx.drugs if atc in DRUGS)


def _decimal(value: float) -> str:
    """One decimal place with a decimal comma, as Russian documents write numbers."""
    return f"{value:.1f}".replace(".", ",")


def _vitals(rng: random.Random) -> dict[str, int]:
    return {
        "rr": rng.randint(14, 22),
        "hr": rng.randint(62, 100),
        "sys": rng.randint(110, 165),
        "dia": rng.randint(68, 98),
        "ef": rng.randint(52, 64),
    }


def record_document(
    rng: random.Random,
    kind: DocumentKind,
    diagnosis: Diagnosis,
    start: datetime,
    end: datetime,
    *,
    organization: str,
    patient: str,
    child: bool = False,
    referral_to: str = "",
) -> ClinicalDocument:
    """One document of a patient's record: ``kind`` (one of :data:`KINDS`) written by
    ``organization`` about the encounter from ``start`` to ``end`` whose diagnosis is
    ``diagnosis``. ``patient``: name and date of birth as the heading shows them; ``child``:
    under 15 (no fluorography); ``referral_to``: the MO a referral sends the patient to.

    The document is dated within the encounter (a discharge summary at discharge, an imaging
    report during the stay), so it is never later than the encounter's end."""
    dx = diagnosis
    checkup = dx.code == "Z00.0"
    vitals = _vitals(rng)
    minutes = (end - start) // timedelta(minutes=1)
    if kind is DISCHARGE_SUMMARY:
        when = end
    elif kind is IMAGING_REPORT:
        when = start + timedelta(minutes=int(minutes * rng.uniform(0.1, 0.5)))
    else:
        when = start + timedelta(minutes=int(minutes * rng.uniform(0.6, 1.0)))
    heading = (
        f"Медицинская организация: {organization}",
        f"Пациент: {patient}",
        f"Дата: {when:%d.%m.%Y %H:%M}",
    )
    diagnosis_text = (f"{'Основной: ' if not checkup else ''}{dx.display} ({dx.code}).",)
    pool = _COMPLAINTS_BY_CHAPTER.get(dx.code[:1], _COMPLAINTS)
    complaints = ", ".join(rng.sample(pool, min(3, len(pool))))
    general = _FINDINGS[0] if kind is DISCHARGE_SUMMARY else "Состояние удовлетворительное."
    lungs = _FINDINGS[6] + " ЧДД {rr} в минуту." if dx.code in _PNEUMONIA else _FINDINGS[2]
    status = tuple(f.format(**vitals) for f in (general, _FINDINGS[1], lungs, _FINDINGS[3]))
    advice = [
        a
        for a in _ADVICE
        if ("рентгенография" not in a or dx.code in _PNEUMONIA)
        and ("давления" not in a or dx.code.startswith("I"))
        and ("нетрудоспособности" not in a or not (checkup or dx.chronic))
    ]
    labs = tuple(
        f"{name}: {_decimal(rng.uniform(lo, hi))} {unit}"
        for name, unit, lo, hi in rng.sample(_LABS, 4)
    )
    drugs = _drugs(dx) or ("По клиническим рекомендациям, с учётом переносимости.",)
    sections: list[tuple[str, tuple[str, ...]]] = [("Общие сведения", heading)]
    if kind is DISCHARGE_SUMMARY:
        days = max((end.date() - start.date()).days, 1)
        diary = []
        for day in range(1, days):
            t = _decimal(rng.uniform(36.4, 37.8))
            diary.append(
                f"{start + timedelta(days=day):%d.%m.%Y}. "
                + " ".join(d.format(t=t, **vitals) for d in rng.sample(_DIARY, 2))
            )
        sections += [
            (
                "Период госпитализации",
                (f"С {start:%d.%m.%Y} по {end:%d.%m.%Y}, {days} койко-дн.",),
            ),
            ("Жалобы при поступлении", (f"Предъявлял(а) жалобы на {complaints}.",)),
            (
                "Анамнез заболевания",
                (
                    f"Ухудшение состояния в течение {rng.randint(2, 10)} дней. Доставлен(а) "
                    "бригадой скорой медицинской помощи, госпитализирован(а) в экстренном "
                    "порядке.",
                ),
            ),
            ("Объективный статус при поступлении", status),
            ("Клинический диагноз", diagnosis_text),
            ("Лабораторные исследования", labs),
            ("Дневник наблюдения", tuple(diary)),
            ("Проведённое лечение", drugs),
            (
                "Исход",
                ("Выписан(а) с улучшением под наблюдение врача поликлиники по месту жительства.",),
            ),
            ("Рекомендации", tuple(rng.sample(advice, min(3, len(advice))))),
        ]
    elif kind is VISIT_PROTOCOL:
        if checkup:
            history = "Обратился(ась) для прохождения профилактического медицинского осмотра."
        elif dx.chronic:
            history = (
                f"Страдает указанным заболеванием {rng.randint(2, 15)} лет, наблюдается в "
                "поликлинике. Назначенную терапию принимает регулярно."
            )
        else:
            history = f"Заболел(а) {rng.randint(2, 7)} дн. назад, когда появились жалобы."
        sections += [
            ("Жалобы", ("Жалоб не предъявляет." if checkup else f"На {complaints}.",)),
            ("Анамнез", (history,)),
            ("Объективный статус", status),
            ("Диагноз", diagnosis_text),
            ("Назначения", () if checkup else drugs),
            ("Рекомендации", tuple(rng.sample(advice, min(2, len(advice))))),
        ]
    elif kind is REFERRAL:
        specialist = _by_code(_SPECIALISTS, dx.code, "терапевту")
        where = f" в {referral_to}" if referral_to else ""
        sections += [
            ("Направляется", (f"На консультацию к врачу-{specialist}{where}.",)),
            ("Диагноз", diagnosis_text),
            (
                "Цель направления",
                ("Уточнение диагноза и коррекция терапии.",)
                if dx.chronic
                else ("Уточнение диагноза и определение тактики лечения.",),
            ),
            ("Результаты обследования", labs),
            ("Проводимое лечение", drugs),
        ]
    else:  # IMAGING_REPORT
        study, description, conclusion = (
            _STUDIES["child"] if child and checkup else _by_code(_STUDIES, dx.code, _STUDIES[""])
        )
        sections += [
            ("Исследование", (study,)),
            ("Описание", (description.format(**vitals),)),
            ("Заключение", (conclusion,)),
        ]
        title = f"{kind.title}: {study}"
        return ClinicalDocument(kind, dx, when, title, tuple(sections))
    title = f"{kind.title}: {dx.display}"
    return ClinicalDocument(kind, dx, when, title, tuple(s for s in sections if s[1]))


# --- formats ---------------------------------------------------------------------------------

_LINE_CHARS = 95
_LINES_PER_PAGE = 64


def _wrap(text: str, width: int = _LINE_CHARS) -> list[str]:
    lines: list[str] = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            if line and len(line) + 1 + len(word) > width:
                lines.append(line)
                line = word
            else:
                line = f"{line} {word}" if line else word
        lines.append(line)
    return lines


def _pdf_string(text: str) -> bytes:
    """A PDF text string: UTF-16BE with a byte-order mark, in hex."""
    return b"<FEFF" + text.encode("utf-16-be").hex().upper().encode() + b">"


# Helvetica re-encoded: Windows-1251 bytes name Cyrillic glyphs (А-я, Ё, ё, №) by Unicode value
_ENCODING = (
    b"<< /Type /Encoding /BaseEncoding /WinAnsiEncoding /Differences [ 168 /uni0401 "
    b"184 /uni0451 /uni2116 192 "
    + b" ".join(f"/uni{0x410 + i:04X}".encode() for i in range(64))
    + b" ] >>"
)


def pdf_bytes(text: str | Sequence[str], *, title: str | None = None) -> bytes:
    """A PDF whose text layer is ``text`` (wrapped, 64 lines a page; a sequence: one page per
    item), written directly (no PDF library: a corpus of 100,000 documents is generated in
    seconds). Text is written in Windows-1251; characters outside it become ``?``."""
    if isinstance(text, str):
        lines = _wrap(text)
        pages = [lines[i : i + _LINES_PER_PAGE] for i in range(0, len(lines), _LINES_PER_PAGE)]
    else:
        pages = [_wrap(page)[:_LINES_PER_PAGE] for page in text]
    pages = pages or [[]]
    first_page = 5  # 1 catalog, 2 pages, 3 font, 4 info; then (page, contents) pairs
    kids = b" ".join(f"{first_page + 2 * i} 0 R".encode() for i in range(len(pages)))
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [" + kids + b"] /Count " + str(len(pages)).encode() + b" >>",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica /Encoding " + _ENCODING + b" >>",
        b"<< /Producer (hie demo) " + (b"/Title " + _pdf_string(title) if title else b"") + b" >>",
    ]
    for i, page in enumerate(pages):
        ops = [b"BT /F1 9 Tf 11 TL 40 800 Td"]
        for line in page:
            esc = line.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
            ops.append(b"(" + esc.encode("cp1251", errors="replace") + b") Tj T*")
        ops.append(b"ET")
        stream = b"\n".join(ops)
        objects.append(
            b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] "
            b"/Resources << /Font << /F1 3 0 R >> >> /Contents "
            + f"{first_page + 2 * i + 1} 0 R".encode()
            + b" >>"
        )
        objects.append(
            b"<< /Length " + str(len(stream)).encode() + b" >>\nstream\n" + stream + b"\nendstream"
        )
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for n, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += f"{n} 0 obj\n".encode() + body + b"\nendobj\n"
    xref = len(out)
    out += f"xref\n0 {len(objects) + 1}\n0000000000 65535 f \n".encode()
    out += b"".join(f"{o:010d} 00000 n \n".encode() for o in offsets)
    out += f"trailer\n<< /Size {len(objects) + 1} /Root 1 0 R /Info 4 0 R >>\n".encode()
    out += f"startxref\n{xref}\n%%EOF\n".encode()
    return bytes(out)


def cda_bytes(doc: ClinicalDocument, *, document_id: str, patient_name: str = "") -> bytes:
    """The document as a CDA R2 ClinicalDocument with one section per part (UTF-8)."""
    sections = "".join(
        "<component><section>"
        f"<title>{escape(heading)}</title><text>"
        + "".join(f"<paragraph>{escape(p)}</paragraph>" for p in paragraphs)
        + "</text></section></component>"
        for heading, paragraphs in doc.sections
    )
    effective = doc.date.strftime("%Y%m%d%H%M%S%z")
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        '<ClinicalDocument xmlns="urn:hl7-org:v3">'
        f'<typeId root="{CDA_TYPE_ID}" extension="POCD_HD000040"/>'
        f'<id root="{escape(document_id)}"/>'
        f'<code code="{doc.kind.loinc}" codeSystem="2.16.840.1.113883.6.1"/>'
        f"<title>{escape(doc.title)}</title>"
        f'<effectiveTime value="{effective}"/>'
        f"<recordTarget><patientRole><patient><name>{escape(patient_name)}</name>"
        "</patient></patientRole></recordTarget>"
        f"<component><structuredBody>{sections}</structuredBody></component>"
        "</ClinicalDocument>"
    )
    return xml.encode()


__all__ = [
    "DISCHARGE_SUMMARY",
    "IMAGING_REPORT",
    "KINDS",
    "LOINC",
    "REFERRAL",
    "VISIT_PROTOCOL",
    "ClinicalDocument",
    "DocumentKind",
    "cda_bytes",
    "clinical_document",
    "pdf_bytes",
    "record_document",
]
