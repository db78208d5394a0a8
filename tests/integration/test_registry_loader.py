"""Bulk registry loads (hie.registries.loader) into a real store, on every backend."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from hie.demo import Generator
from hie.fhir.service import FhirService, content_json
from hie.hub.store.port import Query
from hie.registries.loader import LoadReport, load_file
from hie.registries.senders import Destination, SenderRegistry

ORGS = """\
id,frmo_oid,name,short_name,kind,parent_id,district,city,address,postal_code,phone,email,active,patient_id_system
org-1,1.2.643.5.1.13.13.12.2.78.9001,"СПб ГБУЗ «Городская поликлиника № 1»",ГП № 1,polyclinic,,Кировский район,Санкт-Петербург,"пр. Стачек, д. 1",198097,+78120000001,gp1@example.org,true,urn:oid:1.2.643.5.1.13.13.12.2.78.9001.100
org-2,1.2.643.5.1.13.13.12.2.78.9002,"Поликлиническое отделение № 2",ПО № 2,polyclinic,org-1,Кировский район,Санкт-Петербург,"ул. Маршала Казакова, д. 2",198261,,,да,
org-3,1.2.643.5.1.13.13.12.2.78.9003,"СПб ГБУЗ «Городская больница № 3»",ГБ № 3,hospital,,Невский район,Санкт-Петербург,"пр. Большевиков, д. 3",193231,+78120000003|+78120000033,,1,urn:oid:1.2.643.5.1.13.13.12.2.78.9003.100
"""
LOCATIONS = """\
id;name;organization_id;parent_id;type;status;address;city;postal_code;latitude;longitude
loc-1;Главный корпус;org-1;;HOSP;active;пр. Стачек, д. 1;Санкт-Петербург;198097;59,87;30,26
loc-1-101;Кабинет 101;org-1;loc-1;;active;;;;;
loc-3;Приёмное отделение;org-3;;ER;suspended;;;;;
"""
PRACTITIONERS = """\
id,family,given,middle,gender,birth_date,snils,phone,active
pr-1,Иванова,Анна,Сергеевна,female,1980-03-14,112-233-445 95,,true
pr-2,Петров,Илья,Ильич,male,02.11.1975,,+79110000000,true
"""
ROLES = """\
id,practitioner_id,organization_id,role,specialty,specialty_display,location_ids,start,end,active
prr-1,pr-1,org-1,doctor,therapist,Терапевт участковый,loc-1|loc-1-101,2020-01-01,,true
prr-2,pr-2,org-3,doctor,surgery,Хирург,loc-3,,,true
prr-3,pr-1,org-3,doctor,cardiology,,,2021-05-01,2022-05-01,false
"""
ENDPOINTS = """\
id,organization_id,connection_type,address,hl7_facility,hl7_applications,name,status
ep-1-mllp,org-1,hl7v2-mllp,mllp://10.0.0.1:2575,GP1LAB,,ГП № 1 HL7,active
ep-1-dimse,org-1,dicom-dimse,dicom://GP1XR@10.0.0.1:104,,,ГП № 1 DICOM,active
ep-3-mllp,org-3,hl7v2-mllp,mllp://10.0.0.3:2575,GB3LAB|GB3LIS,LIS|MIS,ГБ № 3 HL7,active
ep-3-fhir,org-3,hl7-fhir-rest,https://mis.gb3.example/fhir,,,ГБ № 3 FHIR,active
"""


@pytest.fixture
def svc(store: Any, settings_for: Any) -> FhirService:
    return FhirService(store, settings_for())


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


def total(svc: FhirService, rtype: str) -> int:
    return svc.store.search(Query(rtype, count=0, total=True)).total or 0


def load_all(svc: FhirService, tmp_path: Path) -> list[LoadReport]:
    out = []
    for name, text in (
        ("organizations.csv", ORGS),
        ("locations.csv", LOCATIONS),
        ("practitioners.csv", PRACTITIONERS),
        ("roles.csv", ROLES),
        ("endpoints.csv", ENDPOINTS),
    ):
        report = load_file(svc, write(tmp_path, name, text))
        assert report.exit_code == 0 and not report.problems, report.problems
        out.append(report)
    return out


def lines(report: LoadReport) -> dict[int, str]:
    return {p.line: p.reason for p in report.problems}


# --- good files ---------------------------------------------------------------------------


def test_good_csv_files_of_every_kind(svc: FhirService, tmp_path: Path) -> None:
    reports = load_all(svc, tmp_path)
    assert [r.created for r in reports] == [3, 3, 2, 3, 4]
    assert all(r.loaded for r in reports)
    assert reports[1].format == "csv"  # semicolon-delimited, decimal commas
    org = content_json(svc.read("Organization", "org-2"))
    assert org["partOf"] == {"reference": "Organization/org-1"}
    assert org["identifier"][0]["value"] == "1.2.643.5.1.13.13.12.2.78.9002"
    assert org["address"][0]["district"] == "Кировский район"
    loc = content_json(svc.read("Location", "loc-1"))
    assert loc["position"] == {"latitude": 59.87, "longitude": 30.26}
    assert loc["type"][0]["coding"][0]["code"] == "HOSP"
    pr = content_json(svc.read("Practitioner", "pr-2"))
    assert pr["birthDate"] == "1975-11-02" and pr["name"][0]["given"] == ["Илья", "Ильич"]
    assert content_json(svc.read("Practitioner", "pr-1"))["identifier"][0]["value"] == (
        "112-233-445 95"
    )
    role = content_json(svc.read("PractitionerRole", "prr-1"))
    assert [x["reference"] for x in role["location"]] == ["Location/loc-1", "Location/loc-1-101"]
    # the loaded registrations are what the adapters' lookups see
    reg = SenderRegistry(svc.store)
    mo = reg.mo_for_hl7_sender("MIS", "GB3LIS")
    assert mo is not None and mo.id == "org-3"
    assert mo.patient_id_system == "urn:oid:1.2.643.5.1.13.13.12.2.78.9003.100"
    assert reg.mo_for_hl7_sender("OTHER", "GB3LIS") is None  # applications are limited
    caller = reg.mo_for_dicom_caller("GP1XR", "10.0.0.1")
    assert caller is not None and caller.id == "org-1"
    assert reg.dicom_destination("GP1XR") == Destination("10.0.0.1", 104)


def test_reloading_the_same_file_changes_nothing(svc: FhirService, tmp_path: Path) -> None:
    load_all(svc, tmp_path)
    before = svc.store.read("Organization", "org-1")
    again = load_file(svc, tmp_path / "organizations.csv")
    assert (again.created, again.updated, again.unchanged) == (0, 0, 3)
    after = svc.store.read("Organization", "org-1")
    assert before is not None and after is not None and after.version == before.version
    # a changed row is updated, the others stay as they are
    changed = ORGS.replace("ГП № 1,polyclinic", "ГП № 1 (новое),polyclinic")
    report = load_file(svc, write(tmp_path, "organizations.csv", changed))
    assert (report.created, report.updated, report.unchanged) == (0, 1, 2)
    assert content_json(svc.read("Organization", "org-1"))["alias"] == ["ГП № 1 (новое)"]


def test_demo_city_as_a_json_bundle(svc: FhirService, tmp_path: Path) -> None:
    city = Generator(3).city()
    bundle = {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [{"resource": r} for r in city.resources()],
    }
    path = write(tmp_path, "city.json", json.dumps(bundle, ensure_ascii=False, indent=2))
    progress: list[tuple[str, int, int]] = []
    report = load_file(svc, path, progress=lambda *a: progress.append(a), batch=100)
    assert report.exit_code == 0, report.problems
    n = len(list(city.resources()))
    assert report.created == n and report.rows == n
    assert report.counts["Organization"] == len(city.organizations)
    assert total(svc, "PractitionerRole") == len(city.roles)
    assert progress[-1] == ("loading", n, n)
    assert {p[0] for p in progress} == {"validating", "loading"}
    again = load_file(svc, path)
    assert again.unchanged == n and again.created == again.updated == 0


def test_json_array_and_ndjson(svc: FhirService, tmp_path: Path) -> None:
    city = Generator(3).city()
    orgs = [o for o in city.organizations if "partOf" not in o][:3]
    arr = write(tmp_path, "orgs.json", json.dumps(orgs, ensure_ascii=False))
    report = load_file(svc, arr, "organizations")
    assert report.exit_code == 0 and report.created == 3
    eps = [e for e in city.endpoints if e["managingOrganization"]["reference"].split("/")[1]
           in {o["id"] for o in orgs}]  # fmt: skip
    nd = write(tmp_path, "eps.ndjson", "\n".join(json.dumps(e) for e in eps) + "\n")
    report = load_file(svc, nd, "endpoints")
    assert report.format == "ndjson" and report.created == len(eps)
    # stored meta from an export is not a change
    exported = [content_json(svc.read("Organization", o["id"])) for o in orgs]
    report = load_file(svc, write(tmp_path, "exported.json", json.dumps(exported)))
    assert report.unchanged == 3


def test_dry_run_writes_nothing(svc: FhirService, tmp_path: Path) -> None:
    report = load_file(svc, write(tmp_path, "o.csv", ORGS), dry_run=True)
    assert report.exit_code == 0 and report.loaded and report.created == 3
    assert "dry run" in report.summary()
    assert total(svc, "Organization") == 0


# --- bad input: every bad row reported with its line, nothing loaded ------------------------


def test_duplicate_organisation_ids_in_a_file(svc: FhirService, tmp_path: Path) -> None:
    text = ORGS + "org-1,1.2.643.5.1.13.13.12.2.78.9004,Дубликат,,,,,,,,,,,\n"
    report = load_file(svc, write(tmp_path, "o.csv", text))
    assert report.exit_code == 1 and not report.loaded
    bad = lines(report)
    assert set(bad) == {2, 3, 5}
    assert "duplicate Organization id 'org-1'" in bad[2] and "line 5" in bad[2]
    assert "line 2" in bad[5]
    # org-2 is a department of org-1, which is neither good in the file nor in the hub
    assert bad[3] == "refers to Organization/org-1 (line 2, 5), which is bad and not in the hub"
    assert total(svc, "Organization") == 0


def test_duplicate_frmo_oid_in_the_file_and_in_the_hub(svc: FhirService, tmp_path: Path) -> None:
    text = ORGS + "org-4,1.2.643.5.1.13.13.12.2.78.9003,Тот же OID,,,,,,,,,,,\n"
    bad = lines(load_file(svc, write(tmp_path, "o.csv", text)))
    assert set(bad) == {4, 5} and "ФРМО OID '1.2.643.5.1.13.13.12.2.78.9003'" in bad[5]
    load_file(svc, write(tmp_path, "o.csv", ORGS))
    clash = "id,frmo_oid,name\norg-9,1.2.643.5.1.13.13.12.2.78.9001,Другая МО\n"
    bad = lines(load_file(svc, write(tmp_path, "clash.csv", clash)))
    assert bad == {2: "ФРМО OID '1.2.643.5.1.13.13.12.2.78.9001' is already registered to "
                      "Organization/org-1"}  # fmt: skip


@pytest.mark.parametrize(
    ("oid", "why"),
    [
        ("1.2.643.5.1.13.13.12.2.78", "malformed"),
        ("1.2.643.5.1.13.13.12.2.78.0099", "malformed"),
        ("1.2.643.5.1.13.13.12.2.78..99", "malformed"),
        ("1.2.643.5.1.13.13.11.1461", "must start with"),
        ("1.2.643.5.1.13.13.12.2.78.9x", "only digits and dots"),
    ],
)
def test_bad_frmo_oid(svc: FhirService, tmp_path: Path, oid: str, why: str) -> None:
    text = f"id,frmo_oid,name\norg-ok,1.2.643.5.1.13.13.12.2.78.1,Хорошая\norg-bad,{oid},Плохая\n"
    report = load_file(svc, write(tmp_path, "o.csv", text))
    assert report.exit_code == 1
    bad = lines(report)
    assert list(bad) == [3] and why in bad[3] and report.problems[0].id == "org-bad"
    assert total(svc, "Organization") == 0


def test_missing_required_column(svc: FhirService, tmp_path: Path) -> None:
    report = load_file(svc, write(tmp_path, "o.csv", "id,name\norg-1,Без OID\n"), "organizations")
    assert report.exit_code == 1 and report.fatal
    assert report.problems[0].line == 1 and "'frmo_oid'" in report.problems[0].reason
    # with --skip-bad too: a file without a required column loads nothing
    report = load_file(svc, tmp_path / "o.csv", "organizations", skip_bad=True)
    assert report.exit_code == 1 and not report.loaded


def test_unknown_column_and_kind_detection(svc: FhirService, tmp_path: Path) -> None:
    report = load_file(svc, write(tmp_path, "o.csv", "id,frmo_oid,name,frmo_iod\n"))
    assert report.fatal and "unknown column(s): 'frmo_iod'" in report.problems[0].reason
    report = load_file(svc, write(tmp_path, "x.csv", "foo,bar\n1,2\n"))
    assert report.fatal and "--kind" in report.problems[0].reason


def test_empty_required_value_and_bad_values(svc: FhirService, tmp_path: Path) -> None:
    text = (
        "id,family,given,gender,birth_date,snils\n"
        "pr-1,Иванова,Анна,female,1980-03-14,112-233-445 95\n"
        "pr-2,,Пётр,male,,\n"
        "pr-3,Сидоров,Олег,x,,\n"
        "pr-4,Орлова,Ольга,female,2999-01-01,\n"
        "pr-5,Орлов,Олег,male,1980-02-30,\n"
        "pr-6,Котов,Кот,male,,112-233-445 96\n"
        "pr 7,Котова,Кошка,female,,\n"
    )
    report = load_file(svc, write(tmp_path, "p.csv", text))
    bad = lines(report)
    assert set(bad) == {3, 4, 5, 6, 7, 8}
    assert "'family'" in bad[3]
    assert "gender 'x'" in bad[4]
    assert "not a possible birth date" in bad[5]
    assert "not a date" in bad[6]
    assert "not a valid SNILS" in bad[7]
    assert "not a valid FHIR id" in bad[8]


def test_unknown_parent_and_organisation(svc: FhirService, tmp_path: Path) -> None:
    text = ORGS + "org-4,1.2.643.5.1.13.13.12.2.78.9004,Филиал,,,org-404,,,,,,,,\n"
    bad = lines(load_file(svc, write(tmp_path, "o.csv", text)))
    assert bad == {5: "refers to Organization/org-404, which is neither in the file nor in the hub"}
    roles = "id,practitioner_id,organization_id\nprr-1,pr-404,org-1\n"
    bad = lines(load_file(svc, write(tmp_path, "r.csv", roles)))
    assert "Practitioner/pr-404" in bad[2] or "Organization/org-1" in bad[2]


def test_parent_cycles(svc: FhirService, tmp_path: Path) -> None:
    text = (
        "id,frmo_oid,name,parent_id\n"
        "org-a,1.2.643.5.1.13.13.12.2.78.1,A,org-b\n"
        "org-b,1.2.643.5.1.13.13.12.2.78.2,B,org-a\n"
        "org-c,1.2.643.5.1.13.13.12.2.78.3,C,org-c\n"
        "org-d,1.2.643.5.1.13.13.12.2.78.4,D,org-a\n"
    )
    bad = lines(load_file(svc, write(tmp_path, "o.csv", text)))
    assert bad[2] == (
        "partOf goes round in a circle: Organization/org-a → Organization/org-b → "
        "Organization/org-a"
    )
    assert "circle" in bad[3]
    assert bad[4] == "Organization/org-c is its own parent (partOf)"
    assert "refers to Organization/org-a (line 2), which is bad" in bad[5]


def test_references_resolve_to_the_hub(svc: FhirService, tmp_path: Path) -> None:
    load_file(svc, write(tmp_path, "o.csv", ORGS))
    text = "id,frmo_oid,name,parent_id\norg-5,1.2.643.5.1.13.13.12.2.78.9005,Филиал,org-3\n"
    report = load_file(svc, write(tmp_path, "o2.csv", text))
    assert report.exit_code == 0 and report.created == 1


def test_invalid_fhir_in_json(svc: FhirService, tmp_path: Path) -> None:
    good = {
        "resourceType": "Organization",
        "id": "org-j1",
        "identifier": [
            {
                "system": "urn:oid:1.2.643.5.1.13.13.11.1461",
                "value": "1.2.643.5.1.13.13.12.2.78.7001",
            }
        ],
        "name": "Хорошая",
    }

    def oid(n: int) -> list[dict[str, str]]:
        return [{"system": "urn:oid:1.2.643.5.1.13.13.11.1461",
                 "value": f"1.2.643.5.1.13.13.12.2.78.{n}"}]  # fmt: skip

    bad_element = {**good, "id": "org-j2", "identifier": oid(7002), "nmae": "опечатка"}
    bad_type = {**good, "id": "org-j3", "identifier": oid(7003), "active": "yes please"}
    no_oid = {"resourceType": "Organization", "id": "org-j4", "name": "Без OID"}
    wrong_type = {"resourceType": "Patient", "id": "p-1"}
    no_id = {k: v for k, v in good.items() if k != "id"} | {"identifier": oid(7005)}
    text = "[\n" + ",\n".join(
        json.dumps(r, ensure_ascii=False) for r in (good, bad_element, bad_type, no_oid,
                                                    wrong_type, no_id)
    ) + "\n]\n"  # fmt: skip
    report = load_file(svc, write(tmp_path, "o.json", text))
    assert report.exit_code == 1
    bad = lines(report)
    assert set(bad) == {3, 4, 5, 6, 7}
    assert "invalid FHIR Organization" in bad[3] and "nmae" in bad[3]
    assert "Organization.active" in bad[4]
    assert "no ФРМО OID" in bad[5]
    assert "not a registry resource" in bad[6]
    assert "not a valid FHIR id" in bad[7]


def test_bundle_entry_line_numbers(svc: FhirService, tmp_path: Path) -> None:
    orgs = [o for o in Generator(3).city().organizations if "partOf" not in o][:3]
    orgs[1] = {**orgs[1], "status": "bogus"}
    bundle = {"resourceType": "Bundle", "type": "transaction",
              "entry": [{"resource": o, "request": {"method": "PUT",
                                                    "url": f"Organization/{o['id']}"}}
                        for o in orgs]}  # fmt: skip
    text = json.dumps(bundle, ensure_ascii=False, indent=1)
    report = load_file(svc, write(tmp_path, "b.json", text))
    [problem] = report.problems
    # the reported line is where the bad entry starts
    entry_line = text.splitlines()[problem.line - 1]
    assert entry_line.strip() == "{" and problem.id == orgs[1]["id"]
    second_entry = text.index('"resource"', text.index('"resource"') + 1)
    assert problem.line == text.count("\n", 0, second_entry)


def test_broken_json_and_ndjson(svc: FhirService, tmp_path: Path) -> None:
    report = load_file(svc, write(tmp_path, "b.json", '[\n{"resourceType": "Organization",\n'))
    assert report.fatal and report.problems[0].line == 3
    ok = json.dumps(Generator(3).city().organizations[0], ensure_ascii=False)
    report = load_file(svc, write(tmp_path, "b.ndjson", ok + "\n{not json\n"))
    assert lines(report).keys() == {2} and "not valid JSON" in lines(report)[2]


def test_endpoint_checks(svc: FhirService, tmp_path: Path) -> None:
    load_file(svc, write(tmp_path, "o.csv", ORGS))
    load_file(svc, write(tmp_path, "e.csv", ENDPOINTS))
    text = (
        "id,organization_id,connection_type,address,hl7_facility,ae_title\n"
        "ep-a,org-2,hl7v2-mllp,mllp://10.0.0.2:2575,,\n"  # no facility
        "ep-b,org-2,dicom-dimse,dicom://THIS-AE-TITLE-IS-TOO-LONG@h:104,,\n"
        "ep-c,org-2,dicom-dimse,dicom://PO2XR@10.0.0.2:104,,OTHER\n"  # AE disagrees
        "ep-d,org-2,smoke-signals,fire://hill,,\n"
        "ep-e,org-2,hl7v2-mllp,mllp://10.0.0.2:2575,GP1LAB,\n"  # org-1's facility
        "ep-f,org-2,dicom-dimse,dicom://GP1XR@10.0.0.1:104,,\n"  # org-1's AE at its host
        "ep-g,org-2,dicom-dimse,dicom://GP1XR@10.0.0.2:104,,\n"  # same AE elsewhere: fine
    )
    bad = lines(load_file(svc, write(tmp_path, "e2.csv", text)))
    assert set(bad) == {2, 3, 4, 5, 6, 7}
    assert "hl7_facility" in bad[2]
    assert "AE title" in bad[3]
    assert "differs" in bad[4]
    assert "smoke-signals" in bad[5]
    assert "HL7 sending facility 'GP1LAB' is already registered to Organization/org-1" in bad[6]
    assert "DICOM AE title 'GP1XR'" in bad[7] and "Organization/org-1" in bad[7]


def test_same_facility_for_two_mos_in_one_file(svc: FhirService, tmp_path: Path) -> None:
    load_file(svc, write(tmp_path, "o.csv", ORGS))
    text = (
        "id,organization_id,connection_type,address,hl7_facility\n"
        "ep-x,org-1,hl7v2-mllp,mllp://h:1,SHARED\n"
        "ep-y,org-3,hl7v2-mllp,mllp://h:2,SHARED\n"
    )
    bad = lines(load_file(svc, write(tmp_path, "e.csv", text)))
    assert set(bad) == {2, 3} and "also on line 3" in bad[2]


def test_moving_a_facility_between_mos_in_one_load(svc: FhirService, tmp_path: Path) -> None:
    load_file(svc, write(tmp_path, "o.csv", ORGS))
    load_file(svc, write(tmp_path, "e.csv", ENDPOINTS))
    text = (
        "id,organization_id,connection_type,address,hl7_facility,status\n"
        "ep-1-mllp,org-1,hl7v2-mllp,mllp://10.0.0.1:2575,GP1LAB,off\n"
        "ep-2-mllp,org-2,hl7v2-mllp,mllp://10.0.0.2:2575,GP1LAB,active\n"
    )
    report = load_file(svc, write(tmp_path, "move.csv", text))
    assert report.exit_code == 0, report.problems
    mo = SenderRegistry(svc.store).mo_for_hl7_sender(None, "GP1LAB")
    assert mo is not None and mo.id == "org-2"


def test_skip_bad_loads_the_good_rows(svc: FhirService, tmp_path: Path) -> None:
    text = ORGS + (
        "org-4,1.2.643.5.1.13.13.12.2.78.9x,Плохой OID,,,,,,,,,,,\n"
        "org-5,1.2.643.5.1.13.13.12.2.78.9005,Филиал плохой,,,org-4,,,,,,,,\n"
        "org-6,1.2.643.5.1.13.13.12.2.78.9006,Филиал хорошей,,,org-3,,,,,,,,\n"
    )
    path = write(tmp_path, "o.csv", text)
    assert load_file(svc, path).exit_code == 1
    assert total(svc, "Organization") == 0
    report = load_file(svc, path, skip_bad=True)
    assert report.exit_code == 0 and report.loaded
    assert report.created == 4 and [p.line for p in report.skipped] == [5, 6]
    assert "Organization/org-4 (line 5), which is bad" in lines(report)[6]
    assert "skipped" in report.summary()
    assert total(svc, "Organization") == 4


def test_windows_1251_and_bom(svc: FhirService, tmp_path: Path) -> None:
    path = tmp_path / "cp1251.csv"
    path.write_bytes(ORGS.replace(",", ";").encode("cp1251"))
    report = load_file(svc, path)
    assert report.exit_code == 0 and report.created == 3
    assert content_json(svc.read("Organization", "org-1"))["alias"] == ["ГП № 1"]
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeff".encode() + PRACTITIONERS.encode())
    assert load_file(svc, path).created == 2


def test_unreadable_file(svc: FhirService, tmp_path: Path) -> None:
    report = load_file(svc, tmp_path / "missing.csv")
    assert report.fatal and report.exit_code == 1 and "cannot read" in report.problems[0].reason
