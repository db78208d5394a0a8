"""Contract suite for the search-index port, run against every backend.

Tantivy always runs (real index under a temporary directory). Elasticsearch runs when
``HIE_TEST_ELASTICSEARCH_URL`` points at a cluster; each test uses its own index prefix and
drops the index afterwards. All text is synthetic.
"""

from __future__ import annotations

import os
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from hie.hub.search import IndexDoc, SearchIndex, SearchResult, open_search_index, parse_query
from hie.hub.search.port import MAX_QUERY_UNITS, MAX_WINDOW
from hie.hub.settings import load_settings

ES_URL = os.environ.get("HIE_TEST_ELASTICSEARCH_URL", "")
ES_SKIP = "set HIE_TEST_ELASTICSEARCH_URL to run the Elasticsearch contract suite"

BACKENDS = [
    "tantivy",
    pytest.param("elasticsearch", marks=pytest.mark.skipif(not ES_URL, reason=ES_SKIP)),
]

Opener = Callable[[], SearchIndex]


@pytest.fixture(params=BACKENDS)
def open_index(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Opener]:
    """A function opening the backend's index on the same storage each time it is called."""
    opened: list[SearchIndex] = []
    if request.param == "tantivy":
        settings = load_settings(data_dir=tmp_path, search_url="embedded")
        prefix = "hie"
    else:
        settings = load_settings(data_dir=tmp_path, search_url=ES_URL)
        prefix = f"hie-test-{uuid.uuid4().hex[:12]}"

    def opener() -> SearchIndex:
        index = open_search_index(settings, index_prefix=prefix)
        opened.append(index)
        return index

    yield opener
    for index in opened:
        index.close()
    if request.param == "elasticsearch":
        from hie.hub.search.elastic import ElasticsearchSearchIndex

        ElasticsearchSearchIndex(ES_URL, index_prefix=prefix).drop()


@pytest.fixture
def index(open_index: Opener) -> SearchIndex:
    return open_index()


def doc(
    n: int | str,
    text: str,
    *,
    resource_type: str = "DocumentReference",
    title: str = "",
    patient: str | None = None,
    fields: dict[str, list[str]] | None = None,
    date: datetime | None = None,
) -> IndexDoc:
    return IndexDoc(
        id=f"{resource_type}/{n}",
        resource_type=resource_type,
        text=text,
        title=title,
        patient=patient,
        fields=fields or {},
        date=date,
    )


def ids(result: SearchResult) -> set[str]:
    return {hit.id for hit in result.hits}


RU_DOCS = [
    doc(
        1, "Внебольничная пневмония нижней доли правого лёгкого. Дыхательная недостаточность I ст."
    ),
    doc(2, "Общий анализ крови: лейкоцитоз, повышение СОЭ до 35 мм/ч. Температура 37.8."),
    doc(3, "Рентгенограмма: признаки перелома лучевой кости левого предплечья со смещением."),
    doc(4, "Рекомендована госпитализация в кардиологическое отделение по поводу стенокардии."),
    doc(5, "Сахарный диабет 2 типа, целевой уровень гликированного гемоглобина не достигнут."),
]

EN_DOCS = [
    doc(11, "Closed fracture of the left distal radius, no displacement."),
    doc(12, "Patient admitted with acute chest pain radiating to the left arm."),
    doc(13, "Follow-up imaging shows healing of the rib injuries."),
]


@pytest.fixture
def clinical(index: SearchIndex) -> SearchIndex:
    index.upsert(RU_DOCS + EN_DOCS)
    index.commit()
    return index


# -- basics ------------------------------------------------------------------------------------


def test_upsert_commit_search_roundtrip(index: SearchIndex) -> None:
    index.upsert([doc(1, "Внебольничная пневмония", title="Выписной эпикриз")])
    index.commit()
    result = index.search("пневмония")
    assert result.total == 1
    (hit,) = result.hits
    assert hit.id == "DocumentReference/1"
    assert hit.score > 0
    assert "<mark>" in hit.snippet
    assert index.count() == 1


def test_satisfies_the_protocol(index: SearchIndex) -> None:
    assert isinstance(index, SearchIndex)


def test_empty_index(index: SearchIndex) -> None:
    assert index.count() == 0
    assert index.search("пневмония") == SearchResult(total=0, hits=[])
    assert index.ids_matching("пневмония", None) == []


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("пневмонии", 1),  # genitive → nominative
        ("пневмонией", 1),
        ("легкого", 1),  # ё folded: лёгкого
        ("лёгкое", 1),
        ("ЛЁГКИХ", 1),
        ("анализы", 2),  # plural → singular
        ("анализов крови", 2),
        ("переломы", 3),  # (Snowball stems "перелом" itself to "перел": a known quirk)
        ("кости", 3),
        ("смещения", 3),
        ("предплечье", 3),
        ("госпитализации", 4),
        ("кардиологического отделения", 4),
        ("стенокардия", 4),
        ("диабетом", 5),
        ("гемоглобин", 5),
    ],
)
def test_russian_word_forms(clinical: SearchIndex, query: str, expected: int) -> None:
    assert ids(clinical.search(query)) == {f"DocumentReference/{expected}"}


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("fractures", 11),
        ("Fractured radius", 11),
        ("pains", 12),
        ("admitting", 12),
        ("injury", 13),
        ("healed", 13),
    ],
)
def test_english_stemming(clinical: SearchIndex, query: str, expected: int) -> None:
    assert ids(clinical.search(query)) == {f"DocumentReference/{expected}"}


def test_all_words_must_match(clinical: SearchIndex) -> None:
    assert ids(clinical.search("пневмония лёгкого")) == {"DocumentReference/1"}
    assert clinical.search("пневмония перелом").total == 0
    assert clinical.search("fracture chest").total == 0


def test_quoted_phrase(clinical: SearchIndex) -> None:
    assert ids(clinical.search('"нижней доли"')) == {"DocumentReference/1"}
    assert ids(clinical.search("«нижней доли»")) == {"DocumentReference/1"}
    assert clinical.search('"доли нижней"').total == 0
    # The same words unquoted match in any order.
    assert ids(clinical.search("доли нижней")) == {"DocumentReference/1"}
    assert ids(clinical.search('"chest pain" acute')) == {"DocumentReference/12"}


def test_numbers_and_punctuated_words(clinical: SearchIndex) -> None:
    assert ids(clinical.search("37.8")) == {"DocumentReference/2"}
    assert ids(clinical.search("СОЭ")) == {"DocumentReference/2"}
    assert ids(clinical.search("follow-up")) == {"DocumentReference/13"}


def test_title_is_searched_and_snippeted(index: SearchIndex) -> None:
    index.upsert([doc(1, "Жалоб нет.", title="Выписной эпикриз"), doc(2, "Эпикриз прилагается.")])
    index.commit()
    result = index.search("эпикриза")
    assert ids(result) == {"DocumentReference/1", "DocumentReference/2"}
    # A title match ranks above a body match.
    assert result.hits[0].id == "DocumentReference/1"
    assert "<mark>эпикриз</mark>" in result.hits[0].snippet


# -- filters -----------------------------------------------------------------------------------


@pytest.fixture
def filtered(index: SearchIndex) -> SearchIndex:
    index.upsert(
        [
            doc(1, "пневмония", patient="Patient/a", fields={"org": ["Organization/5"]}),
            doc(
                2,
                "пневмония",
                patient="Patient/b",
                fields={"org": ["Organization/6"], "type": ["34108-1"], "status": ["current"]},
            ),
            doc(
                3,
                "пневмония",
                patient="Patient/a",
                fields={"org": ["Organization/5", "Organization/7"], "type": ["34108-1"]},
            ),
            doc(1, "пневмония", resource_type="Condition", patient="Patient/a"),
        ]
    )
    index.commit()
    return index


def test_filter_by_resource_type(filtered: SearchIndex) -> None:
    assert ids(filtered.search("пневмония", resource_type="Condition")) == {"Condition/1"}
    assert filtered.search("пневмония", resource_type="DocumentReference").total == 3
    assert filtered.search("пневмония", resource_type="Observation").total == 0
    assert filtered.search("пневмония").total == 4


def test_filter_by_patient(filtered: SearchIndex) -> None:
    assert ids(filtered.search("пневмония", patient="Patient/a")) == {
        "DocumentReference/1",
        "DocumentReference/3",
        "Condition/1",
    }
    assert (
        ids(filtered.search("пневмония", patient="Patient/b", resource_type="Condition")) == set()
    )
    assert filtered.search("пневмония", patient="Patient/zzz").total == 0


def test_filter_by_fields(filtered: SearchIndex) -> None:
    def found(filters: dict[str, list[str]]) -> set[str]:
        return ids(filtered.search("пневмония", filters=filters))

    assert found({"org": ["Organization/5"]}) == {"DocumentReference/1", "DocumentReference/3"}
    assert found({"org": ["Organization/7"]}) == {"DocumentReference/3"}
    # Any of the listed values; fields combine with AND.
    assert found({"org": ["Organization/6", "Organization/7"]}) == {
        "DocumentReference/2",
        "DocumentReference/3",
    }
    assert found({"org": ["Organization/5"], "type": ["34108-1"]}) == {"DocumentReference/3"}
    assert found({"status": ["current"]}) == {"DocumentReference/2"}
    assert found({"status": ["superseded"]}) == set()
    assert found({"unknown": ["x"]}) == set()
    # Exact match: no stemming, no case folding, no prefix.
    assert found({"org": ["organization/5"]}) == set()
    assert found({"org": ["Organization"]}) == set()
    # An empty list of allowed values allows nothing.
    assert found({"org": []}) == set()


def test_invalid_filter_name_is_a_programming_error(filtered: SearchIndex) -> None:
    with pytest.raises(ValueError):
        filtered.search("пневмония", filters={"bad name": ["x"]})


def test_ids_matching(filtered: SearchIndex) -> None:
    assert set(filtered.ids_matching("пневмонии", "DocumentReference")) == {
        "DocumentReference/1",
        "DocumentReference/2",
        "DocumentReference/3",
    }
    assert filtered.ids_matching("пневмонии", "Condition", patient="Patient/a") == ["Condition/1"]
    assert len(filtered.ids_matching("пневмония", None)) == 4
    assert len(filtered.ids_matching("пневмония", None, limit=2)) == 2
    assert filtered.ids_matching("перелом", "DocumentReference") == []
    assert filtered.ids_matching("", "DocumentReference") == []


# -- writes ------------------------------------------------------------------------------------


def test_upsert_replaces(index: SearchIndex) -> None:
    index.upsert([doc(1, "Внебольничная пневмония", fields={"status": ["current"]})])
    index.commit()
    index.upsert([doc(1, "Закрытый перелом", fields={"status": ["superseded"]})])
    index.commit()
    assert index.search("пневмония").total == 0
    assert ids(index.search("перелом")) == {"DocumentReference/1"}
    assert index.search("перелом", filters={"status": ["current"]}).total == 0
    assert index.count() == 1


def test_last_version_wins_within_a_batch(index: SearchIndex) -> None:
    index.upsert([doc(1, "первая версия"), doc(1, "вторая версия")])
    index.commit()
    assert index.count() == 1
    assert index.search("первая").total == 0
    assert index.search("вторая").total == 1


def test_delete(index: SearchIndex) -> None:
    index.upsert([doc(1, "пневмония"), doc(2, "пневмония")])
    index.commit()
    index.delete(["DocumentReference/1", "DocumentReference/404"])
    index.commit()
    assert ids(index.search("пневмония")) == {"DocumentReference/2"}
    assert index.count() == 1
    index.delete([])
    index.commit()
    assert index.count() == 1


def test_clear(index: SearchIndex) -> None:
    index.upsert([doc(n, "пневмония") for n in range(5)])
    index.commit()
    index.clear()
    assert index.count() == 0
    assert index.search("пневмония").total == 0
    index.upsert([doc(9, "пневмония")])
    index.commit()
    assert ids(index.search("пневмония")) == {"DocumentReference/9"}


def test_dates_and_odd_text_are_accepted(index: SearchIndex) -> None:
    index.upsert(
        [
            doc(1, "пневмония", date=datetime(2024, 3, 1, 12, 0, tzinfo=UTC)),
            doc(2, "пневмония", date=datetime(2024, 3, 1, 12, 0)),  # naive = UTC
            doc(3, "", title=""),
            doc(4, "пневмония \x00 \u200b\ufeff 🫁 e\u0301"),
        ]
    )
    index.commit()
    assert index.count() == 4
    assert index.search("пневмония").total == 3


def test_concurrent_writers(index: SearchIndex) -> None:
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            for batch in range(5):
                index.upsert([doc(f"{worker}-{batch}-{n}", "пневмония") for n in range(10)])
                index.commit()
                index.search("пневмония")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert index.count() == 200
    assert index.search("пневмония").total == 200


# -- paging, snippets --------------------------------------------------------------------------


def test_total_and_paging(index: SearchIndex) -> None:
    index.upsert(
        [doc(n, f"Рентгенография органов грудной клетки, исследование {n}") for n in range(25)]
    )
    index.commit()
    pages = [index.search("рентгенографии", limit=10, offset=o) for o in (0, 10, 20, 30)]
    assert [p.total for p in pages] == [25, 25, 25, 25]
    assert [len(p.hits) for p in pages] == [10, 10, 5, 0]
    seen = [hit.id for p in pages for hit in p.hits]
    assert len(set(seen)) == 25
    scores = [hit.score for hit in pages[0].hits]
    assert scores == sorted(scores, reverse=True)
    only_total = index.search("рентгенографии", limit=0)
    assert only_total.total == 25
    assert only_total.hits == []
    assert index.search("рентгенографии", offset=MAX_WINDOW + 5).hits == []
    with pytest.raises(ValueError):
        index.search("рентгенографии", limit=-1)


def test_snippet_marks_matches_and_escapes_html(index: SearchIndex) -> None:
    text = (
        'Заключение: <script>alert("x")</script> & <b>жирный</b> — признаки пневмонии '
        "в нижней доле справа. Рекомендован контроль через 10 дней."
    )
    index.upsert([doc(1, text)])
    index.commit()
    (hit,) = index.search("пневмония").hits
    assert "<mark>пневмонии</mark>" in hit.snippet
    assert "<script" not in hit.snippet
    assert "&lt;script&gt;" in hit.snippet
    assert "&amp;" in hit.snippet
    # The only markup left is ours.
    assert re.findall(r"<[^>]*>", hit.snippet) == ["<mark>", "</mark>"]


def test_snippet_marks_both_stemmers_and_keeps_yo(clinical: SearchIndex) -> None:
    (hit,) = clinical.search("легкие").hits
    assert "<mark>лёгкого</mark>" in hit.snippet
    (hit,) = clinical.search("fractures").hits
    assert "<mark>fracture</mark>" in hit.snippet


def snippet_of(index: SearchIndex, text: str, query: str) -> str:
    """The snippet of the one document holding ``text`` that ``query`` finds."""
    index.upsert([doc(1, text)])
    index.commit()
    (hit,) = index.search(query).hits
    return hit.snippet


def test_snippet_of_a_long_document_is_short(index: SearchIndex) -> None:
    filler = "Состояние удовлетворительное, жалоб нет. " * 500
    snippet = snippet_of(index, filler + "Выявлена пневмония. " + filler, "пневмония")
    assert "<mark>пневмония</mark>" in snippet
    assert len(snippet) < 600


def test_snippet_shows_the_query_words_where_they_come_together(index: SearchIndex) -> None:
    early = "Лечение продолжено, жалоб нет. " * 40
    alone = "Аллергия на амоксициллин отрицается. "
    late = "Выписана. Лечение: омепразол 20 мг утром. амоксициллин 500 мг 3 раза в сутки. "
    filler = "Состояние удовлетворительное. " * 10
    snippet = snippet_of(index, early + filler + alone + filler + late, "лечение амоксициллин")
    assert "<mark>Лечение</mark>" in snippet
    assert "<mark>амоксициллин</mark>" in snippet


def test_snippet_of_a_word_whose_stem_is_not_its_start(index: SearchIndex) -> None:
    # English "happiness" and "happy" share the stem "happi", which "happy" does not start with
    filler = "The patient was seen on the ward today. " * 300
    snippet = snippet_of(
        index, filler + "She says she is happy at home now. " + filler, "happiness"
    )
    assert "<mark>happy</mark>" in snippet


def test_snippet_skips_words_that_only_begin_like_the_query(index: SearchIndex) -> None:
    # "котлеты" begins with "кот" but is another word; the snippet shows the real match
    filler = "На обед котлеты с пюре, аппетит хороший. " * 300
    snippet = snippet_of(index, filler + "Дома живёт кот, аллергии на шерсть нет. " + filler, "кот")
    assert "<mark>кот</mark>" in snippet
    assert "<mark>котлеты</mark>" not in snippet


# -- hostile queries ---------------------------------------------------------------------------

HOSTILE = [
    "",
    "   ",
    '"unbalanced',
    'пневмония "unbalanced',
    "title:foo",
    "text:пневмония",
    "a OR",
    "AND",
    "NOT пневмония",
    "*",
    "пневм*",
    "?",
    "(",
    ")",
    "[1 TO 5]",
    "{",
    "\\",
    "пневмония~2",
    "^3",
    "'; DROP TABLE x; --",
    "<script>alert(1)</script>",
    "\x00\x01\x1f",
    '""',
    '"" ""',
    "«",
    '+-&&||!(){}[]^"~*?:\\/',
    "x" * 10_000,
    "пневмония " * 1_000,
    " ".join(f"слово{n}" for n in range(2_000)),
]


@pytest.mark.parametrize("query", HOSTILE, ids=lambda q: repr(q[:20]))
def test_hostile_queries_do_not_raise(clinical: SearchIndex, query: str) -> None:
    result = clinical.search(query)
    assert result.total >= 0
    assert len(result.hits) <= result.total
    clinical.ids_matching(query, "DocumentReference")
    clinical.search(query, resource_type="x:y", patient="*", filters={"org": ['"', "*"]})


@pytest.mark.parametrize("query", ["", "   ", "*", "?", "(", '""', "\\", '+-&&||!(){}[]^"~*?:\\/'])
def test_queries_without_words_match_nothing(clinical: SearchIndex, query: str) -> None:
    assert clinical.search(query).total == 0
    assert clinical.ids_matching(query, None) == []


def test_syntax_is_plain_text(clinical: SearchIndex) -> None:
    # Operators and field prefixes are just words (or separators).
    assert ids(clinical.search("text:пневмония")) == set()  # "text" is not in the document
    assert ids(clinical.search("пневмония:")) == {"DocumentReference/1"}
    assert ids(clinical.search("NOT пневмония")) == set()
    assert ids(clinical.search('пневмония "unbalanced')) == set()
    assert ids(clinical.search('пневмония "')) == {"DocumentReference/1"}
    assert ids(clinical.search("(пневмония)")) == {"DocumentReference/1"}
    assert ids(clinical.search("пневмония*")) == {"DocumentReference/1"}
    assert ids(clinical.search("пневмония " * 1_000)) == {"DocumentReference/1"}


# -- lifecycle ---------------------------------------------------------------------------------


def test_reopen_after_close_keeps_data(open_index: Opener) -> None:
    first = open_index()
    first.upsert([doc(1, "Внебольничная пневмония"), doc(2, "Перелом лучевой кости")])
    first.commit()
    first.close()
    second = open_index()
    assert second.count() == 2
    assert ids(second.search("пневмонии")) == {"DocumentReference/1"}
    second.upsert([doc(3, "Повторная пневмония")])
    second.commit()
    second.close()
    third = open_index()
    assert third.search("пневмония").total == 2


def test_two_handles_share_one_index(open_index: Opener) -> None:
    a, b = open_index(), open_index()
    a.upsert([doc(1, "пневмония")])
    a.commit()
    assert b.search("пневмония").total == 1
    b.upsert([doc(2, "пневмония")])
    b.commit()
    a.close()
    assert b.count() == 2


def test_closed_index_refuses_work(open_index: Opener) -> None:
    index = open_index()
    index.close()
    index.close()  # idempotent
    with pytest.raises(RuntimeError):
        index.search("пневмония")


def test_bulk_upsert_of_2000_documents(index: SearchIndex) -> None:
    diagnoses = ["пневмония", "бронхит", "гастрит", "перелом", "гипертония"]
    start = datetime(2024, 1, 1, tzinfo=UTC)
    docs = [
        IndexDoc(
            id=f"DocumentReference/{n}",
            resource_type="DocumentReference",
            title=f"Протокол осмотра № {n}",
            text=f"Пациент {n}. Диагноз: {diagnoses[n % 5]}. Осмотр терапевта, код{n:05d}.",
            patient=f"Patient/{n % 100}",
            fields={"org": [f"Organization/{n % 7}"], "status": ["current"]},
            date=start + timedelta(hours=n),
        )
        for n in range(2_000)
    ]
    index.upsert(docs)
    index.commit()
    assert index.count() == 2_000
    assert index.search("осмотр", limit=5).total == 2_000
    assert index.search("пневмонии").total == 400
    assert ids(index.search("код01234")) == {"DocumentReference/1234"}
    assert index.search("гастрит", patient="Patient/2").total == 20
    assert index.search("гастрит", filters={"org": ["Organization/0"]}).total == 57
    assert len(index.ids_matching("перелом", "DocumentReference")) == 400


# -- the query language (shared by every backend) ----------------------------------------------


@pytest.mark.parametrize(
    ("query", "units"),
    [
        ("", ()),
        ("пневмония правого лёгкого", (("пневмония",), ("правого",), ("легкого",))),
        ('"нижней доли" справа', (("нижней", "доли"), ("справа",))),
        ('a "b', (("a",), ("b",))),
        ("title:foo AND (bar)", (("title",), ("foo",), ("AND",), ("bar",))),
        ("x x X", (("x",),)),
        ("snake_case", (("snake",), ("case",))),
        ("«ОРВИ»", (("ОРВИ",),)),
    ],
)
def test_parse_query(query: str, units: tuple[tuple[str, ...], ...]) -> None:
    assert parse_query(query).units == units


def test_parse_query_bounds_its_output() -> None:
    parsed = parse_query(" ".join(f"w{n}" for n in range(1_000)))
    assert len(parsed.units) == MAX_QUERY_UNITS
    assert parse_query("я" * 500).empty
