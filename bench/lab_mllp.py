"""Lab exchange over MLLP (issue #6): throughput and ACK latency of a real ``hie serve``, with
the bare echo server as the ceiling, side by side in one run.

1. A data dir is set up on the embedded default (SQLite, ``synchronous=FULL``): the facility
   registry (a clinic whose patient numbers the messages carry, the sending laboratory, the
   ordering doctor) and ``--patients`` people registered by the clinic's ADT feed.
2. ``hie serve`` runs (one HTTP worker, MLLP on, outbox worker on) in its own process.
3. Sustained throughput: ``--connections`` MLLP clients send ``--messages`` ORU^R01 (10 OBX
   each, realistic Russian CBC and biochemistry panels, each message a new order of a random
   registered patient), each waiting for its ACK before the next; every ACK is sent after the
   message's transaction committed.
4. Latency at half that load: the same again, paced at half the measured rate; p50/p95/p99.
5. The ceiling: the same messages through ``bench/mllp_tools.py``'s bare echo server (frames
   only, ACK at once), same clients.
6. ``--profile``: where a message's time goes, from cProfile of the listener in process.

Prints a table and appends one JSON line to ``bench/results/lab_mllp.jsonl``.

    .venv/bin/python bench/lab_mllp.py                          # 4 connections, 3,000 messages
    .venv/bin/python bench/lab_mllp.py --messages 500 --profile  # quick, with the profile
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import platform
import pstats
import random
import shutil
import sys
import tempfile
import time
from io import StringIO
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fhir_store import free_port, hub_server  # noqa: E402
from mllp_tools import LoadResult, run_load, split, start_echo_server  # noqa: E402

from hie.demo.identifiers import random_snils  # noqa: E402
from hie.hub.settings import load_settings  # noqa: E402
from tests.fixtures.hl7v2 import (  # noqa: E402
    LAB_FACILITY,
    MO_NAMESPACE,
    SNILS_OID,
    adt_message,
    lab_pid,
    oru_message,
)
from tests.fixtures.labs import as_transaction, lab_registry  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "lab_mllp.jsonl"
FAMILIES = ["Иванова", "Петрова", "Смирнова", "Кузнецова", "Попова", "Васильева", "Соколова"]
GIVEN = ["Анна", "Мария", "Ольга", "Елена", "Татьяна", "Наталья", "Ирина", "Светлана"]


def person_pid(n: int) -> dict[int, Any]:
    """PID of registered person ``n``: the clinic's number, a SNILS, a distinct name, birth
    date and mobile number (people who share identifiers would all be one candidate block
    for the master patient index, which a city's people are not)."""
    rng = random.Random(n)
    snils = random_snils(rng).replace("-", "").replace(" ", "")
    return lab_pid(
        pid_3=[
            (f"{7_000_000 + n}", "", "", (MO_NAMESPACE, "", ""), "MR"),
            (snils, "", "", ("", SNILS_OID, "ISO"), "SNILS"),
        ],
        pid_5=(rng.choice(FAMILIES), rng.choice(GIVEN), f"Тест{n}", "", "", "", "L"),
        pid_7=f"{rng.randint(1940, 2005)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}",
        pid_13=("", "PRN", "CP", "", "7", "921", f"{1_000_000 + n:07d}"),
    )


def results(n: int, patients: int, seed: int) -> list[bytes]:
    """``n`` ORU^R01 messages, each a new order (and specimen) of a random registered
    person."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        who = rng.randrange(patients)
        out.append(
            oru_message(
                "cbc" if i % 2 else "biochem",
                control_id=f"B{seed}-{i:07d}",
                pid=person_pid(who),
                obr={
                    2: (f"GP-{seed}-{i:07d}", MO_NAMESPACE),
                    3: (f"L-{seed}-{i:07d}", LAB_FACILITY),
                },
                spm={  # each sample its own tube (one shared id made every message a new version)
                    1: "1",
                    2: ((f"S-{seed}-{i:07d}", LAB_FACILITY),),
                    4: ("BLD", "Whole blood", "HL70487"),
                    17: "20250301083000",
                    18: "20250301091000",
                },
            )
        )
    return out


def setup(data_dir: Path, patients: int) -> None:
    """Registry and registered people, through the same services the listener uses."""
    from hie.adapters.hl7_listener import Hl7Listener
    from hie.fhir.service import FhirService
    from hie.hub import logging as hlog
    from hie.hub.runtime import open_hub
    from hie.registries.patient_index import attach_mpi

    hlog.configure("WARNING", "console")
    settings = load_settings(data_dir=data_dir)
    hub = open_hub(settings)
    hub.store.migrate()
    svc = FhirService(hub.store, settings)
    mpi = attach_mpi(svc)
    assert mpi is not None
    svc.transaction(as_transaction(lab_registry()), "")
    listener = Hl7Listener(svc, mpi, hub.rejected, workers=1)
    for n in range(patients):
        raw = adt_message(
            "A04",
            pid=person_pid(n),
            sending_application="MIS",
            sending_facility=MO_NAMESPACE,
            control_id=f"ADT{n}",
        )
        out = listener.apply(raw)
        if out.code != "AA":
            raise RuntimeError(f"registering person {n}: {out.code} {out.errors}")
        if n % 200 == 0:
            print(f"\r  registered {n:,} people", end="", flush=True)
    print(f"\r  registered {patients:,} people")
    listener.close()
    hub.close()


def profile(data_dir: Path, messages: list[bytes]) -> str:
    """cProfile of the listener applying ``messages`` in process: the top of the profile."""
    from hie.adapters.hl7_listener import Hl7Listener
    from hie.fhir.service import FhirService
    from hie.hub.runtime import open_hub
    from hie.registries.patient_index import attach_mpi

    settings = load_settings(data_dir=data_dir)
    hub = open_hub(settings)
    svc = FhirService(hub.store, settings)
    mpi = attach_mpi(svc)
    assert mpi is not None
    listener = Hl7Listener(svc, mpi, hub.rejected, workers=1)
    prof = cProfile.Profile()
    prof.enable()
    for raw in messages:
        listener.apply(raw)
    prof.disable()
    listener.close()
    hub.close()
    buf = StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(
        "hie/(lab_exchange|adapters|fhir|registries|hub/store)", 25
    )
    return buf.getvalue()


def load(port: int, msgs: list[bytes], connections: int, rate: float | None) -> LoadResult:
    """Send ``msgs`` over ``connections`` MLLP clients, each waiting for every ACK."""
    return asyncio.run(
        run_load("127.0.0.1", port, split(msgs, connections), rate=rate, timeout=120)
    )


def echo(msgs: list[bytes], connections: int) -> LoadResult:
    """The same load against the bare echo server, in this process's event loop."""

    async def go() -> LoadResult:
        server = await start_echo_server("127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            return await run_load("127.0.0.1", port, split(msgs, connections), timeout=60)
        finally:
            server.close()
            await server.wait_closed()

    return asyncio.run(go())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--messages", type=int, default=3000)
    ap.add_argument("--connections", type=int, default=4)
    ap.add_argument("--patients", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--profile", action="store_true", help="also profile the listener")
    ap.add_argument("--work", type=Path, default=None, help="data dir parent (kept)")
    args = ap.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="hie-bench-lab-"))
    data_dir = work / "var"
    data_dir.mkdir(parents=True, exist_ok=True)
    print(f"setting up {args.patients:,} registered people in {data_dir} …")
    setup(data_dir, args.patients)
    full = results(args.messages, args.patients, args.seed)
    half_msgs = results(max(args.messages // 2, 100), args.patients, args.seed + 1)
    port = free_port()
    # the hub as `hie serve` runs it (HTTP, MLLP, outbox worker with the alerts); the MLLP
    # listener starts before the HTTP one, so it listens once the hub answers /healthz
    url = f"sqlite:///{data_dir / 'hie.db'}"
    with hub_server(data_dir, url, HIE_MLLP_PORT=str(port), HIE_HTTP_WORKERS="1"):
        print(f"sustained load: {len(full):,} messages, {args.connections} connections …")
        sustained = load(port, full, args.connections, None)
        half_rate = sustained.rate / 2
        print(f"latency at half load ({half_rate:,.0f} msg/s) …")
        half = load(port, half_msgs, args.connections, half_rate)
    print("ceiling: the bare echo server …")
    ceiling = echo(full, args.connections)
    prof_text = ""
    if args.profile:
        prof_text = profile(data_dir, results(200, args.patients, args.seed + 2))

    ok = sustained.codes.get("AA", 0)
    print(
        f"\nLab exchange over MLLP — {len(full):,} ORU^R01 (10 OBX each), "
        f"{args.connections} connections, SQLite synchronous=FULL, {os.cpu_count()} cores"
    )
    head = f"{'measure':<42} {'hub':>12} {'echo':>12} {'target':>12}"
    print(head)
    print("-" * len(head))
    print(
        f"{'sustained messages/s (ACK after commit)':<42} {sustained.rate:>12,.0f} "
        f"{ceiling.rate:>12,.0f} {'≥ 1,000':>12}"
    )
    print(f"{'results (OBX) /s':<42} {sustained.rate * 10:>12,.0f} {'':>12} {'≥ 10,000':>12}")
    print(f"{'hub as a share of the ceiling':<42} {sustained.rate / ceiling.rate:>12.1%}")
    for p in (50, 95, 99):
        tgt = "≤ 50 ms" if p == 99 else ""
        print(
            f"{f'ACK latency p{p} at half load, ms':<42} {half.percentile(p) * 1000:>12.1f} "
            f"{ceiling.percentile(p) * 1000:>12.2f} {tgt:>12}"
        )
    print(f"{'MSA-1 AA / all':<42} {ok:>6,} / {sustained.count:,}")
    if sustained.errors or half.errors:
        print("errors:", (sustained.errors + half.errors)[:5])
    if prof_text:
        print("\nprofile of the listener in process (200 messages, cumulative):")
        print(prof_text)
    line = {
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "messages": len(full),
        "connections": args.connections,
        "patients": args.patients,
        "sustained_per_s": round(sustained.rate, 1),
        "ceiling_per_s": round(ceiling.rate, 1),
        "half_load_per_s": round(half.rate, 1),
        "half_p50_ms": round(half.percentile(50) * 1000, 2),
        "half_p95_ms": round(half.percentile(95) * 1000, 2),
        "half_p99_ms": round(half.percentile(99) * 1000, 2),
        "codes": dict(sustained.codes),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(line) + "\n")
    print(f"appended to {RESULTS}")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
