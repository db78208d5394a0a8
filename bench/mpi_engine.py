"""MPI matching-engine benchmark (issue #4): throughput and auto-link quality, in process.

1. Generates ``--n`` golden patients (default 1,000,000) with ``hie.demo.Generator`` and files
   them in the in-memory :class:`~hie.registries.mpi.CandidateIndex` under their blocking keys.
2. Builds a labelled stream of ``--queries`` incoming source records "from another MO":
   - true matches — a golden patient re-sent with another MO's record number, variously
     without SNILS / OMS / passport, phone or address changed or dropped, and with a variant:
     an exact copy, one typo (``typo_variant``), names in Latin (``transliterate_variant``,
     ICAO and GOST), day and month of birth swapped (``swap_day_month``), or two at once;
   - true non-matches — new people, and hard ones made from a golden patient: a namesake
     born on another date, a twin (same family, patronymic, birth date and address, another
     given name), the same name and birth date with a different SNILS.
3. Matches every record, single process: features → blocking keys → candidates → score →
   decide, timed together.

Prints a table (throughput, candidates per query, block sizes, precision and recall of
auto-link, share sent to review, the confusion per variant kind) and appends one JSON line to
``bench/results/mpi_engine.jsonl``.

    .venv/bin/python bench/mpi_engine.py                   # 1,000,000 golden, 20,000 queries
    .venv/bin/python bench/mpi_engine.py --n 100000 --queries 5000
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import random
import sys
import time
from collections import Counter, defaultdict
from datetime import date
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hie.demo import (  # noqa: E402
    MOS,
    Generator,
    names,
    swap_day_month,
    transliterate_variant,
    typo_variant,
)
from hie.demo import identifiers as demo_ids  # noqa: E402
from hie.registries.identifiers import (  # noqa: E402
    OMS_SYSTEM,
    PASSPORT_SYSTEM,
    SNILS_SYSTEM,
)
from hie.registries.mpi import (  # noqa: E402
    DEFAULT_THRESHOLDS,
    CandidateIndex,
    PersonFeatures,
    Thresholds,
    best_match,
    blocking_keys,
    person_features,
)

RESULTS = ROOT / "bench" / "results" / "mpi_engine.jsonl"
TODAY = date(2025, 11, 1)  # the demo world's reference date

MATCH_KINDS: dict[str, float] = {
    "exact": 0.22,
    "typo": 0.22,
    "translit:icao": 0.12,
    "translit:gost": 0.06,
    "swap": 0.14,
    "typo+swap": 0.08,
    "translit+typo": 0.08,
    "translit+swap": 0.08,
}
NONMATCH_KINDS: dict[str, float] = {
    "new-person": 0.45,
    "namesake-other-birth-date": 0.2,
    "twin": 0.2,
    "same-name-and-birth-date-other-snils": 0.15,
}


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- the labelled stream -----------------------------------------------------------------


def _swappable(p: dict[str, Any]) -> bool:
    born = date.fromisoformat(p["birthDate"])
    return born.day <= 12 and born.day != born.month


def _has_snils(p: dict[str, Any]) -> bool:
    return any(i.get("system") == SNILS_SYSTEM for i in p["identifier"])


def as_other_mo_record(
    p: dict[str, Any], rng: random.Random, fresh: Generator, *, keep_snils: float = 0.5
) -> tuple[dict[str, Any], list[str]]:
    """``p`` as another MO's source record: its own MRN, some identifiers, contacts changed."""
    tags: list[str] = []
    mo = rng.choice([m for m in MOS if m.treats_patients])
    kept: list[dict[str, Any]] = []
    for ident in p["identifier"]:
        system = ident.get("system")
        if system == SNILS_SYSTEM:
            if rng.random() < keep_snils:
                kept.append(ident)
                tags.append("with-snils")
        elif system == OMS_SYSTEM:
            if rng.random() < 0.5:
                kept.append(ident)
        elif system == PASSPORT_SYSTEM:
            if rng.random() < 0.3:
                kept.append(ident)
    kept.append(demo_ids.mrn_identifier(mo.oid, f"{rng.randrange(10**6, 10**7)}", mo.name))
    p["identifier"] = kept
    if "with-snils" not in tags:
        tags.append("without-snils")
    r = rng.random()
    if r < 0.25:
        p.pop("telecom", None)
    elif r < 0.35:
        p["telecom"] = [{"system": "phone", "value": f"+79{rng.randrange(10**9):09d}"}]
    r = rng.random()
    if r < 0.2:
        p.pop("address", None)
    elif r < 0.3:
        p["address"] = fresh.patient()["address"]
    return p, tags


def true_match(
    golden: dict[str, Any], kind: str, rng: random.Random, fresh: Generator
) -> tuple[dict[str, Any], list[str]]:
    """A new source record of the golden person, with the variant ``kind``."""
    p = copy.deepcopy(golden)
    labels: list[str] = []
    for part in kind.split("+"):
        if part == "typo":
            p, label = typo_variant(p, rng)
        elif part == "swap":
            p, label = swap_day_month(p)
        elif part.startswith("translit"):
            scheme = "gost" if part.endswith("gost") else rng.choice(("icao", "icao", "gost"))
            p, label = transliterate_variant(p, scheme)  # type: ignore[arg-type]
        else:
            label = "exact"
        labels.append(label)
    p, tags = as_other_mo_record(p, rng, fresh)
    return p, labels + tags


def _other_given(p: dict[str, Any], rng: random.Random) -> str:
    table = names.FEMALE_GIVEN_NAMES if p["gender"] == "female" else names.MALE_GIVEN_NAMES
    current = p["name"][0]["given"][0]
    while True:
        name = rng.choice(table)
        if name != current:
            return name


def true_nonmatch(
    golden: dict[str, Any] | None, kind: str, rng: random.Random, fresh: Generator
) -> tuple[dict[str, Any], list[str]]:
    """A record of a person who is not in the index (hard kinds are built from ``golden``)."""
    p = fresh.patient()
    if kind == "new-person" or golden is None:
        return as_other_mo_record(p, rng, fresh)[0], []
    gname = golden["name"][0]
    if kind == "namesake-other-birth-date":
        p["gender"] = golden["gender"]
        p["name"] = copy.deepcopy(golden["name"])
        while p["birthDate"] == golden["birthDate"]:
            p["birthDate"] = fresh.patient()["birthDate"]
        return as_other_mo_record(p, rng, fresh)[0], []
    if kind == "twin":
        p["gender"] = golden["gender"]
        p["birthDate"] = golden["birthDate"]
        p["address"] = copy.deepcopy(golden.get("address", []))
        given = _other_given(golden, rng)
        p["name"] = [
            {
                "use": "official",
                "family": gname["family"],
                "given": [given, *gname["given"][1:]],
                "text": " ".join([gname["family"], given, *gname["given"][1:]]),
            }
        ]
        if rng.random() < 0.3:  # a parent's number on both children's records
            p["telecom"] = copy.deepcopy(golden.get("telecom", []))
        return as_other_mo_record(p, rng, fresh)[0], []
    # same-name-and-birth-date-other-snils: a different person whose record has a SNILS.
    p["gender"] = golden["gender"]
    p["birthDate"] = golden["birthDate"]
    p["name"] = copy.deepcopy(golden["name"])
    p["identifier"] = [i for i in p["identifier"] if i.get("system") != SNILS_SYSTEM]
    p["identifier"].insert(0, demo_ids.snils_identifier(demo_ids.random_snils(rng)))
    return as_other_mo_record(p, rng, fresh, keep_snils=1.0)[0], []


# --- the run -----------------------------------------------------------------------------


def build(
    n: int, seed: int, keep: set[int]
) -> tuple[CandidateIndex, list[PersonFeatures], dict[int, dict[str, Any]], float]:
    gen = Generator(seed)
    index = CandidateIndex()
    feats: list[PersonFeatures] = []
    kept: dict[int, dict[str, Any]] = {}
    t0 = time.perf_counter()
    gc.disable()  # millions of small acyclic objects: the collector only slows this down
    try:
        for i in range(n):
            p = gen.patient()
            if i in keep:
                kept[i] = p
            f = person_features(p, today=TODAY)
            feats.append(f)
            index.add(f"p{i:07d}", blocking_keys(f))
            if i and i % 100_000 == 0:
                rate = i / (time.perf_counter() - t0)
                progress(f"  indexed {i:,} golden patients ({rate:,.0f}/s)")
    finally:
        gc.enable()
    return index, feats, kept, time.perf_counter() - t0


def make_stream(
    n: int, queries: int, seed: int, match_share: float
) -> tuple[list[tuple[str, str, int | None]], set[int], random.Random]:
    """Plan the stream: (class, kind, golden index or None) per query; records come later."""
    rng = random.Random(seed * 7919 + 1)
    plan: list[tuple[str, str, int | None]] = []
    for _ in range(queries):
        if rng.random() < match_share:
            kind = rng.choices(list(MATCH_KINDS), weights=list(MATCH_KINDS.values()))[0]
            plan.append(("match", kind, rng.randrange(n)))
        else:
            kind = rng.choices(list(NONMATCH_KINDS), weights=list(NONMATCH_KINDS.values()))[0]
            plan.append(("nonmatch", kind, None if kind == "new-person" else rng.randrange(n)))
    keep = {g for _, _, g in plan if g is not None}
    return plan, keep, rng


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=1_000_000, help="golden patients")
    ap.add_argument("--queries", type=int, default=20_000, help="incoming records")
    ap.add_argument("--match-share", type=float, default=0.6)
    ap.add_argument("--limit", type=int, default=50, help="candidates per query")
    ap.add_argument("--auto", type=float, default=DEFAULT_THRESHOLDS.auto)
    ap.add_argument("--review", type=float, default=DEFAULT_THRESHOLDS.review)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument(
        "--show-errors", type=int, default=0, help="print N misclassified records, explained"
    )
    args = ap.parse_args()
    thresholds = Thresholds(auto=args.auto, review=args.review)

    plan, keep, rng = make_stream(args.n, args.queries, args.seed, args.match_share)
    progress(f"generating and indexing {args.n:,} golden patients …")
    index, feats, kept, build_s = build(args.n, args.seed, keep)

    # Records of the stream (swap kinds need a date that can be swapped: re-pick if not).
    fresh = Generator(args.seed + 1_000_003)
    stream: list[tuple[str, str, str | None, list[str], dict[str, Any]]] = []
    swappable = [i for i in sorted(keep) if _swappable(kept[i])]
    with_snils = [i for i in sorted(keep) if _has_snils(kept[i])]
    for cls, kind, g in plan:
        if cls == "match":
            assert g is not None
            golden = kept[g]
            if "swap" in kind and not _swappable(golden):
                g = rng.choice(swappable)
                golden = kept[g]
            try:
                rec, tags = true_match(golden, kind, rng, fresh)
            except ValueError:  # no typo applies to this name: send it as is
                rec, tags = true_match(golden, "exact", rng, fresh)
                kind = "exact"
            stream.append((cls, kind, f"p{g:07d}", tags, rec))
        else:
            golden = kept.get(g) if g is not None else None
            if kind == "same-name-and-birth-date-other-snils" and golden is not None:
                if not _has_snils(golden):
                    golden = kept[rng.choice(with_snils)]
            rec, tags = true_nonmatch(golden, kind, rng, fresh)
            stream.append((cls, kind, None, tags, rec))

    progress(f"matching {len(stream):,} incoming records …")
    outcomes: list[tuple[str, str, str | None, list[str], str, str | None, str | None]] = []
    n_candidates = 0
    found = 0
    block_hits: dict[str, list[int]] = defaultdict(list)
    t_feat = t_block = t_score = 0.0
    errors: list[tuple[str, str, str | None, dict[str, Any], Any]] = []
    histogram: dict[str, Counter[int]] = {"match": Counter(), "nonmatch": Counter()}
    gc.collect()
    t0 = time.perf_counter()
    for cls, kind, gid, tags, rec in stream:
        a = time.perf_counter()
        f = person_features(rec, today=TODAY)
        b = time.perf_counter()
        keys = blocking_keys(f)
        cands = index.candidates(keys, args.limit)
        c = time.perf_counter()
        result = best_match(f, ((pid, feats[int(pid[1:])]) for pid in cands), thresholds)
        d = time.perf_counter()
        t_feat += b - a
        t_block += c - b
        t_score += d - c
        n_candidates += len(cands)
        if gid is not None and gid in cands:
            found += 1
        rule = result.match.rule if result.match else None
        outcomes.append((cls, kind, gid, tags, result.decision, result.person_id, rule))
        if result.match is not None and rule == "probabilistic":
            # Where the auto-link threshold could go: probabilistic best scores by truth.
            truth = "match" if cls == "match" and result.person_id == gid else "nonmatch"
            histogram[truth][int(result.match.score // 2 * 2)] += 1
        wrong = (cls == "match") != (result.decision == "auto-link") or (
            cls == "match" and result.person_id != gid
        )
        if wrong and len(errors) < args.show_errors:
            errors.append((cls, kind, gid, rec, result))
    total_s = time.perf_counter() - t0
    for _, _, _, _, rec in stream[:5000]:
        for key in blocking_keys(person_features(rec, today=TODAY)):
            block_hits[key.split(":", 1)[0]].append(index.block_size(key))

    # --- quality ---------------------------------------------------------------------
    n_match = sum(1 for o in outcomes if o[0] == "match")
    tp = sum(1 for o in outcomes if o[0] == "match" and o[4] == "auto-link" and o[5] == o[2])
    fp = sum(1 for o in outcomes if o[4] == "auto-link" and (o[0] == "nonmatch" or o[5] != o[2]))
    reviewed = sum(1 for o in outcomes if o[4] == "review")
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / n_match if n_match else 1.0
    per_kind: dict[str, Counter[str]] = defaultdict(Counter)
    per_rule: Counter[str] = Counter()
    for cls, kind, gid, tags, decision, pid, rule in outcomes:
        label = decision
        if decision == "auto-link" and cls == "match":
            label = "auto-link" if pid == gid else "auto-link-wrong"
        per_kind[f"{cls}:{kind}"][label] += 1
        if cls == "match":
            per_kind[f"match:{tags[-1]}"][label] += 1
        per_rule[f"{cls}:{rule}:{label}"] += 1

    sizes_by_prefix: dict[str, list[int]] = defaultdict(list)
    for key, size in index.blocks():
        sizes_by_prefix[key.split(":", 1)[0]].append(size)
    block_stats = {
        prefix: {
            "keys": len(v),
            "mean_size": sum(v) / len(v),
            "max_size": max(v),
            "mean_size_hit_by_query": (
                sum(block_hits[prefix]) / len(block_hits[prefix]) if block_hits[prefix] else 0
            ),
        }
        for prefix, v in sorted(sizes_by_prefix.items())
    }
    all_sizes = [s for v in sizes_by_prefix.values() for s in v]
    all_hits = [s for v in block_hits.values() for s in v]

    q = len(outcomes)
    res = {
        "golden": args.n,
        "queries": q,
        "build_s": build_s,
        "matches_per_s": q / total_s,
        "us_per_query": {
            "features": t_feat / q * 1e6,
            "blocking_and_candidates": t_block / q * 1e6,
            "scoring_and_decide": t_score / q * 1e6,
        },
        "candidates_per_query": n_candidates / q,
        "blocking_recall": found / n_match if n_match else 1.0,
        "precision": precision,
        "recall": recall,
        "review_share": reviewed / q,
        "false_auto_links": fp,
        "thresholds": {"auto": thresholds.auto, "review": thresholds.review},
        "mean_block_size": sum(all_sizes) / len(all_sizes),
        "mean_block_size_hit_by_query": sum(all_hits) / len(all_hits) if all_hits else 0,
        "blocks": block_stats,
        "per_kind": {k: dict(v) for k, v in sorted(per_kind.items())},
        "per_rule": dict(sorted(per_rule.items())),
        "probabilistic_score_histogram": {
            truth: {str(k): v for k, v in sorted(h.items())} for truth, h in histogram.items()
        },
    }

    # --- report ----------------------------------------------------------------------
    print(f"\nMPI matching engine — {args.n:,} golden patients, {q:,} incoming records")
    print(f"{'measure':<44} {'value':>14} {'target':>12}")
    print("-" * 72)
    us = res["us_per_query"]
    rows = [
        ("throughput (features+blocking+score+decide)", f"{res['matches_per_s']:,.0f}/s",
         "≥ 2,000/s"),
        ("  features / blocking / scoring µs",
         f"{us['features']:.0f} / {us['blocking_and_candidates']:.0f} / "
         f"{us['scoring_and_decide']:.0f}", ""),
        ("candidates per query", f"{res['candidates_per_query']:.2f}", ""),
        ("blocking recall (true golden among candidates)", f"{res['blocking_recall']:.4f}", ""),
        ("precision of auto-link", f"{precision:.4f}", "≥ 0.999"),
        ("recall of auto-link", f"{recall:.4f}", "≥ 0.98"),
        ("share sent to review", f"{res['review_share']:.4f}", ""),
        ("false auto-links", f"{fp}", ""),
        ("mean block size (all keys / hit by queries)",
         f"{res['mean_block_size']:.2f} / {res['mean_block_size_hit_by_query']:.2f}", ""),
        ("index build (generate+features+keys)", f"{build_s:,.0f} s", ""),
    ]  # fmt: skip
    for name, value, target in rows:
        print(f"{name:<44} {value:>14} {target:>12}")
    print(f"\n{'block key':<10} {'keys':>10} {'mean size':>10} {'max':>6} {'hit by queries':>15}")
    for prefix, st in block_stats.items():
        print(
            f"{prefix:<10} {st['keys']:>10,} {st['mean_size']:>10.2f} {st['max_size']:>6} "
            f"{st['mean_size_hit_by_query']:>15.2f}"
        )
    print("\nbest score under the probabilistic rule (2-bit buckets): true links / others")
    for bucket in sorted(set(histogram["match"]) | set(histogram["nonmatch"])):
        print(
            f"  [{bucket:>3}, {bucket + 2:>3})  {histogram['match'][bucket]:>7}"
            f"  {histogram['nonmatch'][bucket]:>7}"
        )
    cols = ["auto-link", "auto-link-wrong", "review", "new"]
    print(f"\n{'kind':<52} " + " ".join(f"{c:>15}" for c in cols))
    for kind, counts in sorted(per_kind.items()):
        print(f"{kind:<52} " + " ".join(f"{counts.get(c, 0):>15}" for c in cols))

    for cls, kind, gid, rec, result in errors:
        name = rec.get("name", [{}])[0]
        print(f"\n{cls}:{kind} → {result.decision} (true golden {gid}, best {result.person_id})")
        print(f"  incoming: {name.get('family')} {name.get('given')} {rec.get('birthDate')}")
        if result.person_id is not None:
            other = feats[int(result.person_id[1:])]
            print(f"  best:     {other.family} {other.given} {other.middle} {other.birth_date}")
            print("  " + result.match.explain().replace("\n", "\n  "))

    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    line = {
        "bench": "mpi_engine",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "args": {k: str(v) for k, v in vars(args).items()},
        "results": res,
    }
    with RESULTS.open("a") as fh:
        fh.write(json.dumps(line, ensure_ascii=False) + "\n")
    print(f"\nappended to {RESULTS.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
