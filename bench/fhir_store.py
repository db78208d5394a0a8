"""FHIR store benchmark (issue #3): ingest throughput, search latency at scale, $everything.

Runs a real ``hie serve`` subprocess per backend and drives it over HTTP:

1. create throughput: transaction Bundles of 100 Observations from N concurrent clients;
2. ``Observation?subject=…&code=…&date=ge…`` p50/p95 with ``--observations`` stored
   (pre-loaded in-process through the same service code, validation included);
3. ``Patient/{id}/$everything`` p95 for a patient with 1,000 resources.

Prints a table and appends one JSON line to ``bench/results/fhir_store.jsonl``.

    .venv/bin/python bench/fhir_store.py                       # SQLite, 1,000,000 Observations
    .venv/bin/python bench/fhir_store.py --backend postgresql  # same on PostgreSQL
    .venv/bin/python bench/fhir_store.py --observations 100000 --backend both
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hie.demo import Generator  # noqa: E402
from hie.fhir.service import FhirService  # noqa: E402
from hie.hub.auth import DevTokenIssuer  # noqa: E402
from hie.hub.settings import load_settings  # noqa: E402
from hie.hub.store import open_resource_store  # noqa: E402
from hie.hub.store.sql import now_us  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "fhir_store.jsonl"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def append_result(path: Path, record: dict[str, Any]) -> None:
    """Append ``record`` (after the time and host) as one JSON line to ``path``."""
    line = {"when": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": platform.node(), **record}
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(line) + "\n")


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    k = max(0, min(len(values) - 1, round(p / 100 * (len(values) - 1))))
    return values[k]


def _server_sides(port: int) -> dict[int, int]:
    """Established loopback connections to ``port``: client port → pid of the process that
    holds the server's end (from /proc, so no help from the server is needed)."""
    inodes: dict[str, int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(FileNotFoundError), open(table) as f:
            for line in f.readlines()[1:]:
                col = line.split()
                if col[3] == "01" and int(col[1].rsplit(":", 1)[1], 16) == port:
                    inodes[col[9]] = int(col[2].rsplit(":", 1)[1], 16)
    owners: dict[int, int] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{pid}/fd"):
                with contextlib.suppress(OSError):
                    link = os.readlink(f"/proc/{pid}/fd/{fd}")
                    if link.startswith("socket:[") and link[8:-1] in inodes:
                        owners[inodes[link[8:-1]]] = int(pid)
    return owners


def tree_cpu_seconds(pid: int) -> float:
    """CPU time (user + system) used so far by process ``pid`` and every live descendant
    (a hub's HTTP worker processes), from /proc."""
    parents: dict[int, int] = {}
    used: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError, IndexError, ValueError):
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            parents[int(entry)] = int(fields[1])
            used[int(entry)] = (int(fields[11]) + int(fields[12])) / tick
    tree = {pid}
    while grown := {p for p, parent in parents.items() if parent in tree} - tree:
        tree |= grown
    return sum(used.get(p, 0.0) for p in tree)


def balanced_clients(
    base: str, headers: dict[str, str], n: int, workers: int, tries: int = 100
) -> list[httpx.Client]:
    """``n`` keep-alive clients of the hub at ``base``, their connections spread evenly over
    its ``workers`` HTTP worker processes.

    Which worker accepts a new connection is up to the kernel; four connections land 2/2 on
    two workers only 3 times in 8, and 4/0 leaves a core idle for the whole turn. A benchmark
    comparing two hubs would measure that luck, so clients on an overloaded worker reconnect
    until the split is even."""
    port = int(base.rsplit(":", 1)[1])
    limit = -(-n // workers)
    clients: list[tuple[httpx.Client, int]] = []
    for attempt in range(tries):
        while len(clients) < n:
            c = httpx.Client(base_url=base, headers=headers, timeout=60)
            r = c.get("/healthz")
            clients.append((c, r.extensions["network_stream"].get_extra_info("client_addr")[1]))
        owners = _server_sides(port)
        by_worker: dict[int, list[tuple[httpx.Client, int]]] = {}
        for c, cport in clients:
            by_worker.setdefault(owners.get(cport, -1), []).append((c, cport))
        extra = [c for group in by_worker.values() for c in group[limit:]]
        if not extra or attempt == tries - 1:  # even, or as even as it got
            break
        for c, _ in extra:
            c.close()
        clients = [c for c in clients if c not in extra]
    return [c for c, _ in clients]


AUTH: dict[str, dict[str, str]] = {}  # base URL → Authorization header of its hub
PIDS: dict[str, int] = {}  # base URL → pid of its `hie serve` process


@contextlib.contextmanager
def hub_server(
    data_dir: Path,
    database_url: str,
    *,
    role: str = "service",
    org: str | None = None,
    **env_extra: str,
) -> Iterator[str]:
    """A real `hie serve` process (``env_extra``: more ``HIE_*`` variables); yields its base
    URL. ``AUTH[base]`` holds a bearer token of ``role`` for it."""
    port = free_port()
    env = {
        **os.environ,
        "HIE_DATA_DIR": str(data_dir),
        "HIE_DATABASE_URL": database_url,
        "HIE_HTTP_PORT": str(port),
        "HIE_MLLP_PORT": "0",
        "HIE_DICOM_PORT": "0",
        "HIE_LOG_LEVEL": "WARNING",
        "HIE_MAX_PAGE_SIZE": "1000",
        "HIE_HTTP_WORKERS": os.environ.get("HIE_HTTP_WORKERS", "2"),
        "HIE_RATE_LIMIT_PER_SECOND": "0",  # load generators are not floods
        **env_extra,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "hie.cli", "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(data_dir / "serve.log", "ab"),  # noqa: SIM115
    )
    base = f"http://127.0.0.1:{port}"
    # a service token signed with the development key of the hub's data dir
    token = DevTokenIssuer(load_settings(data_dir=data_dir)).issue(role, org=org, ttl=24 * 3600)
    AUTH[base] = {"Authorization": f"Bearer {token}"}
    PIDS[base] = proc.pid
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"hie serve did not start; see {data_dir / 'serve.log'}")
            time.sleep(0.2)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _prepare_chunk(job: tuple[str, str, int, list[str], int]) -> list[Any]:
    """Worker process: generate and prepare (validate, index, serialise) one chunk."""
    database_url, data_dir, seed, pids, per = job
    settings = load_settings(data_dir=Path(data_dir), database_url=database_url)
    svc = FhirService(None, settings)  # type: ignore[arg-type]  # prepare() needs no store
    gen = Generator(seed)
    out = []
    for pid in pids:
        for o in gen.observations(f"Patient/{pid}", per):
            out.append((svc.prepare(o, "Observation", gen.uuid(), 1, now_us(), "POST"), 1))
    return out


def preload(
    database_url: str,
    data_dir: Path,
    n_obs: int,
    n_patients: int,
    seed: int,
    *,
    care_org: str | None = None,
) -> list[str]:
    """Store ``n_patients`` patients and ``n_obs`` Observations through the service code
    (validation and index extraction included, in worker processes) in bulk transactions;
    with ``care_org``, an open Encounter of each patient at that MO (a care relationship for
    the access policy). Returns the patient ids."""
    from multiprocessing import get_context

    settings = load_settings(data_dir=data_dir, database_url=database_url)
    store = open_resource_store(database_url)
    store.migrate()
    svc = FhirService(store, settings)
    gen = Generator(seed)
    pids = [f"bench-p{i:06d}" for i in range(n_patients)]
    started = time.perf_counter()
    batch = [(svc.prepare(gen.patient(), "Patient", pid, 1, now_us(), "PUT"), 1) for pid in pids]
    if care_org:
        batch += [
            (
                svc.prepare(
                    _encounter(pid, care_org), "Encounter", f"enc-{pid}", 1, now_us(), "PUT"
                ),
                1,
            )
            for pid in pids
        ]
    with store.transaction() as tx:
        tx.write_many(batch, now_us())
    per = n_obs // n_patients
    step = max(1, 5000 // per)
    jobs = [
        (database_url, str(data_dir), seed + 1 + k, pids[k : k + step], per)
        for k in range(0, len(pids), step)
    ]
    done = 0
    with get_context("fork").Pool(os.cpu_count() or 2) as pool:
        for chunk in pool.imap(_prepare_chunk, jobs):
            with store.transaction() as tx:
                tx.write_many(chunk, now_us())
            done += len(chunk)
            rate = done / (time.perf_counter() - started)
            print(f"\r  preloaded {done:,} Observations ({rate:,.0f}/s)", end="", flush=True)
    # the search-index consumer has nothing to do for Observations: acknowledge the backlog
    _, newest = store.outbox_position("search-index")
    store.outbox_ack("search-index", newest)
    with store.engine.begin() as conn:  # type: ignore[attr-defined]
        conn.exec_driver_sql("ANALYZE")
    store.close()
    print(f"\r  preloaded {done:,} Observations in {time.perf_counter() - started:,.0f} s   ")
    return pids


def _encounter(pid: str, org: str) -> dict[str, Any]:
    return {
        "resourceType": "Encounter",
        "status": "in-progress",
        "class": {"system": "http://terminology.hl7.org/CodeSystem/v3-ActCode", "code": "AMB"},
        "subject": {"reference": f"Patient/{pid}"},
        "serviceProvider": {"reference": f"Organization/{org}"},
    }


def bench_ingest(base: str, clients: int, bundles_per_client: int, seed: int) -> dict[str, float]:
    """Transaction Bundles of 100 Observations from concurrent clients."""
    gens = [Generator(seed + 1000 + i) for i in range(clients)]
    # a patient per client to attach the observations to
    refs = []
    with httpx.Client(base_url=base, headers=AUTH[base], timeout=60) as c:
        for g in gens:
            r = c.post(
                "/fhir/Patient", json=g.patient(), headers={"Content-Type": "application/fhir+json"}
            )
            r.raise_for_status()
            refs.append(f"Patient/{r.json()['id']}")
    payloads = [
        [json.dumps(g.observation_bundle([ref], 100)).encode() for _ in range(bundles_per_client)]
        for g, ref in zip(gens, refs, strict=True)
    ]
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def run(i: int) -> None:
        with httpx.Client(base_url=base, headers=AUTH[base], timeout=120) as c:
            for body in payloads[i]:
                t = time.perf_counter()
                r = c.post("/fhir", content=body, headers={"Content-Type": "application/fhir+json"})
                dt = time.perf_counter() - t
                with lock:
                    if r.status_code != 200:
                        errors.append(f"{r.status_code} {r.text[:200]}")
                    latencies.append(dt)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} bundles failed, e.g. {errors[0]}")
    n = clients * bundles_per_client * 100
    return {
        "resources_per_s": n / elapsed,
        "bundle_p50_ms": pct(latencies, 50) * 1000,
        "bundle_p95_ms": pct(latencies, 95) * 1000,
        "resources": n,
        "clients": clients,
    }


def bench_search(base: str, pids: list[str], queries: int, seed: int) -> dict[str, float]:
    """Observation?subject&code&date p50/p95 over random patients."""
    rng = random.Random(seed)
    codes = ["718-7", "14749-6", "6690-2", "1742-6", "777-3"]
    lat: list[float] = []
    hits = 0
    with httpx.Client(base_url=base, headers=AUTH[base], timeout=30) as c:
        for i in range(queries + 20):
            pid = rng.choice(pids)
            code = rng.choice(codes)
            url = f"/fhir/Observation?subject=Patient/{pid}&code=http://loinc.org|{code}&date=ge2022-01-01"
            t = time.perf_counter()
            r = c.get(url)
            dt = time.perf_counter() - t
            r.raise_for_status()
            if i >= 20:  # warm-up excluded
                lat.append(dt)
                hits += len(r.json().get("entry", []))
    return {
        "p50_ms": pct(lat, 50) * 1000,
        "p95_ms": pct(lat, 95) * 1000,
        "mean_hits": hits / queries,
        "queries": queries,
    }


def bench_everything(base: str, seed: int, runs: int) -> dict[str, float]:
    """$everything for one patient with 1,000 resources, returned in one page."""
    gen = Generator(seed + 7)
    record = gen.patient_with_record(1000)
    from hie.demo.generator import as_transaction

    with httpx.Client(base_url=base, headers=AUTH[base], timeout=120) as c:
        r = c.post(
            "/fhir", json=as_transaction(record), headers={"Content-Type": "application/fhir+json"}
        )
        r.raise_for_status()
        pid = record[0]["id"]
        lat = []
        n = 0
        for i in range(runs + 5):
            t = time.perf_counter()
            r = c.get(f"/fhir/Patient/{pid}/$everything?_count=1000")
            dt = time.perf_counter() - t
            r.raise_for_status()
            if i >= 5:
                lat.append(dt)
                n = len(r.json()["entry"])
    return {
        "p50_ms": pct(lat, 50) * 1000,
        "p95_ms": pct(lat, 95) * 1000,
        "entries": n,
        "runs": runs,
    }


def run_backend(backend: str, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    data_dir = work / backend
    data_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as stack:
        if backend == "sqlite":
            url = f"sqlite:///{data_dir / 'hie.db'}"
        else:
            from tests.fixtures.postgres import postgres_server

            server = stack.enter_context(
                postgres_server(Path(tempfile.mkdtemp(prefix="hie-bench-pg-")))
            )
            url = server.new_database()
        print(f"[{backend}] pre-loading {args.observations:,} Observations …")
        t = time.perf_counter()
        pids = preload(url, data_dir, args.observations, args.patients, args.seed)
        load_s = time.perf_counter() - t
        with hub_server(data_dir, url) as base:
            print(f"[{backend}] ingest …")
            ingest = bench_ingest(base, args.clients, args.bundles, args.seed)
            print(f"[{backend}] search …")
            search = bench_search(base, pids, args.queries, args.seed)
            print(f"[{backend}] $everything …")
            everything = bench_everything(base, args.seed, args.runs)
    return {"preload_s": load_s, "ingest": ingest, "search": search, "everything": everything}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--backend", choices=["sqlite", "postgresql", "both"], default="sqlite")
    ap.add_argument("--observations", type=int, default=1_000_000)
    ap.add_argument("--patients", type=int, default=10_000)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--bundles", type=int, default=25, help="bundles of 100 per client")
    ap.add_argument("--queries", type=int, default=300)
    ap.add_argument("--runs", type=int, default=40)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--work", type=Path, default=None, help="work dir (default: a temp dir)")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="hie-bench-"))
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    results = {b: run_backend(b, args, work) for b in backends}

    rows = [
        (
            "create via transaction Bundles of 100",
            "resources/s",
            "≥ 3,000",
            lambda r: f"{r['ingest']['resources_per_s']:,.0f}",
        ),
        (
            "  bundle latency p50 / p95",
            "ms",
            "",
            lambda r: f"{r['ingest']['bundle_p50_ms']:.0f} / {r['ingest']['bundle_p95_ms']:.0f}",
        ),
        (
            f"Observation?subject&code&date ({args.observations:,} stored) p50 / p95",
            "ms",
            "p95 ≤ 20",
            lambda r: f"{r['search']['p50_ms']:.1f} / {r['search']['p95_ms']:.1f}",
        ),
        (
            "Patient/$everything (1,000 resources) p50 / p95",
            "ms",
            "p95 ≤ 150",
            lambda r: f"{r['everything']['p50_ms']:.0f} / {r['everything']['p95_ms']:.0f}",
        ),
        ("pre-load (in-process, validated)", "s", "", lambda r: f"{r['preload_s']:,.0f}"),
    ]
    head = f"{'measure':<62} {'unit':<12} {'target':<10} " + " ".join(f"{b:>14}" for b in backends)
    print("\n" + head)
    print("-" * len(head))
    for name, unit, target, fn in rows:
        print(
            f"{name:<62} {unit:<12} {target:<10} "
            + " ".join(f"{fn(results[b]):>14}" for b in backends)
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    line = {
        "bench": "fhir_store",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "args": {k: str(v) for k, v in vars(args).items()},
        "results": results,
    }
    with RESULTS.open("a") as f:
        f.write(json.dumps(line) + "\n")
    print(f"\nappended to {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
