"""Russian personal names: family, given and patronymic tables with correct gender forms.

Family names are stored in their masculine form; :func:`family_for` gives the feminine form by
the ordinary rules of Russian morphology (Иванов → Иванова, Толстой → Толстая, Островский →
Островская; -енко and -ых/-их do not change). Patronymics are derived from the father's given
name by :func:`patronymic` (Сергей → Сергеевич / Сергеевна, Илья → Ильич / Ильинична).

:func:`transliterate` renders Cyrillic in Latin letters by the ICAO Doc 9303 table (the one in
Russian international passports since 2013: Щукин → Shchukin) or by GOST 7.79-2000 system B;
it and the tables live in :mod:`hie.registries.translit` (one source of truth) and are
re-exported here.
"""

from __future__ import annotations

from typing import Literal

from hie.registries.translit import TransliterationScheme, transliterate

__all__ = [
    "FEMALE_GIVEN_NAMES",
    "MALE_FAMILY_NAMES",
    "MALE_GIVEN_NAMES",
    "TransliterationScheme",
    "family_for",
    "patronymic",
    "transliterate",
]

MALE_FAMILY_NAMES: tuple[str, ...] = tuple(
    """
    Иванов Смирнов Кузнецов Попов Васильев Петров Соколов Михайлов Новиков Фёдоров Морозов
    Волков Алексеев Лебедев Семёнов Егоров Павлов Козлов Степанов Николаев Орлов Андреев
    Макаров Никитин Захаров Зайцев Соловьёв Борисов Яковлев Григорьев Романов Воробьёв
    Сергеев Кузьмин Фролов Александров Дмитриев Королёв Гусев Киселёв Ильин Максимов Поляков
    Сорокин Виноградов Ковалёв Белов Медведев Антонов Тарасов Жуков Баранов Филиппов Комаров
    Давыдов Беляев Герасимов Богданов Осипов Сидоров Матвеев Титов Марков Миронов Крылов
    Куликов Карпов Власов Мельников Денисов Гаврилов Тихонов Казаков Афанасьев Данилов
    Савельев Тимофеев Фомин Чернов Абрамов Мартынов Ефимов Федотов Щербаков Назаров Калинин
    Исаев Чернышёв Быков Маслов Родионов Коновалов Лазарев Воронин Климов Филатов Пономарёв
    Голубев Кудрявцев Прохоров Наумов Потапов Журавлёв Овчинников Трофимов Леонов Соболев
    Ермаков Колесников Гончаров Емельянов Никифоров Грачёв Котов Гришин Ефремов Архипов
    Громов Кириллов Малышев Панов Моисеев Румянцев Акимов Кондратьев Бирюков Горбунов
    Анисимов Ерёмин Тихомиров Галкин Лукьянов Михеев Скворцов Юдин Белоусов Нестеров Симонов
    Прокофьев Харитонов Князев Цветков Левин Митрофанов Воронцов Фадеев Шестаков Суханов
    Рыбаков Блинов Сафонов Ширяев Большаков Субботин Горшков Широков Жданов Лапин Третьяков
    Кошелев Бобров Мухин Рожков Рябов Жаров Лаптев Шубин Зуев Зиновьев Агафонов Зимин Ершов
    Пахомов Шилов Некрасов Шишкин Бондарев Горелов Рогов Кононов Муравьёв Корнилов Ларионов
    Щукин Островский Вишневский Ковальский Покровский Успенский Добровольский Рождественский
    Каменский Белецкий Трубецкой Толстой Шевченко Бондаренко Коваленко Кравченко Ткаченко
    Черных Седых Белых Долгих
    """.split()
)

MALE_GIVEN_NAMES: tuple[str, ...] = tuple(
    """
    Александр Алексей Анатолий Андрей Антон Аркадий Арсений Артём Артур Богдан Борис Вадим
    Валентин Валерий Василий Вениамин Виктор Виталий Владимир Владислав Всеволод Вячеслав
    Геннадий Георгий Герман Глеб Григорий Давид Даниил Денис Дмитрий Евгений Егор Елисей
    Захар Иван Игнат Игорь Илья Иннокентий Кирилл Константин Лев Леонид Макар Максим Марк
    Матвей Мирон Михаил Никита Николай Олег Павел Пётр Платон Прохор Роберт Родион Роман
    Ростислав Руслан Святослав Семён Сергей Станислав Степан Тимофей Тимур Фёдор Филипп
    Эдуард Юрий Ярослав Яков Савелий Назар Никифор Трофим Фома Кузьма Лука Афанасий Ефим
    Аким Демид Демьян Тихон Харитон Емельян Гордей Лаврентий Эрнест Альберт Арнольд Мстислав
    Остап Тарас Митрофан Панкрат
    """.split()
)

FEMALE_GIVEN_NAMES: tuple[str, ...] = tuple(
    """
    Александра Алина Алиса Алла Анастасия Ангелина Анна Антонина Арина Валентина Валерия
    Вера Вероника Виктория Галина Дарья Диана Ева Евгения Екатерина Елена Елизавета Жанна
    Зинаида Зоя Инна Ирина Карина Кира Клавдия Кристина Ксения Лариса Лидия Лилия Любовь
    Людмила Маргарита Марина Мария Милана Надежда Наталья Нина Оксана Олеся Ольга Полина
    Раиса Светлана София Таисия Тамара Татьяна Ульяна Эвелина Юлия Яна Ярослава Василиса
    Варвара Злата Майя Алёна Анжелика Богдана Владислава Дина Евдокия Есения Капитолина Лада
    Мирослава Нелли Нонна Римма Серафима Снежана Стефания Фаина Эльвира Эмилия Агата Агния
    Аделина Алевтина Ариадна Глафира Доминика Ефросинья Инга Камилла Марта Прасковья Регина
    Стелла Элеонора Виолетта Лилиана Любава
    """.split()
)

# Patronymics that the regular suffix rules below do not produce.
_PATRONYMIC_EXCEPTIONS: dict[str, tuple[str, str]] = {
    "Илья": ("Ильич", "Ильинична"),
    "Никита": ("Никитич", "Никитична"),
    "Фома": ("Фомич", "Фоминична"),
    "Кузьма": ("Кузьмич", "Кузьминична"),
    "Лука": ("Лукич", "Лукинична"),
    "Лев": ("Львович", "Львовна"),
    "Павел": ("Павлович", "Павловна"),
    "Пётр": ("Петрович", "Петровна"),
    "Михаил": ("Михайлович", "Михайловна"),
    "Яков": ("Яковлевич", "Яковлевна"),
    # -ий after a consonant cluster keeps the и: Дмитриевич, Георгиевич.
    "Дмитрий": ("Дмитриевич", "Дмитриевна"),
    "Георгий": ("Георгиевич", "Георгиевна"),
}


def patronymic(father_given: str, gender: Literal["male", "female"]) -> str:
    """Derive the patronymic of a son or daughter from the father's given name.

    Rules: consonant → -ович/-овна (Иван → Иванович); -ь → -евич/-евна (Игорь → Игоревич);
    -ей/-ай → -еевич/-аевич (Сергей → Сергеевич, Николай → Николаевич); -ий → -ьевич/-ьевна
    (Василий → Васильевич); plus the irregular names in ``_PATRONYMIC_EXCEPTIONS``.
    """
    female = gender == "female"
    if father_given in _PATRONYMIC_EXCEPTIONS:
        male_form, female_form = _PATRONYMIC_EXCEPTIONS[father_given]
        return female_form if female else male_form
    name = father_given
    if name.endswith("ий"):
        stem = name[:-2] + "ье"
    elif name.endswith(("ей", "ай")):
        stem = name[:-1] + "е"
    elif name.endswith("ь"):
        stem = name[:-1] + "е"
    elif name.endswith("а"):
        stem = name[:-1]
        return stem + ("ична" if female else "ич")
    else:
        stem = name + "о"
    return stem + ("вна" if female else "вич")


def family_for(male_family: str, gender: Literal["male", "female"]) -> str:
    """Return the family name in the form for ``gender`` (the table holds masculine forms)."""
    if gender == "male":
        return male_family
    if male_family.endswith(("ов", "ев", "ёв", "ин", "ын")):
        return male_family + "а"
    if male_family.endswith(("ский", "цкий")):
        return male_family[:-2] + "ая"
    if male_family.endswith("ой"):
        return male_family[:-2] + "ая"
    # -енко, -ых, -их and other indeclinable names are the same for both genders.
    return male_family
