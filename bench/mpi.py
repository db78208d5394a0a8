"""Master patient index on the hub's store (issue #4): ingest throughput, ``$match`` latency and
auto-link quality with 1,000,000 golden patients, on the embedded default (SQLite,
``synchronous=FULL``).

Everything goes through the real service path, in process (no HTTP unless said):
``FhirService`` with :func:`~hie.registries.patient_index.attach_mpi`, so each source Patient
is matched, linked and its golden record rewritten inside the write transaction.

1. Seeds ``--n`` people (default 1,000,000): ``hie.demo.Generator`` patients (the same people
   as ``bench/mpi_engine.py`` for the same ``--seed``), the first MO's records, POSTed in
   transaction Bundles of ``--batch``. Every seeded record is another person, so each
   auto-link made while seeding is a false link: golden records vs ``--n`` says how many.
   Seeding resumes in a kept ``--data-dir`` (the committed records are found in the store).
2. Match throughput, the issue's "≥ 2,000 incoming patients/s": ``--decide`` labelled records
   through ``MasterPatientIndex.decide_many`` — features, blocking keys, candidates read from
   the store's identity index, scoring, decision; the matching step of every write, nothing
   persisted — in ``--decide-workers`` processes, each on its own connection.
3. Ingest (matching plus persisting: the source record, its links and keys, the rewritten
   golden record, the journal, ``synchronous=FULL`` commits): ``--queries`` labelled records
   from other MOs (true matches with typo, transliteration and swapped-date variants; new
   people and hard non-matches — namesakes, twins, same name and birth date with another
   SNILS; built by ``bench/mpi_engine.py``'s generator) in transaction Bundles of
   ``--batch``, timed; then ``--single`` more, one ``FhirService.create`` each (an MLLP ADT
   feed writes one message at a time).
4. Quality: each ingested record's identity group and journalled decision against the golden
   person it truly is: precision and recall of auto-link, share sent to review, per kind.
5. ``Patient/$match``: ``--match-queries`` calls of ``MasterPatientIndex.match`` (in process)
   with other labelled records, p50/p95/p99; ``--http-match`` more through the FastAPI app
   (``fastapi.testclient``: ASGI in process, no socket).

Prints a table (targets beside measured values) and appends one JSON line to
``bench/results/mpi.jsonl``.

    .venv/bin/python bench/mpi.py                               # 1,000,000 people (long)
    .venv/bin/python bench/mpi.py --n 20000 --queries 2000      # quick
    .venv/bin/python bench/mpi.py --n 300000 --data-dir /var/tmp/mpi --keep-seed
    .venv/bin/python bench/mpi.py --n 100000 --profile /tmp/ingest.prof   # cProfile, step 2
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import hashlib
import io
import json
import os
import platform
import pstats
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent))

from mpi_engine import (  # noqa: E402 - the labelled generator of the engine benchmark
    ROOT,
    _has_snils,
    _swappable,
    make_stream,
    progress,
    true_match,
    true_nonmatch,
)
from sqlalchemy import text  # noqa: E402

from hie.demo import Generator, as_transaction  # noqa: E402
from hie.fhir.service import FhirService  # noqa: E402
from hie.hub.auth import DevTokenIssuer  # noqa: E402
from hie.hub.settings import Settings, load_settings  # noqa: E402
from hie.hub.store import open_resource_store  # noqa: E402
from hie.hub.store.port import ResourceStore  # noqa: E402
from hie.registries.patient_index import MasterPatientIndex, attach_mpi  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "mpi.jsonl"
STATE = "mpi-bench.json"  # in the data dir: what has been seeded, and whether it was used
SNAPSHOT = "seeded.db"  # in the data dir: the database as seeding left it (--keep-seed)
BASE = "http://hub.bench/fhir"
P = "Patient"

TARGETS = {
    "ingest_per_s": 2000.0,
    "match_p95_ms": 30.0,
    "precision": 0.999,
    "recall": 0.98,
}


@dataclass
class Incoming:
    """One labelled record from another MO, and what the hub made of it."""

    cls: str  # "match" (a seeded person) or "nonmatch" (someone else)
    kind: str  # the variant (typo, translit:icao, …) or the kind of non-match (twin, …)
    person: int | None  # index of the seeded person it truly is (for "match")
    tags: list[str]
    record: dict[str, Any]
    path: str = ""  # "bundle" or "single"
    source_id: str = ""


@dataclass
class Seeded:
    """Result of seeding: ids of the seeded persons the streams refer to, and timings."""

    ids: dict[int, str]  # person index → its source Patient id
    kept: dict[int, dict[str, Any]]  # person index → the record as generated
    seconds: float  # spent seeding in this run
    resumed_from: int
    marks: list[tuple[int, float]] = field(default_factory=list)  # (seeded, elapsed s)


def pct(values: Sequence[float], p: float) -> float | None:
    """The ``p``-th percentile (nearest rank) of ``values`` (None when there are none)."""
    s = sorted(values)
    if not s:
        return None
    k = max(0, min(len(s) - 1, round(p / 100 * (len(s) - 1))))
    return s[k]


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def num(value: float | None, spec: str) -> str:
    """``value`` formatted, or a dash when it was not measured."""
    return "–" if value is None else format(value, spec)


def at_least(value: float | None, target: float) -> bool | None:
    return None if value is None else value >= target


def transaction_of(records: Iterable[dict[str, Any]], gen: Generator) -> dict[str, Any]:
    """A transaction Bundle POSTing each record (server-assigned ids, as an MO sends)."""
    return {
        "resourceType": "Bundle",
        "type": "transaction",
        "entry": [
            {
                "fullUrl": f"urn:uuid:{gen.uuid()}",
                "resource": r,
                "request": {"method": "POST", "url": P},
            }
            for r in records
        ],
    }


def created_ids(response: dict[str, Any]) -> list[str]:
    """Logical ids from a transaction-response Bundle (``Patient/<id>/_history/1``)."""
    return [e["response"]["location"].split("/")[1] for e in response["entry"]]


# --- the hub -----------------------------------------------------------------------------


def open_service(data_dir: Path) -> tuple[Settings, ResourceStore, FhirService, MasterPatientIndex]:
    """The embedded default: SQLite in ``data_dir``, migrated, with the MPI attached."""
    settings = load_settings(data_dir=data_dir, database_url=f"sqlite:///{data_dir / 'hie.db'}")
    data_dir.mkdir(parents=True, exist_ok=True)
    store = open_resource_store(
        settings.database_url, sqlite_synchronous=settings.sqlite_synchronous
    )
    store.migrate()
    svc = FhirService(store, settings)
    mpi = attach_mpi(svc)
    if mpi is None:
        raise SystemExit("HIE_MPI_ENABLED is off in the environment: nothing to benchmark")
    return settings, store, svc, mpi


def sql(store: ResourceStore, query: str, **params: Any) -> list[Any]:
    """Rows of a read-only query on the store's database (counts for the report)."""
    engine = store.engine  # type: ignore[attr-defined]
    with engine.connect() as conn:
        return list(conn.execute(text(query), params))


def pragmas(store: ResourceStore) -> dict[str, Any]:
    """What the store's connections run with (``synchronous`` 2 = FULL)."""
    names = {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}
    engine = store.engine  # type: ignore[attr-defined]
    with engine.connect() as conn:
        sync = conn.exec_driver_sql("PRAGMA synchronous").scalar()
        mode = conn.exec_driver_sql("PRAGMA journal_mode").scalar()
    return {
        "synchronous": names.get(int(sync or 0), str(sync)),
        "journal_mode": mode,
        "sqlite": sqlite3.sqlite_version,
    }


def db_bytes(data_dir: Path) -> int:
    """Size of the database with its write-ahead log."""
    return sum(
        p.stat().st_size for p in data_dir.glob("hie.db*") if p.is_file() and "lock" not in p.name
    )


def identity_counts(store: ResourceStore) -> dict[str, Any]:
    """Golden records, source records, groups holding several sources, decisions, Tasks."""
    one = "SELECT count(*) FROM identity_links WHERE rtype = 'Patient' AND "
    golden = sql(store, one + "features IS NULL AND id = group_id")[0][0]
    sources = sql(store, one + "features IS NOT NULL")[0][0]
    shared = sql(
        store,
        "SELECT count(*), coalesce(sum(c), 0) FROM (SELECT count(*) AS c FROM identity_links "
        "WHERE rtype = 'Patient' AND features IS NOT NULL GROUP BY group_id HAVING c > 1)",
    )[0]
    decisions = sql(
        store,
        "SELECT json_extract(CAST(body AS TEXT), '$.decision'), count(*) FROM identity_log "
        "WHERE rtype = 'Patient' AND kind = 'match' GROUP BY 1",
    )
    tasks = sql(store, "SELECT count(*) FROM resources WHERE rtype = 'Task'")[0][0]
    return {
        "golden": golden,
        "sources": sources,
        "groups_with_several_sources": shared[0],
        "sources_in_such_groups": shared[1],
        "decisions": {str(d): c for d, c in decisions},
        "tasks": tasks,
    }


# --- seeding -----------------------------------------------------------------------------


def read_state(data_dir: Path) -> dict[str, Any]:
    path = data_dir / STATE
    return json.loads(path.read_text()) if path.exists() else {}


def write_state(data_dir: Path, **state: Any) -> None:
    path = data_dir / STATE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    tmp.replace(path)


def prepare_data_dir(data_dir: Path, args: argparse.Namespace) -> None:
    """Refuse to reuse a database the streams already went into, unless a snapshot of the
    seeded database can be restored."""
    state = read_state(data_dir)
    if not state:
        if (data_dir / "hie.db").exists():
            raise SystemExit(f"{data_dir} holds a database this benchmark did not make")
        return
    if state.get("seed") != args.seed or state.get("n", 0) > args.n:
        raise SystemExit(
            f"{data_dir} was seeded with seed {state.get('seed')} and n {state.get('n')}: "
            "use another --data-dir"
        )
    if state.get("phase") == "used":
        snap = data_dir / SNAPSHOT
        if not snap.exists():
            raise SystemExit(f"{data_dir} was used by a run and has no {SNAPSHOT}: start afresh")
        progress(f"restoring the seeded database from {snap} …")
        for p in data_dir.glob("hie.db*"):
            if "lock" not in p.name:
                p.unlink()
        shutil.copyfile(snap, data_dir / "hie.db")
        os.sync()  # the copy's writeback would otherwise compete with the timed commits
        write_state(data_dir, **{**state, "phase": "seeded"})


def committed_sources(store: ResourceStore) -> list[str]:
    """Source Patients already in the store, in the order they were seeded (their rowids:
    a bundle's creates are inserted in entry order, golden records after them)."""
    rows = sql(
        store,
        "SELECT r.id FROM resources r JOIN identity_links l ON l.rtype = r.rtype AND l.id = r.id "
        "WHERE r.rtype = 'Patient' AND l.features IS NOT NULL ORDER BY r.rid",
    )
    return [str(r[0]) for r in rows]


def seed(
    svc: FhirService,
    store: ResourceStore,
    data_dir: Path,
    args: argparse.Namespace,
    keep: set[int],
) -> Seeded:
    """POST ``args.n`` generated people in transaction Bundles; resume what is committed."""
    gen = Generator(args.seed)
    ids_gen = Generator(args.seed + 2_000_003)  # fullUrls, kept apart from the people
    state = read_state(data_dir)
    done: list[str] = committed_sources(store) if state else []
    if len(done) > args.n:
        raise SystemExit(f"{data_dir} holds {len(done):,} sources, more than --n {args.n:,}")
    ids: dict[int, str] = {}
    kept: dict[int, dict[str, Any]] = {}
    for i in range(len(done)):  # the generator's stream up to where seeding stopped
        p = gen.patient()
        if i in keep:
            kept[i] = p
            ids[i] = done[i]
    start = len(done)
    if start:
        progress(f"resuming: {start:,} of {args.n:,} people already seeded")
    write_state(data_dir, seed=args.seed, n=args.n, phase="seeding")
    t0 = time.perf_counter()
    last = t0
    marks: list[tuple[int, float]] = []
    step = max(args.batch, args.n // 10)
    i = start
    while i < args.n:
        chunk = []
        for j in range(i, min(i + args.batch, args.n)):
            p = gen.patient()
            if j in keep:
                kept[j] = orjson.loads(orjson.dumps(p))  # the service stamps id and meta
            chunk.append(p)
        out = svc.transaction(transaction_of(chunk, ids_gen), BASE)
        for j, sid in enumerate(created_ids(out), start=i):
            if j in keep:
                ids[j] = sid
        before, i = i, i + len(chunk)
        now = time.perf_counter()
        if i // step != before // step or i == args.n:
            marks.append((i, now - t0))
        if now - last >= 15 or i == args.n:
            rate = (i - start) / (now - t0)
            eta = (args.n - i) / rate if rate else 0
            progress(
                f"  seeded {i:,}/{args.n:,} ({rate:,.0f} patients/s, "
                f"elapsed {(now - t0) / 60:.1f} min, left ~{eta / 60:.1f} min)"
            )
            last = now
    seconds = time.perf_counter() - t0
    write_state(data_dir, seed=args.seed, n=args.n, phase="seeded")
    return Seeded(ids, kept, seconds, start, marks)


# --- the labelled streams ----------------------------------------------------------------


def labelled(
    plan: Sequence[tuple[str, str, int | None]],
    kept: dict[int, dict[str, Any]],
    rng: random.Random,
    seed: int,
) -> list[Incoming]:
    """Records for ``plan`` (as ``bench/mpi_engine.py`` builds its stream)."""
    fresh = Generator(seed + 1_000_003)
    swappable = [i for i in sorted(kept) if _swappable(kept[i])]
    with_snils = [i for i in sorted(kept) if _has_snils(kept[i])]
    out: list[Incoming] = []
    for cls, kind, g in plan:
        if cls == "match":
            assert g is not None
            if "swap" in kind and not _swappable(kept[g]):
                g = rng.choice(swappable)
            try:
                rec, tags = true_match(kept[g], kind, rng, fresh)
            except ValueError:  # no typo applies to this name: send it as is
                rec, tags = true_match(kept[g], "exact", rng, fresh)
                kind = "exact"
            out.append(Incoming(cls, kind, g, tags, rec))
        else:
            golden = kept.get(g) if g is not None else None
            if kind == "same-name-and-birth-date-other-snils" and golden is not None:
                if not _has_snils(golden):
                    golden = kept[rng.choice(with_snils)]
            rec, tags = true_nonmatch(golden, kind, rng, fresh)
            out.append(Incoming(cls, kind, None, tags, rec))
    return out


# --- ingest ------------------------------------------------------------------------------


def ingest_bundles(svc: FhirService, items: list[Incoming], batch: int, seed: int) -> list[float]:
    """Send ``items`` in transaction Bundles; the seconds each Bundle took."""
    ids_gen = Generator(seed + 3_000_017)
    took: list[float] = []
    last = time.perf_counter()
    for k in range(0, len(items), batch):
        part = items[k : k + batch]
        bundle = transaction_of((it.record for it in part), ids_gen)
        t = time.perf_counter()
        out = svc.transaction(bundle, BASE)
        took.append(time.perf_counter() - t)
        for it, sid in zip(part, created_ids(out), strict=True):
            it.source_id, it.path = sid, "bundle"
        if time.perf_counter() - last >= 15:
            done = k + len(part)
            progress(f"  ingested {done:,}/{len(items):,} ({done / sum(took):,.0f}/s)")
            last = time.perf_counter()
    return took


def ingest_single(svc: FhirService, items: list[Incoming]) -> list[float]:
    """``FhirService.create`` per record (one transaction and commit each)."""
    took: list[float] = []
    for it in items:
        t = time.perf_counter()
        res = svc.create(it.record, P)
        took.append(time.perf_counter() - t)
        it.source_id, it.path = res.stored.id, "single"
    return took


def profiled(fn: Any, path: str, *a: Any) -> Any:
    """Run ``fn(*a)`` under cProfile; save the stats to ``path``, print the top 25 by
    cumulative and by own time to stderr."""
    prof = cProfile.Profile()
    result = prof.runcall(fn, *a)
    prof.dump_stats(path)
    for order in ("cumulative", "tottime"):
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).strip_dirs().sort_stats(order).print_stats(25)
        progress(f"\n--- ingest profile, top 25 by {order} ({path}) ---\n{buf.getvalue()}")
    return result


# --- quality -----------------------------------------------------------------------------


def _who(features: bytes | None) -> str:
    """A member's matching features in one line (for the error listing)."""
    if features is None:
        return "(golden)"
    f = orjson.loads(features)
    family, given, middle = f.get("names") or ["", "", ""]
    ids = ",".join(
        f"{system.rsplit('/', 1)[-1]}={value}" for system, value in f.get("identifiers") or []
    )
    return f"{family} {given} {middle} {f.get('birth_date')} {f.get('gender')} [{ids}]"


def judge(
    store: ResourceStore, items: list[Incoming], seeded_ids: dict[int, str], show: int = 0
) -> dict[str, Any]:
    """Compare what the index did with each record to who the record truly is; explain the
    first ``show`` wrong auto-links and missed true matches."""
    outcomes: list[tuple[Incoming, str, str]] = []  # (item, label, rule)
    errors: list[dict[str, Any]] = []
    in_ranked = 0
    rules: Counter[str] = Counter()
    with store.identity_reader() as idx:
        truth = {
            g: idx.group_of(P, seeded_ids[g]) for g in {it.person for it in items} if g is not None
        }
        for it in items:
            group = idx.group_of(P, it.source_id)
            entry = idx.journal(P, id=it.source_id, kind="match", limit=1)
            body = orjson.loads(entry[0].body) if entry else {"decision": "none"}
            decision = str(body["decision"])
            label = decision
            true_group = truth.get(it.person) if it.person is not None else None
            if decision == "auto-link":
                ok = it.cls == "match" and group is not None and group == true_group
                label = "auto-link" if ok else "auto-link-wrong"
            if it.cls == "match" and any(r.get("golden") == true_group for r in body["ranked"]):
                in_ranked += 1
            rules[f"{it.cls}:{body.get('rule')}:{label}"] += 1
            outcomes.append((it, label, str(body.get("rule"))))
            wrong = label == "auto-link-wrong" or (it.cls == "match" and label != "auto-link")
            if wrong and len(errors) < show:
                cand = body.get("candidate")
                errors.append(
                    {
                        "record": f"{it.cls}:{it.kind} {' '.join(it.tags)} via {it.path}",
                        "decision": f"{decision} {body.get('rule')} {body.get('score', 0):.1f}"
                        + (" ambiguous" if body.get("ambiguous") else ""),
                        "ranked": body.get("ranked"),
                        "incoming": _who(next(iter(idx.records(P, [it.source_id]))).features),
                        "candidate": cand,
                        "true_group": true_group,
                        "candidate_members": [
                            _who(m.features) for m in (idx.members(P, cand) if cand else [])
                        ],
                        "details": body.get("details"),
                    }
                )
    n_match = sum(1 for it, _, _ in outcomes if it.cls == "match")
    tp = sum(1 for it, lab, _ in outcomes if it.cls == "match" and lab == "auto-link")
    fp = sum(1 for _, lab, _ in outcomes if lab == "auto-link-wrong")
    review = sum(1 for _, lab, _ in outcomes if lab == "review")
    per_kind: dict[str, Counter[str]] = defaultdict(Counter)
    for it, lab, _ in outcomes:
        per_kind[f"{it.cls}:{it.kind}"][lab] += 1
        if it.cls == "match":
            per_kind[f"match:{it.tags[-1]}"][lab] += 1
        per_kind[f"path:{it.path}"][lab] += 1
    return {
        "records": len(outcomes),
        "true_matches": n_match,
        "precision": tp / (tp + fp) if tp + fp else 1.0,
        "recall": tp / n_match if n_match else 1.0,
        "review_share": review / len(outcomes) if outcomes else 0.0,
        "false_auto_links": fp,
        "true_auto_links": tp,
        "reviewed": review,
        "true_golden_among_ranked": in_ranked / n_match if n_match else 1.0,
        "per_kind": {k: dict(v) for k, v in sorted(per_kind.items())},
        "per_rule": dict(sorted(rules.items())),
        "errors": errors,
    }


# --- $match ------------------------------------------------------------------------------


def match_latency(
    mpi: MasterPatientIndex, store: ResourceStore, items: list[Incoming], ids: dict[int, str]
) -> dict[str, Any]:
    """``MasterPatientIndex.match`` per record, in process; timings and what it answered."""
    with store.identity_reader() as idx:
        truth = {g: idx.group_of(P, ids[g]) for g in {i.person for i in items} if g is not None}
    warm = min(20, len(items) // 10)
    lat: list[float] = []
    answers: Counter[str] = Counter()
    for n, it in enumerate(items):
        t = time.perf_counter()
        found = mpi.match(it.record, count=10)
        dt = time.perf_counter() - t
        if n >= warm:
            lat.append(dt)
        top = found[0] if found else None
        if it.cls == "match":
            true_group = truth.get(it.person) if it.person is not None else None
            if top is not None and top.golden.id == true_group:
                answers[f"match:top-is-true:{top.grade}"] += 1
            elif any(g.golden.id == true_group for g in found):
                answers["match:true-below-top"] += 1
            else:
                answers["match:true-not-found"] += 1
        else:
            answers[f"nonmatch:top:{top.grade if top else 'none'}"] += 1
    return {
        "calls": len(lat),
        "p50_ms": ms(pct(lat, 50)),
        "p95_ms": ms(pct(lat, 95)),
        "p99_ms": ms(pct(lat, 99)),
        "max_ms": max(lat) * 1000 if lat else None,
        "answers": dict(sorted(answers.items())),
    }


def http_match_latency(settings: Settings, items: list[Incoming]) -> dict[str, Any]:
    """``POST /fhir/Patient/$match`` through the app (ASGI in process: no socket)."""
    from fastapi.testclient import TestClient

    from hie.fhir.app import create_app

    app = create_app(settings, start_worker=False)
    lat: list[float] = []
    warm = min(20, len(items) // 10)
    token = DevTokenIssuer(settings).issue("service")
    headers = {"Content-Type": "application/fhir+json", "Authorization": f"Bearer {token}"}
    with TestClient(app, base_url="http://hub.bench") as client:
        for n, it in enumerate(items):
            body = {"resourceType": "Parameters", "parameter": [{"name": "resource"}]}
            body["parameter"][0]["resource"] = it.record
            t = time.perf_counter()
            r = client.post("/fhir/Patient/$match", content=orjson.dumps(body), headers=headers)
            dt = time.perf_counter() - t
            r.raise_for_status()
            if n >= warm:
                lat.append(dt)
    return {
        "calls": len(lat),
        "p50_ms": ms(pct(lat, 50)),
        "p95_ms": ms(pct(lat, 95)),
        "p99_ms": ms(pct(lat, 99)),
    }


# --- match throughput ------------------------------------------------------------------------


def _decide_worker(data_dir: Path, records: list[dict[str, Any]]) -> tuple[float, dict[str, int]]:
    """One process: ``decide_many`` over ``records`` in chunks; its elapsed seconds and what
    it decided (the store is opened before the clock starts)."""
    _, store, _, mpi = open_service(data_dir)
    mpi.decide_many(records[:50])  # warm the caches and the connection
    decided: Counter[str] = Counter()
    t0 = time.perf_counter()
    for i in range(0, len(records), 1000):
        for r in mpi.decide_many(records[i : i + 1000]):
            decided[r.decision] += 1
    took = time.perf_counter() - t0
    store.close()
    return took, dict(decided)


def match_throughput(data_dir: Path, items: list[Incoming], workers: int) -> dict[str, Any]:
    """The matching step alone (features, blocking keys, candidates from the store, scoring,
    decision; nothing written): ``MasterPatientIndex.decide_many`` in ``workers`` processes,
    each with its own connection, as a hub's request workers would."""
    import multiprocessing

    records = [it.record for it in items]
    chunks = [records[w::workers] for w in range(workers)]
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers) as pool:
        outs = pool.starmap(_decide_worker, [(data_dir, c) for c in chunks])
    wall = max(t for t, _ in outs)
    decided: Counter[str] = Counter()
    for _, d in outs:
        decided.update(d)
    return {
        "records": len(records),
        "workers": workers,
        "seconds": wall,
        "patients_per_s": len(records) / wall if wall else None,
        "per_worker_per_s": [len(c) / t for c, (t, _) in zip(chunks, outs, strict=True) if t],
        "decided": dict(sorted(decided.items())),
    }


# --- the run -----------------------------------------------------------------------------


def code_version() -> dict[str, Any]:
    """The commit measured, and whether ``hie/`` differs from it (read-only git)."""

    def git(*a: str) -> str:
        try:
            out = subprocess.run(
                ["git", "-C", str(ROOT), *a], capture_output=True, text=True, timeout=30
            )
        except OSError:
            return ""
        return out.stdout.strip()

    diff = git("diff", "HEAD", "--", "hie")
    return {
        "commit": git("rev-parse", "--short", "HEAD"),
        "hie_modified": bool(git("status", "--porcelain", "--", "hie")),
        "hie_diff_sha1": hashlib.sha1(diff.encode()).hexdigest()[:12] if diff else None,
    }


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=1_000_000, help="people seeded (golden records)")
    ap.add_argument("--batch", type=int, default=500, help="Patients per transaction Bundle")
    ap.add_argument("--queries", type=int, default=20_000, help="records ingested in Bundles")
    ap.add_argument("--single", type=int, default=2_000, help="records created one at a time")
    ap.add_argument("--match-queries", type=int, default=2_000, help="in-process $match calls")
    ap.add_argument("--http-match", type=int, default=300, help="$match calls over the app")
    ap.add_argument(
        "--decide", type=int, default=20_000, help="records for the match throughput step"
    )
    ap.add_argument("--decide-workers", type=int, default=2, help="processes for that step")
    ap.add_argument("--match-share", type=float, default=0.6)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--data-dir", type=Path, default=None, help="kept (resumable); else temp")
    ap.add_argument(
        "--keep-seed", action="store_true", help=f"copy the seeded database to {SNAPSHOT}"
    )
    ap.add_argument(
        "--show-errors", type=int, default=10, help="explain N wrong or missed auto-links"
    )
    ap.add_argument("--results", type=Path, default=RESULTS, help="JSON lines file appended to")
    ap.add_argument(
        "--profile", default=None, help="cProfile the ingest into this file (and <file>.single)"
    )
    args = ap.parse_args()

    temp = args.data_dir is None
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="hie-bench-mpi-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    prepare_data_dir(data_dir, args)
    settings, store, svc, mpi = open_service(data_dir)
    env = pragmas(store)
    progress(
        f"data dir {data_dir} (SQLite {env['sqlite']}, synchronous={env['synchronous']}, "
        f"journal_mode={env['journal_mode']})"
    )

    total = args.queries + args.single + args.match_queries + args.http_match + args.decide
    plan, keep, rng = make_stream(args.n, total, args.seed, args.match_share)

    # the MOs whose records are sent, registered as in a deployment (their patient-number
    # systems among them); PUT with fixed ids, so a resumed run changes nothing
    svc.transaction(as_transaction(list(Generator(args.seed).city().resources())), BASE)
    progress(f"seeding {args.n:,} people in Bundles of {args.batch} …")
    seeded = seed(svc, store, data_dir, args, keep)
    after_seed = identity_counts(store)
    seed_db = db_bytes(data_dir)
    if args.keep_seed and not (data_dir / SNAPSHOT).exists():
        with store.engine.connect() as conn:  # type: ignore[attr-defined]
            conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        shutil.copyfile(data_dir / "hie.db", data_dir / SNAPSHOT)
        os.sync()
    progress(
        f"seeded: {after_seed['golden']:,} golden records for {args.n:,} people "
        f"({seeded.seconds / 60:.1f} min in this run)"
    )

    items = labelled(plan, seeded.kept, rng, args.seed)
    bundled = items[: args.queries]
    single = items[args.queries : args.queries + args.single]
    matched = items[args.queries + args.single : args.queries + args.single + args.match_queries]
    over_http = items[
        args.queries + args.single + args.match_queries : args.queries
        + args.single
        + args.match_queries
        + args.http_match
    ]
    to_decide = items[len(items) - args.decide :] if args.decide else []
    write_state(data_dir, seed=args.seed, n=args.n, phase="used")

    progress(f"match throughput: {len(to_decide):,} records, {args.decide_workers} processes …")
    decide = match_throughput(data_dir, to_decide, args.decide_workers) if to_decide else None

    progress(f"ingesting {len(bundled):,} records in Bundles of {args.batch} …")
    gc.collect()
    t0 = time.perf_counter()
    if args.profile:
        took = profiled(ingest_bundles, args.profile, svc, bundled, args.batch, args.seed)
    else:
        took = ingest_bundles(svc, bundled, args.batch, args.seed)
    bundle_s = time.perf_counter() - t0
    progress(f"ingesting {len(single):,} records one create each …")
    t0 = time.perf_counter()
    if args.profile and single:
        single_took = profiled(ingest_single, f"{args.profile}.single", svc, single)
    else:
        single_took = ingest_single(svc, single)
    single_s = time.perf_counter() - t0

    progress("judging …")
    quality = judge(store, bundled + single, seeded.ids, args.show_errors)
    after_ingest = identity_counts(store)

    progress(f"$match × {len(matched):,} in process …")
    match = match_latency(mpi, store, matched, seeded.ids)
    http = http_match_latency(settings, over_http) if over_http else None

    seeded_now = args.n - seeded.resumed_from
    res: dict[str, Any] = {
        "store": {"backend": "sqlite", **env, "db_bytes_after_seed": seed_db},
        "seed": {
            "people": args.n,
            "seeded_in_this_run": seeded_now,
            "seconds": seeded.seconds,
            "patients_per_s": seeded_now / seeded.seconds if seeded_now else None,
            "progress": [{"seeded": k, "elapsed_s": round(s, 1)} for k, s in seeded.marks],
            **after_seed,
            "false_links_while_seeding": args.n - after_seed["golden"],
        },
        "ingest": {
            "bundle": {
                "records": len(bundled),
                "seconds": bundle_s,
                "patients_per_s": len(bundled) / bundle_s if bundled else None,
                "bundle_p50_ms": ms(pct(took, 50)),
                "bundle_p95_ms": ms(pct(took, 95)),
                "profiled": bool(args.profile),
            },
            "single": {
                "records": len(single),
                "seconds": single_s,
                "patients_per_s": len(single) / single_s if single else None,
                "p50_ms": ms(pct(single_took, 50)),
                "p95_ms": ms(pct(single_took, 95)),
                "p99_ms": ms(pct(single_took, 99)),
                "profiled": bool(args.profile),
            },
            "tasks_opened": after_ingest["tasks"] - after_seed["tasks"],
        },
        "quality": quality,
        "match_throughput": decide,
        "match": match,
        "match_http": http,
        "db_bytes_at_end": db_bytes(data_dir),
    }
    store.close()

    # --- report ------------------------------------------------------------------------
    b, s1, q = res["ingest"]["bundle"], res["ingest"]["single"], quality
    print(
        f"\nMaster patient index on the store — {args.n:,} people seeded, SQLite "
        f"synchronous={env['synchronous']} ({env['journal_mode']}), in process"
    )
    head = f"{'measure':<58} {'value':>16} {'target':>10}  "
    print(head)
    print("-" * (len(head) + 4))
    target_rate = TARGETS["ingest_per_s"]
    rows = []
    if decide:
        rows.append(
            (f"match throughput ({decide['workers']} processes), patients/s",
             num(decide["patients_per_s"], ",.0f"), f"≥ {target_rate:,.0f}",
             at_least(decide["patients_per_s"], target_rate))
        )  # fmt: skip
    rows += [
        (f"ingest: Bundles of {args.batch}, patients/s", num(b["patients_per_s"], ",.0f"),
         "", None),
        ("  Bundle latency p50 / p95, ms",
         f"{num(b['bundle_p50_ms'], ',.0f')} / {num(b['bundle_p95_ms'], ',.0f')}", "", None),
        ("ingest: one create per record, patients/s", num(s1["patients_per_s"], ",.0f"),
         "", None),
        ("  create latency p50 / p95 / p99, ms",
         " / ".join(num(s1[k], ".1f") for k in ("p50_ms", "p95_ms", "p99_ms")), "", None),
        ("$match in process p50 / p95 / p99, ms",
         " / ".join(num(match[k], ".1f") for k in ("p50_ms", "p95_ms", "p99_ms")),
         f"p95 ≤ {TARGETS['match_p95_ms']:.0f}",
         None if match["p95_ms"] is None else match["p95_ms"] <= TARGETS["match_p95_ms"]),
    ]  # fmt: skip
    if http:
        rows.append(
            ("$match over the app (TestClient) p50 / p95, ms",
             f"{num(http['p50_ms'], '.1f')} / {num(http['p95_ms'], '.1f')}", "", None)
        )  # fmt: skip
    rows += [
        ("precision of auto-link", f"{q['precision']:.4f}", f"≥ {TARGETS['precision']}",
         q["precision"] >= TARGETS["precision"]),
        ("recall of auto-link", f"{q['recall']:.4f}", f"≥ {TARGETS['recall']}",
         q["recall"] >= TARGETS["recall"]),
        ("share sent to review", f"{q['review_share']:.4f}", "", None),
        ("false auto-links / true auto-links",
         f"{q['false_auto_links']} / {q['true_auto_links']}", "", None),
        ("true golden among the journalled top 5", f"{q['true_golden_among_ranked']:.4f}", "",
         None),
        ("review Tasks opened by the ingest", f"{res['ingest']['tasks_opened']:,}", "", None),
        (f"seeding: patients/s (Bundles of {args.batch})",
         num(res["seed"]["patients_per_s"], ",.0f"), "", None),
        ("seeding: time in this run, min", f"{seeded.seconds / 60:,.1f}", "", None),
        (f"seeding: golden records for {args.n:,} people", f"{after_seed['golden']:,}",
         "", None),
        ("seeding: people wrongly auto-linked to another",
         f"{res['seed']['false_links_while_seeding']:,}", "", None),
        ("seeding: review decisions (Tasks)",
         f"{after_seed['decisions'].get('review', 0):,}", "", None),
        ("database after seeding, GB", f"{seed_db / 1e9:.2f}", "", None),
    ]  # fmt: skip
    for name, value, target, ok in rows:
        mark = "" if ok is None else verdict(ok)
        print(f"{name:<58} {value:>16} {target:>10}  {mark}")
    if seeded.marks:
        print(
            "\nseeding progress (people: cumulative patients/s): "
            + ", ".join(
                f"{k:,}: {(k - seeded.resumed_from) / t:,.0f}" for k, t in seeded.marks if t
            )
        )
    cols = ["auto-link", "auto-link-wrong", "review", "new"]
    print(f"\n{'kind':<48} " + " ".join(f"{c:>15}" for c in cols))
    for kind, counts in q["per_kind"].items():
        print(f"{kind:<48} " + " ".join(f"{counts.get(c, 0):>15}" for c in cols))
    for e in q["errors"]:
        print(
            f"\n{e['record']} → {e['decision']} (golden {e['candidate']}, true {e['true_group']})"
        )
        print(f"  incoming:  {e['incoming']}")
        for m in e["candidate_members"]:
            print(f"  candidate: {m}")
        print(f"  details:   {e['details']}")
        print(f"  ranked:    {e['ranked']}")
    print("\n$match answers: " + ", ".join(f"{k} {v}" for k, v in match["answers"].items()))

    line = {
        "bench": "mpi",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": machine(),
        "code": code_version(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "results": res,
    }
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with args.results.open("a") as f:
        f.write(json.dumps(line) + "\n")
    print(f"\nappended to {args.results}")
    if temp:
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
