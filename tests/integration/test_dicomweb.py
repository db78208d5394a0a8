"""DICOMweb (issue #8): STOW-RS, WADO-RS and QIDO-RS over HTTP with bearer tokens, through the
standard ``dicomweb-client`` against a real server where streaming matters, and the access
policy (issue #5) on every route — on SQLite, and on PostgreSQL for the query path."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from io import BytesIO
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests
from fastapi.testclient import TestClient
from pydicom import dcmread
from pydicom.encaps import generate_frames
from pydicom.uid import JPEGBaseline8Bit, RLELossless

from hie.pacs.index import DicomIndex
from tests.fixtures.dicom import MO_A, MO_B, bundled_instance, ct_instance, uid
from tests.fixtures.dicomweb import (
    Hubs,
    dataset_bytes,
    dicomweb_client,
    make_hub,
    parse_multipart,
    part10,
    served,
    stow_body,
    value,
    with_snils,
)
from tests.fixtures.hl7v2 import snils
from tests.fixtures.http import post_chunked_until_answered
from tests.fixtures.records import GOLDEN, encounter

DJ = "application/dicom+json"


@pytest.fixture
def web(settings_for: Any) -> Iterator[tuple[TestClient, Hubs]]:
    """The hub on SQLite, with the DICOM MOs registered."""
    hubs = make_hub(settings_for())
    with TestClient(hubs.app, base_url="http://hub.test") as c:
        yield c, hubs


@pytest.fixture
def web_any(store_url: str, settings_for: Any) -> Iterator[tuple[TestClient, Hubs]]:
    """The same on each resource-store backend (SQLite, PostgreSQL)."""
    hubs = make_hub(settings_for(store_url))
    with TestClient(hubs.app, base_url="http://hub.test") as c:
        yield c, hubs


def stow(
    c: TestClient, hubs: Hubs, files: list[Any], org: str = MO_A, study: str | None = None
) -> Any:
    body, ctype = stow_body(files)
    url = "/dicomweb/studies" + (f"/{study}" if study else "")
    return c.post(url, content=body, headers={**hubs.mis(org), "Content-Type": ctype})


def series_of(n: int, **kw: Any) -> tuple[str, str, list[Any]]:
    """``n`` CT instances of one new series (fresh study)."""
    study, series = kw.pop("study_uid", uid()), uid()
    dss = [
        ct_instance(study_uid=study, series_uid=series, instance_number=i + 1, seed=i, **kw)
        for i in range(n)
    ]
    return study, series, dss


def golden_of(c: TestClient, hubs: Hubs, source: str) -> str:
    found = c.get(f"/fhir/Patient?_tag={GOLDEN}&link=Patient/{source}", headers=hubs.token())
    return str(found.json()["entry"][0]["resource"]["id"])


def source_of(hubs: Hubs, study: str) -> str:
    row = DicomIndex(hubs.hub.store).study(study)
    assert row is not None
    return str(row["patient_ref"])


# --- STOW → QIDO → WADO with the standard client ------------------------------------------


def test_round_trip_through_dicomweb_client(settings_for: Any) -> None:
    hubs = make_hub(settings_for())
    study, series, dss = series_of(3, size=64)
    files = [part10(ds) for ds in dss]
    with served(hubs.app) as base:
        client = dicomweb_client(base, hubs.mis())
        answer = client.store_instances([dcmread(BytesIO(f)) for f in files])
        assert len(answer.ReferencedSOPSequence) == 3
        assert "FailedSOPSequence" not in answer
        assert answer.RetrieveURL.endswith(f"/dicomweb/studies/{study}")
        # QIDO
        studies = client.search_for_studies(search_filters={"PatientID": "12345"})
        assert [value(s, "StudyInstanceUID") for s in studies] == [study]
        assert value(studies[0], "NumberOfStudyRelatedInstances") == 3
        assert value(studies[0], "PatientName") == {"Alphabetic": "Иванова^Мария^Петровна"}
        found = client.search_for_instances(study_instance_uid=study, series_instance_uid=series)
        assert sorted(value(i, "InstanceNumber") for i in found) == [1, 2, 3]
        # WADO: the instances come back as stored, the dataset byte for byte
        got = client.retrieve_series(study, series)
        assert sorted(str(d.SOPInstanceUID) for d in got) == sorted(
            str(d.SOPInstanceUID) for d in dss
        )
        sop = str(dss[0].SOPInstanceUID)
        one = f"{base}/dicomweb/studies/{study}/series/{series}/instances/{sop}"
        raw = requests.get(one, headers=hubs.mis(), timeout=30)
        assert raw.status_code == 200
        [(headers, body)] = parse_multipart(raw.content, raw.headers["Content-Type"])
        assert body.endswith(dataset_bytes(files[0]))
        assert raw.headers["ETag"] == f'"{hashlib.sha256(body).hexdigest()}"'
        # metadata, with pixel data as a bulk data link the client follows
        meta = client.retrieve_series_metadata(study, series)
        assert len(meta) == 3 and {value(m, "PatientID") for m in meta} == {"12345"}
        first = next(m for m in meta if value(m, "SOPInstanceUID") == sop)
        uri = first["7FE00010"]["BulkDataURI"]
        # (dicomweb-client sends Host without the port, so the links it is given lack it)
        assert urlsplit(uri).path == urlsplit(f"{one}/bulkdata/7FE00010").path
        bulk = f"{one}/bulkdata/7FE00010"
        assert client.retrieve_bulkdata(bulk) == [bytes(dss[0].PixelData)]
        # frames
        frames = client.retrieve_instance_frames(study, series, sop, frame_numbers=[1])
        assert frames == [bytes(dss[0].PixelData)]
    hubs.hub.close()


# --- STOW-RS ------------------------------------------------------------------------------


def test_stow_answers_200_202_409_with_the_sequences(web: Any) -> None:
    c, hubs = web
    study, _, dss = series_of(2)
    r = stow(c, hubs, [part10(dss[0])])
    assert r.status_code == 200 and r.headers["content-type"] == DJ
    body = r.json()
    assert value(body, "RetrieveURL") == f"http://hub.test/dicomweb/studies/{study}"
    ref = body["00081199"]["Value"][0]
    assert value(ref, "ReferencedSOPInstanceUID") == str(dss[0].SOPInstanceUID)
    assert value(ref, "RetrieveURL").endswith(f"/instances/{dss[0].SOPInstanceUID}")
    # the same bytes again: stored already, success
    assert stow(c, hubs, [part10(dss[0])]).status_code == 200
    # one good instance and a part that is not DICOM: 202, the failure listed
    r = stow(c, hubs, [part10(dss[1]), ("text/plain", b"hello")])
    assert r.status_code == 202
    failed = r.json()["00081198"]["Value"]
    assert [value(f, "FailureReason") for f in failed] == [0xC000]
    assert len(r.json()["00081199"]["Value"]) == 1
    # a DICOM part whose bytes are no Part 10 file: 409, nothing stored
    r = stow(c, hubs, [b"not a dicom file at all"])
    assert r.status_code == 409 and "00081199" not in r.json()
    assert DicomIndex(hubs.hub.store).counts()["dicom_instances"] == 2
    kept = hubs.hub.rejected.list(channel="dicom")
    assert len(kept) == 2 and {k.sender for k in kept} == {f"STOW-RS|{MO_A}"}


def test_stow_conflict_keeps_the_first_and_the_second_in_the_rejected_store(web: Any) -> None:
    c, hubs = web
    ds = ct_instance(seed=1)
    first = part10(ds)
    assert stow(c, hubs, [first]).status_code == 200
    other = ct_instance(seed=2, sop_uid=str(ds.SOPInstanceUID), study_uid=str(ds.StudyInstanceUID))
    fresh = ct_instance(study_uid=str(ds.StudyInstanceUID), seed=3)
    r = stow(c, hubs, [part10(other)])
    assert r.status_code == 409
    [failed] = r.json()["00081198"]["Value"]
    assert value(failed, "ReferencedSOPInstanceUID") == str(ds.SOPInstanceUID)
    assert value(failed, "FailureReason") == 0xC000
    r = stow(c, hubs, [part10(other), part10(fresh)])
    assert r.status_code == 202
    kept = hubs.hub.rejected.list(channel="dicom")
    assert [k.kind for k in kept] == ["conflict", "conflict"]
    full = hubs.hub.rejected.get(kept[0].id)
    assert full is not None and full.raw is not None
    assert full.raw.endswith(dataset_bytes(part10(other)))
    stored = DicomIndex(hubs.hub.store).instance(str(ds.SOPInstanceUID))
    assert stored is not None
    blob = b"".join(hubs.hub.blobs.open(stored.blob_key))
    assert blob.endswith(dataset_bytes(first))


def test_stow_to_a_study_refuses_instances_of_another(web: Any) -> None:
    c, hubs = web
    ds = ct_instance()
    r = stow(c, hubs, [part10(ds)], study=uid())
    assert r.status_code == 409
    assert value(r.json()["00081198"]["Value"][0], "FailureReason") == 0xA900
    assert DicomIndex(hubs.hub.store).counts()["dicom_instances"] == 0
    assert stow(c, hubs, [part10(ds)], study=str(ds.StudyInstanceUID)).status_code == 200


def test_stow_is_for_a_registered_mos_system_only(web: Any) -> None:
    c, hubs = web
    body, ctype = stow_body([part10(ct_instance())])
    for headers in (
        hubs.token("clinician", org=MO_A),
        hubs.token("radiologist", org=MO_A),
        hubs.token("mis"),  # no organisation
        hubs.token("mis", org="mo-unknown"),
        hubs.token("patient", patient="p1"),
    ):
        r = c.post("/dicomweb/studies", content=body, headers={**headers, "Content-Type": ctype})
        assert r.status_code == 403, headers
    r = c.post("/dicomweb/studies", content=body, headers={"Content-Type": ctype})
    assert r.status_code == 401
    r = c.post(
        "/dicomweb/studies",
        content=body,
        headers={**hubs.mis(), "Content-Type": "application/dicom"},
    )
    assert r.status_code == 415
    assert DicomIndex(hubs.hub.store).counts()["dicom_instances"] == 0


def test_stow_is_audited_as_a_store_about_the_patient(web: Any) -> None:
    c, hubs = web
    study, _, dss = series_of(1)
    assert stow(c, hubs, [part10(dss[0])]).status_code == 200
    source = source_of(hubs, study)
    records, _ = hubs.hub.audit.records(refs=[f"Patient/{source}"])
    stores = [r for r in records if r.subtype == "store"]
    assert stores and stores[0].action == "C" and stores[0].org == MO_A


def test_stow_over_the_limit_is_refused_while_streaming_and_nothing_is_stored(
    settings_for: Any,
) -> None:
    hubs = make_hub(settings_for(dicom_max_upload_bytes=1 << 20))
    good = part10(ct_instance(size=64))
    boundary = "limit-test"
    ctype = f'multipart/related; type="application/dicom"; boundary={boundary}'
    # a first part that is complete and valid, then far more than the limit
    opening = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    opening += good + f"\r\n--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode()
    with served(hubs.app) as base:
        port = int(base.rsplit(":", 1)[1])
        token = hubs.mis()["Authorization"]
        headers = {"Authorization": token, "Content-Type": ctype}
        chunk = opening + b"\0" * (256 << 10)
        status, sent = post_chunked_until_answered(
            port, "/dicomweb/studies", headers, chunk, 1 << 30
        )
        assert status == 413
        assert sent < 64 << 20  # answered near the limit, long before 1 GB was sent
        body, ctype2 = stow_body([good, b"\0" * (2 << 20)])
        r = requests.post(
            f"{base}/dicomweb/studies",
            data=body,
            headers={**hubs.mis(), "Content-Type": ctype2},
            timeout=30,
        )
        assert r.status_code == 413
    counts = DicomIndex(hubs.hub.store).counts()
    assert counts["dicom_instances"] == 0
    assert list(hubs.hub.blobs.iter_keys()) == []


# --- WADO-RS ------------------------------------------------------------------------------


def test_wado_levels_accept_etag_and_not_found(web: Any) -> None:
    c, hubs = web
    study, series, dss = series_of(2)
    other_series = ct_instance(study_uid=study, series_uid=uid(), series_number=2)
    files = [part10(ds) for ds in [*dss, other_series]]
    assert stow(c, hubs, files).status_code == 200
    me = hubs.mis()
    whole = c.get(f"/dicomweb/studies/{study}", headers=me)
    assert whole.status_code == 200
    assert whole.headers["content-type"].startswith('multipart/related; type="application/dicom"')
    parts = parse_multipart(whole.content, whole.headers["content-type"])
    assert len(parts) == 3 and int(whole.headers["content-length"]) == len(whole.content)
    assert {p[0]["content-type"].split(";")[0] for p in parts} == {"application/dicom"}
    got = sorted(p[1] for p in parts)
    assert all(any(g.endswith(dataset_bytes(f)) for g in got) for f in files)
    s = c.get(f"/dicomweb/studies/{study}/series/{series}", headers=me)
    assert len(parse_multipart(s.content, s.headers["content-type"])) == 2
    # conditional GET
    etag = s.headers["etag"]
    again = c.get(
        f"/dicomweb/studies/{study}/series/{series}", headers={**me, "If-None-Match": etag}
    )
    assert again.status_code == 304 and not again.content
    # transfer syntax negotiation: as stored, '*', or 406
    for accept, status in (
        ('multipart/related; type="application/dicom"; transfer-syntax=*', 200),
        ('multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1', 200),
        (
            'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50',
            406,
        ),
        ('multipart/related; type="application/dicom+xml"', 406),
        ("application/dicom", 200),
        ("*/*", 200),
    ):
        r = c.get(f"/dicomweb/studies/{study}", headers={**me, "Accept": accept})
        assert r.status_code == status, accept
    # nothing there
    assert c.get(f"/dicomweb/studies/{uid()}", headers=me).status_code == 404
    assert c.get(f"/dicomweb/studies/{study}/series/{uid()}", headers=me).status_code == 404
    assert c.get("/dicomweb/studies/not-a-uid", headers=me).status_code == 400


def test_wado_metadata_at_three_levels(web: Any) -> None:
    c, hubs = web
    study, series, dss = series_of(2)
    assert stow(c, hubs, [part10(ds) for ds in dss]).status_code == 200
    me = hubs.mis()
    sop = str(dss[1].SOPInstanceUID)
    for path, n in (
        (f"/dicomweb/studies/{study}/metadata", 2),
        (f"/dicomweb/studies/{study}/series/{series}/metadata", 2),
        (f"/dicomweb/studies/{study}/series/{series}/instances/{sop}/metadata", 1),
    ):
        r = c.get(path, headers=me)
        assert r.status_code == 200 and r.headers["content-type"] == DJ
        meta = r.json()
        assert len(meta) == n
        for m in meta:
            assert value(m, "StudyInstanceUID") == study
            assert value(m, "PatientName") == {"Alphabetic": "Иванова^Мария^Петровна"}
            assert value(m, "Rows") == 16
            assert m["7FE00010"]["vr"] == "OW" and "BulkDataURI" in m["7FE00010"]
            assert "InlineBinary" not in m["7FE00010"]
    r = c.get(
        f"/dicomweb/studies/{study}/metadata", headers={**me, "Accept": "application/dicom+xml"}
    )
    assert r.status_code == 406


def test_wado_frames_native_and_compressed(web: Any) -> None:
    c, hubs = web
    me = hubs.mis()
    # a JPEG baseline instance: the frame is the encapsulated JPEG stream
    jpeg = bundled_instance("SC_rgb_jpeg_dcmtk.dcm", patient_id="555")
    assert str(jpeg.file_meta.TransferSyntaxUID) == JPEGBaseline8Bit
    # a 2-frame RLE instance: each frame its own fragments
    rle = bundled_instance("SC_rgb_rle_2frame.dcm", patient_id="556")
    assert str(rle.file_meta.TransferSyntaxUID) == RLELossless
    for ds in (jpeg, rle):
        ts = str(ds.file_meta.TransferSyntaxUID)
        assert stow(c, hubs, [part10(ds, ts)]).status_code == 200
    url = (
        f"/dicomweb/studies/{jpeg.StudyInstanceUID}/series/{jpeg.SeriesInstanceUID}"
        f"/instances/{jpeg.SOPInstanceUID}"
    )
    r = c.get(f"{url}/frames/1", headers=me)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith('multipart/related; type="image/jpeg"')
    [(headers, frame)] = parse_multipart(r.content, r.headers["content-type"])
    assert headers["content-type"].startswith("image/jpeg")
    expected = next(generate_frames(jpeg.PixelData, number_of_frames=1))
    assert frame == expected and frame.startswith(b"\xff\xd8")
    assert c.get(f"{url}/frames/2", headers=me).status_code == 404
    assert c.get(f"{url}/frames/x", headers=me).status_code == 400
    bad = {**me, "Accept": 'multipart/related; type="application/octet-stream"'}
    assert c.get(f"{url}/frames/1", headers=bad).status_code == 406
    url = (
        f"/dicomweb/studies/{rle.StudyInstanceUID}/series/{rle.SeriesInstanceUID}"
        f"/instances/{rle.SOPInstanceUID}"
    )
    r = c.get(f"{url}/frames/2,1", headers=me)
    assert r.status_code == 200
    got = [p[1] for p in parse_multipart(r.content, r.headers["content-type"])]
    frames = list(generate_frames(rle.PixelData, number_of_frames=2))
    assert got == [frames[1], frames[0]]
    # the pixel data bulk data of compressed pixel data: all its frames
    r = c.get(f"{url}/bulkdata/7FE00010", headers=me)
    assert [p[1] for p in parse_multipart(r.content, r.headers["content-type"])] == frames


def test_wado_native_multiframe_frames_and_bulk_data(web: Any) -> None:
    c, hubs = web
    me = hubs.mis()
    ds = bundled_instance("rtdose.dcm", patient_id="557")  # 15 frames, 32-bit, implicit VR
    ts = str(ds.file_meta.TransferSyntaxUID)
    assert stow(c, hubs, [part10(ds, ts)]).status_code == 200
    url = (
        f"/dicomweb/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
        f"/instances/{ds.SOPInstanceUID}"
    )
    size = int(ds.Rows) * int(ds.Columns) * 4
    pixels = bytes(ds.PixelData)
    r = c.get(f"{url}/frames/3,15", headers=me)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith(
        'multipart/related; type="application/octet-stream"'
    )
    got = [p[1] for p in parse_multipart(r.content, r.headers["content-type"])]
    assert got == [pixels[2 * size : 3 * size], pixels[14 * size : 15 * size]]
    assert c.get(f"{url}/frames/16", headers=me).status_code == 404
    r = c.get(f"{url}/bulkdata/7FE00010", headers=me)
    [(_, whole)] = parse_multipart(r.content, r.headers["content-type"])
    assert whole == pixels
    assert c.get(f"{url}/bulkdata/00091001", headers=me).status_code == 404


# --- QIDO-RS (each backend) ---------------------------------------------------------------


@pytest.fixture
def city(web_any: Any) -> dict[str, Any]:
    """Three studies: two of one person sent by MO A and MO B under their own numbers
    (linked by SNILS), one of another person sent by MO A."""
    c, hubs = web_any
    number = snils("112233445")
    a1 = series_of(2, patient_id="A-100", name="Сидорова^Анна", accession="ACC-1")
    b1 = series_of(1, patient_id="B-200", name="Сидорова^Анна", modality="MR", accession="ACC-2")
    x1 = series_of(1, patient_id="A-999", name="Кузнецов^Пётр", birth_date="19551010", sex="M")
    for ds in (*a1[2], *b1[2]):
        with_snils(ds, number)
    for ds in b1[2]:
        ds.StudyDate = "20240120"
    assert stow(c, hubs, [part10(ds) for ds in a1[2]]).status_code == 200
    assert stow(c, hubs, [part10(ds) for ds in b1[2]], org=MO_B).status_code == 200
    assert stow(c, hubs, [part10(ds) for ds in x1[2]]).status_code == 200
    src_a, src_b = source_of(hubs, a1[0]), source_of(hubs, b1[0])
    golden = golden_of(c, hubs, src_a)
    assert golden == golden_of(c, hubs, src_b)  # one person in the index
    return {
        "c": c,
        "hubs": hubs,
        "a": a1,
        "b": b1,
        "x": x1,
        "golden": golden,
        "src_a": src_a,
        "src_b": src_b,
        "golden_x": golden_of(c, hubs, source_of(hubs, x1[0])),
    }


def qido(city: dict[str, Any], path: str, headers: dict[str, str] | None = None) -> Any:
    c, hubs = city["c"], city["hubs"]
    return c.get(f"/dicomweb{path}", headers=headers or hubs.token())


def uids(r: Any, keyword: str = "StudyInstanceUID") -> list[str]:
    assert r.status_code == 200, r.text
    return [value(x, keyword) for x in r.json()]


def test_qido_studies_by_keyword_tag_date_and_modality(city: dict[str, Any]) -> None:
    a, b, x = city["a"][0], city["b"][0], city["x"][0]
    assert sorted(uids(qido(city, "/studies"))) == sorted([a, b, x])
    assert uids(qido(city, "/studies?PatientID=A-100")) == [a]
    assert uids(qido(city, "/studies?00100020=B-200")) == [b]
    assert uids(qido(city, "/studies?StudyDate=20240101-20240131")) == [b]
    assert sorted(uids(qido(city, "/studies?StudyDate=20240301-"))) == sorted([a, x])
    assert uids(qido(city, "/studies?ModalitiesInStudy=MR")) == [b]
    assert sorted(uids(qido(city, "/studies?ModalitiesInStudy=MR,CT"))) == sorted([a, b, x])
    assert uids(qido(city, "/studies?AccessionNumber=ACC-*")) != []
    assert uids(qido(city, f"/studies?StudyInstanceUID={a},{x}")) == [a, x]
    for bad in ("StudyDate=2024-01-01", "StudyDate=20241301", "StudyDate=20240201-20240101"):
        r = qido(city, f"/studies?{bad}")
        assert r.status_code == 400, bad
    assert qido(city, "/studies?NoSuchKeyword=1").status_code == 400
    assert qido(city, "/studies?limit=-1").status_code == 400
    r = qido(city, "/studies?Manufacturer=X")
    assert r.status_code == 200 and "Manufacturer" in r.headers["warning"]
    assert (
        qido(
            city, "/studies", {**city["hubs"].token(), "Accept": "application/dicom+xml"}
        ).status_code
        == 406
    )


def test_qido_includefield_limit_offset_and_levels(city: dict[str, Any]) -> None:
    a = city["a"]
    r = qido(city, "/studies?PatientID=A-100")
    [res] = r.json()
    assert value(res, "StudyDescription") == "КТ органов грудной клетки"
    assert value(res, "NumberOfStudyRelatedSeries") == 1
    assert value(res, "RetrieveURL") == f"http://hub.test/dicomweb/studies/{a[0]}"
    assert "00080054" not in res  # Retrieve AE Title only when asked
    [res] = qido(city, "/studies?PatientID=A-100&includefield=00080054").json()
    assert value(res, "RetrieveAETitle") == "HUB"
    [res] = qido(city, "/studies?PatientID=A-100&includefield=all").json()
    assert value(res, "RetrieveAETitle") == "HUB"
    # series and instances under a study, and across all studies
    series = qido(city, f"/studies/{a[0]}/series").json()
    assert [value(s, "SeriesInstanceUID") for s in series] == [a[1]]
    assert value(series[0], "NumberOfSeriesRelatedInstances") == 2
    assert value(series[0], "RetrieveURL").endswith(f"/studies/{a[0]}/series/{a[1]}")
    assert value(series[0], "PatientID") is None  # study attributes only for all series
    all_series = qido(city, "/series?Modality=MR").json()
    assert [value(s, "StudyInstanceUID") for s in all_series] == [city["b"][0]]
    assert value(all_series[0], "PatientID") == "B-200"
    inst = qido(city, f"/studies/{a[0]}/series/{a[1]}/instances").json()
    assert sorted(value(i, "InstanceNumber") for i in inst) == [1, 2]
    assert value(inst[0], "RetrieveURL").startswith(f"http://hub.test/dicomweb/studies/{a[0]}/")
    assert len(qido(city, f"/studies/{a[0]}/instances").json()) == 2
    # paging
    everything = uids(qido(city, "/instances"), "SOPInstanceUID")
    assert len(everything) == 4
    page = uids(qido(city, "/instances?limit=2&offset=1"), "SOPInstanceUID")
    assert page == everything[1:3]
    r = qido(city, "/instances?limit=2")
    assert "additional results" in r.headers["warning"]
    # the configured cap bounds a limit asked for
    hubs = city["hubs"]
    assert hubs.settings.dicom_query_limit >= 4


def test_qido_fuzzy_person_names(city: dict[str, Any]) -> None:
    a, b = city["a"][0], city["b"][0]
    assert uids(qido(city, "/studies?PatientName=Сидорова^Анна")) == [a, b]
    assert uids(qido(city, "/studies?PatientName=сидорова^анна")) == [a, b]  # PN: any case
    assert uids(qido(city, "/studies?PatientName=анн")) == []
    assert uids(qido(city, "/studies?PatientName=анн&fuzzymatching=true")) == [a, b]
    assert uids(qido(city, "/studies?PatientName=Кузн*")) == [city["x"][0]]
    assert qido(city, "/studies?fuzzymatching=maybe").status_code == 400


def test_qido_golden_patient_across_two_mos(city: dict[str, Any]) -> None:
    a, b = city["a"][0], city["b"][0]
    for pid in (city["golden"], city["src_a"], city["src_b"]):
        assert sorted(uids(qido(city, f"/studies?patient={pid}"))) == sorted([a, b])
    assert uids(qido(city, f"/studies?patient={city['golden']}&ModalitiesInStudy=MR")) == [b]
    assert uids(qido(city, "/studies?patient=no-such-patient")) == []


def test_patient_sees_only_their_own_studies(city: dict[str, Any]) -> None:
    c, hubs = city["c"], city["hubs"]
    me = hubs.token("patient", patient=city["golden"])
    a, b, x = city["a"], city["b"], city["x"]
    assert sorted(uids(qido(city, "/studies", me))) == sorted([a[0], b[0]])
    assert uids(qido(city, f"/studies?StudyInstanceUID={x[0]}", me)) == []
    assert uids(qido(city, "/instances", me), "StudyInstanceUID").count(x[0]) == 0
    assert qido(city, f"/studies/{x[0]}/series", me).json() == []
    assert c.get(f"/dicomweb/studies/{a[0]}", headers=me).status_code == 200
    sop = str(x[2][0].SOPInstanceUID)
    inst = f"/dicomweb/studies/{x[0]}/series/{x[1]}/instances/{sop}"
    for path in (
        f"/dicomweb/studies/{x[0]}",
        f"/dicomweb/studies/{x[0]}/series/{x[1]}",
        inst,
        f"/dicomweb/studies/{x[0]}/metadata",
        f"{inst}/metadata",
        f"{inst}/frames/1",
        f"{inst}/bulkdata/7FE00010",
    ):
        r = c.get(path, headers=me)
        assert r.status_code == 404, path  # as if it did not exist: no 403
    other = hubs.token("patient", patient=city["golden_x"])
    assert uids(qido(city, "/studies", other)) == [x[0]]


def test_an_mo_without_a_care_relationship_sees_nothing_else(city: dict[str, Any]) -> None:
    c, hubs = city["c"], city["hubs"]
    third = hubs.token("mis", org="mo-dicom-c")
    assert qido(city, "/studies", third).json() == []
    assert c.get(f"/dicomweb/studies/{city['a'][0]}", headers=third).status_code == 404
    # MO B sees what it sent, and the rest of its patient's record only with a relationship
    mo_b = hubs.mis(MO_B)
    assert uids(qido(city, "/studies", mo_b)) == [city["b"][0]]
    visit = encounter(city["src_a"], MO_B)
    r = c.post(
        "/fhir/Encounter",
        json=visit,
        headers={**hubs.token(), "Content-Type": "application/fhir+json"},
    )
    assert r.status_code == 201, r.text
    assert sorted(uids(qido(city, "/studies", mo_b))) == sorted([city["a"][0], city["b"][0]])


def test_query_and_retrieve_are_in_the_patients_access_log(city: dict[str, Any]) -> None:
    c, hubs = city["c"], city["hubs"]
    radiologist = hubs.token("service")
    a = city["a"]
    assert qido(city, "/studies?PatientID=A-100", radiologist).status_code == 200
    assert c.get(f"/dicomweb/studies/{a[0]}/metadata", headers=radiologist).status_code == 200
    records, _ = hubs.hub.audit.records(refs=[f"Patient/{city['src_a']}"])
    kinds = {r.subtype for r in records}
    assert {"query", "retrieve"} <= kinds
    retrieve = next(r for r in records if r.subtype == "retrieve")
    row = DicomIndex(hubs.hub.store).study(a[0])
    assert row is not None
    assert retrieve.entities == [f"ImagingStudy/{row['imaging_study_id']}"]
    assert retrieve.path.endswith("/metadata")
    # the other person's record shows neither
    others, _ = hubs.hub.audit.records(refs=[f"Patient/{source_of(hubs, city['x'][0])}"])
    assert not [r for r in others if r.subtype in ("query", "retrieve") and "A-100" in r.path]
