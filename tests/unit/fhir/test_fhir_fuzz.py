"""Property tests: whatever a client sends, the FHIR API answers FHIR JSON and never a 5xx.

Query keys come from the real search parameters (with modifiers and chains), values from
awkward text; bodies are arbitrary JSON, Patient-shaped JSON and Bundles with random entries.
The app runs over SQLite in a temporary data dir, seeded with a few linked resources so that
sorting, paging, _include and _summary have something to work on.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hie.fhir.app import create_app
from hie.fhir.search import RESULT_PARAMS
from hie.fhir.searchparams import params_for, supported_types
from hie.hub.runtime import open_hub
from hie.hub.settings import load_settings
from hie.registries.identifiers import format_snils, snils_check
from tests.fixtures.auth import bearer

FHIR_JSON = "application/fhir+json"
FUZZ = settings(
    max_examples=150,
    deadline=None,
    database=None,  # leave no .hypothesis/ in the work tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


def valid_snils(i: int) -> str:
    """A SNILS with a correct check number (the hub refuses wrong ones)."""
    number = f"{100_000_000 + i:09d}"
    return format_snils(number + snils_check(number))


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestClient]:
    """One app over SQLite for the whole module, seeded with linked resources."""
    data_dir: Path = tmp_path_factory.mktemp("fhir-fuzz")
    cfg = load_settings(
        data_dir=data_dir,
        database_url=f"sqlite:///{data_dir / 'hie.db'}",
        max_body_bytes=64 * 1024,
        page_size=5,
    )
    hub = open_hub(cfg)
    hub.store.migrate()
    app = create_app(cfg, hub, start_worker=False)
    with TestClient(app, base_url="http://hub.test", headers=bearer(cfg)) as client:
        _seed(client)
        yield client


def _seed(client: TestClient) -> None:
    bundle: dict[str, Any] = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": "urn:uuid:00000000-0000-4000-8000-000000000001",
                "resource": {"resourceType": "Organization", "name": "Поликлиника №1"},
                "request": {"method": "POST", "url": "Organization"},
            }
        ],
    }
    for i in range(8):
        pid = f"urn:uuid:00000000-0000-4000-8000-1000000000{i:02d}"
        bundle["entry"].append(
            {
                "fullUrl": pid,
                "resource": {
                    "resourceType": "Patient",
                    "identifier": [{"system": "urn:oid:1.2.643.100.3", "value": valid_snils(i)}],
                    "name": [{"family": ["Ёлкин", "Иванова", "Müller"][i % 3], "given": ["Пётр"]}],
                    "gender": ["male", "female"][i % 2],
                    "birthDate": f"19{50 + i}-0{1 + i % 9}-1{i}",
                    "managingOrganization": {
                        "reference": "urn:uuid:00000000-0000-4000-8000-000000000001"
                    },
                },
                "request": {"method": "POST", "url": "Patient"},
            }
        )
        bundle["entry"].append(
            {
                "resource": {
                    "resourceType": "Observation",
                    "status": "final",
                    "code": {"coding": [{"system": "http://loinc.org", "code": "718-7"}]},
                    "subject": {"reference": pid},
                    "effectiveDateTime": f"2024-03-0{1 + i % 9}T10:15:00+03:00",
                    "valueQuantity": {
                        "value": 120 + i,
                        "unit": "g/L",
                        "system": "http://unitsofmeasure.org",
                        "code": "g/L",
                    },
                },
                "request": {"method": "POST", "url": "Observation"},
            }
        )
    r = client.post("/fhir", json=bundle, headers={"Content-Type": FHIR_JSON})
    assert r.status_code == 200, r.text


def check(r: Any, *expected: str) -> dict[str, Any]:
    """No 5xx, FHIR JSON, and a resource of one of the expected types (or an outcome)."""
    assert r.status_code < 500, r.text
    if r.status_code in (204, 304) or not r.content:
        return {}
    assert r.headers["content-type"].startswith(FHIR_JSON), r.headers["content-type"]
    body = r.json()
    assert isinstance(body, dict)
    if r.status_code >= 400:
        assert body["resourceType"] == "OperationOutcome", body
        assert body["issue"]
    else:
        assert body["resourceType"] in (*expected, "OperationOutcome"), body
    return body


# --- strategies -----------------------------------------------------------------------------

TYPES = supported_types()
MODIFIERS = [
    "exact",
    "contains",
    "missing",
    "not",
    "below",
    "above",
    "identifier",
    "text",
    "in",
    "iterate",
    "Patient",
    "Practitioner",
    "Organization",
    "Group",
    "",
]
ODD = [
    "",
    ",",
    ",,",
    "|",
    "||",
    "|||",
    "\\",
    "\\,",
    "\\|",
    "\\$",
    "$",
    "%",
    "%%",
    "%00",
    "%zz",
    '"',
    "'",
    "''",
    '"\'"',
    "\x00",
    "\n",
    " ",
    "*",
    ":",
    ".",
    "-",
    "+",
    "true",
    "false",
    "null",
    "NaN",
    "sNaN",
    "-Infinity",
    "1e400",
    "1e-999999999",
    "9999999999999999999999999999e999972",
    "18446744073709551615",
    "-9223372036854775809",
    "9" * 5000,
    "0",
    "-1",
    "1.5",
    "9999",
    "9999-12-31",
    "9999-12-31T23:59:59.999999+14:00",
    "0001-01-01T00:00:00-14:00",
    "2024-02-30",
    "2024-03-05T24:00",
    "2024-03-05T10:15:30+03:00",
    "２０２４",
    "urn:uuid:1",
    "Patient/1",
    "Patient/1/_history/1",
    "http://hub.test/fhir/Patient/1",
    "#c",
    "Ёлкин",
    "ёлкин",
    "Й",
    "Müller",
    "😀",
    "\U0010ffff",
    "\ud7ff",
    "Observation:subject",
    "Observation:*",
    "Patient:organization:Organization:iterate",
    "*",
    "-_lastUpdated",
    "-date,_id",
    "accurate",
    "count",
    "text",
    "data",
    "x" * 3000,
    "%" * 500,
    "|" * 500,
    "\\" * 501,
    "," * 500,
]
PREFIXES = ["eq", "ne", "lt", "le", "gt", "ge", "sa", "eb", "ap", "xx", ""]


def _param_names(resource_type: str) -> list[str]:
    return sorted({*params_for(resource_type), "_id", "_lastUpdated", *RESULT_PARAMS})


def keys(resource_type: str) -> st.SearchStrategy[str]:
    names = _param_names(resource_type)
    chained = [
        *names,
        *(n for t in ("Patient", "Organization", "Practitioner") for n in _param_names(t)),
    ]
    known = st.sampled_from(
        [*names, "_content", "_text", "_type", "_since", "_format", "_pretty", "_elements"]
    )
    with_modifier = st.builds(
        lambda n, m: f"{n}:{m}", known, st.sampled_from(MODIFIERS) | st.text(max_size=8)
    )
    with_chain = st.builds(
        lambda n, m, chain: f"{n}{':' + m if m else ''}.{'.'.join(chain)}",
        known,
        st.sampled_from(["", "Patient", "Organization", "Nope", "exact"]),
        st.lists(st.sampled_from(chained) | st.text(max_size=6), min_size=1, max_size=4),
    )
    return st.one_of(known, with_modifier, with_chain, st.text(max_size=20))


def cursor(values: list[Any]) -> str:
    """A paging cursor as the hub writes them, but of any JSON (integers of any size too)."""
    return base64.urlsafe_b64encode(json.dumps(values).encode()).decode().rstrip("=")


def cursors() -> st.SearchStrategy[str]:
    scalar = st.one_of(
        st.integers(min_value=-(2**70), max_value=2**70),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=10),
    )
    return st.lists(scalar, max_size=4).map(cursor)


def values() -> st.SearchStrategy[str]:
    atom = st.one_of(
        st.sampled_from(ODD),
        st.text(max_size=30),
        st.builds(lambda p, v: p + v, st.sampled_from(PREFIXES), st.sampled_from(ODD)),
        st.builds(
            lambda p, v: f"{p}{v}",
            st.sampled_from(PREFIXES),
            st.decimals(allow_nan=True, allow_infinity=True) | st.integers(),
        ),
        st.builds(
            lambda p, d: p + d.isoformat(),
            st.sampled_from(PREFIXES),
            st.dates() | st.datetimes(),
        ),
        cursors(),
    )
    joined = st.builds(
        lambda parts, sep: sep.join(parts),
        st.lists(atom, min_size=1, max_size=4),
        st.sampled_from([",", "|", "\\,", "$", "."]),
    )
    return st.one_of(atom, joined)


# Values a client would plausibly send, per parameter type, so that many queries get past
# parsing and reach the database (the wild strategies above mostly earn a 400).
PLAUSIBLE: dict[str, list[str]] = {
    "token": [
        "male",
        "female",
        "true",
        "final",
        "718-7",
        "http://loinc.org|718-7",
        "urn:oid:1.2.643.100.3|snils-1",
        "urn:oid:1.2.643.100.3|",
        "|snils-2",
        "snils-3,snils-4",
    ],
    "string": ["Ёлкин", "елк", "Иванова", "muller", "Пётр", "й", "a,b", "Поликлиника"],
    "date": ["1955", "1955-06", "2024-03-01T10:15:00+03:00", "2024-03-05", "9999-12-31"],
    "quantity": ["120", "1.2e2", "121|http://unitsofmeasure.org|g/L", "5||g/L", "0.5"],
    "number": ["1", "2.50"],
    "reference": ["p1", "Patient/p1", "Organization/o1", "http://hub.test/fhir/Patient/p1"],
    "uri": ["http://hl7.org/fhir/StructureDefinition/Patient", "http://x", "#src"],
}
MODIFIERS_BY_KIND: dict[str, list[str]] = {
    "token": ["", "not", "missing"],
    "string": ["", "exact", "contains", "missing"],
    "date": ["", "missing"],
    "quantity": ["", "missing"],
    "number": [""],
    "reference": ["", "Patient", "Organization", "identifier", "missing"],
    "uri": ["", "below", "above"],
}
RESULT_VALUES: dict[str, list[str]] = {
    "_sort": ["_id", "-_lastUpdated", "-birthdate", "name,-_id", "-date", "value-quantity"],
    "_count": ["0", "1", "3", "1000", "-1"],
    "_include": ["Patient:organization", "Observation:subject", "Observation:*", "Patient:*"],
    "_revinclude": ["Observation:subject", "Observation:patient", "Observation:*"],
    "_total": ["accurate", "none"],
    "_summary": ["true", "false", "text", "data", "count"],
    "_elements": ["name", "gender,birthDate", "code,valueQuantity", "value", "nope"],
    "_id": ["p1", "a,b"],
    "_lastUpdated": ["gt2000", "le2100-01-01"],
}


def plausible_item(resource_type: str) -> st.SearchStrategy[tuple[str, str]]:
    params = sorted(params_for(resource_type).values(), key=lambda p: p.name)

    def for_param(p: Any) -> st.SearchStrategy[tuple[str, str]]:
        key = st.sampled_from(MODIFIERS_BY_KIND[p.kind]).map(
            lambda m: f"{p.name}:{m}" if m else p.name
        )
        value = st.builds(
            lambda pre, v: pre + v if p.kind in ("date", "quantity") else v,
            st.sampled_from(PREFIXES[:-2] + [""]),
            st.sampled_from(PLAUSIBLE[p.kind]),
        )
        return st.tuples(key, value).map(
            lambda kv: (kv[0], "true") if kv[0].endswith(":missing") else kv
        )

    result = st.sampled_from(sorted(RESULT_VALUES)).flatmap(
        lambda k: st.tuples(st.just(k), st.sampled_from(RESULT_VALUES[k]))
    )
    return st.sampled_from(params).flatmap(for_param) | result


def queries(resource_type: str) -> st.SearchStrategy[list[tuple[str, str]]]:
    wild = st.tuples(keys(resource_type), values())
    plausible = plausible_item(resource_type)
    return st.lists(plausible, max_size=4) | st.lists(plausible | wild, max_size=5)


def raw_query(items: list[tuple[str, str]], encode: bool) -> str:
    """The query string: percent-encoded properly, or with only the bare minimum escaped."""
    if encode:
        return "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in items)
    # leave %, quotes, pipes, commas and the like as they are (only what breaks the URL goes)
    return "&".join(f"{quote(k, safe='%|,$:.*-_')}={quote(v, safe='%|,$:.*-_')}" for k, v in items)


json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    st.sampled_from(ODD),
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=20,
)
element_values = st.one_of(
    json_values,
    st.sampled_from(
        [
            [{"family": "Ёлкин", "given": ["Пётр"]}],
            [{"system": "urn:oid:1", "value": "x"}],
            {"reference": "Organization/1"},
            [{"reference": "urn:uuid:zz"}],
            {"versionId": "1", "lastUpdated": "2024-01-01T00:00:00Z"},
            "ab",
            [["a", "b"]],
            "9999-12-31",
            "2024-02-30",
            "male",
            True,
        ]
    ),
)
# Valid values per Patient element; each element may instead be any JSON at all.
PATIENT_ELEMENTS: dict[str, list[Any]] = {
    "id": ["p1", "x y"],
    "meta": [{"tag": [{"system": "urn:mo", "code": "mo-1"}]}, {"versionId": "7"}],
    "text": [{"status": "generated", "div": "<div xmlns='http://www.w3.org/1999/xhtml'>x</div>"}],
    "identifier": [[{"system": "urn:oid:1.2.643.100.3", "value": "snils-9"}]],
    "active": [True, False],
    "name": [[{"family": "Ёлкин", "given": ["Пётр"]}], [{"text": "Müller"}]],
    "telecom": [[{"system": "phone", "value": "+7 812 000-00-00"}]],
    "gender": ["male", "female", "unknown"],
    "birthDate": ["1980", "1980-05", "1980-05-17", "9999-12-31"],
    "deceasedBoolean": [False],
    "deceasedDateTime": ["2020-01-01T10:00:00+03:00"],
    "address": [[{"city": "Санкт-Петербург", "line": ["Невский, 1"]}]],
    "managingOrganization": [{"reference": "Organization/o1"}, {"reference": "#org"}],
    "generalPractitioner": [[{"reference": "Practitioner/pr1"}]],
    "link": [[{"other": {"reference": "Patient/p2"}, "type": "seealso"}]],
    "contained": [[{"resourceType": "Organization", "id": "org", "name": "ГП-1"}]],
    "extension": [[{"url": "http://x", "valueString": "y"}]],
    "_birthDate": [{"extension": [{"url": "http://x", "valueBoolean": True}]}],
}
valid_patients = st.fixed_dictionaries(
    {"resourceType": st.just("Patient")},
    optional={name: st.sampled_from(valid) for name, valid in PATIENT_ELEMENTS.items()},
)
patients = valid_patients | st.fixed_dictionaries(
    {"resourceType": st.sampled_from(["Patient", "Patient", "Patient", "Observation", "Nope"])},
    optional={
        name: st.sampled_from(valid) | st.sampled_from(valid) | element_values
        for name, valid in PATIENT_ELEMENTS.items()
    },
)
request_parts = st.fixed_dictionaries(
    {},
    optional={
        "method": st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "get", ""])
        | json_scalars,
        "url": st.sampled_from(
            [
                "Patient",
                "Patient/p1",
                "Patient?identifier=urn:oid:1|x",
                "Patient?name=%zz",
                "Observation",
                "Nope/1",
                "/",
                "",
                "http://[",
                "Patient/$everything",
                "Patient?_cursor=!!!",
                "Patient/p1/_history/1",
                "Bundle",
            ]
        )
        | json_scalars,
        "ifNoneExist": st.sampled_from(["identifier=urn:oid:1|x", "", "nope=1", "_id=a b"])
        | json_scalars,
        "ifMatch": st.sampled_from(['W/"1"', "1", "x"]) | json_scalars,
    },
)
FULL_URLS = ["urn:uuid:00000000-0000-4000-8000-00000000000a", "urn:uuid:b", "Patient/p1"]
SUBJECTS = [
    *FULL_URLS,
    "urn:uuid:missing",
    "Patient?identifier=urn:oid:1.2.643.100.3|snils-1",
    "Patient?identifier=nothing-matches",
    "Patient?gender=male",
    "Nope?x=1",
    "Patient/p1",
]
observations = st.fixed_dictionaries(
    {
        "resourceType": st.just("Observation"),
        "status": st.sampled_from(["final", "bogus"]),
        "code": st.just({"coding": [{"system": "http://loinc.org", "code": "718-7"}]}),
    },
    optional={
        "subject": st.sampled_from(SUBJECTS).map(lambda r: {"reference": r}),
        "valueQuantity": st.sampled_from([{"value": 130, "unit": "g/L"}, {"value": "x"}]),
        "effectiveDateTime": st.sampled_from(["2024-03-01", "2024-02-30"]),
    },
)
plausible_entries = st.one_of(
    st.builds(
        lambda res, full, ine: {
            "fullUrl": full,
            "resource": res,
            "request": {"method": "POST", "url": res.get("resourceType", "Patient"), **ine},
        },
        patients | observations,
        st.sampled_from(FULL_URLS),
        st.sampled_from([{}, {"ifNoneExist": "identifier=urn:oid:1.2.643.100.3|snils-9"}]),
    ),
    st.builds(
        lambda res, url, im: {"resource": res, "request": {"method": "PUT", "url": url, **im}},
        patients,
        st.sampled_from(
            ["Patient/p1", "Patient/p2", "Patient?identifier=urn:oid:1.2.643.100.3|snils-9"]
        ),
        st.sampled_from([{}, {"ifMatch": 'W/"1"'}, {"ifMatch": "x"}]),
    ),
    st.builds(
        lambda method, url: {"request": {"method": method, "url": url}},
        st.sampled_from(["GET", "DELETE", "PATCH", "HEAD"]),
        st.sampled_from(
            [
                "Patient/p1",
                "Patient?name=Ёлкин&_count=2",
                "Patient?identifier=urn:oid:1.2.643.100.3|snils-9",
                "Patient?gender=male",
                "Observation?code=http://loinc.org|718-7&_include=Observation:subject",
                "Patient?bogus=1",
            ]
        ),
    ),
)
entries = plausible_entries | st.fixed_dictionaries(
    {},
    optional={
        "fullUrl": st.sampled_from(["urn:uuid:a", "urn:uuid:b", "Patient/p1"]) | json_values,
        "resource": patients | json_values,
        "request": request_parts | json_values,
    },
)
plausible_bundles = st.fixed_dictionaries(
    {
        "resourceType": st.just("Bundle"),
        "type": st.sampled_from(["transaction", "batch"]),
        "entry": st.lists(plausible_entries, max_size=4),
    }
)
bundles = plausible_bundles | st.fixed_dictionaries(
    {
        "resourceType": st.sampled_from(["Bundle", "Bundle", "Bundle", "Patient"]),
        "type": st.sampled_from(["transaction", "batch", "collection", ""]) | json_scalars,
    },
    optional={"entry": st.lists(entries, max_size=4) | st.lists(json_values) | json_values},
)


# --- properties -----------------------------------------------------------------------------


@FUZZ
@given(items=queries("Patient"), encode=st.booleans(), lenient=st.booleans())
def test_patient_search_never_fails(
    api: TestClient, items: list[tuple[str, str]], encode: bool, lenient: bool
) -> None:
    headers = {"Prefer": "handling=lenient"} if lenient else {}
    r = api.get(f"/fhir/Patient?{raw_query(items, encode)}", headers=headers)
    check(r, "Bundle")


@FUZZ
@given(items=queries("Observation"), encode=st.booleans(), lenient=st.booleans())
def test_observation_search_never_fails(
    api: TestClient, items: list[tuple[str, str]], encode: bool, lenient: bool
) -> None:
    headers = {"Prefer": "handling=lenient"} if lenient else {}
    r = api.get(f"/fhir/Observation?{raw_query(items, encode)}", headers=headers)
    check(r, "Bundle")


@FUZZ
@given(raw=st.text(max_size=200))
def test_raw_query_strings_never_fail(api: TestClient, raw: str) -> None:
    r = api.get(f"/fhir/Patient?{quote(raw, safe='=&%|,$:.*-_')}")
    check(r, "Bundle")


@FUZZ
@given(body=patients | json_values)
def test_create_patient_never_fails(api: TestClient, body: Any) -> None:
    data = json.dumps(body, ensure_ascii=False).encode()
    r = api.post("/fhir/Patient", content=data, headers={"Content-Type": FHIR_JSON})
    out = check(r, "Patient")
    if r.status_code == 201:
        assert out["resourceType"] == "Patient"
        assert r.headers["location"].startswith("http://hub.test/fhir/Patient/")


@pytest.mark.parametrize("extension", ["true", 1.5, [1], {"extension": "x"}])
def test_a_malformed_primitive_extension_is_a_400_naming_it(
    api: TestClient, extension: Any
) -> None:
    # found by the fuzzer above: the model library crashed on `_birthDate` that is no object
    body = {"resourceType": "Patient", "birthDate": "1980-01-01", "_birthDate": extension}
    r = api.post("/fhir/Patient", content=json.dumps(body), headers={"Content-Type": FHIR_JSON})
    assert r.status_code == 400, r.text
    [issue] = r.json()["issue"]
    assert issue["severity"] == "error"
    assert issue["expression"][0].startswith("Patient._birthDate")


@FUZZ
@given(body=st.binary(max_size=200), ctype=st.sampled_from([FHIR_JSON, "text/plain", ""]))
def test_create_with_garbage_bytes_never_fails(api: TestClient, body: bytes, ctype: str) -> None:
    r = api.post("/fhir/Patient", content=body, headers={"Content-Type": ctype})
    check(r, "Patient")


@FUZZ
@given(bundle=bundles | json_values)
def test_bundles_never_fail(api: TestClient, bundle: Any) -> None:
    data = json.dumps(bundle, ensure_ascii=False).encode()
    r = api.post("/fhir", content=data, headers={"Content-Type": FHIR_JSON})
    out = check(r, "Bundle")
    if r.status_code == 200:
        assert out["type"] in ("transaction-response", "batch-response")


# --- regressions the properties found -------------------------------------------------------


@pytest.mark.parametrize(
    "query",
    [
        "birthdate=9999-12-31",
        "birthdate=ge9999-12-31T23:59:59.999999Z",
        "_lastUpdated=9999",
        "_cursor=" + cursor([2**64 - 1]),
        "_cursor=" + cursor([2**63]),
        "_cursor=" + cursor([-(2**63) - 1]),
        "_cursor=" + cursor([2**70]),
        "_sort=-birthdate&_cursor=" + cursor([2**64 - 1, 1]),
        "_sort=_id&_cursor=" + cursor([1, "x"]),
        "birthdate:exact=2024",
    ],
)
def test_patient_search_regressions(api: TestClient, query: str) -> None:
    check(api.get(f"/fhir/Patient?{query}"), "Bundle")


@pytest.mark.parametrize(
    "query",
    ["value-quantity=sNaN", "value-quantity=9999999999999999999999999999e999972", "date=9999"],
)
def test_observation_search_regressions(api: TestClient, query: str) -> None:
    check(api.get(f"/fhir/Observation?{query}"), "Bundle")


def test_search_paging_walks_every_page(api: TestClient) -> None:
    seen: list[str] = []
    url: str | None = "/fhir/Patient?_sort=-birthdate&_count=3"
    while url:
        body = check(api.get(url), "Bundle")
        seen.extend(e["resource"]["id"] for e in body["entry"])
        nxt = [link["url"] for link in body["link"] if link["relation"] == "next"]
        url = nxt[0].removeprefix("http://hub.test") if nxt else None
    assert len(seen) == len(set(seen)) >= 8


def _entry(request: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"resource": {"resourceType": "Patient"}, "request": request, **extra}


@pytest.mark.parametrize("kind", ["transaction", "batch"])
@pytest.mark.parametrize(
    "entry",
    [
        _entry({"method": "POST", "url": "Patient"}, fullUrl=["urn:uuid:a"]),
        _entry({"method": "POST", "url": "Patient"}, fullUrl={"a": 1}),
        _entry({"method": "POST", "url": "Patient", "ifNoneExist": 5}),
        _entry({"method": "POST", "url": "Patient", "ifNoneExist": ["identifier=x"]}),
        _entry({"method": "POST", "url": "http://["}),
        _entry({"method": "PUT", "url": "Patient/a b"}),
        _entry({"method": "PUT", "url": "Patient/" + "x" * 65}),
        {"request": {"method": "PATCH", "url": "Patient?name=x"}},
        {
            "request": {"method": "PATCH", "url": "Patient/p1"},
            "resource": {"resourceType": "Binary", "data": "!!not base64"},
        },
        {
            "request": {"method": "PATCH", "url": "Patient/p1"},
            "resource": {"resourceType": "Binary", "data": "bm90IGpzb24="},
        },
    ],
)
def test_bundle_regressions(api: TestClient, kind: str, entry: dict[str, Any]) -> None:
    bundle = {"resourceType": "Bundle", "type": kind, "entry": [entry]}
    body = check(api.post("/fhir", json=bundle, headers={"Content-Type": FHIR_JSON}), "Bundle")
    if kind == "batch" and body["resourceType"] == "Bundle":
        assert body["entry"][0]["response"]["status"].startswith("4")


@pytest.mark.parametrize(
    "path",
    [
        "/fhir/Patient/p1/_history/99999999999999999999999",
        "/fhir/Patient/p1/_history/²",
        "/fhir/_history?_cursor=99999999999999999999999",
        "/fhir/_history?_cursor=²",
        "/fhir/_history?_count=²",
        "/fhir/Patient/_history?_count=" + "9" * 5000,
    ],
)
def test_history_regressions(api: TestClient, path: str) -> None:
    check(api.get(path), "Bundle", "Patient")


@pytest.mark.parametrize(
    ("path", "body", "headers"),
    [
        ("/fhir/Patient/" + "y" * 65, {"resourceType": "Patient"}, {}),
        ("/fhir/Patient/a%20b", {"resourceType": "Patient"}, {}),
        # a superscript two is a digit to str.isdigit() but not to int()
        ("/fhir/Patient/p9", {"resourceType": "Patient"}, {"If-Match": 'W/"²"'.encode("latin-1")}),
        ("/fhir/Patient/p9", {"resourceType": "Patient"}, {"If-Match": "9" * 5000}),
        ("/fhir/Patient/p9", {"resourceType": "Patient", "meta": "x"}, {}),
        ("/fhir/Patient/p9", {"resourceType": "Patient", "meta": [["a", "b"]]}, {}),
    ],
)
def test_update_regressions(
    api: TestClient, path: str, body: dict[str, Any], headers: dict[str, str | bytes]
) -> None:
    r = api.put(path, json=body, headers={"Content-Type": FHIR_JSON, **headers})
    check(r, "Patient")
    assert r.status_code == 400
