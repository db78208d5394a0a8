"""Document sharing (issue #7) on a real ``hie serve``: ITI-65 publish throughput with the
full-text indexing lag drained, time from publish to searchable, ITI-67 by patient and
full-text search latency.

1. A corpus of ``--documents`` generated Russian clinical documents (``hie.demo.documents``:
   discharge summaries, visit protocols, referrals, imaging reports), PDF with a text layer and
   CDA R2 in equal shares by default, body sizes log-uniform between ``--min-kb`` and
   ``--max-kb`` (many short protocols, few long inpatient summaries), for ``--patients``
   people of one clinic. Each body carries a unique case word (``case000123x``) so the bench
   can tell when that document became searchable. Generated before the clock starts.
2. ``hie serve`` on the embedded default (SQLite ``synchronous=FULL``, filesystem blobs,
   Tantivy), with its outbox worker extracting and indexing text.
3. Publish: ``--clients`` concurrent clients, each an MO's system (role ``mis``) sending ITI-65
   Provide Document Bundles (the patient's record by conditional create, submission-set List,
   DocumentReference, Binary). Throughput counts until every bundle is acknowledged and until
   the indexing lag is drained (``/healthz`` ``outbox_lag`` = 0).
4. Publish → searchable: for every ``--probe-every``-th document, from its acknowledgement
   until ``$search-text`` finds its case word (polled every 50 ms); p50/p95.
5. ITI-67 ``DocumentReference?patient=<golden id>`` and full-text ``$search-text?q=…``
   (inflected Russian words and two-word queries over the whole corpus), 2 clients; p50/p95.

Prints a table and appends one JSON line to ``bench/results/documents.jsonl``.

    .venv/bin/python bench/documents.py                       # 10,000 documents
    .venv/bin/python bench/documents.py --documents 100000    # the issue's corpus size
    .venv/bin/python bench/documents.py --documents 100000 --work /tmp/docs100k   # kept
    .venv/bin/python bench/documents.py --work /tmp/docs100k --reuse   # searches only, again
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import multiprocessing
import os
import platform
import queue
import random
import shutil
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fhir_store import AUTH, hub_server, pct  # noqa: E402

from hie.demo.documents import cda_bytes, clinical_document, pdf_bytes  # noqa: E402
from hie.hub.auth import DevTokenIssuer  # noqa: E402
from hie.hub.settings import load_settings  # noqa: E402
from tests.fixtures.documents import submission_set  # noqa: E402
from tests.fixtures.labs import GP, GP_PATIENTS, as_transaction, lab_registry  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "documents.jsonl"
FJ = {"Content-Type": "application/fhir+json"}
LOINC = "http://loinc.org"
FAMILIES = ["Иванова", "Петрова", "Смирнова", "Кузнецова", "Попова", "Васильева", "Соколова"]
GIVEN = ["Анна", "Мария", "Ольга", "Елена", "Татьяна", "Наталья", "Ирина", "Светлана"]
QUERIES = [
    "пневмонии",
    "гипертензии",
    "кашель",
    "анемией",
    "стенокардия",
    "сахарного диабета",
    "одышку нагрузке",
    "хрипы",
    "рентгенография",
    "креатинин",
    "лечение амоксициллин",
    "нетрудоспособности",
    '"общая слабость"',
    "бронхит",
    "гастрита",
    "отёки",
]
PUBLISH_FIGURES = (
    "acked_per_s",
    "drained_per_s",
    "publish_p50_ms",
    "publish_p95_ms",
    "searchable_p50_s",
    "searchable_p95_s",
)
PDF_TEXT_RATIO = 1.45  # UTF-8 Cyrillic text bytes per byte of the PDF written from it


def case_word(i: int) -> str:
    return f"case{i:07d}x"


def _make(job: tuple[int, int, int, bool, str]) -> tuple[int, int, str, int]:
    """Generate document ``i`` into ``out``: (i, patient number, content type, size)."""
    i, seed, target, is_pdf, out = job
    rng = random.Random(seed * 1_000_003 + i)
    when = datetime(2026, 1, 1, 9, tzinfo=timezone(timedelta(hours=3)))
    when += timedelta(minutes=rng.randint(0, 300 * 24 * 60))
    text_target = int(target * (PDF_TEXT_RATIO if is_pdf else 0.9))
    doc = clinical_document(rng, when, text_target)
    title = f"{doc.title}. История болезни {case_word(i)}"
    if is_pdf:
        body = pdf_bytes(f"{title}\n{doc.text()}", title=doc.title)
        ctype = "application/pdf"
    else:
        doc = doc.__class__(doc.kind, doc.diagnosis, doc.date, title, doc.sections)
        body = cda_bytes(doc, document_id=f"1.2.643.5.1.13.99.{i}")
        ctype = "application/hl7-cda+xml"
    (Path(out) / f"{i}.bin").write_bytes(body)
    meta = {"kind": doc.kind.loinc, "category": doc.kind.category, "title": doc.kind.title}
    meta["date"] = when.isoformat(timespec="seconds")
    (Path(out) / f"{i}.json").write_text(json.dumps(meta))
    return i, rng.randrange(1 << 30), ctype, len(body)


def generate(n: int, patients: int, seed: int, args: argparse.Namespace, out: Path) -> list[Any]:
    rng = random.Random(seed)
    lo, hi = math.log(args.min_kb * 1024), math.log(args.max_kb * 1024)
    jobs = [
        (i, seed, int(math.exp(rng.uniform(lo, hi))), rng.random() < args.pdf_share, str(out))
        for i in range(n)
    ]
    with multiprocessing.Pool(os.cpu_count() or 2) as pool:
        made = pool.map(_make, jobs, chunksize=64)
    return [(i, h % patients, ctype, size) for i, h, ctype, size in made]


def bundle(i: int, patient: int, ctype: str, body: bytes, meta: dict[str, str]) -> bytes:
    rng = random.Random(patient)
    number = f"{7_100_000 + patient}"
    pat = {
        "resourceType": "Patient",
        "identifier": [{"system": GP_PATIENTS, "value": number}],
        "name": [{"family": rng.choice(FAMILIES), "given": [rng.choice(GIVEN)]}],
        "birthDate": f"{1940 + patient % 60}-{1 + patient % 12:02d}-{1 + patient % 28:02d}",
        "gender": "female",
    }
    doc = {
        "resourceType": "DocumentReference",
        "masterIdentifier": {"system": "urn:ietf:rfc:3986", "value": f"urn:oid:1.2.643.99.{i}"},
        "status": "current",
        "type": {"coding": [{"system": LOINC, "code": meta["kind"], "display": meta["title"]}]},
        "category": [{"coding": [{"system": LOINC, "code": meta["category"]}]}],
        "subject": {"reference": "urn:uuid:p"},
        "date": meta["date"],
        "author": [{"reference": f"Organization/{GP}"}],
        "custodian": {"reference": f"Organization/{GP}"},
        "description": meta["title"],
        "content": [{"attachment": {"contentType": ctype, "url": "urn:uuid:b"}}],
    }
    listing = submission_set("urn:uuid:p", GP, ["urn:uuid:d"])
    binary = {
        "resourceType": "Binary",
        "contentType": ctype,
        "data": base64.b64encode(body).decode(),
    }
    if_none = f"identifier={GP_PATIENTS}|{number}"

    def entry(ref: str, res: dict[str, Any], **request: str) -> dict[str, Any]:
        return {"fullUrl": f"urn:uuid:{ref}", "resource": res, "request": request}

    entries = [
        entry("p", pat, method="POST", url="Patient", ifNoneExist=if_none),
        entry("s", listing, method="POST", url="List"),
        entry("d", doc, method="POST", url="DocumentReference"),
        entry("b", binary, method="POST", url="Binary"),
    ]
    return json.dumps({"resourceType": "Bundle", "type": "transaction", "entry": entries}).encode()


def outbox_lag(base: str) -> int:
    return int(httpx.get(f"{base}/healthz", timeout=10).json()["outbox_lag"])


def publish(
    base: str, mo: dict[str, str], corpus: list[Any], out: Path, clients: int, probe_every: int
) -> dict[str, Any]:
    work: queue.Queue[Any] = queue.Queue()
    for item in corpus:
        work.put(item)
    probes: queue.Queue[tuple[int, float] | None] = queue.Queue()
    latencies: list[float] = []
    searchable: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(base_url=base, headers={**mo, **FJ}, timeout=300) as c:
            while True:
                try:
                    i, patient, ctype, _size = work.get_nowait()
                except queue.Empty:
                    return
                meta = json.loads((out / f"{i}.json").read_text())
                body = bundle(i, patient, ctype, (out / f"{i}.bin").read_bytes(), meta)
                t = time.perf_counter()
                r = c.post("/fhir", content=body)
                done = time.perf_counter()
                with lock:
                    latencies.append(done - t)
                    if r.status_code != 200:
                        errors.append(f"{r.status_code} {r.text[:300]}")
                        continue
                if i % probe_every == 0:
                    probes.put((i, done))

    def prober() -> None:
        with httpx.Client(base_url=base, headers=AUTH[base], timeout=60) as c:
            while True:
                item = probes.get()
                if item is None:
                    return
                i, acked = item
                while True:
                    r = c.get("/fhir/DocumentReference/$search-text", params={"q": case_word(i)})
                    if r.status_code == 200 and r.json().get("total", 0) > 0:
                        with lock:
                            searchable.append(time.perf_counter() - acked)
                        break
                    if time.perf_counter() - acked > 600:
                        errors.append(f"document {i} not searchable after 600 s")
                        break
                    time.sleep(0.05)

    probers = [threading.Thread(target=prober) for _ in range(2)]
    for t in probers:
        t.start()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    acked = time.perf_counter() - started
    while outbox_lag(base) > 0:
        time.sleep(0.2)
    drained = time.perf_counter() - started
    for _ in probers:
        probes.put(None)
    for t in probers:
        t.join()
    if errors:
        raise RuntimeError(f"{len(errors)} failures, e.g. {errors[0]}")
    n = len(corpus)
    return {
        "documents": n,
        "acked_per_s": n / acked,
        "drained_per_s": n / drained,
        "publish_p50_ms": pct(latencies, 50) * 1000,
        "publish_p95_ms": pct(latencies, 95) * 1000,
        "searchable_p50_s": pct(searchable, 50),
        "searchable_p95_s": pct(searchable, 95),
        "searchable_samples": len(searchable),
    }


def timed_gets(
    base: str, paths: list[tuple[str, dict[str, str]]], clients: int
) -> dict[str, float]:
    latencies: list[float] = []
    hits: list[int] = []
    lock = threading.Lock()
    chunks = [paths[i::clients] for i in range(clients)]

    def run(mine: list[tuple[str, dict[str, str]]]) -> None:
        with httpx.Client(base_url=base, headers=AUTH[base], timeout=60) as c:
            for path, params in mine:
                t = time.perf_counter()
                r = c.get(path, params=params)
                dt = time.perf_counter() - t
                r.raise_for_status()
                with lock:
                    latencies.append(dt)
                    hits.append(len(r.json().get("entry", [])))

    threads = [threading.Thread(target=run, args=(m,)) for m in chunks]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    return {
        "p50_ms": pct(latencies, 50) * 1000,
        "p95_ms": pct(latencies, 95) * 1000,
        "per_s": len(latencies) / elapsed,
        "mean_hits": sum(hits) / max(len(hits), 1),
    }


def golden_sample(base: str, rng: random.Random, n: int) -> list[str]:
    """``n`` golden Patient ids (the people whose documents were published)."""
    with httpx.Client(base_url=base, headers=AUTH[base], timeout=60) as c:
        r = c.get(
            "/fhir/Patient",
            params={"_tag": "https://hie.spb.ru/fhir/CodeSystem/mpi|golden", "_count": "1000"},
        )
        r.raise_for_status()
    ids = sorted(e["resource"]["id"] for e in r.json().get("entry") or [])
    return rng.sample(ids, min(len(ids), n))


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--documents", type=int, default=10_000)
    ap.add_argument("--patients", type=int, default=2_000)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--pdf-share", type=float, default=0.5)
    ap.add_argument("--min-kb", type=float, default=5)
    ap.add_argument("--max-kb", type=float, default=200)
    ap.add_argument("--probe-every", type=int, default=50)
    ap.add_argument("--queries", type=int, default=400)
    ap.add_argument("--workers", type=int, default=1, help="HIE_HTTP_WORKERS of the hub")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--keep", action="store_true", help="keep the data dir")
    ap.add_argument(
        "--work", type=Path, default=None, help="work dir (corpus and data dir), kept afterwards"
    )
    ap.add_argument(
        "--reuse",
        action="store_true",
        help="the --work dir already holds a published corpus: only time the searches",
    )
    args = ap.parse_args()
    if args.reuse and args.work is None:
        ap.error("--reuse needs --work")

    work = args.work or Path(tempfile.mkdtemp(prefix="hie-bench-docs-"))
    keep = args.keep or args.work is not None
    corpus_dir = work / "corpus"
    data = work / "var"
    corpus_dir.mkdir(parents=True, exist_ok=args.reuse)
    print(f"work dir: {work}", flush=True)
    try:
        if args.reuse:
            corpus = list(json.loads((work / "corpus.json").read_text()))
            done = work / "publish.json"  # absent when that run was cut short
            previous = json.loads(done.read_text()) if done.exists() else None
        else:
            t = time.perf_counter()
            corpus = generate(args.documents, args.patients, args.seed, args, corpus_dir)
            (work / "corpus.json").write_text(json.dumps(corpus))
            print(f"corpus generated in {time.perf_counter() - t:.0f} s", flush=True)
            data.mkdir()
        sizes = [c[3] for c in corpus]
        pdfs = sum(1 for c in corpus if c[2] == "application/pdf")
        print(
            f"corpus: {len(corpus)} documents ({pdfs} PDF, {len(corpus) - pdfs} CDA), "
            f"mean {sum(sizes) / len(sizes) / 1024:.0f} KB, total {sum(sizes) / 2**20:.0f} MB",
            flush=True,
        )
        with hub_server(
            data, f"sqlite:///{data / 'hie.db'}", HIE_HTTP_WORKERS=str(args.workers)
        ) as base:
            if args.reuse:
                pub = previous
                print("published earlier: timing the searches only", flush=True)
                while (lag := outbox_lag(base)) > 0:  # an index backlog left by that run
                    print(f"\r  indexing what is left: {lag:,} events", end="", flush=True)
                    time.sleep(5)
            else:
                r = httpx.post(
                    f"{base}/fhir",
                    json=as_transaction(lab_registry()),
                    headers={**AUTH[base], **FJ},
                    timeout=60,
                )
                r.raise_for_status()
                settings = load_settings(data_dir=data)
                token = DevTokenIssuer(settings).issue("mis", org=GP, ttl=24 * 3600)
                mo = {"Authorization": f"Bearer {token}"}
                pub = publish(base, mo, corpus, corpus_dir, args.clients, args.probe_every)
                (work / "publish.json").write_text(json.dumps(pub))
                print(
                    f"published: {pub['acked_per_s']:.1f} documents/s acknowledged, "
                    f"{pub['drained_per_s']:.1f}/s with indexing drained",
                    flush=True,
                )
            rng = random.Random(args.seed)
            golden = golden_sample(base, rng, 200)
            by_patient = timed_gets(
                base,
                [
                    ("/fhir/DocumentReference", {"patient": rng.choice(golden), "_count": "50"})
                    for _ in range(args.queries)
                ],
                2,
            )
            fulltext = timed_gets(
                base,
                [
                    (
                        "/fhir/DocumentReference/$search-text",
                        {"q": rng.choice(QUERIES), "_count": "20"},
                    )
                    for _ in range(args.queries)
                ],
                2,
            )
            content = timed_gets(
                base,
                [
                    (
                        "/fhir/DocumentReference",
                        {"_content": rng.choice(QUERIES), "patient": rng.choice(golden)},
                    )
                    for _ in range(args.queries // 2)
                ],
                2,
            )
            disk = sum(f.stat().st_size for f in data.rglob("*") if f.is_file())
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)

    if pub is None:  # --reuse of a work dir whose publishing run was cut short
        pub = dict.fromkeys(PUBLISH_FIGURES, math.nan)
    rows = [
        (
            "publish (ITI-65), acknowledged",
            f"{pub['acked_per_s']:.1f} docs/s",
            "≥ 200 docs/s incl. indexing",
        ),
        ("publish, indexing lag drained", f"{pub['drained_per_s']:.1f} docs/s", "≥ 200 docs/s"),
        (
            "publish request p50 / p95",
            f"{pub['publish_p50_ms']:.0f} / {pub['publish_p95_ms']:.0f} ms",
            "",
        ),
        (
            "publish → searchable p50 / p95",
            f"{pub['searchable_p50_s']:.2f} / {pub['searchable_p95_s']:.2f} s",
            "p95 ≤ 2 s",
        ),
        (
            "ITI-67 by patient p50 / p95",
            f"{by_patient['p50_ms']:.1f} / {by_patient['p95_ms']:.1f} ms",
            "p95 ≤ 20 ms",
        ),
        (
            "$search-text p50 / p95",
            f"{fulltext['p50_ms']:.1f} / {fulltext['p95_ms']:.1f} ms",
            "p95 ≤ 100 ms",
        ),
        (
            "_content + patient p50 / p95",
            f"{content['p50_ms']:.1f} / {content['p95_ms']:.1f} ms",
            "",
        ),
    ]
    print(
        f"\nDocuments (IHE MHD), {len(corpus)} documents, {args.clients} publishing clients, "
        "embedded default"
    )
    if args.reuse:
        print("  (publish figures: from the run that built the work dir)")
    for name, value, target in rows:
        print(f"  {name:<34} {value:>22}   {target}")
    line = {
        "bench": "documents",
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "corpus": {
            "documents": len(corpus),
            "pdf": pdfs,
            "mean_kb": sum(sizes) / len(sizes) / 1024,
        },
        "publish": pub,
        "searches_only": args.reuse,
        "by_patient": by_patient,
        "fulltext": fulltext,
        "content": content,
        "disk_mb": disk / 2**20,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(line, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
