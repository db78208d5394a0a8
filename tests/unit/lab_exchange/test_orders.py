"""HL7 v2 lab orders → ServiceRequest and Task (hie.lab_exchange.orders): golden files, status
from ORC-1/ORC-5, priority, requester, reasons, specimens, linking to results, and errors."""

from __future__ import annotations

from datetime import date
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings

from hie.adapters.hl7v2 import Hl7Problem, parse
from hie.fhir.model import validate
from hie.lab_exchange.orders import OrderMessage, map_order
from hie.lab_exchange.oru import ENTITY_ID_BASE, ICD10_SYSTEM, PRACTITIONER_ID_BASE, map_oru
from hie.registries.identifiers import SNILS_SYSTEM
from tests.fixtures.hl7v2 import (
    DOCTOR_SNILS,
    GOLDEN_DIR,
    LAB_CODES,
    MO_NAMESPACE,
    MO_SYSTEM,
    PLACER_1,
    bad_snils,
    check_golden,
    lab_snapshot,
    mutated,
    oml_message,
    orm_message,
    oru_message,
)

TODAY = date(2025, 11, 1)
LAB_REF = "Organization/mo-7001"
PLACER_SYSTEM = ENTITY_ID_BASE + MO_NAMESPACE


def order(raw: bytes, **kw: Any) -> OrderMessage:
    kw.setdefault("local_code_system", LAB_CODES)
    kw.setdefault("default_system", MO_SYSTEM)
    kw.setdefault("performer", LAB_REF)
    kw.setdefault("today", TODAY)
    return map_order(parse(raw), **kw)


def clean(raw: bytes, **kw: Any) -> OrderMessage:
    res = order(raw, **kw)
    assert res.errors == [] and res.warnings == [], (res.errors, res.warnings)
    for entry in res.entries():
        validate(entry.resource)
    return res


def sr(res: OrderMessage, n: int = 0) -> dict[str, Any]:
    return res.orders[n].service_request.resource


def problems(items: list[Hl7Problem]) -> list[tuple[str, str]]:
    return [(p.code, p.location) for p in items]


@pytest.mark.parametrize("name", sorted(p.stem for p in GOLDEN_DIR.glob("o[rm][ml]_*.hl7")))
def test_golden(name: str) -> None:
    res = order((GOLDEN_DIR / f"{name}.hl7").read_bytes())
    for entry in res.entries():
        validate(entry.resource)
    check_golden(name, lab_snapshot(res))


@pytest.mark.parametrize("version", ["2.3", "2.3.1", "2.4", "2.5", "2.5.1"])
def test_orm_in_every_version(version: str) -> None:
    res = clean(orm_message(version=version))
    [lab_order] = res.orders
    assert lab_order.control == "NW"
    request = sr(res)
    assert request["status"] == "active"
    assert request["intent"] == "order"
    assert request["priority"] == "routine"
    assert request["code"]["coding"] == [{"system": "http://loinc.org", "code": "24323-8"}]
    assert res.patient is not None
    assert request["subject"] == {"reference": res.patient.full_url}
    assert request["identifier"] == [lab_order.placer]
    assert lab_order.service_request.identifier == {"system": PLACER_SYSTEM, "value": PLACER_1}
    assert request["reasonCode"] == [
        {"coding": [{"system": ICD10_SYSTEM, "code": "E11.9"}], "text": "Сахарный диабет 2 типа"}
    ]
    assert request["performer"] == [{"reference": LAB_REF}]
    if version in ("2.3", "2.3.1", "2.4"):
        spec = lab_order.specimens[0].resource  # OBR-15 specimen source before v2.5
        assert spec["type"]["coding"][0]["system"] == (
            "http://terminology.hl7.org/CodeSystem/v2-0070"
        )
    else:
        assert lab_order.specimens == []


def test_oml_with_tq1_and_spm() -> None:
    res = clean(oml_message())
    [lab_order] = res.orders
    request = sr(res)
    assert request["priority"] == "stat"
    assert request["specimen"] == [{"reference": lab_order.specimens[0].full_url}]
    assert lab_order.specimens[0].identifier == {
        "system": PLACER_SYSTEM,
        "value": f"{PLACER_1}-1",
    }


def test_task_puts_the_request_on_the_labs_work_list() -> None:
    res = clean(oml_message())
    lab_order = res.orders[0]
    task = lab_order.task.resource
    assert task["status"] == "requested"
    assert task["intent"] == "order"
    assert task["focus"] == {"reference": lab_order.service_request.full_url}
    assert task["basedOn"] == [{"reference": lab_order.service_request.full_url}]
    assert res.patient is not None
    assert task["for"] == {"reference": res.patient.full_url}
    assert task["owner"] == {"reference": LAB_REF}
    assert task["requester"] == sr(res)["requester"]
    assert lab_order.task.full_url != lab_order.service_request.full_url
    assert lab_order.task.identifier == lab_order.service_request.identifier


def test_requester_is_an_identifier_for_the_caller_to_resolve() -> None:
    assert sr(clean(orm_message()))["requester"] == {
        "type": "Practitioner",
        "identifier": {"system": SNILS_SYSTEM, "value": DOCTOR_SNILS},
        "display": "Смирнов Олег Петрович",
    }
    local = orm_message().replace(
        f"{DOCTOR_SNILS}^Смирнов^Олег^Петрович^^^^^^^^^SNILS".encode(),
        "D-77^Кузнецова^Мария^^^^^^GP9001".encode(),
    )
    assert sr(clean(local))["requester"] == {
        "type": "Practitioner",
        "identifier": {"system": PRACTITIONER_ID_BASE + MO_NAMESPACE, "value": "D-77"},
        "display": "Кузнецова Мария",
    }


def test_requester_falls_back_to_obr_16_and_a_bad_snils_is_dropped() -> None:
    bad = bad_snils("987654321")
    raw = orm_message().replace(f"{DOCTOR_SNILS}^".encode(), f"{bad}^".encode())
    res = order(raw)
    assert problems(res.warnings) == [("102", "ORC-12(1).1")]
    assert sr(res)["requester"] == {"type": "Practitioner", "display": "Смирнов Олег Петрович"}
    no_orc_12 = orm_message().replace(
        f"|||{DOCTOR_SNILS}^Смирнов^Олег^Петрович^^^^^^^^^SNILS\rOBR".encode(), b"\rOBR"
    )
    assert sr(clean(no_orc_12))["requester"]["identifier"]["value"] == DOCTOR_SNILS


@pytest.mark.parametrize(
    ("control", "order_status", "status", "task_status"),
    [
        ("NW", "", "active", "requested"),
        ("CA", "", "revoked", "cancelled"),
        ("OC", "CA", "revoked", "cancelled"),
        ("DC", "", "revoked", "cancelled"),
        ("HD", "", "on-hold", "on-hold"),
        ("RL", "", "active", "requested"),
        ("SC", "CM", "completed", "completed"),
        ("SC", "IP", "active", "requested"),
        ("SC", "", "active", "requested"),
        ("XO", "", "active", "requested"),
    ],
)
def test_status_from_orc_1_and_orc_5(
    control: str, order_status: str, status: str, task_status: str
) -> None:
    res = clean(orm_message(control=control, order_status=order_status))
    assert sr(res)["status"] == status
    assert res.orders[0].task.resource["status"] == task_status
    assert res.orders[0].control == control


def test_unknown_or_missing_order_control_is_an_error() -> None:
    res = order(orm_message(control="ZZ"))
    assert problems(res.errors) == [("103", "ORC-1")]
    assert res.orders == []
    res = order(orm_message(control=""))
    assert problems(res.errors) == [("101", "ORC-1")]


def test_unknown_order_status_is_a_warning() -> None:
    res = order(orm_message(control="SC", order_status="??"))
    assert problems(res.warnings) == [("103", "ORC-5")]
    assert sr(res)["status"] == "active"


@pytest.mark.parametrize(
    ("priority", "expected"),
    [("S", "stat"), ("A", "asap"), ("R", "routine"), ("P", "urgent"), ("T", "urgent")],
)
def test_priority(priority: str, expected: str) -> None:
    assert sr(clean(orm_message(priority=priority)))["priority"] == expected
    assert sr(clean(oml_message(priority=priority)))["priority"] == expected


def test_unknown_priority_is_a_warning() -> None:
    res = order(oml_message(priority="Q"))
    assert problems(res.warnings) == [("103", "TQ1-9")]
    assert "priority" not in sr(res)


def test_missing_pid_is_an_error() -> None:
    res = order(orm_message(pid=None))
    assert problems(res.errors) == [("100", "PID")]
    assert res.orders == [] and res.patient is None


def test_missing_obr_4_is_an_error() -> None:
    raw = orm_message().replace("24323-8^Биохимический анализ крови^LN".encode(), b"")
    res = order(raw)
    assert problems(res.errors) == [("101", "OBR-4.1")]
    assert res.ack_code == "AE"


def test_new_order_without_obr_is_an_error_but_a_cancel_is_not() -> None:
    def without_obr(raw: bytes) -> bytes:
        return b"\r".join(s for s in raw.split(b"\r") if not s.startswith(b"OBR"))

    res = order(without_obr(orm_message()))
    assert problems(res.errors) == [("100", "ORC")]
    cancel = clean(without_obr(orm_message(control="CA")))
    assert sr(cancel)["status"] == "revoked"
    assert "code" not in sr(cancel)


def test_no_order_number_is_an_error() -> None:
    res = order(orm_message(placer=""))
    assert problems(res.errors) == [("101", "ORC-2.1")]


def test_second_pid_and_orphan_obr_are_errors() -> None:
    from tests.fixtures.hl7v2 import lab_pid

    res = order(orm_message(extra_segments=[("PID", lab_pid())]))
    assert ("100", "PID[2]") in problems(res.errors)
    raw = orm_message()
    obr = next(s for s in raw.split(b"\r") if s.startswith(b"OBR"))
    res = order(raw.replace(b"\rORC|", b"\r" + obr + b"\rORC|", 1))
    assert ("100", "OBR") in problems(res.errors)


def test_header_problems_raise_for_ar() -> None:
    with pytest.raises(Hl7Problem) as info:
        order(oru_message())
    assert (info.value.code, info.value.reject) == ("200", True)


def test_results_find_their_order_by_the_placer_number() -> None:
    res = clean(oml_message())
    result = map_oru(
        parse(oru_message()),
        local_code_system=LAB_CODES,
        default_system=MO_SYSTEM,
        today=TODAY,
    )
    report = result.patients[0].reports[0]
    placer = res.orders[0].placer
    assert report.placer == placer
    assert report.report.resource["basedOn"] == [{"type": "ServiceRequest", "identifier": placer}]
    # the same person, the same placeholder for the subject
    assert res.patient is not None
    assert result.patients[0].patient.full_url == res.patient.full_url


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated([orm_message(), oml_message(), orm_message(version="2.5.1", control="SC")]))
def test_fuzz_mutated_messages(data: bytes) -> None:
    try:
        res = order(data)
    except Hl7Problem as problem:
        assert problem.code != "207", problem.__cause__
        return
    if not res.errors:
        for entry in res.entries():
            validate(entry.resource)
