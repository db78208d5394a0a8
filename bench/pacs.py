"""Central image archive benchmark (issue #8): C-STORE throughput, side by side.

Generates one study set (``--series`` CT series of ``--per-series`` instances, 512×512
16-bit, ~0.5 MB each; plus ``--small`` small instances) and sends it with dcmtk's
``storescu`` (``TCP_NODELAY=1``, one association per run, as a modality does) to:

- the hub: a real ``hie serve`` process with its DICOM listener (embedded SQLite store and
  filesystem blobs, every instance durable before its response);
- dcmtk's ``storescp`` writing files to disk (the practical ceiling);
- Orthanc, when its Debian package is installed (``Orthanc`` on the PATH).

Prints instances/s and MB/s for each and the hub's ratios, and appends one JSON line to
``bench/results/pacs.jsonl``.

    .venv/bin/python bench/pacs.py                      # 4 series × 200 + 500 small
    .venv/bin/python bench/pacs.py --series 20 --small 2000
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fhir_store import free_port, hub_server  # noqa: E402

from hie.fhir.service import FhirService  # noqa: E402
from hie.hub.runtime import open_hub  # noqa: E402
from hie.hub.settings import load_settings  # noqa: E402
from hie.pacs.index import DicomIndex  # noqa: E402
from tests.fixtures.dicom import (  # noqa: E402
    AE_A,
    as_transaction,
    ct_instance,
    dcmtk,
    dicom_registry,
    uid,
    write_file,
)

RESULTS = ROOT / "bench" / "results" / "pacs.jsonl"
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
    """Seconds ``storescu`` takes to send every file under ``directory`` in one association."""
    cmd = [
        dcmtk("storescu") or "storescu",
        "--scan-directories",
        "--recurse",
        "-aet",
        AE_A,
        "-aec",
        called,
        "127.0.0.1",
        str(port),
        str(directory),
    ]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=3600)
    took = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"storescu failed: {done.stderr[-2000:]}")
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


def run_hub(work: Path, data: Path) -> tuple[float, int]:
    settings = load_settings(data_dir=work / "hub")
    hub = open_hub(settings)
    hub.store.migrate()
    FhirService(hub.store, settings).transaction(as_transaction(dicom_registry()), "")
    hub.close()
    port = free_port()
    with hub_server(
        work / "hub",
        settings.database_url,
        HIE_DICOM_PORT=str(port),
        HIE_HTTP_WORKERS="1",
        HIE_MLLP_PORT="0",
    ):
        took = storescu(port, "HUB", data)
    hub = open_hub(settings)
    try:
        stored = DicomIndex(hub.store).counts()["dicom_instances"]
    finally:
        hub.close()
    return took, stored


def run_storescp(work: Path, data: Path) -> float:
    out = work / "storescp"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        [dcmtk("storescp") or "storescp", "-aet", "STORESCP", "-od", str(out), str(port)],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port, proc)
        return storescu(port, "STORESCP", data)
    finally:
        proc.terminate()
        proc.wait(30)


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
    proc = subprocess.Popen(
        [exe, str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV
    )
    try:
        wait_port(port, proc, 60)
        return storescu(port, "ORTHANC", data)
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--series", type=int, default=4)
    ap.add_argument("--per-series", type=int, default=200)
    ap.add_argument("--small", type=int, default=500)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="hie-bench-pacs-") as tmp:
        work = Path(tmp)
        data = work / "data"
        files, size = generate(data, args.series, args.per_series, args.small)
        mb = size / 1e6
        print(f"study set: {len(files)} instances, {mb:.1f} MB", flush=True)
        rows: dict[str, float | None] = {}
        rows["storescp (disk)"] = run_storescp(work, data)
        rows["Orthanc"] = run_orthanc(work, data)
        hub_s, stored = run_hub(work, data)
        rows["hie hub"] = hub_s
        if stored != len(files):
            raise RuntimeError(f"the hub stored {stored} of {len(files)} instances")
    print(f"\n{'receiver':<18}{'seconds':>10}{'instances/s':>14}{'MB/s':>10}")
    for name, secs in rows.items():
        if secs is None:
            print(f"{name:<18}{'not installed':>34}")
            continue
        print(f"{name:<18}{secs:>10.2f}{len(files) / secs:>14.1f}{mb / secs:>10.1f}")
    ceiling = rows["storescp (disk)"] or 1.0
    print(f"\nhub / storescp: {ceiling / hub_s:.0%} of the instance rate")
    if rows["Orthanc"]:
        print(f"hub / Orthanc: {rows['Orthanc'] / hub_s:.2f}×")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(
            json.dumps(
                {
                    "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "host": platform.node(),
                    "instances": len(files),
                    "megabytes": round(mb, 1),
                    "seconds": {k: (round(v, 3) if v else None) for k, v in rows.items()},
                }
            )
            + "\n"
        )


if __name__ == "__main__":
    main()
