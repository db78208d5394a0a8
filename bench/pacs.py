"""Central image archive benchmark (issue #8): C-STORE throughput, side by side.

Generates one study set (``--series`` CT series of ``--per-series`` instances, 512×512
16-bit, ~0.5 MB each; plus ``--small`` small instances) and sends it with dcmtk's
``storescu`` (``TCP_NODELAY=1``, one association per run, as a modality does; with
``--associations N``, N ``storescu`` processes at once, each sending whole studies, as
several modalities do; ``storescp`` then forks a process per association) to:

- the hub: a real ``hie serve`` process with its DICOM listener (embedded SQLite store and
  filesystem blobs, every instance durable before its response), once as configured by
  default (each file made durable by one synced append to the blob store's write-ahead
  journal) and once with ``HIE_DICOM_JOURNAL_MB=0`` (each file put and synced alone);
- dcmtk's ``storescp`` writing files to disk (the practical ceiling);
- Orthanc, when its Debian package is installed (``Orthanc`` on the PATH);
- a pynetdicom SCP that keeps nothing, with stock and with the hub's tuned association loops
  (the ceiling of any receiver on pynetdicom), and the tuned one writing each instance to the
  hub's blob store before it answers (fsync, rename, directory fsync, as the hub does): the
  ceiling of a pynetdicom receiver that makes every instance durable before its response.

Prints instances/s and MB/s for each and the hub's ratios, and appends one JSON line to
``bench/results/pacs.jsonl``.

With ``--find N`` it measures C-FIND instead: N studies are indexed by inserting index rows
(patients, studies) and their ImagingStudy rows (owned by ten MOs) straight into a fresh
store, a real ``hie serve`` process answers, and pynetdicom — one association, as a
workstation keeps — sends study-level Study Root queries as one MO's system (so the access
policy applies, in the SQL): by Patient ID, by a week's Study Date range, by Accession
Number. Prints p50/p95/max per kind and appends to ``bench/results/pacs_find.jsonl``.

    .venv/bin/python bench/pacs.py                      # 4 series × 200 + 500 small
    .venv/bin/python bench/pacs.py --series 20 --small 2000
    .venv/bin/python bench/pacs.py --find 100000        # C-FIND p95 at 100,000 studies
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from argparse import SUPPRESS
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fhir_store import append_result, free_port, hub_server  # noqa: E402

from hie.fhir.service import FhirService  # noqa: E402
from hie.hub.runtime import open_hub  # noqa: E402
from hie.hub.settings import load_settings  # noqa: E402
from hie.pacs.index import DicomIndex  # noqa: E402
from tests.fixtures.dicom import (  # noqa: E402
    AE_A,
    MO_A,
    SYSTEM_A,
    as_transaction,
    ct_instance,
    dcmtk,
    dicom_registry,
    uid,
    write_file,
)

RESULTS = ROOT / "bench" / "results" / "pacs.jsonl"
ASSOCIATIONS = 1  # storescu associations at once (--associations)
FIND_RESULTS = ROOT / "bench" / "results" / "pacs_find.jsonl"
FIND_TARGET_MS = 50.0
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
CLIENT_POLL = float(os.environ.get("BENCH_CLIENT_POLL", "0.0001"))
ENV = {**os.environ, "TCP_NODELAY": "1"}


def generate(out: Path, series: int, per_series: int, small: int) -> tuple[list[Path], int]:
    """The study set as Part 10 files (explicit VR little endian); returns (files, bytes)."""
    files: list[Path] = []
    n = 0
    for s in range(series):
        study, ser = uid(), uid()
        for i in range(per_series):
            ds = ct_instance(
                patient_id=f"B{s % 50:05d}",
                study_uid=study,
                series_uid=ser,
                instance_number=i + 1,
                size=512,
                seed=n,
            )
            files.append(write_file(ds, out / f"ct{s:03d}" / f"{i:04d}.dcm"))
            n += 1
    study, ser = uid(), uid()
    for i in range(small):
        ds = ct_instance(
            patient_id="S00001", study_uid=study, series_uid=ser, instance_number=i + 1, size=16
        )
        files.append(write_file(ds, out / "small" / f"{i:05d}.dcm"))
    return files, sum(f.stat().st_size for f in files)


def storescu(port: int, called: str, directory: Path) -> float:
    """Seconds ``storescu`` takes to send every file under ``directory``: in one association,
    or with ``ASSOCIATIONS`` > 1 in that many at once (one ``storescu`` process each, the
    study directories shared out among them by size), until the last is done."""
    groups: list[list[Path]] = [[] for _ in range(ASSOCIATIONS)]
    sizes = [0] * ASSOCIATIONS
    study_bytes = {
        p: sum(f.stat().st_size for f in p.iterdir()) for p in directory.iterdir() if p.is_dir()
    }
    for study in sorted(study_bytes, key=lambda p: -study_bytes[p]):
        i = sizes.index(min(sizes))  # the largest first, each to the least loaded association
        groups[i].append(study)
        sizes[i] += study_bytes[study]
    t0 = time.perf_counter()
    procs = [
        subprocess.Popen(
            [
                dcmtk("storescu") or "storescu",
                "--scan-directories",
                "--recurse",
                "-aet",
                AE_A,
                "-aec",
                called,
                "127.0.0.1",
                str(port),
                *map(str, group),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        for group in groups
        if group
    ]
    errors = [proc.communicate(timeout=3600)[1] for proc in procs]
    failed = [err for proc, err in zip(procs, errors, strict=True) if proc.returncode]
    took = time.perf_counter() - t0
    if failed:
        raise RuntimeError(f"storescu failed: {failed[0][-2000:]}")
    return took


def wait_port(port: int, proc: subprocess.Popen[bytes], deadline: float = 30.0) -> None:
    import socket

    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError("the server exited")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("the server did not listen")


def dicom_hub(work: Path, database_url: str, port: int, **env: str) -> Any:
    """A real ``hie serve`` on ``work/hub`` with its DICOM listener on ``port`` (one HTTP
    worker, no MLLP; ``env``: more ``HIE_*`` variables)."""
    env |= {"HIE_DICOM_PORT": str(port), "HIE_HTTP_WORKERS": "1", "HIE_MLLP_PORT": "0"}
    return hub_server(work, database_url, **env)


def run_hub(work: Path, data: Path, **env: str) -> tuple[float, int]:
    """Seconds a fresh hub in ``work`` takes to receive the study set, and how many
    instances it then holds."""
    work.mkdir()
    settings = load_settings(data_dir=work)
    hub = open_hub(settings)
    hub.store.migrate()
    FhirService(hub.store, settings).transaction(as_transaction(dicom_registry()), "")
    hub.close()
    port = free_port()
    with dicom_hub(work, settings.database_url, port, **env):
        took = storescu(port, "HUB", data)
    hub = open_hub(settings)
    try:
        stored = DicomIndex(hub.store).counts()["dicom_instances"]
    finally:
        hub.close()
    return took, stored


def send_to(command: list[str], port: int, ae_title: str, data: Path, wait: float = 30.0) -> float:
    """Start a receiver (``command``, listening on ``port`` within ``wait`` seconds), send it
    the study set with ``storescu``, stop it; the seconds the sending took."""
    proc = subprocess.Popen(command, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, proc, wait)
        return storescu(port, ae_title, data)
    finally:
        proc.terminate()
        proc.wait(wait)


def run_storescp(work: Path, data: Path) -> float:
    out = work / "storescp"
    out.mkdir()
    port = free_port()
    exe = dcmtk("storescp") or "storescp"
    fork = ["--fork"] if ASSOCIATIONS > 1 else []  # one process per association at once
    return send_to(
        [exe, *fork, "-aet", "STORESCP", "-od", str(out), str(port)], port, "STORESCP", data
    )


def run_orthanc(work: Path, data: Path) -> float | None:
    exe = shutil.which("Orthanc")
    if exe is None:
        return None
    port, http = free_port(), free_port()
    conf = work / "orthanc.json"
    conf.write_text(
        json.dumps(
            {
                "StorageDirectory": str(work / "orthanc"),
                "IndexDirectory": str(work / "orthanc"),
                "DicomAet": "ORTHANC",
                "DicomPort": port,
                "HttpPort": http,
                "DicomCheckCalledAet": False,
                "Plugins": [],
            }
        )
    )
    return send_to([exe, str(conf)], port, "ORTHANC", data, wait=60)


def serve_do_nothing(port: int, mode: str, blob_dir: str | None = None) -> None:
    """A pynetdicom SCP that accepts every instance and keeps none (``stock``, ``tuned``) or
    only its file (``durable``: the hub's filesystem blob store in ``blob_dir``): the most any
    SCP built on pynetdicom can take, with its association loops stock or as the hub tunes
    them (``hie.adapters.dicom_reactor``). Runs until killed."""
    import hashlib

    from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

    from hie.adapters import dicom_reactor
    from hie.hub.blobs.filesystem import FilesystemBlobStore

    blobs = FilesystemBlobStore(blob_dir) if mode == "durable" and blob_dir else None

    def on_store(event: Any) -> int:
        if blobs is None:
            event.encoded_dataset(include_meta=False)  # the bytes as the hub takes them
            return 0
        p10 = event.encoded_dataset(include_meta=True)  # the file as the hub keeps it
        blobs.put(p10, expected_sha256=hashlib.sha256(p10).hexdigest())
        return 0

    handlers: list[Any] = [(evt.EVT_C_STORE, on_store)]
    if mode != "stock":
        dicom_reactor.install()
        handlers.append((evt.EVT_CONN_OPEN, lambda event: dicom_reactor.tune(event.assoc)))
    ae = AE(ae_title="NOTHING")
    ae.maximum_pdu_size = 0
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    ae.start_server(("127.0.0.1", port), evt_handlers=handlers)


def run_do_nothing(data: Path, mode: str) -> float:
    port = free_port()
    blob_dir = data.parent / f"blobs-{mode}"
    command = [sys.executable, __file__, "--do-nothing-scp", mode, str(port), str(blob_dir)]
    return send_to(command, port, "NOTHING", data)


# --- C-FIND ----------------------------------------------------------------------------------

MOS = [MO_A, *(f"mo-bench-{i}" for i in range(1, 10))]  # ten MOs own the studies in turn


def build_index(work: Path, studies: int) -> tuple[Any, list[dict[str, str]]]:
    """A migrated store with ``studies`` studies (four per patient) indexed, each with its
    ImagingStudy row; returns (settings, the queries to time)."""
    from sqlalchemy import insert

    from hie.hub.store.schema import resources
    from hie.pacs import schema as s

    settings = load_settings(data_dir=work / "hub")
    hub = open_hub(settings)
    hub.store.migrate()
    FhirService(hub.store, settings).transaction(as_transaction(dicom_registry()), "")
    engine = hub.store.engine
    rng = random.Random(8)
    n_patients = max(1, studies // 4)
    now = int(time.time() * 1e6)
    start = datetime.date(2016, 1, 1)
    batch = 20_000
    t0 = time.monotonic()
    with engine.begin() as conn:
        for lo in range(0, n_patients, batch):
            conn.execute(
                insert(s.dicom_patients),
                [
                    {
                        "pk": k + 1,
                        "patient_ref": f"bench-p{k}",
                        "patient_id": f"{1_000_000 + k}",
                        "issuer": "",
                        "id_system": SYSTEM_A,
                        "patient_name": f"Пациентова{k % 997} Анна {k}",
                        "name_key": f"ПАЦИЕНТОВА{k % 997} АННА {k}",
                        "birth_date": f"{1940 + k % 70}0{1 + k % 9}1{k % 10}",
                        "sex": "F",
                        "owner": MOS[k % len(MOS)],
                        "created": now,
                    }
                    for k in range(lo, min(n_patients, lo + batch))
                ],
            )
        for lo in range(0, studies, batch):
            chunk = range(lo, min(studies, lo + batch))
            rows = []
            for j in chunk:
                patient = j % n_patients
                day = start + datetime.timedelta(days=rng.randrange(3650))
                rows.append(
                    {
                        "pk": j + 1,
                        "study_uid": f"2.25.{10**20 + j}",
                        "patient_pk": patient + 1,
                        "study_date": day.strftime("%Y%m%d"),
                        "study_time": f"{8 + j % 10:02d}{j % 60:02d}00",
                        "accession": f"ACC{j:08d}",
                        "study_id": str(j % 1000),
                        "description": "КТ органов грудной клетки",
                        "referring": "Смирнов^Олег",
                        "modalities": "CT",
                        "num_series": 1,
                        "num_instances": 200,
                        "imaging_study_id": f"bench-is-{j}",
                        "owner": MOS[patient % len(MOS)],
                        "created": now,
                        "updated": now,
                    }
                )
            conn.execute(insert(s.dicom_studies), rows)
            conn.execute(
                insert(resources),
                [
                    {
                        "rtype": "ImagingStudy",
                        "id": r["imaging_study_id"],
                        "version": 1,
                        "last_updated": now,
                        "deleted": False,
                        "owner": r["owner"],
                    }
                    for r in rows
                ],
            )
    with engine.begin() as conn:
        conn.exec_driver_sql("ANALYZE")
    print(f"indexed {studies:,} studies in {time.monotonic() - t0:.1f} s", flush=True)
    hub.close()
    # the querying MO (MO A, its modality's AE title) and what it may see: its own studies
    mine = [k for k in range(n_patients) if k % len(MOS) == 0]
    queries: list[dict[str, str]] = []
    for i in range(300):
        k = rng.choice(mine)
        kind = ("PatientID", "StudyDate", "AccessionNumber")[i % 3]
        if kind == "PatientID":
            queries.append({"kind": kind, "PatientID": f"{1_000_000 + k}"})
        elif kind == "StudyDate":
            day = start + datetime.timedelta(days=rng.randrange(3640))
            end = day + datetime.timedelta(days=6)
            queries.append({"kind": kind, "StudyDate": f"{day:%Y%m%d}-{end:%Y%m%d}"})
        else:
            j = k + n_patients * rng.randrange(4)
            queries.append({"kind": kind, "AccessionNumber": f"ACC{j:08d}"})
    return settings, queries


def time_finds(port: int, queries: list[dict[str, str]]) -> dict[str, list[float]]:
    """Send every query over one association; milliseconds per query, by kind, and the
    number of matches each returned."""
    import socket

    from pydicom.dataset import Dataset
    from pynetdicom import AE, evt

    def nodelay(event: Any) -> None:
        event.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    ae = AE(ae_title=AE_A)
    ae.add_requested_context(STUDY_ROOT_FIND)
    assoc = ae.associate(
        "127.0.0.1", port, ae_title="HUB", evt_handlers=[(evt.EVT_CONN_OPEN, nodelay)]
    )
    if not assoc.is_established:
        raise RuntimeError("the hub refused the association")
    # pynetdicom's reader polls every 1 ms when idle; a client that only measures may spin
    # faster, so the figures are the hub's, not the client's polling
    assoc.dul._run_loop_delay = CLIENT_POLL
    out: dict[str, list[float]] = {}
    matches: dict[str, int] = {}
    try:
        for i, q in enumerate([*queries[:30], *queries]):  # the first 30: warm-up
            ds = Dataset()
            ds.QueryRetrieveLevel = "STUDY"
            for key in ("PatientID", "StudyDate", "AccessionNumber"):
                setattr(ds, key, q.get(key, ""))
            ds.StudyInstanceUID = ""
            ds.PatientName = ""
            ds.NumberOfStudyRelatedInstances = ""
            t0 = time.perf_counter()
            n = 0
            for status, _ in assoc.send_c_find(ds, STUDY_ROOT_FIND):
                if status.Status not in (0xFF00, 0x0000):
                    raise RuntimeError(f"C-FIND failed: 0x{status.Status:04X}")
                n += status.Status == 0xFF00
            took = (time.perf_counter() - t0) * 1000
            if i >= 30:
                out.setdefault(q["kind"], []).append(took)
                matches[q["kind"]] = matches.get(q["kind"], 0) + n
    finally:
        assoc.release()
    for kind, n in matches.items():
        out[f"{kind}:matches"] = [n / len(out[kind])]
    return out


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def run_find(studies: int) -> None:
    with tempfile.TemporaryDirectory(prefix="hie-bench-pacs-find-") as tmp:
        work = Path(tmp)
        settings, queries = build_index(work, studies)
        port = free_port()
        with dicom_hub(work / "hub", settings.database_url, port):
            times = time_finds(port, queries)
    print(f"\nC-FIND, study level, {studies:,} studies, as one MO (access policy in the SQL)")
    print(f"(pynetdicom client polling every {CLIENT_POLL * 1000:g} ms; BENCH_CLIENT_POLL)")
    print(f"{'query':<18}{'n':>6}{'matches':>9}{'p50 ms':>9}{'p95 ms':>9}{'max ms':>9}")
    summary: dict[str, dict[str, float]] = {}
    for kind in ("PatientID", "StudyDate", "AccessionNumber"):
        ms = times[kind]
        row = {
            "n": len(ms),
            "matches": round(times[f"{kind}:matches"][0], 1),
            "p50": round(percentile(ms, 50), 2),
            "p95": round(percentile(ms, 95), 2),
            "max": round(max(ms), 2),
        }
        summary[kind] = row
        print(
            f"{kind:<18}{row['n']:>6}{row['matches']:>9}{row['p50']:>9.2f}"
            f"{row['p95']:>9.2f}{row['max']:>9.2f}"
        )
    worst = max(r["p95"] for r in summary.values())
    verdict = "met" if worst <= FIND_TARGET_MS else "NOT met"
    print(f"\nworst p95 {worst:.1f} ms; target ≤ {FIND_TARGET_MS:.0f} ms {verdict}")
    append_result(
        FIND_RESULTS,
        {
            "studies": studies,
            "database": "sqlite",
            "client_poll_ms": CLIENT_POLL * 1000,
            "ms": summary,
        },
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--series", type=int, default=4)
    ap.add_argument("--per-series", type=int, default=200)
    ap.add_argument("--small", type=int, default=500)
    ap.add_argument(
        "--associations",
        type=int,
        default=1,
        help="storescu associations at once, each sending whole studies (several modalities)",
    )
    ap.add_argument("--find", type=int, metavar="STUDIES", help="measure C-FIND instead")
    ap.add_argument(
        "--do-nothing-scp", nargs=3, metavar=("stock|tuned|durable", "PORT", "DIR"), help=SUPPRESS
    )
    args = ap.parse_args()
    global ASSOCIATIONS
    ASSOCIATIONS = max(1, args.associations)
    if args.do_nothing_scp:
        mode, port, blob_dir = args.do_nothing_scp
        serve_do_nothing(int(port), mode, blob_dir)
        return
    if args.find:
        run_find(args.find)
        return
    with tempfile.TemporaryDirectory(prefix="hie-bench-pacs-") as tmp:
        work = Path(tmp)
        data = work / "data"
        files, size = generate(data, args.series, args.per_series, args.small)
        mb = size / 1e6
        print(
            f"study set: {len(files)} instances, {mb:.1f} MB, {ASSOCIATIONS} association(s)",
            flush=True,
        )
        rows: dict[str, float | None] = {}
        rows["storescp (disk)"] = run_storescp(work, data)
        rows["Orthanc"] = run_orthanc(work, data)
        rows["pynetdicom, stock"] = run_do_nothing(data, "stock")
        rows["pynetdicom, tuned"] = run_do_nothing(data, "tuned")
        rows["pynetdicom, durable"] = run_do_nothing(data, "durable")
        alone_s, alone = run_hub(work / "hub-alone", data, HIE_DICOM_JOURNAL_MB="0")
        hub_s, stored = run_hub(work / "hub", data)
        rows["hub, files synced alone"] = alone_s
        rows["hie hub"] = hub_s
        for n in (alone, stored):
            if n != len(files):
                raise RuntimeError(f"the hub stored {n} of {len(files)} instances")
    print(f"\n{'receiver':<22}{'seconds':>10}{'instances/s':>14}{'MB/s':>10}")
    for name, secs in rows.items():
        if secs is None:
            print(f"{name:<22}{'not installed':>34}")
            continue
        print(f"{name:<22}{secs:>10.2f}{len(files) / secs:>14.1f}{mb / secs:>10.1f}")
    ceiling = rows["storescp (disk)"] or 1.0
    print(f"\nhub / storescp: {ceiling / hub_s:.0%} of the instance rate")
    if rows["Orthanc"]:
        print(f"hub / Orthanc: {rows['Orthanc'] / hub_s:.2f}×")
    durable = rows["pynetdicom, durable"] or 1.0
    print(f"hub / pynetdicom writing durable files only: {durable / hub_s:.0%}")
    append_result(
        RESULTS,
        {
            "instances": len(files),
            "megabytes": round(mb, 1),
            "associations": ASSOCIATIONS,
            "seconds": {k: (round(v, 3) if v else None) for k, v in rows.items()},
        },
    )


if __name__ == "__main__":
    main()
