"""The lab exchange end to end: ``hie serve``'s MLLP listener, fed by an MLLP client that is
not ours (python-hl7's ``mllp_send``), with the results read back over FHIR on the golden
patient."""

from __future__ import annotations

import subprocess
from pathlib import Path

import hl7

from hie.adapters.hl7_listener import start_mllp
from hie.adapters.mllp import frame
from tests.fixtures.auth import bearer
from tests.fixtures.hl7v2 import LAB_FACILITY, MRN_1, oru_message
from tests.fixtures.labs import GP, GP_PATIENTS, as_transaction, lab_registry
from tests.fixtures.ports import free_port
from tests.fixtures.records import golden_id
from tests.integration.test_mllp_transport import mllp_send


def test_mllp_send_files_results_that_clinicians_then_find(client, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    hub = client.hub
    assert client.post("/fhir", json=as_transaction(lab_registry())).status_code == 200
    hub.settings = hub.settings.model_copy(update={"mllp_port": free_port()})
    listener = start_mllp(hub)
    assert listener is not None
    controls = [f"ORU-{i:03d}" for i in range(5)]
    panels = ["cbc", "biochem", "cbc", "biochem", "cbc"]
    batch = tmp_path / "results.hl7"
    batch.write_bytes(
        b"".join(
            frame(oru_message(p, control_id=c, obr={3: (f"L-{i:04d}", LAB_FACILITY)}))
            for i, (p, c) in enumerate(zip(panels, controls, strict=True))
        )
    )
    try:
        done = subprocess.run(
            [mllp_send(), "--port", str(listener.port), "--file", str(batch), "127.0.0.1"],
            capture_output=True,
            timeout=120,
            check=True,
        )
    finally:
        listener.stop()
    acks = [
        hl7.parse(a.strip(b"\x0b\x1c\r").decode()) for a in done.stdout.split(b"\n") if a.strip()
    ]
    assert [str(a.segment("MSA")[2]) for a in acks] == controls
    assert {str(a.segment("MSA")[1]) for a in acks} == {"AA"}
    # a clinician of the clinic treating her finds every report on her golden record
    found = client.get(f"/fhir/Patient?identifier={GP_PATIENTS}|{MRN_1}").json()
    source = found["entry"][0]["resource"]["id"]
    golden = golden_id(client, source)
    enc = {
        "resourceType": "Encounter",
        "status": "in-progress",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": f"Patient/{source}"},
        "serviceProvider": {"reference": f"Organization/{GP}"},
    }
    assert client.post("/fhir/Encounter", json=enc).status_code == 201
    doc = bearer(client.settings, "clinician", org=GP)
    reports = client.get(
        f"/fhir/DiagnosticReport?patient={golden}&_total=accurate", headers=doc
    ).json()
    assert reports["total"] == 5
