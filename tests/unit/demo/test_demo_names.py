"""Russian name tables, gender forms, patronymics and transliteration."""

from __future__ import annotations

import pytest

from hie.demo.names import (
    FEMALE_GIVEN_NAMES,
    MALE_FAMILY_NAMES,
    MALE_GIVEN_NAMES,
    family_for,
    patronymic,
    transliterate,
)


def test_table_sizes_and_uniqueness() -> None:
    assert len(MALE_FAMILY_NAMES) >= 200
    assert len(MALE_GIVEN_NAMES) >= 100
    assert len(FEMALE_GIVEN_NAMES) >= 100
    for table in (MALE_FAMILY_NAMES, MALE_GIVEN_NAMES, FEMALE_GIVEN_NAMES):
        assert len(set(table)) == len(table)
        assert all(name[0].isupper() and name.isalpha() for name in table)


@pytest.mark.parametrize(
    ("male", "female"),
    [
        ("Иванов", "Иванова"),
        ("Соловьёв", "Соловьёва"),
        ("Никитин", "Никитина"),
        ("Островский", "Островская"),
        ("Белецкий", "Белецкая"),
        ("Толстой", "Толстая"),
        ("Шевченко", "Шевченко"),
        ("Черных", "Черных"),
    ],
)
def test_family_gender_forms(male: str, female: str) -> None:
    assert family_for(male, "male") == male
    assert family_for(male, "female") == female


@pytest.mark.parametrize(
    ("father", "son", "daughter"),
    [
        ("Иван", "Иванович", "Ивановна"),
        ("Сергей", "Сергеевич", "Сергеевна"),
        ("Николай", "Николаевич", "Николаевна"),
        ("Игорь", "Игоревич", "Игоревна"),
        ("Василий", "Васильевич", "Васильевна"),
        ("Дмитрий", "Дмитриевич", "Дмитриевна"),
        ("Илья", "Ильич", "Ильинична"),
        ("Никита", "Никитич", "Никитична"),
        ("Лев", "Львович", "Львовна"),
        ("Павел", "Павлович", "Павловна"),
        ("Пётр", "Петрович", "Петровна"),
        ("Михаил", "Михайлович", "Михайловна"),
        ("Яков", "Яковлевич", "Яковлевна"),
        ("Фома", "Фомич", "Фоминична"),
    ],
)
def test_patronymics(father: str, son: str, daughter: str) -> None:
    assert patronymic(father, "male") == son
    assert patronymic(father, "female") == daughter


def test_every_male_name_gives_a_plausible_patronymic() -> None:
    for name in MALE_GIVEN_NAMES:
        son, daughter = patronymic(name, "male"), patronymic(name, "female")
        assert son.endswith(("ович", "евич", "ич")), son
        assert daughter.endswith(("овна", "евна", "ична", "инична")), daughter


@pytest.mark.parametrize(
    ("ru", "icao", "gost"),
    [
        ("Иванова", "Ivanova", "Ivanova"),
        ("Щукин", "Shchukin", "Shhukin"),
        ("Юлия", "Iuliia", "Yuliya"),
        ("Фёдоров", "Fedorov", "Fyodorov"),
        ("Цветков", "Tsvetkov", "Czvetkov"),
        ("Цирюльников", "Tsiriulnikov", "Ciryul`nikov"),
        ("Хмельницкий", "Khmelnitskii", "Xmel`niczkij"),
        ("ЩУКИН", "SHCHUKIN", "SHHUKIN"),
        ("Анна-Мария", "Anna-Mariia", "Anna-Mariya"),
    ],
)
def test_transliteration(ru: str, icao: str, gost: str) -> None:
    assert transliterate(ru) == icao
    assert transliterate(ru, "gost") == gost
