"""Critical-result alerts end to end, on SQLite and PostgreSQL: a lab report is stored over
FHIR as the intake stores it, the outbox worker feeds :class:`CriticalResultAlerts`, the
ordering clinician finds the alert in their inbox over HTTP, and :class:`AlertEscalator`,
driven by a clock the test controls, moves an unacknowledged alert to the MO's duty officer
and then to the hub's duty operator, each step a Task version with a note."""

from __future__ import annotations

import time
from typing import Any

import orjson
import pytest
from prometheus_client import REGISTRY

from hie.fhir import model
from hie.fhir.dates import format_instant
from hie.hub.auth import HUB, acting_as
from hie.hub.outbox import OutboxWorker
from hie.hub.store.sql import now_us
from hie.lab_exchange.alerts import (
    ACKNOWLEDGE,
    ALERT_STATUS_SYSTEM,
    DUTY_OFFICER,
    ROLE_SYSTEM,
    TASK_CODE_SYSTEM,
    AlertEscalator,
    CriticalResultAlerts,
    CriticalRules,
    load_builtin_limits,
)
from tests.fixtures.auth import bearer
from tests.fixtures.records import FJ, person, post

LOINC = "http://loinc.org"
UCUM = "http://unitsofmeasure.org"
V3 = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
ALERT_CODE = f"{TASK_CODE_SYSTEM}|{ACKNOWLEDGE}"
STAFF_IDS = "urn:oid:1.2.643.5.1.13.13.12.2.78.7"  # the MO's staff numbers
MINUTE = 60.0


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, minutes: float) -> float:
        self.now += minutes * MINUTE
        return self.now


def put(client: Any, res: dict[str, Any]) -> dict[str, Any]:
    """PUT ``res`` by its id (as the service role); the stored resource."""
    r = client.put(f"/fhir/{res['resourceType']}/{res['id']}", json=res, headers=FJ)
    assert r.status_code in (200, 201), r.text
    return r.json()  # type: ignore[no-any-return]


def duty_role(rid: str, practitioner: str, org: str | None) -> dict[str, Any]:
    role: dict[str, Any] = {
        "resourceType": "PractitionerRole",
        "id": rid,
        "active": True,
        "practitioner": {"reference": f"Practitioner/{practitioner}"},
        "code": [
            {
                "coding": [{"system": ROLE_SYSTEM, "code": DUTY_OFFICER}],
                "text": "Дежурный врач",
            }
        ],
    }
    if org:
        role["organization"] = {"reference": f"Organization/{org}"}
    return role


@pytest.fixture
def city(client) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """An MO with an ordering doctor and a duty officer, a lab, the hub's duty operator, a
    patient and an order."""
    put(client, {"resourceType": "Organization", "id": "mo-7", "name": "Поликлиника № 7"})
    put(client, {"resourceType": "Organization", "id": "lab-1", "name": "Лаборатория ЦКДЛ"})
    for pid, family, given in (
        ("pr-ivanova", "Иванова", "Анна"),
        ("pr-petrov", "Петров", "Олег"),
        ("pr-sidorova", "Сидорова", "Мария"),
    ):
        put(
            client,
            {
                "resourceType": "Practitioner",
                "id": pid,
                "identifier": [{"system": STAFF_IDS, "value": pid.upper()}],
                "name": [{"family": family, "given": [given]}],
            },
        )
    put(
        client,
        {
            "resourceType": "PractitionerRole",
            "id": "role-ivanova",
            "active": True,
            "practitioner": {"reference": "Practitioner/pr-ivanova"},
            "organization": {"reference": "Organization/mo-7"},
        },
    )
    put(client, duty_role("duty-mo-7", "pr-petrov", "mo-7"))
    put(client, duty_role("duty-hub", "pr-sidorova", None))
    patient = post(client, person("Смирнова", "Ольга", "1980-01-02"))["id"]
    order = put(
        client,
        {
            "resourceType": "ServiceRequest",
            "id": "order-1",
            "status": "active",
            "intent": "order",
            "subject": {"reference": f"Patient/{patient}"},
            "code": {"coding": [{"system": LOINC, "code": "24323-8"}]},
            "requester": {"reference": "PractitionerRole/role-ivanova"},
            "performer": [{"reference": "Organization/lab-1"}],
        },
    )["id"]
    return {"patient": patient, "order": order}


def result(
    oid: str,
    patient: str,
    loinc: str,
    name: str,
    value: float | None,
    unit: str,
    flag: str | None = None,
    ucum: str | None = None,
) -> dict[str, Any]:
    obs: dict[str, Any] = {
        "resourceType": "Observation",
        "id": oid,
        "status": "final",
        "code": {"coding": [{"system": LOINC, "code": loinc}], "text": name},
        "subject": {"reference": f"Patient/{patient}"},
        "effectiveDateTime": "2026-03-05T08:00:00+03:00",
        "performer": [{"reference": "Organization/lab-1"}],
    }
    if value is not None:
        obs["valueQuantity"] = {"value": value, "unit": unit, "system": UCUM, "code": ucum or unit}
    if flag:
        obs["interpretation"] = [{"coding": [{"system": V3, "code": flag}]}]
    return obs


def send_report(
    client: Any,
    rid: str,
    patient: str,
    results: list[dict[str, Any]],
    *,
    order: str | None = "order-1",
    status: str = "final",
    issued: str | None = None,
) -> None:
    """Store a lab report and its results in one transaction, as the lab intake does."""
    report: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": rid,
        "status": status,
        "category": [
            {"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "LAB"}]}
        ],
        "code": {"coding": [{"system": LOINC, "code": "24323-8"}], "text": "Биохимия"},
        "subject": {"reference": f"Patient/{patient}"},
        "issued": issued or format_instant(now_us()),
        "performer": [{"reference": "Organization/lab-1"}],
        "result": [{"reference": f"Observation/{o['id']}"} for o in results],
    }
    if order:
        report["basedOn"] = [{"reference": f"ServiceRequest/{order}"}]
    bundle = {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "resource": res,
                "request": {"method": "PUT", "url": f"{res['resourceType']}/{res['id']}"},
            }
            for res in (*results, report)
        ],
    }
    r = client.post("/fhir", json=bundle, headers=FJ)
    assert r.status_code == 200, r.text


def potassium(
    patient: str, value: float = 7.1, flag: str | None = "HH", oid: str = "k-1"
) -> dict[str, Any]:
    return result(oid, patient, "2823-3", "Калий", value, "mmol/L", flag)


@pytest.fixture
def alerting(client, city) -> dict[str, Any]:  # type: ignore[no-untyped-def]
    """The alert consumer and the escalator over the app's store and FHIR service, with a
    clock the test controls, and a worker that runs the consumer."""
    hub, settings = client.hub, client.settings
    svc = client.app.state.fhir
    clock = Clock()
    alerts = CriticalResultAlerts(hub.store, svc, settings, clock=clock)
    return {
        "alerts": alerts,
        "escalator": AlertEscalator(hub.store, svc, settings, clock),
        "worker": OutboxWorker(hub.store, [alerts], poll_seconds=0.01),
        "clock": clock,
        "svc": svc,
    }


def bundle_resources(bundle: dict[str, Any], rtype: str | None = None) -> list[dict[str, Any]]:
    return [
        e["resource"]
        for e in bundle.get("entry", [])
        if e.get("search", {}).get("mode") != "outcome"
        and (rtype is None or e["resource"]["resourceType"] == rtype)
    ]


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def clinician(client: Any) -> dict[str, str]:
    return bearer(client.settings, "clinician", org="mo-7", practitioner="pr-ivanova")


def alert_tasks(client: Any) -> list[dict[str, Any]]:
    r = client.get(f"/fhir/Task?code={ALERT_CODE}&_count=100")
    assert r.status_code == 200, r.text
    return bundle_resources(r.json(), "Task")


def stage(task: dict[str, Any]) -> str:
    return next(
        c["code"] for c in task["businessStatus"]["coding"] if c["system"] == ALERT_STATUS_SYSTEM
    )


# --- the alert and the inbox ---------------------------------------------------------------------


def test_a_critical_report_reaches_the_ordering_doctors_inbox(client, city, alerting) -> None:  # type: ignore[no-untyped-def]
    before = sample("hie_lab_alerts_total", reason="flag")
    send_report(
        client,
        "dr-1",
        city["patient"],
        [
            potassium(city["patient"]),
            result("na-1", city["patient"], "2951-2", "Натрий", 140, "mmol/L", "N"),
        ],
    )
    alerting["worker"].drain()
    me = clinician(client)
    # the inbox: Task?owner=…&status=requested, by the role and through it by the practitioner
    for query in (
        "/fhir/Task?owner=PractitionerRole/role-ivanova&status=requested",
        "/fhir/Task?owner:PractitionerRole.practitioner=Practitioner/pr-ivanova&status=requested",
    ):
        r = client.get(query, headers=me)
        assert r.status_code == 200, r.text
        tasks = bundle_resources(r.json(), "Task")
        assert len(tasks) == 1, query
    task = tasks[0]
    model.validate(dict(task))
    assert task["status"] == "requested" and task["intent"] == "order"
    assert task["priority"] == "stat"
    assert task["code"]["coding"][0] == {
        "system": TASK_CODE_SYSTEM,
        "code": ACKNOWLEDGE,
        "display": "Acknowledge critical result",
    }
    assert task["focus"] == {"reference": "DiagnosticReport/dr-1"}
    assert task["for"] == {"reference": f"Patient/{city['patient']}"}
    assert task["owner"]["reference"] == "PractitionerRole/role-ivanova"
    assert "Иванова" in task["owner"]["display"]
    assert task["requester"] == {"reference": "Organization/lab-1"}
    assert task["basedOn"] == [{"reference": "ServiceRequest/order-1"}]
    assert stage(task) == "notified"
    due = task["restriction"]["period"]["end"]
    created = task["authoredOn"]
    assert _seconds(due) - _seconds(created) == pytest.approx(30 * MINUTE, abs=1)
    assert "Калий 7.1 mmol/L" in task["description"] and "HH" in task["description"]
    assert len(task["note"]) == 1 and "создано" in task["note"][0]["text"]
    assert "raised" in task["note"][0]["text"]
    findings = [i for i in task["input"] if i["type"]["coding"][0]["code"] == "critical-finding"]
    assert [f["valueReference"]["reference"] for f in findings] == ["Observation/k-1"]
    # the notification, by the practitioner, the role or the MO
    for recipient in (
        "Practitioner/pr-ivanova",
        "PractitionerRole/role-ivanova",
        "Organization/mo-7",
    ):
        r = client.get(f"/fhir/Communication?recipient={recipient}&status=in-progress", headers=me)
        assert r.status_code == 200, r.text
        comms = bundle_resources(r.json(), "Communication")
        assert len(comms) == 1, recipient
    comm = comms[0]
    model.validate(dict(comm))
    assert comm["priority"] == "stat"
    assert comm["category"][0]["coding"][0]["code"] == "alert"
    assert {"reference": "DiagnosticReport/dr-1"} in comm["about"]
    assert {"reference": f"Task/{task['id']}"} in comm["about"]
    assert comm["subject"] == {"reference": f"Patient/{city['patient']}"}
    ru, en = (p["contentString"] for p in comm["payload"])
    assert ru.startswith("Критический результат: Калий 7.1 mmol/L — критически высокое (HH)")
    assert en.startswith("Critical result: Калий 7.1 mmol/L — critically high (HH)")
    assert "Смирнова" not in ru + en  # the patient's name is not in the message
    assert sample("hie_lab_alerts_total", reason="flag") == before + 1
    # another MO's clinician does not see it
    other = bearer(client.settings, "clinician", org="mo-99")
    r = client.get("/fhir/Task?owner=PractitionerRole/role-ivanova", headers=other)
    assert bundle_resources(r.json(), "Task") == []


def test_redelivery_and_a_resent_report_raise_no_second_alert(client, city, alerting) -> None:  # type: ignore[no-untyped-def]
    alerts = alerting["alerts"]
    send_report(client, "dr-1", city["patient"], [potassium(city["patient"])])
    events = client.hub.store.outbox_read(alerts.name, 1000)
    alerts.handle(events)
    alerts.handle(events)  # the worker crashed before its ack: the batch comes again
    alerting["worker"].drain()
    # the lab sends the same report again (a new version of everything, same values)
    send_report(client, "dr-1", city["patient"], [potassium(city["patient"])])
    alerting["worker"].drain()
    assert len(alert_tasks(client)) == 1
    comms = client.get("/fhir/Communication?category=alert").json()
    assert len(bundle_resources(comms, "Communication")) == 1
    assert client.get("/fhir/DiagnosticReport/dr-1").json()["meta"]["versionId"] == "2"


def test_a_report_without_critical_values_raises_nothing(client, city, alerting) -> None:  # type: ignore[no-untyped-def]
    load_builtin_limits(alerting["svc"])
    p = city["patient"]
    send_report(
        client,
        "dr-2",
        p,
        [
            # high but not critical, flagged H; within the builtin limits
            result("k-2", p, "2823-3", "Калий", 5.8, "mmol/L", "H"),
            result("glu-2", p, "14749-6", "Глюкоза", 11.0, "mmol/L", "H"),
            result("na-2", p, "2951-2", "Натрий", 139, "mmol/L", "N"),
            # no value at all
            result("hb-2", p, "718-7", "Гемоглобин", None, "g/L"),
        ],
    )
    alerting["worker"].drain()
    assert alert_tasks(client) == []
    assert bundle_resources(client.get("/fhir/Communication").json()) == []


def test_results_issued_long_ago_page_nobody(client, city, alerting) -> None:  # type: ignore[no-untyped-def]
    before = sample("hie_lab_alerts_skipped_total", reason="old")
    p = city["patient"]
    # an MO loads its archive: last spring's critical potassium is history, not an emergency
    send_report(client, "dr-old", p, [potassium(p, oid="k-old")], issued="2025-04-01T09:00:00Z")
    alerting["worker"].drain()
    assert alert_tasks(client) == []
    assert sample("hie_lab_alerts_skipped_total", reason="old") == before + 1


def test_a_rule_of_the_reference_data_raises_an_alert(client, city, alerting) -> None:  # type: ignore[no-untyped-def]
    report = load_builtin_limits(alerting["svc"])
    assert "ObservationDefinition/critical-glucose" in report.created
    before = sample("hie_lab_alerts_total", reason="rule")
    p = city["patient"]
    # the lab flags only H; glucose 540 mg/dL is 30 mmol/L, above the critical 26.9
    send_report(client, "dr-3", p, [result("glu-3", p, "2345-7", "Глюкоза", 540, "mg/dL", "H")])
    alerting["worker"].drain()
    (task,) = alert_tasks(client)
    assert "Глюкоза 540 mg/dL — критически высокое (HH; порог ≥ 26.9 mmol/L)" in task["description"]
    assert sample("hie_lab_alerts_total", reason="rule") == before + 1


def test_operators_change_the_rules(client, city, alerting) -> None:  # type: ignore[no-untyped-def]
    svc = alerting["svc"]
    rules = CriticalRules(client.hub.store)
    assert len(rules.current()) == 0
    load_builtin_limits(svc)
    assert len(rules.current()) == 12
    p = city["patient"]
    # an operator lowers the potassium ceiling to 5.5 mmol/L
    limits = client.hub.store.read("ObservationDefinition", "critical-potassium")
    res = orjson.loads(limits.content)
    res["qualifiedInterval"][1]["range"]["low"]["value"] = 5.5
    with acting_as(HUB), client.hub.store.transaction() as tx:
        svc.write_internal(tx, res, "ObservationDefinition", "critical-potassium", now_us())
    current = rules.current()
    assert [r.low for r in current.for_code({"coding": [{"system": LOINC, "code": "2823-3"}]})] == [
        None,
        5.5,
    ]
    send_report(client, "dr-4", p, [result("k-4", p, "2823-3", "Калий", 5.8, "mmol/L", "H")])
    alerting["worker"].drain()
    assert len(alert_tasks(client)) == 1
    # the builtin loader keeps the operator's change unless told to replace it
    again = load_builtin_limits(svc)
    assert again.kept == ["ObservationDefinition/critical-potassium"]
    assert len(again.unchanged) == 11
    assert load_builtin_limits(svc, replace=True).updated == [
        "ObservationDefinition/critical-potassium"
    ]


# --- corrections ---------------------------------------------------------------------------------


def test_a_corrected_report_replaces_or_withdraws_the_alert(client, city, alerting) -> None:  # type: ignore[no-untyped-def]
    p = city["patient"]
    send_report(client, "dr-5", p, [potassium(p, 7.1)])
    alerting["worker"].drain()
    (first,) = alert_tasks(client)
    # corrected: another critical value → a new alert; the open one is superseded
    send_report(client, "dr-5", p, [potassium(p, 7.6)], status="corrected")
    alerting["worker"].drain()
    tasks = {t["id"]: t for t in alert_tasks(client)}
    assert len(tasks) == 2
    old = tasks.pop(first["id"])
    (new,) = tasks.values()
    assert old["status"] == "cancelled" and stage(old) == "superseded"
    assert f"Task/{new['id']}" in old["note"][-1]["text"]
    assert new["status"] == "requested" and "7.6" in new["description"]
    old_comm = client.get(f"/fhir/Communication?about=Task/{old['id']}").json()
    assert [c["status"] for c in bundle_resources(old_comm)] == ["stopped"]
    # corrected again, now normal → the alert is withdrawn
    send_report(client, "dr-5", p, [potassium(p, 4.4, "N")], status="corrected")
    alerting["worker"].drain()
    now = {t["id"]: t for t in alert_tasks(client)}
    assert now[new["id"]]["status"] == "cancelled" and stage(now[new["id"]]) == "withdrawn"
    assert "нет критических" in now[new["id"]]["note"][-1]["text"]


def test_a_result_corrected_alone_and_a_deleted_report(client, city, alerting) -> None:  # type: ignore[no-untyped-def]
    p = city["patient"]
    send_report(client, "dr-11", p, [potassium(p, 4.4, "N")])
    alerting["worker"].drain()
    assert alert_tasks(client) == []
    # the lab corrects the result alone (the report itself is not sent again)
    put(client, potassium(p, 7.3, "HH"))
    alerting["worker"].drain()
    (task,) = alert_tasks(client)
    assert "7.3" in task["description"] and task["status"] == "requested"
    assert alerting["alerts"].check_report("dr-11") == task["id"]  # checked again: the same
    # the report is deleted: its open alert is withdrawn
    assert client.delete("/fhir/DiagnosticReport/dr-11").status_code in (200, 204)
    alerting["worker"].drain()
    (task,) = alert_tasks(client)
    assert task["status"] == "cancelled" and stage(task) == "withdrawn"


def test_the_ordering_mo_is_found_through_logical_references(client, city, alerting) -> None:  # type: ignore[no-untyped-def]
    p = city["patient"]
    # an order from HL7: the requester named by the staff number only, the report linked to
    # the order by its number
    put(
        client,
        {
            "resourceType": "ServiceRequest",
            "id": "order-2",
            "identifier": [{"system": "urn:oid:1.2.643.5.1.13.13.12.2.78.7.1", "value": "Z-42"}],
            "status": "active",
            "intent": "order",
            "subject": {"reference": f"Patient/{p}"},
            "requester": {
                "type": "Practitioner",
                "identifier": {"system": STAFF_IDS, "value": "PR-IVANOVA"},
                "display": "Иванова А.",
            },
        },
    )
    send_report(client, "dr-12", p, [potassium(p, oid="k-12")], order=None)
    report = client.get("/fhir/DiagnosticReport/dr-12").json()
    report["basedOn"] = [
        {
            "type": "ServiceRequest",
            "identifier": {"system": "urn:oid:1.2.643.5.1.13.13.12.2.78.7.1", "value": "Z-42"},
        }
    ]
    put(client, report)
    alerting["worker"].drain()
    # (the worker ran after both versions: it acts on the report as it is now)
    (task,) = alert_tasks(client)
    assert stage(task) == "notified"
    assert task["owner"]["reference"] == "Practitioner/pr-ivanova"  # as the order names her
    assert task["basedOn"] == [{"reference": "ServiceRequest/order-2"}]
    inputs = {
        i["type"]["coding"][0]["code"]: i["valueReference"]["reference"] for i in task["input"]
    }
    # the MO: the one organisation she holds an active role at
    assert inputs["ordering-organization"] == "Organization/mo-7"
    me = clinician(client)
    r = client.get("/fhir/Task?owner=Practitioner/pr-ivanova&status=requested", headers=me)
    assert [t["id"] for t in bundle_resources(r.json())] == [task["id"]]


# --- escalation ----------------------------------------------------------------------------------


def history(client: Any, task_id: str) -> list[dict[str, Any]]:
    r = client.get(f"/fhir/Task/{task_id}/_history")
    assert r.status_code == 200, r.text
    return [e["resource"] for e in r.json()["entry"]]


def test_unacknowledged_alerts_escalate_to_the_mo_then_the_hub(client, city, alerting) -> None:  # type: ignore[no-untyped-def]
    clock, escalator = alerting["clock"], alerting["escalator"]
    mo_before = sample("hie_lab_alert_escalations_total", level="mo-duty")
    hub_before = sample("hie_lab_alert_escalations_total", level="hub")
    send_report(client, "dr-6", city["patient"], [potassium(city["patient"])])
    alerting["worker"].drain()
    (task,) = alert_tasks(client)
    assert escalator.run_once(clock.advance(29)) == 0  # not due yet
    # 31 minutes unacknowledged → the MO's duty officer
    assert escalator.run_once(clock.advance(2)) == 1
    assert escalator.run_once() == 0  # and only once
    (task,) = alert_tasks(client)
    assert task["owner"]["reference"] == "PractitionerRole/duty-mo-7"
    assert stage(task) == "escalated-mo" and task["status"] == "requested"
    assert "Петров" in task["note"][-1]["text"] and "Иванова" in task["note"][-1]["text"]
    assert "escalated" in task["note"][-1]["text"]
    duty = client.get("/fhir/Task?owner=PractitionerRole/duty-mo-7&status=requested").json()
    assert [t["id"] for t in bundle_resources(duty)] == [task["id"]]
    comm = client.get("/fhir/Communication?recipient=PractitionerRole/duty-mo-7").json()
    (to_duty,) = bundle_resources(comm)
    assert to_duty["payload"][0]["contentString"].startswith("ЭСКАЛАЦИЯ")
    assert "Калий 7.1" in to_duty["payload"][0]["contentString"]
    assert {"reference": "Organization/mo-7", "display": "Поликлиника № 7"} in to_duty["recipient"]
    # the due time moved by HIE_ALERT_ESCALATE_MINUTES
    assert escalator.run_once(clock.advance(29)) == 0
    assert escalator.run_once(clock.advance(2)) == 1
    (task,) = alert_tasks(client)
    assert task["owner"]["reference"] == "PractitionerRole/duty-hub"
    assert stage(task) == "escalated-hub"
    comm = client.get("/fhir/Communication?recipient=PractitionerRole/duty-hub").json()
    assert len(bundle_resources(comm)) == 1
    # the hub is the last level
    assert escalator.run_once(clock.advance(600)) == 0
    # every step is a version with its note
    versions = history(client, task["id"])
    assert [v["meta"]["versionId"] for v in versions] == ["3", "2", "1"]
    assert [stage(v) for v in versions] == ["escalated-hub", "escalated-mo", "notified"]
    assert [len(v["note"]) for v in versions] == [3, 2, 1]
    for res in (*versions, *bundle_resources(client.get("/fhir/Communication").json())):
        model.validate(dict(res))  # the hub writes them unvalidated: they must be valid R4
    assert [v["owner"]["reference"] for v in versions] == [
        "PractitionerRole/duty-hub",
        "PractitionerRole/duty-mo-7",
        "PractitionerRole/role-ivanova",
    ]
    assert sample("hie_lab_alert_escalations_total", level="mo-duty") == mo_before + 1
    assert sample("hie_lab_alert_escalations_total", level="hub") == hub_before + 1
    assert sample("hie_lab_alerts_open", level="hub") >= 1
    # the hub's operator acknowledges: every notification of the alert is done with, and the
    # one they received says so
    acked = sample("hie_lab_alerts_acknowledged_total", level="hub")
    patch = [{"op": "replace", "path": "/status", "value": "accepted"}]
    headers = {"Content-Type": "application/json-patch+json"}
    assert client.patch(f"/fhir/Task/{task['id']}", json=patch, headers=headers).status_code == 200
    alerting["worker"].drain()
    comms = bundle_resources(client.get(f"/fhir/Communication?about=Task/{task['id']}").json())
    assert sorted(c["status"] for c in comms) == ["completed"] * 3
    received = [c for c in comms if "received" in c]
    assert [c["recipient"][0]["reference"] for c in received] == ["PractitionerRole/duty-hub"]
    assert all("другим получателем" in c["note"][0]["text"] for c in comms if "received" not in c)
    for res in comms:
        model.validate(dict(res))
    assert sample("hie_lab_alerts_acknowledged_total", level="hub") == acked + 1
    assert escalator.run_once(clock.advance(600)) == 0


def test_an_alert_acknowledged_in_time_does_not_escalate(client, city, alerting) -> None:  # type: ignore[no-untyped-def]
    clock, escalator = alerting["clock"], alerting["escalator"]
    before = sample("hie_lab_alerts_acknowledged_total", level="practitioner")
    send_report(client, "dr-7", city["patient"], [potassium(city["patient"])])
    alerting["worker"].drain()
    (task,) = alert_tasks(client)
    clock.advance(10)
    # the MO's information system acknowledges for the doctor: the alert is the MO's record
    mis = {
        **bearer(client.settings, "mis", org="mo-7"),
        "Content-Type": "application/json-patch+json",
    }
    patch = [{"op": "replace", "path": "/status", "value": "completed"}]
    r = client.patch(f"/fhir/Task/{task['id']}", json=patch, headers=mis)
    assert r.status_code == 200, r.text
    alerting["worker"].drain()
    assert escalator.run_once(clock.advance(120)) == 0
    (task,) = alert_tasks(client)
    assert task["status"] == "completed" and stage(task) == "notified"
    assert task["owner"]["reference"] == "PractitionerRole/role-ivanova"
    (comm,) = bundle_resources(client.get(f"/fhir/Communication?about=Task/{task['id']}").json())
    model.validate(dict(comm))
    assert comm["status"] == "completed" and comm["received"]  # by the owner who acknowledged
    assert sample("hie_lab_alerts_acknowledged_total", level="practitioner") == before + 1
    # handled again (re-delivery), the acknowledgement is not counted twice
    alerting["alerts"].handle(client.hub.store.outbox_read("nobody-yet", 10_000))
    assert sample("hie_lab_alerts_acknowledged_total", level="practitioner") == before + 1
    # another MO's system may not acknowledge it
    other = {
        **bearer(client.settings, "mis", org="mo-99"),
        "Content-Type": "application/json-patch+json",
    }
    r = client.patch(f"/fhir/Task/{task['id']}", json=patch, headers=other)
    assert r.status_code == 403


def test_a_rejected_alert_escalates_at_once(client, city, alerting) -> None:  # type: ignore[no-untyped-def]
    clock, escalator = alerting["clock"], alerting["escalator"]
    send_report(client, "dr-8", city["patient"], [potassium(city["patient"])])
    alerting["worker"].drain()
    (task,) = alert_tasks(client)
    task["status"] = "rejected"
    assert client.put(f"/fhir/Task/{task['id']}", json=task, headers=FJ).status_code == 200
    alerting["worker"].drain()
    assert escalator.run_once(clock.advance(1)) == 1
    (task,) = alert_tasks(client)
    assert task["status"] == "requested" and stage(task) == "escalated-mo"
    assert "отклонено" in task["note"][-1]["text"]


def test_unknown_ordering_mo_goes_straight_to_the_hub_operator(client, city, alerting) -> None:  # type: ignore[no-untyped-def]
    clock, escalator = alerting["clock"], alerting["escalator"]
    send_report(client, "dr-9", city["patient"], [potassium(city["patient"])], order=None)
    alerting["worker"].drain()
    (task,) = alert_tasks(client)
    assert task["owner"]["reference"] == "PractitionerRole/duty-hub"
    assert stage(task) == "escalated-hub"
    note = task["note"][0]["text"]
    assert "МО, назначившая исследование, не известна" in note
    assert "the ordering MO is unknown" in note and "ServiceRequest" in note
    comm = client.get("/fhir/Communication?recipient=PractitionerRole/duty-hub").json()
    assert len(bundle_resources(comm)) == 1
    assert escalator.run_once(clock.advance(120)) == 0  # already at the last level


def test_the_configured_hub_operator_and_an_mo_without_duty_officer(
    client, city, settings_for, store_url
) -> None:  # type: ignore[no-untyped-def]
    if not store_url.startswith("sqlite"):
        pytest.skip("settings only; the chain itself runs on both engines above")
    hub = client.hub
    settings = client.settings.model_copy(update={"alert_hub_operator": "Practitioner/pr-sidorova"})
    svc = client.app.state.fhir
    clock = Clock()
    alerts = CriticalResultAlerts(hub.store, svc, settings, clock=clock)
    escalator = AlertEscalator(hub.store, svc, settings, clock)
    role = client.get("/fhir/PractitionerRole/duty-mo-7").json()
    role["active"] = False  # the MO has no duty officer on duty
    put(client, role)
    send_report(client, "dr-10", city["patient"], [potassium(city["patient"])])
    OutboxWorker(hub.store, [alerts]).drain()
    assert escalator.run_once(clock.advance(31)) == 1
    (task,) = alert_tasks(client)
    assert task["owner"]["reference"] == "Practitioner/pr-sidorova"
    assert stage(task) == "escalated-hub"
    assert "the MO has no duty-officer PractitionerRole" in task["note"][-1]["text"]


def _seconds(instant: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(instant.replace("Z", "+00:00")).timestamp()
