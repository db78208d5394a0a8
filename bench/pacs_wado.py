"""DICOMweb benchmark (issue #8): WADO-RS retrieve of a CT series, in MB/s.

Generates one series of ``--instances`` CT images (512×512, 16-bit, ~0.5 MB each), stores it
in a real ``hie serve`` process (embedded SQLite store, filesystem blobs) by STOW-RS, then
retrieves it ``--runs`` times over loopback:

- **series (stream)** — ``GET /dicomweb/studies/{s}/series/{se}``, the multipart response
  read as it streams and counted (the transfer rate: what a viewer's loader sees);
- **series (dicomweb-client)** — the same through ``dicomweb-client``, which also splits the
  parts and parses each with pydicom (client-side work included);
- **instance by instance** — one ``GET …/instances/{i}`` per instance on one connection;
- **series metadata** — ``GET …/series/{se}/metadata`` (each file's header read and turned
  into DICOM JSON).

Prints a table (best and median of the runs) and appends one JSON line to
``bench/results/pacs_wado.jsonl``. For context, DESIGN.md's peer figure: Orthanc 1.10 moves
the same kind of series to a storescp by C-MOVE at ~240 MB/s (C-GET ~310 MB/s).

    .venv/bin/python bench/pacs_wado.py                   # 200 instances, 5 runs
    .venv/bin/python bench/pacs_wado.py --instances 500 --runs 3
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path

import httpx
from pydicom import dcmread

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fhir_store import AUTH, append_result, hub_server  # noqa: E402

from hie.fhir.service import FhirService  # noqa: E402
from hie.hub.runtime import open_hub  # noqa: E402
from hie.hub.settings import load_settings  # noqa: E402
from tests.fixtures.dicom import MO_A, as_transaction, ct_instance, dicom_registry, uid  # noqa: E402
from tests.fixtures.dicomweb import dicomweb_client, part10, stow_body  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "pacs_wado.jsonl"


def generate(n: int) -> tuple[str, str, list[bytes]]:
    """One CT series of ``n`` Part 10 files (explicit VR little endian)."""
    study, series = uid(), uid()
    files = [
        part10(
            ct_instance(
                patient_id="W00001",
                study_uid=study,
                series_uid=series,
                instance_number=i + 1,
                size=512,
                seed=i,
            )
        )
        for i in range(n)
    ]
    return study, series, files


def timed(fn: Callable[[], int], runs: int) -> tuple[list[float], int]:
    """Seconds of each run of ``fn`` (which returns the bytes it received)."""
    out, got = [], 0
    for _ in range(runs):
        t0 = time.perf_counter()
        got = fn()
        out.append(time.perf_counter() - t0)
    return out, got


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--instances", type=int, default=200)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    study, series, files = generate(args.instances)
    size = sum(len(f) for f in files)
    mb = size / 1e6
    print(f"series: {len(files)} instances, {mb:.1f} MB", flush=True)
    rows: dict[str, list[float]] = {}
    received: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="hie-bench-wado-") as tmp:
        work = Path(tmp) / "hub"
        settings = load_settings(data_dir=work)
        hub = open_hub(settings)
        hub.store.migrate()
        FhirService(hub.store, settings).transaction(as_transaction(dicom_registry()), "")
        hub.close()
        with hub_server(
            work, settings.database_url, role="mis", org=MO_A, HIE_HTTP_WORKERS="1"
        ) as base:
            auth = AUTH[base]
            body, ctype = stow_body(files)
            t0 = time.perf_counter()
            r = httpx.post(
                f"{base}/dicomweb/studies",
                content=body,
                headers={**auth, "Content-Type": ctype},
                timeout=600,
            )
            stow_s = time.perf_counter() - t0
            if r.status_code != 200:
                raise RuntimeError(f"STOW-RS answered {r.status_code}: {r.text[:500]}")
            del body
            url = f"{base}/dicomweb/studies/{study}/series/{series}"
            sops = [str(dcmread(BytesIO(f), stop_before_pixels=True).SOPInstanceUID) for f in files]
            with httpx.Client(headers=auth, timeout=600) as http:

                def stream() -> int:
                    n = 0
                    with http.stream("GET", url) as resp:
                        resp.raise_for_status()
                        for chunk in resp.iter_raw(1 << 20):
                            n += len(chunk)
                    return n

                def one_by_one() -> int:
                    n = 0
                    for sop in sops:
                        resp = http.get(f"{url}/instances/{sop}")
                        resp.raise_for_status()
                        n += len(resp.content)
                    return n

                def metadata() -> int:
                    resp = http.get(f"{url}/metadata")
                    resp.raise_for_status()
                    if len(resp.json()) != len(files):
                        raise RuntimeError("metadata of the wrong number of instances")
                    return len(resp.content)

                stream()  # warm the page cache and the server
                rows["series (stream)"], received["series (stream)"] = timed(stream, args.runs)
                rows["instance by instance"], received["instance by instance"] = timed(
                    one_by_one, args.runs
                )
                rows["series metadata"], received["series metadata"] = timed(metadata, args.runs)
            client = dicomweb_client(base, auth)

            def with_client() -> int:
                got = client.retrieve_series(study, series)
                if len(got) != len(files):
                    raise RuntimeError("the client got the wrong number of instances")
                return size

            rows["series (dicomweb-client)"], received["series (dicomweb-client)"] = timed(
                with_client, args.runs
            )
    print(f"\nSTOW-RS of the series: {stow_s:.2f} s, {mb / stow_s:.1f} MB/s")
    print(f"\n{'retrieve':<28}{'best s':>9}{'median s':>10}{'MB/s best':>11}{'MB/s med':>10}")
    for name, secs in rows.items():
        best, med = min(secs), statistics.median(secs)
        vol = (received[name] if name == "series metadata" else size) / 1e6
        unit = "" if name != "series metadata" else "  (JSON MB)"
        print(f"{name:<28}{best:>9.3f}{med:>10.3f}{vol / best:>11.1f}{vol / med:>10.1f}{unit}")
    append_result(
        RESULTS,
        {
            "instances": len(files),
            "megabytes": round(mb, 1),
            "stow_seconds": round(stow_s, 3),
            "runs": args.runs,
            "seconds": {k: [round(x, 4) for x in v] for k, v in rows.items()},
            "mb_per_s_best": {
                k: round((received[k] if k == "series metadata" else size) / 1e6 / min(v), 1)
                for k, v in rows.items()
            },
        },
    )


if __name__ == "__main__":
    main()
