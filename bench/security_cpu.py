"""What access control and audit cost in CPU (issue #5), measured in process: the hub's ASGI
app called directly, without an HTTP server, security on and off, in alternating turns.

``bench/security.py`` gives the figures the issue's targets are about (p95 latency and
throughput of a served hub), but on a two-core machine whose speed drifts by tens of percent
within minutes, two runs of the same code differ by several points there. This one answers
"did my change make security cheaper?" (to within a few tens of µs per request; the served
figures move by more than that): it measures the process's CPU time per request
(``time.process_time``: every thread, so the thread pool the routes run in is counted) with
one request at a time, both apps in the same process over the same data, in many short
alternating turns. The audit records a secured turn wrote are chained and indexed at the
end of that turn, inside its time (as ``hie serve``'s own process does for its HTTP
workers).

The requests are ``bench/security.py``'s: reads of random stored Observations and searches
``Observation?subject=…&code=…`` for random patients, as a clinician of an MO treating every
patient (so the care-relationship and consent conditions are evaluated in every query).

Prints a table and appends one JSON line to ``bench/results/security_cpu.jsonl``.

    .venv/bin/python bench/security_cpu.py                      # 200,000 Observations
    .venv/bin/python bench/security_cpu.py --work /tmp/sec --reuse   # the data of a run before
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from security import MO, add_data_arguments, bench_data, request_path  # noqa: E402

from hie.fhir.app import create_app  # noqa: E402
from hie.hub.auth import DevTokenIssuer  # noqa: E402
from hie.hub.logging import configure  # noqa: E402
from hie.hub.settings import load_settings  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "security_cpu.jsonl"

App = Any


async def call(app: App, path: str, query: str, headers: list[tuple[bytes, bytes]]) -> None:
    """One GET through the ASGI app; fails unless it is answered 200."""
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "GET",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": query.encode(),
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1:8080"), (b"accept", b"application/fhir+json"), *headers],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8080),
        "state": {},
    }
    status: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            status.append(message["status"])

    await app(scope, receive, send)
    if status != [200]:
        raise RuntimeError(f"GET {path}?{query} answered {status}")


async def turns(
    apps: dict[str, tuple[App, list[tuple[bytes, bytes]]]],
    settle: dict[str, Callable[[], object]],
    requests: dict[str, list[tuple[str, str]]],
    n_turns: int,
    per_turn: int,
) -> dict[str, dict[str, float]]:
    """CPU µs per request of each app and kind, the apps alternating turn by turn.
    ``settle[mode]`` runs at the end of each of that app's turns, inside its time: the
    secured app's audit records are chained and indexed there, not by a background thread
    whose work would fall into whichever turn it happened to run in."""
    spent = {kind: dict.fromkeys(apps, 0.0) for kind in requests}
    for reqs in requests.values():  # warm both: caches, connections, the token
        for app, headers in apps.values():
            for path, query in reqs[:200]:
                await call(app, path, query, headers)
    for t in range(n_turns):
        for kind, reqs in requests.items():
            order = list(apps) if t % 2 == 0 else list(apps)[::-1]
            for mode in order:
                app, headers = apps[mode]
                start = random.randrange(len(reqs) - per_turn)
                cpu = time.process_time()
                for path, query in reqs[start : start + per_turn]:
                    await call(app, path, query, headers)
                settle.get(mode, lambda: None)()
                spent[kind][mode] += time.process_time() - cpu
    total = n_turns * per_turn
    return {k: {m: v / total * 1e6 for m, v in by.items()} for k, by in spent.items()}


def _split(url: str) -> tuple[str, str]:
    path, _, query = url.partition("?")
    return path, query


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_data_arguments(ap)
    ap.add_argument("--turns", type=int, default=12)
    ap.add_argument("--requests", type=int, default=500, help="per kind, per mode, per turn")
    ap.add_argument("--reuse", action="store_true", help="keep the data --work already holds")
    args = ap.parse_args()

    os.environ.update(HIE_LOG_LEVEL="WARNING", HIE_WORKER="false")
    configure("WARNING", "console")
    data_dir, url, pids, obs = bench_data(args, "hie-bench-security-cpu-", reuse=args.reuse)
    rng = random.Random(args.seed)
    n = max(2 * args.requests, 2_000)
    requests = {
        kind: [_split(request_path(kind, rng, obs, pids)) for _ in range(n)]
        for kind in ("read", "search")
    }
    common = {"data_dir": data_dir, "database_url": url, "rate_limit_per_second": 100_000.0}
    on = create_app(load_settings(**common, audit_chain=False), start_worker=False)
    off = create_app(load_settings(**common, auth_enabled=False), start_worker=False)
    token = DevTokenIssuer(load_settings(data_dir=data_dir)).issue("clinician", org=MO, ttl=3600)
    apps = {"on": (on, [(b"authorization", f"Bearer {token}".encode())]), "off": (off, [])}
    random.seed(args.seed)
    settle = {"on": on.state.hub.audit.index_refs}
    cpu = asyncio.run(turns(apps, settle, requests, args.turns, args.requests))
    for app in (on, off):
        app.state.hub.close()

    print(
        f"\nSecurity's CPU in process — {args.observations:,} Observations, one request at a "
        f"time, {args.turns} alternating turns of {args.requests}; token: clinician"
    )
    head = f"{'request':<34} {'security on':>12} {'off':>10} {'added':>10} {'added %':>9}"
    print(head)
    print("-" * len(head))
    for kind, label in (("read", "GET Observation/{id}"), ("search", "Observation?subject&code")):
        a, b = cpu[kind]["on"], cpu[kind]["off"]
        print(f"{label + ', µs CPU':<34} {a:>12.0f} {b:>10.0f} {a - b:>+10.0f} {a / b - 1:>+9.1%}")
    line = {
        "bench": "security_cpu",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "args": {k: str(v) for k, v in vars(args).items()},
        "results": {
            kind: {"on_us": v["on"], "off_us": v["off"], "added_us": v["on"] - v["off"]}
            for kind, v in cpu.items()
        },
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(line) + "\n")
    print(f"appended to {RESULTS}")


if __name__ == "__main__":
    main()
